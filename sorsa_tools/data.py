"""Training data: records streamed from disk, tokenized on the fly, loss on response tokens.

The records come from `io.records` (a JSONL file read by byte offset; Parquet, Arrow, CSV or a Hub
dataset memory-mapped through `datasets`). One scan validates every record (naming the first bad
one), records its key and tokenized length, and nothing else: examples are read back by key when
a batch needs them, so memory holds a few integers per example, never the text. Prompt/response
records get the paper's (or another) template; conversations their chat template (`chat`). Each epoch visits the examples in a
seeded permutation of those offsets (a full shuffle at the cost of a shuffle buffer's memory), so
a run is deterministic and resumes from (epoch, position) exactly.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sorsa_tools import chat
from sorsa_tools.errors import DataError
from sorsa_tools.io.records import (  # noqa: F401  (check_data_file: evaluate imports it from here)
    DataSpec,
    RecordSource,
    _json_type,
    check_data_file,
    open_source,
)
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
    chat: bool = False  # `response` holds a conversation (a list of turns), rendered by chat.py

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


def _detect_fields(record: dict, where: str, hint: str = FIELDS_HINT) -> Fields:
    for col in chat.CONVERSATION_COLUMNS:
        if chat.is_conversation(record.get(col)):
            return Fields(None, col, chat=True)
    for p, r in FIELD_PAIRS:
        if p in record and r in record:
            # Alpaca: an "input" beside instruction and output is part of the prompt, not dropped
            return Fields(p, r, "input" if p == "instruction" and "input" in record else None)
    if "text" in record:
        return Fields(None, "text")
    keys = ", ".join(sorted(record)[:8]) or "none"
    raise DataError(f"{where}: no known fields (keys: {keys}); {hint}")


class Dataset:
    """A tokenized view of a record source (io.records), read lazily by key."""

    def __init__(
        self,
        data: str | Path | DataSpec | RecordSource,
        tokenizer,
        fields: Fields | None = None,
        template: str = "paper",
        max_length: int = 512,
        pack: bool = False,
        fields_hint: str = FIELDS_HINT,
    ):
        """`data`: what --data names (a path, a Hub id, a DataSpec) or an open source.
        `fields_hint`: what to tell the user when no known fields are found."""
        self.tok = tokenizer
        self.template = template
        self.max_length = max_length
        self.pack = pack
        if template not in TEMPLATES:
            raise DataError(f"--template {template!r} is not one of {', '.join(TEMPLATES)}")
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "--template chat: this tokenizer has no chat template; use --template chatml, paper or raw"
            )
        if max_length < 2:
            raise DataError(f"--max-length must be at least 2 (got {max_length})")
        if hasattr(data, "scan"):  # an open source
            self.source = data
        else:
            self.source = open_source(data if isinstance(data, DataSpec) else DataSpec(str(data)))
        self.path = getattr(self.source, "path", None)  # the local file or folder (None: a Hub id)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)
        self.fields = fields
        self.offsets = array("q")  # key of every usable example (byte offset or row number)
        self.lengths = array("l")  # its token count after truncation
        self.response_tokens = array("l")  # tokens that carry loss
        self.truncated = array("b")  # 1 where --max-length cut the example
        self.n_records = 0
        self.n_too_long = 0
        self._fields_hint = fields_hint
        self._render = None
        self._scan()

    def describe(self) -> dict:
        """What the data is, for run.json and reports: where, kind, split, revision, rows."""
        return self.source.description(self.n_records)

    # -- scanning -------------------------------------------------------------------------------
    def _scan(self) -> None:
        pending: list[tuple[int, str, dict]] = []  # (key, where it is, record)
        where = self.source.where
        for key, n, rec in self.source.scan():
            at = where(n)
            if self.fields is None:
                self.fields = _detect_fields(rec, at, self._fields_hint)
            if (
                self.fields.prompt is None
                and not self.fields.chat
                and chat.is_conversation(rec.get(self.fields.response))
            ):
                self.fields = replace(self.fields, chat=True)  # --fields NAME of a conversation column
            if self.fields.chat and self._render is None:
                self._start_chat()
            self._check_fields(rec, at)
            pending.append((key, at, rec))
            if len(pending) >= _SCAN_BATCH:
                self._measure(pending)
                pending = []
        self._measure(pending)
        name = self.path or self.source.name
        if self.n_records == 0:
            raise DataError(f"{name} holds no examples (empty); pass data with one record per example")
        if not self.offsets:
            raise DataError(
                f"all {self.n_records} examples of {name} leave no response token within "
                f"--max-length {self.max_length} (the prompt alone fills it); raise --max-length"
            )

    def _start_chat(self) -> None:
        """Conversations: the tokenizer's chat template (`paper`, the default, and `chat`) or ChatML."""
        if self.template == "raw":
            raise DataError(
                "--template raw is for plain text; conversations need --template chat (the tokenizer's "
                "chat template) or chatml"
            )
        chat.check_tokenizer(self.tok)
        self.template = "chatml" if self.template == "chatml" else "chat"
        self._render = chat.renderer(self.tok, self.template)

    def _check_fields(self, rec: dict, where: str) -> None:
        if self.source.columns is not None:  # a table: every record has the same columns
            missing = [n for n in (self.fields.prompt, self.fields.response) if n and n not in rec]
            if missing:
                raise DataError(
                    f"{self.source.name}: no column {missing[0]!r} (columns: {', '.join(self.source.columns[:8])}); "
                    "pass --fields to name the right ones"
                )
        if self.fields.chat:
            if self.fields.response not in rec:
                raise DataError(f"{where}: field {self.fields.response!r} is missing; pass --fields")
            chat.to_messages(rec[self.fields.response], self.fields.response, where)
            return
        for name in (self.fields.prompt, self.fields.context, self.fields.response):
            if name is None or (name == self.fields.context and rec.get(name) is None):
                continue  # a record without the context field (or null there) has none
            if name not in rec:
                raise DataError(
                    f"{where}: field {name!r} is missing (keys: {', '.join(sorted(rec)[:8])}); "
                    "pass --fields to name the right ones"
                )
            if not isinstance(rec[name], str):
                raise DataError(
                    f"{where}: field {name!r} must be a string, got {_json_type(rec[name])}; "
                    "fix or remove the record"
                )
            try:
                rec[name].encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate escape (\ud800) is valid JSON, not text
                raise DataError(
                    f"{where}: field {name!r} is not valid Unicode ({e.reason} at character "
                    f"{e.start}); fix or remove the record"
                ) from None

    def _measure(self, pending: list[tuple[int, str, dict]]) -> None:
        """Encode a batch of scanned records and keep each usable one's key and lengths (the scan
        already knows where each record is: errors name it without reading the file again)."""
        if not pending:
            return
        encoded = self._encode([r for _, _, r in pending], [w for _, w, _ in pending])
        for (off, _, _), (ids, labels, truncated) in zip(pending, encoded, strict=True):
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
    def _cut(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int], bool]:
        return ids[: self.max_length], labels[: self.max_length], len(ids) > self.max_length

    def _encode_chat(
        self, records: list[dict], wheres: list[str] | None
    ) -> list[tuple[list[int], list[int], bool]]:
        col = self.fields.response
        out = []
        for i, r in enumerate(records):
            where = wheres[i] if wheres else f"{self.source.name}"
            messages = chat.to_messages(r[col], col, where)
            whole, spans = chat.assistant_spans(messages, self._render, where)
            out.append(self._cut(*chat.encode(self.tok, whole, spans)))
        return out

    def _encode(
        self, records: list[dict], wheres: list[str] | None = None
    ) -> list[tuple[list[int], list[int], bool]]:
        """(input ids, labels, truncated) for each record, loss on response tokens only."""
        tok, f = self.tok, self.fields
        if f.chat:
            return self._encode_chat(records, wheres)
        eos = [] if self.eos is None else [self.eos]
        if f.prompt is None:
            texts = [r[f.response] for r in records]
            enc = tok(texts, add_special_tokens=True)["input_ids"]
            return [self._cut(ids + eos, ids + eos) for ids in enc]
        if self.template == "chatml":  # a prompt/response record is a one-exchange conversation
            self._render = self._render or chat.renderer(tok, "chatml")
            out = []
            for r in records:
                messages = [
                    {"role": "user", "content": f.question(r)},
                    {"role": "assistant", "content": r[f.response]},
                ]
                out.append(
                    self._cut(*chat.encode(tok, *chat.assistant_spans(messages, self._render, "record")))
                )
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
        return [
            self._cut(p + r + eos, [IGNORE] * len(p) + r + eos) for p, r in zip(p_ids, r_ids, strict=True)
        ]

    def records(self, indices: list[int]) -> list[dict]:
        """The raw records of usable examples (by index), checked to be those that were scanned."""
        return self.source.read([self.offsets[i] for i in indices], lambda r: self._check_fields(r, ""))

    def read(self, indices: list[int]) -> list[tuple[list[int], list[int]]]:
        """Tokenized examples by index (into the usable examples), read from disk by key."""
        return [(ids, labels) for ids, labels, _ in self._encode(self.records(indices))]

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
