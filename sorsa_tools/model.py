"""Load a decomposed checkpoint as a trainable SORSA model, and read adapters back out.

Shared by train, eval and analyze: the residual model is an ordinary HF model whose target
linears are swapped for SORSALinear layers holding the adapter's U, S, Vt.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sorsa_tools.arch import live_module_name
from sorsa_tools.errors import AdapterMismatchError, InputError, NotDecomposedError
from sorsa_tools.format import ADAPTER_FILE, CONFIG_FILE, factor_names, read_config, verify_checksums
from sorsa_tools.io.checkpoint import open_checkpoint
from sorsa_tools.io.safetensors_file import SafetensorsFile
from sorsa_tools.layer import SORSALinear
from sorsa_tools.svd import require_finite


def read_decomposition(directory: str | Path) -> dict:
    """sorsa_config.json of a decomposed dir (not a trained run), with its adapter present."""
    d = Path(directory).expanduser()
    cfg = read_config(d)
    if cfg.get("kind") == "trained":
        origin = (cfg.get("decomposition") or {}).get("path") or "the decomposed dir it was trained on"
        raise NotDecomposedError(
            f"{d} is a trained run, not a decomposition; pass its DIR ({origin}) and the run as --adapter"
        )
    if cfg.get("kind") != "decomposition":
        raise NotDecomposedError(
            f"{d} is not a decomposition (kind {cfg.get('kind', 'unknown')!r}); pass the output of `sorsa decompose`"
        )
    if not (d / ADAPTER_FILE).is_file():
        raise NotDecomposedError(f"{d} lacks {ADAPTER_FILE}; re-run `sorsa decompose`")
    return cfg


def fingerprint(cfg: dict) -> str | None:
    """The decomposition an adapter belongs to: a decomposed dir's job id, or the one a run records."""
    if cfg.get("kind") == "decomposition":
        return cfg.get("job_id")
    return (cfg.get("decomposition") or {}).get("job_id")


def check_adapter(decomp_cfg: dict, adapter_dir: str | Path) -> dict:
    """The config of adapter_dir, refused unless it was trained from this decomposition."""
    a = Path(adapter_dir).expanduser()
    acfg = read_config(a, "a `sorsa train` run")
    if not (a / ADAPTER_FILE).is_file():
        raise NotDecomposedError(f"{a} lacks {ADAPTER_FILE}; pass a finished `sorsa train` output")
    if fingerprint(acfg) != decomp_cfg.get("job_id"):
        origin = (acfg.get("decomposition") or {}).get("path")
        raise AdapterMismatchError(
            f"the adapter in {a} was trained on another decomposition (job id {str(fingerprint(acfg))[:12]}"
            + (f", {origin}" if origin else "")
            + f"; this DIR's is {str(decomp_cfg.get('job_id'))[:12]}): pass the DIR it was trained on"
        )
    if acfg.get("target_modules") != decomp_cfg.get("target_modules") or acfg.get("rank") != decomp_cfg.get(
        "rank"
    ):
        raise AdapterMismatchError(
            f"the adapter in {a} has other modules or rank than the decomposition; re-train it"
        )
    return acfg


ADAPTER_NOT_FINITE = (
    "the adapter is corrupt or was saved from a diverged run; use an earlier one (RUN/steps/) or train again"
)


def read_adapter(
    directory: str | Path, modules: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{module: (U, S, Vt)} from directory/sorsa_adapter.safetensors, one tensor at a time."""
    d = Path(directory).expanduser()
    if (d / CONFIG_FILE).is_file():  # a run or decomposition (a checkpoint/ has no config)
        verify_checksums(d, read_config(d), [ADAPTER_FILE])
    f = SafetensorsFile(d / ADAPTER_FILE)
    out = {}
    for m in modules:
        names = factor_names(m)
        missing = [n for n in names if n not in f]
        if missing:
            raise NotDecomposedError(f"{f.path} lacks {missing[0]}; re-create the adapter")
        out[m] = read_factors(f, m)
    return out


def read_factors(f: SafetensorsFile, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vt) of one module from an adapter file, refused by name if any holds NaN or inf."""
    out = tuple(f.read_tensor(n) for n in factor_names(module))
    for n, t in zip(factor_names(module), out, strict=True):
        require_finite(t, f"{f.path}: {n}", ADAPTER_NOT_FINITE)
    return out  # type: ignore[return-value]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def attach_sorsa(
    model: nn.Module,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    factor_dtype: torch.dtype = torch.float32,
    quantized: dict | None = None,
) -> dict[str, SORSALinear]:
    """Replace each target nn.Linear (holding W_r) by a SORSALinear with the given factors.
    `quantized` ({module: qresidual.QuantizedResidual}): W_r comes from there, kept quantized."""
    layers = {}
    live = dict(model.named_modules())
    for m, (U, S, Vt) in factors.items():  # keyed by checkpoint names, as the adapter file is
        name = live_module_name(m, live)
        if name is None:
            raise NotDecomposedError(f"the model has no module {m}; the adapter belongs to another model")
        lin = live[name]
        if quantized is not None:
            layers[m] = _attach_quantized(model, name, lin, quantized[m], (U, S, Vt), factor_dtype)
            continue
        if not isinstance(lin, nn.Linear) or tuple(lin.weight.shape) != (U.shape[0], Vt.shape[1]):
            raise AdapterMismatchError(
                f"{m}: adapter shapes {tuple(U.shape)}/{tuple(Vt.shape)} do not fit {type(lin).__name__} "
                f"{tuple(getattr(lin, 'weight', torch.empty(0)).shape)}; the adapter belongs to another model"
            )
        layer = SORSALinear.from_linear(lin, U, S, Vt, factor_dtype)
        parent, child = _parent(model, name)
        setattr(parent, child, layer)
        layers[m] = layer
    return layers


