"""`sorsa decompose`: stream a checkpoint shard by shard into W_r shards plus SORSA factors.

The source is an HF safetensors checkpoint, or a format read as one (io.checkpoint.open_source:
Meta's original Llama release, io.meta_llama); the output is always an HF checkpoint.

Pipeline, per target weight in file order: an I/O thread preads W, compute threads run the SVD
(on a CPU: up to 4 matrices at once, the cores split between them; or one on the GPU), and the
main thread streams the output shard: target weights as W_r, every other tensor copied byte for
byte. Up to LOOKAHEAD matrices beyond the compute threads are in flight, so disk and cores
overlap while memory stays at one input shard's page cache plus a few matrices.

Crash safety: the job's identity goes to DIR/.sorsa-partial/job.json first; each output shard is
written to a temp name, read back and verified, its factors saved, then renamed. A rerun of the
same command skips finished shards; the last step assembles the adapter and writes
sorsa_config.json, which marks the directory complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import shutil
import sys
import time
import types
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sorsa_tools import __version__
from sorsa_tools import quantize as qz
from sorsa_tools.arch import select_targets
from sorsa_tools.device import resolve_device
from sorsa_tools.errors import (
    CheckpointError,
    DiskFullError,
    InputError,
    OutputDirError,
    RankError,
    TargetError,
    VerificationError,
)
from sorsa_tools.format import (
    ADAPTER_FILE,
    CHECKSUMS,
    CONFIG_FILE,
    FORMAT_VERSION,
    adapter_tensor_specs,
    checksums,
    factor_names,
)
from sorsa_tools.io.checkpoint import INDEX_NAME, Checkpoint, open_source
from sorsa_tools.io.hub import resolve_model
from sorsa_tools.io.placement import mark_complete, remove_stale_temps
from sorsa_tools.io.safetensors_file import (
    DTYPE_CODES,
    DTYPES,
    SafetensorsFile,
    StreamWriter,
    atomic_write_json,
    check_read_back,
    check_replaceable,
    iter_file_chunks,
    write_tensors,
)
from sorsa_tools.svd import (
    COMPUTE_DTYPES,
    Factors,
    energy_captured,
    exact_singular_values,
    exact_svd,
    krylov_svd,
    randomized_svd,
    reconstruction_probe,
    require_finite,
    residual,
)

PARTIAL_DIR = ".sorsa-partial"
LOOKAHEAD = 2
MAX_CPU_WORKERS = 4
AUTO_EXACT_FACTOR = 10  # exact LAPACK below 10 (rank + oversample): measured break-even
ITERATIVE = {"krylov": krylov_svd, "randomized": randomized_svd}
FLOAT_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class Progress:
    """Receives progress events; the CLI draws them, the library default ignores them."""

    def start(self, total_modules: int, total_bytes: int, done_modules: int, done_bytes: int) -> None:
        pass

    def advance(self, modules: int, nbytes: int, label: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass


@dataclass
class DecomposeResult:
    out_dir: Path
    modules: int
    rank: int
    seconds: float
    peak_rss_bytes: int
    mean_energy_captured: float
    max_reconstruction_error: float
    max_s_rel_error: float | None
    max_s_est_error: float | None
    svd: str
    device: str
    shards: int
    resumed_shards: int = 0
    already_done: bool = False
    warnings: list[str] = field(default_factory=list)
    all_exact: bool = False  # every module took the exact SVD: its S error is 0 by construction
    quantization: dict | None = None  # QSORSA: settings and mean error figures (sorsa_config's)


@dataclass
class _Done:
    """One target's result, waiting to be written."""

    name: str
    factors: Factors
    residual: torch.Tensor | dict[str, torch.Tensor] | None  # quantized: the format's tensors
    stats: dict


