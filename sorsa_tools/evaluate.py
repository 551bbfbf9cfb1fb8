"""`sorsa eval gsm8k`: accuracy of greedy answers and the NLL of the reference answers.

MODEL is a Hugging Face checkpoint (merged or original), a decomposed DIR evaluated unmerged through
its SORSA layers (its own adapter, or a trained `adapter`), or a GGUF file run by llama.cpp. Every
kind goes through the same data path as training (data.Dataset: the same fields, template and
tokenization, prompt + " " + answer + EOS for the paper template), so that the NLL here is
`sorsa train`'s task loss on the same examples, and accuracy comes from the same prompt.

- accuracy: greedy decoding in batches with left padding (HF; one sequence at a time in llama.cpp),
  examples sorted by prompt length, stopping per sequence at EOS or at a stop string (STOP_STRINGS:
  the model starting the next "### Instruction" or running into blank lines); the answer is the
  number after the first answer marker ("The answer is", "answer is:", "####", "Answer:",
  "\\boxed{") or else the output's last number, compared numerically with the gold number after
  "####" (extract_answer, gold_answer).
- nll: per example, the summed cross-entropy of the response tokens (answer + EOS) under teacher
  forcing; the reported NLL is token-weighted (sum over examples / tokens), like the training loss.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sorsa_tools import __version__
from sorsa_tools.data import IGNORE, Dataset, check_data_file, parse_fields
from sorsa_tools.device import resolve_device
from sorsa_tools.errors import (
    DataError,
    InputError,
    MissingDependencyError,
    ModelKindError,
    ModelNotFoundError,
)
from sorsa_tools.format import ADAPTER_FILE, CONFIG_FILE, read_config, sha256_of
from sorsa_tools.io.checkpoint import open_checkpoint
from sorsa_tools.io.placement import temp_path
from sorsa_tools.io.safetensors_file import (
    atomic_write_json,
    check_new_files,
    check_output_file,
    disk_errors,
)
from sorsa_tools.prompts import TEMPLATES, render_prompt
from sorsa_tools.train import head_cross_entropy, label_positions

TASK = "gsm8k"
METRICS = ("accuracy", "nll", "both")
# A model that is done with its answer starts the next example of the format it saw, or pads with
# blank lines; either ends its answer (GSM-8K answers themselves hold single newlines only).
STOP_STRINGS = ("### Instruction", "### Response", "\n\n\n")
MAX_LENGTH = 4096  # tokens of prompt + answer for the NLL; longer examples are truncated (counted)
LOSS_CHUNK = 512  # response tokens per LM-head piece in the NLL: 0.5 GiB of logits at a 262k vocabulary
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACCEPTED = (
    "a Hugging Face checkpoint directory (config.json + *.safetensors: merged or original), "
    "a decomposed DIR from `sorsa decompose` (with --adapter RUN for a trained adapter), or a .gguf file"
)


# -- answer extraction --------------------------------------------------------------------------
_NUMBER = re.compile(
    r"""
    (?P<neg>(?<![\w)\]])[-\u2212](?=\s?[$\u20ac\u00a3\u00a5\u20b9]?\s?\.?\d))?  # a sign, not a subtraction
    (?:[$\u20ac\u00a3\u00a5\u20b9]\s?(?P<neg2>-)?)?                            # currency; $-5
    (?P<mag>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)          # 1,234.50 | 12.5 | .5
    (?:[eE](?P<exp>[-+]?\d+)(?![\w]))?                                       # 1e3
    (?:\s?/\s?(?P<den>\d+(?:\.\d+)?)(?![\d/]))?                               # 3/4
    """,
    re.X,
)
_MARKER = re.compile(r"####|\banswer\s+is\b\s*:?|\banswer\s*:|\\boxed\{", re.I)
_CLAUSE_END = re.compile(r"\n|\.(?=\s|$)|;")


def _value(m: re.Match) -> float | None:
    try:
        v = float(m["mag"].replace(",", ""))
        if m["exp"]:
            v *= 10.0 ** int(m["exp"])
        if m["den"]:
            den = float(m["den"])
            if den == 0:
                return None
            v /= den
    except (ValueError, OverflowError):
        return None
    if m["neg"] or m["neg2"]:
        v = -v
    return v if math.isfinite(v) else None


def numbers(text: str) -> list[float]:
    """Every number in text, in order: thousands commas, currency, units and % dropped,
    fractions divided out ("3/4" = 0.75), "1e3" = 1000."""
    return [v for m in _NUMBER.finditer(text) if (v := _value(m)) is not None]


def _after_marker(segment: str) -> float | None:
    """The number a marker announces: the first of its clause, or the result of an equation in
    it ("The answer is 5 + 3 = 8." gives 8)."""
    segment = segment.lstrip(" \t\n:*$")
    end = _CLAUSE_END.search(segment)
    clause = segment[: end.start()] if end else segment
    found = numbers(clause)
    if found:
        return found[-1] if "=" in clause else found[0]
    found = numbers(segment[:80])  # "The answer is\n\n**18**"
    return found[0] if found else None


def extract_answer(output: str) -> float | None:
    """The model's answer: the number after the first answer marker that is followed by one
    (a finished answer ends there: what follows is most often a new, made-up question), else the
    last number of the output, else None."""
    marks = list(_MARKER.finditer(output))
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(output)
        v = _after_marker(output[m.end() : end])
        if v is not None:
            return v
    found = numbers(output)
    return found[-1] if found else None


def gold_answer(answer: str) -> float | None:
    """The reference answer: the number after the last "####" (GSM-8K), else its last number."""
    if "####" in answer:
        found = numbers(answer.rsplit("####", 1)[1])
        if found:
            return found[0]
    found = numbers(answer)
    return found[-1] if found else None


def answers_match(pred: float | None, gold: float | None) -> bool:
    """Numeric equality with a float tolerance ("5.0" == "5", "$1,234.50" == 1234.5)."""
    return pred is not None and gold is not None and math.isclose(pred, gold, rel_tol=1e-6, abs_tol=1e-6)


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n (sound at 0, n and small n, unlike p +- 1.96 se)."""
    if n == 0:
        return (0.0, 1.0)
    if k == 0 or k == n:  # the closed forms, exact (the general formula leaves rounding residue)
        edge = (z * z / n) / (1 + z * z / n)
        return (0.0, edge) if k == 0 else (1.0 - edge, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _json_number(v: float | None) -> float | int | None:
    if v is None:
        return None
    return int(v) if v.is_integer() and abs(v) < 2**53 else v


# -- what MODEL is ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "hf" (a plain or merged checkpoint), "sorsa" (decomposed DIR + adapter), "gguf"
    path: Path
    adapter: Path | None = None


def _is_gguf(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def resolve_model(model: str | Path, adapter: str | Path | None = None) -> ModelSpec:
    """Which kind MODEL is; refuses what sorsa eval cannot read, naming what it can."""
    p = Path(model).expanduser()
    a = Path(adapter).expanduser() if adapter is not None else None
    if not p.exists():
        raise ModelNotFoundError(f"no such file or directory: {p}; pass {ACCEPTED}")
    if p.is_file():
        if not _is_gguf(p):
            raise ModelKindError(f"{p} is a file but not a GGUF file; pass {ACCEPTED}")
        if a is not None:
            raise InputError(
                f"--adapter applies to a decomposed DIR, not to the GGUF file {p.name} (its weights are "
                "final); export DIR + adapter with `sorsa merge --to gguf` and evaluate that file"
            )
        return ModelSpec("gguf", p)
    if (p / CONFIG_FILE).is_file():
        cfg = read_config(p)
        if cfg.get("kind") == "trained":
            decomp = (cfg.get("decomposition") or {}).get("path") or "DIR"
            raise ModelKindError(
                f"{p} is a trained adapter, not a model; evaluate it on its decomposition: "
                f"sorsa eval gsm8k {decomp} --adapter {p}"
            )
        from sorsa_tools.model import check_adapter, read_decomposition

        dcfg = read_decomposition(p)
        if a is not None:
            check_adapter(dcfg, a)
        open_checkpoint(p)  # a truncated or corrupt shard is one line here, not a loader traceback
        return ModelSpec("sorsa", p, a)
    if (p / "config.json").is_file():
        if not any(p.glob("*.safetensors")):
            raise ModelKindError(
                f"{p} has config.json but no *.safetensors weights (pickle .bin files are not loaded: "
                "they can run code); convert the checkpoint to safetensors"
            )
        if a is not None:
            raise InputError(
                f"--adapter applies to a decomposed DIR; {p} is a plain checkpoint without "
                f"{ADAPTER_FILE}: pass the DIR the adapter was trained on"
            )
        open_checkpoint(p)
        return ModelSpec("hf", p)
    raise ModelKindError(f"{p} is none of the kinds sorsa eval reads; pass {ACCEPTED}")


# -- backends -----------------------------------------------------------------------------------
def per_example_nll(model, batch: dict[str, torch.Tensor], chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """(rows, 2): the summed next-token cross-entropy of each row's label tokens, and their count.

    The same computation as train.loss_sum (decoder, then the LM head and softcapping only at
    positions that carry loss, float32 cross-entropy), kept per row instead of summed over the batch.
    """
    h, t, sel = label_positions(model, batch)
    rows = torch.arange(sel.shape[0], device=sel.device)[:, None].expand_as(sel)[sel]
    ce = torch.empty(t.numel(), dtype=torch.float32, device=h.device)
    for i in range(0, t.numel(), chunk):
        ce[i : i + chunk] = head_cross_entropy(model, h[i : i + chunk], t[i : i + chunk], reduction="none")
    out = torch.zeros(sel.shape[0], 2, dtype=torch.float64, device=h.device)
    out[:, 0].index_add_(0, rows, ce.double())
    out[:, 1] = sel.sum(1).double()
    return out.cpu()


class _StopOnText:
    """A per-sequence stopping criterion: True for rows whose new text holds a stop string."""

    def __init__(self, tok, start: int, stops: tuple[str, ...], window: int = 24):
        self.tok, self.start, self.stops, self.window = tok, start, stops, window
        self.stopped_at: dict[int, int] = {}  # row -> new tokens when its stop string appeared

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tail = input_ids[:, max(self.start, input_ids.shape[1] - self.window) :]
        texts = self.tok.batch_decode(tail, skip_special_tokens=True)
        hits = [any(s in t for s in self.stops) for t in texts]
        for r, hit in enumerate(hits):  # the row's length, whatever padding follows it
            if hit:
                self.stopped_at.setdefault(r, input_ids.shape[1] - self.start)
        return torch.tensor(hits, device=input_ids.device)


def _cut(text: str, stops: tuple[str, ...]) -> str:
    """text up to its first stop string."""
    at = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:at]


class HFBackend:
    """A transformers model: a checkpoint, or a decomposed DIR with SORSA layers."""

    batched = True

    def __init__(self, spec: ModelSpec, device: str, dtype: str):
        from transformers import AutoTokenizer

        self.device = torch.device(device)
        if dtype != "auto" and dtype not in DTYPES:
            raise InputError(f"--dtype must be auto or one of {', '.join(DTYPES)}, not {dtype!r}")
        self.dtype = (
            DTYPES[dtype]
            if dtype != "auto"
            else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.path)
        except (OSError, ValueError) as e:
            raise InputError(
                f"{spec.path} has no usable tokenizer ({str(e).splitlines()[0]}); copy the base model's "
                "tokenizer files there"
            ) from None
        self.spec = spec
        self.model = None

    def load(self) -> None:
        if self.model is None:
            from transformers import AutoModelForCausalLM

            try:
                if self.spec.kind == "hf":
                    model = AutoModelForCausalLM.from_pretrained(self.spec.path, dtype=self.dtype)
                else:
                    from sorsa_tools.model import load_sorsa_model

                    model, _, _ = load_sorsa_model(
                        self.spec.path, self.spec.adapter, device="cpu", dtype=self.dtype
                    )
            except (OSError, ValueError, KeyError) as e:
                raise ModelKindError(
                    f"transformers cannot load {self.spec.path} as a causal LM ({str(e).splitlines()[0]}); "
                    f"pass {ACCEPTED}"
                ) from None
            self.model = model.to(self.device).eval()
            gc = self.model.generation_config
            eos = gc.eos_token_id if gc is not None else None
            eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
            if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
                eos.append(self.tokenizer.eos_token_id)
            self.eos = eos
            self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]

    def _autocast(self):
        """bf16 autocast on CUDA, as in training (float32 SORSA factors on a bf16 residual); off
        when float32 was asked for."""
        on = self.device.type == "cuda" and self.dtype != torch.float32
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)

    def nll(self, ds: Dataset, indices: list[int]) -> list[tuple[float, int]]:
        batch = {k: v.to(self.device) for k, v in ds.collate([[i] for i in indices]).items()}
        with torch.inference_mode(), self._autocast():
            out = per_example_nll(self.model, batch)
        return [(float(s), int(n)) for s, n in out.tolist()]

    def generate(
        self, prompts: list[str], add_special: bool, max_new_tokens: int, stops: tuple[str, ...]
    ) -> list[tuple[str, int]]:
        from transformers import GenerationConfig, StoppingCriteriaList

        tok = self.tokenizer
        if tok.pad_token_id is None:  # padding needs one; masked out, so any token does
            tok.pad_token = tok.convert_ids_to_tokens(self.pad)
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok(prompts, add_special_tokens=add_special, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
        )
        stop = StoppingCriteriaList([_StopOnText(tok, ids.shape[1], stops)]) if stops else None
        with torch.inference_mode(), self._autocast():
            gen = self.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=cfg, stopping_criteria=stop
            )
        results = []
        for r, row in enumerate(gen[:, ids.shape[1] :].tolist()):
            n = next((k + 1 for k, t in enumerate(row) if t in self.eos), None)
            at = stop[0].stopped_at.get(r) if stop else None
            if at is not None and (n is None or at < n):  # a stop string came first (pad may be EOS)
                n = at
            if n is None:  # stopped by max_new_tokens
                n = len(row)
                while n and row[n - 1] == self.pad:
                    n -= 1
            text = tok.decode(row[:n], skip_special_tokens=True)
            results.append((_cut(text, stops), n))
        return results

    def close(self) -> None:
        self.model = None


