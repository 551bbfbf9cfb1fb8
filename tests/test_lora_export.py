"""`sorsa export-lora`: a trained SORSA adapter as a PEFT LoRA on the original base model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import GSM8K_SLICE
from test_cli_errors import assert_clean_error, run

from sorsa_tools.io.safetensors_file import SafetensorsFile
from sorsa_tools.lora_export import balanced_factors, export_lora, lora_keys, peft_targets
from sorsa_tools.model import load_sorsa_model, read_adapter
from sorsa_tools.source import MergedSource
from sorsa_tools.train import TrainConfig, train

peft = pytest.importorskip("peft")

QUICK = dict(max_length=384, batch_size=2, lr=2e-2, warmup_ratio=0.0, max_steps=3)


@pytest.fixture(scope="module")
def trained(tiny_lm_decomposed, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(original model, decomposed dir, a run trained a few steps at a high lr)."""
    src, dec = tiny_lm_decomposed("llama")
    r = tmp_path_factory.mktemp("lora-run") / "run"
    train(dec, GSM8K_SLICE, r, config=TrainConfig(**QUICK), device="cpu")
    return src, dec, r


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    _, dec, r = trained
    out = tmp_path_factory.mktemp("lora-out") / "lora"
    return export_lora(dec, r, out)


def _base(src: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()


IDS = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(0))


def test_peft_lora_on_the_base_gives_the_sorsa_model(trained, exported):
    from peft import PeftModel

    src, dec, r = trained
    sorsa, _, _ = load_sorsa_model(dec, r)
    lora = PeftModel.from_pretrained(_base(src), exported.out_dir).eval()
    with torch.no_grad():
        want, got, base = sorsa.eval()(IDS).logits, lora(IDS).logits, _base(src)(IDS).logits
    moved = float((want - base).abs().max())
    err = float((got - want).abs().max())
    assert moved > 0.1, moved  # training changed the model: the check below can fail
    assert err < 1e-4, err  # measured: ~3e-6 (logits of magnitude ~1)
    assert exported.rank == 16 and exported.sorsa_rank == 8 and exported.modules == 14
    assert exported.max_check_error < 1e-6 and exported.max_relative_delta > 1e-3


def test_each_lora_module_is_base_plus_dense_delta(trained, exported):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    src, dec, r = trained
    lora = PeftModel.from_pretrained(_base(src), exported.out_dir)
    wrapped = {
        n.removeprefix("base_model.model."): m for n, m in lora.named_modules() if isinstance(m, LoraLayer)
    }
    targets = json.loads((dec / "sorsa_config.json").read_text())["target_modules"]
    assert sorted(wrapped) == sorted(targets)  # exactly the adapted modules, nothing else
    new, old = read_adapter(r, targets), read_adapter(dec, targets)
    base = _base(src)
    for m, layer in wrapped.items():
        assert torch.equal(layer.base_layer.weight, base.get_submodule(m).weight)  # the ORIGINAL W
        assert layer.scaling["default"] == 1.0
        got = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        (U1, S1, V1), (U0, S0, V0) = ([t.double() for t in f] for f in (new[m], old[m]))
        want = (U1 * S1) @ V1 - (U0 * S0) @ V0
        assert float((got - want).abs().max()) < 1e-6 * float((U0 * S0).abs().max()), m
        assert float(want.abs().max()) > 1e-3 * float((U0 * S0).abs().max()), m  # a real delta


def test_merge_and_unload_equals_the_sorsa_merge(trained, exported):
    from peft import PeftModel

    src, dec, r = trained
    merged = PeftModel.from_pretrained(_base(src), exported.out_dir).merge_and_unload()
    sd = merged.state_dict()
    ms = MergedSource(dec, r)
    base = _base(src).state_dict()
    for name in ms.names():
        if ms.is_target(name):
            want = ms.read(name)  # W_r + U'S'Vt', the merged SORSA weight (float32 residual)
            assert float((sd[name] - want).abs().max()) < 1e-5 * float(want.abs().max()), name
            assert not torch.allclose(sd[name], base[name], atol=1e-4), name
        elif name in sd:
            assert torch.equal(sd[name], base[name]), name


