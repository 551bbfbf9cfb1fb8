"""Safety checks and recorded statistics that a mutation audit found no test exercising: each
test injects the fault a check exists for (monkeypatch, in the style of test_cli_errors's
test_verification_catches_*) and expects the check to fire and nothing half-written to stay, or
compares a recorded statistic with its value worked out by hand on a constructed case."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import restamp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_cli_errors import assert_clean_error, run

from sorsa_tools.errors import InputError, VerificationError
from sorsa_tools.format import ADAPTER_FILE, CONFIG_FILE, factor_names
from sorsa_tools.io import safetensors_file as sf
from sorsa_tools.io.checkpoint import INDEX_NAME

LLAMA_DATA = [
    {
        "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
        "answer": "3 + 4 = 7\n#### 7",
    },
    {"question": "A box holds 6 eggs. How many eggs are in 2 boxes?", "answer": "6 * 2 = 12\n#### 12"},
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: a second thread only adds synchronisation."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rewrite(d: Path, change) -> None:
    """Apply change(tensors: dict) -> dict to every shard of checkpoint d (index kept in step)."""
    index_path = d / INDEX_NAME
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    shards = sorted(set(index["weight_map"].values())) if index else [p.name for p in d.glob("*.safetensors")]
    for s in shards:
        with safe_open(d / s, "pt") as f:
            meta = f.metadata()
        before = load_file(d / s)
        after = change(dict(before))
        same = after.keys() == before.keys() and all(
            after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before
        )
        if not same:
            save_file(after, d / s, metadata=meta)
        if index:
            for k in set(before) - set(after):
                del index["weight_map"][k]
    if index:
        index_path.write_text(json.dumps(index))
    restamp(d)  # the fault is the check's to find, not the checksums'


def _set_tensors(d: Path, new: dict[str, torch.Tensor]) -> None:
    def change(ts):
        for k, v in new.items():
            if k in ts:
                assert ts[k].shape == v.shape, k
                ts[k] = v.to(ts[k].dtype).contiguous()
        return ts

    _rewrite(d, change)


# --------------------------------------------------------------------------- 1. GGUF read-back value check


def test_gguf_verify_catches_a_corrupted_f32_tensor(tiny_lm_decomposed, tmp_path, monkeypatch):
    """An F32 weight that reaches the file with one value changed: VerificationError, no file."""
    pytest.importorskip("gguf")
    from sorsa_tools import gguf_export as ge
    from sorsa_tools.source import MergedSource

    _, dec = tiny_lm_decomposed("llama")
    real = ge._encode
    hit = []

    def corrupt(t, qtype):
        data = real(t, qtype)
        if qtype == ge.T.F32 and data.ndim == 2:
            data = data.copy()
            data.flat[data.size // 2] += 1.0
            hit.append(qtype)
        return data

    monkeypatch.setattr(ge, "_encode", corrupt)
    out = tmp_path / "m.gguf"
    with pytest.raises(VerificationError, match="does not read back as written"):
        ge.export_gguf(MergedSource(dec), out, "f32")
    assert hit  # the corruption really happened on the write path
    assert list(tmp_path.iterdir()) == []  # no output, no temp file


# --------------------------------------------------------------------------- 2. merge: fold and output checks


def test_merge_fold_check_catches_a_wrong_fold(tiny_lm_decomposed, tmp_path, monkeypatch):
    from sorsa_tools.merge import merge
    from sorsa_tools.source import MergedSource

    _, dec = tiny_lm_decomposed("llama")
    real = MergedSource.fold

    def noisy(raw):
        W = real(raw)
        if raw[1] is None:
            return W
        g = torch.Generator().manual_seed(0)
        return W + 1e-3 * float(W.abs().max()) * torch.randn(W.shape, generator=g, dtype=W.dtype)

    monkeypatch.setattr(MergedSource, "fold", staticmethod(noisy))
    with pytest.raises(VerificationError, match=r"merged weight differs from W_r \+ U diag\(S\) Vt"):
        merge(dec, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fault", ["drop", "dtype"])
def test_merge_output_check_catches_a_missing_or_retyped_tensor(
    tiny_lm_decomposed, tmp_path, monkeypatch, fault
):
    """The written dir lists a tensor fewer (index kept consistent), or one in another dtype."""
    import sorsa_tools.merge as mod

    _, dec = tiny_lm_decomposed("llama")
    victim = "model.norm.weight"
    real = mod._write_side_files

    def damage(source, tmp, dtype, out_name):
        real(source, tmp, dtype, out_name)

        def change(ts):
            if victim in ts:
                if fault == "drop":
                    del ts[victim]
                else:
                    ts[victim] = ts[victim].to(torch.float16)
            return ts

        _rewrite(tmp, change)

    monkeypatch.setattr(mod, "_write_side_files", damage)
    with pytest.raises(VerificationError, match=f"does not list {victim} as expected"):
        mod.merge(dec, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 3. export-lora read-back check


def _fake_run(dec: Path, run_dir: Path, change) -> Path:
    """A finished-looking `sorsa train` run of DIR whose factors are change(module, U, S, Vt)."""
    cfg = json.loads((dec / CONFIG_FILE).read_text())
    run_dir.mkdir(parents=True)
    run_cfg = {
        "format_version": cfg["format_version"],
        "kind": "trained",
        "rank": cfg["rank"],
        "target_modules": cfg["target_modules"],
        "base_model": cfg["base_model"],
        "decomposition": {"job_id": cfg["job_id"], "path": str(dec)},
    }
    (run_dir / CONFIG_FILE).write_text(json.dumps(run_cfg))
    with safe_open(dec / ADAPTER_FILE, "pt") as f:
        meta, ts = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for m in cfg["target_modules"]:
        names = factor_names(m)
        for n, t in zip(names, change(m, *(ts[n] for n in names)), strict=True):
            ts[n] = t.contiguous()
    save_file(ts, run_dir / ADAPTER_FILE, metadata=meta)
    return run_dir


@pytest.fixture(scope="module")
def lora_case(tiny_lm_decomposed, tmp_path_factory):
    """(DIR, RUN, expected max_relative_delta): module 3's S scaled by 1.2 (relative delta 0.2),
    module 5's s_1 raised by 0.7 ||S|| (relative delta 0.7 exactly), the others unchanged."""
    _, dec = tiny_lm_decomposed("llama")
    targets = json.loads((dec / CONFIG_FILE).read_text())["target_modules"]

    def change(m, U, S, Vt):
        if m == targets[3]:
            S = S * 1.2
        elif m == targets[5]:
            S = S.clone()
            S[0] += 0.7 * float(S.double().norm())
        return U, S, Vt

    run_dir = _fake_run(dec, tmp_path_factory.mktemp("fake-run") / "run", change)
    return dec, run_dir, 0.7


