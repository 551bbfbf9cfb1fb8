"""What the CLI draws: consoles, progress bars (rich on a terminal, plain lines in a log), tables,
help-page examples. Only the CLI imports it; the library never prints."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

out = Console()
err = Console(stderr=True)


EXAMPLES_HEADER = "[bold]Examples[/]"


def examples(text: str):
    """A command's Examples epilog as a shell would take it: each command is wrapped at spaces with
    a ` \\` continuation (typer re-wrapped it into fragments that could not be pasted), every one
    indented alike, and its remark a `#` comment below it; prose paragraphs wrap as usual."""
    import re
    import textwrap

    from rich.console import Group
    from rich.text import Text

    width = max(40, Console().width - 8)
    parts = []
    for para in text.strip().split("\n\n"):
        lines = [ln.strip() for ln in para.strip("\n").splitlines()]
        if not (lines and lines[0].startswith(("sorsa ", "torchrun "))):
            parts += [Text.from_markup(" ".join(lines)), Text("")]
            continue
        words, notes = [], []
        for ln in lines:
            if ln.startswith("(") or (notes and not notes[-1].endswith(")")):  # a remark, or its next line
                notes.append(ln)
                continue
            m = re.match(r"(.*?)\s{2,}(\(.*\))\s*$", ln)  # "sorsa ...      (a remark)"
            cmd, note = (m.group(1), m.group(2)) if m else (ln, "")
            words.append(cmd.rstrip("\\ ").strip())
            if note:
                notes.append(note)
        body = textwrap.wrap(" ".join(words), width, break_long_words=False, break_on_hyphens=False)
        remark = " ".join(notes).strip()
        if remark.startswith("(") and remark.endswith(")"):
            remark = remark[1:-1]
        shown = [
            ("  " if i == 0 else "      ") + ln + (" \\" if i < len(body) - 1 else "")
            for i, ln in enumerate(body)
        ]
        shown += [f"  # {ln}" for ln in textwrap.wrap(remark, width)] if remark else []
        parts += [Text("\n".join(shown), no_wrap=True, overflow="fold"), Text("")]
    return Group(*parts[:-1])


def render_examples_unwrapped() -> None:
    """typer renders an epilog as one re-wrapped text; ours go through examples instead."""
    try:
        from typer import rich_utils
    except ImportError:  # pragma: no cover - another typer layout: its own rendering stays
        return
    real = getattr(rich_utils, "_make_rich_text", None)
    if real is None or getattr(real, "sorsa", False):
        return

    def make(*, text: str, style: str = "", markup_mode):
        if text.lstrip().startswith(EXAMPLES_HEADER):
            return examples(text)
        return real(text=text, style=style, markup_mode=markup_mode)

    make.sorsa = True
    rich_utils._make_rich_text = make


def hide_flag_types() -> None:
    """typer 0.29 shows a flag as `--force <bool>` (and then `--force=yes` is refused): a flag
    takes no value, so its type column stays empty."""
    try:
        from typer import core
    except ImportError:  # pragma: no cover
        return
    real = getattr(core.TyperOption, "display_type_rich", None)
    if real is None or getattr(real, "sorsa", False):
        return

    def display(self, ctx):
        if getattr(self, "is_flag", False) and self.metavar is None:
            return None
        return real(self, ctx)

    display.sorsa = True
    core.TyperOption.display_type_rich = display


render_examples_unwrapped()


hide_flag_types()


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


class AverageRemaining(ProgressColumn):
    """Time left from the average rate since the task started. rich's own column estimates from
    the last 30 s only: with steps slower than that it shows -:--:-- (a train bar at step 12 of 30),
    and after one fast first item it promises hours (decompose said 10:28:36 for a 20 s job)."""

    max_refresh = 1.0

    def render(self, task) -> Text:
        done, total, elapsed = task.completed, task.total, task.elapsed
        if not total or not elapsed or done <= task.fields.get("start_at", 0):
            return Text("ETA -:--:--", style="progress.remaining")
        rate = (done - task.fields.get("start_at", 0)) / elapsed
        return Text(f"ETA {clock((total - done) / rate)}", style="progress.remaining")


def live(description: str, stats_field: str) -> Progress:
    """A progress display on stderr, shown only on a terminal (logs get the final table)."""
    bar = (BarColumn(bar_width=16),) if err.width >= 100 else ()  # below, the times would be cut to "0:…"
    columns = (
        TextColumn(description),
        *bar,
        TextColumn(stats_field),
        TimeElapsedColumn(),
        AverageRemaining(),
    )
    return Progress(*columns, console=err, transient=False, disable=not err.is_terminal)


def kv_table(title: str, rows: list[tuple[str, str]]) -> Table:
    t = Table(title=title, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    return t


PLAIN_EVERY_S = 30.0  # a log (stdout not a terminal) gets a plain progress line this often


def clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Bars:
    """The terminal gets rich bars on stderr; a log (nohup, a scheduler, CI) gets plain lines on
    stdout instead, every PLAIN_EVERY_S seconds, so that a long job is never silent there. Errors stay
    the one line on stderr in both."""

    def __init__(self, progress: Progress):
        self.p = progress
        self.plain = progress.disable and not out.is_terminal
        self._last_line = -math.inf

    def note(self, message: str) -> None:
        if not self.p.disable:
            self.p.console.print(f"[dim]{message}[/]", highlight=False)
        elif self.plain:
            out.print(message, highlight=False, soft_wrap=True)

    def line(self, text: str, final: bool = False) -> None:
        """A plain progress line for logs, at most every PLAIN_EVERY_S seconds (and the last one)."""
        now = time.monotonic()
        if self.plain and (final or now - self._last_line >= PLAIN_EVERY_S):
            self._last_line = now
            out.print(text, highlight=False, soft_wrap=True)


class DecomposeBars(Bars):
    """Two bars: target modules done, and bytes of the output checkpoint written."""

    def __init__(self, progress: Progress):
        super().__init__(progress)
        self.tasks: dict[str, int] = {}
        self.done = {"modules": 0, "bytes": 0}
        self.total = {"modules": 0, "bytes": 0}

    def _count(self, key: str) -> str:
        if key == "bytes":
            return f"{self.done['bytes'] / 1e9:.2f}/{self.total['bytes'] / 1e9:.2f} GB"
        return f"{self.done['modules']}/{self.total['modules']} modules"

    def start(self, total_modules: int, total_bytes: int, done_modules: int, done_bytes: int) -> None:
        self.total = {"modules": total_modules, "bytes": total_bytes}
        self.done = {"modules": done_modules, "bytes": done_bytes}
        for key, label in (("modules", "SVD"), ("bytes", "written")):
            self.tasks[key] = self.p.add_task(
                label, total=self.total[key], completed=self.done[key], count=self._count(key)
            )

    def advance(self, modules: int, nbytes: int, label: str) -> None:
        self.done["modules"] += modules
        self.done["bytes"] += nbytes
        desc = {"description": label} if modules else {}
        self.p.update(self.tasks["modules"], advance=modules, count=self._count("modules"), **desc)
        self.p.update(self.tasks["bytes"], advance=nbytes, count=self._count("bytes"))


class TrainBar(Bars):
    """One bar over optimizer steps, with loss, tokens/s and ETA."""

    task = None

    def start(self, total_steps: int, done_steps: int) -> None:
        self.task = self.p.add_task(
            "train", total=total_steps, completed=done_steps, stats="", start_at=done_steps
        )
        self.t0, self.first = time.monotonic(), done_steps

    def step(self, r: dict) -> None:
        tps = f"{r['tokens_per_s']:,.0f} tok/s" if r.get("tokens_per_s") else ""
        stats = f"loss {r['loss']:.4f} reg {r['reg_loss']:.2e} {tps} {r['memory_gib']:.1f} GiB"
        self.p.update(
            self.task, completed=r["step"], stats=stats, description=f"step {r['step']}/{r['total_steps']}"
        )
        elapsed = time.monotonic() - self.t0
        done = r["step"] - self.first
        eta = elapsed / done * (r["total_steps"] - r["step"]) if done > 0 else None
        self.line(
            f"step {r['step']}/{r['total_steps']}  loss {r['loss']:.4f}  {tps}  elapsed {clock(elapsed)}  "
            f"ETA {clock(eta)}",
            final=r["step"] in (self.first + 1, r["total_steps"]),
        )


class MergeBar(Bars):
    def __init__(self, progress: Progress):
        super().__init__(progress)
        self.task = progress.add_task("merge", total=None, count="")

    def __call__(self, name: str, done: int, total: int) -> None:
        self.p.update(
            self.task,
            total=total,
            completed=done,
            description=name,
            count=f"{done / 1e9:.2f}/{total / 1e9:.2f} GB",
        )


class EvalBar(Bars):
    """One bar per phase (answer NLL, then generation) with the running metric and tokens/s."""

    def __init__(self, progress: Progress):
        super().__init__(progress)
        self.tasks: dict[str, int] = {}

    def start(self, phase: str, total: int) -> None:
        label = {"nll": "answer NLL", "generate": "generate", "grade": "run tests"}.get(phase, phase)
        self.tasks[phase] = self.p.add_task(label, total=total, stats="")

    def advance(self, phase: str, done: int, stats: str) -> None:
        self.p.update(self.tasks[phase], completed=done, stats=stats)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


class AnalyzeBar(Bars):
    task = None

    def start(self, total_svds: int) -> None:
        self.task = self.p.add_task("SVD", total=total_svds, count=f"0/{total_svds} SVDs")

    def advance(self, module: str, svds: int) -> None:
        self.p.update(self.task, advance=svds, description=module)
        t = self.p.tasks[self.task]
        self.p.update(self.task, count=f"{int(t.completed)}/{int(t.total)} SVDs")


def train_rows(r) -> list[tuple[str, str]]:
    """The table at the end of `sorsa train` (r: train.TrainResult)."""
    return [
        ("steps", f"{r.steps}" + (f" (resumed at {r.resumed_from})" if r.resumed_from is not None else "")),
        ("tokens", f"{r.tokens:,}"),
        ("final loss", "n/a" if r.final_loss is None else f"{r.final_loss:.4f}"),
        ("time", f"{r.seconds:.1f} s"),
        (
            "examples",
            f"{r.examples} ({r.truncated} truncated, {r.skipped_too_long} skipped: prompt too long)",
        ),
        ("log / plot", f"{r.log_file.name} / {r.plot_file.name if r.plot_file else 'no matplotlib'}"),
    ]


def math_rows(r, model: str) -> list[tuple[str, str]]:
    """The table of `sorsa eval math`: accuracy overall and per subject and level, solution NLL."""
    rows = [("model", f"{model} ({r.summary.get('model_kind')}, {r.summary.get('device')})")]
    if r.accuracy is not None:
        lo, hi = r.ci95
        rows += [("accuracy", f"{r.accuracy:.2%} ({r.correct}/{r.n}), 95 % CI {lo:.2%} - {hi:.2%}")]
        for title, groups in (("subject", r.by_subject), ("level", r.by_level)):
            for name, g in groups.items():
                rows.append((f"  {title} {name}", f"{g['accuracy']:.2%} ({g['correct']}/{g['n']})"))
    if r.nll is not None:
        rows.append(
            (
                "solution NLL",
                f"{r.nll:.4f} nats/token over {r.nll_tokens:,} tokens (ppl {math.exp(r.nll):.2f})",
            )
        )
    if r.summary.get("truncated"):
        rows.append(("truncated", f"{r.summary['truncated']} examples longer than the NLL limit"))
    return rows


def humaneval_rows(r) -> list[tuple[str, str]]:
    """The table of `sorsa eval humaneval`: pass@k and how the completions ended."""
    s = r.summary
    rows = [
        (
            "model",
            f"{s['model']} ({s['model_kind']}, {s['device']})" if "model" in s else "none (--completions)",
        )
    ]
    rows += [(k, f"{v:.2%}") for k, v in r.pass_at.items()]
    rows.append(
        ("completions", f"{r.passed} passed, {r.failed} failed, {r.timed_out} timed out, {r.crashed} crashed")
    )
    if s["problems_missing"]:
        rows.append(("missing", f"{s['problems_missing']} of 164 problems have no completion"))
    rows.append(("sandbox", f"network: {s['sandbox']['network'] or '-'}; uid {s['sandbox']['uid'] or 'own'}"))
    return rows


def lora_rows(r, to: str) -> list[tuple[str, str]]:
    """The result table of `sorsa export-lora` (r: a LoraExportResult or a LoraGGUFResult)."""
    rows = [
        ("LoRA rank / alpha", f"{r.rank} (2 x {r.sorsa_rank}) / {r.rank}: scale 1"),
        ("modules", str(r.modules)),
    ]
    if to == "peft":
        rows += [
            (
                "target_modules",
                ", ".join(r.target_modules) if not r.exact_names else f"{r.modules} full names",
            ),
            ("applies to", f"the original base model {r.base_model}"),
            ("dtype / size", f"{r.dtype} / {r.bytes / 2**20:.2f} MiB"),
            ("max ||Delta W|| / ||U S Vt||", f"{r.max_relative_delta:.3f}"),
        ]
    else:
        checked = f"{r.base_checked} (checked)" if r.base_checked else "not checked (pass --base BASE.gguf)"
        rows += [
            ("architecture", r.arch),
            ("base GGUF", checked),
            ("outtype / size", f"{r.outtype} / {r.bytes / 2**20:.2f} MiB"),
        ]
    gap = getattr(r, "quantization_gap", None)
    if gap and gap.get("mean_rel_error") is not None:
        rows.append(
            (
                "vs the trained model",
                f"off by the {gap['format']} error the factors did not absorb: mean "
                f"{gap['mean_rel_error']:.2%}, max {gap['max_rel_error']:.2%} of ||W||_F per module",
            )
        )
    return rows + [
        ("max check error", f"{r.max_check_error:.1e} (B A x vs Delta W x, relative)"),
        ("time", f"{r.seconds:.1f} s"),
    ]


def decompose_rows(r) -> list[tuple[str, str]]:
    """The summary table of a finished `sorsa decompose`."""
    return [
        ("modules", str(r.modules)),
        ("rank", str(r.rank)),
        ("svd / device", f"{r.svd} / {r.device}"),
        ("time", f"{r.seconds:.1f} s"),
        ("peak RSS", f"{r.peak_rss_bytes / 2**30:.2f} GiB"),
        ("mean energy captured", f"{r.mean_energy_captured:.2%}"),
        (
            "max S error vs exact",
            "none: every module took the exact SVD"
            if r.all_exact
            else "not sampled"
            if r.max_s_rel_error is None
            else f"{r.max_s_rel_error:.2e} (sampled)",
        ),
        (
            "max S error (estimate)",
            "n/a" if r.max_s_est_error is None else f"{r.max_s_est_error:.2e} (all modules)",
        ),
        (
            "max quantization error left" if r.quantization else "max reconstruction error",
            f"{r.max_reconstruction_error:.1e}" + (" (of ||W||_F)" if r.quantization else ""),
        ),
        *decompose_quant_rows(r.quantization),
    ]


def decompose_quant_rows(q: dict | None) -> list[tuple[str, str]]:
    """The QSORSA lines of decompose's and inspect's tables (none for a plain residual)."""
    if not q:
        return []

    def pct(v) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    block = f", block {q['block_size']}" if q.get("block_size") else ""
    dq = ", double quant" if q.get("double_quant") else ""
    return [
        ("quantized residual", f"{q['format']} (bitsandbytes{block}{dq}), T = {q['iters']}"),
        (
            "quant. error (rel. Frobenius)",
            f"{q['mean_quant_error']:.4f} vs QLoRA {q['mean_qlora_error']:.4f}",
        ),
        (
            "error reduction vs QLoRA",
            f"{pct(q['mean_error_reduction_fro'])} Frobenius, "
            f"{pct(q['mean_error_reduction_nuclear_sampled'])} nuclear (sampled)",
        ),
    ]


def _data_where(data: dict) -> str:
    """Where a run's data came from: its path, or a Hub dataset's id, split and revision."""
    where = data.get("path") or data.get("dataset")
    extra = [f"{k} {data[k]}" for k in ("split", "subset", "revision") if data.get(k)]
    return where + (f" [{', '.join(extra)}]" if extra else "")


def inspect_rows(d: dict) -> tuple[str, list[tuple[str, str]]]:
    """The title and rows of `sorsa inspect` (d: info.describe of a decomposition or a run)."""
    base = d["base_model"]
    title = f"{d['directory']} ({d['kind']}, format v{d['format_version']})"
    rows = [
        (
            "base model",
            f"{base.get('name_or_path')} ({base.get('source')}"
            + (f", revision {base['revision']})" if base.get("revision") else ")"),
        ),
        ("architecture", f"{base.get('model_type')} {base.get('architectures')}"),
        ("rank", str(d["rank"])),
        ("targets", f"{d['target_count']}: " + ", ".join(f"{k}×{v}" for k, v in d["target_kinds"].items())),
        ("svd", ", ".join(f"{k}={v}" for k, v in d["svd"].items() if v is not None)),
        ("dtypes", ", ".join(f"{k}={v}" for k, v in d["dtypes"].items())),
        ("adapter", f"{d['adapter_bytes'] / 2**20:.1f} MiB ({', '.join(d['adapter_dtypes'])})"),
        ("adapter sha256", d["adapter_checksum"]),
        ("residual weights", f"{d['residual_bytes'] / 2**20:.1f} MiB"),
    ]
    if d["mean_energy_captured"] is not None:
        rows.append(
            ("energy captured", f"mean {d['mean_energy_captured']:.2%}, min {d['min_energy_captured']:.2%}")
        )
    if d["max_reconstruction_error"] is not None:
        label = "max quantization error left" if d.get("quantization") else "max reconstruction error"
        rows.append((label, f"{d['max_reconstruction_error']:.2e}"))
    if d["max_s_rel_error"] is not None:
        rows.append(
            ("max S error vs exact", f"{d['max_s_rel_error']:.2e} ({d['s_error_sampled_modules']} sampled)")
        )
    rows.extend(decompose_quant_rows(d.get("quantization")))
    tr = d.get("training")
    if tr:  # a trained run: its SVD and residual live in the decomposition it names
        rows = [r for r in rows if r[0] not in ("svd", "residual weights")]
        rows.append(
            ("decomposition", f"{d['decomposition']['path']} (job {d['decomposition']['job_id'][:12]})")
        )
        rows.append(
            (
                "training",
                f"{tr['steps']} steps, {tr['tokens']:,} tokens, final loss {tr['final_loss']:.4f}; "
                f"lr {tr['lr']:g}, gamma {tr['gamma']:g}, batch {tr['batch_size']}x{tr['grad_accum']}"
                + "".join(  # the settings a run may have changed from their defaults
                    f", {label} {tr[k]}"
                    for k, label, default in (
                        ("lr_scaling", "lr scaling", "none"),
                        ("optim", "optim", "adamw"),
                    )
                    if tr.get(k, default) != default
                ),
            )
        )
        data = tr["data"]
        left_out = [  # what train reported at the start: the run learnt from the examples only
            f"{data[k]} {what}"
            for k, what in (("truncated", "truncated"), ("skipped_too_long", "skipped: prompt too long"))
            if data.get(k)
        ]
        rows.append(
            (
                "data",
                f"{_data_where(data)} ({data['examples']} examples"
                + "".join(f", {x}" for x in left_out)
                + ")",
            )
        )
    rows.append(("made by", f"sorsa-tools {d['tool'].get('version')} at {d['created']}"))
    return title, rows


def analyze_table(r, base_name: str) -> Table:
    """`sorsa analyze`'s per-matrix table: ΔΣ and ΔD of each checkpoint, then their means
    (r: analyze.AnalyzeResult)."""
    title = f"sorsa analyze: {base_name} → {len(r.checkpoints)} checkpoint(s), ΔΣ (eq. 1) / ΔD (eq. 4)"
    t = Table(title=title)
    t.add_column("layer", justify="right")
    t.add_column("module")
    t.add_column("shape")
    for c in r.checkpoints:
        t.add_column(f"{c['label']}\nΔΣ", justify="right")
        t.add_column("ΔD", justify="right")
    for m in r.modules:
        cells = [v for x in m["results"] for v in (f"{x['delta_sigma']:.3e}", f"{x['delta_d']:.3e}")]
        layer = "" if m["layer"] is None else str(m["layer"])
        name = m["type"] if m["layer"] is not None else m["module"]
        t.add_row(layer, name, "x".join(map(str, m["shape"])), *cells)
    t.add_section()
    means = [v for s in r.summary() for v in (f"{s['mean_delta_sigma']:.3e}", f"{s['mean_delta_d']:.3e}")]
    t.add_row("", "[bold]mean[/]", "", *means)
    return t


def analyze_rows(r, json_path, plot_row: str) -> list[tuple[str, str]]:
    """The summary table at the end of `sorsa analyze`."""
    return [
        ("matrices", f"{len(r.modules)} x {len(r.checkpoints)} checkpoint(s)"),
        ("SVD", f"cpu, {r.precision}, {r.svd_seconds:.1f} s of {r.seconds:.1f} s"),
        ("min singular gap (base)", f"{min(m['min_rel_gap'] for m in r.modules):.1e} of sigma_1"),
        ("json", str(json_path) if json_path else "not written (--json FILE)"),
        ("plot", plot_row),
    ]
