"""Run untrusted Python programs (generated code + its tests) one process each, contained.

Design, and why (without root, without containers, on any Linux):

- Its own process, started with `python -I -B` (no PYTHON* variables, no user site, no script dir
  on sys.path, no .pyc written) in a new session, so the whole process group can be killed; a
  wall-clock timeout kills the group (SIGKILL), and output goes to files, never into our memory.
- rlimits set in the child before the code runs (soft = hard, so the code cannot raise them):
  RLIMIT_AS (memory), RLIMIT_CPU (CPU seconds, SIGXCPU then SIGKILL), RLIMIT_FSIZE (size of any file
  it writes), RLIMIT_NOFILE, RLIMIT_CORE 0, and RLIMIT_NPROC 1 (no new process or thread).
- A `sys.addaudithook` hook, installed last: CPython offers no way to remove an audit hook from
  Python code, and every fork/exec/spawn/subprocess, signal to another process, socket, ctypes and
  cffi (native calls that would bypass the hook), chdir, opening another process's /proc files
  (its environment: tokens), and every write, rename, delete or chmod outside the working
  directory raises an event first; the hook reports "sandbox refused EVENT"
  and ends the process at once (os._exit: nothing to catch). Tested here: a fork bomb, a socket, a
  write outside.
- Where the kernel allows it, a network namespace of its own (unshare: directly as root, through a
  user namespace otherwise): no route anywhere, whatever the code does. Where it does not, the
  audit hook alone refuses sockets. As root the child also drops to `nobody` before the code runs,
  so file permissions hold (root ignores them) and RLIMIT_NPROC binds (root is exempt from it).
- A throwaway working directory (tempfile, mode 0700, its HOME and TMPDIR too), removed after.

Limits, plainly: this contains generated code that is wrong (loops, memory hogs, stray writes,
forks, sockets); it is not a security boundary against a determined attacker (CPython has been
escaped from via interpreter bugs, the code can read whatever the user running it can read, and a
kernel exploit defeats rlimits). Run code you do not trust in a container or VM.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from sorsa_tools.errors import InputError

CHILD = Path(__file__).with_name("_sandbox_child.py")
RESULTS = ("passed", "failed", "timed_out", "crashed")
CHILD_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "SYSTEMROOT")


@dataclass(frozen=True)
class Limits:
    """What each program may use. Defaults fit HumanEval's tests with a wide margin."""

    timeout: float = 10.0  # wall-clock seconds
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    file_size_mb: int = 16  # largest file it may write (RLIMIT_FSIZE)
    open_files: int = 64
    drop_privileges: bool = True  # as root: run the code as nobody
    network_namespace: bool = True  # try a network namespace of its own
    python: str = sys.executable  # the interpreter the programs run under (standard library only needed)

    def check(self) -> None:
        bad = [
            (self.timeout > 0, f"--timeout must be > 0 seconds (got {self.timeout})"),
            (
                self.memory_mb >= 64,
                f"--memory-mb must be >= 64 (got {self.memory_mb}): Python alone needs ~30",
            ),
            (self.file_size_mb >= 1, f"file size limit must be >= 1 MiB (got {self.file_size_mb})"),
            (shutil.which(self.python) is not None, f"--python {self.python}: no such interpreter"),
        ]
        for ok, msg in bad:
            if not ok:
                raise InputError(msg)


@dataclass
class Outcome:
    result: str  # one of RESULTS
    detail: str  # the exception, the refused operation, the signal...
    seconds: float
    network: str = ""  # how the network was cut: "namespace" or "audit hook only (...)"


def _child_cpu(limits: Limits) -> int:
    """CPU seconds: past the wall-clock timeout, so that a busy loop is a timeout of the clock."""
    return max(1, int(limits.timeout + 0.999)) + 1


def _child_config(limits: Limits) -> dict:
    cfg = {
        "memory_bytes": limits.memory_mb * 2**20,
        "file_size_bytes": limits.file_size_mb * 2**20,
        "open_files": limits.open_files,
        "cpu_seconds": _child_cpu(limits),
        "network_namespace": limits.network_namespace,
        "uid": None,
        "gid": None,
    }
    if limits.drop_privileges and os.geteuid() == 0 and _world_readable_python(limits.python):
        try:
            nobody = pwd.getpwnam("nobody")
            cfg["uid"], cfg["gid"] = nobody.pw_uid, nobody.pw_gid
        except KeyError:
            cfg["uid"] = cfg["gid"] = 65534
    return cfg


