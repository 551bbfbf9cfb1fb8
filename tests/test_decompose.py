"""decompose on tiny real-architecture checkpoints: the invariants of the output."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sorsa_tools import decompose
from sorsa_tools.errors import InputError, OutputDirError
from sorsa_tools.format import ADAPTER_FILE, CONFIG_FILE, factor_names
from sorsa_tools.io.checkpoint import open_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def all_tensors(d: Path, skip_adapter: bool = True) -> dict[str, torch.Tensor]:
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        if skip_adapter and p.name == ADAPTER_FILE:
            continue
        out.update(load_file(p))
    return out


def raw_bytes(d: Path) -> dict[str, bytes]:
    """Each tensor's raw bytes, read with the official safetensors library."""
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        if p.name == ADAPTER_FILE:
            continue
        with safe_open(p, "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return out


@pytest.mark.parametrize(
    "kind,dtype",
    [
        ("llama", torch.float32),
        ("llama", torch.bfloat16),
        ("qwen2", torch.bfloat16),
        ("gemma3", torch.float32),
        ("gemma3", torch.bfloat16),
    ],
)
def test_invariants(tiny_factory, tmp_path, kind, dtype):
    src = tiny_factory(kind, dtype)
    assert len(list(src.glob("*.safetensors"))) >= 3, "fixture must be sharded"
    out = tmp_path / "dec"
    r = decompose(str(src), 8, out, svd="randomized")
    assert r.modules == 14 and not r.already_done

    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["format_version"] == 1 and cfg["rank"] == 8 and cfg["kind"] == "decomposition"
    assert cfg["tool"]["name"] == "sorsa-tools" and cfg["tool"]["version"]
    assert cfg["base_model"]["name_or_path"] == str(src) and cfg["svd"]["method"] == "randomized"
    assert cfg["dtypes"]["factors"] == "float32"
    targets = cfg["target_modules"]
    assert len(targets) == 14 and all(t.split(".")[-1].endswith("_proj") for t in targets)

    before, after = all_tensors(src), all_tensors(out)
    b_raw, a_raw = raw_bytes(src), raw_bytes(out)
    assert before.keys() == after.keys()
    adapter = load_file(out / ADAPTER_FILE)
    assert len(adapter) == 3 * len(targets)
    eps = torch.finfo(dtype).eps
    for name in before:
        m = name.removesuffix(".weight")
        if m not in targets:
            assert a_raw[name] == b_raw[name], f"{name} changed"
            continue
        U, S, Vt = (adapter[n] for n in factor_names(m))
        W = before[name].double()
        assert U.dtype == S.dtype == Vt.dtype == torch.float32
        assert U.shape == (W.shape[0], 8) and S.shape == (8,) and Vt.shape == (8, W.shape[1])
        assert after[name].dtype == dtype
        recon = after[name].double() + (U.double() * S.double()) @ Vt.double()
        rel = float((recon - W).norm() / W.norm())
        assert rel < (1e-6 if dtype == torch.float32 else eps), (name, rel)
        assert torch.all(S[:-1] >= S[1:]) and torch.all(S > 0)
        eye = torch.eye(8, dtype=torch.float64)
        assert torch.allclose(U.double().T @ U.double(), eye, atol=1e-5)
        assert torch.allclose(Vt.double() @ Vt.double().T, eye, atol=1e-5)
        # randomized top-r singular values of a decaying spectrum: close to exact
        exact = torch.linalg.svdvals(W)[:8]
        assert torch.allclose(S.double(), exact, rtol=2e-3), (name, S, exact)
    # the residual checkpoint is a normal HF checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    q = "model.layers.0.self_attn.q_proj.weight"  # it loaded W_r, not the original weight
    assert torch.equal(model.state_dict()[q], all_tensors(out)[q].to(model.dtype))
    assert (out / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx["weight_map"] == json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert not list(out.glob(".*")), "temp or partial files left behind"


def test_machine_local_config_keys_are_not_carried(tiny_factory, tmp_path):
    """transformers writes how a tokenizer was loaded ("is_local", "local_files_only") into
    tokenizer_config.json; merge and push published it. decompose and merge drop those keys and
    copy every other byte of the side files."""
    import shutil

    from sorsa_tools import decompose
    from sorsa_tools.merge import merge

    src = tmp_path / "src"
    shutil.copytree(tiny_factory("llama"), src)
    tc = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**tc, "is_local": True, "local_files_only": True}))
    out = tmp_path / "dec"
    decompose(str(src), 4, out, check_sample=0)
    merged = tmp_path / "m"
    merge(out, merged)
    for d in (out, merged):
        assert json.loads((d / "tokenizer_config.json").read_text()) == tc
        assert (d / "config.json").read_bytes() == (src / "config.json").read_bytes()


