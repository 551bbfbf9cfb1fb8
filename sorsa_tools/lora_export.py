"""`sorsa export-lora`: a trained SORSA adapter as a plain PEFT LoRA on the ORIGINAL base model.

SORSA trains W = W_r + U' diag(S') Vt' where DIR's initial factors gave W = W_r + U diag(S) Vt, so

    Delta W = U' diag(S') Vt' - U diag(S) Vt = [U'√S' | -U√S] [√S' Vt' ; √S Vt] = B A

is exactly a rank-2r product (PEFT converts PiSSA the same way, `subtract_mutated_init`). With
lora_alpha = r_lora the PEFT scale is 1, so base W + B A is the trained model; the file is the size
of two adapters instead of a whole checkpoint, and PEFT, vLLM and llama.cpp `--lora` load it.

Each rank-1 term is balanced (both halves get the same norm, sqrt(|s| ||u|| ||v||)), so that half
precision storage neither overflows nor flushes to zero. Everything is computed in float32 from
the stored factors, one module at a time, streamed into a temp dir next to OUT, read back and
checked on a random probe, and only then renamed into place.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sorsa_tools.arch import live_module_name, meta_model
from sorsa_tools.errors import InputError, NotDecomposedError, OutputDirError, VerificationError
from sorsa_tools.format import ADAPTER_FILE, CHECKSUMS, checksums, factor_names, verify_checksums
from sorsa_tools.hub import CARD_FILE, write_card
from sorsa_tools.io.placement import remove_stale_temps, swap_dir_into_place
from sorsa_tools.io.safetensors_file import (
    DTYPE_CODES,
    SafetensorsFile,
    StreamWriter,
    atomic_write_json,
    check_own_output,
)
from sorsa_tools.source import PROVENANCE_FILE, MergedSource, provenance

LORA_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHTS_FILE = "adapter_model.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROBES = 4  # random vectors per module in the read-back check


@dataclass
class LoraExportResult:
    out_dir: Path
    rank: int  # the LoRA's r = 2 x the SORSA rank
    sorsa_rank: int
    modules: int
    target_modules: list[str]  # as written to adapter_config.json
    exact_names: bool  # target_modules are full module names (short names would hit other modules)
    dtype: str
    bytes: int  # size of adapter_model.safetensors
    max_check_error: float  # max |B A x - Delta W x| / max(|U'S'Vt' x|, |U S Vt x|) over probes
    max_relative_delta: float  # largest ||Delta W||_F / ||U S Vt||_F: how far training moved a module
    base_model: str | None
    seconds: float
    quantization_gap: dict | None = None  # QSORSA: how far the LoRA on W is from the trained model


def quantization_gap(decomposition: dict) -> dict | None:
    """A QSORSA DIR was trained on dequant(Q) + U S Vt, not on W: the LoRA on the original W is off
    by W - dequant(Q) - U S Vt, the quantization error the factors did not absorb (it is not
    low-rank, so no LoRA holds it). Per module relative Frobenius, as decompose measured it."""
    q = decomposition.get("quantization")
    if not q:
        return None
    errs = [s["quant_error"] for s in (decomposition.get("modules") or {}).values() if "quant_error" in s]
    return {
        "format": q["format"],
        "mean_rel_error": sum(errs) / len(errs) if errs else None,
        "max_rel_error": max(errs) if errs else None,
        "meaning": "||W - (dequant(Q) + U S Vt)||_F / ||W||_F per module: the LoRA applies to W, "
        "the trained model to dequant(Q) + U' S' Vt'",
    }


def _live_names(src) -> set[str]:
    """Module names of the model PEFT will load the LoRA into (built on the meta device); empty
    where transformers cannot build it (checkpoint names are used then)."""
    try:
        model = meta_model(src.config)
    except Exception:
        return set()
    return {n for n, _ in model.named_modules() if n}


def lora_keys(module: str) -> tuple[str, str]:
    """PEFT's saved names of a module's (lora_A, lora_B) weights."""
    return f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight"


def peft_targets(targets: list[str], module_names: list[str]) -> tuple[list[str], bool]:
    """target_modules for adapter_config.json: the short names (q_proj, ...) when PEFT's suffix
    matching of them hits exactly `targets` among the model's modules, otherwise the full names
    (a partial selection, e.g. only some layers). Returns (names, whether they are full names)."""
    short = sorted({t.rpartition(".")[2] for t in targets})
    hits = {n for n in module_names if n.rpartition(".")[2] in short}
    if hits == set(targets):
        return short, False
    return list(targets), True


def balanced_factors(U: torch.Tensor, S: torch.Tensor, Vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) in float32 with B @ A = U diag(S) Vt and, per rank-1 term, ||B[:, i]|| = ||A[i]||.

    For orthonormal factors this is B = U sqrt(S), A = sqrt(S) Vt; it also holds for factors the
    training pulled off the unit sphere, or negative singular values (the sign goes to B)."""
    U, S, Vt = (t.double() for t in (U, S, Vt))
    nu, nv = U.norm(dim=0), Vt.norm(dim=1)
    live = (nu > 0) & (nv > 0) & (S != 0)
    one = torch.ones_like(S)
    mag = (S.abs() * nu * nv).sqrt()
    b = torch.where(live, torch.sign(S) * mag / torch.where(live, nu, one), 0.0)
    a = torch.where(live, mag / torch.where(live, nv, one), 0.0)
    return (U * b).float(), (Vt * a[:, None]).float()


