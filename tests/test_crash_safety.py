"""A kill (SIGKILL, Ctrl-C) at any moment leaves nothing that blocks or misleads the rerun: no temp
file that survives it, nothing incomplete under a final name, and a resumed result equal bit for
bit to an uninterrupted one. (From a crash-fuzz review that killed every command at random moments
and at every file operation.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import GSM8K_SLICE
from test_cli_errors import run

import sorsa_tools.merge as merge_module
from sorsa_tools import decompose
from sorsa_tools.decompose import _svd_pool, _torch_threads
from sorsa_tools.errors import OutputDirError
from sorsa_tools.format import ADAPTER_FILE, CONFIG_FILE
from sorsa_tools.gguf_export import export_gguf
from sorsa_tools.io import placement
from sorsa_tools.io.placement import remove_stale_temps
from sorsa_tools.lora_export import export_lora
from sorsa_tools.merge import merge
from sorsa_tools.source import MergedSource
from sorsa_tools.train import RUN_FILE, TrainConfig, train

CFG = dict(max_length=256, batch_size=2, max_steps=2)


@pytest.fixture(scope="module")
def run_dir(tiny_lm_decomposed, tmp_path_factory) -> Path:
    _, dec = tiny_lm_decomposed("llama")
    r = tmp_path_factory.mktemp("crash") / "run"
    train(dec, GSM8K_SLICE, r, config=TrainConfig(**CFG), device="cpu")
    return r


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_stale_temps_are_those_of_dead_processes_only(tmp_path, dead_pid):
    live, me = os.getppid(), os.getpid()  # this process's own: another of its threads may write it
    stale = [f".m.gguf.tmp-{dead_pid}", f".m.f16.tmp-{dead_pid}.gguf", f".out.export-old-{dead_pid}"]
    kept = [
        f".m.gguf.tmp-{live}",
        f".m.json.tmp-{me}",
        ".m.gguf.tmp-x",
        "m.gguf.tmp-1",
        ".m.gguf",
        "notes.txt",
    ]
    for n in stale + kept:
        (tmp_path / n).write_text("x")
    (tmp_path / f".out.merge-{dead_pid}").mkdir()
    (tmp_path / f".out.merge-{dead_pid}" / "model.safetensors").write_text("x")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale + [f".out.merge-{dead_pid}"])
    assert _names(tmp_path) == sorted(kept)
    (tmp_path / f".other.tmp-{dead_pid}").write_text("x")
    assert remove_stale_temps(tmp_path, "m.") == [] and (tmp_path / f".other.tmp-{dead_pid}").exists()


@pytest.mark.parametrize("at", [1, 2])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_swap_cut_short_anywhere_leaves_one_whole_output(tmp_path, monkeypatch, at, when):
    """Ctrl-C at either rename of the swap, before it happens or just after it returned: OUT is the
    earlier output put back, or the new one marked complete; never missing, nothing else left."""
    out, tmp = tmp_path / "out", tmp_path / ".out.merge-1"
    out.mkdir()
    (out / "old").write_text("earlier output")
    tmp.mkdir()
    (tmp / "new").write_text("new output")
    real, calls = os.replace, []

    def interrupted(a, b):
        calls.append(a)
        if len(calls) == at and when == "after":
            real(a, b)
        if len(calls) == at:
            raise KeyboardInterrupt
        real(a, b)

    placement.forget_completed()
    monkeypatch.setattr(placement.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        placement.swap_dir_into_place(tmp, out)
    monkeypatch.undo()
    landed = (at, when) == (2, "after")
    assert _names(out) == (["new"] if landed else ["old"])
    assert placement.completed_outputs() == ([out] if landed else [])
    assert _names(tmp_path) == (["out"] if landed else [tmp.name, "out"])
    if not landed:  # the caller's own rerun
        placement.swap_dir_into_place(tmp, out)
        assert _names(out) == ["new"] and _names(tmp_path) == ["out"]
    placement.forget_completed()


def test_train_run_killed_while_writing_its_run_file(tiny_lm_decomposed, tmp_path, dead_pid):
    """All RUN held was the temp of run.json: --resume and a plain rerun start the run afresh."""
    _, dec = tiny_lm_decomposed("llama")
    out = tmp_path / "run"
    out.mkdir()
    (out / f".{RUN_FILE}.tmp-{dead_pid}").write_text('{"run_')
    r = train(dec, GSM8K_SLICE, out, config=TrainConfig(**CFG), device="cpu", resume=True)
    assert r.steps == 2 and not r.already_done
    assert not any(p.name.startswith(".") for p in out.iterdir()), _names(out)


def test_train_killed_after_its_config_is_reported_done_and_tidied(
    run_dir, tiny_lm_decomposed, dead_pid, monkeypatch
):
    """Killed after sorsa_config.json, before checkpoint/ went, with temps of the adapter, the config
    and the plot left: the rerun reports the finished run and removes the rest."""
    _, dec = tiny_lm_decomposed("llama")
    before = _tree_bytes(run_dir)
    (run_dir / "checkpoint").mkdir()
    (run_dir / "checkpoint" / "state.json").write_text('{"step": 1}')
    for n in (
        f".{ADAPTER_FILE}.tmp-{dead_pid}",
        f".{CONFIG_FILE}.tmp-{dead_pid}",
        f".loss.tmp-{dead_pid}.png",
    ):
        (run_dir / n).write_text("partial")
    r = train(dec, GSM8K_SLICE, run_dir, config=TrainConfig(**CFG), device="cpu")
    assert r.already_done and r.steps == 2
    assert _tree_bytes(run_dir) == before

    # a Ctrl-C while checkpoint/ is deleted: it is gone whole, not left half-deleted beside the
    # finished run (push would upload it)
    (run_dir / "checkpoint").mkdir()
    (run_dir / "checkpoint" / "state.json").write_text('{"step": 1}')
    real_rmtree, calls = shutil.rmtree, []

    def interrupted_once(path, *a, **k):
        calls.append(Path(path).name)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        train(dec, GSM8K_SLICE, run_dir, config=TrainConfig(**CFG), device="cpu")
    monkeypatch.undo()
    assert calls[0].startswith(".checkpoint") and _tree_bytes(run_dir) == before


def test_forced_decompose_killed_while_clearing_is_not_reported_done(tiny_factory, tmp_path, monkeypatch):
    """--force over a finished dir, interrupted after its first deletion: the rerun must not take
    the dir for finished (its config marks it so), and --force then rebuilds the same bytes."""
    src = tiny_factory("llama", torch.float32)
    out = tmp_path / "d"
    decompose(str(src), 4, out, check_sample=0)
    ref = _tree_bytes(out)
    real_unlink, real_rmtree = Path.unlink, shutil.rmtree

    def unlink_then_interrupted(self, *a, **k):
        real_unlink(self, *a, **k)
        raise KeyboardInterrupt

    def rmtree_then_interrupted(*a, **k):
        real_rmtree(*a, **k)
        raise KeyboardInterrupt

    real_iterdir = Path.iterdir

    def config_listed_last(self):  # whatever order the file system lists: the config goes first
        return iter(sorted(real_iterdir(self), key=lambda p: p.name == CONFIG_FILE))

    monkeypatch.setattr(Path, "unlink", unlink_then_interrupted)
    monkeypatch.setattr(shutil, "rmtree", rmtree_then_interrupted)
    monkeypatch.setattr(Path, "iterdir", config_listed_last)
    with pytest.raises(KeyboardInterrupt):
        decompose(str(src), 4, out, check_sample=0, force=True)
    monkeypatch.undo()
    assert not (out / CONFIG_FILE).exists() and len(_tree_bytes(out)) == len(ref) - 1
    with pytest.raises(OutputDirError, match="pass --force"):
        decompose(str(src), 4, out, check_sample=0)
    assert not decompose(str(src), 4, out, check_sample=0, force=True).already_done
    got = _tree_bytes(out)
    assert got.keys() == ref.keys() and all(
        got[k] == ref[k] for k in ref if k != CONFIG_FILE
    )  # it has a date


def test_svd_worker_threads_compute_like_the_caller(monkeypatch):
    """A new thread starts at OpenMP's default thread count, and an SVD's last bits depend on it: the
    pipeline's workers must use the count they were given, or reruns differ (9e-8) from each other."""
    torch.manual_seed(0)
    a = torch.randn(1024, 768)
    with _torch_threads(1):
        ref = torch.linalg.svd(a, full_matrices=False)
        with _svd_pool(2, 1) as pool:
            got = pool.submit(torch.linalg.svd, a, full_matrices=False).result()
    assert all(torch.equal(x, y) for x, y in zip(ref, got, strict=True))


