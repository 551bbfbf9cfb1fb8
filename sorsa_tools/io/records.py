"""Where records come from: one reader for training and evaluation data.

- a local JSONL file: our own reader, by byte offset (errors name the line; nothing kept in RAM
  but the offsets);
- a local Parquet, Arrow or CSV file or folder, a `Dataset.save_to_disk` folder, or a Hub dataset
  id: through the `datasets` library, whose Arrow tables are memory-mapped from the HF cache, so a
  100K-row dataset costs pages the OS can drop, not the process's own memory.

A source gives each record a key (a byte offset, or a row number) that a later read uses, an
identity that a run records and hashes (what it trained on), and a location for error messages.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sorsa_tools.errors import DataError
from sorsa_tools.format import sha256_of

# local file kinds the `datasets` library reads: suffix -> (builder, its options)
ARROW_KINDS: dict[str, tuple[str, tuple]] = {
    ".parquet": ("parquet", ()),
    ".arrow": ("arrow", ()),
    ".csv": ("csv", ()),
    ".tsv": ("csv", (("sep", "\t"),)),
}
FOLDER_KINDS = {**ARROW_KINDS, ".jsonl": ("json", ())}  # a folder of JSONL shards: datasets' json builder
JSONL_SUFFIXES = (".jsonl", ".json", ".txt", ".ndjson")  # never a Hub id
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
READ_BATCH = 512
WANTED = "a JSONL, Parquet, Arrow or CSV file or folder, or a Hub dataset id"


@dataclass(frozen=True)
class DataSpec:
    """What --data, --split, --subset and --data-revision name."""

    data: str
    split: str | None = None
    subset: str | None = None
    revision: str | None = None

    def options(self) -> str:
        given = (("--split", self.split), ("--subset", self.subset), ("--data-revision", self.revision))
        return ", ".join(k for k, v in given if v)


def _json_type(value) -> str:
    """A JSON value's type as JSON names it (the user wrote JSON, not Python)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    names = {int: "a number", float: "a number", str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def check_data_file(path: Path, wanted: str = "an existing JSONL file") -> None:
    """--data must name a file: say so apart for a directory, for something that is not a regular
    file (a device, a pipe: read twice, by offset) and for nothing there."""
    if path.is_dir():
        raise DataError(f"--data {path} is a directory; pass {wanted}")
    if path.exists() and not path.is_file():
        raise DataError(
            f"--data {path} is not a regular file (the data is read twice, by offset); pass {wanted}"
        )
    if not path.is_file():
        raise DataError(f"data file not found: {path}; pass {wanted} to --data")


def _check_format(path: Path, head: bytes) -> None:
    """Formats that are not JSONL, named by their first bytes (each line's error would mislead)."""
    if head.startswith(b"\x1f\x8b"):
        raise DataError(f"{path} is gzip-compressed; decompress it first (gunzip), sorsa reads plain JSONL")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path} is UTF-16 text; re-save it as UTF-8 JSONL")
    if head.startswith(b"PAR1"):
        raise DataError(f"{path} is a Parquet file; name it *.parquet and pass it to --data as it is")
    if head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):
        raise DataError(
            f"{path} holds a JSON array, not JSONL; write one JSON object per line "
            f"(e.g. jq -c '.[]' {path.name} > {path.stem}.jsonl)"
        )


def _stamp(f) -> tuple[int, int]:
    """(size, modification time) of an open file: whether it is still the file that was scanned."""
    st = os.fstat(f.fileno())
    return st.st_size, st.st_mtime_ns


class JsonlSource:
    """A local JSONL file, read by byte offset."""

    kind = "jsonl"

    def __init__(self, path: Path):
        self.path = path
        self.name = path.name
        self.columns: list[str] | None = None  # JSON objects: each line has its own keys
        self._stamp: tuple[int, int] | None = None

    def where(self, n: int) -> str:
        return f"{self.path}:{n}"

    def identity(self) -> dict:
        """The run id's view of the data: as it has always been for JSONL (old run ids stay valid)."""
        return {"name": self.name, "sha256": sha256_of(self.path)}

    def description(self, rows: int) -> dict:
        return {"path": str(self.path.resolve()), "kind": self.kind, "rows": rows}

    def scan(self) -> Iterator[tuple[int, int, dict]]:
        """(key, line number, record) of every non-blank line, each checked to be a JSON object."""
        with open(self.path, "rb") as f:
            self._stamp = _stamp(f)
            _check_format(self.path, f.read(4096))
            f.seek(0)
            lineno = 0
            while True:
                off = f.tell()
                raw = f.readline()
                if not raw:
                    break
                lineno += 1
                if raw.strip():
                    yield off, lineno, self._parse(raw, lineno)

    def _parse(self, raw: bytes, lineno: int) -> dict:
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{self.path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                "re-save the file as UTF-8"
            ) from None
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{self.path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line"
            ) from None
        if not isinstance(rec, dict):
            raise DataError(
                f"{self.path}:{lineno}: each line must be a JSON object, got {_json_type(rec)}; "
                "fix or remove the line"
            )
        return rec

    def read(self, keys: list[int], check=None) -> list[dict]:
        """Records by key; `check(record)` raises DataError for one that is not what was scanned."""
        recs = []
        with open(self.path, "rb") as fh:
            changed = _stamp(fh) != self._stamp
            try:
                for k in keys:
                    fh.seek(k)
                    recs.append(json.loads(fh.readline()))
                    if check is not None:
                        check(recs[-1])
            except (ValueError, DataError):  # JSON, Unicode or fields: not the line that was scanned
                changed = True
        if changed:  # the offsets point into the file as it was: what they read now is not the data
            raise DataError(
                f"{self.path} changed after it was read (size or time differ); restore it and rerun with "
                "--resume, or start a new run on the new file"
            )
        return recs

    def line_of(self, key: int) -> int:
        with open(self.path, "rb") as f:
            return f.read(key).count(b"\n") + 1


