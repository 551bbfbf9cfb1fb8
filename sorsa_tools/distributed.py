"""Data-parallel `sorsa train` under torchrun (torch.distributed + DistributedDataParallel).

torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK. Every process
builds the same model from the same files, trains on its share of each global batch, and DDP
all-reduces the factors' gradients, so all ranks hold identical U, S, Vt and optimizer state after
every step. Only rank 0 writes the run directory; what it does there is run through `on_main`, which
tells every rank whether it worked, so that a failure on rank 0 ends all ranks instead of leaving
them waiting in the next collective. Without torchrun, or with one process, nothing here does
anything and training takes the single-device path unchanged.
"""

from __future__ import annotations

import gc
import itertools
import os
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from sorsa_tools import errors
from sorsa_tools.device import resolve_device
from sorsa_tools.errors import InputError, SorsaError, TrainingError

T = TypeVar("T")
_generation = itertools.count()  # process groups this process has made (the same count on every rank)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank among world_size, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        if not self.enabled:
            return None
        return "nccl" if self.device.type == "cuda" else "gloo"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(
            f"environment variable {name}={raw!r} is not an integer; launch with torchrun"
        ) from None


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # torchrun sets all three in every process


def _torchrun_env() -> dict[str, str]:
    """The torchrun variables that are set: none (one process) or all three. A script that sets RANK
    for a purpose of its own would otherwise send `sorsa train` down the distributed path."""
    present = {k: os.environ[k] for k in TORCHRUN_VARS if os.environ.get(k, "") != ""}
    missing = [k for k in TORCHRUN_VARS if k not in present]
    if present and missing:
        have = ", ".join(f"{k}={v}" for k, v in present.items())
        raise InputError(
            f"{have} {'is' if len(present) == 1 else 'are'} set but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: a torchrun environment sets all three; launch "
            f"with torchrun, or unset {' '.join(present)} for one process (env -u {' -u '.join(present)} sorsa ...)"
        )
    return present


def launch_rank() -> int:
    """RANK as torchrun set it: the CLI keeps every rank but 0 silent. 0 without a whole, valid
    torchrun environment, so that the error saying what is wrong with it is shown."""
    try:
        env = _torchrun_env()
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    except (InputError, ValueError):
        return 0
    return rank if 0 <= rank < world else 0


def from_env(device: str = "auto") -> Dist:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) and this rank's device.

    Under torchrun with more than one process, `--device auto` or `cuda` means cuda:LOCAL_RANK
    (GPUs are chosen with CUDA_VISIBLE_DEVICES, not cuda:N), and `cpu` trains on CPUs over gloo.
    """
    _torchrun_env()
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise InputError(
            f"inconsistent torchrun environment (RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}); "
            "launch with torchrun --nproc_per_node N"
        )
    if world == 1:
        return Dist(device=torch.device(resolve_device(device)))
    if device.startswith("cuda:"):
        raise InputError(
            f"--device {device}: under torchrun every process uses cuda:LOCAL_RANK; pass --device cuda "
            "(or auto) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    kind = resolve_device(device)  # refuses cuda without a GPU, and unknown names
    if kind == "cpu":
        return Dist(rank, world, local, torch.device("cpu"))
    n = torch.cuda.device_count()
    if local >= n:
        err = InputError(
            f"rank {rank}: LOCAL_RANK {local} but only {n} GPU(s) visible; "
            f"use torchrun --nproc_per_node {n} (or fewer)"
        )
        err.rank_local = True  # not raised on every rank: the CLI shows it whichever rank it is
        raise err
    return Dist(rank, world, local, torch.device("cuda", local))


@contextmanager
def process_group(d: Dist) -> Iterator[None]:
    """The default process group for one run (nccl on CUDA, gloo on CPU), destroyed at the end,
    also on errors. A group the caller initialised already is used as it is and left alone."""
    if not d.enabled:
        yield
        return
    if dist.is_initialized():
        if dist.get_world_size() != d.world_size or dist.get_rank() != d.rank:
            raise InputError(
                f"the initialised process group (rank {dist.get_rank()} of {dist.get_world_size()}) "
                f"disagrees with RANK={d.rank}, WORLD_SIZE={d.world_size}; launch with torchrun"
            )
        yield
        return
    try:
        store, rank, world = next(dist.rendezvous("env://"))
    except ValueError as e:  # MASTER_ADDR / MASTER_PORT missing: WORLD_SIZE set by hand
        raise InputError(f"{e}; launch with torchrun --nproc_per_node N") from None
    # keys of its own for each group: a second run in the same processes (the library called
    # twice) must not read the first group's stale addresses from torchrun's store
    store = dist.PrefixStore(f"sorsa_train/{next(_generation)}", store)
    if d.device.type == "cuda":
        torch.cuda.set_device(d.device)
    dist.init_process_group(
        d.backend,
        store=store,
        rank=rank,
        world_size=world,
        device_id=d.device if d.device.type == "cuda" else None,
    )
    try:
        yield
    except BaseException as e:
        # the frames of the traceback still hold the DDP model; freed only after the group is
        # destroyed, its teardown can block for good: let it go first, as a normal return does
        traceback.clear_frames(e.__traceback__)
        gc.collect()
        raise
    finally:
        dist.destroy_process_group()


def all_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """t summed over ranks (in place); t itself with one process."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def share(d: Dist, value: T) -> T:
    """Rank 0's value (picklable) on every rank."""
    if not d.enabled:
        return value
    box = [value if d.is_main else None]
    dist.broadcast_object_list(box, src=0, device=d.device if d.device.type == "cuda" else None)
    return box[0]


def _mirror(kind: str, message: str) -> BaseException:
    """Rank 0's error, raised again on another rank (same class where it is one of ours)."""
    if kind == "KeyboardInterrupt":
        return KeyboardInterrupt()
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, SorsaError):
        return cls(message)
    return TrainingError(f"rank 0 failed ({kind}: {message}); see its output")


def on_main(d: Dist, fn: Callable[[], T]) -> T | None:
    """Run fn on rank 0 only (the run directory's writes) and tell every rank how it went.

    On success rank 0 gets fn's result and the others None; if fn raised, rank 0 raises it again
    and every other rank raises the same error, so that all ranks stop together. One small
    broadcast when it works; it is also the barrier that makes the others wait for the write.
    """
    if not d.enabled:
        return fn()
    result: Any = None
    error: BaseException | None = None
    if d.is_main:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - passed on to every rank, then raised again
            error = e
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=d.device)
    dist.broadcast(flag, src=0)
    if int(flag.item()):
        what = share(d, (type(error).__name__, str(error)) if d.is_main else None)
        if d.is_main:
            raise error
        raise _mirror(*what)
    return result
