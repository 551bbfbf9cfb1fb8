"""-o is optional: decompose, merge and export-lora name their output after what it holds, in the
current directory, print it, and treat an existing one as a named -o would be treated (an earlier
output of the same command is resumed, found done or replaced with --force; anything else stays)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm
from test_checks_fire import _fake_run
from test_cli_errors import assert_clean_error, run

from sorsa_tools.outputs import decompose_output, lora_output, merge_output


def test_default_names(tmp_path, monkeypatch):
    assert decompose_output("meta-llama/Llama-2-7b", 128) == Path("Llama-2-7b-sorsa-r128")
    assert decompose_output("./models/gemma3-270m/", 64) == Path("gemma3-270m-sorsa-r64")
    (tmp_path / "my model").mkdir()
    monkeypatch.chdir(tmp_path / "my model")
    assert decompose_output(".", 8) == Path("my_model-sorsa-r8")  # the directory's own name
    assert merge_output("d", "runs/run1", "hf", None) == Path("d-run1-merged")
    assert merge_output("d", None, "hf", None) == Path("d-merged")  # DIR's own adapter
    assert merge_output("d", "run1", "gguf", None) == Path("d-run1.f16.gguf")
    assert merge_output("d", "run1", "gguf", "Q4_K_M") == Path("d-run1.q4_k_m.gguf")
    assert lora_output("d", "run1", "peft", None) == Path("d-run1-lora")
    assert lora_output("d", "run1", "gguf", "q8_0") == Path("d-run1-lora.q8_0.gguf")


def test_the_briefs_command_gets_past_the_options(tmp_path, monkeypatch):
    """`sorsa decompose meta-llama/Llama-2-7b --rank 128` stopped at "Missing option '-o'"; now it
    looks the model up (offline here: one line naming it) and leaves nothing behind."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    res = run("decompose", "meta-llama/Llama-2-7b", "--rank", "128")
    assert "output: Llama-2-7b-sorsa-r128 (no -o given)" in res.stdout
    assert_clean_error(res, "meta-llama/Llama-2-7b", "not in the local Hugging Face cache")
    assert not (tmp_path / "Llama-2-7b-sorsa-r128").exists()


@pytest.fixture
def work(tiny_factory, tmp_path, monkeypatch) -> Path:
    """The current directory, holding a tiny model (with a tokenizer) as ./tiny-llama."""
    make_tiny_lm(tmp_path / "tiny-llama")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_decompose_default_output(work, tiny_factory):
    args = ["decompose", "tiny-llama", "--rank", "4", "--svd", "exact", "--check-sample", "0"]
    res = run(*args)
    assert res.exit_code == 0, res.stderr
    out = work / "tiny-llama-sorsa-r4"
    assert "output: tiny-llama-sorsa-r4 (no -o given)" in res.stdout and (out / "sorsa_config.json").is_file()
    res = run(*args)  # an earlier decomposition of this model at this rank: done already
    assert res.exit_code == 0 and "already a finished decomposition" in res.stdout
    assert run(*args, "--force").exit_code == 0  # and --force replaces it
    assert json.loads((out / "sorsa_config.json").read_text())["rank"] == 4

    # the default name holding something else: never used, --force or not
    shutil.rmtree(out)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):
        assert_clean_error(
            run(*args, *extra),
            "tiny-llama-sorsa-r4 (the default -o for tiny-llama at rank 4) already holds something else "
            "(e.g. notes.txt); pass -o DIR to write elsewhere",
        )
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # ... nor a decomposition of another model that happens to carry the name
    shutil.rmtree(out)
    other = ["decompose", str(tiny_factory("qwen2", torch.float32)), "--rank", "4", "--svd", "exact"]
    assert run(*other, "-o", str(out), "--check-sample", "0").exit_code == 0
    assert_clean_error(run(*args, "--force"), "already holds something else")
    assert "Qwen2" in (out / "config.json").read_text()


def test_merge_and_export_lora_default_outputs(work):
    dec = work / "d"
    assert run("decompose", "tiny-llama", "--rank", "4", "--svd", "exact", "-o", str(dec)).exit_code == 0
    res = run("merge", "d")
    assert res.exit_code == 0, res.stderr
    assert "output: d-merged (no -o given)" in res.stdout and (work / "d-merged" / "config.json").is_file()
    assert_clean_error(run("merge", "d"), "d-merged already exists", "--force")
    res = run("merge", "d", "--to", "gguf", "--outtype", "q8_0")
    assert res.exit_code == 0, res.stderr
    assert (work / "d.q8_0.gguf").is_file()

    g = torch.Generator().manual_seed(0)
    _fake_run(dec, work / "run1", lambda m, U, S, Vt: (U, S * (1 + torch.rand(S.shape, generator=g)), Vt))
    res = run("export-lora", "d", "--adapter", "run1")
    assert res.exit_code == 0, res.stderr
    assert "output: d-run1-lora (no -o given)" in res.stdout
    assert (work / "d-run1-lora" / "adapter_config.json").is_file()
    assert run("merge", "d", "--adapter", "run1", "--to", "gguf").exit_code == 0
    assert sorted(p.name for p in work.iterdir()) == [
        "d", "d-merged", "d-run1-lora", "d-run1.f16.gguf", "d.q8_0.gguf", "run1", "tiny-llama",
    ]  # fmt: skip