@pytest.mark.parametrize("which", ["lora_B", "lora_A"])
def test_lora_verify_catches_a_factor_written_wrong(lora_case, tmp_path, monkeypatch, which):
    from sorsa_tools.lora_export import export_lora

    dec, run_dir, _ = lora_case
    real = sf.StreamWriter.write
    hit = []

    def corrupt(self, name, data):
        if name.endswith(f"{which}.weight") and isinstance(data, torch.Tensor):
            data = data.clone()
            data[0, 0] += 0.05 * float(data.abs().max())
            hit.append(name)
        return real(self, name, data)

    monkeypatch.setattr(sf.StreamWriter, "write", corrupt)
    with pytest.raises(VerificationError, match="the written LoRA gives B A x off by"):
        export_lora(dec, run_dir, tmp_path / "lora")
    assert hit
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 4. short read-back


def test_check_read_back_catches_a_short_read(tmp_path, monkeypatch):
    """The file gives back fewer bytes than were written, all of them right: still an error."""
    t = torch.arange(5000, dtype=torch.float32)
    p = tmp_path / "f.bin"
    p.write_bytes(b"h" * 8 + t.numpy().tobytes())
    sf.check_read_back(p, 8, t.numel() * 4, t, "w")  # the honest read passes
    real = sf.iter_file_chunks

    def short(path, offset, nbytes, chunk=sf.COPY_CHUNK):
        return real(path, offset, nbytes - 4, 4096)  # several chunks, the last 4 bytes never come

    monkeypatch.setattr(sf, "iter_file_chunks", short)
    with pytest.raises(VerificationError, match="w did not read back as written in f.bin"):
        sf.check_read_back(p, 8, t.numel() * 4, t, "w")


