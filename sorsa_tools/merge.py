"""`sorsa merge`: fold W = W_r + U diag(S) Vt back into dense weights (zero inference latency).

`--to hf` streams the residual checkpoint of DIR shard by shard and tensor by tensor: each target
weight is folded in float32 and cast once to the output dtype; every other tensor is copied byte
for byte (or cast, when a different --dtype is asked). Shard names, the index json, config,
tokenizer and generation files carry over, so the result loads with `from_pretrained`. The whole
output is built in a hidden temp directory beside OUT, read back and checked, then renamed into
place: an interrupted merge leaves nothing under OUT's name. `--to gguf` hands the same merged
stream to gguf_export.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from sorsa_tools.errors import DiskFullError, InputError, OutputDirError, VerificationError
from sorsa_tools.format import CHECKSUMS, checksums
from sorsa_tools.hub import CARD_FILE, write_card
from sorsa_tools.io.checkpoint import INDEX_NAME, open_checkpoint
from sorsa_tools.io.placement import remove_stale_temps, swap_dir_into_place
from sorsa_tools.io.safetensors_file import (
    DTYPE_CODES,
    DTYPES,
    ITEMSIZE,
    SafetensorsFile,
    StreamWriter,
    atomic_write_json,
    check_own_output,
    check_read_back,
    check_replaceable,
    copy_side_file,
)
from sorsa_tools.source import PROVENANCE_FILE, MergedSource, provenance
from sorsa_tools.svd import Factors, reconstruction_probe

OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TARGETS = ("hf", "gguf")

ProgressFn = Callable[[str, int, int], None]


@dataclass
class MergeResult:
    out: Path
    to: str
    modules: int
    tensors: int
    bytes_written: int
    seconds: float
    dtype: str
    max_fold_error: float | None = None
    adapter: str = "untrained"
    outtype: str | None = None
    files: list[Path] | None = None
    warnings: list[str] | None = None


def merge(
    directory: str | Path,
    output: str | Path,
    *,
    adapter: str | Path | None = None,
    to: str = "hf",
    dtype: str | None = None,
    outtype: str | None = None,
    split_max_size: int | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> MergeResult:
    """Fold DIR's residual + adapter (RUN's, or DIR's own untrained one) into OUT.

    `to="hf"` writes an HF checkpoint in `dtype` (default: the residual dtype);
    `to="gguf"` writes a GGUF file of `outtype` (default f16; gguf_export.py).
    """
    if to not in TARGETS:
        raise InputError(f"--to {to!r} is not one of {', '.join(TARGETS)}; pass --to hf or --to gguf")
    if to == "hf" and outtype is not None:
        raise InputError("--outtype applies to --to gguf; for an HF checkpoint choose the dtype with --dtype")
    source = MergedSource(directory, adapter)
    if to == "gguf":
        if dtype is not None:
            raise InputError("--dtype applies to --to hf; for GGUF choose the tensor type with --outtype")
        from sorsa_tools.gguf_export import export_gguf

        t0 = time.perf_counter()
        r = export_gguf(
            source,
            output,
            outtype or "f16",
            split_max_size=split_max_size,
            force=force,
            provenance=provenance(source),
            progress=progress,
        )
        files = list(r.paths)
        return MergeResult(
            Path(output),
            "gguf",
            len(source.targets),
            r.tensor_count,
            r.bytes,
            time.perf_counter() - t0,
            r.outtype,
            adapter=_adapter_kind(source),
            outtype=r.outtype,
            files=files,
            warnings=list(r.warnings),
        )
    if split_max_size is not None:
        raise InputError("--split-max-size applies to --to gguf; an HF merge keeps DIR's shard layout")
    return merge_to_hf(source, output, dtype=dtype, force=force, progress=progress)


def _adapter_kind(source: MergedSource) -> str:
    return "trained" if (source.adapter_config or {}).get("kind") == "trained" else "untrained"


def _out_dtype(source: MergedSource, dtype: str | None) -> dict[str, torch.dtype]:
    """Output dtype per tensor: --dtype for every floating tensor, else each target's residual dtype."""
    if dtype is not None and dtype not in OUT_DTYPES:
        raise InputError(f"--dtype {dtype!r} is not one of {', '.join(OUT_DTYPES)}; pick one of those")
    out = {}
    for info in source.infos():
        d = DTYPES.get(info.dtype)
        if dtype is not None and d is not None and d.is_floating_point:
            d = OUT_DTYPES[dtype]
        if d is None:
            raise InputError(
                f"{info.name} has dtype {info.dtype}, which merge cannot carry; report this model"
            )
        out[info.name] = d
    return out