@dataclass
class ArrowSource:
    """A memory-mapped `datasets.Dataset` (local files converted once into the HF cache)."""

    table: object  # datasets.Dataset
    name: str
    kind: str  # "parquet", "arrow", "csv", "json", "saved", "hub"
    spec: DataSpec
    path: Path | None = None  # the local file or folder (None for a Hub id)
    resolved: dict = field(default_factory=dict)  # the Hub's commit, where known

    @property
    def columns(self) -> list[str]:
        return list(self.table.column_names)

    def where(self, n: int) -> str:
        return f"{self.name} row {n}"

    def identity(self) -> dict:
        """What the data is: the files' content for local data (datasets' fingerprint of local
        files is their path and time), the dataset's id, split and commit for the Hub."""
        ident = {"name": self.name, "kind": self.kind, "split": self.spec.split, "subset": self.spec.subset}
        if self.path is not None:
            files = sorted(self.path.rglob("*")) if self.path.is_dir() else [self.path]
            ident["sha256"] = {
                str(f.relative_to(self.path.parent)): sha256_of(f) for f in files if f.is_file()
            }
        else:
            ident |= {"revision": self.spec.revision, "fingerprint": self.table._fingerprint, **self.resolved}
        return ident

    def description(self, rows: int) -> dict:
        where = {"path": str(self.path.resolve())} if self.path is not None else {"dataset": self.name}
        return {
            **where,
            "kind": self.kind,
            "split": self.spec.split,
            "subset": self.spec.subset,
            "revision": self.resolved.get("commit") or self.spec.revision,
            "rows": rows,
        }

    def scan(self) -> Iterator[tuple[int, int, dict]]:
        n = len(self.table)
        for start in range(0, n, READ_BATCH):
            batch = self.table[start : min(n, start + READ_BATCH)]  # a dict of columns
            cols = list(batch)
            for j, values in enumerate(zip(*(batch[c] for c in cols), strict=True)):
                yield start + j, start + j + 1, dict(zip(cols, values, strict=True))

    def read(self, keys: list[int], check=None) -> list[dict]:
        recs = [self.table[int(k)] for k in keys]
        if check is not None:
            for r in recs:
                check(r)
        return recs

    def line_of(self, key: int) -> int:
        return key + 1


RecordSource = JsonlSource | ArrowSource


@contextmanager
def _quiet_datasets():
    """datasets' own progress bars and warnings: the library must not print (the CLI shows progress)."""
    import datasets

    was = datasets.utils.logging.is_progress_bar_enabled()
    level = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL + 1)  # its errors: ours say them
    try:
        yield datasets
    finally:
        datasets.utils.logging.set_verbosity(level)
        if was:
            datasets.utils.logging.enable_progress_bar()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0].rstrip(".") if text else type(e).__name__


def _pick_split(d, spec: DataSpec):
    """A DatasetDict's split (with datasets' slicing: train[:1000], train[:10%]) or a Dataset."""
    import datasets

    if isinstance(d, datasets.Dataset):
        if spec.split and spec.split != "train":
            raise DataError(f"--data {spec.data} is one split, not several; leave out --split {spec.split}")
        return d
    split = spec.split or "train"
    try:
        instr = datasets.ReadInstruction.from_spec(split).to_absolute({k: len(v) for k, v in d.items()})
    except (ValueError, AssertionError) as e:
        raise DataError(f"--split {split}: {_one_line(e)}; splits there: {', '.join(d)}") from None
    parts = [d[i.splitname].select(range(i.from_, i.to)) for i in instr]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _is_saved(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _local_files(path: Path) -> tuple[str, dict, list[str]]:
    """(builder, options, files) of a local file or a folder of files of one kind."""
    if path.is_file():
        builder, opts = ARROW_KINDS[path.suffix.lower()]
        return builder, dict(opts), [str(path)]
    found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in FOLDER_KINDS)
    kinds = sorted({f.suffix.lower() for f in found})
    if not kinds:
        raise DataError(
            f"--data {path}: a folder with no .parquet, .arrow, .csv, .tsv or .jsonl files; pass {WANTED}"
        )
    if len(kinds) > 1:
        raise DataError(f"--data {path} mixes file kinds ({', '.join(kinds)}); keep one kind in a folder")
    builder, opts = FOLDER_KINDS[kinds[0]]
    return builder, dict(opts), [str(f) for f in found]


