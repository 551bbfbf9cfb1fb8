"""The child side of sandbox.py: contain this process, then run the program in its working directory.

Run as `python -I -B _sandbox_child.py RESULT_FD CONFIG_JSON` with the throwaway directory as cwd.
Standard library only, and nothing of sorsa_tools: this file is the whole of what runs before the
code under test. The order matters: the network namespace needs root's capabilities (or a new user
namespace), so it comes first; the limits come before the privileges are dropped (a process can
lower them but never raise them again); RLIMIT_NPROC after setuid (the kernel counts the new uid);
the audit hook last (it would refuse the steps before it). The outcome goes to RESULT_FD as one JSON
line: {"result": "passed" | "failed" | "crashed", "detail": ...}.
"""

import builtins
import json
import os
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
# Events that end the run at once: new processes, signals to others, networking, native code,
# changing the audit hooks or another process's limits, leaving the directory.
REFUSED_PREFIXES = (
    "os.fork",
    "os.forkpty",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.system",
    "os.startfile",
    "os.kill",
    "os.killpg",
    "os.chdir",
    "os.fchdir",
    "os.unshare",  # 3.12+: namespaces of its own (it may hold capabilities in its user namespace)
    "os.setns",
    "signal.pthread_kill",
    "subprocess.",
    "pty.",
    "socket.",
    "ctypes.",
    "sys.addaudithook",
    "resource.setrlimit",
    "resource.prlimit",
    "winreg.",
)
REFUSED_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "cffi", "_cffi_backend"}
# Events whose arguments are paths that must lie inside the directory (index: which arguments)
PATH_EVENTS = {
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "os.rename": (0, 1),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.chflags": (0,),
    "os.lchflags": (0,),
    "os.truncate": (0,),
    "os.utime": (0,),
    "os.symlink": (1,),
    "os.link": (0, 1),
    "os.setxattr": (0,),
    "os.removexattr": (0,),
    "shutil.rmtree": (0,),
    "shutil.copyfile": (1,),
    "shutil.copytree": (1,),
    "shutil.move": (0, 1),
    "shutil.copymode": (1,),
    "shutil.copystat": (1,),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def report(fd: int, result: str, detail: str) -> None:
    os.write(fd, (json.dumps({"result": result, "detail": detail[:500]}) + "\n").encode())


def isolate_network() -> str:
    """A network namespace of its own (no interface but a down loopback): root can make one
    directly; an ordinary user through a new user namespace, where the kernel allows that."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
        ok = libc.unshare(flags) == 0
        err = os.strerror(ctypes.get_errno())
        del libc
    except (OSError, AttributeError) as e:
        ok, err = False, str(e)
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # a later `import ctypes` is a fresh import: the hook refuses it
    return "namespace" if ok else f"audit hook only (unshare: {err})"


def set_limits(cfg: dict) -> None:
    cpu = int(cfg["cpu_seconds"])
    limits = [
        (resource.RLIMIT_AS, cfg["memory_bytes"]),
        (resource.RLIMIT_FSIZE, cfg["file_size_bytes"]),
        (resource.RLIMIT_NOFILE, cfg["open_files"]),
        (resource.RLIMIT_CORE, 0),
    ]
    for which, n in limits:
        resource.setrlimit(which, (n, n))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL after


def drop_privileges(cfg: dict) -> None:
    """Root runs the code as `nobody` (cfg uid/gid): file permissions then protect the machine's
    files, and RLIMIT_NPROC binds (the kernel does not apply it to root)."""
    if os.geteuid() == 0 and cfg.get("uid") is not None:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
    n = 1  # no new process or thread at all: at the limit already (this one counts)
    resource.setrlimit(resource.RLIMIT_NPROC, (n, n))


def _inside(root: str, path) -> bool:
    if isinstance(path, int):
        return True  # an open file descriptor: only the inherited ones and those opened inside
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    full = os.path.realpath(os.path.join(os.getcwd(), os.fspath(path)))
    return full == root or full.startswith(root + os.sep)


def _other_process(path) -> bool:
    if isinstance(path, int):
        return False
    full = os.path.abspath(os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path))
    parts = full.split(os.sep)
    return len(parts) > 2 and parts[1] == "proc" and parts[2] not in ("self", "thread-self", str(os.getpid()))


def make_hook(fd: int, root: str):
    busy = []

    def refuse(what: str) -> None:
        report(fd, "crashed", f"sandbox refused {what}")
        os._exit(86)

    def hook(event: str, args: tuple) -> None:
        if busy:
            return  # the hook's own calls (realpath) raise events too
        busy.append(1)
        try:
            if event.startswith(REFUSED_PREFIXES):
                refuse(event)
            elif event == "import" and args[0] in REFUSED_IMPORTS:
                refuse(f"import {args[0]}")
            elif event == "open":
                path, mode, flags = args
                writes = (flags or 0) & WRITE_FLAGS or (
                    isinstance(mode, str) and any(c in mode for c in "wax+")
                )
                if _other_process(path):  # their environment (tokens), memory, files
                    refuse(f"opening {path!r} (another process)")
                if writes and not _inside(root, path):
                    refuse(f"writing {path!r} (outside its directory)")
            elif event in PATH_EVENTS:
                for k in PATH_EVENTS[event]:
                    if k < len(args) and args[k] is not None and not _inside(root, args[k]):
                        refuse(f"{event} {args[k]!r} (outside its directory)")
        finally:
            busy.clear()

    return hook


def main() -> None:
    fd, cfg = int(sys.argv[1]), json.loads(sys.argv[2])
    here = os.path.dirname(os.path.realpath(__file__))  # on sys.path before 3.11 (-I implies -P since)
    sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != here]
    root = os.path.realpath(os.getcwd())
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    network = isolate_network() if cfg["network_namespace"] else "audit hook only"
    set_limits(cfg)
    drop_privileges(cfg)
    os.write(fd, (json.dumps({"network": network, "uid": os.getuid()}) + "\n").encode())
    sys.addaudithook(make_hook(fd, root))
    sys.argv = ["program.py"]
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except MemoryError:
        report(fd, "crashed", "MemoryError (the memory limit)")
    except BaseException as e:  # noqa: BLE001  (SystemExit and KeyboardInterrupt too: the tests did not finish)
        report(fd, "failed", f"{type(e).__name__}: {e}".strip().rstrip(":"))
    else:
        report(fd, "passed", "")
    os._exit(0)


if __name__ == "__main__":
    main()