def test_exact_svd_matches_lapack(tiny_factory, tmp_path):
    src = tiny_factory("llama", torch.float32)
    out = tmp_path / "dec"
    r = decompose(str(src), 12, out, svd="exact")
    assert r.max_s_rel_error == 0.0
    before = all_tensors(src)
    adapter = load_file(out / ADAPTER_FILE)
    for m in json.loads((out / CONFIG_FILE).read_text())["target_modules"]:
        exact = torch.linalg.svdvals(before[m + ".weight"].double())[:12]
        S = adapter[m + ".sorsa_S"].double()
        assert torch.allclose(S, exact, rtol=1e-5, atol=0), m


def test_logits_equal_after_adding_factors_back(tiny_factory, tmp_path):
    """The residual model plus U diag(S) Vt is the original model: same logits."""
    from transformers import AutoModelForCausalLM

    src = tiny_factory("qwen2", torch.float32)
    out = tmp_path / "dec"
    decompose(str(src), 8, out)
    base = AutoModelForCausalLM.from_pretrained(src).eval()
    resid = AutoModelForCausalLM.from_pretrained(out).eval()
    adapter = load_file(out / ADAPTER_FILE)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
        before = resid(ids).logits
        params = dict(resid.named_parameters())
        for m in json.loads((out / CONFIG_FILE).read_text())["target_modules"]:
            U, S, Vt = (adapter[n] for n in factor_names(m))
            params[m + ".weight"].add_((U * S) @ Vt)
        got = resid(ids).logits
    assert not torch.allclose(before, ref, atol=1e-3), "the residual alone must differ from the base"
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), float((got - ref).abs().max())


def test_auto_svd_is_exact_on_small_matrices(tiny_factory, tmp_path):
    src = tiny_factory("llama", torch.float32)
    r = decompose(str(src), 8, tmp_path / "d")  # min(out, in) = 32..64 <= 10 * 8
    cfg = json.loads((tmp_path / "d" / CONFIG_FILE).read_text())
    assert cfg["svd"]["method"] == "auto" and r.max_s_rel_error == 0.0
    assert {s["method"] for s in cfg["modules"].values()} == {"exact"}
    r = decompose(str(src), 2, tmp_path / "e")  # 10 * 2 = 20 < 32: block Krylov
    cfg = json.loads((tmp_path / "e" / CONFIG_FILE).read_text())
    assert {s["method"] for s in cfg["modules"].values()} == {"krylov"}
    assert all(s["niter"] >= 4 and s["s_est_error"] is not None for s in cfg["modules"].values())
    sampled = [s for s in cfg["modules"].values() if s["s_max_rel_error"] is not None]
    assert len(sampled) == 2 and r.max_s_rel_error == max(s["s_max_rel_error"] for s in sampled)


def test_sampled_true_error_above_tol_is_a_warning_where_the_estimate_met_it(
    tiny_factory, tmp_path, monkeypatch
):
    """The estimate extrapolates; the modules checked against an exact SVD tell whether it held.
    An SVD that stops after one step but claims to have met tol must be reported."""
    from sorsa_tools import decompose as dec_mod
    from sorsa_tools.svd import krylov_svd

    def overconfident(W, rank, oversample, niter, g, tol=None, max_niter=16):
        f = krylov_svd(W, rank, oversample, 1, g)  # one step: S off by far more than tol
        f.est_error = 1e-9
        return f

    monkeypatch.setitem(dec_mod.ITERATIVE, "krylov", overconfident)
    src = tiny_factory("llama", torch.float32)
    r = decompose(str(src), 2, tmp_path / "d", check_sample=99)
    cfg = json.loads((tmp_path / "d" / CONFIG_FILE).read_text())
    checked = [s for s in cfg["modules"].values() if s["s_max_rel_error"] is not None]
    missed = [s for s in checked if s["s_max_rel_error"] > 5e-4]
    assert missed and r.max_s_rel_error > 5e-4
    [w] = [w for w in r.warnings if "exact SVD missed --svd-tol" in w]
    assert w.startswith(f"{len(missed)} of the modules checked against an exact SVD missed --svd-tol 0.0005")
    assert "estimated 1.0e-09" in w and "pass a lower --svd-tol or --svd exact" in w
    assert not any("did not reach" in x for x in r.warnings)  # the estimates did meet tol


