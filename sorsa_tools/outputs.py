"""Default output paths: where decompose, merge and export-lora write when -o is not given.

Each is named after what it holds (the model and rank, DIR and RUN, the GGUF type) and lies in
the current directory, so that the brief's `sorsa decompose meta-llama/Llama-2-7b --rank 128`
runs as typed. A default path gets the same protection as a named one: an existing output is
only resumed or replaced (--force) when it is an earlier output of the same command.
"""

from __future__ import annotations

import re
from pathlib import Path


def _name(path_or_id: str | Path) -> str:
    """The last part of a Hub id or a path (`.` and `..` resolved), safe as a file name."""
    text = str(path_or_id).rstrip("/\\")
    p = Path(text).expanduser()
    name = p.resolve().name if p.exists() else text.replace("\\", "/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name) or "model"


def decompose_output(model: str, rank: int) -> Path:
    """./NAME-sorsa-rRANK for MODEL (meta-llama/Llama-2-7b -> ./Llama-2-7b-sorsa-r128)."""
    return Path(f"{_name(model)}-sorsa-r{rank}")


def _run_name(directory: str | Path, adapter: str | Path | None) -> str:
    """DIR's name, with RUN's after it when there is one (DIR's own adapter: the original model)."""
    return _name(directory) + (f"-{_name(adapter)}" if adapter is not None else "")


def merge_output(directory: str | Path, adapter: str | Path | None, to: str, outtype: str | None) -> Path:
    """--to hf: ./DIR-RUN-merged; --to gguf: ./DIR-RUN.OUTTYPE.gguf (OUTTYPE default f16)."""
    name = _run_name(directory, adapter)
    return Path(f"{name}.{(outtype or 'f16').lower()}.gguf") if to == "gguf" else Path(f"{name}-merged")


def lora_output(directory: str | Path, adapter: str | Path, to: str, outtype: str | None) -> Path:
    """--to peft: ./DIR-RUN-lora; --to gguf: ./DIR-RUN-lora.OUTTYPE.gguf (OUTTYPE default f16)."""
    name = _run_name(directory, adapter) + "-lora"
    return Path(f"{name}.{(outtype or 'f16').lower()}.gguf") if to == "gguf" else Path(name)
