"""`sorsa train`: a minimal streaming trainer that trains only U, S and Vt.

One optimizer step (paper eq. 10, as the official code orders it):
  1. forward/backward over `grad_accum` micro-batches; the task loss is the sum of response-token
     cross-entropies divided by the step's response-token count (so accumulation and packing
     weigh every token alike), computed through the LM head in chunks (no full logits tensor);
  2. the task gradient is clipped to `clip` (and its norm logged);
  3. the closed-form regularizer gradient, times gamma / eta_max, is added (not clipped);
  4. AdamW step, then the cosine schedule advances; a non-finite loss or gradient norm stops the
     run instead. Steps 2-3 run on the device; their values are read in one host transfer.
Checkpoints (adapter, optimizer, schedule, data position, RNG) are written atomically every
`save_every` steps; a resumed run ends with the same adapter as an uninterrupted one.

Under torchrun (distributed.py) each of N processes takes its share of every global micro-batch
(`batch_size` rows per process, so N * batch_size rows in all) and DDP all-reduces the gradients;
token counts and losses are summed over ranks, so N ranks with batch b take the same steps as one
process with batch N * b. Only rank 0 writes the run directory and reports progress.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from sorsa_tools import __version__, distributed
from sorsa_tools.data import IGNORE, PACKED_KEY, Dataset, DataSpec, parse_fields, shard
from sorsa_tools.distributed import Dist
from sorsa_tools.errors import InputError, RunDirError, TrainingError
from sorsa_tools.format import ADAPTER_FILE, CHECKSUMS, CONFIG_FILE, FORMAT_VERSION, checksums
from sorsa_tools.io.checkpoint import open_checkpoint
from sorsa_tools.io.placement import mark_complete, remove_path, remove_stale_temps
from sorsa_tools.io.safetensors_file import (
    atomic_save_figure,
    atomic_write_json,
    atomic_write_text,
    check_replaceable,
    write_tensors,
)
from sorsa_tools.layer import regularizer_grad_
from sorsa_tools.model import (
    adapter_tensors,
    check_quantized_options,
    load_sorsa_model,
    read_adapter,
    read_decomposition,
)
from sorsa_tools.optim import OPTIMIZERS, SCALINGS, sorsa_optimizer

CKPT_DIR = "checkpoint"
STEPS_DIR = "steps"  # --keep-adapters: RUN/steps/step-000200/, each a finished run of its own
LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss.png"
RUN_FILE = "run.json"
LOSS_CHUNK = 2048  # response tokens per LM-head chunk, when the logits would be large
LOGITS_BUDGET = 2**28  # logits elements (1 GiB in float32) computed in one piece without chunking
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainConfig:
    """Every setting that shapes the result (hashed into the run id)."""

    fields: str | None = None
    template: str = "paper"
    max_length: int = 512
    pack: bool = False
    shuffle: bool = True
    lr: float = 1e-4  # the paper's 3e-5 trails; 1e-4 was best over an epoch (docs/RESULTS.md, issue 17)
    gamma: float = 4e-4
    lr_scaling: str = "none"  # optim.SCALINGS: how lr is spread over U, S and Vt
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: int = 1
    warmup_ratio: float = 0.03
    clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    grad_checkpointing: bool = False
    offload_residual: bool = False
    optim: str = "adamw"  # optim.OPTIMIZERS
    reg_tol: float = 0.0  # no L_reg gradient for a factor whose ||U^T U - I||_F is <= this (0: eq. 8)
    reg_update: str = "eq10"  # REG_UPDATES: L_reg's gradient inside AdamW's (eq. 10) or a plain step (eq. 9)


# settings added after runs were made, left out of the run id at their default, so that those
# runs keep their ids (and resume)
LATER_DEFAULTS = {"optim": "adamw", "reg_tol": 0.0, "reg_update": "eq10"}
# eq10: gamma / eta_max * grad L_reg added to the clipped task gradient, then AdamW (the official
# code); eq9: AdamW on the task gradient and a plain step gamma_t * grad L_reg, both at W_t
REG_UPDATES = ("eq10", "eq9")


def config_key(cfg: TrainConfig) -> dict:
    """The settings the run id hashes."""
    return {k: v for k, v in asdict(cfg).items() if LATER_DEFAULTS.get(k, object()) != v}


class TrainProgress:
    """Receives progress events; the CLI subclasses it with a rich bar. The default is silent."""

    def start(self, total_steps: int, done_steps: int) -> None: ...

    def step(self, record: dict) -> None: ...

    def note(self, message: str) -> None: ...


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    tokens: int
    final_loss: float | None
    seconds: float
    resumed_from: int | None
    already_done: bool
    examples: int
    skipped_too_long: int
    truncated: int
    log_file: Path
    plot_file: Path | None
    world_size: int = 1  # processes that trained it (torchrun); the global batch scales with it


# -- small helpers ------------------------------------------------------------------------------
def _check(cfg: TrainConfig, save_every: int) -> None:
    bad = [
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be > 0 (got {cfg.lr})"),
        (cfg.gamma >= 0, f"--gamma must be >= 0 (got {cfg.gamma}); 0 turns the regularizer off"),
        (cfg.reg_tol >= 0 and math.isfinite(cfg.reg_tol), f"--reg-tol must be >= 0 (got {cfg.reg_tol})"),
        (
            cfg.reg_update in REG_UPDATES,
            f"--reg-update must be one of {', '.join(REG_UPDATES)} (got {cfg.reg_update!r})",
        ),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1 (got {cfg.batch_size})"),
        (cfg.grad_accum >= 1, f"--grad-accum must be >= 1 (got {cfg.grad_accum})"),
        (cfg.max_steps is None or cfg.max_steps >= 1, f"--max-steps must be >= 1 (got {cfg.max_steps})"),
        (cfg.epochs >= 1, f"--epochs must be >= 1 (got {cfg.epochs})"),
        (0 <= cfg.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1) (got {cfg.warmup_ratio})"),
        (cfg.clip >= 0, f"--clip must be >= 0 (got {cfg.clip}); 0 turns clipping off"),
        (save_every >= 1, f"--save-every must be >= 1 (got {save_every})"),
        (cfg.dtype == "auto" or cfg.dtype in DTYPES, f"--dtype must be auto or one of {', '.join(DTYPES)}"),
        (
            cfg.lr_scaling in SCALINGS,
            f"--lr-scaling must be one of {', '.join(SCALINGS)} (got {cfg.lr_scaling!r})",
        ),
    ]
    for ok, msg in bad:
        if not ok:
            raise InputError(msg)
    if cfg.optim not in OPTIMIZERS:
        raise InputError(f"--optim must be one of {', '.join(OPTIMIZERS)} (got {cfg.optim!r})")
    if cfg.optim == "adamw8bit":
        if cfg.lr_scaling != "none":
            raise InputError(
                f"--optim adamw8bit keeps one lr per tensor, so --lr-scaling {cfg.lr_scaling} cannot apply: "
                "use --lr-scaling none, or --optim adamw"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise InputError("--optim adamw8bit needs bitsandbytes: pip install bitsandbytes")


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to the peak over `warmup` steps (the first step already moves), then cosine
    decay towards 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _peak_memory(device: torch.device) -> float:
    """GiB: peak CUDA memory allocated, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def label_positions(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(decoder states at positions that carry loss, their next tokens, the (rows, T-1) mask).

    The decoder pass every loss here starts from (training's loss_sum, eval's per-example NLL):
    the LM head then runs only where there is something to predict.
    """
    packed = PACKED_KEY in batch  # a key, not a value: known on the host, no device sync
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"],
        # packed rows: no 2-D mask, so that transformers isolates the examples of a row from the
        # position ids restarting at each one (a 2-D mask would let them attend to each other);
        # right padding then forms segments of its own, after every real token
        attention_mask=None if packed else batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    sel = targets != IGNORE
    idx = batch.get(LOSS_INDEX)
    if idx is None:  # boolean indexing: a device-to-host sync (the count) on a GPU
        return hidden[:, :-1][sel], targets[sel], sel
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, idx)
    return h, targets.reshape(-1).index_select(0, idx), sel


@torch.no_grad()
def check_packing(model, device: torch.device) -> None:
    """Refuse --pack where transformers does not isolate packed examples for this model: two
    copies of one example packed in a row must give the same hidden states."""
    ids = torch.arange(3, 11, device=device).unsqueeze(0)
    n = ids.shape[1]
    was_training = model.training
    model.eval()
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            h = model.get_decoder()(
                input_ids=torch.cat([ids, ids], 1),
                position_ids=torch.arange(n, device=device).repeat(1, 2),
                use_cache=False,
            ).last_hidden_state.float()[0]
    finally:
        model.train(was_training)
    a, b = h[:n], h[n:]
    if not float((a - b).abs().max()) <= 2e-2 * float(a.abs().max()) + 1e-5:
        import transformers

        raise InputError(
            f"--pack: transformers {transformers.__version__} does not keep packed examples apart for "
            f"{type(model).__name__} (they would attend to each other); drop --pack or upgrade transformers"
        )


LOSS_INDEX = "loss_index"  # optional batch key: flat (row, position) indices that carry loss


def loss_index(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The flat indices into labels[:, 1:] of the positions that carry loss, computed where the
    labels are (the host, before the batch moves): the loss then selects them without asking
    the device how many there are."""
    return (batch["labels"][:, 1:] != IGNORE).reshape(-1).nonzero().squeeze(1)


def head_cross_entropy(model, h: torch.Tensor, t: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of the LM head's float32 logits (final softcapping applied, as the model does)."""
    logits = model.get_output_embeddings()(h).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, t, reduction=reduction)


def loss_sum(
    model, batch: dict[str, torch.Tensor], chunk: int = LOSS_CHUNK, budget: int = LOGITS_BUDGET
) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over label positions, their count).

    Runs the decoder, then the LM head only on positions that carry loss. Where their logits
    would exceed `budget` elements (a 262k vocabulary times a few thousand tokens), it goes chunk
    by chunk under activation checkpointing, so that no (tokens, vocab) tensor of the whole batch
    exists; below it, one piece (the recomputation would cost time for no memory worth saving).
    """
    h, t, _ = label_positions(model, batch)

    def ce(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        return head_cross_entropy(model, hc, tc)

    head = model.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]  # offloaded: weight is empty
    if t.numel() * vocab <= budget:
        return ce(h, t), int(t.numel())
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, t.numel(), chunk):
        total = total + checkpoint(ce, h[i : i + chunk], t[i : i + chunk], use_reentrant=False)
    return total, int(t.numel())


class LossSum(torch.nn.Module):
    """loss_sum as a module's forward. DDP hooks the forward of the module it wraps, and the loss
    calls the decoder and LM head directly rather than the model's own forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_sum(self.model, batch)[0]


