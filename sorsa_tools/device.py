"""`--device` for every command: one resolution rule and one error message."""

from __future__ import annotations

import torch

from sorsa_tools.errors import InputError


def resolve_device(device: str) -> str:
    """'auto': cuda when a GPU is there, else cpu; 'cuda' or 'cuda:N' only with a GPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {device} was asked for but no CUDA GPU is available; use --device cpu or auto"
            )
        return device
    if device == "cpu":
        return device
    raise InputError(f"--device must be cpu, cuda or auto, not {device!r}")
