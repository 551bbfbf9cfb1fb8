"""Meta's original Llama format as a decompose source: a tiny Meta checkpoint made FROM a tiny HF
Llama (the converter's rules inverted here: q/k un-permuted, names mapped back, split into
model-parallel parts) decomposes to the same residuals and factors as the HF checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sorsa_tools import decompose
from sorsa_tools.format import ADAPTER_FILE, CONFIG_FILE
from sorsa_tools.io.meta_llama import _permute_into, intermediate_size, max_positions, open_source

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")

# the tiny HF Llama of conftest: hidden 64, ffn 96, 4 heads, 2 kv heads (GQA), 2 layers, vocab 128
PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "norm_eps": 1e-6,
    "vocab_size": -1,
    "multiple_of": 32,
    "ffn_dim_multiplier": 0.5,  # 32 * ceil(int(0.5 * int(8 * 64 / 3)) / 32) = 96
    "max_seq_len": 128,
}
TO_META = {  # HF suffix -> (Meta suffix, model-parallel dim or None, heads to un-permute)
    "self_attn.q_proj.weight": ("attention.wq.weight", 0, 4),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0, 2),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0, None),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1, None),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0, None),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0, None),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1, None),
    "input_layernorm.weight": ("attention_norm.weight", None, None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None, None),
}
TOP = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1, None),  # Llama 2: split along dim
    "model.norm.weight": ("norm.weight", None, None),
    "lm_head.weight": ("output.weight", 0, None),
}
TEXTS = [
    f"the {w} fox number {i} jumps over {i * 7} lazy dogs and sings" for i, w in enumerate("abcdefgh" * 8)
]


def _hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("model*.safetensors")):  # not the adapter
        out.update(load_file(f))
    return out


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotary halves back to Meta's interleaved pairs (the inverse of the converter's permute)."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _tokenizer_model(path: Path) -> Path:
    corpus = path.parent.parent / f"{path.parent.name}-corpus.txt"
    corpus.write_text("\n".join(TEXTS))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(path.with_suffix("")),
        vocab_size=100,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
    )
    path.with_suffix(".vocab").unlink()
    return path


def make_meta(hf: Path, dst: Path, parts: int, params: dict = PARAMS, embed_split: int = 1) -> Path:
    """The Meta-format release of the HF checkpoint `hf`, in `parts` model-parallel files; the
    embedding split along its width (Llama 1/2) or, with embed_split=0, its rows (Llama 3)."""
    dst.mkdir(parents=True)
    tensors = _hf_tensors(hf)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(parts)]
    for name, t in tensors.items():
        if name in TOP:
            meta, split, heads = TOP[name]
            split = embed_split if meta == "tok_embeddings.weight" else split
        else:
            layer, suffix = name.removeprefix("model.layers.").split(".", 1)
            meta, split, heads = TO_META[suffix]
            meta = f"layers.{layer}.{meta}"
        if heads:
            t = _unpermute(t, heads)
        pieces = [t] * parts if split is None else list(t.chunk(parts, dim=split))
        for sd, piece in zip(shards, pieces, strict=True):
            sd[meta] = piece.clone()  # own storage: torch.save writes a view's whole storage
    for i, sd in enumerate(shards):
        sd["rope.freqs"] = torch.ones(8)  # Llama 1/2 store it; HF computes it
        torch.save(sd, dst / f"consolidated.{i:02d}.pth")
    (dst / "params.json").write_text(json.dumps(params))
    _tokenizer_model(dst / "tokenizer.model")
    (dst / "checklist.chk").write_text("md5 sums\n")
    return dst


@pytest.fixture(scope="module")
def hf_and_meta(tmp_path_factory):
    from conftest import make_tiny

    root = tmp_path_factory.mktemp("meta")
    hf = make_tiny(root / "hf", "llama", torch.float32)
    hf_out = root / "hf-sorsa"
    decompose(str(hf), 4, hf_out, svd="exact", check_sample=0)
    return hf, hf_out, {n: make_meta(hf, root / f"meta{n}", n) for n in (1, 2)}


def test_permutation_golden():
    """One head of 4 rows: Meta's pairs (r0, r1), (r2, r3) become HF's halves [r0, r2 | r1, r3]."""
    meta = torch.arange(8.0).reshape(4, 2)
    hf = torch.empty(4, 2)
    _permute_into(hf, meta, heads=1)
    assert hf.tolist() == [[0, 1], [4, 5], [2, 3], [6, 7]]


def test_config_rules_golden():
    """Meta's FFN width for the real releases, and the context length by release."""
    assert intermediate_size(4096) == 11008  # Llama 2 7B
    assert intermediate_size(5120) == 13824  # Llama 2 13B
    assert intermediate_size(8192, 1.3, 4096) == 28672  # Llama 2 70B
    assert intermediate_size(4096, 1.3, 1024) == 14336  # Llama 3 8B
    assert max_positions({"norm_eps": 1e-5}) == 4096
    assert max_positions({"norm_eps": 1e-6}) == 2048
    assert max_positions({"norm_eps": 1e-5, "rope_theta": 1e6}) == 16384
    assert max_positions({"norm_eps": 1e-5, "max_seq_len": 512}) == 512


