"""GGUF export checked against the real llama.cpp runtime (llama-cpp-python).

Each supported architecture: a tiny random model with peaked attention (so that a wrong q/k row
order or attention scale shows in the logits), decomposed, its adapter perturbed (so the merged
weights differ from the original ones), exported, loaded by llama.cpp and compared with
transformers on the same token ids. Tokenizers are compared on GSM-8K text.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GSM8K_SLICE, _config, make_tokenizer, restamp

from sorsa_tools import decompose
from sorsa_tools.errors import (
    DiskFullError,
    ExportError,
    OutputExistsError,
    TokenizerMissingError,
    VerificationError,
)
from sorsa_tools.gguf_export import PROVENANCE_KEY, export_gguf, read_layout
from sorsa_tools.source import MergedSource, provenance

llama_cpp = pytest.importorskip("llama_cpp")

KINDS = ["llama", "qwen2", "qwen3", "gemma3", "gemma", "gemma2", "phi3"]
F32_TOL = 1e-3


def _texts(n: int) -> list[str]:
    out = []
    for line in GSM8K_SLICE.read_text().splitlines()[:n]:
        rec = json.loads(line)
        out += [rec["question"], rec["answer"]]
    return out


def _cfg(kind: str, hidden: int):
    cfg = _config(kind)
    if kind in (
        "gemma3",
        "gemma2",
    ):  # a window shorter than the text and one global layer: the SWA layout matters
        cfg.sliding_window = 4
        cfg.layer_types = ["sliding_attention", "full_attention"]
    if kind == "gemma2":  # HF's query scale differs from llama.cpp's 1/sqrt(head_dim): the fold matters;
        cfg.query_pre_attn_scalar = 36  # soft-capping low enough to bite on these peaked logits
        cfg.attn_logit_softcapping, cfg.final_logit_softcapping = 20.0, 15.0
    if kind == "phi3":  # half of each head rotated (Phi-4-mini rotates 3/4)
        cfg.rope_parameters = {**cfg.rope_parameters, "partial_rotary_factor": 0.5}
    if hidden != 64:
        cfg.hidden_size, cfg.intermediate_size = hidden, 2 * hidden
        cfg.head_dim = hidden // cfg.num_attention_heads
    return cfg


def build(path: Path, kind: str, hidden: int = 64, seed: int = 0, rope: dict | None = None) -> Path:
    """A tiny model whose attention is peaked and whose logits are far from flat (`rope`: its
    rope_parameters, for the scaled variants)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = make_tokenizer(path)
    cfg = _cfg(kind, hidden)
    if rope is not None:
        cfg.rope_parameters = {"rope_theta": 10000.0, **rope}
    cfg.vocab_size = len(tok)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 0
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
            elif name.endswith("qkv_proj.weight"):  # phi3's fused q, k, v: peak q and k only
                p[: -cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads].mul_(6.0)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # qwen3 / gemma3 normalize q and k
                p.fill_(3.0 if kind == "qwen3" else 2.0)
            elif name.endswith("lm_head.weight") or (
                name.endswith("embed_tokens.weight") and cfg.tie_word_embeddings
            ):
                p.mul_(5.0)
            elif name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size="100KB")
    return path


