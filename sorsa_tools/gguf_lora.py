"""`sorsa export-lora --to gguf`: a trained run as a llama.cpp LoRA adapter for the ORIGINAL base GGUF.

The factors are the PEFT export's (lora_export.delta_factors: B A = U'S'Vt' - U S Vt exactly, rank
2r), named and laid out as llama.cpp's convert_lora_to_gguf.py writes them: general.type = adapter,
adapter.type = lora, adapter.lora.alpha = 2r (llama.cpp scales by alpha / rank = 1), and per module
`blk.N.attn_q.weight.lora_a` (2r x in) and `.lora_b` (out x 2r). B's rows take the same row maps
as the base GGUF's weight rows (q/k reorder for LLM_ARCH_LLAMA, a folded query scale), so that
llama.cpp's W x + B (A x) is the trained model. The file grows under a temp name, is read back
and checked on random probes against Delta W, and only then renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from sorsa_tools import __version__
from sorsa_tools.errors import ExportError, InputError, ModelMismatchError, VerificationError
from sorsa_tools.format import ADAPTER_FILE, factor_names
from sorsa_tools.gguf_export import (
    PROVENANCE_KEY,
    WRITER_KEY,
    _check_out,
    _encode,
    _existing_outputs,
    _Model,
    _model,
    _Planned,
    _write_out,
    _Writer,
    chain,
    gguf_name,
    read_layout,
    row_maps,
)
from sorsa_tools.gguf_tables import LORA_OUTTYPES, OUTTYPES, QUANT_FALLBACK
from sorsa_tools.io.placement import mark_complete, remove_stale_temps
from sorsa_tools.io.safetensors_file import SafetensorsFile
from sorsa_tools.lora_export import PROBES, _delta_apply, delta_factors, quantization_gap, trained_source
from sorsa_tools.source import MergedSource, provenance

T = gguf.GGMLQuantizationType
WRITER = "`sorsa export-lora --to gguf`"


@dataclass
class LoraGGUFResult:
    """What export_lora_gguf wrote."""

    path: Path
    arch: str
    rank: int  # the LoRA's r = 2 x the SORSA rank
    sorsa_rank: int
    modules: int
    outtype: str
    bytes: int
    base_checked: Path | None  # the base GGUF checked against (architecture, names, shapes)
    max_check_error: float  # max |B A x - Delta W x| / max(|U'S'Vt' x|, |U S Vt x|) over probes
    seconds: float
    warnings: list[str] = field(default_factory=list)
    quantization_gap: dict | None = None  # QSORSA: lora_export.quantization_gap


@dataclass
class _Module:
    module: str  # checkpoint module name
    gname: str  # the base GGUF's weight name
    shape: tuple[int, int]  # (out, in)
    rows: object  # the row maps of that weight (None: rows as in the checkpoint)


def lora_outtype(outtype: str):
    """The OutType of a LoRA adapter: llama.cpp's converter takes f32, f16, bf16, q8_0."""
    ot = str(outtype).lower()
    if ot not in LORA_OUTTYPES:
        raise ExportError(
            f"--outtype {outtype!r} is not one llama.cpp takes for a LoRA adapter; pick one of "
            f"{', '.join(LORA_OUTTYPES)}"
        )
    return OUTTYPES[ot]


def _modules(src: MergedSource, m: _Model) -> list[_Module]:
    tmap = gguf.get_tensor_name_map(m.spec.gguf_arch, m.n_layer)
    out = []
    for mod in src.targets:
        gname = gguf_name(m, tmap, mod + ".weight", src.config.get("model_type"))
        if gname is None:  # a head tied to token_embd (train refuses it as a target)
            raise ExportError(
                f"{mod} has no weight of its own in llama.cpp's {m.arch}; it cannot take a LoRA"
            )
        shape = tuple(src.info(mod + ".weight").shape)
        out.append(_Module(mod, gname, shape, chain(row_maps(m, gname))))  # type: ignore[arg-type]
    return out


def _parts(path: Path, kv: dict) -> list[Path]:
    """All files of a split GGUF given its first (llama.cpp's -0000i-of-0000N names)."""
    n = int(kv.get("split.count") or 1)  # type: ignore[call-overload]
    if n <= 1:
        return [path]
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", path.stem)
    return [path.with_name(gguf.gguf_writer.SHARD_NAME_FORMAT.format(stem, i + 1, n)) for i in range(n)]


