"""`sorsa merge --to hf` and `--to gguf --outtype f16` on the Llama-2-7B-shaped checkpoint, against
the disk's own read+write time for the same bytes (the floor) and llama.cpp's convert_hf_to_gguf.py.

    python benchmarks/decompose.py --workdir .bench            (makes .bench/llama7b-synth once)
    sorsa decompose .bench/llama7b-synth --rank 128 -o .bench/llama7b-synth-sorsa-r128
    python benchmarks/merge_export.py --workdir .bench --record

Each job runs in its own process (wall time and that process's peak RSS from wait4). The page
cache is dropped before every job when this user may (root), so every job starts from the disk.
The synthetic checkpoint has no tokenizer; a Llama-style byte-fallback BPE of exactly vocab_size
tokens, trained on GSM-8K text, is written into the decomposed dir first (both converters need
one, and the vocab is part of a GGUF). llama.cpp's converter comes from the llama-cpp-python
sdist (`pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps`), run with its own
gguf-py on the merged HF dir: the same f16 GGUF from the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GSM = [ROOT / "examples" / "data" / "gsm8k_train_256.jsonl", ROOT.parent / "shared/data/gsm8k/train.jsonl"]
CHUNK = 64 * 2**20


def llama_hf_tokenizer(out: Path, vocab_size: int) -> None:
    """A Llama-2-style tokenizer.json (BPE, byte fallback, metaspace) with exactly vocab_size tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    texts = []
    for p in GSM:
        if p.exists():
            for line in p.read_text().splitlines():
                rec = json.loads(line)
                texts += [rec["question"], rec["answer"]]
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = None
    tk.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    tk.train_from_iterator(texts, trainer)
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    # byte tokens are ordinary vocab entries in Llama's tokenizer, not added tokens
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] in ("<unk>", "<s>", "</s>")]
    for i in range(len(vocab), vocab_size):  # pad to the embedding size with unreachable pieces
        vocab[f"<extra_{i}>"] = i
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
                "model_max_length": 4096,
            }
        )
    )


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd in a child process: wall seconds and that child's peak RSS (wait4)."""
    dropped = drop_caches()
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{out.decode()[-3000:]}")
    return {"seconds": seconds, "peak_rss": ru.ru_maxrss * 1024, "cold_cache": dropped}