def perturb_adapter(d: Path, seed: int = 1) -> None:
    """Change the factors as training would, so the merged model is not the original one."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    f = d / "sorsa_adapter.safetensors"
    tensors = load_file(f)
    for name, t in tensors.items():
        if name.endswith(".sorsa_S"):
            tensors[name] = t * (1 + 0.5 * torch.rand(t.shape, generator=g, dtype=t.dtype))
        elif name.endswith(".sorsa_U"):
            tensors[name] = t + 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype)
    save_file(tensors, f)
    restamp(d)


class GgmlGelu(torch.nn.Module):
    """llama.cpp's CPU GELU: a table of fp16 outputs indexed by the fp16-rounded input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def hf_logits(source: MergedSource, src_dir: Path, ids: list[int], ggml_gelu: bool = True) -> np.ndarray:
    """transformers' float32 logits of the model SOURCE describes (merged weights loaded in).

    ggml_gelu: Gemma's GELU computed the way llama.cpp's CPU backend does (through an fp16 table),
    which alone moves tiny-Gemma logits by ~1e-3; the comparison then isolates the export."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        src_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    sd = {n: source.read(n).float() for n in source.names()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)
    if ggml_gelu and model.config.model_type.startswith("gemma"):
        for layer in model.model.layers:
            layer.mlp.act_fn = GgmlGelu()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(
        model_path=str(path), logits_all=True, type_k=0, type_v=0, verbose=False, n_ctx=128, n_threads=2
    )
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)])
    llm.close()
    return out


def token_ids(src_dir: Path, n: int = 48) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src_dir)
    return tok(_texts(1)[0] + " " + _texts(1)[1])["input_ids"][:n]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(source dir, decomposed dir with a perturbed adapter) by kind."""
    cache: dict = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in cache:
            src = build(tmp_path_factory.mktemp(f"gguf-{kind}"), kind)
            dec = tmp_path_factory.mktemp(f"gguf-{kind}-sorsa") / "d"
            decompose(str(src), 8, dec, svd="exact", check_sample=0)
            perturb_adapter(dec)
            cache[kind] = (src, dec)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_f32_logits_match_transformers(kind, tiny, tmp_path):
    src, dec = tiny(kind)
    ids = token_ids(src)
    # the original checkpoint, as is
    plain = MergedSource.plain(src)
    r = export_gguf(plain, tmp_path / "plain.gguf", "f32")
    ref = hf_logits(plain, src, ids)
    got = cpp_logits(r.path, ids)
    err_plain = np.abs(got - ref).max()
    err_exact_gelu = np.abs(got - hf_logits(plain, src, ids, ggml_gelu=False)).max()
    # the decomposed one with a changed adapter: llama.cpp must run the merged weights
    merged = MergedSource(dec)
    r2 = export_gguf(merged, tmp_path / "merged.gguf", "f32", provenance=provenance(merged))
    ref2 = hf_logits(merged, src, ids)
    got2 = cpp_logits(r2.path, ids)
    err = np.abs(got2 - ref2).max()
    print(
        f"{kind} f32: max|llama.cpp - transformers| plain {err_plain:.2e}, merged {err:.2e} "
        f"(exact GELU {err_exact_gelu:.2e}), logits up to {np.abs(ref).max():.1f}"
    )
    assert np.abs(ref2 - ref).max() > 0.05  # the perturbation is visible, so the check below means something
    assert np.abs(ref).max() > 1.0  # logits far from flat
    assert err_plain < F32_TOL and err < F32_TOL
    assert r2.arch == kind
    assert r2.outtype == "f32" and r2.tensor_count == len(read_layout(r2.path)[1])
    kv, tensors = read_layout(r2.path)
    assert json.loads(kv[PROVENANCE_KEY])["method"] == "SORSA"
    assert ("output.weight" in tensors) == (not kind.startswith("gemma"))  # Gemma ties its head to token_embd
    assert all(t.qtype.name == "F32" for t in tensors.values())


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16},
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    ],
    ids=lambda r: r["rope_type"],
)  # fmt: skip
def test_scaled_rope_logits_match_transformers(rope, tmp_path):
    """Llama 3.1-style (the rope_freqs tensor), linear and YaRN rope scaling: llama.cpp's logits
    equal transformers' (a factor written upside down moves them far)."""
    src = build(tmp_path / "src", "llama", rope=rope)
    ids = token_ids(src)
    r = export_gguf(MergedSource.plain(src), tmp_path / "m.gguf", "f32")
    got, ref = cpp_logits(r.path, ids), hf_logits(MergedSource.plain(src), src, ids)
    assert np.abs(got - ref).max() < F32_TOL * np.abs(ref).max(), np.abs(got - ref).max()


