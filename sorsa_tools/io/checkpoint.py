"""A Hugging Face safetensors checkpoint on disk: config, shard list, tensor -> shard map.

Only headers are read here (a few KB per shard); tensors are read later, one at a time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from sorsa_tools.errors import CheckpointError
from sorsa_tools.io.safetensors_file import SafetensorsFile, TensorInfo, copy_side_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Other source formats decompose reads as an HF checkpoint: modules with recognizes(root) and
# open_source(root) (imported when needed: they import this module)
SOURCE_FORMATS = ("sorsa_tools.io.meta_llama",)


@dataclass
class Checkpoint:
    """An HF checkpoint opened lazily."""

    root: Path
    config: dict
    shards: list[SafetensorsFile]
    index: dict | None = None
    weight_map: dict[str, str] = field(default_factory=dict)

    @property
    def shard_names(self) -> list[str]:
        return [s.path.name for s in self.shards]

    def shard_of(self, name: str) -> SafetensorsFile:
        return self.shards[self._shard_pos[self.weight_map[name]]]

    def info(self, name: str) -> TensorInfo:
        return self.shard_of(name).tensors[name]

    def __post_init__(self) -> None:
        self._shard_pos = {s.path.name: i for i, s in enumerate(self.shards)}

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def side_files(self) -> list[Path]:
        """Top-level non-weight files to carry along (config, tokenizer, generation config...)."""
        out = []
        for p in sorted(self.root.iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
                continue
            if p.name in ("sorsa_config.json", "sorsa_adapter.safetensors"):
                continue
            out.append(p)
        return out

    def write_side_files(self, out: Path) -> None:
        """What goes beside the weights of a checkpoint made from this one (decompose's output)."""
        for p in self.side_files():
            copy_side_file(p, out / p.name)

    def fingerprint(self) -> str:
        """Identifies the exact weights: every shard header plus sizes, and the config."""
        h = hashlib.sha256()
        h.update(json.dumps(self.config, sort_keys=True).encode())
        for s in self.shards:
            h.update(s.path.name.encode())
            h.update(str(s.size).encode())
            h.update(s.header_bytes)
        return h.hexdigest()


def open_source(root: str | Path) -> Checkpoint:
    """A checkpoint to decompose: an HF one, or one in a format read as one (`SOURCE_FORMATS`)."""
    import importlib

    root = Path(root)
    for module in SOURCE_FORMATS:
        fmt = importlib.import_module(module)
        if fmt.recognizes(root):
            return fmt.open_source(root)
    return open_checkpoint(root)


def open_checkpoint(root: str | Path) -> Checkpoint:
    """Open the checkpoint in `root`, validating the index and every shard header."""
    root = Path(root)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{root} has no config.json, so it is not a Hugging Face model directory; put the "
            "model's config.json beside its weights"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); restore the original file") from None
    index_path = root / INDEX_NAME
    if not index_path.exists():
        others = sorted(root.glob("*.safetensors.index.json"))
        index_path = others[0] if len(others) == 1 else index_path
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            weight_map = dict(index["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise CheckpointError(
                f"{index_path} is not a valid safetensors index (no weight_map); re-download it"
            ) from None
        names = sorted(set(weight_map.values()))
        for n in names:
            if not (root / n).is_file():
                raise CheckpointError(
                    f"{index_path.name} names shard {n}, which is missing from {root}; "
                    "re-download the checkpoint"
                )
        shards = [SafetensorsFile(root / n) for n in names]
        for s in shards:
            listed = {k for k, v in weight_map.items() if v == s.path.name}
            missing = listed - set(s.tensors)
            if missing:
                raise CheckpointError(
                    f"{s.path} lacks {len(missing)} tensor(s) its index lists (e.g. "
                    f"{sorted(missing)[0]}); re-download the checkpoint"
                )
            for k in s.tensors:
                weight_map.setdefault(k, s.path.name)
        return Checkpoint(root, config, shards, index, weight_map)
    files = sorted(root.glob("*.safetensors"))
    if (root / SINGLE_NAME).is_file():
        files = [root / SINGLE_NAME]
    if len(files) != 1:
        pickles = [p for p in root.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
        if not files and pickles:
            raise CheckpointError(
                f"{root} holds only pickle weights ({pickles[0].name}); these are not read, since "
                "unpickling can run arbitrary code: convert the model to safetensors first "
                "(model.save_pretrained(dir, safe_serialization=True))"
            )
        if not files:
            raise CheckpointError(f"{root} holds no *.safetensors weights; pass a checkpoint directory")
        raise CheckpointError(
            f"{root} holds {len(files)} safetensors files but no {INDEX_NAME}; restore the index file"
        )
    shard = SafetensorsFile(files[0])
    return Checkpoint(root, config, [shard], None, {k: shard.path.name for k in shard.tensors})
