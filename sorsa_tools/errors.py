"""Typed errors. The library raises these and never prints or exits; the CLI turns each into one
line and a non-zero exit code. Every message names what was wrong and how to fix it."""

from __future__ import annotations


class SorsaError(Exception):
    """Base class of every error the library raises on purpose."""

    exit_code = 2


class InputError(SorsaError):
    """A bad argument (rank, targets, dtype, device...)."""


class ModelNotFoundError(SorsaError):
    """MODEL is neither a local directory nor a reachable Hub repository."""


class HubError(SorsaError):
    """The Hub could not be reached, or refused the request."""


class HubAuthError(HubError):
    """No Hugging Face token to push with, or the Hub refused the one given."""


class ArtifactError(InputError):
    """PATH of `sorsa push` is missing, or is not an artifact it knows (merged, GGUF, LoRA, adapter)."""


class CheckpointError(SorsaError):
    """The source checkpoint is incomplete, corrupt or of an unsupported kind."""


class RankError(InputError):
    """The requested rank does not fit some target matrix."""


class TargetError(InputError):
    """The target selection matched nothing, or matched tensors that cannot be adapted."""


class OutputDirError(SorsaError):
    """The output directory holds files of something else."""


class DiskFullError(SorsaError):
    """The disk ran out of space; what was finished is kept and the job can be resumed."""


class VerificationError(SorsaError):
    """A written file did not reproduce the source when read back."""

    exit_code = 3


class NotDecomposedError(SorsaError):
    """A directory that should hold a SORSA decomposition or adapter does not."""


class DataError(InputError):
    """The training or evaluation data is missing, malformed or unusable."""


class RunDirError(SorsaError):
    """A run directory holds another run's files, or an unfinished run that needs --resume."""


class AdapterMismatchError(SorsaError):
    """An adapter was made from another decomposition than the one it is used with."""


class ModelMismatchError(InputError):
    """Two models that should share an architecture do not (a module is missing or of another shape)."""


class TrainingError(SorsaError):
    """Training diverged (NaN/inf loss or gradients); the last good checkpoint is kept."""

    exit_code = 4


class ExportError(SorsaError):
    """A model cannot be written in the requested export format (architecture, type, tokenizer...)."""


class OutputExistsError(ExportError):
    """The export's output file already exists and --force was not given."""


class TokenizerMissingError(ExportError):
    """The checkpoint has no tokenizer files, which a self-contained export (GGUF) must embed."""


class ModelKindError(InputError):
    """MODEL of `sorsa eval` is none of the kinds it reads (HF checkpoint, decomposed dir, GGUF)."""


class MissingDependencyError(SorsaError):
    """An optional package that this path needs is not installed (llama_cpp for a GGUF file)."""
