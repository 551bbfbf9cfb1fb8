"""`sorsa analyze`: how far fine-tuning moved the singular values and vectors of every adapted
matrix (paper section 3, eq. 1-4), per module and checkpoint, as data, JSON and a Figure-2 PNG.

For a base weight W_0 and a tuned W_t (m x n, k = min(m, n)), with full SVDs W = U diag(S) Vt:

    Delta Sigma = (1/k) sum_i |s_t^i - s_0^i|                                   (eq. 1)
    Delta D     = 1 - (1/2k) sum_i (|<u_t^i, u_0^i>| + |<v_t^i, v_0^i>|)        (eq. 2-4)

over ALL k singular triplets, paired by rank (the i-th largest with the i-th largest). The
absolute value makes Delta D blind to the sign of each singular vector, which an SVD does not fix.
It cannot make it blind to a rotation inside a degenerate singular subspace: where s_i and s_i+1
(nearly) coincide, the individual vectors are not determined by W and a tiny change of W may turn
them a lot, so Delta D there measures the SVD's choice as much as the training. `min_rel_gap`
(per module, of the base) says how close the closest pair is. Two singular values that swap order
during training are paired with each other's vectors, as in the paper.

The SVDs run on the CPU in float64 (the paper found GPU SVDs not precise enough for this), one
matrix at a time: each base matrix is decomposed once and reused for every checkpoint. Memory is a
few copies of one matrix in float64 (peak RSS 3.2 GiB measured for a 4096 x 11008 MLP weight).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from sorsa_tools.arch import select_targets
from sorsa_tools.errors import InputError, ModelMismatchError, ModelNotFoundError, TargetError
from sorsa_tools.format import CONFIG_FILE, read_config
from sorsa_tools.io.safetensors_file import atomic_save_figure, atomic_write_json
from sorsa_tools.source import MergedSource
from sorsa_tools.svd import require_finite

PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
JSON_FORMAT = "sorsa-analyze"
JSON_VERSION = 1
DEFINITIONS = {
    "delta_sigma": "eq. 1: mean over all k = min(m, n) singular values of |s_t^i - s_0^i|",
    "delta_d": "eq. 4: 1 - (1/2k) sum_i (|<u_t^i, u_0^i>| + |<v_t^i, v_0^i>|) = (delta_u + delta_v) / 2",
    "delta_u": "1 - mean_i |<u_t^i, u_0^i>| (left singular vectors, columns of U)",
    "delta_v": "1 - mean_i |<v_t^i, v_0^i>| (right singular vectors, rows of Vt)",
    "delta_w_rel": "||W_t - W_0||_F / ||W_0||_F",
    "min_rel_gap": "min_i (s_0^i - s_0^i+1) / s_0^1 of the base: near 0, Delta D of those vectors is unstable",
}


# -- the math -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Deltas:
    delta_sigma: float
    delta_d: float
    delta_u: float
    delta_v: float


def full_svd(W: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """(U, S, Vt) of W with k = min(m, n) triplets, on the CPU in `dtype`. A wide matrix is
    decomposed as its transpose (LAPACK is faster on tall ones) and the factors swapped back."""
    W = W.detach().to("cpu", dtype)
    if W.shape[0] < W.shape[1]:
        U, S, Vt = torch.linalg.svd(W.T, full_matrices=False)
        return Vt.T, S, U.T
    return torch.linalg.svd(W, full_matrices=False)


def svd_deltas(base: tuple[torch.Tensor, ...], tuned: tuple[torch.Tensor, ...]) -> Deltas:
    """Delta Sigma and Delta D (eq. 1-4) between two full SVDs of matrices of one shape."""
    U0, S0, Vt0 = base
    Ut, St, Vtt = tuned
    cu = (Ut * U0).sum(0).abs().clamp(max=1.0)  # |cos| of matching columns of U
    cv = (Vtt * Vt0).sum(1).abs().clamp(max=1.0)  # ... and rows of Vt
    du, dv = 1.0 - cu.mean().item(), 1.0 - cv.mean().item()
    return Deltas((St - S0).abs().mean().item(), (du + dv) / 2, du, dv)


def deltas(W0: torch.Tensor, Wt: torch.Tensor, dtype: torch.dtype = torch.float64) -> Deltas:
    """Delta Sigma and Delta D between two matrices (full SVDs of both)."""
    if W0.shape != Wt.shape:
        raise ModelMismatchError(f"shapes {tuple(W0.shape)} and {tuple(Wt.shape)} differ")
    return svd_deltas(full_svd(W0, dtype), full_svd(Wt, dtype))


# -- inputs -------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """One tuned model: a merged/plain HF dir, or a decomposed DIR read with an adapter."""

    label: str
    path: str
    adapter: str | None
    step: int | None
    source: MergedSource = field(repr=False)

    def describe(self) -> dict:
        return {"label": self.label, "path": self.path, "adapter": self.adapter, "step": self.step}


def _kind(d: Path) -> str | None:
    """'decomposition', 'trained' (a run: adapter only) or None (an ordinary checkpoint)."""
    if not (d / CONFIG_FILE).is_file():
        unfinished = (d / "run.json").is_file() or (
            (d / "state.json").is_file() and (d.parent / "run.json").is_file()
        )
        if unfinished:  # an unfinished run, or its checkpoint/: no sorsa_config.json describes it yet
            raise InputError(
                f"{d} is an unfinished `sorsa train` run or its checkpoint (no {CONFIG_FILE} yet); "
                "analyze reads finished runs: let it finish (`sorsa train ... --resume`), then pass the run"
            )
        return None
    return read_config(d).get("kind")


def _open(path: str | Path, role: str) -> tuple[MergedSource, str]:
    """A model directory as a MergedSource, and its kind: 'hf', 'decomposition' or 'trained'."""
    p = Path(path).expanduser()
    if p.is_file():
        hint = (
            "analyze reads safetensors checkpoints, not GGUF: pass the merged HF dir (sorsa merge --to hf)"
            if p.suffix == ".gguf"
            else "pass a model directory"
        )
        raise InputError(f"{role} {p} is a file; {hint}")
    if not p.is_dir():
        raise ModelNotFoundError(
            f"{role} {p}: no such directory; pass a local model directory (a Hub model: download it "
            "first, e.g. `hf download ORG/NAME --local-dir DIR`)"
        )
    kind = _kind(p)
    if kind == "decomposition":
        return MergedSource(p), "decomposition"
    if kind == "trained":
        if role == "BASE":
            raise InputError(
                f"BASE {p} is a trained run (an adapter only); pass the original model or the "
                "decomposed DIR it was trained on as BASE, and the run as --adapter"
            )
        dec = (read_config(p).get("decomposition") or {}).get("path")
        if not dec or not Path(dec).is_dir():
            raise InputError(
                f"{role} {p} is a trained run whose decomposed DIR ({dec}) is not there; pass "
                f"DIR --adapter {p}"
            )
        return MergedSource(dec, p), "trained"
    if kind is not None:
        raise InputError(f"{role} {p} holds a {kind!r}, not a model; pass a model directory")
    return MergedSource.plain(p), "hf"


def _name(path: str | Path) -> str:
    return Path(path).expanduser().resolve().name


def _step(source: MergedSource) -> int | None:
    t = (source.adapter_config or {}).get("training") or {}
    return t.get("steps") if isinstance(t.get("steps"), int) else None


def resolve_checkpoints(
    base: str | Path, tuned: list[str | Path], adapters: list[str | Path]
) -> tuple[MergedSource, str, list[Checkpoint]]:
    """BASE's source and kind, and the tuned checkpoints in the order given.

    --adapter RUNs are read on top of the one decomposed DIR among TUNED (it stands for its
    adapters, in order), or of BASE when BASE is a decomposed DIR and no TUNED DIR is given.
    """
    base_src, base_kind = _open(base, "BASE")
    opened = [(t, *_open(t, "TUNED")) for t in tuned]
    hosts = [i for i, (_, _, kind) in enumerate(opened) if kind == "decomposition"]
    if adapters and len(hosts) > 1:
        raise InputError(
            f"--adapter is ambiguous: {len(hosts)} TUNED directories are decomposed DIRs "
            f"({opened[hosts[0]][0]}, {opened[hosts[1]][0]}); give one DIR with its --adapter runs per command"
        )
    if adapters and not hosts and base_kind != "decomposition":
        raise InputError(
            "--adapter needs the decomposed DIR the run was trained on: give it as TUNED "
            "(sorsa analyze BASE DIR --adapter RUN) or as BASE (sorsa analyze DIR --adapter RUN)"
        )
    host_dir = opened[hosts[0]][0] if (adapters and hosts) else (base if adapters else None)

    def with_adapters() -> list[Checkpoint]:
        out = []
        for a in adapters:
            _kind(Path(a).expanduser())  # an unfinished run: say so (check_adapter would ask for a DIR)
            src = MergedSource(host_dir, a)  # check_adapter: AdapterMismatchError for another DIR's run
            out.append(Checkpoint(_name(a), str(host_dir), str(a), _step(src), src))
        return out

    cks: list[Checkpoint] = []
    for i, (t, src, kind) in enumerate(opened):
        if adapters and hosts and i == hosts[0]:
            cks += with_adapters()
            continue
        name = _name(t) + (" (own adapter)" if kind == "decomposition" else "")
        adapter = str(src.adapter_dir) if kind == "trained" else None
        cks.append(Checkpoint(name, str(src.root if kind == "trained" else t), adapter, _step(src), src))
    if adapters and not hosts:
        cks += with_adapters()
    if not cks:
        raise InputError("nothing to compare with BASE: give TUNED directories or --adapter RUN")
    seen: dict[str, int] = {}
    for c in cks:  # labels name the checkpoints in the table, JSON and plot: keep them distinct
        seen[c.label] = seen.get(c.label, 0) + 1
        if seen[c.label] > 1:
            c.label = f"{c.label} #{seen[c.label]}"
    return base_src, base_kind, cks


# -- module selection ---------------------------------------------------------------------------
_LAYER = re.compile(r"\.(\d+)\.")


def layer_of(module: str) -> int | None:
    """The block index in a module name (`model.layers.3.self_attn.q_proj` -> 3)."""
    m = _LAYER.search("." + module + ".")
    return int(m.group(1)) if m else None


def module_type(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def parse_layers(spec: str) -> set[int]:
    """'0,3,10-12' -> {0, 3, 10, 11, 12}."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise InputError(
                f"--layers {spec!r}: {part!r} is not a layer index or range; write e.g. 0,3,10-12"
            )
        lo = int(m.group(1))
        out.update(range(lo, int(m.group(2) or lo) + 1))
    return out


