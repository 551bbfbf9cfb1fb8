"""The safetensors format read and written by hand, one tensor at a time.

`safe_open` maps the whole file, so RSS grows to the shard size while a handle is open; reading
with `os.pread` at the header's offsets keeps peak memory at about one tensor. The writer streams
tensors into a temp file whose header is known up front (names, dtypes, shapes), so a shard never
has to sit in memory whole, and renames it into place only once complete.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from sorsa_tools.errors import (
    CheckpointError,
    DiskFullError,
    InputError,
    OutputDirError,
    VerificationError,
)
from sorsa_tools.format import CONFIG_FILE
from sorsa_tools.io.placement import temp_path

# safetensors dtype code <-> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}
for _code in ("U16", "U32", "U64"):
    ITEMSIZE[_code] = int(_code[1:]) // 8

MAX_HEADER_BYTES = 100 * 1024 * 1024
COPY_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (absolute byte offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is truncated or corrupt ({why}); re-download or re-create that file")


class SafetensorsFile:
    """Parsed header of a safetensors file plus pread-based tensor reads.

    Opening validates the whole layout (offsets in range, contiguous, sizes matching shapes,
    data ending exactly at the end of the file), so a truncated download fails here, up front.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise _corrupt(self.path, f"only {size} bytes")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or n + 8 > size:
                    raise _corrupt(self.path, f"header length {n} does not fit a {size}-byte file")
                raw = f.read(n)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} is missing; re-download the checkpoint") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _corrupt(self.path, f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise _corrupt(self.path, "header is not a JSON object")
        self.header_bytes = raw
        self.size = size
        self.data_start = 8 + n
        meta = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = meta if isinstance(meta, dict) else {}
        infos = []
        for name, entry in header.items():
            try:
                dtype = entry["dtype"]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise _corrupt(self.path, f"bad header entry for {name!r}") from None
            if dtype not in ITEMSIZE:
                raise _corrupt(self.path, f"unknown dtype {dtype!r} of {name!r}")
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * ITEMSIZE[dtype] or begin > end:
                raise _corrupt(self.path, f"size of {name!r} does not match its shape")
            infos.append(TensorInfo(name, dtype, shape, self.data_start + begin, self.data_start + end))
        infos.sort(key=lambda t: (t.start, t.end))
        pos = self.data_start
        for t in infos:
            if t.start != pos:
                raise _corrupt(self.path, f"tensor {t.name!r} overlaps or leaves a gap")
            pos = t.end
        if pos != size:
            raise _corrupt(self.path, f"data ends at byte {pos} but the file has {size} bytes")
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in infos}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read_bytes(self, info: TensorInfo) -> bytearray:
        return pread_exact(self.path, info.start, info.nbytes)

    def read_tensor(self, name: str) -> torch.Tensor:
        """One tensor, in its own memory (no mapping of the file stays behind)."""
        info = self.tensors[name]
        buf = self.read_bytes(info)
        if info.dtype not in DTYPES:
            raise CheckpointError(f"{self.path}: dtype {info.dtype} of {name} is not supported")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=DTYPES[info.dtype])
        return torch.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)


def pread_exact(path: Path, offset: int, nbytes: int) -> bytearray:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise _corrupt(path, f"ended while reading byte {offset + done}")
            done += n
    finally:
        os.close(fd)
    return buf


def iter_file_chunks(path: Path, offset: int, nbytes: int, chunk: int = COPY_CHUNK) -> Iterator[bytearray]:
    done = 0
    while done < nbytes:
        n = min(chunk, nbytes - done)
        yield pread_exact(path, offset + done, n)
        done += n


def check_read_back(path: Path, start: int, nbytes: int, t: torch.Tensor, name: str) -> None:
    """The bytes at [start, start + nbytes) of `path` are exactly t's (written, then read back).

    What decompose and merge checked in memory is then what the file holds; a short write, a
    bad sector or a flipped bit shows as a VerificationError.
    """
    want = (
        torch.frombuffer(tensor_bytes(t), dtype=torch.uint8)
        if t.numel()
        else torch.empty(0, dtype=torch.uint8)
    )
    pos = 0
    for chunk in iter_file_chunks(path, start, nbytes):
        got = torch.frombuffer(chunk, dtype=torch.uint8)
        if not torch.equal(got, want[pos : pos + len(chunk)]):  # memcmp speed, unlike memoryview ==
            raise VerificationError(f"{name} did not read back as written in {path.name}; check the disk")
        pos += len(chunk)
    if pos != want.numel():
        raise VerificationError(f"{name} did not read back as written in {path.name}; check the disk")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy where it is already contiguous."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


@contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT into a DiskFullError naming the file and the way out."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"no space left on the device while writing {path}; free some space and run the "
                "same command again to resume"
            ) from None
        raise


def check_output_file(path: Path, flag: str, example: str) -> None:
    """Refuse an output file that could not be written, before a long run rather than after it
    (and naming the flag, not a temp file). `example`: a file name to suggest inside a directory."""
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory; name a file such as {path / example}")
    place = path.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise InputError(f"{flag} {path}: {place} is a file, not a directory; choose another path")
    if not os.access(place, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot write in {place} (permission denied); choose another path")


def check_new_files(paths: list[tuple[Path, str]], force: bool) -> None:
    """Refuse to overwrite result files without --force: (path, what names it), e.g. (mine.png,
    "--plot (from --json)"). Checked before the run, so hours of work never end in a refusal."""
    for path, named in paths:
        if path.exists() and not force:
            raise OutputDirError(
                f"{path} already exists ({named}); pass --force to replace it, or choose another file"
            )


SORSA_OUTPUTS = {  # sorsa_config.json kind -> what it is, for the --force guard
    "decomposition": "a decomposed dir (`sorsa decompose` output)",
    "trained": "a trained run (`sorsa train` output)",
}


def check_replaceable(
    out: Path, inputs: list[Path], flag: str = "--force", replaces: str | None = None
) -> None:
    """Refuse to delete `out` (what `flag` asked for) where that would destroy more than an old
    output: the filesystem root, the home or working directory or one of their ancestors, a
    directory that is or holds one of the job's `inputs` (a source, adapter or data file), or
    one that is or holds another command's SORSA output (a decomposition or a trained run, hours of
    work) rather than this command's own kind `replaces`."""
    res = out.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if res == Path(res.anchor) or cwd.is_relative_to(res) or home.is_relative_to(res):
        raise OutputDirError(f"refusing to replace {out} with {flag}; choose a dedicated output path")
    for p in inputs:
        if p.resolve().is_relative_to(res):
            raise OutputDirError(
                f"refusing to replace {out} with {flag}: it holds {p}, an input of this job; choose another -o"
            )
    if not out.is_dir():
        return
    for d in [out, *(c for c in out.iterdir() if c.is_dir() and not c.is_symlink())]:
        try:
            kind = json.loads((d / CONFIG_FILE).read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            continue
        if kind in SORSA_OUTPUTS and (kind != replaces or d != out):
            where = "it is" if d == out else f"it holds {d.name}/,"
            raise OutputDirError(
                f"refusing to replace {out} with {flag}: {where} {SORSA_OUTPUTS[kind]}; choose another -o, "
                "or delete it yourself"
            )


EVAL_OUTPUT = re.compile(r"eval_\w+\.jsonl?")  # what `sorsa eval` writes into a model dir by default
TOOL_STATE = {".cache"}  # push's resume state (upload_large_folder) inside a pushed dir


def check_own_output(out: Path, marker: str, what: str) -> None:
    """--force may replace `out` only when it is an earlier output of the same command: a directory
    that holds `marker` (its provenance file) and nothing the command did not write (the marker's
    `files` list, eval's default outputs, push's state). Anything else is someone's file that the
    replacement would delete; an empty directory holds nothing to lose."""
    if out.is_symlink() or not out.is_dir():
        raise OutputDirError(
            f"{out} is a file, not {what}; --force only replaces an earlier one: choose another -o"
        )
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    if marker not in names:
        raise OutputDirError(
            f"{out} holds files that are not {what} (e.g. {names[0]}); --force only replaces an earlier "
            f"one: choose another -o"
        )
    try:
        listed = json.loads((out / marker).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if not isinstance(listed, list):  # written before the files were listed: the marker is all we have
        return
    foreign = [n for n in names if n not in listed and n not in TOOL_STATE and not EVAL_OUTPUT.fullmatch(n)]
    if foreign:
        raise OutputDirError(
            f"{out} holds {foreign[0]}, which {what} does not have; --force would delete it: move it out "
            "of the way or choose another -o"
        )


class StreamWriter:
    """Writes one safetensors file tensor by tensor, in the order given, to a temp name.

    `commit()` fsyncs and renames it into place; leaving the context without commit removes the
    temp file, so a failed write leaves nothing behind.
    """

    def __init__(
        self,
        path: str | Path,
        specs: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        spans: dict[str, tuple[int, int]] = {}
        for name, dtype, shape in specs:
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * ITEMSIZE[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            spans[name] = (offset, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._next = 0
        self._written_in_tensor = 0
        with disk_errors(self.path):
            self._f = open(self.tmp, "wb")
            try:  # a Ctrl-C before the caller's `with` takes over must not leave the temp behind
                self._f.write(struct.pack("<Q", len(raw)))
                self._f.write(raw)
            except BaseException:
                self.abort()
                raise
        self.data_start = 8 + len(raw)
        self._spans = {k: (self.data_start + o, n) for k, (o, n) in spans.items()}
        self._order = list(spans)

    def flush(self) -> None:
        """Push buffered bytes to the OS, so another thread can pread what was written so far."""
        with disk_errors(self.path):
            self._f.flush()

    def span(self, name: str) -> tuple[int, int]:
        """(absolute offset, byte count) of a tensor in the file being written."""
        return self._spans[name]

    def read_back(self, name: str) -> Iterator[bytearray]:
        """The bytes of an already written tensor, read back from the temp file in chunks."""
        with disk_errors(self.path):
            self._f.flush()
        start, nbytes = self._spans[name]
        return iter_file_chunks(self.tmp, start, nbytes)

    def read_back_tensor(self, name: str, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
        buf = bytearray().join(self.read_back(name))
        if not buf:
            return torch.empty(shape, dtype=DTYPES[dtype])
        return torch.frombuffer(buf, dtype=DTYPES[dtype]).reshape(shape)

    def write(self, name: str, data: bytes | bytearray | memoryview | torch.Tensor) -> None:
        """Write a whole tensor, or one chunk of it (chunks of one tensor in order)."""
        if isinstance(data, torch.Tensor):
            data = tensor_bytes(data)
        exp_name = self._order[self._next]
        exp_bytes = self._spans[exp_name][1]
        if name != exp_name:
            raise RuntimeError(f"writer expected tensor {exp_name}, got {name}")
        n = len(memoryview(data).cast("B"))
        if self._written_in_tensor + n > exp_bytes:
            raise RuntimeError(f"{name}: {self._written_in_tensor + n} bytes for a {exp_bytes}-byte tensor")
        with disk_errors(self.path):
            self._f.write(data)
        self._written_in_tensor += n
        if self._written_in_tensor == exp_bytes:
            self._next += 1
            self._written_in_tensor = 0

    def copy_from(self, name: str, src: Path, info: TensorInfo) -> None:
        """Copy a tensor's bytes from another file verbatim (bit-identical by construction)."""
        if info.nbytes == 0:
            self.write(name, b"")
            return
        for chunk in iter_file_chunks(src, info.start, info.nbytes):
            self.write(name, chunk)

    def finish_to_temp(self) -> Path:
        """Flush and close; the file is complete at `self.tmp` but not yet in place."""
        if self._next != len(self._order):
            missing = self._order[self._next]
            raise RuntimeError(f"{self.path}: tensor {missing} was never written")
        with disk_errors(self.path):
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        return self.tmp

    def commit(self) -> Path:
        if not self._f.closed:
            self.finish_to_temp()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()


def write_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write a small dict of tensors atomically."""
    specs = [(k, DTYPE_CODES[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    with StreamWriter(path, specs, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
        return w.commit()


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    tmp = temp_path(path)
    try:
        with disk_errors(path):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | Path, obj: object) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_figure(fig, png: Path) -> Path:
    """A matplotlib figure as a PNG, written like every other output (temp name, rename); the
    figure is closed either way."""
    import matplotlib.pyplot as plt

    tmp = temp_path(png)
    try:
        with disk_errors(png):
            fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, png)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return png


# keys transformers writes into a saved config that describe the machine it was saved on, not the
# model (a local load, a cache path, a token): published with a checkpoint, they say nothing true
MACHINE_LOCAL_KEYS = ("is_local", "local_files_only", "cache_dir", "token", "use_auth_token")


def copy_side_file(src: str | Path, dst: str | Path) -> Path:
    """Copy a checkpoint's non-weight file; a *config.json loses its MACHINE_LOCAL_KEYS on the way
    (everything else is copied byte for byte)."""
    src = Path(src)
    if src.name.endswith("config.json"):
        try:
            cfg = json.loads(src.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            cfg = None
        if isinstance(cfg, dict) and any(k in cfg for k in MACHINE_LOCAL_KEYS):
            return atomic_write_json(dst, {k: v for k, v in cfg.items() if k not in MACHINE_LOCAL_KEYS})
    return atomic_copy(src, dst)


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    src, dst = Path(src), Path(dst)
    tmp = temp_path(dst)
    try:
        with disk_errors(dst), open(src, "rb") as fi, open(tmp, "wb") as fo:
            while block := fi.read(COPY_CHUNK):
                fo.write(block)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
