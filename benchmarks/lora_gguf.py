"""A llama.cpp LoRA adapter (`sorsa export-lora --to gguf`) over the ORIGINAL model's GGUF, against
the merged GGUF of the same run (`sorsa merge --to gguf`), on a real checkpoint.

    python examples/prepare_gemma3_270m.py out/gemma3-270m         (once: the real Gemma 3 270M)
    python benchmarks/lora_gguf.py --model out/gemma3-270m --workdir .bench-lora --record

The run is DIR's adapter moved as training would move it (each S_i scaled by 1 + U(0, 0.2), U
moved by 10 % of its entries' size, seeded): what is measured is the export, not the training.
Both sides run in llama.cpp (llama-cpp-python) on the same token ids of GSM-8K text: base GGUF +
adapter against the merged GGUF, max |dlogit| and top-1 agreement over every position, for each
adapter outtype (base and merged in f32), and the deployment pair f16 base + f16 adapter against
the f16 merge.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GSM = ROOT / "examples" / "data" / "gsm8k_train_256.jsonl"


def fake_run(dec: Path, run: Path, seed: int = 1) -> Path:
    """DIR's adapter moved as training moves it, saved as a finished-looking `sorsa train` run."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sorsa_tools.format import ADAPTER_FILE, CONFIG_FILE, factor_names

    cfg = json.loads((dec / CONFIG_FILE).read_text())
    run.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    with safe_open(dec / ADAPTER_FILE, "pt") as f:
        meta, ts = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for m in cfg["target_modules"]:
        nU, nS, _ = factor_names(m)
        U, S = ts[nU], ts[nS]
        ts[nS] = S * (1 + 0.2 * torch.rand(S.shape, generator=g, dtype=S.dtype))
        ts[nU] = U + 0.1 * float(U.std()) * torch.randn(U.shape, generator=g, dtype=U.dtype)
    save_file(ts, run / ADAPTER_FILE, metadata=meta)
    run_cfg = {
        "format_version": cfg["format_version"],
        "kind": "trained",
        "rank": cfg["rank"],
        "target_modules": cfg["target_modules"],
        "base_model": cfg["base_model"],
        "decomposition": {"job_id": cfg["job_id"], "path": str(dec)},
        "training": {"steps": 0, "note": "benchmarks/lora_gguf.py: perturbed, not trained"},
    }
    (run / CONFIG_FILE).write_text(json.dumps(run_cfg))
    return run


def logits(model: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    import llama_cpp

    kw = {"lora_path": str(lora)} if lora is not None else {}
    llm = llama_cpp.Llama(
        model_path=str(model), logits_all=True, type_k=0, type_v=0, verbose=False, n_ctx=256, **kw
    )
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)])
    llm.close()
    return out


def main() -> None:
    from transformers import AutoTokenizer

    from sorsa_tools import decompose
    from sorsa_tools.gguf_export import export_gguf
    from sorsa_tools.gguf_lora import export_lora_gguf
    from sorsa_tools.source import MergedSource, provenance

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="an HF checkpoint dir (e.g. out/gemma3-270m)")
    ap.add_argument("--workdir", default=".bench-lora")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    dec = work / f"dec-r{args.rank}"
    decompose(args.model, args.rank, dec, check_sample=0)
    run = fake_run(dec, work / "run")
    ggufs = {}
    for what, src in (("base", MergedSource(dec)), ("merged", MergedSource(dec, run))):
        for ot in ("f32", "f16"):
            ggufs[what, ot] = export_gguf(
                src, work / f"{what}.{ot}.gguf", ot, force=True, provenance=provenance(src)
            ).path
    lines = [json.loads(x) for x in GSM.read_text().splitlines()[:2]]
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(" ".join(t for rec in lines for t in (rec["question"], rec["answer"])))["input_ids"][
        : args.tokens
    ]
    merged32, base32 = logits(ggufs["merged", "f32"], ids), logits(ggufs["base", "f32"], ids)
    moved = float(np.abs(merged32 - base32).max())
    moved_top1 = float((merged32.argmax(-1) == base32.argmax(-1)).mean())
    rows = []
    for ot in ("f32", "f16", "bf16", "q8_0"):
        r = export_lora_gguf(
            dec, run, work / f"lora.{ot}.gguf", outtype=ot, base=ggufs["base", "f32"], force=True
        )
        got = logits(ggufs["base", "f32"], ids, r.path)
        rows.append((f"f32 base + {ot} adapter", "f32 merge", r.bytes, got, merged32, r.max_check_error))
    r16 = export_lora_gguf(
        dec, run, work / "lora.f16.gguf", outtype="f16", base=ggufs["base", "f16"], force=True
    )
    rows.append(
        ("f16 base + f16 adapter", "f16 merge", r16.bytes, logits(ggufs["base", "f16"], ids, r16.path),
         logits(ggufs["merged", "f16"], ids), r16.max_check_error)
    )  # fmt: skip
    name = Path(args.model).resolve().name
    body = [
        "## LoRA adapter GGUF over the original GGUF vs the merged GGUF (`benchmarks/lora_gguf.py`)\n",
        f"{name}, SORSA rank {args.rank} (LoRA rank {2 * args.rank}, {len(json.loads((dec / 'sorsa_config.json').read_text())['target_modules'])} "
        f"modules), a perturbed run; {len(ids)} tokens of GSM-8K text, every position compared, all in "
        f"llama.cpp. The run moves the logits by up to {moved:.2f} (top-1 changed at "
        f"{1 - moved_top1:.0%} of positions) against the original model.\n",
        "| llama.cpp runs | against | adapter size | max abs dlogit | top-1 agreement | export's own check |",
        "|---|---|---|---|---|---|",
    ]
    for label, ref, size, got, want, chk in rows:
        err, top1 = float(np.abs(got - want).max()), float((got.argmax(-1) == want.argmax(-1)).mean())
        body.append(f"| {label} | {ref} | {size / 2**20:.1f} MiB | {err:.2e} | {top1:.3f} | {chk:.1e} |")
        print(body[-1])
    if args.record:
        record("lora_gguf", "\n".join(body))


if __name__ == "__main__":
    main()
