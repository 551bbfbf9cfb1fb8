"""What the CLI shows a person: help pages at 80-120 columns, progress bars, plural counts."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sorsa_tools import cli, cli_display, cli_eval

COMMANDS = [
    ["decompose"],
    ["train"],
    ["merge"],
    ["export-lora"],
    ["eval", "gsm8k"],
    ["eval", "math"],
    ["eval", "humaneval"],
    ["push"],
    ["analyze"],
]
EPILOGS = {
    "decompose": cli.DECOMPOSE_EPILOG,
    "train": cli.TRAIN_EPILOG,
    "merge": cli.MERGE_EPILOG,
    "export-lora": cli.EXPORT_LORA_EPILOG,
    "gsm8k": cli_eval.EVAL_GSM8K_EPILOG,
    "math": cli_eval.EVAL_MATH_EPILOG,
    "humaneval": cli_eval.EVAL_HUMANEVAL_EPILOG,
    "push": cli.PUSH_EPILOG,
    "analyze": cli.ANALYZE_EPILOG,
}


def _help(cmd: list[str], columns: int) -> str:
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "dumb", "NO_COLOR": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "sorsa_tools", *cmd, "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def _commands(text: str) -> list[str]:
    """The example commands of a help page, continuation lines joined as a shell joins them."""
    lines = text[text.index("Examples") :].splitlines()
    out, cur = [], None
    for ln in (x.rstrip() for x in lines):
        body = ln.strip()
        if cur is not None:
            cur += " " + body.removesuffix("\\").strip()
            if not body.endswith("\\"):
                out.append(cur)
                cur = None
        elif body.startswith(("sorsa ", "torchrun ")):
            if body.endswith("\\"):
                cur = body.removesuffix("\\").strip()
            else:
                out.append(body)
    return out


@pytest.mark.parametrize("columns", [80, 100, 120])
def test_examples_are_whole_commands_at_any_width(columns):
    """typer re-wrapped the examples into fragments; each is now a command a shell takes, wrapped
    with ` \\` continuations, its remark a # comment, and no line wider than the terminal."""
    for cmd in COMMANDS:
        text = _help(cmd, columns)
        assert all(len(ln.rstrip()) <= columns for ln in text.splitlines()), cmd
        want = [  # the epilog's command lines, their remarks "(...)" left out
            " ".join(
                re.sub(r"\s{2,}\(.*$", "", x).rstrip("\\ ").strip()
                for x in para.strip().splitlines()
                if x.strip().startswith(("sorsa ", "torchrun ", "--"))
            )
            for para in EPILOGS[cmd[-1]].split("\n\n")
            if para.strip().startswith(("sorsa ", "torchrun "))
        ]
        assert [shlex.split(c) for c in _commands(text)] == [shlex.split(w) for w in want], cmd


def test_flags_show_no_value_type():
    text = _help(["merge"], 100)
    line = next(ln for ln in text.splitlines() if "--force" in ln)
    assert "<bool>" not in line and "<bool>" not in text
    assert "<list[Path]>" not in _help(["analyze"], 100).split("Arguments")[0]


def test_eta_is_the_average_rate_since_the_start():
    col = cli_display.AverageRemaining()
    task = SimpleNamespace(completed=12, total=30, elapsed=12 * 40.0, fields={"start_at": 0})
    assert str(col.render(task)) == "ETA 0:12:00"  # 40 s steps: rich's 30 s window said -:--:--
    task = SimpleNamespace(completed=10, total=30, elapsed=50.0, fields={"start_at": 5})  # resumed at 5
    assert str(col.render(task)) == "ETA 0:03:20"
    assert str(col.render(SimpleNamespace(completed=0, total=30, elapsed=1.0, fields={}))) == "ETA -:--:--"


def test_counts_are_plural_only_when_more_than_one():
    assert cli_display.plural(1, "file") == "1 file" and cli_display.plural(3, "file") == "3 files"
    assert cli_display.plural(0, "file") == "0 files"
