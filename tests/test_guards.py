"""Guards a first-time user runs into: each mistake gets one line that names the way out, and
--force never deletes another command's SORSA output. (From a review that followed the README.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import GSM8K_SLICE
from test_cli_errors import assert_clean_error, run

from sorsa_tools.train import TrainConfig, train


@pytest.fixture(scope="module")
def run_dir(tiny_lm_decomposed, tmp_path_factory) -> Path:
    _, dec = tiny_lm_decomposed("llama")
    r = tmp_path_factory.mktemp("guards") / "run"
    train(dec, GSM8K_SLICE, r, config=TrainConfig(max_length=256, batch_size=2, max_steps=1), device="cpu")
    return r


def test_decomposing_a_decomposition_is_refused(tiny_lm_decomposed, tmp_path):
    _, dec = tiny_lm_decomposed("llama")
    res = run("decompose", str(dec), "--rank", "4", "-o", str(tmp_path / "o"))
    assert_clean_error(res, "is already a SORSA decomposition", f"sorsa merge {dec} --to hf")
    assert not (tmp_path / "o").exists()


def test_revision_of_a_local_dir_is_refused(tiny_lm_decomposed, tmp_path):
    src, _ = tiny_lm_decomposed("llama")
    res = run("decompose", str(src), "--rank", "4", "--revision", "v2", "-o", str(tmp_path / "o"))
    assert_clean_error(res, "--revision applies to Hub ids", "drop --revision")


def test_force_never_deletes_another_commands_output(tiny_lm_decomposed, run_dir, tmp_path):
    src, dec = tiny_lm_decomposed("llama")
    victim = tmp_path / "victim"
    shutil.copytree(run_dir, victim)
    res = run("decompose", str(src), "--rank", "4", "-o", str(victim), "--force")
    assert_clean_error(res, "it is a trained run (`sorsa train` output)", "delete it yourself")
    res = run("merge", str(dec), "-o", str(victim), "--force")
    assert_clean_error(res, "it is a trained run")
    assert (victim / "sorsa_adapter.safetensors").exists()
    # one level down too: a work dir holding a run
    work = tmp_path / "work"
    shutil.copytree(run_dir, work / "run1")
    res = run("decompose", str(src), "--rank", "4", "-o", str(work), "--force")
    assert_clean_error(res, "it holds run1/, a trained run")
    # merge --force over a decomposition; decompose --force over a decomposition is its own kind
    other = tmp_path / "dec2"
    assert run("decompose", str(src), "--rank", "4", "-o", str(other)).exit_code == 0
    assert_clean_error(run("merge", str(dec), "-o", str(other), "--force"), "it is a decomposed dir")
    res = run("decompose", str(src), "--rank", "6", "-o", str(other), "--force")
    assert res.exit_code == 0, res.stderr
    assert json.loads((other / "sorsa_config.json").read_text())["rank"] == 6


def test_messages_name_what_each_path_should_be(tiny_lm_decomposed, run_dir, tmp_path):
    _, dec = tiny_lm_decomposed("llama")
    res = run("merge", str(dec), "--adapter", str(tmp_path / "nope"), "-o", str(tmp_path / "m"))
    assert_clean_error(res, "no such directory", "pass a `sorsa train` run")
    res = run("merge", str(run_dir), "-o", str(tmp_path / "m"))
    assert_clean_error(res, "is a trained run, not a decomposition", f"pass its DIR ({dec})", "--adapter")
    assert_clean_error(run("inspect", str(tmp_path / "nope")), "a decomposed dir", "or a trained run")
    res = run("train", str(dec), "--data", str(tmp_path), "-o", str(tmp_path / "r"))
    assert_clean_error(
        res, f"--data {tmp_path}: a folder with no .parquet, .arrow, .csv, .tsv or .jsonl files"
    )
    res = run("decompose", str(dec.parent), "--rank", "4", "--niter", "8", "--max-niter", "4", "-o", "x")
    assert_clean_error(res, "--max-niter 4 is below --niter 8")


def test_eval_suggests_its_own_fields(tiny_lm_decomposed, tmp_path):
    src, _ = tiny_lm_decomposed("llama")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"q": "1+1?", "a": "#### 2"}) + "\n")
    res = run("eval", "gsm8k", str(src), "--data", str(data), "-o", str(tmp_path / "r.jsonl"))
    line = assert_clean_error(res, "no known fields", "--fields QUESTION,ANSWER")
    assert "TEXT" not in line


def test_analyze_names_a_gguf_file_as_such(tiny_lm_decomposed, tmp_path):
    src, _ = tiny_lm_decomposed("llama")
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert_clean_error(run("analyze", str(src), str(g)), f"TUNED {g} is a file", "not GGUF", "--to hf")
    res = run("analyze", str(src), str(src), "--json", str(tmp_path))
    assert_clean_error(res, f"--json {tmp_path} is a directory", f"{tmp_path}/analyze.json")


def test_offload_on_the_cpu_is_named(tiny_lm_decomposed, tmp_path):
    _, dec = tiny_lm_decomposed("llama")
    res = run(
        "train", str(dec), "--data", str(GSM8K_SLICE), "-o", str(tmp_path / "r"), "--device", "cpu",
        "--max-steps", "1", "--batch-size", "1", "--max-length", "256", "--offload-residual",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert "warning: --offload-residual saves GPU memory; on the CPU it only adds work" in res.stderr


def test_default_gguf_merge_reports_its_type_and_no_pair_template_noise(tiny_lm_decomposed, tmp_path):
    _, dec = tiny_lm_decomposed("llama")
    res = run("merge", str(dec), "--to", "gguf", "-o", str(tmp_path / "m.gguf"))
    assert res.exit_code == 0, res.stderr
    (row,) = [ln for ln in res.stdout.splitlines() if " type " in ln]
    assert "f16" in row, row
    assert "TemplateProcessing" not in res.stderr


def test_all_exact_decomposition_says_so(tiny_lm_decomposed, tmp_path):
    src, _ = tiny_lm_decomposed("llama")
    res = run("decompose", str(src), "--rank", "4", "--svd", "exact", "-o", str(tmp_path / "o"))
    assert res.exit_code == 0, res.stderr
    assert "every module took the exact SVD" in res.stdout and "(sampled)" not in res.stdout
    res = run("inspect", str(tmp_path / "o"))
    assert "revision None" not in res.stdout
