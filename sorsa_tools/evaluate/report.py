"""What every benchmark of `sorsa eval` shares around its numbers: option checks, where the results
go (a per-item JSONL and the summary JSON beside it, both written whole or not at all), progress
events, the 95 % interval of an accuracy, the paired interval of an NLL difference, and the fields
of a summary that name the model and tool."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sorsa_tools import __version__
from sorsa_tools.errors import InputError
from sorsa_tools.evaluate.models import ModelSpec
from sorsa_tools.io.placement import temp_path
from sorsa_tools.io.safetensors_file import (
    atomic_write_json,
    check_new_files,
    check_output_file,
    disk_errors,
)
from sorsa_tools.prompts import TEMPLATES

METRICS = ("accuracy", "nll", "both")
MODEL_KINDS = {"hf": "hf-checkpoint", "sorsa": "sorsa-unmerged", "gguf": "gguf"}


class EvalProgress:
    """Receives progress events; the CLI subclasses it with a rich bar. The default is silent."""

    def start(self, phase: str, total: int) -> None: ...

    def advance(self, phase: str, done: int, stats: str) -> None: ...

    def note(self, message: str) -> None: ...


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


@dataclass(frozen=True)
class NllDifference:
    """Token-weighted NLL of A minus B on the same questions, with a paired bootstrap 95 % interval."""

    diff: float
    lo: float
    hi: float
    n: int  # questions
    tokens: int


def _nll_items(path: Path) -> dict[int, tuple[float, int]]:
    """index -> (nll_sum, n_tokens) of a per-item eval JSONL (`sorsa eval --metric nll|both`)."""
    items = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror}): give a per-item eval JSONL") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text: give a per-item eval JSONL") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            i, item = int(r["index"]), (float(r["nll_sum"]), int(r["n_tokens"]))
        except (ValueError, KeyError, TypeError):
            raise InputError(
                f"{path}:{no}: not a per-item NLL row (index, nll_sum, n_tokens): evaluate with --metric nll"
            ) from None
        if i in items:
            raise InputError(f"{path}:{no}: question {i} a second time: give one eval's file, not two joined")
        items[i] = item
    if not items:
        raise InputError(f"{path}: no per-item NLL rows: evaluate with --metric nll")
    return items


def paired_nll_difference(
    a: str | Path, b: str | Path, resamples: int = 10_000, seed: int = 0
) -> NllDifference:
    """NLL(A) - NLL(B) over the questions both files scored, and the 2.5 / 97.5 % quantiles of that
    difference over questions resampled with replacement (the same draw for both: the questions'
    own difficulty cancels, so small differences between two fine-tunes become visible). Covers the
    sampling of test questions only, not a training run's randomness (seed, data order)."""
    import torch

    A, B = _nll_items(Path(a)), _nll_items(Path(b))
    if set(A) != set(B):
        raise InputError(
            f"{a} and {b} scored different questions ({len(A)} and {len(B)}): evaluate both on the same --limit"
        )
    idx = sorted(A)
    bad = [i for i in idx if A[i][1] != B[i][1]]
    if bad:
        raise InputError(
            f"{a} and {b} scored question {bad[0]} on different tokens ({A[bad[0]][1]} and {B[bad[0]][1]}): "
            "evaluate both with the same data, template and tokenizer"
        )
    d = torch.tensor([A[i][0] - B[i][0] for i in idx], dtype=torch.float64)
    n = torch.tensor([A[i][1] for i in idx], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    boot = torch.empty(resamples, dtype=torch.float64)
    step = max(1, 2_000_000 // len(idx))  # draws in chunks: memory stays small for 5,000 questions too
    for s in range(0, resamples, step):
        draws = torch.randint(0, len(idx), (min(step, resamples - s), len(idx)), generator=g)
        boot[s : s + len(draws)] = d[draws].sum(1) / n[draws].sum(1)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return NllDifference(float(d.sum() / n.sum()), lo, hi, len(idx), int(n.sum()))


def accuracy_block(correct: int, n: int) -> dict:
    """accuracy, correct, n and its 95 % Wilson interval, as a summary records them."""
    return {
        "accuracy": correct / n if n else None,
        "correct": correct,
        "n": n,
        "ci95": list(wilson_interval(correct, n)),
    }


def json_number(v: float | None) -> float | int | None:
    if v is None:
        return None
    return int(v) if v.is_integer() and abs(v) < 2**53 else v


def default_output(spec: ModelSpec, task: str = "gsm8k") -> Path:
    """Where results go without --output: next to what was evaluated when it is a sorsa output of
    its own (a trained run, a merged dir, a GGUF file), else the current directory. Never into a
    decomposed DIR (an input of train and merge) or someone's downloaded checkpoint."""
    name = f"eval_{task}.jsonl"
    if spec.adapter is not None:
        return spec.adapter / name
    if spec.kind == "gguf":
        return spec.path.with_name(spec.path.name.removesuffix(".gguf") + "." + name)
    if spec.kind == "hf" and (spec.path / "sorsa_provenance.json").is_file():
        return spec.path / name
    return Path.cwd() / name


def summary_path(items_file: Path) -> Path:
    """The summary JSON beside the per-item JSONL: eval_gsm8k.jsonl -> eval_gsm8k.json."""
    return items_file.with_suffix(".json")


def plan_outputs(
    output: str | Path | None, default: Path, inputs: list[Path], force: bool
) -> tuple[Path, Path]:
    """(per-item file, summary file), checked before any work: writable, not an input of the run,
    and not the results of an earlier eval unless --force."""
    items_file = Path(output).expanduser() if output is not None else default
    check_output_file(items_file, "--output", "eval.jsonl")
    for out_file in (items_file, summary_path(items_file)):
        hit = next((p for p in inputs if out_file.exists() and out_file.resolve() == p.resolve()), None)
        if hit is not None:
            raise InputError(
                f"--output {items_file} would overwrite {hit}, an input of this run; choose another file"
            )
    named = "--output" if output is not None else "the default output"
    check_new_files([(items_file, named), (summary_path(items_file), f"the summary beside {named}")], force)
    return items_file, summary_path(items_file)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """rows as JSON lines, whole or not at all (a temp name, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
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


def write_results(items_file: Path, rows: list[dict], summary: dict) -> Path:
    """The per-item JSONL, then the summary beside it; returns the summary's path."""
    write_jsonl(items_file, rows)
    return atomic_write_json(summary_path(items_file), summary)


def check_options(
    limit: int | None,
    batch_size: int,
    max_new_tokens: int,
    metric: str,
    template: str,
    output: str | Path | None,
    templates: tuple[str, ...] = TEMPLATES,
) -> None:
    bad = [
        (limit is None or limit >= 1, f"--limit must be >= 1 (got {limit})"),
        (batch_size >= 1, f"--batch-size must be >= 1 (got {batch_size})"),
        (max_new_tokens >= 1, f"--max-new-tokens must be >= 1 (got {max_new_tokens})"),
        (metric in METRICS, f"--metric must be one of {', '.join(METRICS)}, not {metric!r}"),
        (template in templates, f"--template {template!r} is not one of {', '.join(templates)}"),
        (
            output is None or Path(output).suffix != ".json",
            f"--output {output}: the per-item file must not end in .json (the summary takes that name); "
            "use e.g. results.jsonl",
        ),
    ]
    for ok, msg in bad:
        if not ok:
            raise InputError(msg)


def run_fields(spec: ModelSpec | None, backend, items_file: Path) -> dict:
    """The summary fields that say what ran where, and with which tool (model None: no model ran)."""
    out = {}
    if spec is not None:
        out = {
            "model": str(spec.path.resolve()),
            "model_kind": MODEL_KINDS[spec.kind],
            "adapter": str(spec.adapter.resolve()) if spec.adapter else None,
            "device": str(backend.device),
            "dtype": str(getattr(backend, "dtype", "gguf")).removeprefix("torch."),
        }
    return out | {
        "items_file": str(items_file.resolve()),
        "tool": {"name": "sorsa-tools", "version": __version__},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