def _attach_quantized(model, name, lin, qres, factors, factor_dtype) -> SORSALinear:
    """A SORSALinear over a quantized W_r in place of transformers' bitsandbytes linear."""
    U, S, Vt = factors
    if (getattr(lin, "out_features", None), getattr(lin, "in_features", None)) != tuple(
        qres.shape
    ) or qres.shape != (
        U.shape[0],
        Vt.shape[1],
    ):
        raise AdapterMismatchError(
            f"{name}: the quantized residual {qres.shape} does not fit the adapter or the model; re-decompose"
        )
    bias = None if getattr(lin, "bias", None) is None else lin.bias.data
    layer = SORSALinear.from_quantized(qres, U, S, Vt, bias, factor_dtype)
    parent, child = _parent(model, name)
    setattr(parent, child, layer)
    return layer


def check_quantized_options(d: Path, cfg: dict, offload_residual: bool) -> None:
    """Options that cannot apply to a quantized residual, and a missing bitsandbytes, refused
    before anything is written."""
    if not cfg.get("quantization"):
        return
    from sorsa_tools import quantize as qz

    qz.require_backend()
    if offload_residual:
        raise InputError(
            f"--offload-residual does not apply to {d}: its residual is quantized "
            f"({cfg['quantization']['format']}) and stays on the device; drop the flag"
        )


def _quantized_residuals(d: Path, cfg: dict) -> dict | None:
    """{module: QuantizedResidual} of a `decompose --quantize` DIR, read as stored; None otherwise."""
    if not cfg.get("quantization"):
        return None
    from sorsa_tools import quantize as qz
    from sorsa_tools.qresidual import QuantizedResidual, read_quantized

    qz.require_backend()  # also quiets its import-time kernel lookup before transformers imports it
    s = qz.QuantSettings.from_json(cfg["quantization"])
    ckpt = open_checkpoint(d)
    shapes = {m: tuple(cfg["modules"][m]["shape"]) for m in cfg["target_modules"]}
    return {m: QuantizedResidual(read_quantized(ckpt, m, shapes[m], s), s, shapes[m]) for m in shapes}


def load_sorsa_model(
    directory: str | Path,
    adapter: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    factor_dtype: torch.dtype = torch.float32,
    trainable: bool = False,
    offload_residual: bool = False,
) -> tuple[nn.Module, dict[str, SORSALinear], dict]:
    """The residual model of a decomposed dir with SORSA layers from its own adapter or `adapter`.

    Every base parameter is frozen; with `trainable` the factors require grad. With
    `offload_residual` every W_r stays in (pinned) host memory and is streamed to `device` when a
    layer needs it (offload.py). Returns (model, {module: layer}, the adapter's config).
    """
    from transformers import AutoModelForCausalLM

    d = Path(directory).expanduser()
    cfg = read_decomposition(d)
    acfg = check_adapter(cfg, adapter) if adapter is not None else cfg
    src = Path(adapter).expanduser() if adapter is not None else d
    open_checkpoint(d)  # every shard's header and size checked: one line, not the loader's traceback
    check_quantized_options(d, cfg, offload_residual)
    quantized = _quantized_residuals(d, cfg)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    model.requires_grad_(False)
    layers = attach_sorsa(model, read_adapter(src, cfg["target_modules"]), factor_dtype, quantized)
    if offload_residual:
        from sorsa_tools.offload import ResidualStore

        ResidualStore(list(layers.values()), torch.device(device))
    model.to(device)
    for layer in layers.values():
        for p in (layer.sorsa_U, layer.sorsa_S, layer.sorsa_Vt):
            p.requires_grad_(trainable)
    return model, layers, acfg


def adapter_tensors(
    layers: dict[str, SORSALinear], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """{M.sorsa_U, M.sorsa_S, M.sorsa_Vt: tensor} on the CPU, in the adapter format's names."""
    out = {}
    for m, layer in layers.items():
        for name, p in zip(factor_names(m), (layer.sorsa_U, layer.sorsa_S, layer.sorsa_Vt), strict=True):
            t = p.detach()
            out[name] = (t if dtype is None else t.to(dtype)).cpu().contiguous()
    return out