def _module_matcher(spec: str):
    """`q_proj,v_proj` matches the last components of a module name; anything else is a regex."""
    if re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", spec.strip()):
        names = [s.strip() for s in spec.split(",")]
        return lambda m: any(m == n or m.endswith("." + n) for n in names)
    try:
        rx = re.compile(spec)
    except re.error as e:
        raise InputError(f"--modules {spec!r} is neither a list of names nor a valid regex ({e})") from None
    return lambda m: bool(rx.search(m))


_TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj")


def module_order(module: str) -> tuple:
    """Layer by number (2 before 10), then attention before MLP as in a block, then by name."""
    layer, t = layer_of(module), module_type(module)
    rank = _TYPE_ORDER.index(t) if t in _TYPE_ORDER else len(_TYPE_ORDER)
    return (-1 if layer is None else layer, rank, module)


def select_modules(
    base: MergedSource, checkpoints: list[Checkpoint], layers: str | None, modules: str | None
) -> list[str]:
    """The adapted matrices to analyze: the targets of the decomposition involved (BASE's, else the
    first decomposed TUNED's), else the architecture's default targets (any 2-D weight with
    --modules), filtered by --modules and --layers."""
    dec = (
        base if base.decomposition else next((c.source for c in checkpoints if c.source.decomposition), None)
    )
    if dec is not None:
        candidates = list(dec.targets)
    else:
        shapes = {i.name: i.shape for i in base.infos()}
        if modules:
            candidates = [
                n[: -len(".weight")] for n, s in shapes.items() if n.endswith(".weight") and len(s) == 2
            ]
        else:
            candidates, _ = select_targets(base.config, shapes)
    picked = candidates
    if modules:
        match = _module_matcher(modules)
        picked = [m for m in picked if match(m)]
    if layers:
        want = parse_layers(layers)
        picked = [m for m in picked if layer_of(m) in want]
    picked = sorted(picked, key=module_order)
    if not picked:
        types = sorted({module_type(m) for m in candidates})
        idx = sorted({i for i in map(layer_of, candidates) if i is not None})
        span = f"{idx[0]}-{idx[-1]}" if idx else "none"
        what = " and ".join(
            f"--{k} {v!r}" for k, v in (("modules", modules), ("layers", layers)) if v is not None
        )
        raise TargetError(
            f"{what} match none of the {len(candidates)} adapted matrices (types {', '.join(types)}; "
            f"layers {span}); pass names such as {types[0] if types else 'q_proj'} and layers in that range"
        )
    return picked


