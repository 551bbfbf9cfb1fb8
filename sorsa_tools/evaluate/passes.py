"""The two passes a benchmark makes over a backend: the teacher-forced NLL of reference answers and
generation. Both go longest first (padding in a batch stays small, and an out-of-memory shows at
once, not after an hour) and report running numbers to the progress display."""

from __future__ import annotations

import time
from collections.abc import Callable

from sorsa_tools.data import Dataset
from sorsa_tools.evaluate.backends import GGUFBackend, Sampling
from sorsa_tools.evaluate.report import EvalProgress


def nll_pass(
    backend, ds: Dataset, idx: list[int], batch_size: int, progress: EvalProgress
) -> tuple[list[tuple[float, int]], float]:
    """Per example of idx (in idx's order): (summed NLL of its response tokens, their count);
    and the seconds it took."""
    if isinstance(backend, GGUFBackend):
        backend.prepare(max(ds.lengths[i] for i in idx) + 8, logits_all=True)
    step = batch_size if backend.batched else 1
    order = sorted(idx, key=lambda i: -ds.lengths[i])
    sums: dict[int, tuple[float, int]] = {}
    progress.start("nll", len(idx))
    t0 = time.perf_counter()
    done = seen = count = 0
    total = 0.0
    for k in range(0, len(order), step):
        chunk = order[k : k + step]
        for i, r in zip(chunk, backend.nll(ds, chunk), strict=True):
            sums[i] = r
            seen += ds.lengths[i]
            total += r[0]
            count += r[1]
        done += len(chunk)
        dt = time.perf_counter() - t0
        progress.advance("nll", done, f"nll {total / max(count, 1):.4f}  {seen / max(dt, 1e-9):,.0f} tok/s")
    return [sums[i] for i in idx], time.perf_counter() - t0


def generate_pass(
    backend,
    prompts: list[str],
    prompt_len: list[int],
    *,
    add_special: bool,
    max_new_tokens: int,
    stops: tuple[str, ...],
    batch_size: int,
    progress: EvalProgress,
    score: Callable[[int, str], bool] | None = None,
    sampling: Sampling | None = None,
) -> tuple[list[tuple[str, int]], float]:
    """(text, generated tokens) per prompt, and the seconds it took. `score(i, text)` (when given)
    says whether output i is right, for the running accuracy on the bar."""
    if isinstance(backend, GGUFBackend):
        backend.prepare(max(prompt_len) + max_new_tokens + 8, logits_all=False)
    step = batch_size if backend.batched else 1
    order = sorted(range(len(prompts)), key=lambda i: -prompt_len[i])
    outputs: list[tuple[str, int] | None] = [None] * len(prompts)
    progress.start("generate", len(prompts))
    t0 = time.perf_counter()
    done = gen_tokens = right = 0
    for k in range(0, len(order), step):
        chunk = order[k : k + step]
        extra = {"sampling": sampling} if sampling else {}  # greedy: the four-argument call
        res = backend.generate([prompts[i] for i in chunk], add_special, max_new_tokens, stops, **extra)
        for i, r in zip(chunk, res, strict=True):
            outputs[i] = r
            gen_tokens += r[1]
            right += bool(score(i, r[0])) if score else 0
        done += len(chunk)
        rate = f"{gen_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s"
        progress.advance("generate", done, f"acc {right}/{done}  {rate}" if score else rate)
    return outputs, time.perf_counter() - t0
