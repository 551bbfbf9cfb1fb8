"""The SORSA adapter format: names, file names and readers shared by every stage.

`sorsa_adapter.safetensors` holds, for each target module M, `M.sorsa_U` (out, r),
`M.sorsa_S` (r,) and `M.sorsa_Vt` (r, in); `sorsa_config.json` describes them. This is a
user-facing contract: change it only with a new FORMAT_VERSION.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sorsa_tools.errors import CheckpointError, NotDecomposedError

FORMAT_VERSION = 1
ADAPTER_FILE = "sorsa_adapter.safetensors"
CONFIG_FILE = "sorsa_config.json"
SUFFIXES = ("sorsa_U", "sorsa_S", "sorsa_Vt")
CHECKSUMS = "checksums"  # sorsa_config.json (and merge's provenance): {file name: sha256} of what was written


def factor_names(module: str) -> tuple[str, str, str]:
    return tuple(f"{module}.{s}" for s in SUFFIXES)  # type: ignore[return-value]


def adapter_tensor_specs(
    shapes: dict[str, tuple[int, int]], rank: int, dtype_code: str
) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every adapter tensor, in module order."""
    specs = []
    for m, (out_f, in_f) in shapes.items():
        nU, nS, nV = factor_names(m)
        specs += [(nU, dtype_code, (out_f, rank)), (nS, dtype_code, (rank,)), (nV, dtype_code, (rank, in_f))]
    return specs


def read_config(directory: str | Path, expect: str = "the output of `sorsa decompose`") -> dict:
    """The sorsa_config.json of a decomposed dir or trained run, checked for a known version.
    `expect` names what the caller wanted there, for the message when it is missing."""
    d = Path(directory)
    path = d / CONFIG_FILE
    if not d.is_dir():
        what = "is a file, not a directory" if d.exists() else "no such directory"
        raise NotDecomposedError(f"{what}: {d}; pass {expect}")
    if not path.is_file():
        hint = (
            " (an unfinished decomposition: run the same `sorsa decompose` command again)"
            if (d / ".sorsa-partial").exists()
            else "; pass the output directory of `sorsa decompose`"
        )
        raise NotDecomposedError(f"{d} has no {CONFIG_FILE}{hint}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NotDecomposedError(f"{path} is not valid JSON ({e}); re-create the directory") from None
    if not isinstance(cfg, dict):
        raise NotDecomposedError(f"{path} does not hold a JSON object; re-create the directory")
    version = cfg.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise NotDecomposedError(
            f"{path} has format_version {version!r}; this sorsa-tools reads up to {FORMAT_VERSION}: upgrade it"
        )
    rank, targets = cfg.get("rank"), cfg.get("target_modules")
    if not (isinstance(rank, int) and rank > 0) or not (
        isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    ):
        raise NotDecomposedError(
            f"{path} lacks a positive integer rank or a list of target_modules; re-create the directory"
        )
    return cfg


def sha256_of(path: str | Path) -> str:
    """The sha256 of a whole file, read in 1 MiB blocks (a file can be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def checksums(directory: str | Path, names: list[str]) -> dict[str, str]:
    """{name: sha256} of files a command has just written into directory."""
    d = Path(directory)
    return {n: sha256_of(d / n) for n in names}


def verify_checksums(directory: str | Path, record: dict, names: list[str] | None = None) -> list[str]:
    """Check the files of directory against the sha256 the command that wrote them recorded in
    `record` (a sorsa_config.json or provenance), all of them or only `names`; returns the names
    checked. A file changed since (a bit flip, a partial copy, an edit) is refused by name: its
    numbers would otherwise flow on silently. Records written before checksums existed check nothing."""
    d = Path(directory)
    sums = record.get(CHECKSUMS)
    if not isinstance(sums, dict):
        return []
    todo = [n for n in (names if names is not None else list(sums)) if n in sums]
    for n in todo:
        if not (d / n).is_file():
            raise CheckpointError(f"{d / n} is missing; it was written with {d}: restore it or re-create {d}")
        if sha256_of(d / n) != sums[n]:
            raise CheckpointError(
                f"{d / n} differs from the sha256 recorded when it was written: the file was changed or is "
                f"corrupt; restore it from a copy or re-create {d}"
            )
    return todo
