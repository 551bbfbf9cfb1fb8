"""How much of a gap between two fine-tunes is the training seed's? Reads the kept results of the
same gsm8k_study runs made with other seeds (one workdir per seed: the seed changes the data order
and PEFT's random init), and prints each run's test NLL per seed with mean and spread, and each
run's gap to the first run per seed with a t interval over the seeds.

    python examples/seed_spread.py out/gsm8k-study-short out/gsm8k-study-short-seed1 \\
        out/gsm8k-study-short-seed2 --runs lora-lr3e-04,sorsa-lr1e-04-g4e-04,pissa-lr1e-04 \\
        --section seed_spread_short --record

The paired interval of gsm8k_study's report covers the choice of test questions; this covers the
choice of seed. A gap is a finding only when it is larger than both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import record  # noqa: E402

DOC = ROOT / "docs" / "RESULTS.md"
HEADER = "# Results\n"
# two-sided 97.5 % quantiles of Student's t for 1..9 degrees of freedom
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262]


class SpreadError(Exception):
    """The workdirs or runs do not make a seed comparison."""


def load(workdirs: list[Path], runs: list[str]) -> dict[str, dict[int, dict]]:
    """run -> seed -> kept result; every workdir must hold every run, at settings that differ in
    the seed only (else the spread would be of something else)."""
    out: dict[str, dict[int, dict]] = {r: {} for r in runs}
    ref = None
    for w in workdirs:
        for r in runs:
            f = w / "results" / f"{r}.json"
            if not f.is_file():
                raise SpreadError(f"{f}: no kept result: run it with gsm8k_study.py --workdir {w} first")
            res = json.loads(f.read_text())
            settings = dict(res["settings"])
            seed = settings.pop("seed")
            if ref is None:
                ref = (f, settings)
            elif settings != ref[1]:
                diff = sorted(k for k in settings.keys() | ref[1].keys() if settings.get(k) != ref[1].get(k))
                raise SpreadError(
                    f"{f} and {ref[0]} differ in {', '.join(diff)}, not only the seed: compare runs of one setup"
                )
            if seed in out[r]:
                raise SpreadError(f"{f}: seed {seed} twice for {r}: give each seed's workdir once")
            out[r][seed] = res
    return out


def mean_sd(xs: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None


def t_interval(xs: list[float]) -> tuple[float, float] | None:
    """95 % t interval of the mean (None for one value)."""
    if len(xs) < 2:
        return None
    m, sd = mean_sd(xs)
    h = T975[min(len(xs) - 2, len(T975) - 1)] * sd / len(xs) ** 0.5
    return m - h, m + h


def table(data: dict[str, dict[int, dict]]) -> str:
    runs = list(data)
    seeds = sorted(data[runs[0]])
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [
        f"Test NLL (nats per answer token) of each run per seed, over {len(seeds)} seeds (the seed sets the "
        "data order and PEFT's random init; SORSA's and PiSSA's SVD init has none):",
        "",
        f"| run | {head} | mean | sd | val NLL mean |",
        "|---|" + "---|" * (len(seeds) + 3),
    ]
    for r in runs:
        xs = [data[r][s]["nll"] for s in seeds]
        m, sd = mean_sd(xs)
        val = statistics.fmean(data[r][s]["val_nll"] for s in seeds)
        lines.append(
            f"| {r} | " + " | ".join(f"{x:.4f}" for x in xs) + f" | {m:.4f} | "
            f"{'-' if sd is None else f'{sd:.4f}'} | {val:.4f} |"
        )
    ref = runs[0]
    lines += [
        "",
        f"Gap to {ref} per seed (same seed: same batches), with the 95 % t interval of its mean over seeds:",
        "",
        f"| run | {head} | mean gap | 95 % interval |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for r in runs[1:]:
        gaps = [data[r][s]["nll"] - data[ref][s]["nll"] for s in seeds]
        ci = t_interval(gaps)
        lines.append(
            f"| {r} | "
            + " | ".join(f"{g:+.4f}" for g in gaps)
            + f" | {statistics.fmean(gaps):+.4f} | "
            + ("-" if ci is None else f"{ci[0]:+.4f} to {ci[1]:+.4f}")
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdirs", nargs="+", type=Path, help="gsm8k_study workdirs, one per seed")
    ap.add_argument("--runs", required=True, help="run names, comma-separated; gaps are to the first")
    ap.add_argument("--section", default="seed_spread", help="the RESULTS.md section to write")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--doc", type=Path, default=DOC)
    a = ap.parse_args(argv)
    runs = [r for r in a.runs.split(",") if r]
    try:
        data = load(a.workdirs, runs)
    except SpreadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    body = f"## Seed spread ({a.section})\n\n" + table(data)
    print(body)
    if a.record:
        record(a.section, body, doc=a.doc, header=HEADER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