def check_base(base: str | Path, m: _Model, modules: list[_Module], d: Path) -> Path:
    """Refuse a base GGUF the adapter cannot apply to, before anything is written: another
    architecture, an adapter, a merged fine-tune, or weights missing or of other shapes."""
    p = Path(base).expanduser()
    fix = f"pass the GGUF of the model {d} was decomposed from (`sorsa merge {d} --to gguf`)"
    if not p.is_file():
        raise InputError(f"--base {p}: no such file; {fix}")
    try:
        kv, tensors = read_layout(p)
        for part in _parts(p, kv)[1:]:
            tensors.update(read_layout(part)[1])
    except VerificationError:  # read_layout's "not a valid GGUF file"
        raise InputError(f"--base {p} is not a readable GGUF file; {fix}") from None
    except FileNotFoundError as e:
        raise InputError(f"--base {p} is split and {Path(e.filename).name} is missing; {fix}") from None
    if kv.get("general.type") == "adapter":
        raise InputError(f"--base {p} is itself an adapter, not a model; {fix}")
    arch = kv.get("general.architecture")
    if arch != m.arch:
        raise ModelMismatchError(f"--base {p} is a {arch} model, this adapter is for {m.arch}; {fix}")
    prov = kv.get(PROVENANCE_KEY)
    if isinstance(prov, str) and (json.loads(prov).get("adapter") or "") == "trained":
        raise ModelMismatchError(
            f"--base {p} is a merged fine-tune (its sorsa.provenance says trained), not the original model; {fix}"
        )
    for mod in modules:
        t = tensors.get(mod.gname)
        if t is None:
            raise ModelMismatchError(f"--base {p} has no {mod.gname}, which the adapter changes; {fix}")
        if t.shape != mod.shape:
            raise ModelMismatchError(
                f"--base {p}: {mod.gname} is {list(t.shape)}, the adapter's is {list(mod.shape)}; {fix}"
            )
    return p


def _qtype(shape: tuple[int, ...], weight_type: T) -> T:
    """The converter's rule: a quant where rows split into whole blocks, else F16."""
    block = gguf.GGML_QUANT_SIZES[weight_type][0]
    return weight_type if shape[-1] % block == 0 else QUANT_FALLBACK