@pytest.mark.parametrize("original", [4096, 32], ids=["short-factors", "long-factors"])
def test_phi3_longrope_logits_match_transformers(original, tmp_path):
    """Phi-3's longrope (Phi-3-128k, 3.5, 4-mini): the factor tensors and the attention factor.
    llama.cpp takes the long factors when its context exceeds original_max_position_embeddings,
    transformers when the sequence does: 48 tokens in a 128-token context past 32 both take the
    long ones, within 4096 both the short ones."""
    rope = {"rope_type": "longrope", "partial_rotary_factor": 0.5, "original_max_position_embeddings": original,
            "long_factor": [1.0, 2.0, 4.0, 8.0], "short_factor": [1.0, 1.1, 1.3, 1.5]}  # fmt: skip
    src = build(tmp_path / "src", "phi3", rope=rope)
    cfg = json.loads((src / "config.json").read_text())
    cfg["original_max_position_embeddings"] = cfg["rope_parameters"]["original_max_position_embeddings"] = (
        original
    )
    (src / "config.json").write_text(json.dumps(cfg))
    ids = token_ids(src)
    r = export_gguf(MergedSource.plain(src), tmp_path / "m.gguf", "f32")
    kv, tensors = read_layout(r.path)
    assert kv["phi3.rope.scaling.original_context_length"] == original
    assert kv["phi3.rope.scaling.attn_factor"] == pytest.approx(
        (1 + np.log(4) / np.log(32)) ** 0.5 if original == 32 else 1
    )
    assert tensors["rope_factors_long.weight"].shape == (4,) and tensors[
        "rope_factors_short.weight"
    ].shape == (4,)
    got, ref = cpp_logits(r.path, ids), hf_logits(MergedSource.plain(src), src, ids)
    assert np.abs(got - ref).max() < F32_TOL, np.abs(got - ref).max()  # measured 1.4e-6 (both)


def test_q_k_permutation_matters(tiny, tmp_path, monkeypatch):
    """Without reordering q/k rows LLM_ARCH_LLAMA computes another network: the check above can fail."""
    import sorsa_tools.gguf_export as ge

    src, _ = tiny("llama")
    ids = token_ids(src)
    plain = MergedSource.plain(src)
    monkeypatch.setattr(ge, "_PERMUTE_QK", False)
    r = export_gguf(plain, tmp_path / "noperm.gguf", "f32")
    err = np.abs(cpp_logits(r.path, ids) - hf_logits(plain, src, ids)).max()
    assert err > 100 * F32_TOL


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gemma", "gemma2", "phi3"])
def test_q8_0_same_top1(kind, tiny, tmp_path):
    src, dec = tiny(kind)
    ids = token_ids(src)
    merged = MergedSource(dec)
    r = export_gguf(merged, tmp_path / "q8.gguf", "q8_0")
    got, ref = cpp_logits(r.path, ids), hf_logits(merged, src, ids)
    agree = (got.argmax(-1) == ref.argmax(-1)).mean()
    print(f"{kind} q8_0: top-1 agreement {agree:.3f}, max abs err {np.abs(got - ref).max():.3f}")
    assert agree >= 0.9
    types = {n: t.qtype.name for n, t in read_layout(r.path)[1].items()}
    q = "blk.0.attn_qkv.weight" if kind == "phi3" else "blk.0.attn_q.weight"
    assert types[q] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert r.bytes < 0.35 * sum(i.nbytes for i in merged.infos())  # about a quarter of float32


def test_q4_0_keeps_the_head_finer(tiny, tmp_path):
    """q4_0 body, Q8_0 head (llama.cpp's quantizer keeps output.weight finer than the body too)."""
    src, dec = tiny("llama")
    merged = MergedSource(dec)
    r = export_gguf(merged, tmp_path / "q4.gguf", "q4_0")
    types = {n: t.qtype.name for n, t in read_layout(r.path)[1].items()}
    assert types["blk.1.attn_v.weight"] == "Q4_0" and types["output.weight"] == "Q8_0"
    ids = token_ids(src)
    agree = (cpp_logits(r.path, ids).argmax(-1) == hf_logits(merged, src, ids).argmax(-1)).mean()
    assert agree >= 0.7


def test_rows_that_do_not_fit_the_block_fall_back_to_f16():
    from sorsa_tools.gguf_export import _qtype_for
    from sorsa_tools.gguf_tables import OUTTYPES

    qt, note = _qtype_for("blk.0.ffn_down.weight", (64, 100), OUTTYPES["q8_0"], True)
    assert qt.name == "F16"
    assert note == "blk.0.ffn_down.weight: rows of 100 do not split into Q8_0 blocks of 32; written as F16"
    assert _qtype_for("blk.0.ffn_down.weight", (64, 96), OUTTYPES["q8_0"], True) == (qt.Q8_0, None)
    assert _qtype_for("blk.0.attn_q.bias", (64,), OUTTYPES["q8_0"], True) == (qt.F32, None)
    assert _qtype_for("token_embd.weight", (384, 64), OUTTYPES["q4_0"], False) == (qt.Q8_0, None)  # tied head