def test_killed_split_gguf_leaves_no_loadable_mix(tiny_lm_decomposed, tmp_path, monkeypatch, dead_pid):
    """Interrupted while the parts are renamed into place: none of the new parts stays under a final
    name, an earlier split (--force) comes back whole, and what a kill -9 leaves (later parts without
    a first one, temps) neither blocks nor survives a plain rerun."""
    _, dec = tiny_lm_decomposed("llama")
    src = MergedSource(dec)
    out = tmp_path / "m.gguf"
    real_path_replace, real_os_replace, landed = Path.replace, os.replace, []

    def cut_after_one(self, target):  # the new parts are renamed with Path.replace
        if landed:
            raise KeyboardInterrupt
        landed.append(target)
        return real_path_replace(self, target)

    monkeypatch.setattr(Path, "replace", cut_after_one)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(src, out, "f32", split_max_size=150_000)
    monkeypatch.undo()
    assert len(landed) == 1 and _names(tmp_path) == []

    (tmp_path / "m-00003-of-00003.gguf").write_text("a later part left by a kill -9")
    (tmp_path / f".m.gguf.tmp-{dead_pid}").write_text("a killed single-file export")
    r = export_gguf(src, out, "f32", split_max_size=150_000)
    assert _names(tmp_path) == sorted(p.name for p in r.paths) and len(r.paths) >= 2
    before = _tree_bytes(tmp_path)

    landed.clear()
    monkeypatch.setattr(Path, "replace", cut_after_one)
    with pytest.raises(KeyboardInterrupt):  # --force, cut after one new part landed
        export_gguf(src, out, "f16", split_max_size=100_000, force=True)
    monkeypatch.undo()
    assert _tree_bytes(tmp_path) == before

    moved = []

    def cut_while_moving_aside(a, b):
        if ".old-" in Path(b).name:
            moved.append(a)
            if len(moved) == 2:
                raise KeyboardInterrupt
        real_os_replace(a, b)

    monkeypatch.setattr(os, "replace", cut_while_moving_aside)
    with pytest.raises(KeyboardInterrupt):  # --force, cut while the earlier parts are moved aside
        export_gguf(src, out, "f16", force=True)
    monkeypatch.undo()
    assert _tree_bytes(tmp_path) == before
    assert "-00001-of-" in Path(moved[0]).name  # the first part goes first

    # a Ctrl-C while the earlier parts (set aside) are removed: the new split is complete and said
    # to be, and none of the earlier parts is left behind
    real_unlink, unlinked = Path.unlink, []

    def cut_at_first_removal(self, *a, **k):
        if ".old-" in self.name and not unlinked:
            unlinked.append(self.name)
            raise KeyboardInterrupt
        return real_unlink(self, *a, **k)

    placement.forget_completed()
    monkeypatch.setattr(Path, "unlink", cut_at_first_removal)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(src, out, "f16", split_max_size=100_000, force=True)
    monkeypatch.undo()
    new = _names(tmp_path)
    assert unlinked and not any(n.startswith(".") for n in new) and new[0].startswith("m-00001-of-")
    assert _tree_bytes(tmp_path) != before and placement.completed_outputs() == [tmp_path / new[0]]
    placement.forget_completed()