def test_merge_refuses_a_short_read_back(tiny_lm_decomposed, tmp_path, monkeypatch):
    from sorsa_tools.merge import merge

    _, dec = tiny_lm_decomposed("llama")
    real = sf.iter_file_chunks

    def short(path, offset, nbytes, chunk=sf.COPY_CHUNK):
        return real(path, offset, max(nbytes - 2, 0), chunk)

    monkeypatch.setattr(sf, "iter_file_chunks", short)
    with pytest.raises(VerificationError, match="did not read back as written"):
        merge(dec, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 5. header alignment


def _data_start(p: Path) -> int:
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def test_written_shards_start_their_data_at_a_multiple_of_8(tiny_factory, tmp_path):
    src = tiny_factory("llama", torch.bfloat16)
    dec, merged = tmp_path / "d", tmp_path / "m"
    res = run("decompose", str(src), "--rank", "4", "-o", str(dec))
    assert res.exit_code == 0, res.stderr
    res = run("merge", str(dec), "--to", "hf", "-o", str(merged))
    assert res.exit_code == 0, res.stderr
    files = sorted(dec.glob("*.safetensors")) + sorted(merged.glob("*.safetensors"))
    assert len(files) >= 2 * len(list(src.glob("*.safetensors"))) + 1  # every shard, and the adapter
    starts = {f"{p.parent.name}/{p.name}": _data_start(p) for p in files}
    assert all(s % 8 == 0 for s in starts.values()), starts


# --------------------------------------------------------------------------- 6. push


def _write(path: Path, content: str | bytes = b"x" * 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


LOCAL_BASE = {
    "name_or_path": "ckpt/llama",  # relative, and shaped like a Hub id
    "source": "local",
    "revision": None,
    "local_path": "/nowhere/ckpt/llama",
    "model_type": "llama",
}


def _run_dir(d: Path) -> Path:
    cfg = {
        "format_version": 1,
        "kind": "trained",
        "rank": 8,
        "target_modules": ["model.layers.0.self_attn.q_proj"],
        "base_model": LOCAL_BASE,
        "decomposition": {"job_id": "beef" * 16, "path": "/nowhere/dir"},
        "training": {"lr": 1e-4, "steps": 2, "data": {"path": "/x/d.jsonl", "sha256": "ab" * 32}},
    }
    _write(d / CONFIG_FILE, json.dumps(cfg))
    _write(d / ADAPTER_FILE, b"a" * 300)
    _write(d / "train_log.jsonl", '{"step": 1}\n')
    _write(d / "steps" / ".step-000002.tmp-1" / "x", b"partial")
    _write(d / "steps" / ".step-000002.tmp-1" / ADAPTER_FILE, b"partial")
    return d


def _merged_dir(d: Path) -> Path:
    prov = {"method": "SORSA", "rank": 8, "base_model": LOCAL_BASE, "training": None}
    _write(d / "config.json", json.dumps({"model_type": "llama"}))
    _write(d / "model.safetensors", b"w" * 1000)
    _write(d / "sorsa_provenance.json", json.dumps(prov))
    _write(d / "extra" / "notes.json", "{}")  # a visible nested file: sent
    _write(d / "steps" / ".step-000002.tmp-1" / "x", b"partial")  # hidden folder inside: never
    _write(d / "extra" / ".partial.json", "{}")  # hidden file inside: never
    return d


@pytest.fixture
def _no_token(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_push_never_lists_hidden_files_nested_in_path(tmp_path, _no_token):
    from sorsa_tools import hub

    r = hub.push(_run_dir(tmp_path / "run"), "alice/run", dry_run=True)
    assert sorted(f for f, _ in r.files) == sorted(
        ["README.md", ADAPTER_FILE, CONFIG_FILE, "train_log.jsonl"]
    )
    r = hub.push(_merged_dir(tmp_path / "m"), "alice/merged", dry_run=True)
    assert sorted(f for f, _ in r.files) == sorted(
        ["README.md", "config.json", "extra/notes.json", "model.safetensors", "sorsa_provenance.json"]
    )
    res = run("push", str(tmp_path / "m"), "--repo-id", "alice/merged", "--dry-run")
    assert res.exit_code == 0, res.stderr
    assert (
        "extra/notes.json" in res.stdout and ".step-000002" not in res.stdout and ".partial" not in res.stdout
    )


def test_card_keeps_a_relative_local_base_out_of_base_model(tmp_path, _no_token):
    from huggingface_hub import ModelCard

    from sorsa_tools import hub

    for d in (_run_dir(tmp_path / "run"), _merged_dir(tmp_path / "m")):
        card = ModelCard(hub.push(d, "alice/x", dry_run=True).card)
        assert card.data.base_model is None, d
        assert "base_model_relation" not in card.data.to_dict(), d
        assert "ckpt/llama" not in card.content, d  # not in the usage code either
        assert "`llama` (a local checkpoint)" in card.content


# --------------------------------------------------------------------------- 7. EOS counted by the HF backend


def _forced_head(vocab: int, eos: int, eos_step: list[int], token: int = 5):
    """An LM head whose row r says `token` until its step eos_step[r] (1-based), then EOS."""

    class Head(torch.nn.Module):
        calls = 0

        def forward(self, h):
            step = Head.calls + 1  # one call per generated token (the first on the prompt)
            Head.calls += 1
            out = torch.zeros(*h.shape[:-1], vocab)
            for r in range(h.shape[0]):
                out[r, ..., eos if step >= eos_step[r % len(eos_step)] else token] = 10.0
            return out

    return Head()


def test_hf_backend_counts_the_eos_that_ends_a_generation(tiny_lm_decomposed):
    """GGUFBackend.generate counts each token it draws, the end-of-generation one included (n is
    raised before the EOG test), so EOS drawn as the k-th token gives k. The HF backend must give
    the same: rows of one batch that end at steps 4 and 2 count 4 and 2, whatever padding follows."""
    from sorsa_tools.evaluate import HFBackend, ModelSpec

    src, _ = tiny_lm_decomposed("llama")
    b = HFBackend(ModelSpec("hf", src), "cpu", "float32")
    b.load()
    eos = b.eos[0]
    assert b.pad != eos
    b.model.lm_head = _forced_head(b.model.config.vocab_size, eos, [4, 2])
    (_, n0), (_, n1) = b.generate(["Q: 1+1?", "Q: a longer question?"], True, 10, ())
    assert (n0, n1) == (4, 2)
    b.model.lm_head = _forced_head(b.model.config.vocab_size, eos, [1])
    assert b.generate(["Q: 1+1?"], True, 10, ())[0][1] == 1  # EOS at once: one token


def test_eval_records_the_eos_in_generated_tokens(tiny_lm_decomposed, tmp_path, monkeypatch):
    from sorsa_tools import evaluate as ev

    src, _ = tiny_lm_decomposed("llama")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in LLAMA_DATA))
    real = ev.HFBackend.load

    def load(self):
        real(self)
        self.model.lm_head = _forced_head(self.model.config.vocab_size, self.eos[0], [3])

    monkeypatch.setattr(ev.HFBackend, "load", load)
    r = ev.evaluate_gsm8k(
        src, data, batch_size=2, max_new_tokens=10, metric="accuracy", device="cpu",
        stop_strings=(), output=tmp_path / "o.jsonl",
    )  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [x["generated_tokens"] for x in rows] == [3, 3]
    assert r.generated_tokens == 6 and r.summary["throughput"]["generated_tokens"] == 6


# --------------------------------------------------------------------------- 8. --pack refused


def test_pack_is_refused_where_packed_copies_differ(tiny_lm_decomposed, tmp_path, monkeypatch):
    import sorsa_tools.train as tr

    _, dec = tiny_lm_decomposed("llama")
    model, _, _ = tr.load_sorsa_model(dec)
    tr.check_packing(model, torch.device("cpu"))  # the real model keeps packed examples apart

    real = tr.load_sorsa_model

    def leaky(*a, **k):
        """Later positions of a row see more than the earlier ones: packed copies differ."""
        model, layers, cfg = real(*a, **k)
        decoder = model.get_decoder()

        def leaky_decoder(*da, **dk):
            out = decoder(*da, **dk)
            h = out.last_hidden_state
            ramp = torch.arange(h.shape[1], dtype=h.dtype).view(1, -1, 1) / h.shape[1]
            out.last_hidden_state = h + ramp * h.detach().abs().max()
            return out

        model.get_decoder = lambda: leaky_decoder
        return model, layers, cfg

    monkeypatch.setattr(tr, "load_sorsa_model", leaky)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in LLAMA_DATA))
    cfg = tr.TrainConfig(max_length=512, batch_size=2, pack=True, max_steps=1, lr=1e-3)
    with pytest.raises(InputError, match="--pack: transformers .* does not keep packed examples apart"):
        tr.train(dec, data, tmp_path / "run", config=cfg, device="cpu")
    res = run(
        "train",
        str(dec),
        "--data",
        str(data),
        "-o",
        str(tmp_path / "run2"),
        "--pack",
        "--max-steps",
        "1",
        "--max-length",
        "512",
    )
    assert_clean_error(res, "--pack", "does not keep packed examples apart", "drop --pack")