@functools.cache
def _world_readable_python(python: str) -> bool:
    """Whether `nobody` can run this interpreter and import its standard library (not so for a
    pyenv under /root, mode 0700): if not, the child stays root, contained by the rest."""
    ask = "import sys, sysconfig; print(sys.executable); print(sysconfig.get_paths()['stdlib'])"
    try:
        paths = subprocess.run([python, "-I", "-c", ask], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    paths = [Path(x).resolve() for x in paths.splitlines()] + [CHILD.resolve()]
    for p in paths:  # each readable by others, each directory above it passable
        try:
            if not p.stat().st_mode & stat.S_IROTH or any(
                not d.stat().st_mode & stat.S_IXOTH for d in p.parents
            ):
                return False
        except OSError:
            return False
    return len(paths) == 3


def _remove_tree(path: Path) -> None:
    """rmtree that first gives back permissions the code took away (chmod 0 inside its dir)."""

    def fix(func, p, _exc):
        os.chmod(os.path.dirname(p), 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o700)
        func(p)

    shutil.rmtree(path, onexc=fix) if sys.version_info >= (3, 12) else shutil.rmtree(path, onerror=fix)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _verdict(rc: int, reports: list[dict], killed: bool, limits: Limits, stderr: str) -> tuple[str, str]:
    final = next((r for r in reversed(reports) if r.get("result") in RESULTS), None)
    if killed:
        return "timed_out", f"killed after {limits.timeout:g} s (wall clock)"
    if final is not None:
        return final["result"], str(final.get("detail", ""))
    if rc == -signal.SIGXCPU:
        return "timed_out", f"CPU time limit ({_child_cpu(limits)} s)"
    if rc < 0:
        return "crashed", f"killed by {signal.Signals(-rc).name}"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return "crashed", f"exited with code {rc} before its tests finished" + (
        f" ({last[:200]})" if last else ""
    )


def run_program(source: str, limits: Limits | None = None) -> Outcome:
    """Run one program (its tests included) in a contained child; how it ended."""
    limits = limits or Limits()
    cfg = _child_config(limits)
    t0 = time.perf_counter()
    top = Path(tempfile.mkdtemp(prefix="sorsa-sandbox-"))
    try:
        work = top / "work"
        work.mkdir(mode=0o700)
        (work / "program.py").write_text(source, encoding="utf-8")
        if cfg["uid"] is not None:
            os.chmod(top, 0o711)  # nobody may pass through to work/, not list or write top/
            for p in (work, work / "program.py"):
                os.chown(p, cfg["uid"], cfg["gid"])
        env = {k: os.environ[k] for k in CHILD_ENV_KEEP if k in os.environ}
        env |= {"HOME": str(work), "TMPDIR": str(work), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        rc, killed, raw = _spawn(limits.python, work, top, cfg, env, limits.timeout)
        reports = []
        for line in raw.decode("utf-8", "replace").splitlines():
            try:
                reports.append(json.loads(line))
            except ValueError:
                pass  # the code under test wrote into the result pipe: not a report
        reports = [x for x in reports if isinstance(x, dict)]
        result, detail = _verdict(rc, reports, killed, limits, _tail(top / "stderr"))
        network = next((x["network"] for x in reports if "network" in x), "")
        return Outcome(result, detail, time.perf_counter() - t0, network)
    finally:
        _remove_tree(top)


def _spawn(
    python: str, work: Path, top: Path, cfg: dict, env: dict, timeout: float
) -> tuple[int, bool, bytes]:
    """Start the child, wait for it at most `timeout` seconds, kill its process group; (exit code,
    whether it was killed for the time, what it wrote to the result pipe)."""
    r, w = os.pipe()
    try:
        with open(top / "stdout", "wb") as out, open(top / "stderr", "wb") as err:
            try:
                proc = subprocess.Popen(
                    [python, "-I", "-B", str(CHILD), str(w), json.dumps(cfg)],
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    pass_fds=(w,),
                    start_new_session=True,
                )
            finally:
                os.close(w)
        killed = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            killed = True
        _kill_group(proc.pid)  # also whatever it left behind in its group
        if killed:
            rc = proc.wait()
        os.set_blocking(r, False)
        raw = b""
        try:
            while chunk := os.read(r, 65536):
                raw += chunk
        except BlockingIOError:
            pass
        return rc, killed, raw
    finally:
        os.close(r)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_many(
    sources: list[str],
    limits: Limits | None = None,
    workers: int | None = None,
    done: Callable[[int, Outcome], None] | None = None,
) -> list[Outcome]:
    """run_program over sources, `workers` at a time (threads that each wait on one child);
    `done(i, outcome)` as each finishes."""
    limits = limits or Limits()
    limits.check()
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    out: list[Outcome | None] = [None] * len(sources)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_program, src, limits): i for i, src in enumerate(sources)}
        for f in as_completed(futures):
            i = futures[f]
            out[i] = f.result()
            if done is not None:
                done(i, out[i])
    return out


def describe(limits: Limits) -> dict:
    """The limits as the summary records them."""
    return asdict(limits) | {"uid": _child_config(limits)["uid"]}
