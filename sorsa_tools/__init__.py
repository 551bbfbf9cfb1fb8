"""sorsa-tools: fine-tune LLMs with SORSA (Singular Values and Orthonormal Regularized Singular
Vectors Adaptation): decompose a checkpoint, train U, S, Vt, merge back.

Importing the package is cheap (no torch): `sorsa --help` answers at once and a Ctrl-C in the
first second of a command is still one line. `decompose`, `DecomposeResult` and `describe` load on
first use."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "decompose", "DecomposeResult", "describe"]

_LAZY = {
    "decompose": ("sorsa_tools.decompose", None),  # the module, callable as its function
    "DecomposeResult": ("sorsa_tools.decompose", "DecomposeResult"),
    "describe": ("sorsa_tools.info", "describe"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sorsa_tools' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
        globals()[name] = value
    return value
