"""QSORSA: quantize the residual W_r to NF4 or int8, and let the factors absorb what it loses.

`absorb` runs the QPiSSA / LoftQ alternation: start from the plain top-r SVD, then T times
`Q = quant(W - U diag(S) Vt)` and `U, S, Vt = top-r SVD of (W - dequant(Q))`. The factors then hold
the part of the quantization error that is low-rank, and `dequant(Q) + U diag(S) Vt` is closer to W
than `dequant(quant(W))` (QLoRA's base) is.

Quantizer, chosen on this evidence (2026-12, 2-core CPU, torch 2.13 CPU, transformers 5.25):

- **bitsandbytes 0.50** (`pip install bitsandbytes`) quantizes and dequantizes NF4 and int8 on
  the CPU (`functional.quantize_4bit` / `dequantize_4bit`, `int8_vectorwise_quant`): a 2048 x 2048
  NF4 round trip in 0.11 s. transformers 5.25 loads a pre-quantized bitsandbytes checkpoint on
  the CPU as it is (`from_pretrained` reads `quantization_config` from config.json and builds
  `Linear4bit` / `Linear8bitLt`): a tiny Llama saved by `save_pretrained` after
  `BitsAndBytesConfig(load_in_4bit=True)` on the CPU loaded back with identical logits. It is
  QLoRA's own quantizer, so a QSORSA residual is exactly what QLoRA's base would be.
- **torchao 0.18's NF4Tensor** (`to_nf4`, pure PyTorch, torchtune's choice) works on the CPU too,
  3x slower (0.30 s for the same round trip), has no serialization that transformers loads, and
  its NF4 is not bit-compatible with bitsandbytes' (max difference 0.021 on a weight of max 0.09:
  another scaler quantization). Not used.

The residual DIR therefore holds bitsandbytes' tensors under the names `save_pretrained` writes:
NF4 `M.weight` (uint8, two codes a byte, shape (numel/2, 1)), `M.weight.absmax`,
`M.weight.quant_map`, with double quantization `M.weight.nested_absmax` and
`M.weight.nested_quant_map`, and `M.weight.quant_state.bitsandbytes__nf4` (the packed JSON state);
int8 `M.weight` (int8), `M.SCB` (each row's absmax) and `M.weight_format`. One difference: the
packed JSON state is padded with spaces to `QUANT_STATE_BYTES`, so that every tensor's size is
known before it is computed (decompose streams the shard header first); JSON ignores the padding.
Per-format knowledge lives in `FORMATS`.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sorsa_tools.errors import InputError, MissingDependencyError, TargetError
from sorsa_tools.svd import Factors, residual

QUANT_STATE_BYTES = 256
NESTED_BLOCK = 256  # bitsandbytes' block for the double quantization of absmax
INSTALL = "pip install bitsandbytes"

Tensors = dict[str, torch.Tensor]  # suffix (after the module name) -> tensor
Spec = tuple[str, str, tuple[int, ...]]  # suffix, safetensors dtype code, shape


@dataclass(frozen=True)
class QuantSettings:
    """What a quantized decomposition was made with: recorded in sorsa_config.json and the job id."""

    format: str
    block_size: int | None
    double_quant: bool
    iters: int

    def as_json(self) -> dict:
        return {
            "format": self.format,
            "block_size": self.block_size,
            "double_quant": self.double_quant,
            "iters": self.iters,
            "library": "bitsandbytes",
        }

    @classmethod
    def from_json(cls, d: dict) -> QuantSettings:
        return cls(d["format"], d.get("block_size"), bool(d.get("double_quant")), int(d.get("iters", 1)))


def require_backend():
    """bitsandbytes, or MissingDependencyError naming the pip command (before any model loads)."""
    return _bnb()


def _bnb():
    """bitsandbytes.functional, imported with its import-time kernel-lookup warnings quieted (on a
    CPU with AVX512-BF16 it looks for an optional Hub kernel and logs when it cannot have it; its
    own CPU code is used then, which is what every number here was measured with)."""
    noisy = [logging.getLogger(n) for n in ("bitsandbytes", "kernels")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as F

        importlib.import_module("bitsandbytes.backends.cpu.ops")  # where the lookup runs, on first use
    except ImportError:
        raise MissingDependencyError(
            f"the quantized residual needs bitsandbytes, which is not installed: {INSTALL}"
        ) from None
    finally:
        for lg, lv in zip(noisy, levels, strict=True):
            lg.setLevel(lv)
    return F


# ---- NF4 ---------------------------------------------------------------------------------------


def _nf4_specs(shape: tuple[int, ...], s: QuantSettings) -> list[Spec]:
    n = shape[0] * shape[1]
    blocks = -(-n // s.block_size)
    specs: list[Spec] = [("weight", "U8", (n // 2, 1))]
    if s.double_quant:
        specs += [
            ("weight.absmax", "U8", (blocks,)),
            ("weight.nested_absmax", "F32", (-(-blocks // NESTED_BLOCK),)),
            ("weight.nested_quant_map", "F32", (256,)),
        ]
    else:
        specs.append(("weight.absmax", "F32", (blocks,)))
    return specs + [
        ("weight.quant_map", "F32", (16,)),
        ("weight.quant_state.bitsandbytes__nf4", "U8", (QUANT_STATE_BYTES,)),
    ]


def _nf4_quantize(W: torch.Tensor, s: QuantSettings) -> Tensors:
    F = _bnb()
    packed, state = F.quantize_4bit(
        W.contiguous(), blocksize=s.block_size, compress_statistics=s.double_quant, quant_type="nf4"
    )
    out = {"weight": packed}
    for k, v in state.as_dict(packed=True).items():
        if k.startswith("quant_state."):
            raw = bytes(v.tolist())
            if len(raw) > QUANT_STATE_BYTES:
                raise TargetError(f"bitsandbytes' packed state is {len(raw)} bytes, over {QUANT_STATE_BYTES}")
            v = torch.tensor(list(raw.ljust(QUANT_STATE_BYTES, b" ")), dtype=torch.uint8)
        out["weight." + k] = v.contiguous()
    return out


def _nf4_dequantize(t: Tensors, s: QuantSettings) -> torch.Tensor:
    F = _bnb()
    state = F.QuantState.from_dict(
        {k.removeprefix("weight."): v for k, v in t.items() if k != "weight"}, device=t["weight"].device
    )
    return F.dequantize_4bit(t["weight"], state)


def _nf4_hf(s: QuantSettings, compute_dtype: str, skip: list[str]) -> dict:
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": s.double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


# ---- int8 (LLM.int8's row-wise absmax) --------------------------------------------------------


def _int8_specs(shape: tuple[int, ...], s: QuantSettings) -> list[Spec]:
    return [("weight", "I8", tuple(shape)), ("SCB", "F32", (shape[0],)), ("weight_format", "U8", ())]


def _int8_quantize(W: torch.Tensor, s: QuantSettings) -> Tensors:
    F = _bnb()
    codes, scb, _ = F.int8_vectorwise_quant(W.to(torch.float16).contiguous())  # as Int8Params does
    return {"weight": codes, "SCB": scb.float(), "weight_format": torch.tensor(0, dtype=torch.uint8)}


def _int8_dequantize(t: Tensors, s: QuantSettings) -> torch.Tensor:
    return _bnb().int8_vectorwise_dequant(t["weight"], t["SCB"])


def _int8_hf(s: QuantSettings, compute_dtype: str, skip: list[str]) -> dict:
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": False,
        "load_in_8bit": True,
        "llm_int8_skip_modules": skip,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


@dataclass(frozen=True)
class QuantFormat:
    bits: int
    default_block_size: int | None
    block_sizes: tuple[int, ...]  # empty: the format has no block option (int8 is per row)
    specs: Callable[[tuple[int, ...], QuantSettings], list[Spec]]
    quantize: Callable[[torch.Tensor, QuantSettings], Tensors]
    dequantize: Callable[[Tensors, QuantSettings], torch.Tensor]
    hf_config: Callable[[QuantSettings, str, list[str]], dict]


FORMATS: dict[str, QuantFormat] = {
    "nf4": QuantFormat(
        4, 64, (32, 64, 128, 256, 512, 1024, 2048, 4096), _nf4_specs, _nf4_quantize, _nf4_dequantize, _nf4_hf
    ),
    "int8": QuantFormat(8, None, (), _int8_specs, _int8_quantize, _int8_dequantize, _int8_hf),
}


def settings(
    fmt: str, iters: int = 1, block_size: int | None = None, double_quant: bool = True
) -> QuantSettings:
    """Checked settings for `--quantize FMT`; the backend must import."""
    if fmt not in FORMATS:
        raise InputError(f"--quantize must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise InputError(f"--quant-iters must be 1 or more (QPiSSA's strong setting is 5), got {iters}")
    f = FORMATS[fmt]
    if block_size is not None and block_size not in f.block_sizes:
        allowed = ", ".join(map(str, f.block_sizes)) if f.block_sizes else "none (it scales each row)"
        raise InputError(f"--quant-block-size {block_size} does not apply to {fmt}; allowed: {allowed}")
    _bnb()
    return QuantSettings(fmt, block_size or f.default_block_size, bool(double_quant) and fmt == "nf4", iters)


def check_shape(module: str, shape: tuple[int, ...], s: QuantSettings) -> None:
    """A weight whose size the block does not divide is refused by name (NF4 packs whole blocks)."""
    n = shape[0] * shape[1]
    if s.block_size and n % s.block_size:
        raise TargetError(
            f"{module} ({shape[0]}x{shape[1]} = {n} values) does not split into {s.format} blocks of "
            f"{s.block_size}; pass a --quant-block-size that divides it, or leave it out with --targets"
        )


def specs(shape: tuple[int, ...], s: QuantSettings) -> list[Spec]:
    return FORMATS[s.format].specs(tuple(shape), s)


def quantize(W: torch.Tensor, s: QuantSettings) -> Tensors:
    """W (out, in), in the dtype the residual is kept in, to the format's tensors (on the CPU), in
    the order and with the dtypes and shapes of `specs` (what the shard header announced)."""
    from sorsa_tools.io.safetensors_file import DTYPE_CODES

    t = FORMATS[s.format].quantize(W.cpu(), s)
    out = {}
    for suffix, code, shape in specs(tuple(W.shape), s):
        got = t.get(suffix)
        if got is None or DTYPE_CODES[got.dtype] != code or tuple(got.shape) != tuple(shape):
            raise TargetError(
                f"bitsandbytes gave {suffix} as {None if got is None else (got.dtype, tuple(got.shape))}, "
                f"not {code} {shape}: this bitsandbytes version writes another layout; report it"
            )
        out[suffix] = got.contiguous()
    return out


def dequantize(t: Tensors, s: QuantSettings) -> torch.Tensor:
    """The weight the quantized tensors stand for, in the dtype it was quantized from (int8: fp16)."""
    return FORMATS[s.format].dequantize(t, s)


def hf_quantization_config(s: QuantSettings, compute_dtype: str, skip: list[str]) -> dict:
    """config.json's `quantization_config`: what transformers reads to load the residual quantized."""
    return FORMATS[s.format].hf_config(s, compute_dtype, skip)