def _corr(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(got, ref, strict=True)]))


def test_k_quants_through_llama_cpp(tmp_path, monkeypatch):
    """q4_k_m / q6_k come from llama.cpp's own quantizer; rows of 256 take K blocks, no temp left.
    (4-bit noise moves this random, peaked model a lot: measured logit correlation 0.91 for q4_k_m,
    0.99 for q6_k.)"""
    src = build(tmp_path / "wide", "llama", hidden=256)
    ids = token_ids(src)
    ref = hf_logits(MergedSource.plain(src), src, ids)
    out = tmp_path / "out"
    out.mkdir()
    for outtype, ftype, qname, min_corr in (("q4_k_m", 15, "Q4_K", 0.85), ("q6_k", 18, "Q6_K", 0.98)):
        r = export_gguf(
            MergedSource.plain(src), out / f"{outtype}.gguf", outtype, provenance={"method": "SORSA"}
        )
        kv, tensors = read_layout(r.path)
        assert qname in {t.qtype.name for t in tensors.values()} and kv["general.file_type"] == ftype
        assert tensors["blk.0.attn_norm.weight"].qtype.name == "F32"
        assert json.loads(kv[PROVENANCE_KEY]) == {"method": "SORSA"}
        corr = _corr(cpp_logits(r.path, ids), ref)
        print(f"{outtype}: logit correlation with transformers {corr:.3f}")
        assert corr >= min_corr
    assert sorted(p.name for p in out.iterdir()) == ["q4_k_m.gguf", "q6_k.gguf"]  # no temp left behind

    # the read-back of the quantizer's output fails: its temps go too
    import sorsa_tools.gguf_export as ge

    real_verify = ge._verify

    def quantized_check_fails(paths, plans, source, exact_types=True):
        if source is None:
            raise VerificationError("injected")
        return real_verify(paths, plans, source, exact_types)

    monkeypatch.setattr(ge, "_verify", quantized_check_fails)
    with pytest.raises(VerificationError):
        export_gguf(MergedSource.plain(src), out / "bad.gguf", "q4_k_m")
    assert sorted(p.name for p in out.iterdir()) == ["q4_k_m.gguf", "q6_k.gguf"]


def test_ctrl_c_during_the_quantizer_stops_the_export(tiny, tmp_path, monkeypatch):
    """A Ctrl-C while llama.cpp quantizes lands in a ctypes callback (its log), where Python
    prints and drops it: the export went on and wrote the file. It must stop, leaving nothing."""
    import ctypes
    import signal

    llama_cpp = pytest.importorskip("llama_cpp")
    src, _ = tiny("llama")
    real = llama_cpp.llama_model_quantize
    log_line = ctypes.CFUNCTYPE(None)(lambda: signal.raise_signal(signal.SIGINT))

    def quantize(*args):
        log_line()  # the user's Ctrl-C, delivered while C code calls back into Python
        return real(*args)

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", quantize)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        export_gguf(MergedSource.plain(src), out / "q.gguf", "q4_k_m")
    assert list(out.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_k_quant_without_llama_cpp(tiny, tmp_path, monkeypatch):
    import sys

    import sorsa_tools.gguf_export as ge

    src, _ = tiny("llama")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    wrote = []
    monkeypatch.setattr(ge, "_write", lambda *a, **k: wrote.append(a))  # checked before any writing
    with pytest.raises(ExportError) as e:
        export_gguf(MergedSource.plain(src), tmp_path / "k.gguf", "q4_k_m")
    assert str(e.value) == (
        "--outtype q4_k_m uses llama.cpp's quantizer; install llama-cpp-python (pip install "
        "llama-cpp-python) or pick one of f32, f16, bf16, q8_0, q5_0, q4_0"
    )
    assert list(tmp_path.iterdir()) == [] and wrote == []


@pytest.mark.parametrize("outtype", ["f16", "q4_k_m"])
def test_a_full_disk_is_said_up_front(tiny, tmp_path, monkeypatch, outtype):
    import shutil

    import sorsa_tools.gguf_export as ge

    src, _ = tiny("llama")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ge.shutil, "disk_usage", lambda p: usage._replace(free=10_000))
    wrote = []
    monkeypatch.setattr(ge, "_write", lambda *a, **k: wrote.append(a))
    with pytest.raises(ge.DiskFullError) as e:
        export_gguf(MergedSource.plain(src), tmp_path / "k.gguf", outtype)
    assert str(e.value).startswith(f"{tmp_path / 'k.gguf'} needs about ")
    assert "GB is free there; free space or choose another -o" in str(e.value)
    assert list(tmp_path.iterdir()) == [] and wrote == []