def check_compatible(base: MergedSource, checkpoints: list[Checkpoint], modules: list[str]) -> None:
    """Every TUNED holds every module with BASE's shape (checked from headers, before any SVD)."""
    base_names = set(base.names())
    for m in modules:
        if m + ".weight" not in base_names:  # chosen from a TUNED of another architecture
            raise ModelMismatchError(
                f"BASE has no {m}.weight, which TUNED has; pass the model TUNED was fine-tuned from"
            )
        shape = tuple(base.info(m + ".weight").shape)
        if len(shape) != 2:
            raise ModelMismatchError(
                f"{m}.weight of BASE is not a matrix {shape}; pass --modules of linear layers"
            )
    for c in checkpoints:
        names = set(c.source.names())
        for m in modules:
            shape = tuple(base.info(m + ".weight").shape)
            if m + ".weight" not in names:
                raise ModelMismatchError(
                    f"TUNED {c.label} has no {m}.weight, which BASE has; pass a checkpoint fine-tuned "
                    "from BASE (same architecture), or leave the module out with --modules/--layers"
                )
            got = tuple(c.source.info(m + ".weight").shape)
            if got != shape:
                raise ModelMismatchError(
                    f"{m}.weight is {got} in TUNED {c.label} but {shape} in BASE; pass a checkpoint "
                    "fine-tuned from BASE (same architecture)"
                )