class _LlamaTokenizer:
    """The GGUF's own tokenizer behind the interface data.Dataset uses (texts -> input_ids)."""

    chat_template = None

    def __init__(self, llm):
        self.llm = llm
        self.eos_token_id = llm.token_eos()
        self.pad_token_id = None

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        return {
            "input_ids": [
                self.llm.tokenize(t.encode("utf-8"), add_bos=add_special_tokens, special=False) for t in texts
            ]
        }


@contextmanager
def _quiet_fd2():
    """llama.cpp prints load-time warnings (SWA cache, context sizes) straight to file descriptor 2,
    past Python and past verbose=False; the CLI keeps stderr for its progress and one-line errors."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class GGUFBackend:
    """A GGUF file through llama-cpp-python: one sequence at a time (its high-level API has no
    batched generation), logits of every position only for the NLL (logits_all costs memory)."""

    batched = False

    def __init__(self, spec: ModelSpec, device: str):
        try:
            import llama_cpp
        except ImportError:
            raise MissingDependencyError(
                "evaluating a GGUF file needs llama-cpp-python, which is not installed; "
                "pip install llama-cpp-python, or evaluate the HF checkpoint instead (sorsa merge --to hf)"
            ) from None
        self._llama = llama_cpp
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        if device.startswith("cuda") and not gpu:
            raise InputError(
                f"--device {device}: this llama-cpp-python build has no GPU support; use --device cpu "
                "(or install a CUDA build of llama-cpp-python)"
            )
        self.gpu_layers = -1 if device != "cpu" and gpu else 0
        self.path = spec.path
        self.device = "cuda" if self.gpu_layers else "cpu"
        self._vocab = self._open(n_ctx=64, logits_all=False, vocab_only=True)
        self.tokenizer = _LlamaTokenizer(self._vocab)
        self.eos = [self.tokenizer.eos_token_id]
        self.llm = None
        self.n_ctx, self.logits_all = 0, False

    def _open(self, n_ctx: int, logits_all: bool, vocab_only: bool = False):
        try:
            with _quiet_fd2():
                return self._llama.Llama(
                    model_path=str(self.path),
                    n_ctx=n_ctx,
                    n_batch=min(512, n_ctx),
                    logits_all=logits_all,
                    vocab_only=vocab_only,
                    n_gpu_layers=self.gpu_layers,
                    n_threads=torch.get_num_threads(),  # OMP_NUM_THREADS / torch's choice, as for HF
                    seed=0,
                    verbose=False,
                )
        except (ValueError, RuntimeError) as e:
            raise ModelKindError(
                f"llama.cpp cannot load {self.path} ({e}); pass a GGUF file of a supported architecture"
            ) from None

    def prepare(self, n_ctx: int, logits_all: bool) -> None:
        """A context of n_ctx tokens (rounded up), reopened only when the need changes."""
        n_ctx = -(-n_ctx // 256) * 256
        if self.llm is None or self.n_ctx < n_ctx or self.logits_all != logits_all:
            self.llm = None
            self.llm = self._open(n_ctx, logits_all)
            self.n_ctx, self.logits_all = n_ctx, logits_all

    def nll(self, ds: Dataset, indices: list[int]) -> list[tuple[float, int]]:
        import numpy as np

        out = []
        for ids, labels in ds.read(indices):
            self.llm.reset()
            self.llm.eval(ids)
            pos = [k for k in range(1, len(ids)) if labels[k] != IGNORE]
            rows = np.asarray(self.llm.scores[[k - 1 for k in pos]], dtype=np.float32)  # logits before k
            top = rows.max(axis=1, keepdims=True)
            lse = top[:, 0].astype(np.float64) + np.log(np.exp(rows - top).sum(axis=1, dtype=np.float64))
            picked = rows[np.arange(len(pos)), [labels[k] for k in pos]].astype(np.float64)
            out.append((float((lse - picked).sum()), len(pos)))
        return out

    def generate(
        self, prompts: list[str], add_special: bool, max_new_tokens: int, stops: tuple[str, ...]
    ) -> list[tuple[str, int]]:
        """Greedy, token by token: at most max_new_tokens (llama-cpp-python's create_completion
        runs past its max_tokens while a multi-byte character is incomplete), counted as the HF
        backend counts them (an end-of-generation token included; none after a stop string)."""
        results = []
        for p in prompts:
            ids = self.tokenizer([p], add_special_tokens=add_special)["input_ids"][0]
            self.llm.reset()
            out: list[int] = []
            n, text = 0, ""
            gen = self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
            for t in gen:
                n += 1
                if self._is_eog(t):
                    break
                out.append(t)
                text = self.llm.detokenize(out).decode("utf-8", errors="ignore")
                if n >= max_new_tokens or any(s in text for s in stops):
                    break
            gen.close()
            results.append((_cut(text, stops), n))
        return results

    def _is_eog(self, token: int) -> bool:
        return bool(self._llama.llama_vocab_is_eog(self.llm._model.vocab, token))

    def load(self) -> None:
        pass

    def close(self) -> None:
        self.llm = None


# -- the evaluation -----------------------------------------------------------------------------
class EvalProgress:
    """Receives progress events; the CLI subclasses it with a rich bar. The default is silent."""

    def start(self, phase: str, total: int) -> None: ...

    def advance(self, phase: str, done: int, stats: str) -> None: ...

    def note(self, message: str) -> None: ...


@dataclass
class EvalResult:
    accuracy: float | None
    correct: int | None
    n: int
    ci95: tuple[float, float] | None
    nll: float | None  # mean per response token (token-weighted over examples)
    nll_tokens: int
    generated_tokens: int
    nll_seconds: float
    generate_seconds: float
    seconds: float
    items_file: Path
    summary_file: Path
    model_kind: str
    device: str
    truncated: int
    summary: dict = field(default_factory=dict)


def default_output(spec: ModelSpec) -> Path:
    """Where results go without --output: next to what was evaluated when it is a sorsa output of
    its own (a trained run, a merged dir, a GGUF file), else the current directory. Never into a
    decomposed DIR (an input of train and merge) or someone's downloaded checkpoint."""
    if spec.adapter is not None:
        return spec.adapter / "eval_gsm8k.jsonl"
    if spec.kind == "gguf":
        return spec.path.with_name(spec.path.name.removesuffix(".gguf") + ".eval_gsm8k.jsonl")
    if spec.kind == "hf" and (spec.path / "sorsa_provenance.json").is_file():
        return spec.path / "eval_gsm8k.jsonl"
    return Path.cwd() / "eval_gsm8k.jsonl"


