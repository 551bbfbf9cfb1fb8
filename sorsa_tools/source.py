"""A checkpoint seen tensor by tensor with the adapter folded in: what merge, GGUF export and
analyze read.

`MergedSource(DIR, RUN)` reads the residual checkpoint of a decomposed DIR one tensor at a time;
a target weight comes back as W = W_r + U diag(S) Vt computed in float32 (from RUN's adapter, or
DIR's own untrained one, which gives back the original model), every other tensor exactly as
stored. `MergedSource.plain(path)` wraps an ordinary HF checkpoint the same way (no targets), so
the exporters also take a model that was never decomposed. Nothing is held beyond one tensor.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

from sorsa_tools import quantize as qz
from sorsa_tools.errors import AdapterMismatchError
from sorsa_tools.format import ADAPTER_FILE, factor_names, verify_checksums
from sorsa_tools.io.checkpoint import Checkpoint, open_checkpoint
from sorsa_tools.io.safetensors_file import DTYPE_CODES, DTYPES, SafetensorsFile, TensorInfo
from sorsa_tools.model import check_adapter, read_decomposition, read_factors

R = TypeVar("R")
Raw = tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]


class MergedSource:
    """The dense model DIR + adapter describes, read lazily in checkpoint order."""

    def __init__(self, directory: str | Path, adapter: str | Path | None = None):
        d = Path(directory).expanduser()
        self.decomposition = read_decomposition(d)
        self.adapter_config = (
            check_adapter(self.decomposition, adapter) if adapter is not None else self.decomposition
        )
        self.adapter_dir = Path(adapter).expanduser() if adapter is not None else d
        self._init(open_checkpoint(d), self.decomposition["target_modules"], self.decomposition)
        verify_checksums(self.adapter_dir, self.adapter_config, [ADAPTER_FILE])
        self._adapter = SafetensorsFile(self.adapter_dir / ADAPTER_FILE)
        for m in self.targets:
            missing = [n for n in factor_names(m) if n not in self._adapter]
            if missing:
                raise AdapterMismatchError(
                    f"{self._adapter.path} lacks {missing[0]}; it does not belong to {d}, re-create it"
                )

    @classmethod
    def plain(cls, path: str | Path) -> MergedSource:
        """An ordinary HF checkpoint, nothing to fold."""
        self = cls.__new__(cls)
        self.decomposition = None
        self.adapter_config = None
        self.adapter_dir = None
        self._adapter = None
        self._init(open_checkpoint(Path(path).expanduser()), [])
        return self

    def _init(self, ckpt: Checkpoint, targets: list[str], decomposition: dict | None = None) -> None:
        self.checkpoint = ckpt
        self.root: Path = ckpt.root
        self.config: dict = ckpt.config
        self.targets: list[str] = list(targets)
        self._target_weights = {m + ".weight" for m in self.targets}
        self._init_quantized(decomposition or {})

    def _init_quantized(self, decomposition: dict) -> None:
        """A QSORSA DIR: each target weight is seen as the dense W_r it dequantizes to (in the source
        dtype), and the quantizer's other tensors (absmax, ...) are not seen at all."""
        q = decomposition.get("quantization")
        self.quantization = qz.QuantSettings.from_json(q) if q else None
        self._dense: dict[str, TensorInfo] = {}
        self._hidden: set[str] = set()
        if self.quantization is None:
            return
        code = DTYPE_CODES[getattr(torch, (decomposition.get("dtypes") or {}).get("source", ["float32"])[0])]
        for m in self.targets:
            shape = tuple(decomposition["modules"][m]["shape"])
            packed = self.checkpoint.info(m + ".weight")
            self._dense[m + ".weight"] = TensorInfo(m + ".weight", code, shape, packed.start, packed.end)
            self._hidden |= {
                f"{m}.{sfx}" for sfx, _, _ in qz.specs(shape, self.quantization) if sfx != "weight"
            }

    def shard_infos(self, shard) -> list[TensorInfo]:
        """The tensors of one shard as the merged model has them (a quantized W_r as dense)."""
        return [self._dense.get(i.name, i) for i in shard.tensors.values() if i.name not in self._hidden]

    def verify_residual(self) -> None:
        """The residual shards against the sha256 decompose recorded (a plain checkpoint has none):
        merge and the exports read every byte of them, and publish what they read."""
        if self.decomposition is not None:
            verify_checksums(self.root, self.decomposition, [s.path.name for s in self.checkpoint.shards])

    def infos(self) -> Iterator[TensorInfo]:
        """Every tensor, shard by shard, in file order (the order that reads the disk once)."""
        for shard in self.checkpoint.shards:
            yield from self.shard_infos(shard)

    def names(self) -> list[str]:
        return [i.name for i in self.infos()]

    def info(self, name: str) -> TensorInfo:
        return self._dense.get(name) or self.checkpoint.info(name)

    def is_target(self, name: str) -> bool:
        return name in self._target_weights

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype (for a target: the residual's)."""
        return DTYPES[self.info(name).dtype]

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return read_factors(self._adapter, module)

    def read_raw(self, name: str) -> Raw:
        """(the tensor as stored, the target's float32 factors or None): the disk part of read()."""
        if name in self._dense:  # QSORSA: W_r = dequant(Q), the weight the model was trained with
            from sorsa_tools.qresidual import read_quantized

            m = name.removesuffix(".weight")
            q = read_quantized(self.checkpoint, m, self._dense[name].shape, self.quantization)
            t = qz.dequantize(q, self.quantization).float()
        else:
            t = self.checkpoint.shard_of(name).read_tensor(name)
        if name not in self._target_weights:
            return t, None
        return t, tuple(f.float() for f in self.factors(name.removesuffix(".weight")))  # type: ignore[return-value]

    @staticmethod
    def fold(raw: Raw) -> torch.Tensor:
        """W_r + U diag(S) Vt in float32 (a fresh tensor); a non-target tensor unchanged."""
        t, f = raw
        if f is None:
            return t
        U, S, Vt = f
        return t.to(torch.float32, copy=True).addmm_(U * S, Vt)

    def read(self, name: str) -> torch.Tensor:
        """A target weight merged in float32 (not yet rounded); any other tensor as stored."""
        return self.fold(self.read_raw(name))

    def pipeline(
        self, names: list[str], work: Callable[[str, torch.Tensor, Raw], R], lookahead: int = 2
    ) -> Iterator[R]:
        """work(name, read(name), raw) for each name in order: the reads run on an I/O thread and
        fold + work on a compute thread, `lookahead` tensors ahead of the consumer, so the disk,
        the cores and the consumer's writes overlap (torch and file I/O release the GIL)."""
        # not `with`: a generator dropped unfinished is closed by the garbage collector, possibly
        # inside another thread's start-up, where joining the workers deadlocks; so only a stream
        # run to its end waits for them, one left early cancels what is queued and lets them end
        io, cpu = ThreadPoolExecutor(1, "sorsa-read"), ThreadPoolExecutor(1, "sorsa-fold")
        pending: deque = deque()
        todo = iter(names)
        finished = False

        def submit() -> None:
            n = next(todo, None)
            if n is not None:
                r = io.submit(self.read_raw, n)
                pending.append(cpu.submit(lambda: work(n, self.fold(r.result()), r.result())))

        try:
            for _ in range(lookahead + 1):
                submit()
            while pending:
                f = pending.popleft()
                submit()
                yield f.result()
            finished = True
        finally:
            for f in pending:
                f.cancel()
            io.shutdown(wait=finished, cancel_futures=True)
            cpu.shutdown(wait=finished, cancel_futures=True)


PAPER_URL = "https://arxiv.org/abs/2409.00055"
PROVENANCE_FILE = "sorsa_provenance.json"


def provenance(source: MergedSource) -> dict:
    """What a merged / exported artifact came from: written beside it (or into GGUF metadata) so
    that `sorsa push` can write a model card and a reader can trace the weights back."""
    from sorsa_tools import __version__

    d = source.decomposition
    if d is None:
        return {"method": None, "tool": {"name": "sorsa-tools", "version": __version__}}
    a = source.adapter_config or d
    t = a.get("training") if a.get("kind") == "trained" else None
    training = None
    if t:
        keep = ("lr", "gamma", "batch_size", "grad_accum", "max_length", "warmup_ratio", "template", "seed")
        training = {k: t.get(k) for k in keep if k in t}
        training.update(
            steps=t.get("steps"),
            tokens=t.get("tokens"),
            final_loss=t.get("final_loss"),
            data=_data_name(t.get("data") or {}),
            data_sha256=(t.get("data") or {}).get("sha256"),
            run_id=t.get("run_id"),
        )
    base = d.get("base_model") or {}
    return {
        "method": "SORSA",
        "paper": PAPER_URL,
        "rank": d.get("rank"),
        "target_modules": len(d.get("target_modules") or []),
        "base_model": {
            "name_or_path": base.get("name_or_path"),
            "revision": base.get("revision"),
            "model_type": base.get("model_type"),
        },
        "decomposition": {"job_id": d.get("job_id"), "svd": (d.get("svd") or {}).get("method")},
        "adapter": "trained" if t else "untrained (gives back the base model)",
        "training": training,
        "metrics": None,
        "tool": {"name": "sorsa-tools", "version": __version__},
    }


def _data_name(data: dict) -> str | None:
    """A Hub dataset's id and split, or a local file's name: no local paths are published."""
    name = data.get("dataset") or Path(data.get("path") or "").name or None
    return f"{name} ({data['split']})" if name and data.get("split") else name
