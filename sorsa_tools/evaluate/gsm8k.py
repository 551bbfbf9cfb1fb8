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

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from sorsa_tools.data import Dataset, parse_fields
from sorsa_tools.device import resolve_device
from sorsa_tools.errors import DataError
from sorsa_tools.evaluate import backends
from sorsa_tools.evaluate.models import resolve_model
from sorsa_tools.evaluate.passes import generate_pass, nll_pass
from sorsa_tools.evaluate.report import (
    MODEL_KINDS,
    EvalProgress,
    check_options,
    default_output,
    json_number,
    plan_outputs,
    run_fields,
    wilson_interval,
    write_results,
)
from sorsa_tools.format import sha256_of
from sorsa_tools.io.records import DataSpec, open_source
from sorsa_tools.prompts import render_prompt

TASK = "gsm8k"
# A model that is done with its answer starts the next example of the format it saw, or pads with
# blank lines; either ends its answer (GSM-8K answers themselves hold single newlines only).
STOP_STRINGS = ("### Instruction", "### Response", "\n\n\n")
MAX_LENGTH = 4096  # tokens of prompt + answer for the NLL; longer examples are truncated (counted)


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
    check_options(limit, batch_size, max_new_tokens, metric, template, output)
    spec = resolve_model(model, adapter)
    source = open_source(data if isinstance(data, DataSpec) else DataSpec(str(data)))
    inputs = ([source.path] if source.path is not None else []) + (
        [Path(spec.path)] if spec.kind == "gguf" else []
    )
    items_file, _ = plan_outputs(output, default_output(spec), inputs, force)

    backend = backends.open_backend(spec, resolve_device(device), dtype)
    ds = _open_data(source, backend.tokenizer, fields, template)
    idx = list(range(len(ds) if limit is None else min(limit, len(ds))))
    records = ds.records(idx)
    if metric in ("accuracy", "both"):
        _check_gold(ds, idx, records)
    backend.load()
    try:
        p = _passes(
            backend, ds, idx, records, metric, template, batch_size, max_new_tokens, stop_strings, progress
        )
    finally:
        backend.close()

    rows = [_item_row(i, records[i], ds, p.outputs[i], p.nll_sums[i]) for i in idx]
    summary = _summary(rows, p, ds, spec, backend, metric, limit, template, batch_size, max_new_tokens)
    summary |= {"stop_strings": list(stop_strings)} | run_fields(None, None, items_file)
    sfile = write_results(items_file, rows, summary)
    return EvalResult(
        summary["accuracy"],
        summary["correct"],
        summary["n"],
        tuple(summary["ci95"]) if summary["ci95"] else None,
        summary["nll"],
        p.nll_tokens,
        p.gen_tokens,
        p.nll_s,
        p.gen_s,
        time.perf_counter() - t_start,
        items_file,
        sfile,
        summary["model_kind"],
        summary["device"],
        summary["truncated"],
        summary,
    )


def _open_data(source, tok, fields: str | None, template: str) -> Dataset:
    """The questions through training's data path; GSM-8K needs a question and an answer field."""
    ds = Dataset(
        source, tok, parse_fields(fields), template, MAX_LENGTH, fields_hint="pass --fields QUESTION,ANSWER"
    )
    if ds.fields.prompt is None:
        raise DataError(
            f"{ds.path or source.name}: sorsa eval gsm8k needs a question and an answer field, not one text field "
            f"({ds.fields.response!r}); pass --fields QUESTION,ANSWER"
        )
    return ds


@dataclass
class _Passes:
    """What the NLL and generation passes measured, per question (None where a pass did not run)."""

    nll_sums: list[tuple[float, int] | None]
    outputs: list[tuple[str, int] | None]
    nll_s: float = 0.0
    gen_s: float = 0.0

    @property
    def nll_tokens(self) -> int:
        return sum(c for _, c in (x for x in self.nll_sums if x is not None))

    @property
    def nll_total(self) -> float:
        return sum(s for s, _ in (x for x in self.nll_sums if x is not None))

    @property
    def gen_tokens(self) -> int:
        return sum(o[1] for o in self.outputs if o is not None)


