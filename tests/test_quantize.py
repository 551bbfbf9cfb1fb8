"""QSORSA: the quantized residual (bitsandbytes NF4 / int8), the QPiSSA alternation, and the DIR
that transformers loads as a pre-quantized checkpoint."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("bitsandbytes")

from sorsa_tools import quantize as qz  # noqa: E402
from sorsa_tools.cli import app  # noqa: E402
from sorsa_tools.decompose import decompose  # noqa: E402
from sorsa_tools.io.checkpoint import open_checkpoint  # noqa: E402
from sorsa_tools.svd import exact_svd, residual  # noqa: E402

runner = CliRunner()
GSM8K = Path(__file__).resolve().parent.parent / "examples" / "data" / "gsm8k_train_256.jsonl"
NF4_HALF_GAP = (1.0 - 0.6961928009986877) / 2  # the widest gap of the NF4 code, halved


def decaying(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g))
    return (u * torch.logspace(0, -2, k)) @ v.T * 0.05


def one_line_error(res, *needles: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stdout
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_nf4_round_trip_within_the_code_bound():
    W = decaying(96, 128)
    s = qz.settings("nf4")
    t = qz.quantize(W, s)
    D = qz.dequantize(t, s)
    blocks = (W - D).reshape(-1, 64).abs().amax(1)
    absmax = W.reshape(-1, 64).abs().amax(1)
    # the code's widest half-gap, plus the 8-bit rounding of each block's absmax (double quant)
    assert bool((blocks <= absmax * (NF4_HALF_GAP + 0.01)).all())
    assert float(blocks.max()) > 0.5 * NF4_HALF_GAP * float(absmax.min())  # it is really 4 bits
    assert [k for k in t] == [n for n, _, _ in qz.specs((96, 128), s)]
    assert qz.packed_state_json(t["weight.quant_state.bitsandbytes__nf4"])["shape"] == [96, 128]


def test_int8_round_trip_within_half_a_step():
    W = decaying(64, 96)
    s = qz.settings("int8")
    D = qz.dequantize(qz.quantize(W, s), s).float()
    step = W.abs().amax(1, keepdim=True) / 127
    assert bool(((W - D).abs() <= step * 0.5 + W.abs() * 2**-10).all())  # + W's rounding to fp16


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_more_iterations_absorb_more(fmt):
    W = decaying(128, 192)

    def reduction(iters: int) -> float:
        s = qz.settings(fmt, iters)
        a = qz.absorb(W, s, torch.float32, lambda M: exact_svd(M, 16))
        return qz.error_reduction(
            residual(W - a.dequantized, a.factors), qz.qlora_error(W, s, torch.float32), qz.nuclear
        )

    r1, r5 = reduction(1), reduction(5)
    assert 0.05 < r1 <= r5 < 1.0, (r1, r5)


def test_decompose_nf4_writes_a_checkpoint_transformers_loads(tiny_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_factory("llama")
    out = tmp_path / "q"
    r = decompose(str(src), 8, out, quantize="nf4", quant_iters=2, svd="exact", check_sample=1)
    cfg = json.loads((out / "sorsa_config.json").read_text())
    q = cfg["quantization"]
    assert q["format"] == "nf4" and q["iters"] == 2 and q["block_size"] == 64 and q["double_quant"]
    assert r.quantization["mean_error_reduction_fro"] == q["mean_error_reduction_fro"] > 0.3
    m = cfg["modules"]["model.layers.0.self_attn.q_proj"]
    assert m["quant_error"] < m["qlora_error"] and len(m["quant_error_by_iter"]) == 2
    assert sum(s["error_reduction_nuclear"] is not None for s in cfg["modules"].values()) == 1
    hf = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (
        hf["quant_method"] == "bitsandbytes"
        and hf["load_in_4bit"]
        and "lm_head" in hf["llm_int8_skip_modules"]
    )

    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    lin = model.model.layers[0].self_attn.q_proj
    assert type(lin).__name__ == "Linear4bit"
    ckpt = open_checkpoint(out)
    name = "model.layers.0.self_attn.q_proj"
    stored = {
        k.removeprefix(name + "."): ckpt.shard_of(k).read_tensor(k)
        for k in ckpt.weight_map
        if k.startswith(name + ".weight")
    }
    D = qz.dequantize(stored, qz.settings("nf4"))
    import bitsandbytes.functional as F

    assert torch.equal(F.dequantize_4bit(lin.weight.data, lin.weight.quant_state), D)  # what it loaded
    x = torch.randn(3, D.shape[1])
    with torch.no_grad():  # bnb's CPU 4-bit matmul rounds more than float32 (measured 1e-2 relative)
        y, want = lin(x), x @ D.T
    assert float((y - want).norm() / want.norm()) < 3e-2
    # the untouched tensors are the source's, byte for byte
    src_ckpt = open_checkpoint(src)
    e = "model.embed_tokens.weight"
    assert torch.equal(ckpt.shard_of(e).read_tensor(e), src_ckpt.shard_of(e).read_tensor(e))


def test_decompose_int8_loads_as_linear8bit(tiny_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q8"
    decompose(str(tiny_factory("llama")), 8, out, quantize="int8", svd="exact")
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "Linear8bitLt"
    cfg = json.loads((out / "sorsa_config.json").read_text())
    assert cfg["quantization"]["mean_quant_error"] < cfg["quantization"]["mean_qlora_error"]


def _decompose(*args: str):
    return runner.invoke(app, ["decompose", *args])


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--quantize", "nf3"], ["--quantize must be one of nf4, int8", "'nf3'"]),
        (["--quantize", "nf4", "--quant-iters", "0"], ["--quant-iters must be 1 or more"]),
        (["--quant-iters", "3"], ["need --quantize"]),
        (["--quantize", "nf4", "--residual-dtype", "bfloat16"], ["--residual-dtype does not apply"]),
        (["--quantize", "int8", "--quant-block-size", "64"], ["does not apply to int8"]),
        (
            ["--quantize", "nf4", "--quant-block-size", "4096"],
            ["does not split into nf4 blocks of 4096", "mlp"],
        ),
    ],
)
def test_bad_quantize_options_are_one_line(tiny_factory, tmp_path, extra, needles):
    out = tmp_path / "o"
    res = _decompose(str(tiny_factory("llama")), "--rank", "4", "-o", str(out), *extra)
    one_line_error(res, *needles)
    assert not out.exists()


def test_missing_bitsandbytes_names_the_pip_command(tiny_factory, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    out = tmp_path / "o"
    res = _decompose(str(tiny_factory("llama")), "--rank", "4", "-o", str(out), "--quantize", "nf4")
    one_line_error(res, "pip install bitsandbytes")
    assert not out.exists()


def test_quantized_source_and_other_settings_on_resume_are_refused(tiny_factory, tmp_path):
    src = tiny_factory("llama")
    out = tmp_path / "q"
    assert (
        _decompose(str(src), "--rank", "4", "-o", str(out), "--quantize", "nf4", "--svd", "exact").exit_code
        == 0
    )
    one_line_error(_decompose(str(out), "--rank", "4", "-o", str(tmp_path / "o2")), "already")
    merged = tmp_path / "bnb"
    shutil.copytree(src, merged)
    cfg = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(
        json.dumps({**cfg, "quantization_config": {"quant_method": "bitsandbytes"}})
    )
    one_line_error(_decompose(str(merged), "--rank", "4", "-o", str(tmp_path / "o3")), "already quantized")
    assert not (tmp_path / "o3").exists()
    # a partial run with other quantize settings: named, not resumed
    (out / "sorsa_config.json").unlink()
    partial = out / ".sorsa-partial"
    partial.mkdir(exist_ok=True)
    job = {
        "job_id": "x",
        "source_fingerprint": "f",
        "quantization": {"format": "nf4", "block_size": 64, "double_quant": True, "iters": 1},
    }
    (partial / "job.json").write_text(json.dumps(job))
    line = one_line_error(
        _decompose(str(src), "--rank", "4", "-o", str(out), "--quantize", "nf4", "--quant-iters", "5"),
        "quantization",
        "--force",
    )
    assert "'iters': 1" in line and "'iters': 5" in line


def test_plain_decompose_job_is_unchanged(tiny_factory, tmp_path):
    """No --quantize: no quantization key, so existing decompositions keep their job ids."""
    out = tmp_path / "p"
    decompose(str(tiny_factory("llama")), 4, out, svd="exact")
    cfg = json.loads((out / "sorsa_config.json").read_text())
    assert "quantization" not in cfg
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_inspect_shows_the_quantizer(tiny_factory, tmp_path):
    out = tmp_path / "q"
    decompose(str(tiny_factory("llama")), 4, out, quantize="nf4", svd="exact")
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0, res.stdout
    assert "nf4" in res.stdout and "error reduction vs QLoRA" in res.stdout


@pytest.fixture(scope="module")
def quantized_lm(tmp_path_factory):
    """(source, NF4 QSORSA DIR at rank 8) of a tiny model with a tokenizer, for training."""
    from conftest import make_tiny_lm

    src = make_tiny_lm(tmp_path_factory.mktemp("qlm"))
    out = tmp_path_factory.mktemp("qlm-sorsa") / "d"
    decompose(str(src), 8, out, quantize="nf4", svd="exact", check_sample=0)
    return src, out


def test_train_on_a_quantized_residual_keeps_it_quantized(quantized_lm, tmp_path):
    from safetensors.torch import load_file

    from sorsa_tools.model import load_sorsa_model
    from sorsa_tools.train import TrainConfig, train

    src, dec = quantized_lm
    model, layers, _ = load_sorsa_model(dec, trainable=True)
    ckpt = open_checkpoint(dec)
    stored = sum(
        ckpt.info(n).nbytes
        for m in layers
        for n in ckpt.weight_map
        if n.startswith(m + ".weight") or n == m + ".SCB"
    )
    assert sum(layer.residual_quant.nbytes for layer in layers.values()) == stored  # the quantized size
    assert all(layer.weight.numel() == 0 for layer in layers.values())  # no dense W_r anywhere
    assert not any(type(mod).__name__ == "Linear4bit" for mod in model.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("sorsa_U", "sorsa_S", "sorsa_Vt") for n in trainable)

    run = tmp_path / "run"
    cfg = TrainConfig(
        max_length=384, batch_size=4, lr=1e-2, warmup_ratio=0.1, max_steps=16, grad_checkpointing=True
    )
    train(dec, GSM8K, run, config=cfg, device="cpu")
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    first, last = sum(x["loss"] for x in log[:4]) / 4, sum(x["loss"] for x in log[-4:]) / 4
    assert last < first - 0.02, (first, last)
    new, old = load_file(run / "sorsa_adapter.safetensors"), load_file(dec / "sorsa_adapter.safetensors")
    assert all(not torch.equal(new[k], old[k]) for k in new)
    rcfg = json.loads((run / "sorsa_config.json").read_text())
    assert rcfg["quantization"]["format"] == "nf4"  # inspect RUN shows what it was trained over


def test_offload_residual_is_refused_on_a_quantized_dir(quantized_lm, tmp_path):
    _, dec = quantized_lm
    res = runner.invoke(
        app,
        [
            "train",
            str(dec),
            "--data",
            str(GSM8K),
            "-o",
            str(tmp_path / "r"),
            "--offload-residual",
            "--max-steps",
            "1",
        ],
    )
    assert res.exit_code == 2 and "Traceback" not in res.stderr + res.stdout
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]  # after train's CPU warning
    assert len(errors) == 1 and "--offload-residual does not apply" in errors[0] and "nf4" in errors[0]
    assert not (tmp_path / "r").exists()


def test_merge_folds_dequantized_residual_plus_factors(quantized_lm, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sorsa_tools.merge import merge
    from sorsa_tools.model import load_sorsa_model

    src, dec = quantized_lm
    out = tmp_path / "merged"
    merge(dec, out, to="hf")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    assert not any(k.endswith(("absmax", "quant_map", "bitsandbytes__nf4")) for k in merged)
    m = "model.layers.1.mlp.down_proj"
    ckpt = open_checkpoint(dec)
    from sorsa_tools.qresidual import read_quantized

    s = qz.QuantSettings.from_json(json.loads((dec / "sorsa_config.json").read_text())["quantization"])
    shape = tuple(merged[m + ".weight"].shape)
    D = qz.dequantize(read_quantized(ckpt, m, shape, s), s).float()
    a = load_file(dec / "sorsa_adapter.safetensors")
    want = D + (a[m + ".sorsa_U"] * a[m + ".sorsa_S"]) @ a[m + ".sorsa_Vt"]
    assert torch.allclose(merged[m + ".weight"], want, atol=1e-6)
    # the merged model is the model trained: the SORSA layers over the quantized residual
    x = torch.randint(3, 384, (2, 12))
    sorsa, _, _ = load_sorsa_model(dec)
    dense = AutoModelForCausalLM.from_pretrained(out)
    orig = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        ys, yd, yo = sorsa(x).logits, dense(x).logits, orig(x).logits
    assert torch.allclose(ys, yd, atol=1e-4), float((ys - yd).abs().max())
    assert 0 < float((yd - yo).norm() / yo.norm()) < 0.2  # close to the original, by the quantization error


def test_merge_to_gguf_from_a_quantized_dir(quantized_lm, tmp_path):
    pytest.importorskip("gguf")
    from gguf import GGUFReader

    from sorsa_tools.merge import merge

    _, dec = quantized_lm
    out = tmp_path / "m.gguf"
    merge(dec, out, to="gguf", outtype="f32")
    names = [t.name for t in GGUFReader(out).tensors]
    assert "blk.0.attn_q.weight" in names and not any("absmax" in n for n in names)


def test_export_lora_from_a_quantized_dir_reports_the_gap(quantized_lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sorsa_tools.model import load_sorsa_model
    from sorsa_tools.train import TrainConfig, train

    src, dec = quantized_lm
    run = tmp_path / "run"
    train(
        dec, GSM8K, run, config=TrainConfig(max_length=256, batch_size=2, lr=1e-2, max_steps=3), device="cpu"
    )
    out = tmp_path / "lora"
    res = runner.invoke(app, ["export-lora", str(dec), "--adapter", str(run), "-o", str(out)])
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "vs the trained model" in res.stdout and "nf4" in res.stdout
    prov = json.loads((out / "sorsa_provenance.json").read_text())
    gap = prov["export"]["quantization_gap"]
    dcfg = json.loads((dec / "sorsa_config.json").read_text())
    assert gap["mean_rel_error"] == pytest.approx(dcfg["quantization"]["mean_quant_error"])
    # PEFT on the original base: the trained model up to that gap
    x = torch.randint(3, 384, (2, 12))
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src), out)
    trained, _, _ = load_sorsa_model(dec, run)
    base = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        yl, yt, yb = lora(x).logits, trained(x).logits, base(x).logits
    off = float((yl - yt).norm() / yt.norm())
    assert 0 < off < 0.2, off
    assert float((yl - yb).abs().max()) > 1e-4  # the LoRA carries the training


def test_eval_and_analyze_read_a_quantized_dir(quantized_lm, tmp_path):
    from sorsa_tools.train import TrainConfig, train

    _, dec = quantized_lm
    run = tmp_path / "run"
    train(
        dec, GSM8K, run, config=TrainConfig(max_length=256, batch_size=2, lr=1e-2, max_steps=2), device="cpu"
    )
    out = tmp_path / "e.jsonl"
    res = runner.invoke(
        app,
        ["eval", "gsm8k", str(dec), "--adapter", str(run), "--data", str(GSM8K), "--limit", "2"]
        + ["--metric", "nll", "--device", "cpu", "-o", str(out)],
    )
    assert res.exit_code == 0, res.stdout + res.stderr
    nll = json.loads(out.with_suffix(".json").read_text())["nll"]
    assert 0 < nll < 10
    res = runner.invoke(
        app,
        [
            "analyze",
            str(dec),
            "--adapter",
            str(run),
            "--json",
            "-",
            "--modules",
            "q_proj",
            "--plot",
            str(tmp_path / "a.png"),
        ],
    )
    assert res.exit_code == 0, res.stdout + res.stderr
    mods = json.loads(res.stdout)["modules"]
    assert len(mods) == 2 and all(m["results"][0]["delta_sigma"] > 0 for m in mods)


def test_interrupted_quantized_decompose_resumes_bit_identically(tiny_factory, tmp_path, monkeypatch):
    import sorsa_tools.decompose as D

    src = tiny_factory("llama")
    kw = dict(quantize="nf4", quant_iters=2, svd="exact")
    clean = tmp_path / "clean"
    decompose(str(src), 4, clean, **kw)
    real, calls = D._write_residual, []

    def dies_midway(w, m, res):
        calls.append(m)
        if len(calls) == 9:
            raise KeyboardInterrupt
        real(w, m, res)

    out = tmp_path / "o"
    monkeypatch.setattr(D, "_write_residual", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        decompose(str(src), 4, out, **kw)
    monkeypatch.setattr(D, "_write_residual", real)
    r = decompose(str(src), 4, out, **kw)
    assert r.resumed_shards > 0
    for f in sorted(clean.glob("*.safetensors")):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_train_without_bitsandbytes_names_the_pip_command(quantized_lm, tmp_path, monkeypatch):
    _, dec = quantized_lm
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    res = runner.invoke(
        app, ["train", str(dec), "--data", str(GSM8K), "-o", str(tmp_path / "r"), "--max-steps", "1"]
    )
    assert res.exit_code == 2 and "pip install bitsandbytes" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "r").exists()


def test_multimodal_gemma3_quantized_residual_trains_and_merges(tmp_path_factory, tmp_path):
    """Checkpoint names (language_model.model.layers.N) vs the built model's: the skip list, the
    quantized tensors and the merge line up (the vision tower stays unquantized)."""
    from test_multimodal import gemma_mm
    from transformers import AutoModelForCausalLM

    from sorsa_tools.merge import merge
    from sorsa_tools.model import load_sorsa_model

    src = gemma_mm.__wrapped__(tmp_path_factory)
    dec = tmp_path / "dec"
    decompose(str(src), 4, dec, quantize="nf4", svd="exact", check_sample=0)
    skip = json.loads((dec / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert any("vision" in s for s in skip)
    model = AutoModelForCausalLM.from_pretrained(dec, device_map="cpu")
    kinds = {type(m).__name__ for n, m in model.named_modules() if "vision" in n}
    assert "Linear4bit" not in kinds  # the vision tower is not quantized
    sorsa, layers, _ = load_sorsa_model(dec)
    assert len(layers) == 14 and all(layer.residual_quant is not None for layer in layers.values())
    merge(dec, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        a, b = sorsa.eval()(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-4
