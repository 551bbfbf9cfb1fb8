"""What MODEL of `sorsa eval` is: a HF checkpoint, a decomposed DIR (+ a trained adapter) or a GGUF file.

Every benchmark resolves MODEL here first, so that a wrong path or kind is one line before anything
is loaded, and every benchmark accepts the same kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sorsa_tools.errors import InputError, ModelKindError, ModelNotFoundError
from sorsa_tools.format import ADAPTER_FILE, CONFIG_FILE, read_config
from sorsa_tools.io.checkpoint import open_checkpoint

ACCEPTED = (
    "a Hugging Face checkpoint directory (config.json + *.safetensors: merged or original), "
    "a decomposed DIR from `sorsa decompose` (with --adapter RUN for a trained adapter), or a .gguf file"
)


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "hf" (a plain or merged checkpoint), "sorsa" (decomposed DIR + adapter), "gguf"
    path: Path
    adapter: Path | None = None


def _is_gguf(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def resolve_model(model: str | Path, adapter: str | Path | None = None, task: str = "gsm8k") -> ModelSpec:
    """Which kind MODEL is; refuses what sorsa eval cannot read, naming what it can (`task`: the
    benchmark the advice in an error names)."""
    p = Path(model).expanduser()
    a = Path(adapter).expanduser() if adapter is not None else None
    if not p.exists():
        raise ModelNotFoundError(f"no such file or directory: {p}; pass {ACCEPTED}")
    if p.is_file():
        if not _is_gguf(p):
            raise ModelKindError(f"{p} is a file but not a GGUF file; pass {ACCEPTED}")
        if a is not None:
            raise InputError(
                f"--adapter applies to a decomposed DIR, not to the GGUF file {p.name} (its weights are "
                "final); export DIR + adapter with `sorsa merge --to gguf` and evaluate that file"
            )
        return ModelSpec("gguf", p)
    if (p / CONFIG_FILE).is_file():
        cfg = read_config(p)
        if cfg.get("kind") == "trained":
            decomp = (cfg.get("decomposition") or {}).get("path") or "DIR"
            raise ModelKindError(
                f"{p} is a trained adapter, not a model; evaluate it on its decomposition: "
                f"sorsa eval {task} {decomp} --adapter {p}"
            )
        from sorsa_tools.model import check_adapter, read_decomposition

        dcfg = read_decomposition(p)
        if a is not None:
            check_adapter(dcfg, a)
        open_checkpoint(p)  # a truncated or corrupt shard is one line here, not a loader traceback
        return ModelSpec("sorsa", p, a)
    if (p / "config.json").is_file():
        if not any(p.glob("*.safetensors")):
            raise ModelKindError(
                f"{p} has config.json but no *.safetensors weights (pickle .bin files are not loaded: "
                "they can run code); convert the checkpoint to safetensors"
            )
        if a is not None:
            raise InputError(
                f"--adapter applies to a decomposed DIR; {p} is a plain checkpoint without "
                f"{ADAPTER_FILE}: pass the DIR the adapter was trained on"
            )
        open_checkpoint(p)
        return ModelSpec("hf", p)
    raise ModelKindError(f"{p} is none of the kinds sorsa eval reads; pass {ACCEPTED}")