def _passes(
    backend, ds: Dataset, idx, records, metric, template, batch_size, max_new_tokens, stops, progress
) -> _Passes:
    """The teacher-forced NLL pass and the greedy generation pass, as the metric asks."""
    p = _Passes([None] * len(idx), [None] * len(idx))
    if metric in ("nll", "both"):
        p.nll_sums, p.nll_s = nll_pass(backend, ds, idx, batch_size, progress)
    if metric in ("accuracy", "both"):
        tok = backend.tokenizer
        golds = [gold_answer(r[ds.fields.response]) for r in records]
        p.outputs, p.gen_s = generate_pass(
            backend,
            [render_prompt(ds.fields.question(r), template, tok) for r in records],
            [ds.lengths[i] - ds.response_tokens[i] for i in idx],
            add_special=template != "chat",
            max_new_tokens=max_new_tokens,
            stops=stops,
            batch_size=batch_size,
            progress=progress,
            score=lambda i, text: answers_match(extract_answer(text), golds[i]),
        )
    return p


def _summary(
    rows, p: _Passes, ds, spec, backend, metric, limit, template, batch_size, max_new_tokens
) -> dict:
    """The summary JSON: the scores, what was evaluated and how, and the passes' throughput."""
    n = len(rows)
    idx = [r["index"] for r in rows]
    correct = sum(1 for r in rows if r["correct"]) if metric != "nll" else None
    mean_nll = p.nll_total / p.nll_tokens if metric != "accuracy" and p.nll_tokens else None
    ci = wilson_interval(correct, n) if correct is not None else None
    return {
        "task": TASK,
        "accuracy": correct / n if correct is not None else None,
        "correct": correct,
        "n": n,
        "ci95": list(ci) if ci else None,
        "nll": mean_nll,
        "nll_tokens": p.nll_tokens if mean_nll is not None else None,
        "model": str(spec.path.resolve()),
        "model_kind": MODEL_KINDS[spec.kind],
        "adapter": str(spec.adapter.resolve()) if spec.adapter else None,
        "data": {
            **ds.describe(),
            **({"sha256": sha256_of(ds.path)} if ds.source.kind == "jsonl" else {}),
            "examples": len(ds),
        },
        "limit": limit,
        "template": template,
        "fields": ds.fields.describe(),
        "metric": metric,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "decoding": "greedy",
        "device": str(backend.device),
        "dtype": str(getattr(backend, "dtype", "gguf")).removeprefix("torch."),
        "truncated": sum(1 for i in idx if ds.truncated[i]),
        "throughput": {
            "generate_seconds": p.gen_s,
            "generated_tokens": p.gen_tokens,
            "generated_tokens_per_s": p.gen_tokens / p.gen_s if p.gen_s else None,
            "nll_seconds": p.nll_s,
            "nll_tokens_per_s": sum(ds.lengths[i] for i in idx) / p.nll_s if p.nll_s else None,
        },
    }


def _item_row(
    i: int, rec: dict, ds: Dataset, output: tuple[str, int] | None, nll: tuple[float, int] | None
) -> dict:
    """One question's line of the items file: its answer, what was generated and scored, its NLL
    (None where that metric was not run)."""
    gold = gold_answer(rec[ds.fields.response])
    row = {"index": i, "question": ds.fields.question(rec), "answer": rec[ds.fields.response]}
    if output is not None:
        pred = extract_answer(output[0])
        row |= {
            "output": output[0],
            "extracted": json_number(pred),
            "gold": json_number(gold),
            "correct": answers_match(pred, gold),
            "generated_tokens": output[1],
        }
    else:
        row |= {"output": None, "extracted": None, "gold": json_number(gold), "correct": None}
    if nll is not None:
        s, c = nll
        row |= {"nll": s / c if c else None, "nll_sum": s, "n_tokens": c}
    else:
        row |= {"nll": None, "nll_sum": None, "n_tokens": None}
    return row


def _check_gold(ds: Dataset, idx: list[int], records: list[dict]) -> None:
    """An answer with no number cannot be scored: every such item would count as wrong."""
    bad = [i for i, rec in zip(idx, records, strict=True) if gold_answer(rec[ds.fields.response]) is None]
    if bad:
        n = ds.source.line_of(ds.offsets[bad[0]])
        where = f"line {n}" if ds.source.kind == "jsonl" else f"row {n}"
        raise DataError(
            f"{ds.path or ds.source.name}: {len(bad)} of {len(idx)} answers ({ds.fields.response!r}) hold no "
            f"number (first: {where}); accuracy needs GSM-8K-style answers ending in '#### N': fix them, "
            "or pass --metric nll"
        )
