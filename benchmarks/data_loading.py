"""--data on a large table: sorsa's loader against reading it whole with `datasets` and `.map`.

A Parquet file of N MetaMathQA-shaped rows (query, response; GSM-8K text, varied per row) is read
three ways, each in its own process so that its peak RSS is its own:

- `sorsa`: sorsa_tools.data.Dataset (one scan: validate, tokenize, keep a key and a length per
  row), then 200 random batches read back by key, as training does;
- `datasets .map (in memory)`: `load_dataset("parquet", keep_in_memory=True)` and a batched
  `.map` of the same tokenization, kept in memory (what "read it whole" means);
- `datasets .map (cache)`: the same with datasets' defaults (Arrow cache files on disk).

Then `sorsa train` on a tiny model over the same file, with the RSS at its first and last steps:
what a 100K-row run costs in memory beyond the model.

    python benchmarks/data_loading.py --rows 100000 --record
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def make_parquet(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = [
        json.loads(x) for x in (ROOT / "examples" / "data" / "gsm8k_train_256.jsonl").read_text().splitlines()
    ]
    writer = None
    for start in range(0, rows, 10_000):
        n = min(10_000, rows - start)
        batch = {
            "query": [f"(#{start + i}) " + src[(start + i) % len(src)]["question"] for i in range(n)],
            "response": [src[(start + i) % len(src)]["answer"] for i in range(n)],
        }
        t = pa.table(batch)
        writer = writer or pq.ParquetWriter(path, t.schema)
        writer.write_table(t)
    writer.close()


def flow_sorsa(data: str, tok_dir: str) -> dict:
    from transformers import AutoTokenizer

    from sorsa_tools.data import Dataset

    tok = AutoTokenizer.from_pretrained(tok_dir)
    base = rss_mib()
    t = time.perf_counter()
    ds = Dataset(data, tok, max_length=512)
    scan = time.perf_counter() - t
    rng = random.Random(0)
    t = time.perf_counter()
    for _ in range(200):
        ds.collate([[rng.randrange(len(ds))] for _ in range(8)])
    read = time.perf_counter() - t
    return {"rows": len(ds), "seconds": scan, "read_200_batches_s": read, "rss_before": base}


def flow_map(data: str, tok_dir: str, in_memory: bool) -> dict:
    import datasets
    from transformers import AutoTokenizer

    from sorsa_tools.prompts import PAPER_TEMPLATE

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    base = rss_mib()
    t = time.perf_counter()
    d = datasets.load_dataset("parquet", data_files=[data], split="train", keep_in_memory=in_memory)

    def tokenize(b):
        texts = [
            PAPER_TEMPLATE.format(question=q) + " " + r
            for q, r in zip(b["query"], b["response"], strict=True)
        ]
        return tok(texts, truncation=True, max_length=512)

    d = d.map(tokenize, batched=True, keep_in_memory=in_memory, remove_columns=["query", "response"])
    return {"rows": len(d), "seconds": time.perf_counter() - t, "rss_before": base}


def flow_train(data: str, dec: str, out: str, steps: int) -> dict:
    from sorsa_tools.train import TrainConfig, TrainProgress, train

    seen: dict[int, float] = {}

    class Sample(TrainProgress):
        def step(self, record: dict) -> None:
            seen[record["step"]] = rss_mib()

    base = rss_mib()
    t = time.perf_counter()
    train(
        dec,
        data,
        out,
        config=TrainConfig(batch_size=8, max_steps=steps, max_length=384),
        device="cpu",
        progress=Sample(),
        save_every=10**9,
    )
    first, last = min(seen), max(seen)
    return {
        "rows": None,
        "seconds": time.perf_counter() - t,
        "rss_before": base,
        "rss_first_step": seen[first],
        "rss_last_step": seen[last],
        "steps": last,
    }


def child(args) -> None:
    kind = args.child
    if kind == "sorsa":
        res = flow_sorsa(args.data, args.tok)
    elif kind.startswith("map"):
        res = flow_map(args.data, args.tok, kind == "map-memory")
    else:
        res = flow_train(args.data, args.dec, args.out, args.steps)
    res["peak_rss"] = peak_rss_mib()
    print("RESULT " + json.dumps(res))


def run_child(kind: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", kind] + [a for k, v in kw.items() for a in (f"--{k}", str(v))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--tokenizer", default=str(ROOT / "out" / "gemma3-270m"), help="a real tokenizer dir")
    ap.add_argument("--steps", type=int, default=200, help="training steps of the tiny-model run")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--child")
    ap.add_argument("--data")
    ap.add_argument("--tok")
    ap.add_argument("--dec")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.child:
        return child(a)
    work = Path(tempfile.mkdtemp(prefix="sorsa-data-bench-"))
    data = work / f"rows{a.rows}.parquet"
    make_parquet(data, a.rows)
    mib = data.stat().st_size / 2**20
    res = {
        "sorsa Dataset (scan)": run_child("sorsa", data=data, tok=a.tokenizer),
        "datasets + .map, in memory": run_child("map-memory", data=data, tok=a.tokenizer),
        "datasets + .map, Arrow cache": run_child("map-cache", data=data, tok=a.tokenizer),
    }
    from conftest import make_tiny_lm

    from sorsa_tools import decompose

    src = make_tiny_lm(work / "tiny")
    decompose(str(src), 8, work / "tiny-sorsa", svd="exact", check_sample=0)
    tr = run_child("train", data=data, dec=work / "tiny-sorsa", out=work / "run", steps=a.steps)
    rows = [
        "| flow | rows/s | seconds | RSS before (MiB) | peak RSS (MiB) | peak - before |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        rows.append(
            f"| {name} | {a.rows / r['seconds']:,.0f} | {r['seconds']:.1f} | {r['rss_before']:.0f} | "
            f"{r['peak_rss']:.0f} | {r['peak_rss'] - r['rss_before']:.0f} |"
        )
    s, m = res["sorsa Dataset (scan)"], res["datasets + .map, in memory"]
    ratio = (m["peak_rss"] - m["rss_before"]) / max(1.0, s["peak_rss"] - s["rss_before"])
    body = (
        f"### --data on a {a.rows:,}-row Parquet file ({mib:.0f} MiB; MetaMathQA's columns, GSM-8K text)\n\n"
        f"Tokenizer: Gemma 3's (262k vocabulary), paper template, max length 512.\n\n"
        + "\n".join(rows)
        + f"\n\nMemory the loader adds (peak - before): datasets + .map in memory / sorsa = {ratio:.1f}x. "
        f"sorsa's scan speed / in-memory .map's = {m['seconds'] / s['seconds']:.2f}x. After its scan, sorsa "
        f"read 200 random batches of 8 back by key in {s['read_200_batches_s']:.1f} s (peak RSS above includes them).\n\n"
        f"`sorsa train` (tiny 2-layer model, batch 8, {tr['steps']} steps) over the same file: RSS "
        f"{tr['rss_first_step']:.0f} MiB at step 1 and {tr['rss_last_step']:.0f} MiB at step {tr['steps']} "
        f"(peak {tr['peak_rss']:.0f} MiB, {tr['seconds']:.0f} s in all, the scan included).\n"
    )
    print(body)
    if a.record:
        from _common import record

        record("data_loading", body)


if __name__ == "__main__":
    main()
