"""Training data: a JSONL file streamed from disk, tokenized on the fly, loss on response tokens.

One scan of the file validates every line (naming the first bad one), records its byte offset
and tokenized length, and nothing else: examples are read back by offset when a batch needs them,
so memory holds a few integers per example, never the text. Each epoch visits the examples in a
seeded permutation of those offsets (a full shuffle at the cost of a shuffle buffer's memory), so
a run is deterministic and resumes from (epoch, position) exactly.
"""

from __future__ import annotations

import json
import os
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch

from sorsa_tools.errors import DataError
from sorsa_tools.prompts import FIELD_PAIRS, TEMPLATES, render_prompt, response_prefix

IGNORE = -100
_SCAN_BATCH = 512


def shard(batch: list, rank: int, world_size: int) -> list:
    """Rank `rank`'s contiguous share of a global micro-batch (shares differ by at most one row).

    Every rank cuts the same global micro-batch of the same seeded epoch order, so the ranks
    together see each example once per epoch, and N ranks see exactly what one process with an
    N times larger batch would.
    """
    n = len(batch)
    return batch[rank * n // world_size : (rank + 1) * n // world_size]


PACKED_KEY = "segment_ids"  # present in a batch of packed rows


@dataclass(frozen=True)
class Fields:
    prompt: str | None  # None: plain-text mode, loss on every token of `response`
    response: str
    context: str | None = None  # Alpaca's "input": the instruction's material, part of the prompt

    def describe(self) -> str:
        if self.prompt is None:
            return self.response
        return ",".join(x for x in (self.prompt, self.context, self.response) if x)

    def question(self, record: dict) -> str:
        """The prompt field, with the context field (where the record has one) after it, set out
        as Alpaca's template does."""
        text = record[self.prompt]
        ctx = record.get(self.context) if self.context else None
        return f"{text}\n\n### Input:\n{ctx}" if ctx else text


def parse_fields(spec: str | None) -> Fields | None:
    """`--fields question,answer` (prompt, response), `--fields instruction,input,output` (prompt,
    context, response) or `--fields text` (plain text)."""
    if spec is None:
        return None
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) == 1 and parts[0]:
        return Fields(None, parts[0])
    if len(parts) == 2 and all(parts):
        return Fields(parts[0], parts[1])
    if len(parts) == 3 and all(parts):
        return Fields(parts[0], parts[2], context=parts[1])
    raise DataError(
        f"--fields {spec!r}: give PROMPT,RESPONSE (e.g. question,answer), PROMPT,INPUT,RESPONSE "
        "(e.g. instruction,input,output) or one TEXT field"
    )


FIELDS_HINT = "pass --fields PROMPT,RESPONSE or --fields TEXT"


def check_data_file(path: Path, wanted: str = "an existing JSONL file") -> None:
    """--data must name a file: say so apart for a directory, for something that is not a regular
    file (a device, a pipe: read twice, by offset) and for nothing there."""
    if path.is_dir():
        raise DataError(f"--data {path} is a directory; pass {wanted}")
    if path.exists() and not path.is_file():
        raise DataError(
            f"--data {path} is not a regular file (the data is read twice, by offset); pass {wanted}"
        )
    if not path.is_file():
        raise DataError(f"data file not found: {path}; pass {wanted} to --data")


def _json_type(value) -> str:
    """A JSON value's type as JSON names it (the user wrote JSON, not Python)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    names = {int: "a number", float: "a number", str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _check_format(path: Path, head: bytes) -> None:
    """Formats that are not JSONL, named by their first bytes (each line's error would mislead)."""
    if head.startswith(b"\x1f\x8b"):
        raise DataError(f"{path} is gzip-compressed; decompress it first (gunzip), sorsa reads plain JSONL")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path} is UTF-16 text; re-save it as UTF-8 JSONL")
    if head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):
        raise DataError(
            f"{path} holds a JSON array, not JSONL; write one JSON object per line "
            f"(e.g. jq -c '.[]' {path.name} > {path.stem}.jsonl)"
        )


def _stamp(f) -> tuple[int, int]:
    """(size, modification time) of an open file: whether it is still the file that was scanned."""
    st = os.fstat(f.fileno())
    return st.st_size, st.st_mtime_ns


def _detect_fields(record: dict, lineno: int, path: Path, hint: str = FIELDS_HINT) -> Fields:
    for p, r in FIELD_PAIRS:
        if p in record and r in record:
            # Alpaca: an "input" beside instruction and output is part of the prompt, not dropped
            return Fields(p, r, "input" if p == "instruction" and "input" in record else None)
    if "text" in record:
        return Fields(None, "text")
    keys = ", ".join(sorted(record)[:8]) or "none"
    raise DataError(f"{path}:{lineno}: no known fields (keys: {keys}); {hint}")