def trained_source(d: Path, run: Path, check_out: Callable[[], None] | None = None) -> MergedSource:
    """DIR + RUN for a LoRA export: RUN a trained run of DIR whose factors moved (else the LoRA is
    zero), DIR's initial factors verified. `check_out` runs once the inputs are known good."""
    if not run.is_dir():
        raise NotDecomposedError(f"no such directory: {run}; pass the output of `sorsa train` as --adapter")
    src = MergedSource(d, run)  # refuses a non-decomposed DIR and an adapter of another decomposition
    acfg = src.adapter_config
    if acfg.get("kind") != "trained":
        raise InputError(
            f"{run} holds {acfg.get('kind', 'an unknown')!r} factors, not a trained run: their LoRA would be "
            f"zero; pass the output of `sorsa train {d} --data FILE -o RUN`"
        )
    if check_out is not None:
        check_out()
    verify_checksums(d, src.decomposition, [ADAPTER_FILE])  # the init factors: Delta W's other half
    init = SafetensorsFile(d / ADAPTER_FILE)
    for m in src.targets:  # untrained check first, so that nothing is written for a no-op
        new, old = src.factors(m), tuple(init.read_tensor(n) for n in factor_names(m))
        if not all(torch.equal(a.float(), b.float()) for a, b in zip(new, old, strict=True)):
            return src
    raise InputError(
        f"the adapter in {run} equals {d}'s initial factors (Delta W = 0, the LoRA would do nothing); "
        "train it first (`sorsa train` with --max-steps > 0 and lr > 0)"
    )


