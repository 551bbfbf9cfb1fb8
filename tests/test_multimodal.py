"""A multimodal checkpoint (Gemma 3 with a vision tower) that transformers saves with legacy keys
(`language_model.model.layers...`) while the built model names the modules
`model.language_model.layers...`: decompose, train, merge and export-lora must all line up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import GSM8K_SLICE, make_tokenizer

from sorsa_tools import decompose
from sorsa_tools.lora_export import export_lora
from sorsa_tools.merge import merge
from sorsa_tools.model import load_sorsa_model
from sorsa_tools.train import TrainConfig, train


@pytest.fixture(scope="module")
def gemma_mm(tmp_path_factory) -> Path:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    p = tmp_path_factory.mktemp("gemma-mm")
    tok = make_tokenizer(p)
    n = len(tok)
    text = Gemma3TextConfig(
        vocab_size=n + 8,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=n + 1,
        boi_token_index=n + 2,
        eoi_token_index=n + 3,
    )
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(cfg).save_pretrained(p)
    return p


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_legacy_keys_line_up_through_train_merge_and_lora(gemma_mm, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with safe_open(next(gemma_mm.glob("*.safetensors")), "pt") as f:
        assert any(k.startswith("language_model.model.layers.") for k in f.keys())  # noqa: SIM118
    dec = tmp_path / "dec"
    decompose(str(gemma_mm), 4, dec, svd="exact", check_sample=0)
    targets = json.loads((dec / "sorsa_config.json").read_text())["target_modules"]
    assert len(targets) == 14 and all(m.startswith("language_model.model.layers.") for m in targets)
    ids = torch.tensor([list(range(3, 40))])
    original = AutoModelForCausalLM.from_pretrained(gemma_mm, dtype=torch.float32).eval()
    sorsa, layers, _ = load_sorsa_model(dec)
    assert len(layers) == 14
    assert (_logits(sorsa.eval(), ids) - _logits(original, ids)).abs().max() < 1e-4

    run = tmp_path / "run"
    train(
        dec,
        GSM8K_SLICE,
        run,
        config=TrainConfig(max_length=256, batch_size=2, max_steps=3, lr=1e-2),
        device="cpu",
    )
    trained, _, _ = load_sorsa_model(dec, run)
    want = _logits(trained.eval(), ids)
    assert (want - _logits(original, ids)).abs().max() > 1e-3  # training moved it

    merge(dec, tmp_path / "merged", adapter=run)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert (_logits(merged, ids) - want).abs().max() < 1e-4

    lo = export_lora(dec, run, tmp_path / "lora")
    assert lo.exact_names and all(t.startswith("model.language_model.layers.") for t in lo.target_modules)
    peft = PeftModel.from_pretrained(original, tmp_path / "lora").eval()
    assert (_logits(peft, ids) - want).abs().max() < 1e-4


def test_gguf_export_of_the_language_model(gemma_mm, tmp_path):
    """The GGUF holds the language model only (vision tower left out, legacy key prefixes mapped)
    and llama.cpp's logits follow transformers'."""
    np = pytest.importorskip("numpy")
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    from sorsa_tools.gguf_export import read_layout

    dec = tmp_path / "dec"
    decompose(str(gemma_mm), 4, dec, svd="exact", check_sample=0)
    r = merge(dec, tmp_path / "m.gguf", to="gguf", outtype="f32")
    _, tensors = read_layout(r.out)
    assert not any("vision" in n or "mm_" in n for n in tensors) and "token_embd.weight" in tensors
    ids = list(range(3, 40))
    original = AutoModelForCausalLM.from_pretrained(gemma_mm, dtype=torch.float32).eval()
    ref = _logits(original, torch.tensor([ids]))[0].numpy()
    llm = llama_cpp.Llama(model_path=str(r.out), logits_all=True, verbose=False, n_ctx=64, n_threads=2)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])[:, : ref.shape[1]]
    llm.close()
    # llama.cpp computes Gemma's GELU through an fp16 table: about 1e-3 apart, not more
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max(), np.abs(got - ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.9