def _module_seed(seed: int, module: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{module}".encode()).digest()[:7], "little")


def _dtype_arg(value: str | None, flag: str, allowed: dict[str, torch.dtype]) -> torch.dtype | None:
    if value is None:
        return None
    if value not in allowed:
        raise InputError(f"{flag} must be one of {', '.join(allowed)}, not {value!r}")
    return allowed[value]


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _check_options(rank: int, svd: str, oversample: int | None, niter: int, check_sample: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise RankError(f"--rank must be a positive integer, got {rank}")
    if svd not in ("auto", "exact", *ITERATIVE):
        raise InputError(f"--svd must be auto, krylov, randomized or exact, not {svd!r}")
    if oversample is not None and oversample < 0:
        raise InputError(f"--oversample must be 0 or more, got {oversample}")
    if niter < 0:
        raise InputError(f"--niter must be 0 or more, got {niter}")
    if check_sample < 0:
        raise InputError(f"--check-sample must be 0 or more, got {check_sample}")


def _validate_targets(ckpt: Checkpoint, targets: list[str], rank: int) -> None:
    for m in targets:
        info = ckpt.info(m + ".weight")
        if info.dtype not in ("F32", "F16", "BF16", "F64"):
            raise TargetError(
                f"{m}.weight is stored as {info.dtype}, not as floats (a quantized checkpoint?); "
                "decompose the unquantized model"
            )
    limit = min(min(ckpt.info(m + ".weight").shape) for m in targets)
    if rank > limit:
        worst = next(m for m in targets if min(ckpt.info(m + ".weight").shape) == limit)
        out_f, in_f = ckpt.info(worst + ".weight").shape
        raise RankError(
            f"--rank {rank} is larger than min(out, in) = {limit} of {worst} ({out_f}x{in_f}); "
            f"choose a rank of at most {limit}, or leave that module out with --targets"
        )


def _quant_settings(
    fmt: str | None, iters: int, block_size: int | None, double_quant: bool, residual_dtype: str | None
) -> qz.QuantSettings | None:
    if fmt is None:
        if iters != 1 or block_size is not None:
            raise InputError("--quant-iters and --quant-block-size need --quantize nf4|int8")
        return None
    if residual_dtype is not None:
        raise InputError(
            f"--residual-dtype does not apply with --quantize {fmt} (the residual is stored as {fmt}); drop one"
        )
    return qz.settings(fmt, iters, block_size, double_quant)


def _refuse_other_quantization(out: Path, partial: Path, job: dict) -> None:
    """A resume (or a finished dir) made with other --quantize settings: say which, not just 'other files'."""
    for f in (partial / "job.json", out / CONFIG_FILE):
        try:
            cfg = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        old = cfg.get("quantization")
        old = {k: old.get(k) for k in ("format", "block_size", "double_quant", "iters")} if old else None
        new = job.get("quantization")
        new = {k: new.get(k) for k in ("format", "block_size", "double_quant", "iters")} if new else None
        if cfg.get("source_fingerprint", (cfg.get("base_model") or {}).get("fingerprint")) and old != new:
            raise OutputDirError(
                f"{out} holds a decomposition made with quantization {old or 'none'}, not {new or 'none'}; "
                "rerun with its settings to resume it, or pass --force to replace it"
            )


def _same_model_and_rank(out: Path, fingerprint: str, rank: int) -> bool:
    """Whether OUT is a decomposition (finished or partial) of the checkpoint with this fingerprint
    at this rank: what a default -o may resume, find done, or replace with --force."""
    for f, key in (
        (out / CONFIG_FILE, ("base_model", "fingerprint")),
        (out / PARTIAL_DIR / "job.json", ("source_fingerprint",)),
    ):
        try:
            cfg = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        got = cfg
        for k in key:
            got = got.get(k) if isinstance(got, dict) else None
        if got == fingerprint and cfg.get("rank") == rank:
            return True
    return False


def _clear_dir(out: Path, source: Path) -> None:
    check_replaceable(out, [source], replaces="decomposition")
    # the config first: it marks the dir finished, so a kill part-way must not leave it behind
    (out / CONFIG_FILE).unlink(missing_ok=True)
    for p in out.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _method_for(svd: str, shape, rank: int, oversample: int) -> str:
    """auto: the exact SVD where it costs about as much as a Krylov one (small matrices)."""
    if svd != "auto":
        return svd
    return "exact" if min(shape) <= AUTO_EXACT_FACTOR * (rank + oversample) else "krylov"


def _sample_positions(n: int, k: int) -> set[int]:
    if k <= 0 or n == 0:
        return set()
    k = min(k, n)
    if k == 1:
        return {0}
    return {round(j * (n - 1) / (k - 1)) for j in range(k)}


def decompose(
    model: str,
    rank: int,
    output_dir: str | Path,
    *,
    revision: str | None = None,
    targets: str | None = None,
    svd: str = "auto",
    oversample: int | None = None,
    niter: int = 4,
    tol: float = 5e-4,
    max_niter: int = 24,
    seed: int = 0,
    device: str = "auto",
    compute_dtype: str = "float32",
    factor_dtype: str = "float32",
    residual_dtype: str | None = None,
    check_sample: int = 2,
    force: bool = False,
    progress: Progress | None = None,
    output_is_default: bool = False,
    quantize: str | None = None,
    quant_iters: int = 1,
    quant_block_size: int | None = None,
    double_quant: bool = True,
) -> DecomposeResult:
    """Decompose every target weight of MODEL into W_r (written as an HF checkpoint) + U, S, Vt.

    `svd="auto"` runs the exact LAPACK SVD where it is cheap (min(out, in) <= 10 (rank +
    oversample)) and the randomized block Krylov SVD (`svd.krylov_svd`) elsewhere: blocks of
    rank + oversample columns (`oversample` defaults to 0 for Krylov, to `rank` for the
    subspace iteration of `svd="randomized"`), at least `niter` steps, then more (up to
    `max_niter`) until the estimated relative error of the top-r singular values is below `tol`.
    On Llama-2-7B-shaped weights that is 4 steps, the matrix products of PEFT's
    `pissa_niter_4`, with S within 8e-5 of exact instead of 10 % (docs/BENCHMARKS.md).
    `check_sample` iterative modules also get an exact SVD, to record the accuracy reached;
    every module records the estimate. `output_is_default`: OUTPUT_DIR was not chosen by the user
    (outputs.decompose_output), so an existing one is used only if it is a decomposition of this
    model at this rank. `quantize` ("nf4" or "int8") stores W_r quantized (bitsandbytes' format)
    after `quant_iters` rounds of the QPiSSA alternation (quantize.absorb).
    """
    t0 = time.perf_counter()
    progress = progress or Progress()
    _check_options(rank, svd, oversample, niter, check_sample)
    if not math.isfinite(tol) or tol < 0:
        raise InputError(f"--svd-tol must be a finite number >= 0 (got {tol}); 0 turns it off")
    if max_niter < niter:
        raise InputError(
            f"--max-niter {max_niter} is below --niter {niter}; raise --max-niter or lower --niter"
        )
    if oversample is None:
        oversample = rank if svd == "randomized" else 0
    dev = resolve_device(device)
    cdt = _dtype_arg(compute_dtype, "--compute-dtype", COMPUTE_DTYPES)
    fdt = _dtype_arg(factor_dtype, "--factor-dtype", FLOAT_DTYPES)
    rdt = _dtype_arg(residual_dtype, "--residual-dtype", FLOAT_DTYPES)
    qs = _quant_settings(quantize, quant_iters, quant_block_size, double_quant, residual_dtype)

    src, ckpt = _open_model(model, revision)
    target_list, warnings = _select_targets(ckpt, targets, rank, qs)
    out = Path(output_dir).expanduser()
    if out.resolve() == src.path.resolve():
        raise OutputDirError("the output directory is the source checkpoint itself; choose another -o")
    svd_job = {
        "method": svd,
        "oversample": oversample if svd != "exact" else None,
        "niter": niter if svd != "exact" else None,
        "tol": tol if svd != "exact" else None,
        "max_niter": max_niter if svd != "exact" and tol else None,
        "auto_exact_below": AUTO_EXACT_FACTOR * (rank + oversample) if svd == "auto" else None,
        "seed": seed,
        "compute_dtype": compute_dtype,
    }
    job = {
        "format_version": FORMAT_VERSION,
        "source_fingerprint": ckpt.fingerprint(),
        "rank": rank,
        "target_modules": target_list,
        "svd": svd_job,
        "factor_dtype": factor_dtype,
        "residual_dtype": residual_dtype,
    }
    if qs is not None:  # only then: plain decompositions keep their job ids
        job["quantization"] = qs.as_json()
    job_id = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
    partial = out / PARTIAL_DIR
    n = len(ckpt.shards)

    done = _open_output(out, partial, ckpt, src, model, job, job_id, force, output_is_default)
    if done is not None:
        return _result(out, done, rank, t0, svd, dev, n, n, True, warnings, tol, qs)
    res_dtypes = {m: rdt or DTYPES[ckpt.info(m + ".weight").dtype] for m in target_list}
    todo = _plan_shards(ckpt, out, partial, target_list, res_dtypes, qs, rank, fdt, progress)
    if todo:
        sample = _checked_sample(ckpt, target_list, svd, rank, oversample, check_sample, qs)
        ctx = _Ctx(rank, svd, oversample, niter, tol, max_niter, seed, dev, cdt, fdt, res_dtypes, sample, qs)
        _run_pipeline(ckpt, todo, set(target_list), ctx, out, partial, progress)

    all_stats: dict[str, dict] = {}
    for s in ckpt.shards:
        all_stats.update(json.loads((partial / _stats_name(s.path.name)).read_text()))
    _finalize(ckpt, src, out, partial, target_list, all_stats, job, job_id, fdt, rank)
    return _result(out, all_stats, rank, t0, svd, dev, n, n - len(todo), False, warnings, tol, qs)


def _open_model(model: str, revision: str | None):
    """The source (local dir or Hub snapshot) and its checkpoint; refuses what cannot be decomposed."""
    src = resolve_model(model, revision)
    if (src.path / CONFIG_FILE).is_file():
        raise InputError(
            f"{model} is already a SORSA decomposition (its target weights hold residuals); decompose the "
            f"original model, or get it back first with `sorsa merge {model} --to hf -o ORIGINAL`"
        )
    ckpt = open_source(src.path)
    if ckpt.config.get("quantization_config"):
        method = ckpt.config["quantization_config"].get("quant_method", "quantized")
        raise InputError(
            f"{model} is already quantized ({method}); decompose (and --quantize) the unquantized model"
        )
    return src, ckpt


def _select_targets(
    ckpt: Checkpoint, targets: str | None, rank: int, qs: qz.QuantSettings | None
) -> tuple[list[str], list[str]]:
    """The target modules (arch table or --targets) and their warnings, checked against the rank
    and, quantized, against the block size."""
    shapes = {n: ckpt.info(n).shape for n in ckpt.weight_map}
    target_list, warnings = select_targets(ckpt.config, shapes, targets)
    _validate_targets(ckpt, target_list, rank)
    for m in target_list if qs else []:
        qz.check_shape(m, tuple(ckpt.info(m + ".weight").shape), qs)
    return target_list, warnings


def _open_output(
    out: Path,
    partial: Path,
    ckpt: Checkpoint,
    src,
    model: str,
    job: dict,
    job_id: str,
    force: bool,
    output_is_default: bool,
) -> dict | None:
    """Make `out` ready for this job: resume its partial state, replace it (--force) or refuse it.
    Returns the module stats when `out` already holds this finished job (nothing to do)."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} is a file; -o must name a directory")
    for d in (out, partial):  # what killed runs were writing (a live run's temps are kept)
        remove_stale_temps(d)
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if existing == [PARTIAL_DIR] and not (partial / "job.json").exists() and not any(partial.iterdir()):
        partial.rmdir()  # killed before its job file was in place: nothing to keep
        existing = []
    rank = job["rank"]
    if existing and output_is_default and not _same_model_and_rank(out, ckpt.fingerprint(), rank):
        raise OutputDirError(
            f"{out} (the default -o for {model} at rank {rank}) already holds something else (e.g. "
            f"{existing[0]}); pass -o DIR to write elsewhere"
        )
    if existing and not force:
        done_cfg = out / CONFIG_FILE
        if done_cfg.exists() and _read_job_id(done_cfg) == job_id:
            shutil.rmtree(partial, ignore_errors=True)  # killed after the config, before this cleanup
            return json.loads(done_cfg.read_text())["modules"]
        if not (partial / "job.json").exists() or _read_job_id(partial / "job.json") != job_id:
            _refuse_other_quantization(out, partial, job)
            raise OutputDirError(
                f"{out} already holds other files (e.g. {existing[0]}); choose a new or empty "
                "directory, or pass --force to replace its contents"
            )
    elif existing and force:
        _clear_dir(out, src.path)
    out.mkdir(parents=True, exist_ok=True)
    partial.mkdir(exist_ok=True)
    atomic_write_json(partial / "job.json", {"job_id": job_id, **job})
    return None


def _plan_shards(
    ckpt: Checkpoint,
    out: Path,
    partial: Path,
    target_list,
    res_dtypes,
    qs,
    rank: int,
    fdt,
    progress: Progress,
) -> list[SafetensorsFile]:
    """The shards still to write (a resumed job skips finished ones), after checking that their
    output fits the disk; starts the progress display at what is already done."""
    shard_done = [_shard_is_done(out, partial, s.path.name) for s in ckpt.shards]
    target_set = set(target_list)
    out_sizes = {s.path.name: _out_shard_bytes(s, target_set, res_dtypes, qs) for s in ckpt.shards}
    need = sum(sz for s, sz in out_sizes.items() if not shard_done[ckpt.shard_names.index(s)])
    need += 2 * sum(_factor_bytes(ckpt.info(m + ".weight").shape, rank, fdt) for m in target_list)
    free = shutil.disk_usage(out).free
    if need > free:
        raise DiskFullError(
            f"{out} needs about {need / 1e9:.1f} GB but only {free / 1e9:.1f} GB is free there; "
            "free space or choose another -o"
        )
    total_bytes = sum(out_sizes.values())
    done_bytes = sum(out_sizes[s.path.name] for s, d in zip(ckpt.shards, shard_done, strict=True) if d)
    done_mods = sum(
        1 for m in target_list if shard_done[ckpt.shard_names.index(ckpt.weight_map[m + ".weight"])]
    )
    progress.start(len(target_list), total_bytes, done_mods, done_bytes)
    return [s for s, d in zip(ckpt.shards, shard_done, strict=True) if not d]


def _checked_sample(
    ckpt: Checkpoint, target_list, svd: str, rank: int, oversample: int, check_sample: int, qs
) -> set[str]:
    """The modules that also get an exact SVD, to record the accuracy the iterative one reached
    (quantized: any module, each has a nuclear norm to sample)."""
    iterative = [
        m
        for m in target_list
        if _method_for(svd, ckpt.info(m + ".weight").shape, rank, oversample) in ITERATIVE
    ]
    checked = target_list if qs else iterative
    return {checked[i] for i in _sample_positions(len(checked), check_sample)} if checked else set()


def _read_job_id(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("job_id")
    except (OSError, json.JSONDecodeError):
        return None


def _result(
    out, stats, rank, t0, svd, dev, shards, resumed, already, warnings, tol=None, qs=None
) -> DecomposeResult:
    energies = [s["energy_captured"] for s in stats.values()]
    errs = [s["s_max_rel_error"] for s in stats.values() if s.get("s_max_rel_error") is not None]
    iterative = [s for s in stats.values() if s.get("method") in ITERATIVE]
    ests = [s.get("s_est_error") for s in iterative]
    known = [e for e in ests if e is not None]
    warnings = list(warnings)
    if tol and iterative:
        bad = [e for e in ests if e is None or e > tol]
        if bad:
            worst = "unknown" if None in bad else f"{max(bad):.1e}"
            warnings.append(
                f"{len(bad)} module(s) did not reach --svd-tol {tol:g} within --max-niter iterations "
                f"(worst estimated S error {worst}); raise --max-niter or use --svd exact"
            )
        # the estimate extrapolates; the sampled modules' exact SVD says whether it held here
        under = [
            s
            for s in iterative
            if s.get("s_max_rel_error") is not None
            and s["s_max_rel_error"] > tol
            and s.get("s_est_error") is not None
            and s["s_est_error"] <= tol
        ]
        if under:
            w = max(under, key=lambda s: s["s_max_rel_error"])
            warnings.append(
                f"{len(under)} of the modules checked against an exact SVD missed --svd-tol {tol:g} although "
                f"their estimate met it (worst true S error {w['s_max_rel_error']:.1e}, estimated "
                f"{w['s_est_error']:.1e}): the estimate undershoots on this checkpoint; pass a lower "
                "--svd-tol or --svd exact"
            )
    all_exact = all(s.get("method") == "exact" for s in stats.values())
    return DecomposeResult(
        out_dir=out,
        modules=len(stats),
        rank=rank,
        seconds=time.perf_counter() - t0,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        mean_energy_captured=sum(energies) / max(len(energies), 1),
        max_reconstruction_error=max((s["reconstruction_error"] for s in stats.values()), default=0.0),
        max_s_rel_error=max(errs) if errs else (0.0 if all_exact else None),
        max_s_est_error=(max(known) if known and len(known) == len(ests) else None) if iterative else 0.0,
        svd=svd,
        device=dev,
        shards=shards,
        resumed_shards=resumed,
        already_done=already,
        warnings=warnings,
        all_exact=all_exact,
        quantization=_quantization_summary(qs, stats) if qs else None,
    )


def _factors_name(shard: str) -> str:
    return f"factors-{shard}"


def _stats_name(shard: str) -> str:
    return f"stats-{shard}.json"


def _shard_is_done(out: Path, partial: Path, shard: str) -> bool:
    return all(
        p.exists() for p in (out / shard, partial / _factors_name(shard), partial / _stats_name(shard))
    )


def _out_specs(info, target_set, res_dtypes, qs: qz.QuantSettings | None) -> list[tuple[str, str, tuple]]:
    """The output tensors (name, dtype code, shape) that one source tensor becomes: a target weight
    its residual (quantized: the format's tensors, quantize.specs), anything else itself."""
    m = info.name.removesuffix(".weight")
    if not (info.name.endswith(".weight") and m in target_set):
        return [(info.name, info.dtype, tuple(info.shape))]
    if qs is not None:
        return [(f"{m}.{suffix}", code, shape) for suffix, code, shape in qz.specs(tuple(info.shape), qs)]
    return [(info.name, DTYPE_CODES[res_dtypes[m]], tuple(info.shape))]


def _out_shard_bytes(shard: SafetensorsFile, target_set, res_dtypes, qs=None) -> int:
    total = 0
    for info in shard.tensors.values():
        for _, code, shape in _out_specs(info, target_set, res_dtypes, qs):
            total += math.prod(shape) * torch.empty((), dtype=DTYPES[code]).element_size()
    return total


def _factor_bytes(shape, rank, fdt) -> int:
    return (shape[0] + shape[1] + 1) * rank * torch.empty((), dtype=fdt).element_size()


@dataclass
class _Ctx:
    rank: int
    svd: str
    oversample: int
    niter: int
    tol: float
    max_niter: int
    seed: int
    device: str
    compute_dtype: torch.dtype
    factor_dtype: torch.dtype
    res_dtypes: dict[str, torch.dtype]
    sample: set[str]
    quant: qz.QuantSettings | None = None


def _compute(name: str, read: Future, ctx: _Ctx) -> _Done:
    """SVD one matrix and form its residual; runs on the compute thread."""
    m = name.removesuffix(".weight")
    src = read.result()
    # float64 in (the source) or out (the residual) computes in float64: W_r + U S Vt must give
    # back W to the residual dtype's rounding, which float32 arithmetic cannot for float64
    cdt = torch.promote_types(ctx.compute_dtype, torch.promote_types(src.dtype, ctx.res_dtypes[m]))
    W = src.to(device=ctx.device, dtype=cdt)
    del src
    t0 = time.perf_counter()
    require_finite(W, name)
    if ctx.quant is not None:
        return _compute_quantized(m, W, ctx, t0)
    f, method = _svd(W, ctx, m)
    niter_used, est_error = f.niter, f.est_error
    # round the factors to their storage dtype first, so that W_r + the *stored* factors == W
    stored = [t.to(ctx.factor_dtype) for t in (f.U, f.S, f.Vt)]
    f = Factors(*(t.to(cdt) for t in stored))
    W_r = residual(W, f).to(ctx.res_dtypes[m])
    for what, t in (("W_r", W_r), *zip(("U", "S", "Vt"), stored, strict=True)):
        if not bool(torch.isfinite(t).all()):
            raise InputError(
                f"{m}: {what} overflows {str(t.dtype).removeprefix('torch.')} (the weights exceed its range); "
                "choose --residual-dtype and --factor-dtype float32 or bfloat16"
            )
    err, ratio = reconstruction_probe(W, W_r, f, probes=4, rows=64)
    tol = torch.finfo(ctx.res_dtypes[m]).eps * ratio + 2e-5
    if not err <= tol:  # also catches NaN
        raise VerificationError(
            f"{m}: W_r + U diag(S) Vt differs from W by {err:.2e} (tolerance {tol:.1e}); "
            "run again, and report it if it repeats"
        )
    W_r = W_r.cpu()
    stats = {
        "shape": list(W.shape),
        "method": method,
        "niter": niter_used if method in ITERATIVE else None,
        "s_est_error": (est_error if est_error is None or math.isfinite(est_error) else None)
        if method in ITERATIVE
        else 0.0,
        "svd_seconds": round(time.perf_counter() - t0, 4),
        "reconstruction_error": err,
        "energy_captured": energy_captured(f.S, W),
        "sigma_1": float(f.S[0]),
        "sigma_r": float(f.S[-1]),
        "s_max_rel_error": None,
    }
    if m in ctx.sample:
        exact = exact_singular_values(W)[: ctx.rank].double()
        rel = (f.S.double() - exact).abs() / exact.clamp_min(torch.finfo(torch.float64).tiny)
        stats["s_max_rel_error"] = float(rel.max())
        stats["s_mean_rel_error"] = float(rel.mean())
        stats["energy_vs_optimal"] = float(f.S.double().square().sum() / exact.square().sum())
    factors = Factors(*(t.to(ctx.factor_dtype).cpu() for t in (f.U, f.S, f.Vt)))
    del W
    return _Done(m, factors, W_r, stats)


def _svd(W: torch.Tensor, ctx: _Ctx, m: str) -> tuple[Factors, str]:
    """The top-r SVD of W by the method --svd picks for its shape (exact where cheap)."""
    method = _method_for(ctx.svd, W.shape, ctx.rank, ctx.oversample)
    f = None
    if method != "exact":
        g = torch.Generator().manual_seed(_module_seed(ctx.seed, m))
        try:
            f = ITERATIVE[method](
                W, ctx.rank, ctx.oversample, ctx.niter, g, tol=ctx.tol or None, max_niter=ctx.max_niter
            )
        except torch.linalg.LinAlgError:  # an ill-conditioned small eigenproblem: exact instead
            method = "exact"
        else:
            method = f.method or method
    if f is None:
        try:
            f = exact_svd(W, ctx.rank)
        except torch.linalg.LinAlgError as e:
            raise CheckpointError(
                f"{m}: the SVD did not converge ({str(e).splitlines()[0]}); run again with --compute-dtype float64"
            ) from None
    return f, method


def _compute_quantized(m: str, W: torch.Tensor, ctx: _Ctx, t0: float) -> _Done:
    """QSORSA: the factors absorb what the quantizer loses (quantize.absorb), and the residual is
    stored as the quantizer's tensors. Records the error against QLoRA's (W quantized whole)."""
    last: dict = {}

    def svd(M: torch.Tensor) -> Factors:
        f, last["method"] = _svd(M, ctx, m)
        last["niter"], last["est"] = f.niter, f.est_error
        return f

    def stored(f: Factors) -> Factors:  # the factors as they will be stored
        return Factors(*(t.to(ctx.factor_dtype).to(W.dtype) for t in (f.U, f.S, f.Vt)))

    a = qz.absorb(W, ctx.quant, ctx.res_dtypes[m], svd, stored)
    f, method = a.factors, last["method"]
    err = residual(W - a.dequantized, f)
    base = qz.qlora_error(W, ctx.quant, ctx.res_dtypes[m])
    fro = float(torch.linalg.matrix_norm(W))
    for what, t in (("U", f.U), ("S", f.S), ("Vt", f.Vt), ("dequant(Q)", a.dequantized)):
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"{m}: {what} is not finite after quantization; choose --factor-dtype float32")
    stats = {
        "shape": list(W.shape),
        "method": method,
        "niter": last["niter"] if method in ITERATIVE else None,
        "s_est_error": last["est"] if method in ITERATIVE and last["est"] is not None else 0.0,
        "svd_seconds": round(time.perf_counter() - t0, 4),
        "reconstruction_error": a.errors[-1],  # relative Frobenius: the quantization error left
        "energy_captured": energy_captured(f.S, W),
        "sigma_1": float(f.S[0]),
        "sigma_r": float(f.S[-1]),
        "s_max_rel_error": None,
        "quant_error": a.errors[-1],
        "quant_error_by_iter": a.errors,
        "qlora_error": float(torch.linalg.matrix_norm(base)) / max(fro, 1e-30),
        "error_reduction_fro": qz.error_reduction(err, base, lambda t: float(torch.linalg.matrix_norm(t))),
        "error_reduction_nuclear": None,
    }
    if m in ctx.sample:  # full SVDs: the nuclear-norm reduction (the PiSSA paper's) and the S accuracy
        stats["error_reduction_nuclear"] = qz.error_reduction(err, base, qz.nuclear)
        exact = exact_singular_values(W - a.dequantized)[: ctx.rank].double()
        rel = (f.S.double() - exact).abs() / exact.clamp_min(torch.finfo(torch.float64).tiny)
        stats["s_max_rel_error"] = float(rel.max())
        stats["s_mean_rel_error"] = float(rel.mean())
    factors = Factors(*(t.to(ctx.factor_dtype).cpu() for t in (f.U, f.S, f.Vt)))
    return _Done(m, factors, a.tensors, stats)


def _cpu_split(device) -> tuple[int, int]:
    """(compute threads, torch threads each). On a CPU, matrices run side by side on a share of
    the cores each: the reading and writing threads then slow one SVD a little instead of making
    every core of one multi-threaded SVD wait at its barriers (2 cores: 15 % faster end to end,
    measured on Llama-2-7B shapes). Four at most keeps memory at a few matrices."""
    n = torch.get_num_threads()
    if torch.device(device).type != "cpu" or n < 2:
        return 1, n
    workers = min(MAX_CPU_WORKERS, n)
    return workers, max(1, n // workers)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _svd_pool(workers: int, threads: int) -> ThreadPoolExecutor:
    """Compute threads that each run torch on `threads` threads. A new thread starts at OpenMP's
    default count, not its caller's, and an SVD's last bits depend on the count: without this a
    rerun (or a resumed run) could differ from an uninterrupted one by 1e-8."""
    return ThreadPoolExecutor(
        workers, thread_name_prefix="sorsa-svd", initializer=torch.set_num_threads, initargs=(threads,)
    )


def _run_pipeline(ckpt, shards, target_set, ctx: _Ctx, out: Path, partial: Path, progress: Progress) -> None:
    items = [
        (s, info)
        for s in shards
        for info in s.tensors.values()
        if info.name.endswith(".weight") and info.name.removesuffix(".weight") in target_set
    ]
    computes: dict[str, Future] = {}
    nxt = 0
    workers, threads = _cpu_split(ctx.device)
    with (
        _torch_threads(threads),
        ThreadPoolExecutor(2, thread_name_prefix="sorsa-read") as io_pool,
        _svd_pool(workers, threads) as cpu_pool,
    ):

        def submit_until(k: int) -> None:
            nonlocal nxt
            while nxt < min(k, len(items)):
                s, info = items[nxt]
                read = io_pool.submit(s.read_tensor, info.name)
                computes[info.name] = cpu_pool.submit(_compute, info.name, read, ctx)
                nxt += 1

        pos = 0
        try:
            for shard in shards:
                done: dict[str, _Done] = {}
                specs = [
                    spec
                    for i in shard.tensors.values()
                    for spec in _out_specs(i, target_set, ctx.res_dtypes, ctx.quant)
                ]
                dest = out / shard.path.name
                with StreamWriter(dest, specs, shard.metadata) as w:
                    for info in shard.tensors.values():
                        m = info.name.removesuffix(".weight")
                        if info.name.endswith(".weight") and m in target_set:
                            submit_until(pos + workers + LOOKAHEAD)
                            d = computes.pop(info.name).result()
                            pos += 1
                            _write_residual(w, m, d.residual)
                            d.residual = None
                            done[m] = d
                            progress.advance(1, info.nbytes, m)
                        else:
                            _copy_tensor(w, shard, info)
                            progress.advance(0, info.nbytes, info.name)
                    tmp = w.finish_to_temp()
                    written = SafetensorsFile(tmp)  # the header and layout parse back
                    if [(t.name, tuple(t.shape)) for t in written.tensors.values()] != [
                        (n, tuple(sh)) for n, _, sh in specs
                    ]:
                        raise VerificationError(
                            f"{tmp.name}: written tensor list differs from {shard.path.name}"
                        )
                    tensors = {}
                    for m, d in done.items():
                        nU, nS, nV = factor_names(m)
                        tensors.update({nU: d.factors.U, nS: d.factors.S, nV: d.factors.Vt})
                    write_tensors(partial / _factors_name(shard.path.name), tensors)
                    atomic_write_json(
                        partial / _stats_name(shard.path.name), {m: d.stats for m, d in done.items()}
                    )
                    w.commit()
                progress.note(f"{shard.path.name}: {len(done)} modules written and verified")
        finally:
            for f in computes.values():
                f.cancel()


def _write_residual(w: StreamWriter, m: str, res: torch.Tensor | dict[str, torch.Tensor]) -> None:
    """W_r (or its quantized tensors, in the order of their specs) into the shard, each read back."""
    for suffix, t in res.items() if isinstance(res, dict) else [("weight", res)]:
        name = f"{m}.{suffix}"
        w.write(name, t)
        w.flush()
        check_read_back(w.tmp, *w.span(name), t, name)


def _copy_tensor(w: StreamWriter, shard, info) -> None:
    """A non-target tensor into the output: a safetensors source's bytes verbatim; from a source
    read through a converter (Meta's format), the tensor it gives, read back as written."""
    if isinstance(shard, SafetensorsFile):
        w.copy_from(info.name, shard.path, info)
        _verify_copy(w, info, shard)
        return
    t = shard.read_tensor(info.name)
    w.write(info.name, t)
    w.flush()
    check_read_back(w.tmp, *w.span(info.name), t, info.name)


def _verify_copy(w: StreamWriter, info, shard: SafetensorsFile) -> None:
    """A copied (non-target) tensor must read back byte for byte as the source holds it."""
    src = iter_file_chunks(shard.path, info.start, info.nbytes)
    if not all(a == b for a, b in zip(src, w.read_back(info.name), strict=True)):
        raise VerificationError(
            f"{info.name} was not copied bit-identically into {w.path.name}; check the disk"
        )


def _finalize(
    ckpt: Checkpoint, src, out: Path, partial: Path, targets, stats, job, job_id, fdt, rank
) -> None:
    # the adapter: factors gathered from the per-shard files, in target order
    factor_files = {s.path.name: SafetensorsFile(partial / _factors_name(s.path.name)) for s in ckpt.shards}
    specs = adapter_tensor_specs(
        {m: tuple(ckpt.info(m + ".weight").shape) for m in targets}, rank, DTYPE_CODES[fdt]
    )
    with StreamWriter(
        out / ADAPTER_FILE, specs, {"format": "pt", "sorsa_format_version": str(FORMAT_VERSION)}
    ) as w:
        for name, _, _ in specs:
            module = name.rsplit(".", 1)[0]
            ff = factor_files[ckpt.weight_map[module + ".weight"]]
            w.copy_from(name, ff.path, ff.tensors[name])
        w.commit()
    if ckpt.index is not None:
        written = [SafetensorsFile(out / s.path.name) for s in ckpt.shards]
        total = sum(f.size - f.data_start for f in written)
        index = dict(ckpt.index)
        index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
        if job.get("quantization"):  # the quantizer's extra tensors (absmax, ...) sit beside their weight
            index["weight_map"] = {n: f.path.name for f in written for n in f.tensors}
        atomic_write_json(out / INDEX_NAME, index)
    ckpt.write_side_files(out)
    qs = qz.QuantSettings.from_json(job["quantization"]) if job.get("quantization") else None
    if qs is None:
        res_dtypes = sorted(
            {
                _dtype_name(
                    DTYPES[SafetensorsFile(out / ckpt.weight_map[m + ".weight"]).tensors[m + ".weight"].dtype]
                )
                for m in targets
            }
        )
    else:
        res_dtypes = [qs.format]
        _write_quantization_config(ckpt, out, targets, qs)
    src_dtypes = sorted({_dtype_name(DTYPES[ckpt.info(m + ".weight").dtype]) for m in targets})
    for m in targets:
        stats[m]["shard"] = ckpt.weight_map[m + ".weight"]
    config = {
        "format_version": FORMAT_VERSION,
        "kind": "decomposition",
        **({"quantization": _quantization_summary(qs, stats)} if qs else {}),
        "job_id": job_id,
        "rank": rank,
        "target_modules": targets,
        "base_model": {
            "name_or_path": src.name,
            "source": src.source,
            "revision": src.revision,
            "local_path": str(src.path),
            "fingerprint": job["source_fingerprint"],
            "model_type": ckpt.config.get("model_type"),
            "architectures": ckpt.config.get("architectures"),
        },
        "svd": {
            **job["svd"],
            "orientation": "tall (wide matrices are transposed)",
            "sign_convention": "largest-magnitude entry of each U column is positive",
        },
        "dtypes": {"factors": _dtype_name(fdt), "residual": res_dtypes, "source": src_dtypes},
        "residual_checkpoint": {
            "index": INDEX_NAME if ckpt.index is not None else None,
            "shards": ckpt.shard_names,
        },
        "tool": {"name": "sorsa-tools", "version": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "modules": stats,
        CHECKSUMS: checksums(out, [ADAPTER_FILE, *ckpt.shard_names]),  # verified where they are read
    }
    try:
        atomic_write_json(out / CONFIG_FILE, config)
    finally:  # a Ctrl-C may land just after the rename that put it in place
        if (out / CONFIG_FILE).is_file():
            mark_complete(out)
    shutil.rmtree(partial, ignore_errors=True)


def _write_quantization_config(ckpt: Checkpoint, out: Path, targets, qs: qz.QuantSettings) -> None:
    """config.json gains bitsandbytes' `quantization_config`, so that transformers loads DIR as
    the quantized model it is; every 2-D weight that is not a target stays unquantized."""
    target_set = set(targets)
    skip = sorted(
        {
            n.removesuffix(".weight")
            for n in ckpt.weight_map
            if n.endswith(".weight")
            and n.removesuffix(".weight") not in target_set
            and len(ckpt.info(n).shape) == 2
        }
        | {"lm_head"}
    )
    src_dtype = _dtype_name(DTYPES[ckpt.info(targets[0] + ".weight").dtype])
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = qz.hf_quantization_config(qs, src_dtype, skip)
    atomic_write_json(out / "config.json", cfg)
    if json.loads((out / "config.json").read_text()).get("quantization_config") != cfg["quantization_config"]:
        raise VerificationError(f"{out / 'config.json'} did not read back as written; check the disk")


def _quantization_summary(qs: qz.QuantSettings, stats: dict) -> dict:
    """sorsa_config.json's `quantization`: the settings and the error figures over all modules."""

    def mean(key: str) -> float | None:
        vals = [s[key] for s in stats.values() if s.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        **qs.as_json(),
        "serialization": "bitsandbytes (transformers' pre-quantized layout, quantization_config in config.json)",
        "mean_quant_error": mean("quant_error"),
        "mean_qlora_error": mean("qlora_error"),
        "mean_error_reduction_fro": mean("error_reduction_fro"),
        "mean_error_reduction_nuclear_sampled": mean("error_reduction_nuclear"),
        "definition": "1 - ||W - (dequant(Q) + U S Vt)|| / ||W - dequant(quant(W))|| (PiSSA paper: nuclear norm)",
    }


class _CallableModule(types.ModuleType):
    """`from sorsa_tools import decompose; decompose(model, rank, out)`: the package attribute is
    this module (Python binds a submodule under its name on import), so the module calls its
    function."""

    def __call__(self, *args, **kwargs) -> DecomposeResult:
        return decompose(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
