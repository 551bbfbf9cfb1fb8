"""What llama.cpp expects, per architecture and per output type, as data.

The exporter reads these tables and has no per-architecture branches of its own: adding an
architecture llama.cpp already runs means adding one `ArchSpec` row (and checking it against
llama.cpp's converter and the runtime's logits, as tests/test_gguf_export.py does for each row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gguf

T = gguf.GGMLQuantizationType
F = gguf.LlamaFileType


@dataclass(frozen=True)
class ArchSpec:
    """How one HF model family becomes one llama.cpp architecture."""

    gguf_arch: gguf.MODEL_ARCH
    # llama.cpp's LLM_ARCH_LLAMA applies RoPE to adjacent pairs; HF rotates the two halves of each
    # head. The converter reorders q/k rows (and biases) so both give the same product.
    permute_qk: bool = False
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp multiplies by w, so w + 1 is stored.
    norm_shift: float = 0.0
    # Gemma 2/3 scale attention by query_pre_attn_scalar**-0.5 where llama.cpp uses head_dim**-0.5
    # (n_embd / n_head for the 27B, told apart by its layer count): the ratio is folded into this
    # tensor, a per-row scale of the queries (Gemma 3's q_norm; Gemma 2 has none, so q itself)
    query_scale_into: str | None = None
    wide_scale_layers: int | None = None
    # per-layer sliding-window attention (written as window + per-layer pattern + SWA rope base)
    sliding_window: bool = False
    # llama.cpp's graph fixes the layout instead (every n-th layer global, the first sliding):
    # only the window is written, and a config with another layout is refused
    swa_fixed_period: int | None = None
    # HF config keys written under the same GGUF name ({arch}.KEY) when set
    softcaps: tuple[str, ...] = ()
    # HF config keys that must hold one of these values for llama.cpp's graph to be the same network
    requires: dict[str, tuple] = field(default_factory=dict)
    # HF config keys that must be set: llama.cpp's graph always applies them
    needs: tuple[str, ...] = ()
    # an HF config key for a sliding window that llama.cpp's graph for this family does not apply:
    # the export goes ahead (as llama.cpp's converter does) with a warning naming the window
    ignored_window_key: str | None = None
    # Phi-3's longrope scaling: rope_factors_long / _short tensors and rope.scaling.attn_factor
    longrope: bool = False
    # tensor-name prefixes of a multimodal wrapper, rewritten to the text model's
    prefix_rewrites: tuple[tuple[str, str], ...] = ()
    skip_prefixes: tuple[str, ...] = ()
    # tokenizer.json byte-level BPE is llama.cpp's "gpt2"; "llama" marks a sentencepiece family
    family_tokenizer: str = "gpt2"


_GEMMA3 = ArchSpec(
    gguf.MODEL_ARCH.GEMMA3,
    norm_shift=1.0,
    query_scale_into="attn_q_norm.weight",
    wide_scale_layers=62,
    sliding_window=True,
    softcaps=("final_logit_softcapping",),
    # llama.cpp's gemma3 loader takes no attention biases (released Gemma 3 has none)
    requires={"attn_logit_softcapping": (None,), "attention_bias": (None, False)},
    prefix_rewrites=(
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    ),
    skip_prefixes=(
        "model.vision_tower.",
        "vision_tower.",
        "model.multi_modal_projector.",
        "multi_modal_projector.",
    ),
    family_tokenizer="llama",
)

# HF model_type -> how to export it. One row per supported family.
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True, family_tokenizer="llama"),
    # Mistral 7B v0.1 attends within 4096 tokens; llama.cpp's llama graph attends to everything
    "mistral": ArchSpec(
        gguf.MODEL_ARCH.LLAMA, permute_qk=True, family_tokenizer="llama", ignored_window_key="sliding_window"
    ),
    # llama.cpp's qwen2/qwen3 graphs have no sliding window (released Qwen configs leave it off);
    # its qwen3 loader takes no attention biases (released Qwen3 has none): a file with them
    # would fail to load ("wrong number of tensors")
    "qwen2": ArchSpec(gguf.MODEL_ARCH.QWEN2, requires={"use_sliding_window": (None, False)}),
    "qwen3": ArchSpec(
        gguf.MODEL_ARCH.QWEN3, requires={"use_sliding_window": (None, False), "attention_bias": (None, False)}
    ),
    # Gemma 1 (the paper's Gemma 7B): llama.cpp's gemma graph takes no biases (Gemma has none)
    "gemma": ArchSpec(
        gguf.MODEL_ARCH.GEMMA,
        norm_shift=1.0,
        requires={"attention_bias": (None, False)},
        family_tokenizer="llama",
    ),
    # Gemma 2: logit soft-capping (both, always applied by llama.cpp), alternating sliding window,
    # post-attention and post-FFN norms (named by gguf's tensor map)
    "gemma2": ArchSpec(
        gguf.MODEL_ARCH.GEMMA2,
        norm_shift=1.0,
        query_scale_into="attn_q.weight",
        wide_scale_layers=46,
        swa_fixed_period=2,
        softcaps=("attn_logit_softcapping", "final_logit_softcapping"),
        requires={"attention_bias": (None, False)},
        needs=("attn_logit_softcapping", "final_logit_softcapping", "sliding_window"),
        family_tokenizer="llama",
    ),
    # Phi-3: qkv_proj and gate_up_proj stay fused (llama.cpp's attn_qkv / ffn_up split them the way
    # transformers does: q, k, v rows; gate rows, then up rows); NEOX RoPE, so no q/k reorder. Its
    # sliding window is switched off in llama.cpp's phi3 graph
    "phi3": ArchSpec(
        gguf.MODEL_ARCH.PHI3, ignored_window_key="sliding_window", longrope=True, family_tokenizer="llama"
    ),
    "gemma3_text": _GEMMA3,
    "gemma3": _GEMMA3,  # Gemma3ForConditionalGeneration: its text_config, vision tower left out
}

# llama.cpp's vocabulary loader gives the tokens of the second tuple special attributes when
# general.name (lower-cased) contains a string of the first, and fails to load a file whose
# vocabulary lacks one of them ("unordered_map::at"): such a name is written with a space instead
NAME_TRAPS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("phi-3", "phi3"), ("<unk>", "<s>", "</s>", "<|endoftext|>")),
)

# Checkpoint tensors llama.cpp has no use for (recomputed at load time).
DROP_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


@dataclass(frozen=True)
class OutType:
    """One --outtype: how the 2-D weights are stored, and by whom."""

    name: str
    file_type: F
    # the type every quantizable weight gets when written by this package (None: llama.cpp's
    # own quantizer decides per tensor, starting from a float file of type `base`)
    weight_type: T | None
    # where the last projection (output, or token_embd when tied) goes when weight_type is a
    # coarse block quant: llama.cpp's quantizer keeps it finer (Q6_K); the Python path uses Q8_0
    output_type: T | None = None
    llama_quantize: bool = False


_PY = {
    "f32": OutType("f32", F.ALL_F32, T.F32),
    "f16": OutType("f16", F.MOSTLY_F16, T.F16),
    "bf16": OutType("bf16", F.MOSTLY_BF16, T.BF16),
    "q8_0": OutType("q8_0", F.MOSTLY_Q8_0, T.Q8_0),
    "q4_0": OutType("q4_0", F.MOSTLY_Q4_0, T.Q4_0, output_type=T.Q8_0),
    "q5_0": OutType("q5_0", F.MOSTLY_Q5_0, T.Q5_0, output_type=T.Q8_0),
}
_LLAMA_CPP = {
    name: OutType(name, ft, None, llama_quantize=True)
    for name, ft in {
        "q4_1": F.MOSTLY_Q4_1,
        "q5_1": F.MOSTLY_Q5_1,
        "q2_k": F.MOSTLY_Q2_K,
        "q3_k_s": F.MOSTLY_Q3_K_S,
        "q3_k_m": F.MOSTLY_Q3_K_M,
        "q3_k_l": F.MOSTLY_Q3_K_L,
        "q4_k_s": F.MOSTLY_Q4_K_S,
        "q4_k_m": F.MOSTLY_Q4_K_M,
        "q5_k_s": F.MOSTLY_Q5_K_S,
        "q5_k_m": F.MOSTLY_Q5_K_M,
        "q6_k": F.MOSTLY_Q6_K,
        "iq4_nl": F.MOSTLY_IQ4_NL,
        "iq4_xs": F.MOSTLY_IQ4_XS,
    }.items()
}
OUTTYPES: dict[str, OutType] = {**_PY, **_LLAMA_CPP}
# what llama.cpp's convert_lora_to_gguf.py writes a LoRA adapter as (its loader takes these)
LORA_OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# What a weight falls back to when its rows do not split into whole quant blocks (llama.cpp's
# converter catches gguf.QuantError and writes F16).
QUANT_FALLBACK = T.F16

# --- tokenizer -------------------------------------------------------------------------------

# llama.cpp tells BPE pre-tokenizers apart by the sha256 of str(token ids) of this text, encoded
# by the HF tokenizer (special tokens included); see get_vocab_base_pre in its converter.
PRE_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# hash -> llama.cpp pre-tokenizer name, for the released tokenizers of the supported families
PRE_HASHES: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# A tokenizer with its own vocabulary (a fine-tune's, a test's) hashes to nothing known; its
# split rule still names the llama.cpp pre-tokenizer that reproduces it.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_REGEXES: dict[str, str] = {
    _GPT2_RE: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}

# added tokens that some models forget to mark special (llama.cpp's does_token_look_special)
LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
