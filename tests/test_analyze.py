"""`sorsa analyze`: Delta Sigma and Delta D (paper eq. 1-4) on hand-built matrices with known
answers, on the tiny model (untrained adapter ~ 0, trained run > 0), its JSON and PNG, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import GSM8K_SLICE
from safetensors.torch import load_file
from test_cli_errors import assert_clean_error, run

from sorsa_tools import decompose
from sorsa_tools.analyze import (
    JSON_FORMAT,
    analyze,
    deltas,
    full_svd,
    layer_of,
    module_order,
    parse_layers,
    plot,
    svd_deltas,
    write_json,
)
from sorsa_tools.errors import AdapterMismatchError, InputError, ModelMismatchError, TargetError
from sorsa_tools.format import ADAPTER_FILE, factor_names

F64 = torch.float64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- golden values on hand-built matrices -------------------------------------------------------
def _orthonormal(m: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(m, m, dtype=F64, generator=torch.Generator().manual_seed(seed)))
    return q[:, :k]


def _plane_rotation(k: int, i: int, theta: float) -> torch.Tensor:
    """Identity with columns i, i+1 turned by theta inside their plane."""
    R = torch.eye(k, dtype=F64)
    c, s = math.cos(theta), math.sin(theta)
    R[i, i], R[i, i + 1], R[i + 1, i], R[i + 1, i + 1] = c, -s, s, c
    return R


U0, V0 = _orthonormal(6, 4, 0), _orthonormal(4, 4, 1)  # a tall 6 x 4 matrix, k = 4
S0 = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=F64)
W0 = U0 @ torch.diag(S0) @ V0.T


def test_scaled_singular_values_same_vectors():
    """Same vectors, S scaled by (1.5, 1.25, 1, 0.5) (order kept): Delta D = 0 and
    Delta Sigma = (|12-8| + |5-4| + 0 + |0.5-1|) / 4 = 5.5 / 4 = 1.375."""
    Wt = U0 @ torch.diag(S0 * torch.tensor([1.5, 1.25, 1.0, 0.5], dtype=F64)) @ V0.T
    d = deltas(W0, Wt)
    assert d.delta_sigma == pytest.approx(1.375, abs=1e-12)
    assert abs(d.delta_d) < 1e-12 and abs(d.delta_u) < 1e-12 and abs(d.delta_v) < 1e-12


def test_rotated_singular_vectors_same_values():
    """u1, u2 turned by 60 degrees in their plane, v3, v4 by 90 degrees, same S: Delta Sigma = 0;
    |cos| of U = (0.5, 0.5, 1, 1), of V = (1, 1, 0, 0), so Delta D = 1 - (3 + 2) / 8 = 0.375
    (eq. 4), with delta_u = 1 - 3/4 = 0.25 and delta_v = 1 - 2/4 = 0.5."""
    Ut, Vt = U0 @ _plane_rotation(4, 0, math.pi / 3), V0 @ _plane_rotation(4, 2, math.pi / 2)
    Wt = Ut @ torch.diag(S0) @ Vt.T
    d = deltas(W0, Wt)
    assert abs(d.delta_sigma) < 1e-12
    assert d.delta_d == pytest.approx(0.375, abs=1e-12)
    assert d.delta_u == pytest.approx(0.25, abs=1e-12) and d.delta_v == pytest.approx(0.5, abs=1e-12)
    # the wide (transposed) matrix goes through the transposed SVD: U and V trade places
    dT = deltas(W0.T, Wt.T)
    assert dT.delta_d == pytest.approx(0.375, abs=1e-12)
    assert dT.delta_u == pytest.approx(0.5, abs=1e-12) and dT.delta_v == pytest.approx(0.25, abs=1e-12)
    # float32 SVDs agree to float32 rounding
    assert deltas(W0, Wt, torch.float32).delta_d == pytest.approx(0.375, abs=1e-5)


def test_sign_flips_do_not_count_and_swapped_order_does():
    """Flipping the sign of a singular pair changes nothing (|cos|). Two singular values that swap
    order are paired by rank, as in the paper: with S_t = (4, 8, 2, 1) on the same vectors the
    sorted values are unchanged (Delta Sigma = 0) but pairs 1 and 2 meet orthogonal vectors:
    Delta D = 1 - (2 + 2) / 8 = 0.5."""
    flip = torch.diag(torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64))
    d = deltas(W0, (U0 @ flip) @ torch.diag(S0) @ (V0 @ flip).T)
    assert abs(d.delta_sigma) < 1e-12 and abs(d.delta_d) < 1e-12
    d = deltas(W0, U0 @ torch.diag(torch.tensor([4.0, 8.0, 2.0, 1.0], dtype=F64)) @ V0.T)
    assert abs(d.delta_sigma) < 1e-12 and d.delta_d == pytest.approx(0.5, abs=1e-12)


def test_base_svd_is_reused_and_shapes_must_match():
    b = full_svd(W0)
    assert svd_deltas(b, full_svd(W0)).delta_d == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ModelMismatchError, match=r"shapes \(6, 4\) and \(4, 6\) differ"):
        deltas(W0, W0.T)


def test_parse_layers():
    assert parse_layers("0, 3,10-12") == {0, 3, 10, 11, 12}
    with pytest.raises(InputError, match=r"--layers '3-1': '3-1' is not a layer index or range"):
        parse_layers("3-1")
    names = ["model.layers.10.mlp.down_proj", "model.layers.2.mlp.up_proj", "model.layers.2.self_attn.o_proj"]
    names += ["lm_head", "model.layers.2.self_attn.q_proj"]
    assert sorted(names, key=module_order) == [
        "lm_head",
        "model.layers.2.self_attn.q_proj",
        "model.layers.2.self_attn.o_proj",
        "model.layers.2.mlp.up_proj",
        "model.layers.10.mlp.down_proj",
    ]
    assert [layer_of(n) for n in names] == [10, 2, 2, None, 2]


# -- the tiny model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_lm_decomposed, tmp_path_factory):
    """(source, DIR, RUN): the tiny model trained 4 steps at a high lr (one run keeps the file fast;
    the trajectory tests pair it with DIR's own adapter, step 0)."""
    from sorsa_tools.train import TrainConfig, train

    src, dec = tiny_lm_decomposed("llama")
    run_dir = tmp_path_factory.mktemp("analyze-runs") / "step-4"
    cfg = TrainConfig(max_length=256, batch_size=2, lr=2e-2, warmup_ratio=0.0, max_steps=4)
    train(dec, GSM8K_SLICE, run_dir, config=cfg, device="cpu", save_every=2, keep_adapters=True)
    return src, dec, run_dir


BLOCK_ORDER = [
    f"model.layers.{i}.{m}"
    for i in (0, 1)
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
]


def _targets(dec: Path) -> list[str]:
    return json.loads((dec / "sorsa_config.json").read_text())["target_modules"]


def test_base_against_itself_is_zero(tiny_lm_decomposed):
    src, _ = tiny_lm_decomposed("llama")
    r = analyze(src, [src])
    assert len(r.modules) == 14  # the default llama targets, 7 per layer
    for m in r.modules:
        (x,) = m["results"]
        assert x["delta_sigma"] == 0.0 and abs(x["delta_d"]) < 1e-12 and x["delta_w_rel"] == 0.0, m["module"]


def test_untrained_adapter_is_the_original_model(tiny_lm_decomposed):
    """DIR's own adapter folds back to the original within float32 rounding of W_r + U S Vt
    (||dW|| / ||W|| ~ 2e-8): Delta Sigma below 1e-7 of the mean singular value and Delta D below
    1e-9 (measured ~2e-9 and ~1e-13), both ways round."""
    src, dec = tiny_lm_decomposed("llama")
    for base, tuned in ((src, dec), (dec, src)):
        r = analyze(base, [tuned])
        assert [m["module"] for m in r.modules] == BLOCK_ORDER  # by layer, then as in a block
        for m in r.modules:
            (x,) = m["results"]
            assert x["delta_sigma"] < 1e-7 * m["sigma_mean"] and x["delta_d"] < 1e-9, (m["module"], x)
            assert x["delta_w_rel"] < 1e-6


def test_trained_run_moves_every_target(trained):
    """After 4 steps at lr 2e-2 every target has moved (Delta Sigma > 1e-4 of the mean singular
    value, Delta D > 1e-3); the numbers equal an independent computation from the run's files, and
    reading the base from the original model or from DIR gives the same answer."""
    src, dec, run_dir = trained
    r = analyze(dec, adapters=[run_dir])
    assert r.checkpoints == [{"label": "step-4", "path": str(dec), "adapter": str(run_dir), "step": 4}]
    assert {m["module"] for m in r.modules} == set(_targets(dec))
    for m in r.modules:
        (x,) = m["results"]
        assert x["delta_sigma"] > 1e-4 * m["sigma_mean"] and x["delta_d"] > 1e-3, (m["module"], x)
        assert 0 < x["delta_d"] < 1 and x["delta_d"] == pytest.approx((x["delta_u"] + x["delta_v"]) / 2)
    # one module by hand, with torch.linalg.svd directly
    mod = "model.layers.1.self_attn.v_proj"
    residual = {}
    for p in dec.glob("model*.safetensors"):
        residual.update(load_file(p))
    W_r = residual[mod + ".weight"].double()
    U0_, S0_, V0_ = (load_file(dec / ADAPTER_FILE)[n].double() for n in factor_names(mod))
    Ut_, St_, Vt_ = (load_file(run_dir / ADAPTER_FILE)[n].double() for n in factor_names(mod))
    A = torch.linalg.svd(W_r + (U0_ * S0_) @ V0_, full_matrices=False)
    B = torch.linalg.svd(W_r + (Ut_ * St_) @ Vt_, full_matrices=False)
    want_s = (A.S - B.S).abs().mean().item()
    want_d = 1 - ((A.U * B.U).sum(0).abs().sum() + (A.Vh * B.Vh).sum(1).abs().sum()).item() / (2 * len(A.S))
    (got,) = next(m for m in r.modules if m["module"] == mod)["results"]
    # W is folded in float32 by MergedSource, here in float64: agreement to float32 rounding
    assert got["delta_sigma"] == pytest.approx(want_s, rel=1e-4)
    assert got["delta_d"] == pytest.approx(want_d, rel=1e-4)
    # BASE = the original model, TUNED = DIR + --adapter, or the run itself (its DIR is recorded)
    r2 = analyze(src, [dec, run_dir], adapters=[run_dir], modules="v_proj")
    assert [c["label"] for c in r2.checkpoints] == ["step-4", "step-4 #2"]
    assert [m["module"] for m in r2.modules] == ["model.layers.0.self_attn.v_proj", mod]
    for x in r2.modules[1]["results"]:
        assert x["delta_sigma"] == pytest.approx(got["delta_sigma"], rel=1e-4)
        assert x["delta_d"] == pytest.approx(got["delta_d"], rel=1e-4)


def test_several_checkpoints_json_and_png(trained, tmp_path):
    """A trajectory: DIR's own adapter (step 0, ~0) then the run; JSON schema; a valid PNG."""
    _, dec, run_dir = trained
    r = analyze(dec, [dec, run_dir], layers="1", modules="q_proj,v_proj")
    assert [c["label"] for c in r.checkpoints] == [f"{dec.name} (own adapter)", "step-4"]
    assert [m["module"] for m in r.modules] == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    for m in r.modules:
        own, trained_ = m["results"]
        assert own["delta_d"] < 1e-9 < 1e-3 < trained_["delta_d"]
    doc = json.loads(write_json(r, tmp_path / "out" / "a.json").read_text())
    assert doc["format"] == JSON_FORMAT and doc["version"] == 1
    assert set(doc) == {
        "format", "version", "definitions", "base", "checkpoints", "svd", "filters", "modules", "summary",
        "seconds", "svd_seconds",
    }  # fmt: skip
    assert doc["svd"] == {"device": "cpu", "dtype": "float64", "function": "torch.linalg.svd (LAPACK)"}
    assert doc["base"]["kind"] == "decomposition"
    assert doc["filters"] == {"layers": "1", "modules": "q_proj,v_proj"}
    assert doc["checkpoints"][1] == {"label": "step-4", "path": str(dec), "adapter": str(run_dir), "step": 4}
    m = doc["modules"][0]
    assert set(m) == {
        "module",
        "layer",
        "type",
        "shape",
        "k",
        "sigma_max",
        "sigma_mean",
        "min_rel_gap",
        "results",
    }
    assert m["layer"] == 1 and m["type"] == "q_proj" and m["k"] == min(m["shape"]) == 64
    assert [x["checkpoint"] for x in m["results"]] == [c["label"] for c in doc["checkpoints"]]
    assert set(m["results"][0]) == {
        "checkpoint",
        "delta_sigma",
        "delta_d",
        "delta_u",
        "delta_v",
        "delta_w_rel",
    }
    s = doc["summary"][1]
    assert s["checkpoint"] == "step-4" and set(s["by_type"]) == {"q_proj", "v_proj"}
    assert s["mean_delta_d"] == pytest.approx(sum(x["results"][1]["delta_d"] for x in doc["modules"]) / 2)
    assert s["max_delta_d"] == max(x["results"][1]["delta_d"] for x in doc["modules"])
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name != "a.json"]  # no temp file left
    png = plot(r, tmp_path / "fig.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 700  # two panels side by side


def test_trajectory_of_one_run_from_its_kept_adapters(trained):
    """train --keep-adapters leaves RUN/steps/step-N, each a run of its own: analyze takes them as
    TUNED and reads their step; the mean rotation grows from step 2 to step 4 at this lr."""
    _, dec, run_dir = trained
    snap = run_dir / "steps" / "step-000002"
    assert sorted(p.name for p in (run_dir / "steps").iterdir()) == ["step-000002"]
    r = analyze(dec, [snap, run_dir], layers="0")
    assert [(c["label"], c["step"]) for c in r.checkpoints] == [("step-000002", 2), ("step-4", 4)]
    s2, s4 = r.summary()
    assert 1e-6 < s2["mean_delta_d"] < s4["mean_delta_d"], (s2["mean_delta_d"], s4["mean_delta_d"])


def test_cli_table_json_and_default_plot(trained, tmp_path, monkeypatch):
    _, dec, run_dir = trained
    args = ["analyze", str(dec), "--adapter", str(run_dir), "--layers", "0"]
    res = run(*args, "--modules", "q_proj,down_proj", "--json", str(tmp_path / "r.json"))
    assert res.exit_code == 0, res.stderr
    for word in ("q_proj", "down_proj", "mean", "ΔΣ", "ΔD", "step-4", "json", "plot"):
        assert word in res.stdout, word
    doc = json.loads((tmp_path / "r.json").read_text())
    assert len(doc["modules"]) == 2 and doc["filters"]["modules"] == "q_proj,down_proj"
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC  # default: next to the JSON
    monkeypatch.chdir(tmp_path)
    res = run(*args, "--modules", "k_proj", "--json", "-")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)  # stdout holds the JSON only
    assert [m["module"] for m in doc["modules"]] == ["model.layers.0.self_attn.k_proj"]
    assert (tmp_path / "analyze.png").read_bytes()[:8] == PNG_MAGIC  # default without a JSON file
    res = run(*args, "--modules", "k_proj", "--no-plot", "--plot", str(tmp_path / "x.png"))
    assert res.exit_code == 0 and not (tmp_path / "x.png").exists()
    assert "--no-plot" in res.stdout and "not written" in res.stdout


