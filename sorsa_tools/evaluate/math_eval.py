"""`sorsa eval math`: accuracy of greedy answers on MATH (Hendrycks et al., 2021) and the NLL of the
reference solutions, overall and per subject (`type`) and `level`.

- The prompt is the paper's Listing 1 (template "paper", as for GSM-8K; "raw" and "chat" as there).
- The model's answer is the content of its last \\boxed{} (or \\fbox{}; braces nested to any depth),
  else what follows its last "The answer is" (MetaMathQA's closing line); the reference is the
  record's `answer` when it has one, else the last \\boxed{} of its `solution`.
- Equivalence is decided by HF's math-verify (sympy underneath): 0.5 = \\frac12 = \\dfrac{1}{2},
  intervals and sets compared as such, degrees, units, \\text{}, \\$ and % dropped, x=5 = 5...
- nll: the reference solution under teacher forcing, with the same tokenization as `sorsa train`
  (the records are staged as JSONL and read through data.Dataset), token-weighted.

Data (read_math_records, the one reader): a JSONL file of MATH records (problem, solution, level,
type, optional answer), a single .json record or array, or a directory of MATH's per-problem .json
files (its official layout test/<subject>/<n>.json).
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sorsa_tools.data import Dataset, parse_fields
from sorsa_tools.device import resolve_device
from sorsa_tools.errors import DataError, MissingDependencyError
from sorsa_tools.evaluate import backends
from sorsa_tools.evaluate.gsm8k import STOP_STRINGS
from sorsa_tools.evaluate.models import resolve_model
from sorsa_tools.evaluate.passes import generate_pass, nll_pass
from sorsa_tools.evaluate.report import (
    EvalProgress,
    accuracy_block,
    check_options,
    default_output,
    plan_outputs,
    run_fields,
    write_results,
)
from sorsa_tools.format import sha256_of
from sorsa_tools.io.records import ARROW_KINDS, FOLDER_KINDS, DataSpec, _hub_id, _is_saved, open_source
from sorsa_tools.prompts import render_prompt

TASK = "math"
MAX_LENGTH = 4096  # tokens of prompt + solution for the NLL; longer ones are truncated (counted)
FIELDS = ("problem", "solution")
GROUPS = {"by_subject": "type", "by_level": "level"}  # summary key -> record field
VERIFY_TIMEOUT_S = 5  # per parse and per comparison (a pathological expression can stall sympy)
_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_IS = re.compile(r"\banswer\s+is\s*:?", re.I)


# -- answers --------------------------------------------------------------------------------------
def _braced(text: str, start: int) -> str | None:
    """The content of the {...} group opening at text[start], nested braces and \\{ counted."""
    depth, k = 0, start
    while k < len(text):
        c = text[k]
        if c == "\\":
            k += 2
            continue
        depth += c == "{"
        depth -= c == "}"
        if depth == 0:
            return text[start + 1 : k]
        k += 1
    return None  # not closed: a cut-off answer


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} / \\fbox{...} (or \\boxed 5) in text, else None."""
    for m in reversed(list(_BOX.finditer(text))):
        at = m.end()
        if at < len(text) and text[at] == "{":
            got = _braced(text, at)
        else:  # \boxed 5: one token, up to a space or a $
            got = re.match(r"[^\s$]*", text[at:]).group(0) if m.group(0) != m.group(0).rstrip() else None
        if got is not None and got.strip():
            return got.strip()
    return None


def extract_answer(output: str) -> str | None:
    """The model's final answer: its last \\boxed{}, else what follows its last "The answer is"
    (to the end of that line, without $ signs and a closing period)."""
    boxed = last_boxed(output)
    if boxed is not None:
        return boxed
    marks = list(_ANSWER_IS.finditer(output))
    if not marks:
        return None
    line = output[marks[-1].end() :].strip().split("\n", 1)[0].strip()
    line = line.strip("$ ").removesuffix(".").strip("$ ")
    return line or None


def gold_answer(record: dict, solution_field: str = "solution") -> str | None:
    answer = record.get("answer")
    if isinstance(answer, str | int | float) and not isinstance(answer, bool) and str(answer).strip():
        return str(answer).strip()
    return last_boxed(record.get(solution_field) or "")


def _verifier():
    try:
        from math_verify import parse, verify
    except ImportError:
        raise MissingDependencyError(
            "sorsa eval math needs math-verify to compare answers, which is not installed; "
            "pip install math-verify"
        ) from None
    return parse, verify


def is_equivalent(pred: str | None, gold: str | None) -> bool:
    """Whether a predicted answer means the reference, by math-verify (latex and plain expressions)."""
    if pred is None or gold is None:
        return False
    parse, verify = _verifier()
    if pred.strip() == gold.strip():
        return True
    # math-verify bounds sympy's time with signal.alarm, which only the main thread may use
    t = VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    g, p = parse(f"${gold}$", parsing_timeout=t), parse(f"${pred}$", parsing_timeout=t)
    return bool(g and p and verify(g, p, timeout_seconds=t))


# -- data -----------------------------------------------------------------------------------------
def _load_json(path: Path, where: str):
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text; re-save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


# first bytes of formats that are not MATH's JSON, named in the error (each line's error would mislead)
_NOT_JSON = {
    b"PAR1": "a Parquet file",
    b"\x1f\x8b": "gzip-compressed",
    b"ARROW1": "an Arrow file",
    b"PK\x03\x04": "a zip archive",
}


def _check_format(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    kind = next((k for magic, k in _NOT_JSON.items() if head.startswith(magic)), None)
    if kind:
        raise DataError(
            f"{path} is {kind}; sorsa eval math reads MATH as JSONL or a directory of its .json files"
        )


def _problem_order(p: Path) -> tuple:
    """test/algebra/10.json after test/algebra/9.json."""
    return (*p.parent.parts, int(p.stem) if p.stem.isdigit() else float("inf"), p.stem)


def _is_table(spec: DataSpec) -> bool:
    """Data for the shared loader (io.records): a table file or folder, or a Hub id."""
    path = Path(spec.data).expanduser()
    if _is_saved(path):  # a Dataset.save_to_disk folder (its state.json is not a MATH record)
        return True
    if path.is_dir():  # MATH's own layout is .json files; a folder of tables is not
        return not any(path.rglob("*.json")) and any(
            f.suffix.lower() in FOLDER_KINDS for f in path.rglob("*")
        )
    return path.suffix.lower() in ARROW_KINDS or (not path.exists() and _hub_id(spec.data))


def read_math_records(data: str | Path | DataSpec) -> Iterator[tuple[str, dict]]:
    """(where, record) for each MATH record that `data` names: `where` names it in errors and
    results (file:line, the .json file relative to the directory, or a table's row). MATH's own
    layouts (JSONL, .json files) are read here; tables and Hub ids through the loader training uses."""
    spec = data if isinstance(data, DataSpec) else DataSpec(str(data))
    if _is_table(spec):
        source = open_source(spec)
        for _, n, rec in source.scan():
            yield source.where(n), rec
        return
    if spec.options():
        raise DataError(f"{spec.options()}: for Parquet, Arrow, CSV and Hub data, not MATH's JSON files")
    path = Path(spec.data).expanduser()
    if not path.exists():
        raise DataError(
            f"data not found: {path}; pass MATH as a JSONL file or a directory of its .json files"
        )
    if path.is_dir():
        files = sorted(path.rglob("*.json"), key=lambda p: _problem_order(p.relative_to(path)))
        if not files:
            raise DataError(f"{path} holds no .json files; pass MATH's directory (test/<subject>/<n>.json)")
        for f in files:
            yield str(f.relative_to(path)), _load_json(f, str(f))
        return
    _check_format(path)
    if path.suffix == ".json":
        data = _load_json(path, str(path))
        for k, rec in enumerate(data if isinstance(data, list) else [data]):
            yield f"{path.name}[{k}]", rec
        return
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"{path.name}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); MATH data is "
                    "JSONL (one record a line) or a directory of .json files"
                ) from None


def _checked(spec: DataSpec, prompt: str, response: str) -> list[tuple[str, dict]]:
    out = []
    path = Path(spec.data).expanduser()
    try:
        for where, rec in read_math_records(spec):
            if not isinstance(rec, dict):
                raise DataError(f"{where}: a MATH record must be a JSON object, got {type(rec).__name__}")
            for name in (prompt, response):
                if not isinstance(rec.get(name), str):
                    keys = ", ".join(sorted(rec)[:8]) or "none"
                    what = "is missing" if name not in rec else "must be a string"
                    raise DataError(
                        f"{path / where if path.is_dir() else where}: field {name!r} {what} (keys: {keys}); "
                        "MATH records have problem and solution: pass --fields PROBLEM,SOLUTION for others"
                    )
            out.append((where, rec))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; re-save it as UTF-8") from None
    if not out:
        raise DataError(f"{path} holds no MATH records")
    return out


# -- the evaluation -------------------------------------------------------------------------------
@dataclass
class MathResult:
    accuracy: float | None
    correct: int | None
    n: int
    ci95: tuple[float, float] | None
    nll: float | None
    nll_tokens: int
    by_subject: dict
    by_level: dict
    items_file: Path
    summary_file: Path
    seconds: float
    summary: dict = field(default_factory=dict)


def _groups(rows: list[dict], key: str, metric: str) -> dict:
    """Accuracy (and NLL) per value of a record field, for the values the data has."""
    out = {}
    for value in sorted({r[key] for r in rows if r.get(key) is not None}, key=str):
        sub = [r for r in rows if r.get(key) == value]
        block = {"n": len(sub)}
        if metric != "nll":
            block = accuracy_block(sum(1 for r in sub if r["correct"]), len(sub))
        if metric != "accuracy":
            tokens = sum(r["n_tokens"] for r in sub)
            block["nll"] = sum(r["nll_sum"] for r in sub) / tokens if tokens else None
        out[str(value)] = block
    return out


def evaluate_math(
    model: str | Path,
    data: str | Path,
    *,
    adapter: str | Path | None = None,
    fields: str | None = None,
    template: str = "paper",
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 512,
    metric: str = "both",
    device: str = "auto",
    dtype: str = "auto",
    output: str | Path | None = None,
    stop_strings: tuple[str, ...] = STOP_STRINGS,
    progress: EvalProgress | None = None,
    force: bool = False,
) -> MathResult:
    """Evaluate MODEL on MATH records; write per-item results and a summary JSON beside them."""
    t_start = time.perf_counter()
    progress = progress or EvalProgress()
    check_options(limit, batch_size, max_new_tokens, metric, template, output)
    spec = resolve_model(model, adapter, TASK)
    spec_data = data if isinstance(data, DataSpec) else DataSpec(str(data))
    data = Path(spec_data.data).expanduser()  # a local path, or a Hub id as written
    f = parse_fields(fields) if fields else None
    if f is not None and (f.prompt is None or f.context is not None):
        raise DataError(
            f"--fields {fields!r}: sorsa eval math takes PROBLEM,SOLUTION (e.g. problem,solution)"
        )
    prompt_f, response_f = (f.prompt, f.response) if f else FIELDS
    if metric != "nll":
        _verifier()  # missing: one line now, not after the generation
    records = _checked(spec_data, prompt_f, response_f)[:limit]
    golds = [gold_answer(r, response_f) for _, r in records]
    if metric != "nll" and (bad := [w for (w, _), g in zip(records, golds, strict=True) if g is None]):
        raise DataError(
            f"{data}: {len(bad)} of {len(records)} records have no reference answer (first: {bad[0]}): "
            "no 'answer' field and no \\boxed{} in the solution; add one, or pass --metric nll"
        )
    inputs = ([data] if data.exists() else []) + ([Path(spec.path)] if spec.kind == "gguf" else [])
    items_file, _ = plan_outputs(output, default_output(spec, TASK), inputs, force)
    backend = backends.open_backend(spec, resolve_device(device), dtype)
    with tempfile.TemporaryDirectory(prefix="sorsa-math-") as tmp:
        staged = Path(tmp) / "math.jsonl"
        staged.write_text(
            "".join(
                json.dumps({"problem": r[prompt_f], "solution": r[response_f]}) + "\n" for _, r in records
            ),
            encoding="utf-8",
        )
        ds = Dataset(staged, backend.tokenizer, parse_fields("problem,solution"), template, MAX_LENGTH)
        if len(ds) != len(records):
            raise DataError(f"{data}: {len(records) - len(ds)} problems alone fill {MAX_LENGTH} tokens")
        backend.load()
        run = _passes(
            backend, ds, records, golds, metric, template, batch_size, max_new_tokens, stop_strings, progress
        )
        data_info = {
            **({"path": str(data.resolve())} if data.exists() else {"dataset": spec_data.data}),
            **{k: v for k, v in (("split", spec_data.split), ("subset", spec_data.subset)) if v},
            "records_sha256": sha256_of(staged),
            "examples": len(records),
        }
    backend.close()
    options = {
        "data": data_info,
        "limit": limit,
        "template": template,
        "fields": f"{prompt_f},{response_f}",
        "metric": metric,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "stop_strings": list(stop_strings),
        "decoding": "greedy",
        "verifier": "math-verify",
    }
    rows = _rows(records, golds, run, prompt_f)
    return _report(rows, run, options, run_fields(spec, backend, items_file), items_file, t_start)


def _passes(
    backend, ds, records, golds, metric, template, batch_size, max_new_tokens, stops, progress
) -> dict:
    idx = list(range(len(records)))
    run = {"nll": None, "outputs": None, "nll_s": 0.0, "gen_s": 0.0, "truncated": sum(ds.truncated)}
    run["correct"] = correct = [None] * len(records)

    def score(i: int, text: str) -> bool:  # once per item: math-verify takes milliseconds
        correct[i] = is_equivalent(extract_answer(text), golds[i])
        return correct[i]

    if metric != "accuracy":
        run["nll"], run["nll_s"] = nll_pass(backend, ds, idx, batch_size, progress)
    if metric != "nll":
        run["outputs"], run["gen_s"] = generate_pass(
            backend,
            [render_prompt(ds.fields.question(r), template, ds.tok) for _, r in records],
            [ds.lengths[i] - ds.response_tokens[i] for i in idx],
            add_special=template != "chat",
            max_new_tokens=max_new_tokens,
            stops=stops,
            batch_size=batch_size,
            progress=progress,
            score=score,
        )
    return run


def _rows(records: list, golds: list, run: dict, prompt_f: str) -> list[dict]:
    rows = []
    for i, ((where, rec), gold) in enumerate(zip(records, golds, strict=True)):
        row = {
            "index": i,
            "id": rec.get("unique_id") or where,
            "type": rec.get("type") or rec.get("subject"),  # MATH's "type"; MATH-500's "subject"
            "level": rec.get("level"),
        }
        row |= {"problem": rec[prompt_f], "gold": gold}
        if run["outputs"] is not None:
            text, n_gen = run["outputs"][i]
            row |= {"output": text, "extracted": extract_answer(text), "correct": run["correct"][i]}
            row["generated_tokens"] = n_gen
        if run["nll"] is not None:
            s, c = run["nll"][i]
            row |= {"nll": s / c if c else None, "nll_sum": s, "n_tokens": c}
        rows.append(row)
    return rows


def _report(
    rows: list[dict], run: dict, options: dict, ran: dict, items_file: Path, t_start: float
) -> MathResult:
    """Overall and per-group numbers; both files written."""
    metric, n = options["metric"], len(rows)
    acc = accuracy_block(sum(1 for r in rows if r["correct"]), n) if metric != "nll" else {"n": n}
    tokens = sum(r["n_tokens"] for r in rows) if metric != "accuracy" else 0
    mean_nll = sum(r["nll_sum"] for r in rows) / tokens if tokens else None
    gen_tokens = sum(o[1] for o in run["outputs"]) if run["outputs"] else 0
    summary = {"task": TASK, "accuracy": None, "correct": None, "ci95": None} | acc
    summary |= {"nll": mean_nll, "nll_tokens": tokens or None}
    summary |= {k: _groups(rows, col, metric) for k, col in GROUPS.items() if any(r.get(col) for r in rows)}
    summary |= options | {"truncated": run["truncated"]}
    summary["throughput"] = {
        "generate_seconds": run["gen_s"],
        "generated_tokens": gen_tokens,
        "generated_tokens_per_s": gen_tokens / run["gen_s"] if run["gen_s"] else None,
        "nll_seconds": run["nll_s"],
    }
    summary |= ran
    sfile = write_results(items_file, rows, summary)
    ci = tuple(summary["ci95"]) if summary["ci95"] else None
    return MathResult(
        summary["accuracy"], summary["correct"], n, ci, mean_nll, tokens, summary.get("by_subject", {}),
        summary.get("by_level", {}), items_file, sfile, time.perf_counter() - t_start, summary,
    )  # fmt: skip