def test_split_files_load_as_one(tiny, tmp_path):
    src, dec = tiny("qwen2")
    merged = MergedSource(dec)
    whole = export_gguf(merged, tmp_path / "whole.gguf", "f32")
    r = export_gguf(merged, tmp_path / "part.gguf", "f32", split_max_size=150_000)
    n = len(r.paths)
    assert n >= 3 and [p.name for p in r.paths] == [f"part-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert not (tmp_path / "part.gguf").exists()
    kv = read_layout(r.paths[0])[0]
    assert kv["split.count"] == n and kv["split.no"] == 0 and kv["split.tensors.count"] == whole.tensor_count
    ids = token_ids(src)
    assert np.array_equal(cpp_logits(r.path, ids), cpp_logits(whole.path, ids))


def test_progress_and_atomic_on_failure(tiny, tmp_path):
    src, _ = tiny("llama")
    seen = []
    r = export_gguf(MergedSource.plain(src), tmp_path / "a.gguf", "f16", progress=lambda *a: seen.append(a))
    assert len(seen) == r.tensor_count and seen[-1][1] == seen[-1][2]
    assert [s[1] for s in seen] == sorted(s[1] for s in seen)

    def full(name, done, total):
        if done > total // 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as e:
        export_gguf(MergedSource.plain(src), tmp_path / "b.gguf", "f16", progress=full)
    assert str(e.value).startswith(f"no space left on the device while writing {tmp_path / 'b.gguf'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]


def test_tied_and_gemma_specifics(tiny, tmp_path):
    """Gemma 3: norms stored as 1 + w, q_norm carries query_pre_attn_scalar, SWA layout written."""
    src, _ = tiny("gemma3")
    plain = MergedSource.plain(src)
    r = export_gguf(plain, tmp_path / "g.gguf", "f32")
    kv, tensors = read_layout(r.path)
    assert kv["gemma3.attention.sliding_window"] == 4
    assert kv["gemma3.rope.freq_base"] == 1e6 and kv["gemma3.rope.freq_base_swa"] == 1e4
    t = tensors["blk.0.attn_norm.weight"]
    got = np.fromfile(t.path, dtype=np.float32, count=t.shape[0], offset=t.offset)
    assert np.array_equal(got, plain.read("model.layers.0.input_layernorm.weight").numpy() + 1)
    t = tensors["blk.0.attn_q_norm.weight"]  # (2 + 1) * sqrt(16 / 256)
    got = np.fromfile(t.path, dtype=np.float32, count=t.shape[0], offset=t.offset)
    assert np.allclose(got, 3.0 * 0.25)


def test_gemma2_specifics(tiny, tmp_path):
    """Gemma 2: both soft-caps and the window written (llama.cpp fixes the alternating layout, so
    no pattern), norms as 1 + w, HF's query_pre_attn_scalar folded into attn_q's rows."""
    src, _ = tiny("gemma2")
    plain = MergedSource.plain(src)
    r = export_gguf(plain, tmp_path / "g2.gguf", "f32")
    kv, tensors = read_layout(r.path)
    assert kv["gemma2.attn_logit_softcapping"] == 20.0 and kv["gemma2.final_logit_softcapping"] == 15.0
    assert kv["gemma2.attention.sliding_window"] == 4 and "gemma2.attention.sliding_window_pattern" not in kv
    assert {"blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight", "blk.0.post_ffw_norm.weight"} <= set(
        tensors
    )
    t = tensors["blk.1.attn_q.weight"]
    got = np.fromfile(t.path, dtype=np.float32, count=t.nbytes // 4, offset=t.offset).reshape(t.shape)
    assert np.allclose(got, plain.read("model.layers.1.self_attn.q_proj.weight").numpy() * (16 / 36) ** 0.5)

    # llama.cpp's gemma2 graph always soft-caps and always alternates: other configs are refused
    for key, value, why in (
        ("attn_logit_softcapping", None, "gemma2 without attn_logit_softcapping has no llama.cpp equivalent "
         "(its gemma2 graph always applies one); it cannot be exported to GGUF"),
        ("layer_types", ["full_attention", "sliding_attention"], "gemma2 with layer_types ['full_attention', "
         "'sliding_attention'] has no llama.cpp equivalent (its gemma2 graph makes layer i global where "
         "(i + 1) % 2 == 0, the others sliding); it cannot be exported to GGUF"),
    ):  # fmt: skip
        changed = tmp_path / f"g2-{key}"
        shutil.copytree(src, changed)
        cfg = json.loads((changed / "config.json").read_text())
        (changed / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ExportError) as e:
            export_gguf(MergedSource.plain(changed), tmp_path / "s.gguf")
        assert str(e.value) == why
        assert not (tmp_path / "s.gguf").exists()


def test_phi3_specifics(tiny, tmp_path):
    """Phi-3: the fused weights are decomposed and written as stored (attn_qkv, ffn_up of 2 x
    intermediate rows), half of each head rotated; a model named phi3 whose tokenizer lacks the
    tokens llama.cpp then looks up loads all the same."""
    src, dec = tiny("phi3")
    from sorsa_tools.model import read_decomposition

    targets = read_decomposition(dec)["target_modules"]
    assert "model.layers.0.self_attn.qkv_proj" in targets and "model.layers.0.mlp.gate_up_proj" in targets
    named = tmp_path / "phi3-ft"
    shutil.copytree(src, named)
    r = export_gguf(MergedSource(dec), tmp_path / "p.gguf", "f32")
    kv, tensors = read_layout(r.path)
    assert kv["phi3.rope.dimension_count"] == 8 and tensors["blk.0.attn_qkv.weight"].shape == (16 * 8, 64)
    assert tensors["blk.0.ffn_up.weight"].shape == (2 * 96, 64) and "blk.0.attn_q.weight" not in tensors
    r2 = export_gguf(MergedSource.plain(named), tmp_path / "named.gguf", "f16")
    assert read_layout(r2.path)[0]["general.name"] == "phi 3-ft"
    ids = token_ids(src)
    assert cpp_logits(r2.path, ids).shape == (len(ids), 384)


# --- tokenizers ----------------------------------------------------------------------------------


def _cpp_tokens(path: Path, text: str, add_bos: bool = True) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    out = llm.tokenize(text.encode(), add_bos=add_bos, special=False)
    llm.close()
    return out


def _with_tokenizer(src: Path, dst: Path, files: dict[str, bytes | str], vocab: int) -> Path:
    """src's weights and config with another tokenizer (vocab rows re-sized to fit it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    model.resize_token_embeddings(vocab)
    model.config.vocab_size = vocab
    model.save_pretrained(dst)
    for p in dst.glob("tokenizer*"):
        p.unlink()
    for name, content in files.items():
        (dst / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return dst


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma", "gemma2", "phi3"])
def test_byte_level_bpe_tokenization_matches_hf(kind, tiny, tmp_path):
    """gpt2-style BPE: llama.cpp's pre-tokenizer found from the split rule transformers uses."""
    from transformers import AutoTokenizer

    src, _ = tiny(kind)
    r = export_gguf(MergedSource.plain(src), tmp_path / "t.gguf", "f16")
    # gguf-py's note that the pair template differs is dropped: generation never encodes pairs
    assert r.pre_tokenizer == ("qwen2" if kind == "qwen2" else "gpt-2") and r.warnings == []
    tok = AutoTokenizer.from_pretrained(src)
    llm = llama_cpp.Llama(model_path=str(r.path), vocab_only=True, verbose=False)
    for text in _texts(60):
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"], text
    llm.close()


def _byte_fallback_bpe(dst: Path) -> int:
    """A Llama-2-style tokenizer.json (Prepend/Replace '▁', byte fallback), trained on GSM-8K."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    # no digits in training: the text's numbers take the byte-fallback path
    tk.train_from_iterator([t.translate(str.maketrans("", "", "0123456789")) for t in _texts(256)], trainer)
    tk.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    j = json.loads(tk.to_str())  # the byte pieces are ordinary vocabulary in Llama 2, not added tokens
    j["added_tokens"] = [a for a in j["added_tokens"] if a["content"] not in byte_tokens]
    tk = Tokenizer.from_str(json.dumps(j))
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(dst)
    return tk.get_vocab_size()


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_byte_fallback_bpe_tokenization_matches_hf(kind, tiny, tmp_path):
    """tokenizer.json BPE with byte fallback (Llama 2 as transformers writes it) -> llama.cpp SPM."""
    from transformers import AutoTokenizer

    src, _ = tiny(kind)
    tdir = tmp_path / "tok"
    n = _byte_fallback_bpe(tdir)
    files = {p.name: p.read_bytes() for p in tdir.iterdir()}
    model_dir = _with_tokenizer(src, tmp_path / "m", files, n)
    r = export_gguf(MergedSource.plain(model_dir), tmp_path / "t.gguf", "f16")
    assert r.tokenizer == "llama (tokenizer.json byte-fallback BPE)"
    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = llama_cpp.Llama(model_path=str(r.path), vocab_only=True, verbose=False)
    texts = [*_texts(60), "naïve café — 3.5€ ½ 漢字 🦙"]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"], text
    llm.close()


@pytest.mark.parametrize("kind", ["llama", "gemma", "phi3"])  # Gemma 1 and Phi-3 ship tokenizer.model
def test_sentencepiece_tokenization_matches_sentencepiece(kind, tiny, tmp_path):
    """tokenizer.model read without the sentencepiece package; compared with sentencepiece itself."""
    spm = pytest.importorskip("sentencepiece")
    src, _ = tiny(kind)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_texts(256)))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
        # as Llama 2's tokenizer.model: llama.cpp, like it, does no NFKC or whitespace folding
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    model_dir = _with_tokenizer(
        src, tmp_path / "m", {"tokenizer.model": (tmp_path / "sp.model").read_bytes()}, sp.vocab_size()
    )
    r = export_gguf(MergedSource.plain(model_dir), tmp_path / "t.gguf", "f16")
    assert r.tokenizer == "llama (tokenizer.model)"
    llm = llama_cpp.Llama(model_path=str(r.path), vocab_only=True, verbose=False)
    for text in [*_texts(60), "naïve café — 3.5€ 漢字 🦙"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == [1, *sp.encode(text)], text
    llm.close()


# --- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs(tiny, tiny_factory, tmp_path):
    src, _ = tiny("llama")
    plain = MergedSource.plain(src)
    with pytest.raises(ExportError) as e:
        export_gguf(MergedSource.plain(tiny_factory("phi")), tmp_path / "p.gguf")
    assert str(e.value) == (
        "GGUF export does not support model_type 'phi'; supported: gemma, gemma2, gemma3, gemma3_text, llama, "
        "mistral, phi3, qwen2, qwen3"
    )
    with pytest.raises(ExportError) as e:
        export_gguf(plain, tmp_path / "x.gguf", "q3")
    assert str(e.value).startswith(
        "unknown --outtype 'q3'; pick one of f32, f16, bf16, q8_0, q4_0, q5_0, q4_1"
    )
    with pytest.raises(ExportError) as e:
        export_gguf(plain, tmp_path / "x.bin")
    assert str(e.value) == f"{tmp_path / 'x.bin'} does not end in .gguf; name the output file NAME.gguf"

    (tmp_path / "x.gguf").write_text("keep me")
    with pytest.raises(OutputExistsError) as e:
        export_gguf(plain, tmp_path / "x.gguf")
    assert (
        str(e.value)
        == f"{tmp_path / 'x.gguf'} already exists; pass --force to overwrite it or pick another -o path"
    )
    assert (tmp_path / "x.gguf").read_text() == "keep me"
    with pytest.raises(OutputExistsError) as e:  # --force replaces an earlier export, not this
        export_gguf(plain, tmp_path / "x.gguf", force=True)
    assert str(e.value).startswith(f"{tmp_path / 'x.gguf'} is not a GGUF that `sorsa merge --to gguf` wrote")
    assert (tmp_path / "x.gguf").read_text() == "keep me"
    export_gguf(plain, tmp_path / "earlier.gguf")
    r = export_gguf(plain, tmp_path / "earlier.gguf", force=True)  # an earlier export: replaced
    assert r.bytes > 100_000 and r.outtype == "f16"
    (tmp_path / "earlier.gguf").unlink()

    # configs llama.cpp has no graph for (a sliding window; attention biases its qwen3 and gemma3
    # loaders do not take): refused, not a file it cannot load
    for kind, model_type, key in (
        ("qwen2", "qwen2", "use_sliding_window"),
        ("qwen3", "qwen3", "attention_bias"),
        ("gemma3", "gemma3_text", "attention_bias"),
    ):
        changed = tmp_path / f"{kind}-{key}"
        shutil.copytree(tiny(kind)[0], changed)
        cfg = json.loads((changed / "config.json").read_text())
        (changed / "config.json").write_text(json.dumps({**cfg, key: True}))
        with pytest.raises(ExportError) as e:
            export_gguf(MergedSource.plain(changed), tmp_path / "s.gguf")
        assert str(e.value) == (
            f"{model_type} with {key}=True has no llama.cpp equivalent (needs None or False); "
            "it cannot be exported to GGUF"
        )
        assert not (tmp_path / "s.gguf").exists()

    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    for p in bare.glob("tokenizer*"):
        p.unlink()
    with pytest.raises(TokenizerMissingError) as e:
        export_gguf(MergedSource.plain(bare), tmp_path / "y.gguf")
    assert str(e.value) == (
        f"{bare} has no tokenizer.json or tokenizer.model, which a GGUF must embed; copy the base "
        "model's tokenizer files into it"
    )
    assert not (tmp_path / "y.gguf").exists()


# --- the real Gemma 3 270M -----------------------------------------------------------------------


@pytest.fixture
def fast_tmp(tmp_path):
    """A RAM-backed directory where there is one: the 1 GB f32 file is written and read at memory speed."""
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or shutil.disk_usage(shm).free < 4 << 30:
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(dir=shm, prefix="sorsa-gguf-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_gemma3_270m_real(gemma_270m, fast_tmp):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp_path = fast_tmp
    src = MergedSource.plain(gemma_270m)
    r = export_gguf(src, tmp_path / "g.gguf", "f32")
    assert r.tokenizer == "llama (tokenizer.json byte-fallback BPE)"
    tok = AutoTokenizer.from_pretrained(gemma_270m)
    llm = llama_cpp.Llama(
        model_path=str(r.path), logits_all=True, type_k=0, type_v=0, verbose=False, n_ctx=256
    )
    texts = _texts(40)
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"], text
    ids = tok(texts[0] + " " + texts[1])["input_ids"][:96]
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    llm.close()
    model = AutoModelForCausalLM.from_pretrained(gemma_270m, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    del model
    err = np.abs(got - ref)
    print(
        f"gemma3 270M f32: max abs err {err.max():.4f} (logits up to {np.abs(ref).max():.1f}), mean {err.mean():.5f}"
    )
    # 18 layers in float32 with llama.cpp's fp16 GELU table: measured 0.018 max, 0.0015 mean
    assert err.max() < 0.05 and err.mean() < 0.005
    assert (got.argmax(-1) == ref.argmax(-1)).all()

    q = export_gguf(src, tmp_path / "g8.gguf", "q8_0")
    assert q.bytes < 0.3 * r.bytes
    got8 = cpp_logits(q.path, ids)
    agree = (got8.argmax(-1) == ref.argmax(-1)).mean()
    print(f"gemma3 270M q8_0: top-1 agreement {agree:.3f}")
    assert agree >= 0.95


def test_mistral_sliding_window_is_exported_with_a_warning(tiny, tmp_path):
    src, _ = tiny("llama")
    for window in (4096, None):
        m = tmp_path / f"mistral-{window}"
        shutil.copytree(src, m)
        cfg = json.loads((m / "config.json").read_text())
        cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=window)
        (m / "config.json").write_text(json.dumps(cfg))
        r = export_gguf(MergedSource.plain(m), tmp_path / f"m-{window}.gguf", "f16")
        notes = [w for w in r.warnings if "sliding_window" in w]
        if window:
            assert notes == [
                "sliding_window=4096: llama.cpp's llama graph attends to the whole context, so its outputs "
                "differ from transformers' past 4096 tokens (llama.cpp's converter does the same)"
            ]
        else:
            assert notes == []