def _prepare_out(out: Path, source: MergedSource, force: bool) -> Path:
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputDirError(f"{out} already exists; choose a new -o, or pass --force to replace it")
        check_replaceable(out, [source.root] + ([source.adapter_dir] if source.adapter_dir else []))
        check_own_output(out, PROVENANCE_FILE, "a merged checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent, out.name + ".")  # what a killed merge was writing or replacing
    return out.parent / f".{out.name}.merge-{os.getpid()}"


def merge_to_hf(
    source: MergedSource,
    output: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> MergeResult:
    """Write the dense HF checkpoint of `source`; see the module docstring."""
    t0 = time.perf_counter()
    out = Path(output).expanduser()
    dtypes = _out_dtype(source, dtype)
    infos = list(source.infos())
    total = sum(i.numel * ITEMSIZE[DTYPE_CODES[dtypes[i.name]]] for i in infos)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if total > free:
        raise DiskFullError(
            f"{out} needs about {total / 1e9:.1f} GB but only {free / 1e9:.1f} GB is free there; "
            "free space or choose another -o"
        )
    tmp = _prepare_out(out, source, force)
    source.verify_residual()
    ckpt = source.checkpoint
    max_err = 0.0
    done = 0

    def work(name: str, t: torch.Tensor, raw) -> tuple[torch.Tensor, float | None]:
        """On the fold thread: round once to the output dtype, check a targets' fold on sampled rows."""
        out_t = t if t.dtype == dtypes[name] else t.to(dtypes[name])
        return out_t, (_check_fold(name, out_t, raw) if raw[1] is not None else None)

    verify = ThreadPoolExecutor(1, thread_name_prefix="sorsa-verify")
    stream = None
    try:
        tmp.mkdir()
        stream = source.pipeline([i.name for i in infos], work, lookahead=4)
        for shard in ckpt.shards:
            infos_here = source.shard_infos(shard)
            specs = [(i.name, DTYPE_CODES[dtypes[i.name]], i.shape) for i in infos_here]
            with StreamWriter(tmp / shard.path.name, specs, shard.metadata) as w:
                checks = []
                for info in infos_here:
                    t, err = next(stream)
                    w.write(info.name, t)
                    w.flush()
                    checks.append(verify.submit(check_read_back, w.tmp, *w.span(info.name), t, info.name))
                    if err is not None:
                        max_err = max(max_err, err)
                    done += t.numel() * t.element_size()
                    if progress:
                        progress(info.name, done, total)
                for c in checks:  # every tensor read back before the shard goes into place
                    c.result()
                w.commit()
        stream.close()
        _write_side_files(source, tmp, dtype, out.name)
        _check_output(source, tmp, dtypes)
        swap_dir_into_place(tmp, out)
    except BaseException:
        if stream is not None:
            stream.close()  # now, not whenever the garbage collector gets to it
        verify.shutdown(cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    verify.shutdown()
    return MergeResult(
        out,
        "hf",
        len(source.targets),
        len(infos),
        total,
        time.perf_counter() - t0,
        dtype or _dtype_label(source),
        max_fold_error=max_err if source.targets else None,
        adapter=_adapter_kind(source),
        files=sorted(out.iterdir()),
    )


def _dtype_label(source: MergedSource) -> str:
    names = {str(source.dtype(m + ".weight")).removeprefix("torch.") for m in source.targets}
    return ", ".join(sorted(names)) or "as stored"


def _check_fold(name: str, W: torch.Tensor, raw) -> float:
    """W x == W_r x + U (S * (Vt x)) on 64 sampled rows and random x, within W's rounding."""
    W_r, (U, S, Vt) = raw
    err, _ = reconstruction_probe(W, W_r, Factors(U, S, Vt), probes=4, rows=64)
    tol = torch.finfo(W.dtype).eps + 2e-5
    if not err <= tol:  # also catches NaN
        raise VerificationError(
            f"{name}: merged weight differs from W_r + U diag(S) Vt by {err:.2e} (tolerance {tol:.1e}); "
            "the adapter may hold non-finite values, check it with `sorsa inspect`"
        )
    return err


def _write_side_files(source: MergedSource, tmp: Path, dtype: str | None, out_name: str) -> None:
    ckpt = source.checkpoint
    if ckpt.index is not None:
        written = [SafetensorsFile(tmp / s.path.name) for s in ckpt.shards]
        index = dict(ckpt.index)
        index["metadata"] = {
            **(index.get("metadata") or {}),
            "total_size": sum(f.size - f.data_start for f in written),
        }
        if source.quantization is not None:  # the quantizer's tensors are gone: list what was written
            index["weight_map"] = {n: f.path.name for f in written for n in f.tensors}
        atomic_write_json(tmp / INDEX_NAME, index)
    for p in ckpt.side_files():
        if p.name in (PROVENANCE_FILE, CARD_FILE):  # the base model's card does not describe this one
            continue
        if p.name == "config.json" and (dtype is not None or source.quantization is not None):
            cfg = json.loads(p.read_text())
            cfg.pop("quantization_config", None)  # merged weights are dense
            for key in ("torch_dtype", "dtype"):
                if dtype is not None and (key in cfg or key == "dtype"):
                    cfg[key] = dtype
            atomic_write_json(tmp / p.name, cfg)
        else:
            copy_side_file(p, tmp / p.name)
    files = sorted({p.name for p in tmp.iterdir()} | {PROVENANCE_FILE, CARD_FILE})  # what --force may replace
    sums = checksums(tmp, [s.path.name for s in ckpt.shards])
    atomic_write_json(tmp / PROVENANCE_FILE, {**provenance(source), "files": files, CHECKSUMS: sums})
    write_card(tmp, out_name)


def _check_output(source: MergedSource, tmp: Path, dtypes: dict[str, torch.dtype]) -> None:
    """The written directory opens as a checkpoint with every tensor, shape and dtype expected."""
    ckpt = open_checkpoint(tmp)
    want = {i.name: (DTYPE_CODES[dtypes[i.name]], i.shape) for i in source.infos()}
    got = {i.name: (i.dtype, i.shape) for s in ckpt.shards for i in s.tensors.values()}
    if want != got:
        missing = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        raise VerificationError(f"the merged checkpoint does not list {missing[0]} as expected; run again")