def summary_path(items_file: Path) -> Path:
    """The summary JSON beside the per-item JSONL: eval_gsm8k.jsonl -> eval_gsm8k.json."""
    return items_file.with_suffix(".json")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = temp_path(path)
    try:
        with disk_errors(path), open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_options(limit, batch_size, max_new_tokens, metric, template, output) -> None:
    bad = [
        (limit is None or limit >= 1, f"--limit must be >= 1 (got {limit})"),
        (batch_size >= 1, f"--batch-size must be >= 1 (got {batch_size})"),
        (max_new_tokens >= 1, f"--max-new-tokens must be >= 1 (got {max_new_tokens})"),
        (metric in METRICS, f"--metric must be one of {', '.join(METRICS)}, not {metric!r}"),
        (template in TEMPLATES, f"--template {template!r} is not one of {', '.join(TEMPLATES)}"),
        (
            output is None or Path(output).suffix != ".json",
            f"--output {output}: the per-item file must not end in .json (the summary takes that name); "
            "use e.g. results.jsonl",
        ),
    ]
    for ok, msg in bad:
        if not ok:
            raise InputError(msg)


def evaluate_gsm8k(
    model: str | Path,
    data: str | Path,
    *,
    adapter: str | Path | None = None,
    fields: str | None = None,
    template: str = "paper",
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    metric: str = "both",
    device: str = "auto",
    dtype: str = "auto",
    output: str | Path | None = None,
    stop_strings: tuple[str, ...] = STOP_STRINGS,
    progress: EvalProgress | None = None,
    force: bool = False,
) -> EvalResult:
    """Evaluate MODEL on a GSM-8K-style JSONL file; write per-item results and a summary JSON."""
    t_start = time.perf_counter()
    progress = progress or EvalProgress()
    _check_options(limit, batch_size, max_new_tokens, metric, template, output)
    spec = resolve_model(model, adapter)
    dev = resolve_device(device)
    data = Path(data).expanduser()
    check_data_file(data, "a GSM-8K-style JSONL file")
    items_file = Path(output).expanduser() if output is not None else default_output(spec)
    check_output_file(items_file, "--output", "eval.jsonl")
    inputs = [data] + ([Path(spec.path)] if spec.kind == "gguf" else [])
    for out_file in (items_file, summary_path(items_file)):
        hit = next((p for p in inputs if out_file.exists() and out_file.resolve() == p.resolve()), None)
        if hit is not None:
            raise InputError(
                f"--output {items_file} would overwrite {hit}, an input of this run; choose another file"
            )
    named = "--output" if output is not None else "the default output"
    check_new_files([(items_file, named), (summary_path(items_file), f"the summary beside {named}")], force)

    backend = GGUFBackend(spec, dev) if spec.kind == "gguf" else HFBackend(spec, dev, dtype)
    tok = backend.tokenizer
    ds = Dataset(
        data, tok, parse_fields(fields), template, MAX_LENGTH, fields_hint="pass --fields QUESTION,ANSWER"
    )
    if ds.fields.prompt is None:
        raise DataError(
            f"{data}: sorsa eval gsm8k needs a question and an answer field, not one text field "
            f"({ds.fields.response!r}); pass --fields QUESTION,ANSWER"
        )
    n = len(ds) if limit is None else min(limit, len(ds))
    idx = list(range(n))
    records = _read_records(ds, idx)
    prompt_len = [ds.lengths[i] - ds.response_tokens[i] for i in idx]
    truncated = sum(1 for i in idx if ds.truncated[i])
    if metric in ("accuracy", "both"):
        _check_gold(ds, idx, records)

    backend.load()
    nll_sums: list[tuple[float, int] | None] = [None] * n
    outputs: list[tuple[str, int] | None] = [None] * n
    step = batch_size if backend.batched else 1
    nll_s = gen_s = 0.0
    if metric in ("nll", "both"):
        if isinstance(backend, GGUFBackend):
            backend.prepare(max(ds.lengths[i] for i in idx) + 8, logits_all=True)
        order = sorted(idx, key=lambda i: -ds.lengths[i])
        progress.start("nll", n)
        t0 = time.perf_counter()
        done = seen = count = 0
        total = 0.0
        for k in range(0, n, step):
            chunk = order[k : k + step]
            for i, r in zip(chunk, backend.nll(ds, chunk), strict=True):
                nll_sums[i] = r
                seen += ds.lengths[i]
                total += r[0]
                count += r[1]
            done += len(chunk)
            dt = time.perf_counter() - t0
            progress.advance(
                "nll", done, f"nll {total / max(count, 1):.4f}  {seen / max(dt, 1e-9):,.0f} tok/s"
            )
        nll_s = time.perf_counter() - t0
    if metric in ("accuracy", "both"):
        if isinstance(backend, GGUFBackend):
            backend.prepare(max(prompt_len) + max_new_tokens + 8, logits_all=False)
        prompts = [render_prompt(ds.fields.question(r), template, tok) for r in records]
        order = sorted(idx, key=lambda i: -prompt_len[i])
        progress.start("generate", n)
        t0 = time.perf_counter()
        done = gen_tokens = right = 0
        for k in range(0, n, step):
            chunk = order[k : k + step]
            res = backend.generate(
                [prompts[i] for i in chunk], template != "chat", max_new_tokens, stop_strings
            )
            for i, r in zip(chunk, res, strict=True):
                outputs[i] = r
                gen_tokens += r[1]
                right += answers_match(extract_answer(r[0]), gold_answer(records[i][ds.fields.response]))
            done += len(chunk)
            dt = time.perf_counter() - t0
            progress.advance("generate", done, f"acc {right}/{done}  {gen_tokens / max(dt, 1e-9):,.0f} tok/s")
        gen_s = time.perf_counter() - t0
    backend.close()

    rows = []
    for i in idx:
        rec = records[i]
        gold = gold_answer(rec[ds.fields.response])
        row = {"index": i, "question": ds.fields.question(rec), "answer": rec[ds.fields.response]}
        if outputs[i] is not None:
            pred = extract_answer(outputs[i][0])
            row |= {
                "output": outputs[i][0],
                "extracted": _json_number(pred),
                "gold": _json_number(gold),
                "correct": answers_match(pred, gold),
                "generated_tokens": outputs[i][1],
            }
        else:
            row |= {"output": None, "extracted": None, "gold": _json_number(gold), "correct": None}
        if nll_sums[i] is not None:
            s, c = nll_sums[i]
            row |= {"nll": s / c if c else None, "nll_sum": s, "n_tokens": c}
        else:
            row |= {"nll": None, "nll_sum": None, "n_tokens": None}
        rows.append(row)

    correct = sum(1 for r in rows if r["correct"]) if metric != "nll" else None
    nll_total = sum(s for s, _ in (x for x in nll_sums if x is not None))
    nll_tokens = sum(c for _, c in (x for x in nll_sums if x is not None))
    mean_nll = nll_total / nll_tokens if metric != "accuracy" and nll_tokens else None
    gen_tokens = sum(o[1] for o in outputs if o is not None)
    ci = wilson_interval(correct, n) if correct is not None else None
    summary = {
        "task": TASK,
        "accuracy": correct / n if correct is not None else None,
        "correct": correct,
        "n": n,
        "ci95": list(ci) if ci else None,
        "nll": mean_nll,
        "nll_tokens": nll_tokens if mean_nll is not None else None,
        "model": str(spec.path.resolve()),
        "model_kind": {"hf": "hf-checkpoint", "sorsa": "sorsa-unmerged", "gguf": "gguf"}[spec.kind],
        "adapter": str(spec.adapter.resolve()) if spec.adapter else None,
        "data": {"path": str(data.resolve()), "sha256": sha256_of(data), "examples": len(ds)},
        "limit": limit,
        "template": template,
        "fields": ds.fields.describe(),
        "metric": metric,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "stop_strings": list(stop_strings),
        "decoding": "greedy",
        "device": str(backend.device),
        "dtype": str(getattr(backend, "dtype", "gguf")).removeprefix("torch."),
        "truncated": truncated,
        "throughput": {
            "generate_seconds": gen_s,
            "generated_tokens": gen_tokens,
            "generated_tokens_per_s": gen_tokens / gen_s if gen_s else None,
            "nll_seconds": nll_s,
            "nll_tokens_per_s": sum(ds.lengths[i] for i in idx) / nll_s if nll_s else None,
        },
        "items_file": str(items_file.resolve()),
        "tool": {"name": "sorsa-tools", "version": __version__},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    items_file.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(items_file, rows)
    sfile = atomic_write_json(summary_path(items_file), summary)
    return EvalResult(
        summary["accuracy"],
        correct,
        n,
        ci,
        mean_nll,
        nll_tokens,
        gen_tokens,
        nll_s,
        gen_s,
        time.perf_counter() - t_start,
        items_file,
        sfile,
        summary["model_kind"],
        summary["device"],
        truncated,
        summary,
    )


def _check_gold(ds: Dataset, idx: list[int], records: list[dict]) -> None:
    """An answer with no number cannot be scored: every such item would count as wrong."""
    bad = [i for i, rec in zip(idx, records, strict=True) if gold_answer(rec[ds.fields.response]) is None]
    if bad:
        line = ds.path.read_bytes()[: ds.offsets[bad[0]]].count(b"\n") + 1
        raise DataError(
            f"{ds.path}: {len(bad)} of {len(idx)} answers ({ds.fields.response!r}) hold no number "
            f"(first: line {line}); accuracy needs GSM-8K-style answers ending in '#### N': fix them, "
            "or pass --metric nll"
        )


def _read_records(ds: Dataset, indices: list[int]) -> list[dict]:
    """The JSON objects of examples (indices into the usable ones), read back by byte offset."""
    out = []
    with open(ds.path, "rb") as f:
        for i in indices:
            f.seek(ds.offsets[i])
            out.append(json.loads(f.readline()))
    return out