def packed_state_json(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.tolist()).decode())


@dataclass
class Absorbed:
    factors: Factors
    tensors: Tensors
    dequantized: torch.Tensor  # dequant(Q) in the compute dtype
    errors: list[float]  # ||W - dequant(Q) - U S Vt||_F / ||W||_F after each iteration


def absorb(
    W: torch.Tensor,
    s: QuantSettings,
    store_dtype: torch.dtype,
    svd: Callable[[torch.Tensor], Factors],
    round_factors: Callable[[Factors], Factors] = lambda f: f,
) -> Absorbed:
    """The alternation: plain SVD, then `iters` times quantize the residual and re-fit the factors
    to what the quantizer left (W - dequant(Q)). `round_factors` rounds them to their storage
    dtype, so the residual is formed from the factors as stored."""
    norm = float(torch.linalg.matrix_norm(W))
    f = round_factors(svd(W))
    errors = []
    for _ in range(s.iters):
        t = quantize(residual(W, f).to(store_dtype), s)
        D = dequantize(t, s).to(device=W.device, dtype=W.dtype)
        f = round_factors(svd(W - D))
        errors.append(float(torch.linalg.matrix_norm(residual(W - D, f))) / max(norm, 1e-30))
    return Absorbed(f, t, D, errors)


def qlora_error(W: torch.Tensor, s: QuantSettings, store_dtype: torch.dtype) -> torch.Tensor:
    """W - dequant(quant(W)): QLoRA's base error, against which the reduction is measured."""
    return W - dequantize(quantize(W.to(store_dtype), s), s).to(device=W.device, dtype=W.dtype)


def nuclear(t: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(t.double() if t.dtype == torch.float64 else t.float()).sum())


def error_reduction(
    err: torch.Tensor, base_err: torch.Tensor, norm: Callable[[torch.Tensor], float]
) -> float:
    """The PiSSA paper's `1 - ||W - (dequant(Q) + U S Vt)|| / ||W - dequant(quant(W))||` (nuclear
    norm there; QLoRA is 0 by definition)."""
    return 1.0 - norm(err) / max(norm(base_err), 1e-30)
