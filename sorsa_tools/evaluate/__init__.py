"""`sorsa eval`: benchmarks of a model, each in its own module, on shared parts.

- models: what MODEL is (HF checkpoint, decomposed DIR + adapter, GGUF file), resolve_model
- backends: transformers and llama.cpp behind one interface (load, nll, generate)
- passes: the NLL pass and the generation pass over a backend, with progress
- report: option checks, output files (per-item JSONL + summary JSON), Wilson interval
- gsm8k: `sorsa eval gsm8k`; math_eval: `sorsa eval math`; humaneval: `sorsa eval humaneval`
- sandbox: running generated code in a contained child process (HumanEval's tests)

The names below are the package's public surface (and what code written against the former
single module `sorsa_tools.evaluate` imports).
"""

from sorsa_tools.evaluate.backends import (
    DTYPES,
    LOSS_CHUNK,
    GGUFBackend,
    HFBackend,
    Sampling,
    _cut,
    open_backend,
    per_example_nll,
)
from sorsa_tools.evaluate.gsm8k import (
    MAX_LENGTH,
    STOP_STRINGS,
    TASK,
    EvalResult,
    answers_match,
    evaluate_gsm8k,
    extract_answer,
    gold_answer,
    numbers,
)
from sorsa_tools.evaluate.humaneval import evaluate_humaneval
from sorsa_tools.evaluate.math_eval import evaluate_math, read_math_records
from sorsa_tools.evaluate.models import ACCEPTED, ModelSpec, resolve_model
from sorsa_tools.evaluate.report import (
    METRICS,
    EvalProgress,
    NllDifference,
    default_output,
    paired_nll_difference,
    summary_path,
    wilson_interval,
)

__all__ = [
    "ACCEPTED",
    "DTYPES",
    "LOSS_CHUNK",
    "MAX_LENGTH",
    "METRICS",
    "STOP_STRINGS",
    "TASK",
    "EvalProgress",
    "EvalResult",
    "GGUFBackend",
    "HFBackend",
    "ModelSpec",
    "NllDifference",
    "Sampling",
    "_cut",
    "answers_match",
    "default_output",
    "paired_nll_difference",
    "evaluate_gsm8k",
    "evaluate_humaneval",
    "evaluate_math",
    "extract_answer",
    "gold_answer",
    "numbers",
    "open_backend",
    "per_example_nll",
    "read_math_records",
    "resolve_model",
    "summary_path",
    "wilson_interval",
]
