"""Decompose a Llama-2-7B-shaped checkpoint (32 layers, 4096/11008, vocab 32000, bf16, 3 shards,
random weights with a decaying spectrum) at rank 128 with `sorsa decompose`, and in the same run
PiSSA's offline init flow through PEFT, which is what users do today: load the whole model,
`get_peft_model(init_lora_weights="pissa_niter_4")`, save the adapter and the residual model.
PEFT's exact `"pissa"` flow takes about an hour here, so it is timed on one layer of the same
shapes and extrapolated to 32.

Each flow runs in its own process, which reports its wall time, peak RSS and (on a GPU) peak
GPU memory. With a CUDA GPU (`--device auto` finds it) every flow computes there: `sorsa
decompose --device cuda`, and PEFT's init on the model moved to the GPU.

    python benchmarks/decompose.py --workdir .bench --record          # this 2-core CPU
    python benchmarks/decompose.py --workdir /tmp/b --record          # the GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import decaying_matrix, record  # noqa: E402

from sorsa_tools.io.safetensors_file import StreamWriter, atomic_write_json  # noqa: E402

RANK = int(os.environ.get("SORSA_BENCH_RANK", "128"))
COLD = True  # whether every flow started from a dropped page cache
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}


def llama7b_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rope_theta": 10000.0,
    }


def generate(path: Path, layers: int, shards: int) -> None:
    """Write the synthetic checkpoint tensor by tensor (never all in memory)."""
    if (path / "config.json").exists():
        return
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = [("model.embed_tokens.weight", (32000, 4096))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (4096,)), (p + "post_attention_layernorm.weight", (4096,))]
        specs += [
            (
                p
                + ("self_attn." if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp.")
                + n
                + ".weight",
                SHAPES[n],
            )
            for n in PROJ
        ]
    specs += [("model.norm.weight", (4096,)), ("lm_head.weight", (32000, 4096))]
    total = sum(2 * torch.Size(s).numel() for _, s in specs)
    groups, cur, acc = [], [], 0
    for name, shape in specs:
        cur.append((name, shape))
        acc += 2 * torch.Size(shape).numel()
        if acc >= total / shards * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(cur)
            cur = []
    groups.append(cur)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        with StreamWriter(tmp / fname, [(n, "BF16", s) for n, s in group], {"format": "pt"}) as w:
            for name, shape in group:
                if len(shape) == 1:
                    t = torch.ones(shape)
                elif "embed" in name or "lm_head" in name:
                    t = torch.randn(shape, generator=g) * 0.02
                else:
                    t = decaying_matrix(*shape, g)
                w.write(name, t.to(torch.bfloat16))
                weight_map[name] = fname
            w.commit()
        print(f"generated {fname}", flush=True)
    atomic_write_json(
        tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
    atomic_write_json(tmp / "config.json", llama7b_config(layers))
    tmp.rename(path)


def child(flow: str, src: str, out: str, result: str, device: str = "cpu") -> None:
    """Runs one flow in this process; writes wall seconds and peak RSS to `result`."""
    t0 = time.perf_counter()
    extra = {}
    if flow == "sorsa":  # what `sorsa decompose` runs, minus its progress display (the CLI is thin)
        from sorsa_tools import decompose

        decompose(src, RANK, out, force=True, device=device)
        cfg = json.loads((Path(out) / "sorsa_config.json").read_text())
        extra["s_errors"] = {
            m: s["s_max_rel_error"] for m, s in cfg["modules"].items() if s.get("s_max_rel_error") is not None
        }
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, low_cpu_mem_usage=True)
        if device == "cuda":  # PEFT decomposes each weight where it lives
            model = model.to(device)
            torch.cuda.synchronize()
        t_load = time.perf_counter() - t0
        init = "pissa_niter_4" if flow == "pissa_niter_4" else "pissa"
        cfg = LoraConfig(
            r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=PROJ, init_lora_weights=init
        )
        t1 = time.perf_counter()
        peft_model = get_peft_model(model, cfg)
        if device == "cuda":
            torch.cuda.synchronize()
        extra["init_seconds"] = time.perf_counter() - t1
        extra["load_seconds"] = t_load
        sd = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
        extra["S"] = {}
        for k in sd:
            if k.endswith("lora_B.default.weight"):
                a = sd[k.replace("lora_B", "lora_A")].float()
                b = sd[k].float()
                m = k.split("base_model.model.", 1)[1].rsplit(".lora_B", 1)[0]
                extra["S"][m] = (b.norm(dim=0) * a.norm(dim=1)).tolist()  # scaling = alpha / r = 1
        t2 = time.perf_counter()
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(Path(out) / "adapter")
        residual = peft_model.unload()
        residual.save_pretrained(Path(out) / "residual")
        extra["save_seconds"] = time.perf_counter() - t2
    Path(result).write_text(
        json.dumps(
            {
                "seconds": time.perf_counter() - t0,
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak_gpu": torch.cuda.max_memory_allocated() if device == "cuda" else None,
                **extra,
            }
        )
    )


def run_child(flow: str, src: Path, out: Path, work: Path, device: str = "cpu") -> dict:
    res = work / f"result-{flow}-{src.name}.json"
    res.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    global COLD
    try:  # every flow starts from a cold page cache (needs root; skipped otherwise)
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        COLD = False
    print(f"running {flow} on {src.name} ...", flush=True)
    subprocess.run(
        [sys.executable, __file__, "--child", flow, str(src), str(out), str(res), device], check=True
    )
    shutil.rmtree(out, ignore_errors=True)
    r = json.loads(res.read_text())
    print(f"  {flow}: {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB", flush=True)
    return r


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:7])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=".bench")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--layers", type=int, default=32, help="fewer for a quick check (not recorded)")
    a = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    work = Path(a.workdir).resolve()
    work.mkdir(exist_ok=True)
    L = a.layers
    full = work / ("llama7b-synth" if L == 32 else f"llama7b-synth-{L}layers")
    one = work / "llama7b-synth-1layer"
    t = time.perf_counter()
    generate(full, L, 3)
    generate(one, 1, 1)
    print(f"checkpoints ready ({time.perf_counter() - t:.0f} s)", flush=True)

    ours = run_child("sorsa", full, work / "out-sorsa", work, device)
    rows = [
        (
            "sorsa decompose (defaults: block Krylov, blocks of r, 4+ steps to tol 5e-4)",
            ours["seconds"],
            ours["peak_rss"],
            ours["peak_gpu"],
            False,
        )
    ]
    s_err = ours["s_errors"]
    peft_err = {}
    if not a.skip_peft:
        niter4 = run_child("pissa_niter_4", full, work / "out-peft", work, device)
        rows.append(
            (
                "PEFT pissa_niter_4 (load, init, save)",
                niter4["seconds"],
                niter4["peak_rss"],
                niter4["peak_gpu"],
                False,
            )
        )
        exact1 = run_child("pissa", one, work / "out-peft1", work, device)
        est = niter4["load_seconds"] + niter4["save_seconds"] + L * exact1["init_seconds"]
        rows.append((f"PEFT pissa exact (1 layer timed, x{L})", est, None, None, True))
        from sorsa_tools.io.checkpoint import open_checkpoint
        from sorsa_tools.svd import exact_singular_values

        ck = open_checkpoint(full)
        for m in s_err:
            w = ck.shard_of(m + ".weight").read_tensor(m + ".weight").float()
            e = exact_singular_values(w)[:RANK].double()
            p = torch.tensor(niter4["S"][m], dtype=torch.float64).sort(descending=True).values
            peft_err[m] = float(((p - e).abs() / e).max())
    cuda = device == "cuda"
    size = sum(p.stat().st_size for p in full.glob("*.safetensors"))
    where = f"GPU ({torch.cuda.get_device_name(0)})" if cuda else f"{os.cpu_count()}-core CPU"
    lines = [
        "## Decompose a Llama-2-7B-shaped checkpoint at rank 128 (`benchmarks/decompose.py`)",
        "",
        f"{7 * L} projection matrices, bf16, 3 shards ({size / 1e9:.1f} GB), computed on the {where}; page cache dropped "
        f"before each flow: {'yes' if COLD else 'no (not permitted here)'}.",
        "",
        "| flow | wall time | peak RSS |" + (" peak GPU memory |" if cuda else "") + " time vs sorsa |",
        "|---|---|---|" + ("---|" if cuda else "") + "---|",
    ]
    for name, sec, rss, gpu, est in rows:
        rss_s = f"{rss / 2**30:.2f} GiB" if rss else "n/a"
        gpu_s = (f" {gpu / 2**30:.2f} GiB |" if gpu else " n/a |") if cuda else ""
        lines.append(
            f"| {name} | {'~' if est else ''}{sec / 60:.1f} min | {rss_s} |{gpu_s} {sec / ours['seconds']:.2f}x |"
        )
    lines += [
        "",
        "| sampled module | sorsa: max rel. error of top-128 S | PEFT pissa_niter_4 |",
        "|---|---|---|",
    ]
    for m, e in s_err.items():
        lines.append(f"| {m} | {e:.2e} | {peft_err.get(m, float('nan')):.2e} |")
    body = "\n".join(lines)
    print(body)
    if a.record and L == 32:
        record("decompose_7b" + ("_cuda" if cuda else ""), body)


if __name__ == "__main__":
    main()
