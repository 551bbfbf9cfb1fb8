"""The `sorsa` console script and `python -m sorsa_tools`. Kept apart from cli.py so that a Ctrl-C
while typer, rich or torch are still importing is one line too, not a traceback."""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    try:
        from sorsa_tools.cli import run

        code = run(argv, exiting=True)
    except KeyboardInterrupt:  # before run() took over Ctrl-C, or after it gave it back
        sys.stderr.write("error: interrupted before the command started; nothing was written\n")
        code = 130
    # exiting: worker threads finish their task first, and a Ctrl-C now (the work done or already
    # given up) would only turn the exit into a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if code == 130:
        # interrupted, the line printed, clean-up done. A Ctrl-C that passed through code run by
        # PyRun_String (pybind11's exec, as torch's import does) leaves CPython's "unhandled
        # KeyboardInterrupt" flag set even though it was handled, and the normal exit would then
        # kill the process with SIGINT (-2) instead of returning 130
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
