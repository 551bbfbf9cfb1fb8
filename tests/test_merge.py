"""`sorsa merge --to hf`: the folded checkpoint is the model the adapter describes, written safely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import GSM8K_SLICE, make_tiny, restamp
from safetensors.torch import load_file
from test_cli_errors import assert_clean_error, run

from sorsa_tools import decompose
from sorsa_tools.errors import AdapterMismatchError, OutputDirError
from sorsa_tools.format import ADAPTER_FILE, factor_names
from sorsa_tools.io.checkpoint import open_checkpoint
from sorsa_tools.merge import merge
from sorsa_tools.model import load_sorsa_model
from sorsa_tools.source import PROVENANCE_FILE


def _all_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        if p.name != ADAPTER_FILE:
            out.update(load_file(p))
    return out


@pytest.fixture(scope="module")
def trained(tiny_lm_decomposed, tmp_path_factory):
    """(source, DIR, RUN): a tiny model trained 4 steps at a high lr, so the factors moved."""
    from sorsa_tools.train import TrainConfig, train

    src, dec = tiny_lm_decomposed("llama")
    run_dir = tmp_path_factory.mktemp("merge-run") / "run"
    cfg = TrainConfig(max_length=256, batch_size=2, lr=2e-2, warmup_ratio=0.0, max_steps=4)
    train(dec, GSM8K_SLICE, run_dir, config=cfg, device="cpu")
    return src, dec, run_dir


def test_untrained_adapter_gives_back_the_original(tiny_lm_decomposed, tmp_path):
    src, dec = tiny_lm_decomposed("llama")
    r = merge(dec, tmp_path / "m")
    assert r.adapter == "untrained" and r.modules == 14 and r.max_fold_error < 1e-5
    a, b = _all_tensors(src), _all_tensors(tmp_path / "m")
    assert a.keys() == b.keys()
    targets = set(json.loads((dec / "sorsa_config.json").read_text())["target_modules"])
    for name, t in a.items():
        if name.removesuffix(".weight") in targets:
            assert (t - b[name]).abs().max() <= 1e-5 * t.abs().max(), name
        else:  # copied bit for bit
            assert torch.equal(t.view(torch.uint8), b[name].view(torch.uint8)), name
    src_ck, out_ck = open_checkpoint(src), open_checkpoint(tmp_path / "m")
    assert out_ck.shard_names == src_ck.shard_names and out_ck.weight_map == src_ck.weight_map
    assert (tmp_path / "m" / "tokenizer.json").exists() and not (tmp_path / "m" / ADAPTER_FILE).exists()
    prov = json.loads((tmp_path / "m" / PROVENANCE_FILE).read_text())
    assert prov["method"] == "SORSA" and prov["rank"] == 8 and prov["training"] is None


def test_trained_merge_equals_the_sorsa_model(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    src, dec, run_dir = trained
    r = merge(dec, tmp_path / "m", adapter=run_dir)
    assert r.adapter == "trained"
    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    sorsa, layers, _ = load_sorsa_model(dec, run_dir)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got, orig = sorsa(ids).logits, merged(ids).logits, base(ids).logits
    assert (want - got).abs().max() < 1e-5
    assert (orig - got).abs().max() > 1e-2  # the training really moved the model
    # one module by hand: W = W_r + U diag(S) Vt with the run's factors
    m = "model.layers.1.mlp.down_proj"
    W_r = _all_tensors(dec)[m + ".weight"]
    U, S, Vt = (load_file(run_dir / ADAPTER_FILE)[n] for n in factor_names(m))
    assert torch.allclose(_all_tensors(tmp_path / "m")[m + ".weight"], W_r + (U * S) @ Vt, atol=1e-6)
    prov = json.loads((tmp_path / "m" / PROVENANCE_FILE).read_text())
    assert prov["training"]["steps"] == 4 and prov["training"]["lr"] == 2e-2


def test_bf16_residual_and_dtype_option(tmp_path):
    src = make_tiny(tmp_path / "src", "qwen2", torch.bfloat16)
    dec = tmp_path / "dec"
    decompose(str(src), 8, dec, svd="exact", check_sample=0)
    merge(dec, tmp_path / "m")
    a, b, res = _all_tensors(src), _all_tensors(tmp_path / "m"), _all_tensors(dec)
    assert {t.dtype for t in b.values()} == {torch.bfloat16}
    for name, t in a.items():  # only two roundings apart: W_r to bf16, then the merged W once
        err = (t.float() - b[name].float()).abs()
        assert (err <= 2**-8 * (res[name].float().abs() + t.float().abs()) + 1e-30).all(), name
    r = merge(dec, tmp_path / "m32", dtype="float32")
    c = _all_tensors(tmp_path / "m32")
    assert {t.dtype for t in c.values()} == {torch.float32} and r.dtype == "float32"
    assert json.loads((tmp_path / "m32" / "config.json").read_text())["dtype"] == "float32"
    non_target = "model.embed_tokens.weight"
    assert torch.equal(c[non_target], a[non_target].float())


def test_output_is_atomic(tiny_lm_decomposed, tmp_path, monkeypatch):
    """A merge that fails part-way leaves no output and no temp dir; an existing OUT survives --force."""
    import sorsa_tools.merge as mod

    _, dec = tiny_lm_decomposed("llama")
    keep = tmp_path / "m"
    merge(dec, keep)  # an earlier merge: --force may replace it, and keeps it when the new one fails
    before = {p.name: p.read_bytes() for p in keep.iterdir()}
    with pytest.raises(OutputDirError, match="already exists; choose a new -o, or pass --force"):
        merge(dec, keep)
    calls = {"n": 0}
    real = mod._check_fold

    def fail_late(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(mod, "_check_fold", fail_late)
    with pytest.raises(OSError):
        merge(dec, keep, force=True)
    calls["n"] = 0
    with pytest.raises(OSError):
        merge(dec, tmp_path / "new")
    assert {p.name: p.read_bytes() for p in keep.iterdir()} == before and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_adapter_of_another_decomposition_is_refused(trained, tmp_path):
    src, dec, run_dir = trained
    other = tmp_path / "other"
    decompose(str(src), 4, other, svd="exact", check_sample=0)
    with pytest.raises(AdapterMismatchError, match="trained on another decomposition"):
        merge(other, tmp_path / "m", adapter=run_dir)
    assert not (tmp_path / "m").exists()


def test_non_finite_adapter_is_refused_by_name(trained, tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    _, dec, run_dir = trained
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    with safe_open(bad / ADAPTER_FILE, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = factor_names("model.layers.1.mlp.down_proj")[1]  # its S
    tensors[name][0] = float("inf")
    save_file(tensors, bad / ADAPTER_FILE, metadata=meta)
    restamp(bad)  # written so by the tool (a NaN check, not a checksum check)
    for cmd in (
        ["merge", str(dec), "--adapter", str(bad), "-o", str(tmp_path / "m")],
        ["merge", str(dec), "--adapter", str(bad), "--to", "gguf", "-o", str(tmp_path / "m.gguf")],
        ["export-lora", str(dec), "--adapter", str(bad), "-o", str(tmp_path / "l")],
    ):
        assert_clean_error(run(*cmd), f"{name} holds 1 NaN or inf value(s)", "diverged run")
    assert not any(p.name in ("m", "m.gguf", "l") for p in tmp_path.iterdir())


def test_force_never_replaces_an_input(trained, tmp_path, monkeypatch):
    import shutil

    _, dec, run_dir = trained
    work = tmp_path / "work"
    shutil.copytree(run_dir, work / "run")  # the adapter lives inside the OUT to be replaced
    res = run("merge", str(dec), "--adapter", str(work / "run"), "-o", str(work), "--force")
    assert_clean_error(res, f"refusing to replace {work} with --force: it holds {work / 'run'}")
    assert (work / "run" / ADAPTER_FILE).is_file()
    monkeypatch.chdir(work / "run")  # nor the working directory's ancestors
    res = run("merge", str(dec), "--adapter", str(run_dir), "-o", str(work), "--force")
    assert_clean_error(res, f"refusing to replace {work} with --force; choose a dedicated output path")
    assert (work / "run" / ADAPTER_FILE).is_file()


def test_force_replaces_an_earlier_merge_and_nothing_else(trained, tmp_path):
    _, dec, run_dir = trained
    out = tmp_path / "m"
    args = ["merge", str(dec), "--adapter", str(run_dir), "-o", str(out)]
    assert run(*args).exit_code == 0
    prov = json.loads((out / "sorsa_provenance.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == prov["files"]  # every file it wrote, listed
    (out / "eval_gsm8k.jsonl").write_text("")  # eval's default output into a merged dir: replaced
    res = run(*args, "--force")
    assert res.exit_code == 0, res.stderr
    assert not (out / "eval_gsm8k.jsonl").exists()
    (out / "notes.txt").write_text("mine")
    assert_clean_error(
        run(*args, "--force"), f"{out} holds notes.txt, which a merged checkpoint does not have"
    )
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    res = run("merge", str(dec), "--adapter", str(run_dir), "-o", str(mine), "--force")
    assert_clean_error(res, f"{mine} holds files that are not a merged checkpoint (e.g. notes.txt)")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    f = tmp_path / "file"
    f.write_text("mine")
    res = run("merge", str(dec), "--adapter", str(run_dir), "-o", str(f), "--force")
    assert_clean_error(res, f"{f} is a file, not a merged checkpoint")
    assert f.read_text() == "mine"


def test_merge_cli(trained, tmp_path):
    _, dec, run_dir = trained
    res = run("merge", str(dec), "--adapter", str(run_dir), "-o", str(tmp_path / "m"))
    assert res.exit_code == 0, res.stderr
    assert "modules folded" in res.stdout and "trained" in res.stdout
    assert (tmp_path / "m" / "config.json").exists()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--to", "onnx"], ["--to 'onnx' is not one of hf, gguf"]),
        (["--dtype", "int8"], ["--dtype 'int8' is not one of float32, float16, bfloat16"]),
        (["--split-max-size", "2G"], ["--split-max-size applies to --to gguf"]),
        (["--outtype", "q8_0"], ["--outtype applies to --to gguf", "--dtype"]),
        (["--to", "gguf", "--split-max-size", "lots"], ["'lots' is not a size"]),
        (["--to", "gguf", "--dtype", "float16"], ["--dtype applies to --to hf", "--outtype"]),
    ],
)
def test_bad_options(tiny_lm_decomposed, tmp_path, args, needles):
    _, dec = tiny_lm_decomposed("llama")
    res = run("merge", str(dec), "-o", str(tmp_path / "m"), *args)
    assert_clean_error(res, *needles)
    assert not (tmp_path / "m").exists()


def test_bad_dirs(trained, tmp_path):
    src, dec, run_dir = trained
    assert_clean_error(run("merge", str(src), "-o", str(tmp_path / "m")), "has no sorsa_config.json")
    assert_clean_error(run("merge", str(run_dir), "-o", str(tmp_path / "m")), "not a decomposition")
    res = run("merge", str(dec), "--adapter", str(tmp_path / "nope"), "-o", str(tmp_path / "m"))
    assert_clean_error(res, "no such directory")
    (tmp_path / "m").mkdir()
    assert_clean_error(run("merge", str(dec), "-o", str(tmp_path / "m")), "already exists", "--force")


def test_merge_to_gguf_runs_in_llama_cpp(trained, tmp_path):
    """The trained run merged straight to GGUF: llama.cpp's logits are the SORSA model's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _, dec, run_dir = trained
    out = tmp_path / "ft.f32.gguf"
    res = run(
        "merge", str(dec), "--adapter", str(run_dir), "--to", "gguf", "--outtype", "f32", "-o", str(out)
    )
    assert res.exit_code == 0, res.stderr
    assert "f32" in res.stdout and out.is_file()
    ids = [1, 17, 60, 200, 45, 99, 310, 7, 250, 13, 88, 301]
    sorsa, _, _ = load_sorsa_model(dec, run_dir)
    with torch.no_grad():
        want = sorsa(torch.tensor([ids])).logits[0]
    llm = llama_cpp.Llama(model_path=str(out), logits_all=True, type_k=0, type_v=0, n_ctx=64, verbose=False)
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)])
    assert (got - want).abs().max() < 1e-3
    res = run("merge", str(dec), "--adapter", str(run_dir), "--to", "gguf", "-o", str(out))
    assert_clean_error(res, "exists", "--force")