class Dataset:
    """A tokenized view of a JSONL file, read lazily by byte offset."""

    def __init__(
        self,
        path: str | Path,
        tokenizer,
        fields: Fields | None = None,
        template: str = "paper",
        max_length: int = 512,
        pack: bool = False,
        fields_hint: str = FIELDS_HINT,
    ):
        """`fields_hint`: what to tell the user when no known fields are found."""
        self.path = Path(path).expanduser()
        self.tok = tokenizer
        self.template = template
        self.max_length = max_length
        self.pack = pack
        if template not in TEMPLATES:
            raise DataError(f"--template {template!r} is not one of {', '.join(TEMPLATES)}")
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "--template chat: this tokenizer has no chat template; use --template paper or raw"
            )
        if max_length < 2:
            raise DataError(f"--max-length must be at least 2 (got {max_length})")
        check_data_file(self.path)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        self.fields = fields
        self.offsets = array("q")  # byte offset of every usable example
        self.lengths = array("l")  # its token count after truncation
        self.response_tokens = array("l")  # tokens that carry loss
        self.truncated = array("b")  # 1 where --max-length cut the example
        self.n_records = 0
        self.n_too_long = 0
        self._fields_hint = fields_hint
        self._scan()

    # -- scanning -------------------------------------------------------------------------------
    def _scan(self) -> None:
        pending: list[tuple[int, dict]] = []
        with open(self.path, "rb") as f:
            self._stamp = _stamp(f)
            _check_format(self.path, f.read(4096))
            f.seek(0)
            lineno = 0
            while True:
                off = f.tell()
                raw = f.readline()
                if not raw:
                    break
                lineno += 1
                if not raw.strip():
                    continue
                rec = self._parse(raw, lineno)
                if self.fields is None:
                    self.fields = _detect_fields(rec, lineno, self.path, self._fields_hint)
                self._check_fields(rec, lineno)
                pending.append((off, rec))
                if len(pending) >= _SCAN_BATCH:
                    self._measure(pending)
                    pending = []
        self._measure(pending)
        if self.n_records == 0:
            raise DataError(
                f"{self.path} holds no examples (empty file); pass a JSONL file with one object a line"
            )
        if not self.offsets:
            raise DataError(
                f"all {self.n_records} examples of {self.path} leave no response token within "
                f"--max-length {self.max_length} (the prompt alone fills it); raise --max-length"
            )

    def _parse(self, raw: bytes, lineno: int) -> dict:
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{self.path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                "re-save the file as UTF-8"
            ) from None
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{self.path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line"
            ) from None
        if not isinstance(rec, dict):
            raise DataError(
                f"{self.path}:{lineno}: each line must be a JSON object, got {_json_type(rec)}; "
                "fix or remove the line"
            )
        return rec

    def _check_fields(self, rec: dict, lineno: int) -> None:
        for name in (self.fields.prompt, self.fields.context, self.fields.response):
            if name is None or (name == self.fields.context and rec.get(name) is None):
                continue  # a record without the context field (or null there) has none
            if name not in rec:
                raise DataError(
                    f"{self.path}:{lineno}: field {name!r} is missing (keys: {', '.join(sorted(rec)[:8])}); "
                    "pass --fields to name the right ones"
                )
            if not isinstance(rec[name], str):
                raise DataError(
                    f"{self.path}:{lineno}: field {name!r} must be a string, got {_json_type(rec[name])}; "
                    "fix or remove the line"
                )
            try:
                rec[name].encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate escape (\ud800) is valid JSON, not text
                raise DataError(
                    f"{self.path}:{lineno}: field {name!r} is not valid Unicode ({e.reason} at character "
                    f"{e.start}); fix or remove the line"
                ) from None

    def _measure(self, pending: list[tuple[int, dict]]) -> None:
        if not pending:
            return
        for (off, _), (ids, labels, truncated) in zip(
            pending, self._encode([r for _, r in pending]), strict=True
        ):
            self.n_records += 1
            n_resp = sum(1 for x in labels[1:] if x != IGNORE)  # targets: a row's first token is none
            if n_resp == 0:
                self.n_too_long += 1
                continue
            self.offsets.append(off)
            self.lengths.append(len(ids))
            self.response_tokens.append(n_resp)
            self.truncated.append(bool(truncated))

    @property
    def n_truncated(self) -> int:
        """Usable examples that --max-length cut."""
        return sum(self.truncated)

    # -- encoding -------------------------------------------------------------------------------
    def _encode(self, records: list[dict]) -> list[tuple[list[int], list[int], bool]]:
        """(input ids, labels, truncated) for each record, loss on response tokens only."""
        tok, f = self.tok, self.fields
        eos = [] if self.eos is None else [self.eos]
        if f.prompt is None:
            texts = [r[f.response] for r in records]
            enc = tok(texts, add_special_tokens=True)["input_ids"]
            out = []
            for ids in enc:
                ids = ids + eos
                out.append((ids[: self.max_length], ids[: self.max_length], len(ids) > self.max_length))
            return out
        prompts = [render_prompt(f.question(r), self.template, tok) for r in records]
        # a chat template writes its own BOS; the others get the tokenizer's special tokens
        special = self.template != "chat"
        p_ids = tok(prompts, add_special_tokens=special)["input_ids"]
        sep = response_prefix(self.template)
        responses = [sep + r[f.response] for r in records]
        # the whole text in one piece, as the model reads it: encoded apart, the response's leading
        # space becomes a token of its own in SentencePiece-style tokenizers (Llama 2, Mistral:
        # "▁▁" + "N" where the text has "▁N"), a seam the model would learn and never see
        whole = tok([p + r for p, r in zip(prompts, responses, strict=True)], add_special_tokens=special)[
            "input_ids"
        ]
        r_ids = [w[len(p) :] if w[: len(p)] == p else None for p, w in zip(p_ids, whole, strict=True)]
        apart = [i for i, r in enumerate(r_ids) if r is None]  # a token spans the seam: split there
        if apart:
            enc = tok([responses[i] for i in apart], add_special_tokens=False)["input_ids"]
            for i, r in zip(apart, enc, strict=True):
                r_ids[i] = r
        out = []
        for p, r in zip(p_ids, r_ids, strict=True):
            ids = p + r + eos
            labels = [IGNORE] * len(p) + r + eos
            out.append((ids[: self.max_length], labels[: self.max_length], len(ids) > self.max_length))
        return out

    def read(self, indices: list[int]) -> list[tuple[list[int], list[int]]]:
        """Tokenized examples by index (into the usable examples), read from disk by offset."""
        recs = []
        with open(self.path, "rb") as fh:
            changed = _stamp(fh) != self._stamp
            try:
                for i in indices:
                    fh.seek(self.offsets[i])
                    recs.append(json.loads(fh.readline()))
                    self._check_fields(recs[-1], 0)
            except (ValueError, DataError):  # JSON, Unicode or fields: not the line that was scanned
                changed = True
        if changed:  # the offsets point into the file as it was: what they read now is not the data
            raise DataError(
                f"{self.path} changed after it was read (size or time differ); restore it and rerun with "
                "--resume, or start a new run on the new file"
            )
        return [(ids, labels) for ids, labels, _ in self._encode(recs)]

    # -- epochs and batches ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.offsets)

    def epoch_order(self, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
        if not shuffle:
            return list(range(len(self)))
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=g).tolist()

    def micro_batches(
        self, epoch: int, seed: int, batch_size: int, shuffle: bool = True
    ) -> list[list[list[int]]]:
        """The epoch's micro-batches: each a list of rows, each row the examples it holds
        (one without packing; greedily packed up to max_length with it)."""
        order = self.epoch_order(epoch, seed, shuffle)
        if self.pack:
            rows, cur, used = [], [], 0
            for i in order:
                n = self.lengths[i]
                if cur and used + n > self.max_length:
                    rows.append(cur)
                    cur, used = [], 0
                cur.append(i)
                used += n
            if cur:
                rows.append(cur)
        else:
            rows = [[i] for i in order]
        return [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]

    def idle_batch(self) -> dict[str, torch.Tensor]:
        """One two-token row that carries no loss: a data-parallel rank left without rows at the
        end of an epoch runs it, so that its backward still joins DDP's gradient all-reduce."""
        ids = torch.full((1, 2), self.pad, dtype=torch.long)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(2).unsqueeze(0),
            "labels": torch.full_like(ids, IGNORE),
        }

    def collate(self, batch: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-padded input_ids, attention_mask, position_ids and labels (already shifted
        alignment is left to the loss: labels[t] is the target of position t). Packed rows also
        get `segment_ids` (each token's example within its row, -1 on padding): their position ids
        restart at every example, and the loss attends within an example only."""
        flat = self.read([i for row in batch for i in row])
        it = iter(flat)
        rows = []
        for row in batch:
            ids, labels, pos, seg = [], [], [], []
            for j, _ in enumerate(row):
                a, b = next(it)
                if j:  # a packed example's first token is not predicted from the one before it
                    b = [IGNORE, *b[1:]]
                ids += a
                labels += b
                pos += list(range(len(a)))
                seg += [j] * len(a)
            rows.append((ids, labels, pos, seg))
        width = max(len(r[0]) for r in rows)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        segments = torch.full((n, width), -1, dtype=torch.long)
        for k, (ids, lab, pos, seg) in enumerate(rows):
            L = len(ids)
            input_ids[k, :L] = torch.tensor(ids)
            labels[k, :L] = torch.tensor(lab)
            position_ids[k, :L] = torch.tensor(pos)
            segments[k, :L] = torch.tensor(seg)
            mask[k, :L] = 1
        out = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": position_ids,
            "labels": labels,
        }
        if self.pack:  # the key itself tells the loss to isolate the examples of a row (PACKED_KEY)
            out[PACKED_KEY] = segments
        return out
