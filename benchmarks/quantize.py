"""Quantization error reduction of QSORSA against QLoRA and LoftQ (the PiSSA paper's Table 8 metric).

For every target matrix W, with quant = bitsandbytes NF4 (block 64, double quantization: QLoRA's
setting) or int8, and the same top-r SVD (exact LAPACK) for every method:

- QLoRA:  base dequant(quant(W)), nothing absorbs its error; reduction 0 by definition.
- LoftQ:  PEFT's `loftq_init` loop: T times Q = quant(W - L R), L R = top-r SVD of (W - dequant(Q)),
  starting from L R = 0. PEFT 0.21's `loftq_init` moves every weight to "cuda" (or "xpu")
  unconditionally, so on a CPU it cannot run: the same loop is run here with the same bitsandbytes
  calls (PEFT quantizes without double quantization; here both use the same quantizer, so the two
  differ only in where the loop starts).
- QSORSA: `sorsa_tools.quantize.absorb`, what `sorsa decompose --quantize` runs: the loop started
  from the plain SVD of W (L R = U S Vt), T rounds.

reduction = 1 - ||W - (dequant(Q) + L R)||_* / ||W - dequant(quant(W))||_*  (nuclear norm),
reported per projection type (mean over the layers run) and as the mean over all matrices.

    python benchmarks/quantize.py --gemma /work/main/out/gemma3-270m --layers 0,5,11,17 --record
    python benchmarks/quantize.py --llama7b --ranks 128 --record      # synthetic Llama-2-7B shapes
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's sorsa_tools
from _common import decaying_matrix, record  # noqa: E402

from sorsa_tools import quantize as qz  # noqa: E402
from sorsa_tools.arch import select_targets  # noqa: E402
from sorsa_tools.io.checkpoint import open_checkpoint  # noqa: E402
from sorsa_tools.svd import Factors, exact_svd, krylov_svd, residual  # noqa: E402

ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA7B = {"q_proj": (4096, 4096), "gate_proj": (11008, 4096), "down_proj": (4096, 11008)}


SVDS = {
    "exact": exact_svd,
    # what decompose's --svd auto takes for big matrices: block Krylov to an S error of 5e-4
    "krylov": lambda W, r: krylov_svd(W, r, 0, 4, torch.Generator().manual_seed(0), tol=5e-4, max_niter=24),
}


def loftq(W: torch.Tensor, s: qz.QuantSettings, rank: int, iters: int, svd) -> tuple[torch.Tensor, Factors]:
    """PEFT's loftq_init loop (peft/utils/loftq_utils.py), on the CPU."""
    f = None
    for _ in range(iters):
        base = W if f is None else residual(W, f)
        D = qz.dequantize(qz.quantize(base, s), s).float()
        f = svd(W - D, rank)
    return D, f


def reductions(
    W: torch.Tensor, s: qz.QuantSettings, rank: int, iters: int, svd=exact_svd
) -> dict[str, float]:
    base = qz.qlora_error(W, s, W.dtype)
    D, f = loftq(W, s, rank, iters, svd)
    out = {"LoftQ": qz.error_reduction(residual(W - D, f), base, qz.nuclear)}
    a = qz.absorb(W, s, W.dtype, lambda M: svd(M, rank))
    out["QSORSA"] = qz.error_reduction(residual(W - a.dequantized, a.factors), base, qz.nuclear)
    return out


def gemma_matrices(path: str, layers: list[int]):
    ckpt = open_checkpoint(Path(path))
    shapes = {n: ckpt.info(n).shape for n in ckpt.weight_map}
    targets, _ = select_targets(ckpt.config, shapes, None)
    for m in targets:
        layer = int(m.split(".layers.")[1].split(".")[0])
        if layer in layers:
            yield m.rsplit(".", 1)[-1], ckpt.shard_of(m + ".weight").read_tensor(m + ".weight").float()