# --------------------------------------------------------------------------- 9. golden values


def _orth(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q


def _with_spectrum(shape: tuple[int, int], s: torch.Tensor, g: torch.Generator):
    """(U, V, U diag(s) V^T) with orthonormal U, V: a matrix whose singular values are s."""
    m, n = shape
    k = min(m, n)
    U, V = _orth(m, k, g), _orth(n, k, g)
    return U, V, (U * s) @ V.T


# chosen spectra (each strictly decreasing), by module
S_Q0 = 64.0 - torch.arange(64, dtype=torch.float64)
S_Q0[10] = 54.75  # the closest pair: s_9 - s_10 = 0.25
S_Q1 = 40.0 * 0.97 ** torch.arange(64, dtype=torch.float64)
S_K = 32.0 - torch.arange(32, dtype=torch.float64)
S_K[5] = 27.5  # s_4 - s_5 = 0.5
Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
K0, K1 = "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"


@pytest.fixture(scope="module")
def spectra(tmp_path_factory):
    """(BASE, TUNED): tiny float32 llamas whose q/k projections have the spectra above in BASE;
    in TUNED: q0 = 1.5 W0, q1 with s_1 and s_2 swapped (so its top two singular vectors trade
    places), k0 unchanged, k1 with its singular values moved by +0.25, -0.25, +0.25, ... (same
    vectors, order kept)."""
    from conftest import make_tiny

    g = torch.Generator().manual_seed(7)
    base = make_tiny(tmp_path_factory.mktemp("golden-base"), "llama", torch.float32, seed=3)
    tuned = tmp_path_factory.mktemp("golden-tuned") / "t"
    shapes = {Q0: (64, 64), Q1: (64, 64), K0: (32, 64), K1: (32, 64)}
    spectrum = {Q0: S_Q0, Q1: S_Q1, K0: S_K, K1: S_K}
    b_w, t_w = {}, {}
    for m, shape in shapes.items():
        U, V, W = _with_spectrum(shape, spectrum[m], g)
        b_w[m + ".weight"] = W
        if m == Q0:
            t_w[m + ".weight"] = 1.5 * W
        elif m == Q1:
            st = spectrum[m].clone()
            st[[0, 1]] = st[[1, 0]]
            t_w[m + ".weight"] = (U * st) @ V.T
        elif m == K1:  # +0.25 and -0.25 in turn: |s_t - s_0| = 0.25 everywhere, the signed mean 0
            step = 0.25 * (1 - 2 * (torch.arange(32) % 2)).double()
            t_w[m + ".weight"] = (U * (spectrum[m] + step)) @ V.T
        else:
            t_w[m + ".weight"] = W
    _set_tensors(base, b_w)
    shutil.copytree(base, tuned)
    _set_tensors(tuned, t_w)
    return base, tuned


def test_decompose_records_the_energy_and_singular_values_of_a_known_spectrum(spectra, tmp_path):
    from sorsa_tools import decompose

    base, _ = spectra
    r = 4
    res = decompose(str(base), r, tmp_path / "d", svd="exact", targets="q_proj", check_sample=0)
    stats = json.loads((tmp_path / "d" / CONFIG_FILE).read_text())["modules"]
    assert sorted(stats) == [Q0, Q1]
    energies = []
    for m, s in ((Q0, S_Q0), (Q1, S_Q1)):
        want = float(s[:r].square().sum() / s.square().sum())
        energies.append(want)
        assert stats[m]["energy_captured"] == pytest.approx(want, rel=1e-5), m
        assert stats[m]["sigma_1"] == pytest.approx(float(s[0]), rel=1e-5), m
        assert stats[m]["sigma_r"] == pytest.approx(float(s[r - 1]), rel=1e-5), m
        assert stats[m]["shape"] == [64, 64] and stats[m]["method"] == "exact"
    assert res.mean_energy_captured == pytest.approx(sum(energies) / 2, rel=1e-5)


def test_analyze_statistics_of_known_changes(spectra):
    from sorsa_tools.analyze import analyze

    base, tuned = spectra
    res = analyze(base, [tuned], modules="q_proj,k_proj")
    mods = {m["module"]: m for m in res.modules}
    assert [m["module"] for m in res.modules] == [Q0, K0, Q1, K1]

    def gap(s):
        return float(((s[:-1] - s[1:]) / s[0]).min())

    assert gap(S_Q0) == 0.25 / 64 and gap(S_K) == 0.5 / 32  # the closest pairs, by construction
    want = {  # module: (min_rel_gap, delta_sigma, delta_d, delta_w_rel)
        Q0: (0.25 / 64, 0.5 * float(S_Q0.mean()), 0.0, 0.5),
        Q1: (gap(S_Q1), 0.0, 2 / 64, math.sqrt(2) * float(S_Q1[0] - S_Q1[1]) / float(S_Q1.norm())),
        K0: (0.5 / 32, 0.0, 0.0, 0.0),
        K1: (0.5 / 32, 0.25, 0.0, 0.25 * math.sqrt(32) / float(S_K.norm())),
    }
    for m, (g, ds, dd, dw) in want.items():
        row, got = mods[m], mods[m]["results"][0]
        assert row["min_rel_gap"] == pytest.approx(g, rel=1e-4, abs=1e-7), m
        assert row["sigma_max"] == pytest.approx(float({Q0: S_Q0, Q1: S_Q1}.get(m, S_K)[0]), rel=1e-6), m
        assert got["delta_sigma"] == pytest.approx(ds, abs=1e-4), m
        assert got["delta_d"] == pytest.approx(dd, abs=1e-5), m
        assert got["delta_u"] == pytest.approx(dd, abs=1e-5) and got["delta_v"] == pytest.approx(dd, abs=1e-5)
        assert got["delta_w_rel"] == pytest.approx(dw, rel=1e-5, abs=1e-7), m
    (s,) = res.summary()
    ds = {m: want[m][1] for m in want}
    dd = {m: want[m][2] for m in want}
    assert s["mean_delta_sigma"] == pytest.approx(sum(ds.values()) / 4, abs=1e-4)
    assert s["mean_delta_d"] == pytest.approx(sum(dd.values()) / 4, abs=1e-5)
    assert s["max_delta_sigma"] == pytest.approx(ds[Q0], abs=1e-4)
    assert s["max_delta_d"] == pytest.approx(2 / 64, abs=1e-5)
    assert set(s["by_type"]) == {"q_proj", "k_proj"}
    q, k = s["by_type"]["q_proj"], s["by_type"]["k_proj"]
    assert q["mean_delta_sigma"] == pytest.approx((ds[Q0] + ds[Q1]) / 2, abs=1e-4)
    assert q["mean_delta_d"] == pytest.approx((dd[Q0] + dd[Q1]) / 2, abs=1e-5)
    assert k["mean_delta_sigma"] == pytest.approx((ds[K0] + ds[K1]) / 2, abs=1e-4)
    assert k["mean_delta_d"] == pytest.approx(0.0, abs=1e-5)


def test_lora_export_max_relative_delta_of_a_known_change(lora_case, tmp_path):
    from sorsa_tools.lora_export import export_lora

    dec, run_dir, want = lora_case
    r = export_lora(dec, run_dir, tmp_path / "lora")
    assert r.max_relative_delta == pytest.approx(want, rel=1e-5)
    assert r.max_check_error < 1e-6


# --------------------------------------------------------------------------- 10. gold answer


def test_gold_answer_takes_the_number_after_the_last_marker():
    from sorsa_tools.evaluate import gold_answer

    assert gold_answer("First try #### 5\nNo, recount: 3 + 4 = 7\n#### 7") == 7
    assert gold_answer("#### 12 then #### 34") == 34
    assert gold_answer("#### 1,080 was wrong #### 2,160 dollars") == 2160
    assert gold_answer("a #### 9 b #### no number here, 4 later") == 4
