"""`sorsa train` bad inputs: one line naming the problem and the fix, non-zero exit, no traceback,
nothing written where it should not be."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import GSM8K_SLICE
from test_cli_errors import assert_clean_error, run


@pytest.fixture
def dec(tiny_lm_decomposed) -> Path:
    return tiny_lm_decomposed("llama")[1]


def train_args(dec: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        str(dec),
        "--data",
        str(data),
        "-o",
        str(out),
        "--device",
        "cpu",
        "--max-length",
        "384",
        *extra,
    ]


def test_train_cli_runs_and_reports(dec, tmp_path):
    res = run(*train_args(dec, GSM8K_SLICE, tmp_path / "r", "--max-steps", "3", "--batch-size", "2"))
    assert res.exit_code == 0, res.stderr
    assert "final loss" in res.stdout and (tmp_path / "r" / "sorsa_adapter.safetensors").exists()
    res = run(*train_args(dec, GSM8K_SLICE, tmp_path / "r", "--max-steps", "3", "--batch-size", "2"))
    assert res.exit_code == 0 and "already holds this finished run" in res.stdout
    res = run("inspect", str(tmp_path / "r"))
    assert res.exit_code == 0 and "trained" in res.stdout


def test_inspect_run_says_what_the_data_left_out(dec, tmp_path):
    """train reports skipped and truncated examples at the start; inspect keeps saying it."""
    args = train_args(dec, GSM8K_SLICE, tmp_path / "r", "--max-steps", "1", "--batch-size", "2")
    args[args.index("--max-length") + 1] = "250"  # long prompts skipped, long answers truncated
    res = run(*args)
    assert res.exit_code == 0, res.stderr
    data = json.loads((tmp_path / "r" / "sorsa_config.json").read_text())["training"]["data"]
    assert data["skipped_too_long"] > 0 and data["truncated"] > 0
    res = run("inspect", str(tmp_path / "r"))
    line = " ".join(res.stdout.replace("│", " ").split())  # the table wraps the cell: unwrap it
    assert (
        f"({data['examples']} examples, {data['truncated']} truncated, "
        f"{data['skipped_too_long']} skipped: prompt too long)" in line
    ), res.stdout


def test_inspect_run_names_the_settings_changed_from_their_defaults(dec, tmp_path):
    """--lr-scaling and --optim appear in inspect's training line only when not at their default."""
    for name, extra in (("plain", []), ("sv", ["--lr-scaling", "sv"])):
        res = run(
            *train_args(dec, GSM8K_SLICE, tmp_path / name, "--max-steps", "1", "--batch-size", "2", *extra)
        )
        assert res.exit_code == 0, res.stderr
    plain, sv = (
        " ".join(run("inspect", str(tmp_path / n)).stdout.replace("│", " ").split()) for n in ("plain", "sv")
    )
    assert "lr scaling sv" in sv and "lr scaling" not in plain and "optim" not in plain + sv


@pytest.mark.parametrize(
    "content, needles",
    [
        (None, ["data file not found", "--data"]),
        ("", ["no examples", "empty"]),
        (
            '{"question": "a", "answer": "b"}\n{oops\n',
            ["bad.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"],
        ),
        (
            '{"question": "a", "answer": "b"}\n{"question": "c"}\n',
            ["bad.jsonl:2: field 'answer' is missing", "--fields"],
        ),
        ('{"title": "a"}\n', ["bad.jsonl:1: no known fields", "--fields"]),
        (
            '{"question": "a", "answer": "b"}\n42\n',
            ["bad.jsonl:2: each line must be a JSON object, got a number"],
        ),
        ('{"question": null, "answer": "b"}\n', ["bad.jsonl:1: field 'question' must be a string, got null"]),
        (
            '{"question": "a", "answer": ["b"]}\n',
            ["field 'answer' must be a string, got an array", "fix or remove"],
        ),
        # formats that are not JSONL: named as such, not as a bad first line
        ('[{"question": "a",\n  "answer": "b"}]\n', ["bad.jsonl holds a JSON array, not JSONL", "jq -c"]),
        (b"\x1f\x8b\x08\x00rest", ["bad.jsonl is gzip-compressed", "gunzip"]),
        ('{"question": "a", "answer": "b"}\n'.encode("utf-16"), ["bad.jsonl is UTF-16 text", "UTF-8"]),
        (
            b'{"question": "a", "answer": "b"}\n{"question": "caf\xe9", "answer": "b"}\n',
            ["bad.jsonl:2: not UTF-8 (byte 0xe9 at column 18)", "re-save"],
        ),
    ],
)
def test_bad_data(dec, tmp_path, content, needles):
    data = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        data.write_bytes(content)
    elif content is not None:
        data.write_text(content)
    res = run(*train_args(dec, data, tmp_path / "r"))
    assert_clean_error(res, *needles)
    assert not (tmp_path / "r").exists()