def llama_matrices(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for kind, (o, i) in LLAMA7B.items():
        yield kind, decaying_matrix(o, i, g)


def run(mats, fmt: str, ranks: list[int], iters: list[int], svd=exact_svd) -> dict:
    """{(rank, T): {kind: {method: [reduction per matrix]}}}"""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for kind, W in mats:
        for T in iters:
            s = qz.settings(fmt, T)
            for r in ranks:
                for method, v in reductions(W, s, r, T, svd).items():
                    out[(r, T)][kind][method].append(v)
    return out


def table(title: str, res: dict) -> str:
    lines = [f"**{title}**", ""]
    for (r, T), kinds in sorted(res.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        names = sorted(kinds, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER))
        lines += [
            f"rank {r}, T = {T}:",
            "",
            "| method | " + " | ".join(names) + " | mean |",
            "|---|" + "---|" * (len(names) + 1),
        ]
        for method in ("QLoRA", "LoftQ", "QSORSA"):
            vals, allv = [], []
            for k in names:
                v = kinds[k].get(method) or [0.0] * len(kinds[k]["QSORSA"])
                vals.append(sum(v) / len(v))
                allv += v
            lines.append(
                f"| {method} | "
                + " | ".join(f"{x:.1%}" for x in vals)
                + f" | **{sum(allv) / len(allv):.1%}** |"
            )
        lines.append("")
    return "\n".join(lines)


def decompose_cost(work: Path, layers: int) -> str:
    """Wall time and peak RSS of `sorsa decompose` at rank 128 on a Llama-2-7B-shaped checkpoint of
    `layers` layers (benchmarks/decompose.py's generator), plain and with --quantize nf4 at T = 1
    and 5, each in its own process (the library reports its own peak RSS)."""
    import json
    import subprocess

    from decompose import generate

    src = work / f"llama7b-synth-{layers}layers"
    generate(src, layers, 1)
    code = (
        "import json, sys; from sorsa_tools.decompose import decompose; "
        "r = decompose(sys.argv[1], 128, sys.argv[2], force=True, check_sample=0, **json.loads(sys.argv[3])); "
        "print(json.dumps({'s': r.seconds, 'rss': r.peak_rss_bytes}))"
    )
    rows = ["| decompose, rank 128 | wall time (s) | peak RSS (GiB) |", "|---|---|---|"]
    for label, opts in (
        ("plain (bf16 residual)", {}),
        ("--quantize nf4 --quant-iters 1", {"quantize": "nf4"}),
        ("--quantize nf4 --quant-iters 5", {"quantize": "nf4", "quant_iters": 5}),
    ):
        out = (
            subprocess.run(
                [sys.executable, "-c", code, str(src), str(work / "out-q"), json.dumps(opts)],
                check=True,
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        r = json.loads(out)
        rows.append(f"| {label} | {r['s']:.0f} | {r['rss'] / 2**30:.2f} |")
    return (
        f"**`sorsa decompose` cost, Llama-2-7B shapes, {layers} of 32 layers ({7 * layers} matrices, "
        "--check-sample 0)**\n\n" + "\n".join(rows) + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gemma", default=None, help="a Gemma 3 270M HF dir (examples/prepare_gemma3_270m.py)")
    ap.add_argument("--layers", default="0,5,11,17", help="decoder layers of --gemma to run")
    ap.add_argument("--llama7b", action="store_true", help="synthetic Llama-2-7B-shaped q/gate/down")
    ap.add_argument("--ranks", default="64,16")
    ap.add_argument("--iters", default="1,5")
    ap.add_argument("--format", default="nf4", choices=sorted(qz.FORMATS))
    ap.add_argument("--svd", default="exact", choices=sorted(SVDS), help="top-r SVD of every method")
    ap.add_argument("--decompose-layers", type=int, default=0, help="time decompose on this many 7B layers")
    ap.add_argument("--workdir", default=".bench")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    ranks = [int(x) for x in a.ranks.split(",")]
    iters = [int(x) for x in a.iters.split(",")]
    parts = []
    if a.gemma:
        layers = [int(x) for x in a.layers.split(",")]
        t = time.perf_counter()
        res = run(gemma_matrices(a.gemma, layers), a.format, ranks, iters, SVDS[a.svd])
        n = sum(len(v["QSORSA"]) for v in next(iter(res.values())).values())
        parts.append(
            table(
                f"Gemma 3 270M (real weights, float32), {a.format}, {a.svd} SVD, layers {a.layers} of 18: {n} matrices "
                f"({time.perf_counter() - t:.0f} s)",
                res,
            )
        )
    if a.llama7b:
        t = time.perf_counter()
        res = run(llama_matrices(), a.format, ranks, iters, SVDS[a.svd])
        parts.append(
            table(
                f"Llama-2-7B shapes (synthetic decaying spectrum, benchmarks/_common.py), {a.format}, "
                f"{a.svd} SVD "
                f"({time.perf_counter() - t:.0f} s)",
                res,
            )
        )
    if a.decompose_layers:
        work = Path(a.workdir).resolve()
        work.mkdir(exist_ok=True)
        parts.append(decompose_cost(work, a.decompose_layers))
    body = "\n".join(parts)
    print(body)
    if a.record:
        weights = " and ".join(
            n for n, on in (("Gemma 3 270M", a.gemma), ("Llama-2-7B shapes", a.llama7b)) if on
        )
        if weights:
            head = f"## Quantization error reduction, QSORSA vs QLoRA vs LoftQ, {weights} (`benchmarks/quantize.py`)"
            head += "\n\n" + (__doc__ or "").split("\n\n    python")[0].split("\n", 2)[2]
        else:
            head = "## `sorsa decompose --quantize` cost (`benchmarks/quantize.py`)"
        section = f"quantize-{a.format}-{'gemma' if a.gemma else ''}{'llama7b' if a.llama7b else ''}"
        record(section + ("-decompose" if a.decompose_layers else ""), head + "\n\n" + body)


if __name__ == "__main__":
    main()