# -- the run ------------------------------------------------------------------------------------
class AnalyzeProgress(Protocol):
    def start(self, total_svds: int) -> None: ...
    def advance(self, module: str, svds: int) -> None: ...


@dataclass
class AnalyzeResult:
    base: dict
    checkpoints: list[dict]
    modules: list[dict]
    precision: str
    layers: str | None
    modules_filter: str | None
    seconds: float
    svd_seconds: float

    def summary(self) -> list[dict]:
        """Per checkpoint: the means over modules (the big dots of Figure 2) and the largest values."""
        out = []
        for j, ck in enumerate(self.checkpoints):
            rows = [m["results"][j] for m in self.modules]
            by_type: dict[str, list[dict]] = {}
            for m in self.modules:
                by_type.setdefault(m["type"], []).append(m["results"][j])

            def mean(rs: list[dict], key: str) -> float:
                return sum(r[key] for r in rs) / len(rs)

            out.append(
                {
                    "checkpoint": ck["label"],
                    "mean_delta_sigma": mean(rows, "delta_sigma"),
                    "mean_delta_d": mean(rows, "delta_d"),
                    "max_delta_sigma": max(r["delta_sigma"] for r in rows),
                    "max_delta_d": max(r["delta_d"] for r in rows),
                    "by_type": {
                        t: {"mean_delta_sigma": mean(rs, "delta_sigma"), "mean_delta_d": mean(rs, "delta_d")}
                        for t, rs in by_type.items()
                    },
                }
            )
        return out

    def to_json(self) -> dict:
        return {
            "format": JSON_FORMAT,
            "version": JSON_VERSION,
            "definitions": DEFINITIONS,
            "base": self.base,
            "checkpoints": self.checkpoints,
            "svd": {"device": "cpu", "dtype": self.precision, "function": "torch.linalg.svd (LAPACK)"},
            "filters": {"layers": self.layers, "modules": self.modules_filter},
            "modules": self.modules,
            "summary": self.summary(),
            "seconds": round(self.seconds, 3),
            "svd_seconds": round(self.svd_seconds, 3),
        }


def analyze(
    base: str | Path,
    tuned: list[str | Path] | None = None,
    adapters: list[str | Path] | None = None,
    *,
    layers: str | None = None,
    modules: str | None = None,
    precision: str = "float64",
    progress: AnalyzeProgress | None = None,
) -> AnalyzeResult:
    """Delta Sigma and Delta D of every selected adapted matrix for every tuned checkpoint.

    Streams: one matrix of BASE at a time is read (DIRs through MergedSource, which folds the
    adapter into that one weight in float32), decomposed once, and compared with each checkpoint's
    matrix in turn; nothing larger than a few matrices is held.
    """
    t0 = time.perf_counter()
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: choose float64 (default) or float32")
    dtype = PRECISIONS[precision]
    base_src, base_kind, cks = resolve_checkpoints(base, list(tuned or []), list(adapters or []))
    mods = select_modules(base_src, cks, layers, modules)
    check_compatible(base_src, cks, mods)
    if progress is not None:
        progress.start(len(mods) * (1 + len(cks)))
    rows, svd_s = [], 0.0
    for m in mods:
        name = m + ".weight"
        W0 = base_src.read(name).to(dtype)
        require_finite(W0, f"{name} of BASE")
        t = time.perf_counter()
        b = full_svd(W0, dtype)
        svd_s += time.perf_counter() - t
        S0 = b[1]
        gaps = (S0[:-1] - S0[1:]) / S0[0] if S0.numel() > 1 and S0[0] > 0 else torch.zeros(1, dtype=dtype)
        w0_norm = torch.linalg.matrix_norm(W0).item()
        if progress is not None:
            progress.advance(m, 1)
        results = []
        for c in cks:
            Wt = c.source.read(name).to(dtype)
            require_finite(Wt, f"{name} of TUNED {c.label}")
            t = time.perf_counter()
            d = svd_deltas(b, full_svd(Wt, dtype))
            svd_s += time.perf_counter() - t
            rel = torch.linalg.matrix_norm(Wt - W0).item() / w0_norm if w0_norm > 0 else None
            results.append({"checkpoint": c.label, **d.__dict__, "delta_w_rel": rel})
            del Wt
            if progress is not None:
                progress.advance(m, 1)
        rows.append(
            {
                "module": m,
                "layer": layer_of(m),
                "type": module_type(m),
                "shape": list(W0.shape),
                "k": int(S0.numel()),
                "sigma_max": S0[0].item(),
                "sigma_mean": S0.mean().item(),
                "min_rel_gap": gaps.min().item(),
                "results": results,
            }
        )
        del W0, b
    base_info = {"path": str(base), "kind": base_kind}
    if base_kind == "decomposition":
        base_info["adapter"] = "its own (untrained): the original model"
    return AnalyzeResult(
        base_info,
        [c.describe() for c in cks],
        rows,
        precision,
        layers,
        modules,
        time.perf_counter() - t0,
        svd_s,
    )


