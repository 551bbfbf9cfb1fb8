"""MODEL -> a local directory: a path as is, or a Hub id downloaded into the normal HF cache.

Only the files a decomposition needs come down: configs, tokenizer files and the safetensors
shards the index names (never pickle `.bin` weights, never `consolidated.*` duplicates). A repo
of Meta's original Llama release (params.json and no config.json after the small files, e.g.
meta-llama/Llama-2-7b) gets its `consolidated.NN.pth` parts instead, read by io.meta_llama
with the restricted unpickler only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sorsa_tools.errors import CheckpointError, HubError, InputError, ModelNotFoundError

# Small files copied along with the weights, and fetched from the Hub first.
SIDE_FILE_PATTERNS = [
    "*.json",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "LICENSE*",
    "USE_POLICY*",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint on local disk and where it came from."""

    path: Path
    name: str
    source: str  # "local" or "hub"
    revision: str | None  # the commit hash for Hub models


def looks_like_repo_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and not model.startswith(".") and ".." not in model


def resolve_model(model: str, revision: str | None = None) -> ResolvedModel:
    """Find MODEL on disk, downloading it from the Hub if it is a Hub id."""
    p = Path(model).expanduser()
    if p.is_dir():
        if revision is not None:
            raise InputError(
                f"--revision applies to Hub ids; {model} is a local directory: drop --revision (or check "
                "out that revision there)"
            )
        return ResolvedModel(p.resolve(), model, "local", None)
    if p.exists():
        raise ModelNotFoundError(
            f"{model} is a file; MODEL must be a checkpoint directory or a Hub id like "
            "meta-llama/Llama-2-7b-hf"
        )
    if not looks_like_repo_id(model):
        raise ModelNotFoundError(
            f"no such directory: {model}; pass a local checkpoint directory or a Hub id like "
            "meta-llama/Llama-2-7b-hf"
        )
    return _download(model, revision)


def _download(repo_id: str, revision: str | None) -> ResolvedModel:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    from sorsa_tools.io import meta_llama

    try:
        snap = Path(snapshot_download(repo_id, revision=revision, allow_patterns=SIDE_FILE_PATTERNS))
        index = snap / "model.safetensors.index.json"
        if meta_llama.recognizes(snap):
            shards = [meta_llama.PART_GLOB]
        elif index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise CheckpointError(
                    f"{repo_id}: its model.safetensors.index.json is not a valid index (no weight_map); "
                    "delete it from the Hugging Face cache and download again"
                ) from None
        else:
            shards = ["model.safetensors"]
        snap = Path(snapshot_download(repo_id, revision=revision, allow_patterns=shards))
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        raise HubError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1); connect to the network or pass a local directory"
        ) from None
    except hf_errors.GatedRepoError:
        raise HubError(
            f"{repo_id} is gated: accept its licence on the Hub, then log in with `hf auth login`"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"no model {repo_id} on the Hub (or it is private: log in with `hf auth login`); "
            "check the id, or pass a local directory"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id} has no revision {revision!r}; pass an existing branch, tag or commit"
        ) from None
    except hf_errors.HfHubHTTPError as e:
        raise HubError(f"the Hub refused the download of {repo_id}: {e}".splitlines()[0]) from None
    except Exception as e:  # network errors (httpx, OSError) surface with many types
        if not isinstance(e, OSError) and not type(e).__module__.startswith(("httpx", "httpcore")):
            raise
        raise HubError(
            f"could not download {repo_id} ({e.__class__.__name__}: {e}); check the network, "
            "or pass a local directory"
        ) from None
    return ResolvedModel(snap, repo_id, "hub", snap.name)