def copy_floor(src_dir: Path, dst_dir: Path) -> None:
    """Read every weight byte of src_dir and write it to dst_dir, fsynced: what any merge must do."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for p in sorted(src_dir.glob("model*.safetensors")):
        with open(p, "rb") as fi, open(dst_dir / p.name, "wb") as fo:
            while block := fi.read(CHUNK):
                fo.write(block)
            fo.flush()
            os.fsync(fo.fileno())


def converter(work: Path) -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py and its gguf-py, unpacked from the llama-cpp-python sdist."""
    dest = work / "llama.cpp-convert"
    if (dest / "convert_hf_to_gguf.py").exists():
        return dest
    sdists = sorted((work / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        return None
    with tarfile.open(sdists[-1]) as tar:
        members = [
            m
            for m in tar.getmembers()
            if "/vendor/llama.cpp/" in m.name
            and (
                m.name.endswith("/convert_hf_to_gguf.py")
                or any(f"/vendor/llama.cpp/{d}/" in m.name for d in ("gguf-py", "conversion"))
            )
        ]
        tar.extractall(work / "sdist-x", members=members, filter="data")
    root = next((work / "sdist-x").glob("*/vendor/llama.cpp"))
    dest.mkdir()
    shutil.copy(root / "convert_hf_to_gguf.py", dest)
    shutil.copytree(root / "gguf-py", dest / "gguf-py")
    if (root / "conversion").is_dir():  # newer converters import their per-model code from here
        shutil.copytree(root / "conversion", dest / "conversion")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=".bench")
    ap.add_argument("--dir", default=None, help="decomposed dir [default: WORKDIR/llama7b-synth-sorsa-r128]")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of jobs to skip: floor,hf,gguf,converter")
    args = ap.parse_args()
    work = Path(args.workdir)
    dec = Path(args.dir or work / "llama7b-synth-sorsa-r128")
    if not (dec / "sorsa_config.json").exists():
        raise SystemExit(f"{dec} is not a finished decomposition; see this script's docstring")
    cfg = json.loads((dec / "config.json").read_text())
    if not (dec / "tokenizer.json").exists():
        llama_hf_tokenizer(dec, cfg["vocab_size"])
    skip = set(filter(None, args.skip.split(",")))
    weights = sum(p.stat().st_size for p in dec.glob("model*.safetensors"))
    merged, ours, theirs = work / "merged-hf", work / "ours.f16.gguf", work / "llamacpp.f16.gguf"
    sorsa = [sys.executable, "-m", "sorsa_tools.cli"]
    result_file = work / "merge-export-result.json"
    rows: dict[str, dict] = json.loads(result_file.read_text()) if result_file.exists() else {}

    started = time.strftime("%Y-%m-%d %H:%M")

    def done(name: str, r: dict) -> None:  # saved after every job: a later --skip shows it, marked
        rows[name] = {**r, "when": started}
        result_file.write_text(json.dumps(rows, indent=1))

    if "floor" not in skip:
        floor_dir = work / "floor-copy"
        shutil.rmtree(floor_dir, ignore_errors=True)
        done(
            "disk floor (read + write + fsync)",
            timed(
                [
                    sys.executable,
                    "-c",
                    f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"from merge_export import copy_floor; from pathlib import Path; "
                    f"copy_floor(Path({str(dec)!r}), Path({str(floor_dir)!r}))",
                ]
            ),
        )
        shutil.rmtree(floor_dir, ignore_errors=True)
    if "hf" not in skip:
        shutil.rmtree(merged, ignore_errors=True)
        done("sorsa merge --to hf", timed([*sorsa, "merge", str(dec), "-o", str(merged)]))
    if "gguf" not in skip:
        ours.unlink(missing_ok=True)
        done(
            "sorsa merge --to gguf --outtype f16",
            timed([*sorsa, "merge", str(dec), "--to", "gguf", "--outtype", "f16", "-o", str(ours)]),
        )
        ours.unlink(missing_ok=True)
    conv = converter(work)
    if "converter" not in skip and conv is not None and merged.exists():
        theirs.unlink(missing_ok=True)
        done(
            "llama.cpp convert_hf_to_gguf.py --outtype f16 (on the merged dir)",
            timed(
                [
                    sys.executable,
                    str(conv / "convert_hf_to_gguf.py"),
                    str(merged),
                    "--outtype",
                    "f16",
                    "--outfile",
                    str(theirs),
                ],
                env={"PYTHONPATH": str(conv / "gguf-py"), "NO_LOCAL_GGUF": ""},
            ),
        )
        theirs.unlink(missing_ok=True)
    elif "converter" not in skip:
        print("llama.cpp converter not run: needs the sdist in WORKDIR/sdist and the merged HF dir")

    floor = rows.get("disk floor (read + write + fsync)", {}).get("seconds")
    conv_s = next((v["seconds"] for k, v in rows.items() if k.startswith("llama.cpp")), None)
    lines = [
        f"Llama-2-7B-shaped checkpoint (bf16, 32 layers, {weights / 1e9:.1f} GB of weights), rank 128 on "
        "all seven projections, DIR's own adapter (the same work as a trained one).",
        "",
        "| job | wall s | x disk floor | x llama.cpp converter | peak RSS GiB |",
        "|---|---:|---:|---:|---:|",
    ]
    earlier = [k for k, v in rows.items() if v.get("when") != started]
    for k, v in rows.items():
        xf = f"{v['seconds'] / floor:.2f}" if floor else "n/a"
        xc = f"{v['seconds'] / conv_s:.2f}" if conv_s and "gguf" in k else ""
        name = k + (f" (earlier run, {v.get('when', 'date unknown')})" if k in earlier else "")
        lines.append(f"| {name} | {v['seconds']:.1f} | {xf} | {xc} | {v['peak_rss'] / 2**30:.2f} |")
    cold = all(v["cold_cache"] for v in rows.values())
    lines += ["", f"Page cache dropped before each job: {'yes' if cold else 'no (not root)'}."]
    table = "\n".join(lines)
    print(table)
    if args.record and earlier:
        raise SystemExit(
            f"not recorded: {', '.join(earlier)} came from an earlier run; rerun without --skip to record one run"
        )
    if args.record:
        record(
            "merge_export",
            "## Merge and GGUF export of a Llama-2-7B-shaped checkpoint (`benchmarks/merge_export.py`)\n\n"
            + table,
        )


if __name__ == "__main__":
    main()
