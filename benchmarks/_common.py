"""Shared by the benchmark scripts: synthetic weights with a realistic spectrum, machine facts,
and recording a result section in docs/BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def decaying_matrix(
    out_f: int, in_f: int, gen: torch.Generator, k: int = 512, alpha: float = 0.6
) -> torch.Tensor:
    """A random (out, in) float32 matrix whose spectrum decays like real LLM weights.

    A power-law part of rank k (s_i ~ i^-alpha: neighbouring singular values around r = 128
    differ by ~0.5 %, like the nearly degenerate spectra of real checkpoints) plus a Gaussian
    bulk (the Marchenko-Pastur tail every trained matrix has).
    """
    k = min(k, out_f, in_f)
    s = torch.arange(1, k + 1, dtype=torch.float32).pow(-alpha)
    a = torch.randn(out_f, k, generator=gen) / out_f**0.5
    b = torch.randn(k, in_f, generator=gen) / in_f**0.5
    w = (a * s) @ b
    w += torch.randn(out_f, in_f, generator=gen) * (0.25 * float(s[-1]) / max(out_f, in_f) ** 0.5)
    return w * 0.02 / float(w.std())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM{gpu}; torch {torch.__version__}"


def record(
    section: str,
    body: str,
    doc: Path = DOC,
    header: str = "# Benchmarks\n\nEvery table here is written by a script in `benchmarks/`.\n",
) -> None:
    """Replace (or add) the section `section` of `doc` (docs/BENCHMARKS.md) with body + provenance;
    a new file starts with `header`."""
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    block = (
        f"<!-- BEGIN {section} -->\n{body.rstrip()}\n\n"
        f"Command: `{cmd}`  \nMachine: {machine()}  \nDate: {stamp}\n<!-- END {section} -->"
    )
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else header
    pat = re.compile(rf"<!-- BEGIN {re.escape(section)} -->.*?<!-- END {re.escape(section)} -->", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
