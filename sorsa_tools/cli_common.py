"""What every command of the CLI shares: the error handler (one line, the exit code, the Ctrl-C
line), the "wrote" bookkeeping, default outputs, and the --data options of train and eval."""

from __future__ import annotations

import errno
import functools
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from sorsa_tools.cli_display import err, out
from sorsa_tools.errors import SorsaError


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _default_output(output: Path | None, default) -> Path:
    """-o as given, or the command's default (printed, so that the user knows where to look)."""
    if output is not None:
        return output
    output = default()
    out.print(f"output: {output} (no -o given)", highlight=False, soft_wrap=True)
    return output


INTERRUPTED = {
    "decompose": "interrupted; finished shards are kept: run the same command again to resume",
    "train": "interrupted; the last checkpoint is kept: run the same command with --resume to go on",
    "push": "interrupted before the upload finished: run the same command again",
}
INTERRUPTED_DEFAULT = "interrupted; nothing was written: run the same command again"
# interrupted: the Ctrl-C line was printed (typer turns a Ctrl-C outside a command into a silent
# exit 130); sigint: a Ctrl-C arrived at all (a library may have swallowed it, e.g. inside an import)
_said = {"interrupted": False, "sigint": False, "train_out": None}


def _wrote(*paths: Path | None) -> None:
    """Called once the library has returned its outputs: a Ctrl-C after this point (while the
    report prints) must not claim that nothing was written."""
    from sorsa_tools.io.placement import mark_complete

    for p in paths:
        if p is not None:
            mark_complete(Path(p))


def _interrupted_line(command: str) -> str:
    from sorsa_tools.io.placement import completed_outputs

    done = list(dict.fromkeys(map(str, completed_outputs())))
    if done:
        verb = "is" if len(done) == 1 else "are"
        return f"interrupted after the work was done: {' and '.join(done)} {verb} complete"
    if command == "train" and _said.get("train_out") is not None:
        return _train_interrupted(Path(_said["train_out"]))
    return INTERRUPTED.get(command, INTERRUPTED_DEFAULT)


def _train_interrupted(run_dir: Path) -> str:
    """What --resume would keep: the step of the last checkpoint and when it was written."""
    import json

    state = run_dir / "checkpoint" / "state.json"
    try:
        step = json.loads(state.read_text())["step"]
        when = time.strftime("%H:%M:%S", time.localtime(state.stat().st_mtime))
    except (OSError, ValueError, KeyError, TypeError):
        return "interrupted before the first checkpoint was saved: run the same command with --resume (it starts from step 0)"
    return (
        f"interrupted; the checkpoint of step {step} (written {when}) is kept: run the same command with "
        "--resume to go on from there"
    )


def handle_errors(fn):
    """Every failure becomes one line on stderr and a non-zero exit; SORSA_DEBUG=1 re-raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from sorsa_tools.io.placement import forget_completed

        forget_completed()
        _said["sigint"] = False  # set by a Ctrl-C from here on
        _said["train_out"] = None
        try:
            try:
                result = fn(*args, **kwargs)
            except (typer.Exit, typer.BadParameter):  # the command's own exit, a usage error
                raise
            except Exception:
                if _said["sigint"]:  # a Ctrl-C landed in an import and left a module half-built:
                    raise KeyboardInterrupt from None  # what failed next is its consequence
                raise
            if _said["sigint"]:  # a Ctrl-C some library turned into another error and swallowed
                raise KeyboardInterrupt
            return result
        except SorsaError as e:
            if os.environ.get("SORSA_DEBUG"):
                raise
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _said["interrupted"] = True
            _fail(_interrupted_line(fn.__name__), 130)
        except MemoryError:
            _fail("out of memory; close other programs, or use --device cuda / a smaller --rank", 1)
        except OSError as e:
            if os.environ.get("SORSA_DEBUG"):
                raise
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                _fail(
                    f"no space left on the device ({e.filename or 'while writing'}); free space and run again",
                    1,
                )
            _fail(f"{e.strerror or e} ({e.filename or 'no file'}); check the path and permissions", 1)

    return wrapper


DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="JSONL, Parquet, Arrow or CSV file or folder, or a Hub dataset id (read through `datasets`).",
    ),
]
SplitOpt = Annotated[
    str,
    typer.Option(help='Split of a table or Hub dataset, with slicing: "train[:100000]" \\[default: train].'),
]
SubsetOpt = Annotated[str, typer.Option(help="Subset (config name) of a Hub dataset.")]
RevisionOpt = Annotated[str, typer.Option(help="Branch, tag or commit of a Hub dataset.")]


def _data_spec(data: str, split: str | None, subset: str | None, revision: str | None):
    from sorsa_tools.io.records import DataSpec

    return DataSpec(data, split, subset, revision)