def test_read_back_check_catches_a_changed_byte(tmp_path):
    from sorsa_tools.errors import VerificationError
    from sorsa_tools.io.safetensors_file import check_read_back

    t = torch.arange(1000, dtype=torch.float32)
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * 8 + t.numpy().tobytes())
    check_read_back(p, 8, t.numel() * 4, t, "w")
    t2 = t.clone()
    t2[777] += 1
    with pytest.raises(VerificationError, match="w did not read back as written in f.bin"):
        check_read_back(p, 8, t.numel() * 4, t2, "w")


def test_a_corrupted_adapter_or_residual_is_caught_on_read(trained, tmp_path):
    """4 KiB of 0x41 in the middle of sorsa_adapter.safetensors (finite floats) merged without a word
    and inspect said nothing: every command that reads it checks the sha256 its writer recorded."""
    import shutil

    _, dec0, run0 = trained
    dec, run_dir = tmp_path / "dec", tmp_path / "run"
    shutil.copytree(dec0, dec)
    shutil.copytree(run0, run_dir)
    res = run("inspect", str(run_dir))
    assert res.exit_code == 0 and "verified" in res.stdout
    f = run_dir / ADAPTER_FILE
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = b"A" * 4096
    f.write_bytes(bytes(data))
    want = f"{f} differs from the sha256 recorded when it was written"
    assert_clean_error(run("inspect", str(run_dir)), want)
    assert_clean_error(run("merge", str(dec), "--adapter", str(run_dir), "-o", str(tmp_path / "m")), want)
    assert_clean_error(
        run("export-lora", str(dec), "--adapter", str(run_dir), "-o", str(tmp_path / "l")), want
    )
    shard = sorted(dec.glob("model*.safetensors"))[0]  # a residual shard, same size, other bytes
    data = bytearray(shard.read_bytes())
    data[-8:] = b"A" * 8
    shard.write_bytes(bytes(data))
    res = run("merge", str(dec), "-o", str(tmp_path / "m"))
    assert_clean_error(res, f"{shard} differs from the sha256 recorded")
    assert not (tmp_path / "m").exists() and not (tmp_path / "l").exists()