def _load_local(spec: DataSpec, path: Path) -> ArrowSource:
    with _quiet_datasets() as datasets:
        if spec.subset or spec.revision:
            raise DataError(
                f"--subset and --data-revision are for Hub datasets; {path} is local: leave them out"
            )
        if _is_saved(path):
            try:
                d = datasets.load_from_disk(str(path))
            except (OSError, ValueError) as e:
                raise DataError(f"--data {path}: not a readable saved dataset ({_one_line(e)})") from None
            return ArrowSource(_pick_split(d, spec), path.name, "saved", spec, path)
        builder, opts, files = _local_files(path)
        try:
            d = datasets.load_dataset(builder, data_files=files, split=spec.split or "train", **opts)
        except ValueError as e:
            if "split" in str(e).lower():
                raise DataError(
                    f"--split {spec.split}: {_one_line(e)} (local files form one split, 'train')"
                ) from None
            raise DataError(f"--data {path}: not readable as {builder} ({_one_line(e)})") from None
        except Exception as e:  # pyarrow's and pandas' parse errors have no common base
            raise DataError(f"--data {path}: not readable as {builder} ({_one_line(e)})") from None
        return ArrowSource(d, path.name, builder, spec, path)


def _load_hub(spec: DataSpec) -> ArrowSource:
    """A Hub dataset: datasets' own loader (online, or its processed cache offline); offline, a
    snapshot in the Hub file cache (e.g. from `hf download --repo-type dataset`) read as a folder."""
    with _quiet_datasets() as datasets:
        kw = dict(name=spec.subset, split=spec.split or "train", revision=spec.revision)
        try:
            return ArrowSource(datasets.load_dataset(spec.data, **kw), spec.data, "hub", spec)
        except ConnectionError:
            pass  # offline and not in datasets' cache: try the Hub file cache below
        except Exception as e:
            raise _hub_error(spec, e) from None
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            snap = Path(
                snapshot_download(
                    spec.data, repo_type="dataset", revision=spec.revision, local_files_only=True
                )
            )
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise DataError(
                f"--data {spec.data}: the Hub cannot be reached (offline) and the dataset is not in the local "
                f"cache; download it once with network (hf download --repo-type dataset {spec.data}) "
                "or pass a local file"
            ) from None
        try:
            d = datasets.load_dataset(str(snap), **{**kw, "revision": None})
        except Exception as e:
            raise _hub_error(spec, e) from None
        return ArrowSource(d, spec.data, "hub", spec, resolved={"commit": snap.name})


def _hub_error(spec: DataSpec, e: Exception) -> DataError:
    msg = _one_line(e)
    low = msg.lower()
    if "gated" in low:
        how = "accept its terms on the Hub and log in (hf auth login or HF_TOKEN)"
    elif "unknown split" in low:
        how = "pass one of those to --split"
    elif "builderconfig" in low or "config name is missing" in low:
        how = "pass one of those to --subset"
    elif "doesn't exist" in low or "not found" in low or "cannot be accessed" in low:
        how = f"check the id (owner/name) and --data-revision (no local file or folder {spec.data} either)"
    else:
        how = f"pass {WANTED}"
    return DataError(f"--data {spec.data}: {msg}; {how}")


def _hub_id(data: str) -> bool:
    return bool(_HUB_ID.match(data)) and Path(data).suffix.lower() not in (*JSONL_SUFFIXES, *FOLDER_KINDS)


def open_source(spec: DataSpec | str | Path) -> RecordSource:
    """The records --data names: a local file or folder when one is there, else a Hub dataset id."""
    if not isinstance(spec, DataSpec):
        spec = DataSpec(str(spec))
    path = Path(spec.data).expanduser()
    if path.is_dir() or path.suffix.lower() in ARROW_KINDS:
        if not path.is_dir():
            check_data_file(path, WANTED)
        return _load_local(spec, path)
    if path.exists() or not _hub_id(spec.data):
        if spec.options():
            raise DataError(f"{spec.options()}: for Parquet, Arrow, CSV and Hub data, not a JSONL file")
        check_data_file(path, WANTED)
        return JsonlSource(path)
    return _load_hub(spec)