def test_exports_and_merges_remove_what_killed_ones_left(
    tiny_lm_decomposed, run_dir, tmp_path, dead_pid, monkeypatch
):
    _, dec = tiny_lm_decomposed("llama")
    for n in ("lora", "merged"):
        for kind in ("export-tmp", "export-old", "merge", "old"):
            (tmp_path / f".{n}.{kind}-{dead_pid}").mkdir()
    live = tmp_path / f".lora.export-tmp-{os.getppid()}"  # a concurrent export's: kept
    live.mkdir()
    export_lora(dec, run_dir, tmp_path / "lora")
    export_lora(dec, run_dir, tmp_path / "lora", force=True)  # an earlier export, replaced
    merge(dec, tmp_path / "merged", adapter=run_dir)
    assert _names(tmp_path) == sorted(["lora", "merged", live.name])
    # interrupted between moving the earlier merge aside and renaming the new one in: it comes back
    before = _tree_bytes(tmp_path / "merged")
    real_replace, real_swap, swap = os.replace, placement.swap_dir_into_place, {"on": False, "renames": 0}

    def second_rename_interrupted(a, b):  # counts only the swap's renames, not the shards'
        swap["renames"] += swap["on"]
        if swap["renames"] == 2:
            raise KeyboardInterrupt
        real_replace(a, b)

    def swapping(tmp, out):
        swap["on"] = True
        return real_swap(tmp, out)

    monkeypatch.setattr(os, "replace", second_rename_interrupted)
    monkeypatch.setattr(merge_module, "swap_dir_into_place", swapping)
    with pytest.raises(KeyboardInterrupt):
        merge(dec, tmp_path / "merged", adapter=run_dir, force=True)
    monkeypatch.undo()
    assert _tree_bytes(tmp_path / "merged") == before
    assert _names(tmp_path) == sorted(["lora", "merged", live.name])