def delta_factors(src: MergedSource, init: SafetensorsFile, m: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in float32 of one module, B @ A = U'S'Vt' - U S Vt exactly (rank 2r, balanced halves)."""
    new, old = src.factors(m), tuple(init.read_tensor(n) for n in factor_names(m))
    B1, A1 = balanced_factors(*new)
    B0, A0 = balanced_factors(*old)
    return torch.cat([A1, A0], dim=0), torch.cat([B1, -B0], dim=1)


def _delta_apply(
    new: tuple[torch.Tensor, ...], old: tuple[torch.Tensor, ...], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Delta W x, the scale max(|U'S'Vt' x|, |U S Vt x|)) in float64, from the stored factors."""
    parts = [U.double() @ (S.double()[:, None] * (Vt.double() @ x)) for U, S, Vt in (new, old)]
    return parts[0] - parts[1], torch.maximum(parts[0].abs().max(), parts[1].abs().max())


def _tolerance(dtype: torch.dtype) -> float:
    """The read-back check's bound: float32 rounding of A and B, or the storage dtype's."""
    return 1e-5 if dtype == torch.float32 else 8 * torch.finfo(dtype).eps


def _check_paths(out: Path, force: bool, protected: list[Path]) -> None:
    """Refuses an OUT that must not be written or replaced."""
    res = out.resolve()
    for p in protected:
        pr = p.resolve()
        if res == pr or pr in res.parents or res in pr.parents:
            raise OutputDirError(
                f"-o {out} overlaps {p}; export-lora never writes into DIR or RUN: choose another -o"
            )
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputDirError(f"{out} is a file; -o must name a directory")
    if not force:
        raise OutputDirError(f"{out} already exists; choose a new -o, or pass --force to replace it")
    check_own_output(out, PROVENANCE_FILE, "a LoRA export")


def export_lora(
    directory: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    dtype: str = "float32",
    force: bool = False,
    seed: int = 0,
) -> LoraExportResult:
    """Write RUN's training as a PEFT LoRA adapter (rank 2r, scale 1) for DIR's original base model.

    The LoRA applies to the original W; SORSA's own merged model is W_r + U'S'Vt', which equals
    W + Delta W up to the rounding of W_r in its residual dtype."""
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    tdtype = DTYPES[dtype]
    d, run, out = (Path(p).expanduser() for p in (directory, adapter, out))
    src = trained_source(d, run, lambda: _check_paths(out, force, [d, run]))
    init = SafetensorsFile(d / ADAPTER_FILE)
    targets = src.targets
    r = int(src.decomposition["rank"])
    shapes = {m: tuple(src.info(m + ".weight").shape) for m in targets}
    max_rel = 0.0

    live = _live_names(src)
    peft_name = {m: live_module_name(m, live) or m for m in targets}
    names, exact = peft_targets(
        [peft_name[m] for m in targets], sorted(live) or [n.removesuffix(".weight") for n in src.names()]
    )
    base = src.decomposition.get("base_model") or {}
    base_id = base.get("name_or_path") if base.get("source") == "hub" else base.get("local_path")
    base_id = base_id or base.get("name_or_path")
    code = DTYPE_CODES[tdtype]
    specs = []
    for m in targets:
        out_f, in_f = shapes[m]
        ka, kb = lora_keys(peft_name[m])
        specs += [(ka, code, (2 * r, in_f)), (kb, code, (out_f, 2 * r))]

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent, out.name + ".")  # what a killed export was writing or replacing
    tmp = out.parent / f".{out.name}.export-tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        weights = tmp / LORA_WEIGHTS_FILE
        _write_factors(weights, specs, src, init, targets, peft_name, tdtype, dtype)
        max_err, max_rel = _verify(weights, src, init, targets, peft_name, tdtype, seed)
        atomic_write_json(tmp / LORA_CONFIG_FILE, _peft_config(2 * r, names, base_id, base.get("revision")))
        prov = provenance(src)
        prov["export"] = {
            "format": "peft-lora",
            "lora_rank": 2 * r,
            "lora_alpha": 2 * r,
            "dtype": dtype,
            "applies_to": "the original base model (Delta W = U'S'Vt' - U S Vt of the SORSA factors)",
            "quantization_gap": quantization_gap(src.decomposition),
            "adapter": run.resolve().name,
            "decomposition": d.resolve().name,
            "max_check_error": max_err,
        }
        prov["files"] = sorted({p.name for p in tmp.iterdir()} | {PROVENANCE_FILE, CARD_FILE})
        prov[CHECKSUMS] = checksums(tmp, [LORA_WEIGHTS_FILE])
        atomic_write_json(tmp / PROVENANCE_FILE, prov)
        write_card(tmp, out.name)
        nbytes = weights.stat().st_size
        swap_dir_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LoraExportResult(
        out_dir=out,
        rank=2 * r,
        sorsa_rank=r,
        modules=len(targets),
        target_modules=names,
        exact_names=exact,
        dtype=dtype,
        bytes=nbytes,
        max_check_error=max_err,
        max_relative_delta=max_rel,
        base_model=base_id,
        seconds=time.perf_counter() - t0,
        quantization_gap=quantization_gap(src.decomposition),
    )


def _write_factors(weights: Path, specs, src, init, targets, peft_name, tdtype, dtype: str) -> None:
    """Stream each target's LoRA pair (delta_factors) into the adapter file, refusing a dtype the
    factors overflow."""
    with StreamWriter(weights, specs, metadata={"format": "pt"}) as w:
        for m in targets:
            A, B = (t.to(tdtype) for t in delta_factors(src, init, m))
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise VerificationError(
                    f"{m}: the LoRA factors overflow {dtype}; export with --dtype float32 (or bfloat16)"
                )
            ka, kb = lora_keys(peft_name[m])
            w.write(ka, A)
            w.write(kb, B)
        w.commit()


def _peft_config(rank: int, names, base_id: str | None, revision: str | None) -> dict:
    """PEFT's adapter_config.json for the exported pair: rank 2r at alpha = rank (scale 1)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": names,
        "base_model_name_or_path": base_id,
        "revision": revision,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _verify(
    path: Path,
    src: MergedSource,
    init: SafetensorsFile,
    targets: list[str],
    peft_name: dict[str, str],
    dtype: torch.dtype,
    seed: int,
) -> tuple[float, float]:
    """Read the written file back and check B A x against Delta W x per module on random probes.

    Returns (max check error, max ||Delta W||_F / ||U S Vt||_F); raises VerificationError."""
    from safetensors import safe_open

    f = SafetensorsFile(path)
    with safe_open(path, framework="pt") as so:  # the reader PEFT uses must parse it too
        keys = set(so.keys())
    expected = {k for m in targets for k in lora_keys(peft_name[m])}
    if keys != expected:
        raise VerificationError(f"{path} holds other tensors than expected; export again")
    gen = torch.Generator().manual_seed(seed)
    tol = _tolerance(dtype)
    worst, max_rel = 0.0, 0.0
    for m in targets:
        ka, kb = lora_keys(peft_name[m])
        A, B = f.read_tensor(ka).double(), f.read_tensor(kb).double()
        new, old = src.factors(m), tuple(init.read_tensor(n) for n in factor_names(m))
        x = torch.randn(A.shape[1], PROBES, generator=gen, dtype=torch.float64)
        ref, scale = _delta_apply(new, old, x)
        err = float((B @ (A @ x) - ref).abs().max() / scale.clamp_min(torch.finfo(torch.float64).tiny))
        if not err <= tol:  # also catches NaN
            raise VerificationError(
                f"{m}: the written LoRA gives B A x off by {err:.2e} (relative) from Delta W x, above {tol:.0e}; "
                "export again, with --dtype float32 if a half dtype was asked for"
            )
        worst = max(worst, err)
        max_rel = max(max_rel, _relative_delta(new, old))
    return worst, max_rel


def _relative_delta(new: tuple[torch.Tensor, ...], old: tuple[torch.Tensor, ...]) -> float:
    """||U'S'Vt' - U S Vt||_F / ||U S Vt||_F through (2r x 2r) Gram matrices, never the dense delta:
    ||L R||_F^2 = sum((L^T L) * (R R^T))."""
    (U1, S1, V1), (U0, S0, V0) = ((t.double() for t in f) for f in (new, old))
    L, R = torch.cat([U1 * S1, -U0 * S0], dim=1), torch.cat([V1, V0], dim=0)
    delta2 = float(((L.T @ L) * (R @ R.T)).sum())
    base2 = float((((U0 * S0).T @ (U0 * S0)) * (V0 @ V0.T)).sum())
    return max(delta2, 0.0) ** 0.5 / max(base2, 1e-300) ** 0.5


LORA_FORMATS = ("peft", "gguf")


def export(
    directory: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    to: str = "peft",
    dtype: str | None = None,
    outtype: str | None = None,
    base: str | Path | None = None,
    force: bool = False,
):
    """`sorsa export-lora`: a PEFT LoRA dir (--to peft, export_lora) or a llama.cpp LoRA adapter
    GGUF (--to gguf, gguf_lora.export_lora_gguf); options of the other format are refused."""
    if to not in LORA_FORMATS:
        raise InputError(f"--to {to!r} is not one of {', '.join(LORA_FORMATS)}; pass --to peft or --to gguf")
    if to == "peft":
        for flag, value in (("--outtype", outtype), ("--base", base)):
            if value is not None:
                raise InputError(f"{flag} applies to --to gguf; a PEFT LoRA takes --dtype")
        return export_lora(directory, adapter, out, dtype=dtype or "float32", force=force)
    if dtype is not None:
        raise InputError(
            "--dtype applies to --to peft; for a GGUF adapter choose the tensor type with --outtype"
        )
    from sorsa_tools.gguf_lora import export_lora_gguf

    return export_lora_gguf(directory, adapter, out, outtype=outtype or "f16", base=base, force=force)