def export_lora_gguf(
    directory: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    outtype: str = "f16",
    base: str | Path | None = None,
    force: bool = False,
    seed: int = 0,
) -> LoraGGUFResult:
    """Write RUN's training as a llama.cpp LoRA adapter GGUF (rank 2r, scale 1) for the GGUF of
    DIR's original model; `base`: that GGUF, checked (architecture, tensor names, shapes) first."""
    t0 = time.perf_counter()
    ot = lora_outtype(outtype)
    d, run, out = (Path(p).expanduser() for p in (directory, adapter, out))
    if out.suffix != ".gguf":
        raise ExportError(f"{out} does not end in .gguf; name the adapter file NAME.gguf")
    if out.is_dir():
        raise ExportError(f"{out} is a directory; give a file path ending in .gguf")

    def check_out() -> None:
        remove_stale_temps(out.parent, out.stem)  # what a killed export of this name was writing
        _check_out(out, force, _existing_outputs(out), WRITER, "adapter")

    src = trained_source(d, run, check_out)
    m = _model(src)
    modules = _modules(src, m)
    base_path = check_base(base, m, modules, d) if base is not None else None
    r = int(src.decomposition["rank"])
    warnings: list[str] = []
    plans: list[_Planned] = []
    for mod in modules:
        out_f, in_f = mod.shape
        for suffix, shape in ((".lora_a", (2 * r, in_f)), (".lora_b", (out_f, 2 * r))):
            qt = _qtype(shape, ot.weight_type)  # type: ignore[arg-type]
            plans.append(_Planned(mod.gname + suffix, shape, qt, mod.module))
    fell_back = [p.name for p in plans if ot.weight_type != T.F32 and p.qtype != ot.weight_type]
    if fell_back:
        warnings.append(
            f"{len(fell_back)} tensors (e.g. {fell_back[0]}) have rows that do not split into "
            f"{ot.weight_type.name} blocks; written as {QUANT_FALLBACK.name}, as llama.cpp's converter does"
        )

    w = _Writer(out, arch=m.arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_name(run.resolve().name)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(2 * r))
    w.add_file_type(ot.file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string(WRITER_KEY, f"sorsa-tools {__version__}")
    prov = provenance(src)
    prov["export"] = {"format": "llama.cpp-lora", "lora_rank": 2 * r, "lora_alpha": 2 * r, "outtype": ot.name}
    w.add_string(PROVENANCE_KEY, json.dumps(prov, sort_keys=True))
    for p in plans:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    init = SafetensorsFile(d / ADAPTER_FILE)

    def blocks():
        for i, mod in enumerate(modules):
            A, B = delta_factors(src, init, mod.module)
            if mod.rows is not None:
                B = mod.rows(B)  # type: ignore[operator]
            for t, p in ((A, plans[2 * i]), (B, plans[2 * i + 1])):
                yield _encode(t, p.qtype)

    temps = _write_out(w, out, blocks())
    try:
        err = _verify(temps[0], plans, modules, src, init, seed)
        _check_out(out, force, _existing_outputs(out), WRITER, "adapter")  # appeared meanwhile?
        os.replace(temps[0], out)
    except BaseException:
        temps[0].unlink(missing_ok=True)
        raise
    mark_complete(out)
    return LoraGGUFResult(
        path=out,
        arch=m.arch,
        rank=2 * r,
        sorsa_rank=r,
        modules=len(modules),
        outtype=ot.name,
        bytes=out.stat().st_size,
        base_checked=base_path,
        max_check_error=err,
        seconds=time.perf_counter() - t0,
        warnings=warnings,
        quantization_gap=quantization_gap(src.decomposition),
    )


def _decode(path: Path, t, qtype: T) -> torch.Tensor:
    """A tensor of the file back in float32 (dequantized where stored as a quant)."""
    raw = np.fromfile(path, dtype=np.uint8, count=t.nbytes, offset=t.offset)
    if qtype == T.F32:
        a = raw.view(np.float32)
    elif qtype == T.F16:
        a = raw.view(np.float16).astype(np.float32)
    elif qtype == T.BF16:
        a = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        a = gguf.quants.dequantize(raw.reshape(t.shape[0], -1), qtype)
    return torch.from_numpy(np.ascontiguousarray(a).reshape(t.shape))


# read-back bound per storage type: float32 rounding, half precision, or Q8_0's 8-bit blocks
_TOLERANCE = {T.F32: 1e-5, T.F16: 8 * 2**-10, T.BF16: 8 * 2**-7, T.Q8_0: 0.05}


def _verify(
    path: Path,
    plans: list[_Planned],
    modules: list[_Module],
    src: MergedSource,
    init: SafetensorsFile,
    seed: int,
) -> float:
    """The file read back: an adapter of this architecture with every planned tensor, and per
    module B (A x) equal to the row-mapped Delta W x on random probes, within the storage's rounding."""
    kv, found = read_layout(path)
    if kv.get("general.type") != "adapter" or kv.get(gguf.Keys.Adapter.TYPE) != "lora":
        raise VerificationError(f"{path} read back without its adapter metadata; export again")
    want = {p.name: p for p in plans}
    if set(found) != set(want) or any(
        found[n].shape != p.shape or found[n].qtype != p.qtype for n, p in want.items()
    ):
        raise VerificationError(f"{path} read back with other tensors than written; export again")
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for mod in modules:
        a, b = (found[mod.gname + s] for s in (".lora_a", ".lora_b"))
        A, B = _decode(path, a, a.qtype).double(), _decode(path, b, b.qtype).double()
        new = src.factors(mod.module)
        old = tuple(init.read_tensor(n) for n in factor_names(mod.module))
        x = torch.randn(A.shape[1], PROBES, generator=gen, dtype=torch.float64)
        ref, scale = _delta_apply(new, old, x)
        if mod.rows is not None:
            ref = mod.rows(ref)  # type: ignore[operator]
        e = float((B @ (A @ x) - ref).abs().max() / scale.clamp_min(torch.finfo(torch.float64).tiny))
        if not e <= max(_TOLERANCE[a.qtype], _TOLERANCE[b.qtype]):  # also catches NaN
            raise VerificationError(
                f"{mod.gname}: the written adapter gives B A x off by {e:.2e} (relative) from Delta W x; "
                "export again, with --outtype f32 if a smaller type was asked for"
            )
        worst = max(worst, e)
    return worst