def test_ctrl_c_after_the_work_says_it_is_complete(tiny_lm_decomposed, run_dir, tmp_path, monkeypatch):
    """A Ctrl-C once the output is in place (while the earlier one is removed, or the report
    prints) must not claim that nothing was written."""
    from sorsa_tools import cli

    _, dec = tiny_lm_decomposed("llama")
    out = tmp_path / "m"
    argv = ["merge", str(dec), "--adapter", str(run_dir), "-o", str(out), "--force"]
    complete = f"error: interrupted after the work was done: {out} is complete"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "kv_table", interrupted)
    res = run(*argv)
    assert res.exit_code == 130 and res.stderr.strip() == complete
    assert (out / "config.json").is_file()
    monkeypatch.undo()

    monkeypatch.setattr(placement.shutil, "rmtree", interrupted)  # removing the earlier merge
    res = run(*argv)
    assert res.exit_code == 130 and res.stderr.strip() == complete
    monkeypatch.undo()
    assert (out / "config.json").is_file()

    res = run("export-lora", str(dec), "--adapter", str(tmp_path / "nope"), "-o", str(tmp_path / "l"))
    assert res.exit_code == 2 and "complete" not in res.stderr  # the next command starts clean


def test_a_swallowed_ctrl_c_still_stops_the_command(monkeypatch, capfd, tmp_path):
    """A Ctrl-C landing inside an import can come out as another error that a library's fallback
    swallows (seen in numpy's and accelerate's imports): the command must still end with exit 130
    and say so, not exit 0 as if the user had not asked it to stop."""
    import signal
    from types import SimpleNamespace

    from sorsa_tools import cli

    def export(*a, **k):
        try:
            signal.raise_signal(signal.SIGINT)
        except Exception:  # what the fallback catches: the interrupt became another error
            pass
        except KeyboardInterrupt:
            pass
        return SimpleNamespace(
            out_dir=tmp_path / "l", rank=8, sorsa_rank=4, modules=1, target_modules=["q_proj"],
            exact_names=False, base_model="b", dtype="float32", bytes=1, max_check_error=0.0,
            max_relative_delta=0.0, seconds=0.0,
        )  # fmt: skip

    monkeypatch.setattr("sorsa_tools.lora_export.export_lora", export)
    assert cli.run(["export-lora", "d", "--adapter", "r", "-o", str(tmp_path / "l")]) == 130
    err = capfd.readouterr().err.strip()
    assert err == f"error: interrupted after the work was done: {tmp_path / 'l'} is complete", err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    try:  # the console script: from the end of the command on, Ctrl-C stays ignored until exit
        assert cli.run(["--version"], exiting=True) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_an_error_after_a_swallowed_ctrl_c_is_reported_as_the_interrupt(monkeypatch, capfd):
    """A Ctrl-C inside numpy's import left it half-built and the command failed later with an
    AttributeError traceback: the user pressed Ctrl-C, so that is what is reported (exit 130)."""
    import signal

    from sorsa_tools import cli

    def export(*a, **k):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        raise AttributeError("module 'numpy' has no attribute 'matrix'")

    monkeypatch.setattr("sorsa_tools.lora_export.export_lora", export)
    assert cli.run(["export-lora", "d", "--adapter", "r", "-o", "l"]) == 130
    err = capfd.readouterr().err.strip()
    assert err == "error: interrupted; nothing was written: run the same command again", err


