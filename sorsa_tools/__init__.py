"""sorsa-tools: fine-tune LLMs with SORSA (Singular Values and Orthonormal Regularized Singular
Vectors Adaptation): decompose a checkpoint, train U, S, Vt, merge back."""

__version__ = "0.1.0"

from sorsa_tools.decompose import DecomposeResult, decompose  # noqa: E402
from sorsa_tools.info import describe  # noqa: E402

__all__ = ["__version__", "decompose", "DecomposeResult", "describe"]
