"""Putting outputs in place: temp names, the temps killed runs leave, swapping a finished directory
in, and which outputs this process has completed. Torch-free: the CLI reads it on a Ctrl-C."""

from __future__ import annotations

import glob
import os
import re
import shutil
from pathlib import Path


def temp_path(path: Path) -> Path:
    """This process's temp name for `path`; temps of `path` that killed processes left go first."""
    remove_stale_temps(path.parent, path.name + ".")
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


# what this package writes before a rename puts it in place: .NAME.KIND-PID, maybe with a suffix
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:tmp|merge|old|export-tmp|export-old)-(?P<pid>\d+)(?:\.\w+)?$")


def _running(pid: int) -> bool:
    if pid == os.getpid():  # ours: another thread may be writing it (failed calls remove their own)
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a number no PID can be
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(directory: Path, prefix: str = "") -> list[Path]:
    """Remove the temp files and dirs a killed sorsa process left in `directory` (only those whose
    PID no longer runs, so a concurrent run's are kept); `prefix` narrows it to one output's
    (names starting with '.' + prefix). A kill -9 runs no clean-up, so every writer calls this."""
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.glob("." + glob.escape(prefix) + "*"):
        m = _TEMP_NAME.match(p.name)
        if m is None or _running(int(m["pid"])):
            continue
        _remove(p)
        removed.append(p)
    return removed


_completed: list[Path] = []


def mark_complete(path: Path) -> None:
    """Record that a command's output is now whole in place. A Ctrl-C from here on (while clean-up
    or the report runs) must not be told that nothing was written: the CLI reads this."""
    _completed.append(path)


def completed_outputs() -> list[Path]:
    return list(_completed)


def forget_completed() -> None:
    _completed.clear()


def remove_path(*paths: Path) -> None:
    """Delete files, links or directory trees; a Ctrl-C part-way still finishes them all, then is
    raised (what is being removed is already out of use: a half-deleted copy would only be litter)."""
    stopped: KeyboardInterrupt | None = None
    for p in paths:
        try:
            _remove(p)
        except KeyboardInterrupt as e:
            stopped = e
            _remove(p)
    if stopped is not None:
        raise stopped


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def aside_name(p: Path) -> Path:
    """Where an earlier output waits while its replacement is renamed in."""
    return p.with_name(f".{p.name}.old-{os.getpid()}")


def swap_dir_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete directory `tmp` to `out`, replacing what `out` held. Cut short anywhere
    (a Ctrl-C may land just after a rename returned), `out` ends up either the new output (marked
    complete) or the earlier one put back: never missing, never half."""
    old = aside_name(out)
    had = out.exists() or out.is_symlink()
    try:
        if had:
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if not tmp.exists() and out.exists():  # the new output landed before the interrupt
            mark_complete(out)
            remove_path(old)
        elif had and old.exists() and not (out.exists() or out.is_symlink()):
            os.replace(old, out)
        raise
    mark_complete(out)
    remove_path(old)