def test_data_that_is_not_a_regular_file(dec, tmp_path):
    res = run(*train_args(dec, Path("/dev/null"), tmp_path / "r"))
    assert_clean_error(res, "--data /dev/null is not a regular file")
    assert not (tmp_path / "r").exists()


def test_every_example_too_long(dec, tmp_path):
    res = run(*train_args(dec, GSM8K_SLICE, tmp_path / "r")[:-2], "--max-length", "20")
    assert_clean_error(res, "all 256 examples", "raise --max-length")


def test_not_a_decomposed_dir(tiny_lm_decomposed, tmp_path):
    src, _ = tiny_lm_decomposed("llama")
    assert_clean_error(
        run(*train_args(src, GSM8K_SLICE, tmp_path / "r")), "has no sorsa_config.json", "sorsa decompose"
    )
    assert_clean_error(run(*train_args(tmp_path / "nope", GSM8K_SLICE, tmp_path / "r")), "no such directory")


def test_run_dir_conflicts(dec, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_clean_error(run(*train_args(dec, GSM8K_SLICE, other)), "holds other files", "choose a new -o")
    assert_clean_error(run(*train_args(dec, GSM8K_SLICE, other, "--force")), "not a sorsa run")
    assert (other / "notes.txt").read_text() == "mine"
    assert_clean_error(run(*train_args(dec, GSM8K_SLICE, dec / "run")), "never writes there")
    # a finished run with other settings is another run's files
    r = tmp_path / "r"
    assert run(*train_args(dec, GSM8K_SLICE, r, "--max-steps", "2", "--batch-size", "2")).exit_code == 0
    assert_clean_error(
        run(*train_args(dec, GSM8K_SLICE, r, "--max-steps", "2", "--batch-size", "2", "--lr", "3e-5")),
        "another run's files",
        "--force",
    )
    assert (
        run(
            *train_args(
                dec, GSM8K_SLICE, r, "--max-steps", "2", "--batch-size", "2", "--lr", "3e-5", "--force"
            )
        ).exit_code
        == 0
    )


def test_unfinished_run_needs_resume(dec, tmp_path):
    r = tmp_path / "r"
    r.mkdir()
    (r / "run.json").write_text(json.dumps({"run_id": "x"}))
    assert_clean_error(run(*train_args(dec, GSM8K_SLICE, r)), "another run's files")


def test_bad_options(dec, tmp_path):
    for extra, needle in [
        (["--lr", "0"], "--lr must be > 0"),
        (["--gamma", "-1"], "--gamma must be >= 0"),
        (["--reg-tol", "-1e-4"], "--reg-tol must be >= 0"),
        (["--reg-update", "eq11"], "--reg-update must be one of eq10, eq9"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--warmup-ratio", "1.5"], "--warmup-ratio"),
        (["--template", "alpaca"], "--template 'alpaca'"),
        (["--fields", "a,b,c"], "--fields"),
        (["--dtype", "int8"], "--dtype"),
        (["--lr-scaling", "log"], "--lr-scaling must be one of"),
        (["--optim", "sgd"], "--optim must be one of adamw, adamw8bit"),
        (["--optim", "adamw8bit", "--lr-scaling", "sv"], "--lr-scaling none, or --optim adamw"),
    ]:
        assert_clean_error(run(*train_args(dec, GSM8K_SLICE, tmp_path / "r", *extra)), needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_but_absent(dec, tmp_path):
    args = train_args(dec, GSM8K_SLICE, tmp_path / "r")
    args[args.index("--device") + 1] = "cuda"
    assert_clean_error(run(*args), "no CUDA GPU", "--device cpu")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(dec, tmp_path):
    r = tmp_path / "r"
    res = run(
        *train_args(
            dec,
            GSM8K_SLICE,
            r,
            "--max-steps",
            "6",
            "--batch-size",
            "2",
            "--lr",
            "1e30",
            "--warmup-ratio",
            "0",
            "--save-every",
            "1",
        )
    )
    line = assert_clean_error(res, "the loss became", "last good checkpoint (step 1)", "lower --lr", code=4)
    assert "start over with --force" in line
    assert json.loads((r / "checkpoint" / "state.json").read_text())["step"] == 1
    assert not (r / "sorsa_adapter.safetensors").exists()
    # the advice works as given
    res = run(
        *train_args(dec, GSM8K_SLICE, r, "--max-steps", "2", "--batch-size", "2", "--lr", "1e-4", "--force")
    )
    assert res.exit_code == 0, res.stderr
    assert (r / "sorsa_adapter.safetensors").exists()
    shutil.rmtree(r)


@pytest.mark.parametrize("keep", [20, -100])  # the header cut ("incomplete metadata"), the data cut
def test_a_truncated_residual_shard_is_one_line_everywhere(tiny_lm_decomposed, tmp_path, keep):
    """train and eval read the checkpoint through the same checked open as merge: a truncated shard
    is named, nothing is traceback, and train leaves no run.json that asks for --resume."""
    src, dec0 = tiny_lm_decomposed("llama")
    dec, plain = tmp_path / "dec", tmp_path / "plain"
    shutil.copytree(dec0, dec)
    shutil.copytree(src, plain)
    for d in (dec, plain):
        shard = sorted(d.glob("model*.safetensors"))[0]
        data = shard.read_bytes()
        shard.write_bytes(data[:keep])
    res = run(*train_args(dec, GSM8K_SLICE, tmp_path / "r", "--max-steps", "1"))
    assert_clean_error(res, "truncated or corrupt", "re-download or re-create")
    assert not (tmp_path / "r").exists()
    for model in (dec, plain):
        res = run(
            "eval",
            "gsm8k",
            str(model),
            "--data",
            str(GSM8K_SLICE),
            "--device",
            "cpu",
            "-o",
            str(tmp_path / "e.jsonl"),
        )
        assert_clean_error(res, "truncated or corrupt")
    assert not (tmp_path / "e.jsonl").exists()


def test_a_log_gets_plain_progress_lines(dec, tmp_path):
    """`sorsa train ... > log` printed nothing until the end: stdout that is not a terminal gets plain
    step lines (the first, every 30 s, the last) and the notes; stderr stays empty."""
    res = run(*train_args(dec, GSM8K_SLICE, tmp_path / "r", "--max-steps", "3", "--batch-size", "2"))
    assert res.exit_code == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("step ")]
    assert lines[0].startswith("step 1/3  loss ") and lines[-1].startswith("step 3/3  loss ")
    assert "ETA 0:00:00" in lines[-1] and "elapsed " in lines[0]
    assert res.stderr.strip() == ""


def test_the_interrupt_line_says_what_resume_keeps(dec, tmp_path, monkeypatch):
    import sorsa_tools.train as T

    real = T._save_checkpoint

    def save_then_stop(out, *a, **k):
        real(out, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "_save_checkpoint", save_then_stop)
    res = run(
        *train_args(
            dec, GSM8K_SLICE, tmp_path / "r", "--max-steps", "5", "--batch-size", "2", "--save-every", "2"
        )
    )
    line = assert_clean_error(res, "the checkpoint of step 2 (written ", code=130)
    assert "--resume to go on from there" in line


def test_cli_defaults_are_the_library_defaults():
    """`sorsa train` with no --lr/--gamma/... trains as TrainConfig() does: one set of defaults."""
    import typer

    from sorsa_tools.cli import app
    from sorsa_tools.train import TrainConfig

    cmd = typer.main.get_command(app).commands["train"]
    defaults = {p.name: p.default for p in cmd.params}
    want = TrainConfig()
    for name in (
        "lr",
        "gamma",
        "lr_scaling",
        "optim",
        "reg_tol",
        "reg_update",
        "warmup_ratio",
        "clip",
        "batch_size",
        "max_length",
        "seed",
    ):
        assert defaults[name] == getattr(want, name), name


def test_train_on_parquet_records_the_data_and_resume_refuses_other_data(dec, tmp_path):
    """A Parquet split trains like its JSONL; run.json, sorsa_config and inspect say what the run saw
    (kind, split, rows), and --resume on other data (another split) is one line naming the data."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(x) for x in GSM8K_SLICE.read_text().splitlines()[:60]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm.parquet")
    r = tmp_path / "r"
    args = train_args(dec, tmp_path / "gsm.parquet", r, "--max-steps", "2", "--batch-size", "2")
    res = run(*args, "--split", "train[:40]")
    assert res.exit_code == 0, res.stderr
    data = json.loads((r / "sorsa_config.json").read_text())["training"]["data"]
    assert (data["kind"], data["split"], data["rows"], data["examples"]) == ("parquet", "train[:40]", 40, 40)
    ident = json.loads((r / "run.json").read_text())["data"]
    assert ident["kind"] == "parquet" and list(ident["sha256"]) == ["gsm.parquet"]
    assert "[split train[:40]]" in " ".join(run("inspect", str(r)).stdout.replace("│", " ").split())
    (r / "sorsa_config.json").unlink()  # as if killed before the end: an unfinished run
    assert_clean_error(
        run(*args, "--split", "train[:50]", "--resume"),
        "holds a run of these settings on other data (gsm.parquet, split train[:40])",
        "pass the same --data",
    )