def test_factor_and_residual_dtypes(tiny_factory, tmp_path):
    src = tiny_factory("llama", torch.bfloat16)
    out = tmp_path / "dec"
    decompose(str(src), 8, out, factor_dtype="bfloat16", residual_dtype="float32")
    adapter = load_file(out / ADAPTER_FILE)
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16}
    before, after = all_tensors(src), all_tensors(out)
    for m in json.loads((out / CONFIG_FILE).read_text())["target_modules"]:
        U, S, Vt = (adapter[n].double() for n in factor_names(m))
        assert after[m + ".weight"].dtype == torch.float32
        # W_r was formed from the stored (rounded) factors: the sum is exact to f32 rounding
        W = before[m + ".weight"].double()
        assert float((after[m + ".weight"].double() + (U * S) @ Vt - W).norm() / W.norm()) < 1e-6


def test_targets_selection(tiny_factory, tmp_path):
    src = tiny_factory("llama", torch.float32)
    r = decompose(str(src), 4, tmp_path / "a", targets="q_proj,v_proj")
    cfg = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert r.modules == 4 and all(m.endswith(("q_proj", "v_proj")) for m in cfg["target_modules"])
    decompose(str(src), 4, tmp_path / "b", targets=r"layers\.1\.mlp\.(up|down)_proj$")
    cfg = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    assert cfg["target_modules"] == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"] or sorted(
        cfg["target_modules"]
    ) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    decompose(str(src), 4, tmp_path / "c", targets="lm_head")  # asked for explicitly: allowed
    assert json.loads((tmp_path / "c" / CONFIG_FILE).read_text())["target_modules"] == ["lm_head"]


def test_default_targets_never_touch_embeddings_norms_head(tiny_factory, tmp_path):
    src = tiny_factory("llama", torch.float32)
    decompose(str(src), 4, tmp_path / "d")
    targets = json.loads((tmp_path / "d" / CONFIG_FILE).read_text())["target_modules"]
    assert not any(("embed" in t) or ("norm" in t) or t == "lm_head" for t in targets)


def test_generic_rule_for_unknown_architecture(tiny_factory, tmp_path):
    src = tiny_factory("phi", torch.float32)
    r = decompose(str(src), 4, tmp_path / "d")
    assert r.warnings and "not in the target table" in r.warnings[0]
    targets = json.loads((tmp_path / "d" / CONFIG_FILE).read_text())["target_modules"]
    assert "model.layers.0.mlp.fc1" in targets and "model.layers.0.self_attn.dense" in targets
    assert "lm_head" not in targets and not any("embed" in t for t in targets)


def test_rerun_reports_done_and_force_redoes(tiny_factory, tmp_path):
    src = tiny_factory("llama", torch.float32)
    out = tmp_path / "d"
    decompose(str(src), 4, out)
    again = decompose(str(src), 4, out)
    assert again.already_done and again.modules == 14
    forced = decompose(str(src), 4, out, force=True)
    assert not forced.already_done
    # any setting that changes the output is part of what "done" means: here the residual dtype
    for changed in (dict(residual_dtype="bfloat16"), dict(factor_dtype="float16"), dict(svd="exact")):
        with pytest.raises(OutputDirError, match="already holds other files"):
            decompose(str(src), 4, out, **changed)


