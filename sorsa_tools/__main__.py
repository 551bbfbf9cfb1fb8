"""The `sorsa` console script and `python -m sorsa_tools`. Kept apart from cli.py so that a Ctrl-C
while typer, rich or torch are still importing is one line too, not a traceback."""

from __future__ import annotations

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
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