def test_the_console_script_exits_130_after_a_ctrl_c_in_string_exec(tmp_path):
    """A KeyboardInterrupt that ends code run from a string (exec of a str, pybind11's exec) sets
    CPython's "unhandled KeyboardInterrupt" flag even when it is caught; under `python -m` the exit
    then killed the process with SIGINT (-2) instead of returning 130."""
    import subprocess
    import sys

    (tmp_path / "ctrl_c_in_exec.py").write_text(
        "import sys\n"
        "import sorsa_tools.cli as cli\n"
        "from sorsa_tools.__main__ import main\n"
        "def run(argv=None, *, exiting=False):\n"
        "    try:\n"
        "        exec('raise KeyboardInterrupt', {})\n"
        "    except KeyboardInterrupt:\n"
        "        sys.stderr.write('error: interrupted\\n')\n"
        "        return 130\n"
        "cli.run = run\n"
        "sys.exit(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-m", "ctrl_c_in_exec"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 130 and proc.stderr == "error: interrupted\n", (proc.returncode, proc.stderr)


@pytest.mark.parametrize("when", ["before", "after"])
def test_train_stopped_at_its_config_is_resumable_or_complete(
    tiny_lm_decomposed, run_dir, tmp_path, monkeypatch, when
):
    """Ctrl-C as the finished run's config is written. Before: no config, the checkpoint is kept
    (hidden, as resume reads it) and --resume ends with the uninterrupted run's adapter. Just after:
    the run is finished and said to be; a checkpoint/ is never seen beside a config."""
    import sorsa_tools.train as train_module

    _, dec = tiny_lm_decomposed("llama")
    out = tmp_path / "run"
    real = train_module.atomic_write_json

    def stopped(path, obj):
        if Path(path).name == CONFIG_FILE:
            if when == "after":
                real(path, obj)
            raise KeyboardInterrupt
        return real(path, obj)

    placement.forget_completed()
    monkeypatch.setattr(train_module, "atomic_write_json", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(dec, GSM8K_SLICE, out, config=TrainConfig(**CFG), device="cpu", save_every=1)
    monkeypatch.undo()
    assert not (out / "checkpoint").exists()
    assert (out / CONFIG_FILE).exists() == (when == "after")
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")]
    assert hidden == ([] if when == "after" else [".checkpoint-old"])  # finished: nothing to resume
    assert placement.completed_outputs() == ([out] if when == "after" else [])
    placement.forget_completed()
    r = train(dec, GSM8K_SLICE, out, config=TrainConfig(**CFG), device="cpu", save_every=1, resume=True)
    assert r.already_done == (when == "after") and r.resumed_from == (None if when == "after" else 1)
    assert (out / ADAPTER_FILE).read_bytes() == (run_dir / ADAPTER_FILE).read_bytes()
    assert not any(p.name.startswith(".") for p in out.iterdir()), _names(out)


def test_a_ctrl_c_lost_in_a_destructor_still_stops_the_command(monkeypatch, capfd):
    """A Ctrl-C that lands in a __del__ (seen in regex's Group.__del__ during eval's start-up) was
    printed as "Exception ignored ... KeyboardInterrupt" and lost: the command ran on, and further
    Ctrl-Cs only said "stopping". It must stop the command, with one line and no traceback."""
    import signal
    import time

    from sorsa_tools import cli

    class Interrupted:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    ran_on = []

    def export(*a, **k):
        Interrupted()  # dropped at once: its __del__ gets the Ctrl-C
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:
            time.sleep(0.01)
        ran_on.append(True)

    monkeypatch.setattr("sorsa_tools.lora_export.export_lora", export)
    t0 = time.monotonic()
    assert cli.run(["export-lora", "d", "--adapter", "r", "-o", "l"]) == 130
    assert time.monotonic() - t0 < 4 and not ran_on
    err = capfd.readouterr().err.strip()
    assert err == "error: interrupted; nothing was written: run the same command again", err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_console_script_stops_on_sigint_when_it_started_with_sigint_ignored(monkeypatch, capfd):
    """nohup and `cmd &` start the process with SIGINT ignored: the console script takes Ctrl-C over
    all the same, so that `kill -INT` stops a background train exactly as Ctrl-C stops one in the
    foreground (exit 130, one line), instead of being ignored."""
    import signal

    from sorsa_tools import cli

    def stage(*a, **k):
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("the SIGINT was ignored")

    monkeypatch.setattr("sorsa_tools.merge.merge", stage)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as inherited
    assert cli.run(["merge", "d", "-o", "o"], exiting=True) == 130
    err = capfd.readouterr().err.strip()
    assert err == "error: interrupted; nothing was written: run the same command again", err
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # exiting: ignored again from the end on