def _file_bytes(d: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(d.iterdir()):
        data = p.read_bytes()
        if p.name == CONFIG_FILE:
            cfg = json.loads(data)
            cfg.pop("created")  # timestamps and timings are the only fields allowed to differ
            for stats in cfg["modules"].values():
                stats.pop("svd_seconds")
            data = json.dumps(cfg, sort_keys=True).encode()
        out[p.name] = data
    return out


@pytest.mark.parametrize("kill_after_modules", [4, 6])
def test_resume_after_kill_equals_uninterrupted(tiny_factory, tmp_path, kill_after_modules):
    """SIGKILL the process mid-job (after a shard / inside a shard); a rerun finishes the same bytes."""
    src = tiny_factory("llama", torch.bfloat16)
    ref = tmp_path / "ref"
    decompose(str(src), 8, ref)
    out = tmp_path / "out"
    script = f"""
import os, signal
from sorsa_tools.decompose import decompose, Progress
class P(Progress):
    n = 0
    def advance(self, modules, nbytes, label):
        self.n += modules
        if self.n >= {kill_after_modules}:
            os.kill(os.getpid(), signal.SIGKILL)
decompose({str(src)!r}, 8, {str(out)!r}, progress=P())
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / CONFIG_FILE).exists() and (out / ".sorsa-partial").exists()
    r = decompose(str(src), 8, out)
    assert r.resumed_shards >= 1
    assert _file_bytes(out) == _file_bytes(ref)


def test_kill_at_the_edges_of_the_job(tiny_factory, tmp_path, dead_pid):
    """Killed before its job file was in place, or after its config but before the cleanup: the
    rerun neither refuses the directory nor leaves the partial files behind."""
    src = tiny_factory("llama", torch.float32)
    ref = tmp_path / "ref"
    decompose(str(src), 4, ref)
    out = tmp_path / "early"
    (out / ".sorsa-partial").mkdir(parents=True)
    (out / ".sorsa-partial" / f".job.json.tmp-{dead_pid}").write_text("{")
    assert not decompose(str(src), 4, out).already_done
    assert _file_bytes(out) == _file_bytes(ref)
    (out / ".sorsa-partial").mkdir()
    (out / ".sorsa-partial" / "factors-x").write_text("left by a kill after the config")
    (out / f".model.safetensors.tmp-{dead_pid}").write_text("")
    assert decompose(str(src), 4, out).already_done
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())


def test_float64_and_float16_residuals(tiny_factory, tmp_path):
    src = tiny_factory("llama", torch.float32)
    out = tmp_path / "f64"
    decompose(str(src), 4, out, residual_dtype="float64")  # computed in float64, not float32
    before, after, adapter = all_tensors(src), all_tensors(out), load_file(out / ADAPTER_FILE)
    for m in json.loads((out / CONFIG_FILE).read_text())["target_modules"]:
        U, S, Vt = (adapter[n].double() for n in factor_names(m))
        W = before[m + ".weight"].double()
        assert float((after[m + ".weight"] + (U * S) @ Vt - W).norm() / W.norm()) < 1e-14
    big = tmp_path / "big"
    shutil.copytree(src, big)
    for shard in big.glob("*.safetensors"):
        from safetensors.torch import save_file

        t = load_file(shard)
        save_file(
            {k: v * 1e7 if "v_proj" in k else v for k, v in t.items()}, shard, metadata={"format": "pt"}
        )
    with pytest.raises(InputError, match=r"v_proj: W_r overflows float16 .* float32 or bfloat16"):
        decompose(str(big), 4, tmp_path / "f16", residual_dtype="float16")


def test_check_sample_larger_than_the_modules():
    from sorsa_tools.decompose import _sample_positions

    assert _sample_positions(10, 100) == set(range(10)) and _sample_positions(3, 10) == {0, 1, 2}
    assert _sample_positions(14, 2) == {0, 13} and _sample_positions(5, 0) == set()


def test_cuda_decompose_matches_cpu(tiny_factory, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    src = tiny_factory("llama", torch.float32)
    decompose(str(src), 8, tmp_path / "cpu", device="cpu", svd="exact")
    decompose(str(src), 8, tmp_path / "gpu", device="cuda", svd="exact")
    a, b = load_file(tmp_path / "cpu" / ADAPTER_FILE), load_file(tmp_path / "gpu" / ADAPTER_FILE)
    wa, wb = all_tensors(tmp_path / "cpu"), all_tensors(tmp_path / "gpu")
    for k in a:
        if k.endswith("sorsa_S"):
            m = k.removesuffix(".sorsa_S")
            assert torch.allclose(a[k], b[k], rtol=1e-4)
            # the same principal part (singular vectors are defined up to sign) and residual
            pa, pb = ((d[m + ".sorsa_U"] * d[k]) @ d[m + ".sorsa_Vt"] for d in (a, b))
            assert torch.allclose(pa, pb, atol=1e-4 * pa.abs().max()), m
            assert torch.allclose(wa[m + ".weight"], wb[m + ".weight"], atol=1e-4 * pa.abs().max()), m


def test_checkpoint_index_reads_headers_only(tiny_factory):
    src = tiny_factory("gemma3", torch.bfloat16)
    ck = open_checkpoint(src)
    assert len(ck.shards) >= 3
    assert set(ck.weight_map) == set(all_tensors(src))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(ck.shard_of(name).read_tensor(name), all_tensors(src)[name])


def test_hub_id_resolved_from_offline_cache(tiny_factory, tmp_path, monkeypatch):
    """A Hub id found in the local HF cache works offline; the commit is recorded as revision."""
    import shutil

    src = tiny_factory("llama", torch.float32)
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--tester--tiny-llama"
    shutil.copytree(src, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    decompose("tester/tiny-llama", 4, tmp_path / "out")
    base = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())["base_model"]
    assert base["name_or_path"] == "tester/tiny-llama" and base["source"] == "hub" and base["revision"] == sha
    # a damaged cached index: one clear line, not a KeyError
    (repo / "snapshots" / sha / "model.safetensors.index.json").write_text('{"metadata": {}}')
    from sorsa_tools.errors import CheckpointError

    with pytest.raises(
        CheckpointError, match="tester/tiny-llama: its model.safetensors.index.json is not a valid"
    ):
        decompose("tester/tiny-llama", 4, tmp_path / "out2")


RWKV6_TARGETS = (
    r"blocks\.\d+\.(attention\.(receptance|key|value|gate|output)|feed_forward\.(key|receptance|value))$"
)


def test_rwkv6_checkpoint_decomposes_with_explicit_targets(tmp_path):
    """RWKV6 (the paper's fourth model) has no class in transformers, so nothing that needs the model
    is offered for it (README, "RWKV6"); decompose and merge --to hf are tensor-level and take its
    checkpoint layout (RWKV/v6-Finch-*-HF names) with --targets naming the 8 linear layers per block.
    The token-shift / decay low-rank matrices (time_maa_w1, time_decay_w1/w2: parameters, not
    nn.Linear) are not selected."""
    from safetensors.torch import save_file

    from sorsa_tools.merge import merge

    g = torch.Generator().manual_seed(0)
    d, ffn, t = 32, 112, {}
    t["rwkv.embeddings.weight"] = torch.randn(64, d, generator=g)
    for i in range(2):
        p = f"rwkv.blocks.{i}."
        for n in ("receptance", "key", "value", "gate", "output"):
            t[p + f"attention.{n}.weight"] = torch.randn(d, d, generator=g)
        t[p + "attention.time_maa_w1"] = torch.randn(d, 160, generator=g)
        t[p + "attention.time_maa_w2"] = torch.randn(5, 32, d, generator=g)
        t[p + "attention.time_decay_w1"] = torch.randn(d, 64, generator=g)
        t[p + "attention.time_decay_w2"] = torch.randn(64, d, generator=g)
        t[p + "feed_forward.key.weight"] = torch.randn(ffn, d, generator=g)
        t[p + "feed_forward.receptance.weight"] = torch.randn(d, d, generator=g)
        t[p + "feed_forward.value.weight"] = torch.randn(d, ffn, generator=g)
        t[p + "ln1.weight"] = torch.ones(d)
    t["head.weight"] = torch.randn(64, d, generator=g)
    src = tmp_path / "rwkv6"
    src.mkdir()
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    cfg = {
        "model_type": "rwkv6",
        "architectures": ["Rwkv6ForCausalLM"],
        "hidden_size": d,
        "num_hidden_layers": 2,
    }
    (src / "config.json").write_text(json.dumps(cfg))
    r = decompose(str(src), 4, tmp_path / "dec", targets=RWKV6_TARGETS, svd="exact", check_sample=0)
    targets = json.loads((tmp_path / "dec" / CONFIG_FILE).read_text())["target_modules"]
    assert r.modules == len(targets) == 16 and not any("time_" in m for m in targets)
    merge(tmp_path / "dec", tmp_path / "merged")
    back = all_tensors(tmp_path / "merged")
    assert set(back) == set(t)
    assert all(torch.allclose(back[k], v, atol=1e-5, rtol=0) for k, v in t.items())