def wrap_ddp(model: torch.nn.Module, d: Dist) -> DistributedDataParallel:
    """The model's loss in DistributedDataParallel, syncing only the trainable factors: every rank
    loaded the same frozen weights from disk, so broadcasting them (a whole model) would be waste."""
    module = LossSum(model)
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    # buffers (rotary tables) are ignored too: deterministic, so DDP neither broadcasts them at
    # init nor syncs them before every forward
    return DistributedDataParallel(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def factor_params(layers) -> list[torch.nn.Parameter]:
    return [p for layer in layers for p in (layer.sorsa_U, layer.sorsa_S, layer.sorsa_Vt)]


def make_optimizer(layers, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.999, eps 1e-8, no weight decay) over the factors, lr spread by cfg.lr_scaling;
    its moments in 8 bits with cfg.optim adamw8bit."""
    fused = torch.device(device).type == "cuda"
    return sorsa_optimizer(layers, cfg.lr, cfg.lr_scaling, fused=fused, kind=cfg.optim)


@dataclass
class StepOutput:
    stepped: bool  # False: the loss or gradient was not finite and nothing was changed
    loss: float
    grad_norm: float
    reg_loss: float
    ortho_error_max: float
    lr: float
    tokens: int
    loss_tokens: int


def optimizer_step(
    model,
    layers,
    optimizer,
    scheduler,
    group,
    clip: float,
    reg_scale: float,
    device,
    reg_tol: float = 0.0,
    reg_update: str = "eq10",
) -> StepOutput:
    """One optimizer step over the micro-batches of `group` (see the module docstring).

    `model` is the model, or under torchrun its `wrap_ddp` (then `group` is this rank's share).
    There, the loss-token count and the loss are summed over ranks and each rank's loss is scaled
    by the world size, because DDP averages gradients: the all-reduced gradient is then the global
    batch's, so clipping, the NaN check and the step agree on every rank. The gradient is all-reduced
    once per step, on the last micro-batch (no_sync before it).
    The benchmark times this very function; the trainer adds only data, logging and checkpoints.
    """
    params = factor_params(layers)
    ddp = isinstance(model, DistributedDataParallel)
    n_loss = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group)
    # tokens of rows that carry loss: every real row does, a rank's idle row does not
    n_tok = sum(int(b["attention_mask"][(b["labels"] != IGNORE).any(1)].sum()) for b in group)
    world = 1
    if ddp:
        counts = torch.tensor([n_loss, n_tok], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(counts)
        n_loss, n_tok = (int(c) for c in counts.tolist())
        world = torch.distributed.get_world_size()
    if n_loss == 0:  # the Dataset keeps only examples with a target: this is a bug, not bad data
        raise TrainingError("a step's micro-batches hold no response token to predict; please report it")
    lr = optimizer.param_groups[0]["lr"]
    cuda = torch.device(device).type == "cuda"
    total = torch.zeros((), device=device)
    for i, b in enumerate(group):
        b = {**b, LOSS_INDEX: loss_index(b)}  # from the host's labels: no sync in the loss
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with nullcontext() if not ddp or i == len(group) - 1 else model.no_sync():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                ls = model(b) if ddp else loss_sum(model, b)[0]
            scaled = ls / n_loss
            (scaled * world if world > 1 else scaled).backward()
        total += ls.detach()
    if ddp:
        torch.distributed.all_reduce(total)  # a NaN on any rank is a NaN on all: they stop together
    # clip the task gradient, then add the regularizer's (eq. 10; eq. 9 only measures here and
    # takes its own step below), all on the device; then one transfer reads loss, gradient norm
    # and regularizer values (a single host sync per step)
    gn = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    eq9 = reg_update == "eq9"
    reg = regularizer_grad_(layers, 0.0 if eq9 else reg_scale, tol=reg_tol)
    vals = [total.float(), gn.float()] + ([] if reg is None else [reg[0], reg[1]])
    loss_sum_, grad_norm, *rest = torch.stack(vals).tolist()
    loss = loss_sum_ / n_loss
    reg_loss, worst = rest or (0.0, 0.0)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return StepOutput(False, loss, grad_norm, 0.0, 0.0, lr, n_tok, n_loss)
    if eq9 and reg_scale > 0:  # gamma_t = gamma * eta_t / eta_max; AdamW's step depends on grads only
        regularizer_grad_(layers, reg_scale * lr, tol=reg_tol, into_params=True)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutput(True, loss, grad_norm, reg_loss, worst, lr, n_tok, n_loss)


# -- the run directory --------------------------------------------------------------------------
def _prepare_run_dir(
    out: Path,
    decomp: Path,
    run_id: str,
    resume: bool,
    force: bool,
    key: dict | None = None,
    inputs: tuple[Path, ...] = (),
) -> str:
    """'fresh', 'resume' or 'done'; refuses directories holding anything else. `key` (what run_id
    hashes) lets it name the one difference a user is likely to make: another number of processes."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} is a file; -o must name a directory")
    dres = decomp.resolve()
    if out.resolve() == dres or dres in out.resolve().parents:
        raise RunDirError(
            f"-o {out} is inside the decomposed dir; sorsa train never writes there: choose another -o"
        )
    remove_stale_temps(out)  # a killed run's half-written run.json, adapter, config or plot
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not existing:
        out.mkdir(parents=True, exist_ok=True)
        return "fresh"
    state = None
    if (out / RUN_FILE).is_file():
        try:
            state = json.loads((out / RUN_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            state = None
    same = state is not None and state.get("run_id") == run_id
    if force:
        if state is None and not (out / CONFIG_FILE).exists():
            raise RunDirError(
                f"{out} holds files that are not a sorsa run (e.g. {existing[0]}); --force only replaces runs"
            )
        check_replaceable(out, [decomp, *inputs], replaces="trained")
        shutil.rmtree(out)
        out.mkdir(parents=True)
        return "fresh"
    if same and (out / CONFIG_FILE).is_file() and (out / ADAPTER_FILE).is_file():
        _remove_checkpoints(out)  # a run killed after its config was written still holds them
        return "done"
    if same and resume:
        return "resume"
    if same:
        raise RunDirError(
            f"{out} holds an unfinished run of these settings; pass --resume to continue it or --force to restart"
        )
    _refuse_other_run(out, state, key, existing)


def _refuse_other_run(out: Path, state: dict | None, key: dict | None, existing: list[str]) -> NoReturn:
    """-o holds something this run cannot continue: say what differs, where that can be told."""
    if (
        state is not None
        and key is not None
        and state.get("config") == key["config"]
        and state.get("data") != key["data"]
    ):
        was = state.get("data") or {}
        raise RunDirError(
            f"{out} holds a run of these settings on other data ({was.get('name')}"
            + "".join(f", {k} {was[k]}" for k in ("split", "subset", "revision") if was.get(k))
            + "); pass the same --data (and --split, --subset, --data-revision) to resume it, "
            "or another -o for the new data"
        )
    if state is not None and key is not None and all(state.get(k) == key[k] for k in ("config", "data")):
        n, m = state.get("world_size", 1), key.get("world_size", 1)
        if n != m and state.get("decomposition") == key["decomposition"]:
            how = f"run it under torchrun --nproc_per_node {n}" if n > 1 else "run it without torchrun"
            raise RunDirError(
                f"{out} holds a run of these settings on {n} process(es), not {m} (the global batch is "
                f"--batch-size x --grad-accum x processes); {how}, or pass --force to restart it"
            )
    what = (
        "another run's files (other DIR, data or settings)" if state else f"other files (e.g. {existing[0]})"
    )
    raise RunDirError(f"{out} holds {what}; choose a new -o, or pass --force to replace a run")


def _save_checkpoint(out: Path, layers, optimizer, scheduler, state: dict) -> None:
    """Write checkpoint/ whole under a temp name, then swap it in; a crash leaves the old one."""
    tmp, final, old = out / ".checkpoint-tmp", out / CKPT_DIR, out / ".checkpoint-old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_tensors(tmp / ADAPTER_FILE, adapter_tensors(layers, torch.float32))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": _cuda_rng(),
        },
        tmp / "trainer.pt",
    )
    atomic_write_json(tmp / "state.json", state)
    for f in tmp.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _restore_checkpoint(ck: Path, layers, optimizer, scheduler, dev: torch.device, d: Dist) -> dict:
    """Load what _save_checkpoint wrote (factors, optimizer, schedule, RNG) into the live run;
    returns its state (step, epoch, data position, tokens)."""
    st = json.loads((ck / "state.json").read_text())
    saved = read_adapter(ck, list(layers))
    with torch.no_grad():
        for m, layer in layers.items():
            for p, t in zip((layer.sorsa_U, layer.sorsa_S, layer.sorsa_Vt), saved[m], strict=True):
                p.copy_(t.to(p.device, p.dtype))
    tr = torch.load(ck / "trainer.pt", map_location=dev, weights_only=True)
    optimizer.load_state_dict(tr["optimizer"])
    torch.set_rng_state(tr["rng_cpu"].cpu())
    if dev.type == "cuda" and tr["rng_cuda"] and not d.enabled:  # rank 0's GPUs' states
        torch.cuda.set_rng_state_all([s.cpu() for s in tr["rng_cuda"]])
    scheduler.load_state_dict(tr["scheduler"])
    return st


def _hide_checkpoint(out: Path) -> None:
    """checkpoint/ -> .checkpoint-old, which a resume also reads (the name of a crash between
    _save_checkpoint's two renames): push never uploads a hidden name."""
    if (out / CKPT_DIR).is_dir():
        remove_path(out / ".checkpoint-old")
        os.replace(out / CKPT_DIR, out / ".checkpoint-old")


def _remove_checkpoints(out: Path) -> None:
    """Once the run is finished: hidden first, so a kill part-way never leaves a half-deleted
    checkpoint/ beside the finished run."""
    _hide_checkpoint(out)
    remove_path(out / ".checkpoint-old", out / ".checkpoint-tmp")


def snapshot_name(step: int) -> str:
    return f"step-{step:06d}"


def _save_snapshot(out: Path, layers, config: dict) -> Path:
    """RUN/steps/step-N: the adapter at step N with its own sorsa_config.json, so merge, eval and
    analyze take it like a finished run. Built under a temp name and renamed: never half there."""
    steps = out / STEPS_DIR
    steps.mkdir(exist_ok=True)
    final = steps / snapshot_name(config["training"]["steps"])
    tmp = steps / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_tensors(tmp / ADAPTER_FILE, adapter_tensors(layers, torch.float32))
    atomic_write_json(tmp / CONFIG_FILE, {**config, CHECKSUMS: checksums(tmp, [ADAPTER_FILE])})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _trim_snapshots(out: Path, step: int) -> None:
    """Drop snapshots past the checkpoint a run resumes from (they will be written again)."""
    steps = out / STEPS_DIR
    if not steps.is_dir():
        return
    for d in steps.iterdir():
        n = d.name.removeprefix("step-")
        if d.name.startswith(".") or (n.isdigit() and int(n) > step):
            shutil.rmtree(d, ignore_errors=True)


def _cuda_rng():
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def _checkpoint_dir(out: Path) -> Path | None:
    for name in (CKPT_DIR, ".checkpoint-old"):  # -old: a crash between the two renames
        if (out / name / "state.json").is_file():
            return out / name
    return None


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint a run resumes from (they will be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def plot_losses(log_file: Path, png: Path, title: str = "") -> Path | None:
    """Training loss and orthonormality error against step, as a PNG (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(steps, [r["loss"] for r in rows], lw=1)
    a.set(xlabel="step", ylabel="task loss (nats/token)", title=title or "training loss")
    b.plot(steps, [r["reg_loss"] for r in rows], lw=1, label="L_reg (mean)")
    b.plot(steps, [r["ortho_error_max"] for r in rows], lw=1, label="max ||U^T U - I||, ||V V^T - I||")
    b.set(xlabel="step", title="orthonormality error")
    b.legend(fontsize=7)
    fig.tight_layout()
    return atomic_save_figure(fig, png)


# -- the trainer --------------------------------------------------------------------------------
def train(
    decomposed_dir: str | Path,
    data: str | Path,
    output_dir: str | Path,
    *,
    config: TrainConfig | None = None,
    device: str = "auto",
    save_every: int = 200,
    resume: bool = False,
    force: bool = False,
    compile: bool = False,
    progress: TrainProgress | None = None,
    keep_adapters: bool = False,
    save_minutes: float = 10.0,
) -> TrainResult:
    """Train the SORSA factors of a decomposed dir on a JSONL file; write the adapter to output_dir.

    Under torchrun every process calls this: they train data-parallel (`batch_size` rows per
    process), and only rank 0 writes output_dir and reports to `progress`. `keep_adapters` also
    keeps the adapter of every step-based checkpoint in RUN/steps/step-N (not part of the run's
    identity). Besides every `save_every` steps, a checkpoint is written whenever `save_minutes`
    have passed since the last one (0: by steps only), so that a killed run keeps most of its work.
    """
    t_start = time.perf_counter()
    cfg = config or TrainConfig()
    try:
        _check(cfg, save_every)
        if not (math.isfinite(save_minutes) and save_minutes >= 0):
            raise InputError(f"--save-minutes must be >= 0 (got {save_minutes}); 0 saves by steps only")
        d = distributed.from_env(device)
    except InputError as e:  # before any process group: every rank says it (rank 0 may not be there)
        e.rank_local = True
        raise
    if progress is None or not d.is_main:
        progress = TrainProgress()
    with distributed.process_group(d):
        return _train(
            Path(decomposed_dir).expanduser(),
            data if isinstance(data, DataSpec) else DataSpec(str(data)),
            Path(output_dir).expanduser(),
            cfg,
            d,
            save_every,
            resume,
            force,
            compile,
            progress,
            t_start,
            keep_adapters,
            save_minutes,
        )


@dataclass
class _Run:
    """What a `sorsa train` call knows once its inputs are read, shared by the steps below."""

    decomp: Path
    out: Path
    cfg: TrainConfig
    d: Dist
    dcfg: dict  # DIR's sorsa_config.json
    ds: Dataset
    run_key: dict  # what the run id hashes: DIR's job, the data, the settings
    run_id: str
    total_steps: int = 0

    @property
    def dtype(self) -> torch.dtype:
        """The frozen model's dtype: --dtype, or bfloat16 on CUDA and float32 on the CPU."""
        if self.cfg.dtype != "auto":
            return DTYPES[self.cfg.dtype]
        return torch.bfloat16 if self.d.device.type == "cuda" else torch.float32

    @property
    def log_file(self) -> Path:
        return self.out / LOG_FILE

    def micro_batches(self, epoch: int) -> list:
        """Epoch `epoch`'s global micro-batches (batch_size rows per rank), in its seeded order."""
        c = self.cfg
        return self.ds.micro_batches(epoch, c.seed, c.batch_size * self.d.world_size, c.shuffle)

    def result(
        self, steps, tokens, loss, seconds, resumed_from, done: bool, png, world_size: int | None = None
    ) -> TrainResult:
        ds = self.ds
        return TrainResult(
            self.out,
            steps,
            tokens,
            loss,
            seconds,
            resumed_from,
            done,
            len(ds),
            ds.n_too_long,
            ds.n_truncated,
            self.log_file,
            png,
            self.d.world_size if world_size is None else world_size,
        )

    def config(self, at_step: int, tokens: int, loss: float | None) -> dict:
        """RUN's sorsa_config.json (and a snapshot's): the adapter format plus how it was trained."""
        dcfg, cfg, ds, d = self.dcfg, self.cfg, self.ds, self.d
        return {
            "format_version": FORMAT_VERSION,
            "kind": "trained",
            "rank": dcfg["rank"],
            "target_modules": dcfg["target_modules"],
            "base_model": dcfg.get("base_model", {}),
            "decomposition": {"job_id": dcfg["job_id"], "path": str(self.decomp.resolve())},
            **({"quantization": dcfg["quantization"]} if dcfg.get("quantization") else {}),  # QSORSA
            "dtypes": {
                "factors": "float32",
                "residual": dcfg.get("dtypes", {}).get("residual"),
                "train_compute": str(self.dtype).removeprefix("torch."),
            },
            "training": {
                **asdict(cfg),
                "data": {
                    **ds.describe(),
                    **({"sha256": self.run_key["data"]["sha256"]} if ds.source.kind == "jsonl" else {}),
                    "examples": len(ds),
                    "skipped_too_long": ds.n_too_long,
                    "truncated": ds.n_truncated,
                },
                "steps": at_step,
                "total_steps": self.total_steps,
                "tokens": tokens,
                "final_loss": loss,
                "device": str(d.device),
                "world_size": d.world_size,  # batch_size is per process: the global batch is
                "global_batch": cfg.batch_size * cfg.grad_accum * d.world_size,  # this many rows
                "run_id": self.run_id,
                "regularizer": "eq. 10: task gradient clipped, then (gamma / lr) * grad L_reg added",
            },
            "tool": {"name": "sorsa-tools", "version": __version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


@dataclass
class _Cursor:
    """Where a run stands: steps done, the data position the next step reads from, tokens seen."""

    step: int = 0
    epoch: int = 0
    pos: int = 0
    tokens: int = 0

    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "pos": self.pos, "tokens": self.tokens}


def _read_inputs(decomp: Path, data: DataSpec, out: Path, cfg: TrainConfig, d: Dist) -> _Run:
    """DIR, its tokenizer and the data, checked before anything is written; the run's identity."""
    dcfg = read_decomposition(decomp)
    check_quantized_options(decomp, dcfg, cfg.offload_residual)
    open_checkpoint(decomp)  # before run.json is written: a truncated shard leaves nothing behind
    fields = parse_fields(cfg.fields)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(decomp)
    except (OSError, ValueError) as e:
        raise InputError(
            f"{decomp} has no usable tokenizer ({str(e).splitlines()[0]}); copy the base model's tokenizer files there"
        ) from None
    ds = Dataset(data, tok, fields, cfg.template, cfg.max_length, cfg.pack)
    if fields is None:
        cfg.fields = ds.fields.describe()
    cfg.template = ds.template  # conversations: the chat template they were rendered with
    run_key = {"decomposition": dcfg["job_id"], "data": ds.source.identity(), "config": config_key(cfg)}
    if d.world_size > 1:  # the global batch scales with it; absent for one process (ids unchanged)
        run_key["world_size"] = d.world_size
    run_id = hashlib.sha256(json.dumps(run_key, sort_keys=True).encode()).hexdigest()
    return _Run(decomp, out, cfg, d, dcfg, ds, run_key, run_id)


def _open_run_dir(run: _Run, resume: bool, force: bool) -> str:
    """Rank 0: 'fresh' (RUN made or cleared, run.json written), 'resume' or 'done'."""
    inputs = (run.ds.path,) if run.ds.path is not None else ()
    mode = _prepare_run_dir(run.out, run.decomp, run.run_id, resume, force, run.run_key, inputs)
    if mode == "fresh":
        record = {"run_id": run.run_id, **run.run_key, "decomposed_dir": str(run.decomp.resolve())}
        atomic_write_json(run.out / RUN_FILE, record)
        run.log_file.unlink(missing_ok=True)
    return mode


def _finished_result(run: _Run) -> TrainResult:
    """A run that finished before: what its sorsa_config.json says, nothing recomputed."""
    done = json.loads((run.out / CONFIG_FILE).read_text())["training"]
    plot = run.out / PLOT_FILE
    png = plot if plot.exists() else None
    ws = done.get("world_size", 1)
    return run.result(done["steps"], done["tokens"], done["final_loss"], 0.0, None, True, png, ws)


def _count_steps(run: _Run, first_epoch: list) -> int:
    """Optimizer steps in all: --max-steps, or every epoch's micro-batches over --grad-accum."""
    cfg = run.cfg

    def epoch_steps(e: int) -> int:
        return math.ceil(len(first_epoch if e == 0 else run.micro_batches(e)) / cfg.grad_accum)

    if cfg.max_steps:
        return cfg.max_steps
    if cfg.pack:  # each epoch's order packs into its own number of rows: count every epoch
        return sum(epoch_steps(e) for e in range(cfg.epochs))
    return epoch_steps(0) * cfg.epochs


def _build_model(run: _Run, compile: bool):
    """The model with trainable SORSA layers, in training mode: (model, layers, residual store)."""
    cfg, dev = run.cfg, run.d.device
    torch.manual_seed(cfg.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(dev)
    model, layers, _ = load_sorsa_model(
        run.decomp, device=dev, dtype=run.dtype, trainable=True, offload_residual=cfg.offload_residual
    )
    store = next(iter(layers.values())).residual_store if cfg.offload_residual else None
    if cfg.pack:
        check_packing(model, dev)
        if store is not None:  # the check's forward is not the training step's access pattern
            store.trace, store.recording, store.pos = [], True, 0
    if cfg.grad_checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    model.train()
    if compile:  # in place: loss_sum calls the decoder directly, not the model's forward
        model.get_decoder().compile()
    return model, layers, store


def _resume(
    run: _Run, mode: str, layers, optimizer, scheduler, progress: TrainProgress
) -> tuple[_Cursor, int | None]:
    """Step 0, or the state of RUN's checkpoint loaded into the live run (log and snapshots past
    it dropped); with the step it resumed from (None for a fresh start)."""
    out, d = run.out, run.d
    ck = _checkpoint_dir(out) if mode == "resume" else None
    if mode == "resume" and ck is None:  # stopped before its first checkpoint: nothing to keep
        distributed.on_main(d, lambda: (_trim_log(run.log_file, 0), _trim_snapshots(out, 0)))
        progress.note("no checkpoint was saved yet: starting from step 0")
    if ck is None:
        return _Cursor(), None
    st = _restore_checkpoint(ck, layers, optimizer, scheduler, d.device, d)  # the same one on every rank
    cur = _Cursor(st["step"], st["epoch"], st["pos"], st["tokens"])
    distributed.on_main(d, lambda: (_trim_log(run.log_file, cur.step), _trim_snapshots(out, cur.step)))
    progress.note(f"resuming at step {cur.step} of {run.total_steps}")
    return cur, cur.step


def _announce(run: _Run, progress: TrainProgress) -> None:
    """Said before the first step, not only in the table at the end."""
    ds, cfg, d = run.ds, run.cfg, run.d
    if ds.n_too_long:
        progress.note(
            f"{ds.n_too_long} of {ds.n_records} examples skipped: the prompt alone fills --max-length "
            f"{cfg.max_length}; raise --max-length to train on them"
        )
    if d.enabled:
        progress.note(
            f"data-parallel over {d.world_size} processes ({d.backend}): {cfg.batch_size} x "
            f"{cfg.grad_accum} x {d.world_size} = {cfg.batch_size * cfg.grad_accum * d.world_size} "
            "sequences per optimizer step"
        )


def _next_group(run: _Run, cur: _Cursor, batches: list) -> tuple[list, int, list]:
    """One optimizer step's micro-batches (this rank's rows of each), the epoch they come from, and
    the epoch order read from now on (a new one when an epoch ends)."""
    cfg, d = run.cfg, run.d
    group: list = []
    group_epoch = cur.epoch
    while len(group) < cfg.grad_accum:
        if cur.pos >= len(batches):
            cur.epoch, cur.pos = cur.epoch + 1, 0
            batches = run.micro_batches(cur.epoch)
            if group and cfg.max_steps is None:
                break  # --epochs: an epoch's last accumulation group may be shorter
        rows = shard(batches[cur.pos], d.rank, d.world_size)
        if not group:
            group_epoch = cur.epoch  # the log's epoch: the one the step's data came from
        group.append(run.ds.collate(rows) if rows else run.ds.idle_batch())
        cur.pos += 1
    return group, group_epoch, batches


def _diverged(run: _Run, o: StepOutput, step: int, last_saved: int) -> TrainingError:
    ck = _checkpoint_dir(run.out)
    where = (
        f"the last good checkpoint (step {last_saved}) is in {ck}" if ck else "no checkpoint was saved yet"
    )
    return TrainingError(
        f"the loss became {o.loss} (gradient norm {o.grad_norm}) at step {step + 1}; training stopped, "
        f"{where}: lower --lr (or raise --warmup-ratio) and start over with --force "
        "(--resume continues only with the same settings)"
    )


def _log_record(o: StepOutput, step: int, epoch: int, seconds: float, dev: torch.device) -> dict:
    """One line of train_log.jsonl."""
    return {
        "step": step,
        "epoch": epoch,
        "loss": o.loss,
        "reg_loss": o.reg_loss,
        "ortho_error_max": o.ortho_error_max,
        "grad_norm": o.grad_norm,
        "lr": o.lr,
        "tokens": o.tokens,  # over all ranks
        "loss_tokens": o.loss_tokens,
        "tokens_per_s": o.tokens / seconds if seconds > 0 else None,
        "step_seconds": seconds,
        "memory_gib": _peak_memory(dev),  # rank 0's
    }


@dataclass
class _Saver:
    """Rank 0's writes after a step: the log line, and every --save-every steps or --save-minutes a
    checkpoint (with --keep-adapters, a snapshot of the step-based ones)."""

    run: _Run
    layers: dict
    optimizer: torch.optim.Optimizer
    scheduler: object
    save_every: int
    save_minutes: float
    keep_adapters: bool
    progress: TrainProgress
    log: object = None
    last_saved: int = 0
    saved_at: float = 0.0

    def after_step(self, rec: dict, cur: _Cursor) -> None:
        step, total = cur.step, self.run.total_steps
        by_steps = step % self.save_every == 0
        by_time = self.save_minutes > 0 and time.monotonic() - self.saved_at >= 60 * self.save_minutes
        save = (by_steps or by_time) and step < total  # only rank 0 writes: its clock decides
        state = cur.state()

        def book() -> None:
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()
            out = self.run.out
            if save and by_steps and self.keep_adapters:  # before the checkpoint: its resume finds it
                _save_snapshot(out, self.layers, self.run.config(step, state["tokens"], rec["loss"]))
            if save:
                ws = self.run.d.world_size
                _save_checkpoint(
                    out, self.layers, self.optimizer, self.scheduler, {**state, "world_size": ws}
                )
            self.progress.step({**rec, "total_steps": total})

        distributed.on_main(self.run.d, book)  # a failed write (or an interrupt) there stops every rank
        if save:
            self.last_saved, self.saved_at = step, time.monotonic()


def _finish(run: _Run, layers, cur: _Cursor, last_loss: float | None) -> Path | None:
    """Rank 0: the adapter, the loss plot, and last the config that marks RUN finished."""
    out = run.out
    write_tensors(out / ADAPTER_FILE, adapter_tensors(layers, torch.float32))
    config_out = {**run.config(cur.step, cur.tokens, last_loss), CHECKSUMS: checksums(out, [ADAPTER_FILE])}
    cfg = run.cfg
    png = plot_losses(
        run.log_file, out / PLOT_FILE, f"SORSA r{run.dcfg['rank']}, lr {cfg.lr:g}, gamma {cfg.gamma:g}"
    )
    _hide_checkpoint(out)  # a finished run never shows a checkpoint/ (resume reads the hidden one)
    try:
        atomic_write_json(out / CONFIG_FILE, config_out)  # last: its presence marks the run finished
    finally:  # a Ctrl-C may land just after the rename that put it in place
        if (out / CONFIG_FILE).is_file():
            mark_complete(out)
            _remove_checkpoints(out)
    return png


def _train(
    decomp: Path,
    data: DataSpec,
    out: Path,
    cfg: TrainConfig,
    d: Dist,
    save_every: int,
    resume: bool,
    force: bool,
    compile: bool,
    progress: TrainProgress,
    t_start: float,
    keep_adapters: bool = False,
    save_minutes: float = 10.0,
) -> TrainResult:
    """The recipe: read the inputs, open RUN, plan, build, resume, step until done, finish."""
    run = _read_inputs(decomp, data, out, cfg, d)
    # rank 0 decides (and may clear the directory); the others wait for it, then read the same
    mode = distributed.share(d, distributed.on_main(d, lambda: _open_run_dir(run, resume, force)))
    if mode == "done":
        return _finished_result(run)
    first_epoch = run.micro_batches(0)
    run.total_steps = _count_steps(run, first_epoch)
    warmup = math.ceil(cfg.warmup_ratio * run.total_steps)
    model, layers, store = _build_model(run, compile)
    optimizer = make_optimizer(layers.values(), cfg, d.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, run.total_steps, warmup))
    cur, resumed_from = _resume(run, mode, layers, optimizer, scheduler, progress)
    _announce(run, progress)
    loss_model = wrap_ddp(model, d) if d.enabled else model
    layer_list = list(layers.values())
    reg_scale = cfg.gamma / cfg.lr  # eq. 10: gamma / eta_max
    saver = _Saver(run, layers, optimizer, scheduler, save_every, save_minutes, keep_adapters, progress)
    saver.last_saved, saver.saved_at = cur.step, time.monotonic()
    progress.start(run.total_steps, cur.step)
    batches = first_epoch if cur.epoch == 0 else run.micro_batches(cur.epoch)
    last_loss: float | None = None
    saver.log = distributed.on_main(d, lambda: open(run.log_file, "a", encoding="utf-8"))
    try:
        while cur.step < run.total_steps:
            t0 = time.perf_counter()
            group, group_epoch, batches = _next_group(run, cur, batches)
            if store is not None:
                store.begin_step()
            o = optimizer_step(
                loss_model,
                layer_list,
                optimizer,
                scheduler,
                group,
                cfg.clip,
                reg_scale,
                d.device,
                cfg.reg_tol,
                cfg.reg_update,
            )
            if not o.stepped:  # the all-reduced loss and gradient: every rank stops here together
                raise _diverged(run, o, cur.step, saver.last_saved)
            cur.step += 1
            cur.tokens += o.tokens
            last_loss = o.loss
            saver.after_step(_log_record(o, cur.step, group_epoch, time.perf_counter() - t0, d.device), cur)
    finally:
        if saver.log is not None:
            saver.log.close()
    seconds = time.perf_counter() - t_start
    png = distributed.on_main(d, lambda: _finish(run, layers, cur, last_loss))  # the others wait here
    return run.result(cur.step, cur.tokens, last_loss, seconds, resumed_from, False, png)