# -- outputs ------------------------------------------------------------------------------------
def write_json(result: AnalyzeResult, path: str | Path) -> Path:
    """The result as JSON, written atomically (temp name, fsync, rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(p, result.to_json())


def plot(result: AnalyzeResult, png: str | Path) -> Path | None:
    """Figure 2 of the paper: Delta Sigma (x) against Delta D (y), one panel per module type; each
    point is a matrix labelled by its layer index, coloured by checkpoint; thin lines follow one
    matrix across checkpoints, big dots are the per-checkpoint means, joined from the origin.
    None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    png = Path(png)
    types = list(dict.fromkeys(m["type"] for m in result.modules))
    ncols = min(4, len(types))
    nrows = math.ceil(len(types) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.9 * nrows), squeeze=False)
    n = len(result.checkpoints)
    cmap = plt.get_cmap("viridis")
    colors = [cmap(0.5 if n == 1 else j / (n - 1) * 0.9) for j in range(n)]
    for ax, t in zip(axes.flat, types, strict=False):
        mods = [m for m in result.modules if m["type"] == t]
        for m in mods:
            xs = [r["delta_sigma"] for r in m["results"]]
            ys = [r["delta_d"] for r in m["results"]]
            if n > 1:
                ax.plot(xs, ys, color="0.5", lw=0.8, alpha=0.35, zorder=1)
            mark = "o" if m["layer"] is None else f"${m['layer']}$"
            for j in range(n):
                ax.scatter(xs[j], ys[j], marker=mark, color=colors[j], s=60, alpha=0.8, lw=0, zorder=2)
        mx = [sum(m["results"][j]["delta_sigma"] for m in mods) / len(mods) for j in range(n)]
        my = [sum(m["results"][j]["delta_d"] for m in mods) / len(mods) for j in range(n)]
        ax.plot([0.0, *mx], [0.0, *my], color="black", lw=2.2, zorder=3)
        ax.scatter([0.0], [0.0], color="black", s=40, zorder=4)
        ax.scatter(mx, my, color=colors, s=110, edgecolors="black", linewidths=0.8, zorder=4)
        ax.set(
            xlabel=r"$\Delta\Sigma$ (eq. 1)",
            ylabel=r"$\Delta D$ (eq. 4)",
            title=f"{t} ({len(mods)} matrices)",
        )
        ax.grid(True, alpha=0.3)
        ax.ticklabel_format(style="sci", scilimits=(-3, 3), axis="both")
    for ax in list(axes.flat)[len(types) :]:
        ax.axis("off")
    handles = [
        plt.Line2D([0], [0], marker="o", color=colors[j], linestyle="", markersize=8) for j in range(n)
    ]
    labels = [
        c["label"]
        + (f" (step {c['step']})" if c.get("step") is not None and str(c["step"]) not in c["label"] else "")
        for c in result.checkpoints
    ]
    fig.legend(handles, labels, loc="lower center", ncol=min(n, 4), fontsize=8, frameon=False)
    fig.suptitle(f"singular values and vectors moved from {Path(result.base['path']).name} (numbers: layer)")
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(n / 4), 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    return atomic_save_figure(fig, png)