def test_existing_results_are_not_overwritten_without_force(trained, tmp_path):
    """--json mine.json used to overwrite mine.json and write mine.png unasked."""
    _, dec, run_dir = trained
    args = ["analyze", str(dec), "--adapter", str(run_dir), "--layers", "0", "--modules", "k_proj"]
    mine, png = tmp_path / "mine.json", tmp_path / "mine.png"
    mine.write_text("mine")
    assert_clean_error(run(*args, "--json", str(mine)), f"{mine} already exists (--json)", "--force")
    mine.unlink()
    png.write_text("mine")
    assert_clean_error(run(*args, "--json", str(mine)), f"{png} already exists (--plot from --json)")
    assert png.read_text() == "mine" and not mine.exists()
    res = run(*args, "--json", str(mine), "--force")
    assert res.exit_code == 0, res.stderr
    assert png.read_bytes()[:8] == PNG_MAGIC and json.loads(mine.read_text())["modules"]
    assert f"wrote {mine}" in res.stderr and f"wrote {png}" in res.stderr


# -- bad input ----------------------------------------------------------------------------------
def _tiny_llama(path: Path, **over) -> Path:
    """A tiny llama of other dimensions (another architecture for the shape checks)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    cfg.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **over)
    AutoModelForCausalLM.from_config(LlamaConfig(**cfg)).save_pretrained(path)
    return path


def test_other_architecture_is_refused(tiny_lm_decomposed, tmp_path):
    src, dec = tiny_lm_decomposed("llama")
    wide = _tiny_llama(tmp_path / "wide", intermediate_size=80)
    assert_clean_error(
        run("analyze", str(dec), str(wide)),
        "error: model.layers.0.mlp.gate_proj.weight is (80, 64) in TUNED wide but (96, 64) in BASE; "
        "pass a checkpoint fine-tuned from BASE (same architecture)",
    )
    short = _tiny_llama(tmp_path / "short", num_hidden_layers=1)
    assert_clean_error(
        run("analyze", str(src), str(short)),
        "TUNED short has no model.layers.1.self_attn.q_proj.weight, which BASE has",
        "--modules/--layers",
    )
    with pytest.raises(ModelMismatchError):
        analyze(src, [short])
    # the other way round: the deeper model as TUNED of a shallower BASE
    assert_clean_error(
        run("analyze", str(short), str(dec), "--no-plot"),
        "BASE has no model.layers.1.",
        "pass the model TUNED was fine-tuned from",
    )
    r = analyze(src, [short], layers="0", modules="q_proj")  # leaving the module out works
    assert [m["module"] for m in r.modules] == ["model.layers.0.self_attn.q_proj"]


def test_non_finite_weight_is_named(tiny_lm_decomposed, tmp_path):
    from safetensors.torch import save_file

    src, _ = tiny_lm_decomposed("llama")
    bad = tmp_path / "diverged"
    shutil.copytree(src, bad)
    name = "model.layers.0.mlp.down_proj.weight"
    for shard in bad.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name][1, 2] = float("nan")
            save_file(tensors, shard, metadata={"format": "pt"})
    assert_clean_error(
        run("analyze", str(src), str(bad)),
        f"error: {name} of TUNED diverged holds 1 NaN or inf value(s)",
    )


def test_adapter_of_another_decomposition(trained, tmp_path):
    src, _, run_dir = trained
    other = tmp_path / "other"
    decompose(str(src), 4, other, svd="exact", check_sample=0)
    res = run("analyze", str(other), "--adapter", str(run_dir))
    assert_clean_error(res, "was trained on another decomposition (job id", "pass the DIR it was trained on")
    with pytest.raises(AdapterMismatchError):
        analyze(src, [other], adapters=[run_dir])


def test_filters_that_match_nothing(tiny_lm_decomposed):
    src, dec = tiny_lm_decomposed("llama")
    assert_clean_error(
        run("analyze", str(dec), str(src), "--layers", "7-9"),
        "error: --layers '7-9' match none of the 14 adapted matrices (types down_proj, gate_proj, k_proj, "
        "o_proj, q_proj, up_proj, v_proj; layers 0-1); pass names such as down_proj and layers in that range",
    )
    assert_clean_error(
        run("analyze", str(dec), str(src), "--modules", "qkv_proj"), "--modules 'qkv_proj' match none"
    )
    with pytest.raises(TargetError, match="--modules 'q_proj' and --layers '5'"):
        analyze(src, [dec], modules="q_proj", layers="5")
    assert_clean_error(
        run("analyze", str(dec), str(src), "--layers", "x"), "'x' is not a layer index or range"
    )
    assert_clean_error(
        run("analyze", str(dec), str(src), "--modules", "(q"), "neither a list of names nor a valid regex"
    )


def test_bad_paths_and_options(trained, tmp_path):
    src, dec, run_dir = trained
    assert_clean_error(run("analyze", str(tmp_path / "nope"), str(src)), "BASE", "no such directory")
    (tmp_path / "empty").mkdir()
    assert_clean_error(run("analyze", str(src), str(tmp_path / "empty")), "has no config.json")
    assert_clean_error(run("analyze", str(run_dir), str(src)), "BASE", "is a trained run", "--adapter")
    assert_clean_error(run("analyze", str(src)), "nothing to compare with BASE")
    assert_clean_error(
        run("analyze", str(src), "--adapter", str(run_dir)), "--adapter needs the decomposed DIR"
    )
    dec2 = tmp_path / "dec2"
    shutil.copytree(dec, dec2)
    res = run("analyze", str(src), str(dec), str(dec2), "--adapter", str(run_dir))
    assert_clean_error(res, "--adapter is ambiguous: 2 TUNED directories are decomposed DIRs")
    assert_clean_error(run("analyze", str(dec), str(src), "--precision", "float16"), "--precision 'float16'")
    unfinished = tmp_path / "unfinished"  # a run still training: run.json and checkpoint/, no config
    shutil.copytree(run_dir, unfinished)
    (unfinished / "sorsa_config.json").unlink()
    (unfinished / "checkpoint").mkdir()
    shutil.copy(run_dir / ADAPTER_FILE, unfinished / "checkpoint" / ADAPTER_FILE)
    (unfinished / "checkpoint" / "state.json").write_text('{"step": 2}')
    for bad in (unfinished, unfinished / "checkpoint"):
        res = run("analyze", str(dec), "--adapter", str(bad))
        assert_clean_error(res, f"{bad} is an unfinished `sorsa train` run or its checkpoint", "--resume")
    res = run("analyze", str(dec), str(unfinished))
    assert_clean_error(res, f"{unfinished} is an unfinished `sorsa train` run")
    (tmp_path / "p.png").mkdir()
    res = run("analyze", str(dec), str(src), "--plot", str(tmp_path / "p.png"))
    assert_clean_error(res, "--plot", "is a directory")