def test_adapter_files_and_config(trained, exported):
    src, dec, r = trained
    out = exported.out_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",  # the model card push would send, written with the export
        "adapter_config.json",
        "adapter_model.safetensors",
        "sorsa_provenance.json",
    ]
    assert not list(out.parent.glob(".*tmp*"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    dcfg = json.loads((dec / "sorsa_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == cfg["lora_alpha"] == 2 * dcfg["rank"] == 16
    assert cfg["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert cfg["base_model_name_or_path"] == str(src.resolve()) and cfg["revision"] is None
    assert cfg["use_dora"] is False and cfg["use_rslora"] is False and cfg["lora_dropout"] == 0.0
    f = SafetensorsFile(out / "adapter_model.safetensors")
    assert len(f.tensors) == 28 and f.metadata == {"format": "pt"}
    ka, kb = lora_keys("model.layers.1.mlp.down_proj")
    assert ka == "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    assert (
        f.tensors[ka].shape == (16, 96) and f.tensors[kb].shape == (64, 16) and f.tensors[ka].dtype == "F32"
    )
    assert exported.bytes == (out / "adapter_model.safetensors").stat().st_size
    prov = json.loads((out / "sorsa_provenance.json").read_text())
    assert prov["method"] == "SORSA" and prov["adapter"] == "trained" and prov["training"]["steps"] == 3
    assert prov["decomposition"]["job_id"] == dcfg["job_id"] and prov["export"]["lora_rank"] == 16
    assert prov["export"]["adapter"] == r.name and str(r.parent) not in json.dumps(prov)  # no local paths


def test_partial_selection_is_written_as_exact_names():
    mods = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")]
    mods += ["model.embed_tokens", "lm_head"]
    every_q = [m for m in mods if m.endswith("q_proj")]
    assert peft_targets(every_q, mods) == (["q_proj"], False)
    layer0 = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert peft_targets(layer0, mods) == (layer0, True)


def test_balanced_factors_split_the_scale_evenly():
    g = torch.Generator().manual_seed(1)
    U, Vt = torch.randn(50, 6, generator=g) * 1e-3, torch.randn(6, 40, generator=g) * 30
    S = torch.tensor([900.0, 40.0, -3.0, 1e-4, 0.0, 2.0])
    B, A = balanced_factors(U, S, Vt)
    want = (U.double() * S.double()) @ Vt.double()
    assert float(((B.double() @ A.double()) - want).abs().max()) < 1e-6 * float(want.abs().max())
    assert torch.allclose(B.norm(dim=0), A.norm(dim=1), rtol=1e-5)
    assert float(B[:, 4].abs().max()) == 0.0 == float(A[4].abs().max())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_export(trained, tmp_path, dtype):
    from peft import PeftModel

    src, dec, r = trained
    res = export_lora(dec, r, tmp_path / "lora", dtype=dtype)
    f = SafetensorsFile(res.out_dir / "adapter_model.safetensors")
    code = {"bfloat16": "BF16", "float16": "F16"}[dtype]
    assert {t.dtype for t in f.tensors.values()} == {code}
    eps = torch.finfo(getattr(torch, dtype)).eps
    assert 1e-5 < res.max_check_error < 8 * eps, res.max_check_error
    sorsa, _, _ = load_sorsa_model(dec, r)
    lora = PeftModel.from_pretrained(_base(src), res.out_dir).eval()
    with torch.no_grad():
        want, got = sorsa.eval()(IDS).logits, lora(IDS).logits
    assert float((got - want).abs().max()) < 2 * eps * float(want.abs().max())  # measured 0.3 eps


# -- the CLI ----------------------------------------------------------------------------------------
def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "tmp" in p.name or "old" in p.name]


def test_cli_exports_and_reports(trained, tmp_path):
    _, dec, r = trained
    res = run("export-lora", str(dec), "--adapter", str(r), "-o", str(tmp_path / "lora"))
    assert res.exit_code == 0, res.stderr
    assert "LoRA rank" in res.stdout and "16 (2 x 8)" in res.stdout and "14" in res.stdout
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    res = run("export-lora", "--help")
    assert res.exit_code == 0 and "Examples" in res.stdout and "sorsa export-lora" in res.stdout


def test_cli_existing_output_and_force(trained, tmp_path):
    """--force replaces an earlier export and nothing else: a user's file in OUT, beside an
    export or alone, stays where it is."""
    _, dec, r = trained
    out = tmp_path / "lora"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["export-lora", str(dec), "--adapter", str(r), "-o", str(out)]
    assert_clean_error(run(*args), f"{out} already exists", "--force")
    assert_clean_error(run(*args, "--force"), "not a LoRA export (e.g. keep.txt)", "another -o")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    res = run(*args, "--force")  # an empty dir holds nothing to lose
    assert res.exit_code == 0, res.stderr
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    (out / "eval_gsm8k.json").write_text("{}")  # eval's default output beside an export: replaced
    assert run(*args, "--force").exit_code == 0
    (out / "notes.txt").write_text("mine")
    assert_clean_error(run(*args, "--force"), f"{out} holds notes.txt, which a LoRA export does not have")
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter_config.json").is_file()
    assert _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def partial(trained, tmp_path_factory) -> tuple[Path, Path]:
    """(DIR, RUN) of another decomposition of the same model: layer 0's q_proj and v_proj only."""
    from sorsa_tools import decompose

    src = trained[0]
    base = tmp_path_factory.mktemp("partial")
    decompose(
        str(src), 4, base / "d", targets=r"layers\.0\.self_attn\.(q|v)_proj", svd="exact", check_sample=0
    )
    train(base / "d", GSM8K_SLICE, base / "r", config=TrainConfig(**{**QUICK, "max_steps": 1}), device="cpu")
    return base / "d", base / "r"


def test_partial_selection_targets_exactly_those_modules(trained, partial, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    src = trained[0]
    res = export_lora(*partial, tmp_path / "lora")
    want = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert res.exact_names and res.target_modules == want and res.rank == 8
    lora = PeftModel.from_pretrained(_base(src), res.out_dir).eval()
    wrapped = [
        n.removeprefix("base_model.model.") for n, m in lora.named_modules() if isinstance(m, LoraLayer)
    ]
    assert wrapped == want  # short names would have hit layer 1 too
    sorsa, _, _ = load_sorsa_model(*partial)
    with torch.no_grad():
        err = float((lora(IDS).logits - sorsa.eval()(IDS).logits).abs().max())
    assert err < 1e-4, err


def test_cli_mismatched_adapter(trained, partial, tmp_path):
    _, dec, _ = trained
    res = run("export-lora", str(dec), "--adapter", str(partial[1]), "-o", str(tmp_path / "lora"))
    assert_clean_error(res, "trained on another decomposition", "pass the DIR it was trained on")
    assert not (tmp_path / "lora").exists() and _leftovers(tmp_path) == []


def test_cli_missing_run(trained, tmp_path):
    _, dec, _ = trained
    res = run("export-lora", str(dec), "--adapter", str(tmp_path / "nope"), "-o", str(tmp_path / "lora"))
    assert_clean_error(res, f"no such directory: {tmp_path / 'nope'}", "output of `sorsa train` as --adapter")
    assert not (tmp_path / "lora").exists()


def test_cli_untrained_adapter(trained, tmp_path):
    _, dec, r = trained
    res = run("export-lora", str(dec), "--adapter", str(dec), "-o", str(tmp_path / "lora"))
    assert_clean_error(res, "'decomposition' factors, not a trained run", "LoRA would be zero", "sorsa train")
    fake = tmp_path / "fake"  # a trained run whose factors never moved (e.g. lr so low nothing changed)
    fake.mkdir()
    cfg = json.loads((r / "sorsa_config.json").read_text())
    del cfg["checksums"]  # hand-made: its adapter is not the one the run wrote (that one is refused)
    (fake / "sorsa_config.json").write_text(json.dumps(cfg))
    shutil.copy(dec / "sorsa_adapter.safetensors", fake)
    res = run("export-lora", str(dec), "--adapter", str(fake), "-o", str(tmp_path / "lora"))
    assert_clean_error(res, "equals", "initial factors (Delta W = 0", "train it first")
    assert not (tmp_path / "lora").exists() and _leftovers(tmp_path) == []


def test_cli_bad_dtype_and_output_inside_run(trained, tmp_path):
    _, dec, r = trained
    res = run("export-lora", str(dec), "--adapter", str(r), "-o", str(tmp_path / "l"), "--dtype", "int8")
    assert_clean_error(res, "--dtype 'int8' is not supported", "float32, float16, bfloat16")
    res = run("export-lora", str(dec), "--adapter", str(r), "-o", str(r / "lora"))
    assert_clean_error(res, "overlaps", "never writes into DIR or RUN")
    assert not (r / "lora").exists() and not (tmp_path / "l").exists()