@pytest.mark.parametrize("parts", [1, 2])
def test_meta_decomposes_to_the_hf_decomposition(hf_and_meta, tmp_path, parts):
    hf, hf_out, metas = hf_and_meta
    out = tmp_path / "out"
    r = decompose(str(metas[parts]), 4, out, svd="exact", check_sample=0)
    assert r.modules == 14
    # the same residuals, untouched tensors and factors, bit for bit
    want, got = _hf_tensors(hf_out), _hf_tensors(out)
    assert set(got) == set(want) == set(_hf_tensors(hf))
    bad = [n for n in want if not torch.equal(want[n], got[n]) or want[n].dtype != got[n].dtype]
    assert not bad, bad
    a, b = load_file(hf_out / ADAPTER_FILE), load_file(out / ADAPTER_FILE)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # an ordinary HF checkpoint: the config transformers would load, no Meta files
    hf_cfg, cfg = json.loads((hf / "config.json").read_text()), json.loads((out / "config.json").read_text())
    keys = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    keys += ("num_hidden_layers", "vocab_size", "rms_norm_eps", "max_position_embeddings", "architectures")
    assert {k: cfg.get(k) for k in keys} == {k: hf_cfg.get(k) for k in keys}
    assert cfg["rope_parameters"]["rope_theta"] == hf_cfg["rope_parameters"]["rope_theta"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not names & {"params.json", "checklist.chk"} and not any(n.endswith(".pth") for n in names)
    assert "is_local" not in json.loads((out / "tokenizer_config.json").read_text())
    sorsa = json.loads((out / CONFIG_FILE).read_text())
    assert sorsa["base_model"]["model_type"] == "llama"


def test_merged_meta_model_gives_the_hf_logits_and_tokens(hf_and_meta, tmp_path):
    """decompose (2 parts) -> merge --to hf: the HF model's logits, and the tokenizer's ids are
    sentencepiece's own (with BOS, as Llama 2's HF tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sorsa_tools.merge import merge

    hf, _, metas = hf_and_meta
    out = tmp_path / "out"
    decompose(str(metas[2]), 4, out, svd="exact", check_sample=0)
    merge(out, tmp_path / "merged")
    ids = torch.tensor([[1, 5, 9, 33, 64, 100, 127, 3]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(hf).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    sp = spm.SentencePieceProcessor(model_file=str(metas[2] / "tokenizer.model"))
    for d in (out, tmp_path / "merged"):
        tok = AutoTokenizer.from_pretrained(d)
        for text in [*TEXTS[:5], "a lazy fox sings 42"]:
            assert tok(text)["input_ids"] == [1, *sp.encode(text)], text
        assert tok.decode(tok(TEXTS[0])["input_ids"], skip_special_tokens=True) == TEXTS[0]


def test_several_output_shards_and_resume(hf_and_meta, tmp_path, monkeypatch):
    """Output shards of a size cap get an index; a run stopped part-way resumes shard by shard to
    the same result; a further run finds the work done."""
    import sorsa_tools.io.meta_llama as ml

    _, hf_out, metas = hf_and_meta
    monkeypatch.setattr(ml, "OUTPUT_SHARD_BYTES", 40_000)
    ck = open_source(metas[2])
    assert len(ck.shards) > 2 and ck.index is not None
    assert sum(s.size for s in ck.shards) == sum(t.numel() * 4 for t in _hf_tensors(hf_out).values())
    out = tmp_path / "out"
    real = ml.Reader.read

    def stopped(self, name):  # a Ctrl-C while the third shard's tensors are read
        if name == next(iter(ck.shards[2].tensors)):
            raise KeyboardInterrupt
        return real(self, name)

    monkeypatch.setattr(ml.Reader, "read", stopped)
    with pytest.raises(KeyboardInterrupt):
        decompose(str(metas[2]), 4, out, svd="exact", check_sample=0)
    assert (out / ck.shards[1].path.name).is_file() and not (out / CONFIG_FILE).exists()
    monkeypatch.setattr(ml.Reader, "read", real)
    r = decompose(str(metas[2]), 4, out, svd="exact", check_sample=0)
    assert r.resumed_shards == 2 and not r.already_done
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [s.path.name for s in ck.shards]
    want, got = _hf_tensors(hf_out), _hf_tensors(out)
    assert all(torch.equal(want[n], got[n]) for n in want)
    assert decompose(str(metas[2]), 4, out, svd="exact", check_sample=0).already_done


def test_hub_id_of_a_meta_repo_from_the_offline_cache(hf_and_meta, tmp_path, monkeypatch):
    """A Meta-format repo id (params.json, no config.json) is recognised and its parts fetched."""
    import huggingface_hub.constants as c

    _, hf_out, metas = hf_and_meta
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--meta-tester--Llama-tiny"
    shutil.copytree(metas[2], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    import huggingface_hub

    asked = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda *a, **k: asked.append(k["allow_patterns"]) or real(*a, **k),
    )
    out = tmp_path / "out"
    decompose("meta-tester/Llama-tiny", 4, out, svd="exact", check_sample=0)
    assert asked[1] == ["consolidated.*.pth"]  # after the small files: the parts, nothing else
    base = json.loads((out / CONFIG_FILE).read_text())["base_model"]
    assert (base["name_or_path"], base["source"], base["revision"]) == ("meta-tester/Llama-tiny", "hub", sha)
    assert all(torch.equal(a, _hf_tensors(out)[n]) for n, a in _hf_tensors(hf_out).items())


# --- bad input: one line each, nothing left behind ---------------------------------------------


class NotATensor:
    pass


def _broken(meta: Path, tmp_path: Path, how: str) -> Path:
    d = tmp_path / "bad"
    shutil.copytree(meta, d)
    if how == "no-params":
        (d / "params.json").unlink()
    elif how == "pickled-object":
        torch.save({"layers.0.attention.wq.weight": NotATensor()}, d / "consolidated.01.pth")
    elif how == "not-a-dict":
        torch.save([torch.zeros(2)], d / "consolidated.01.pth")
    elif how == "gap":
        (d / "consolidated.01.pth").rename(d / "consolidated.02.pth")
    elif how == "last-part-missing":
        (d / "consolidated.01.pth").unlink()
    elif how == "shape":
        sd = torch.load(d / "consolidated.01.pth", weights_only=True)
        sd["layers.1.feed_forward.w2.weight"] = torch.zeros(32, 40)
        torch.save(sd, d / "consolidated.01.pth")
    elif how == "norm-differs":
        sd = torch.load(d / "consolidated.01.pth", weights_only=True)
        sd["norm.weight"] = sd["norm.weight"] + 1
        torch.save(sd, d / "consolidated.01.pth")
    elif how == "no-tokenizer":
        (d / "tokenizer.model").unlink()
    elif how == "tiktoken-tokenizer":  # Llama 3's tokenizer.model: base64 token, rank lines
        (d / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")
    elif how == "bad-params":
        (d / "params.json").write_text(json.dumps({**PARAMS, "n_heads": "4"}))
    elif how == "legacy":
        torch.save(
            torch.load(d / "consolidated.01.pth", weights_only=True),
            d / "consolidated.01.pth",
            _use_new_zipfile_serialization=False,
        )
    return d


BAD = [
    ("no-params", ["holds Meta-format Llama weights (consolidated.*.pth) but no params.json", "beside"]),
    (
        "pickled-object",
        [
            "consolidated.01.pth is not a plain tensor dict",
            "refuses it (Unsupported global: GLOBAL test_meta_llama.NotATensor)",
            "could run code",
        ],
    ),
    ("not-a-dict", ["consolidated.01.pth holds a list that is not a plain dict of tensors"]),
    ("gap", ["consolidated.01.pth is missing (found 00, 02)", "put every model-parallel part"]),
    (
        "last-part-missing",
        [
            "tok_embeddings.weight joined over 1 part(s) has shape (128, 32), but "
            "params.json implies (128, 64): a model-parallel part is missing"
        ],
    ),
    (
        "shape",
        [
            "layers.1.feed_forward.w2.weight is 32x40 in consolidated.01.pth but 64x48 in "
            "consolidated.00.pth: the model-parallel parts do not fit together"
        ],
    ),
    (
        "norm-differs",
        [
            "norm.weight differs between consolidated.00.pth and consolidated.01.pth",
            "replicated in every model-parallel part",
        ],
    ),
    ("no-tokenizer", ["has no tokenizer.model; put the tokenizer.model that came with the weights"]),
    ("tiktoken-tokenizer", ["tokenizer.model is not a sentencepiece model (Llama 3 ships a tiktoken one"]),
    ("bad-params", ["params.json: n_heads is '4', not a positive number"]),
    ("legacy", ["consolidated.01.pth is truncated, corrupt or in torch's legacy (non-zip) format"]),
]


@pytest.mark.parametrize("how,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_meta_input_is_one_line(hf_and_meta, tmp_path, how, needles):
    from test_cli_errors import assert_clean_error, run

    bad = _broken(hf_and_meta[2][2], tmp_path, how)
    res = run("decompose", str(bad), "--rank", "4", "-o", str(tmp_path / "o"))
    assert_clean_error(res, *needles)
    assert not (tmp_path / "o").exists()


def test_mistral_native_format_is_not_taken_for_meta(tmp_path):
    """params.json beside consolidated.safetensors (Mistral's own format) is not Meta's: the HF
    reader's line about config.json, not a Meta error."""
    from safetensors.torch import save_file
    from test_cli_errors import assert_clean_error, run

    d = tmp_path / "mistral"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(PARAMS))
    save_file({"x": torch.zeros(2)}, d / "consolidated.safetensors")
    res = run("decompose", str(d), "--rank", "4", "-o", str(tmp_path / "o"))
    assert_clean_error(res, "has no config.json, so it is not a Hugging Face model directory")


def test_meta_decomposition_exports_to_gguf(hf_and_meta, tmp_path):
    """Every later command takes DIR unchanged: merge --to gguf of the Meta decomposition runs in
    llama.cpp with the HF model's logits, and llama.cpp tokenizes as sentencepiece does."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    from sorsa_tools.merge import merge

    hf, _, metas = hf_and_meta
    out = tmp_path / "out"
    decompose(str(metas[2]), 4, out, svd="exact", check_sample=0)
    gguf = tmp_path / "m.f32.gguf"
    merge(out, gguf, to="gguf", outtype="f32")
    ids = [1, 5, 9, 33, 64, 99, 17, 3]
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(hf).eval()(torch.tensor([ids])).logits[0]
    llm = llama_cpp.Llama(model_path=str(gguf), logits_all=True, type_k=0, type_v=0, n_ctx=64, verbose=False)
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)])
    assert (got - want).abs().max() < 1e-3
    sp = spm.SentencePieceProcessor(model_file=str(metas[2] / "tokenizer.model"))
    for text in TEXTS[:5]:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == [1, *sp.encode(text)], text
    llm.close()


def test_llama3_style_embedding_split_and_a_tied_output(hf_and_meta, tmp_path):
    """tok_embeddings split by rows (Llama 3's VocabParallelEmbedding) joins to the same tensor;
    a checkpoint without output.weight is tied (config, and no lm_head written)."""
    hf, hf_out, _ = hf_and_meta
    meta = make_meta(hf, tmp_path / "m3", 2, embed_split=0)
    decompose(str(meta), 4, tmp_path / "o3", svd="exact", check_sample=0)
    want, got = _hf_tensors(hf_out), _hf_tensors(tmp_path / "o3")
    assert all(torch.equal(want[n], got[n]) for n in want)
    for i in range(2):
        f = meta / f"consolidated.{i:02d}.pth"
        sd = torch.load(f, weights_only=True)
        del sd["output.weight"]
        torch.save(sd, f)
    decompose(str(meta), 4, tmp_path / "tied", svd="exact", check_sample=0)
    assert json.loads((tmp_path / "tied" / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _hf_tensors(tmp_path / "tied")


def test_a_read_maps_one_part_at_a_time(hf_and_meta, monkeypatch):
    """The RAM bound: while a tensor is assembled, the mapping of the part read before is gone
    (the converter holds every part at once); the tensor is the HF one."""
    import gc
    import weakref

    import sorsa_tools.io.meta_llama as ml

    hf, _, metas = hf_and_meta
    ck = open_source(metas[2])
    reader = ck.shards[0].reader
    real, alive, peak = ml.load_part, weakref.WeakSet(), []

    class Mapped(dict):  # a dict that a weak reference can watch
        __hash__ = object.__hash__

    def watched(path):
        gc.collect()
        peak.append(len(alive))
        m = Mapped(real(path))
        alive.add(m)
        return m

    monkeypatch.setattr(ml, "load_part", watched)
    want = _hf_tensors(hf)
    for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert torch.equal(reader.read(name), want[name])
    assert peak == [0, 0, 0, 0]
