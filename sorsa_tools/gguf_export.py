"""A merged checkpoint written as GGUF, so that llama.cpp (and what embeds it) runs it.

The file is streamed: every tensor's name, type and shape is known from the checkpoint headers,
so the GGUF header goes out first and the tensors follow one at a time (read, merged, reordered,
converted, written, dropped); peak memory is about one tensor whatever the model size. The file
grows under a temp name in the output directory and is renamed into place only after it has been
read back and checked, so a partial file never sits under the final name.

What llama.cpp expects differently from transformers (q/k row order for LLM_ARCH_LLAMA, Gemma's
1 + w norms, tied heads, sliding-window layout, tokenizer encodings) lives in gguf_tables.py.
The k-quants come from llama.cpp's own quantizer (llama-cpp-python), run on a float GGUF
written here first.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from sorsa_tools import __version__
from sorsa_tools.errors import DiskFullError, ExportError, OutputExistsError, TokenizerMissingError
from sorsa_tools.gguf_tables import (
    ARCHS,
    DROP_SUFFIXES,
    LOOKS_SPECIAL,
    NAME_TRAPS,
    OUTTYPES,
    PRE_CHECK_TEXT,
    PRE_HASHES,
    PRE_REGEXES,
    QUANT_FALLBACK,
    ArchSpec,
    OutType,
)
from sorsa_tools.io.placement import aside_name, mark_complete, remove_path, remove_stale_temps
from sorsa_tools.io.safetensors_file import disk_errors
from sorsa_tools.source import MergedSource

T = gguf.GGMLQuantizationType
TT = gguf.TokenType
PROVENANCE_KEY = "sorsa.provenance"
WRITER_KEY = "sorsa.writer"
# tests flip this to show the q/k reorder is what makes LLM_ARCH_LLAMA right
_PERMUTE_QK = True


@dataclass
class GGUFResult:
    """What export_gguf wrote."""

    path: Path  # the file to hand to llama.cpp (the first split when split)
    paths: list[Path]
    tensor_count: int
    bytes: int
    outtype: str
    arch: str
    seconds: float
    tokenizer: str = ""  # "llama (tokenizer.model)", "llama (tokenizer.json byte-fallback BPE)", "gpt2"
    pre_tokenizer: str | None = None
    warnings: list[str] = field(default_factory=list)


def supported_architectures() -> list[str]:
    return sorted(ARCHS)


def supported_outtypes() -> list[str]:
    return list(OUTTYPES)


# --- the plan: every output tensor known before anything is read ---------------------------------


@dataclass
class _Planned:
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order (rows, cols)
    qtype: T
    source: str | None  # HF name, or None for a generated tensor
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    generated: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape[:-1]) * (self.shape[-1] // block) * size


@dataclass
class _Model:
    spec: ArchSpec
    arch: str
    hp: dict
    n_layer: int
    n_head: int
    n_kv: int
    head_dim: int
    tied: bool


def _hparams(source: MergedSource) -> tuple[str, dict]:
    cfg = source.config
    model_type = cfg.get("model_type")
    hp = {**cfg, **(cfg.get("text_config") or {})}
    return model_type, hp


def _model(source: MergedSource) -> _Model:
    model_type, hp = _hparams(source)
    spec = ARCHS.get(model_type)
    if spec is None:
        raise ExportError(
            f"GGUF export does not support model_type {model_type!r}; supported: "
            f"{', '.join(supported_architectures())}"
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(hp.get(key), int):
            raise ExportError(f"{source.root / 'config.json'} lacks {key!r}; restore the model's config.json")
    for key, allowed in spec.requires.items():
        if hp.get(key) not in allowed:
            raise ExportError(
                f"{model_type} with {key}={hp.get(key)!r} has no llama.cpp equivalent (needs "
                f"{' or '.join(map(repr, allowed))}); "
                "it cannot be exported to GGUF"
            )
    for key in spec.needs:
        if hp.get(key) is None:
            raise ExportError(
                f"{model_type} without {key} has no llama.cpp equivalent (its {model_type} graph always "
                "applies one); it cannot be exported to GGUF"
            )
    if spec.swa_fixed_period:
        _check_fixed_swa(model_type, hp, spec.swa_fixed_period)
    n_head = hp["num_attention_heads"]
    head_dim = hp.get("head_dim") or hp["hidden_size"] // n_head
    tied = bool(hp.get("tie_word_embeddings", model_type.startswith("gemma")))
    return _Model(
        spec,
        gguf.MODEL_ARCH_NAMES[spec.gguf_arch],
        hp,
        hp["num_hidden_layers"],
        n_head,
        hp.get("num_key_value_heads") or n_head,
        head_dim,
        tied,
    )


def _check_fixed_swa(model_type: str, hp: dict, period: int) -> None:
    """llama.cpp's graph makes every `period`-th layer global and the others sliding: a config
    laid out otherwise is another network there."""
    want = [bool((i + 1) % period) for i in range(hp["num_hidden_layers"])]
    if _swa_pattern(hp, hp["num_hidden_layers"], default_every=period) != want:
        raise ExportError(
            f"{model_type} with layer_types {hp.get('layer_types')} has no llama.cpp equivalent (its "
            f"{model_type} graph makes layer i global where (i + 1) % {period} == 0, the others sliding); it cannot be "
            "exported to GGUF"
        )


def _query_scale(m: _Model) -> float:
    """What the queries are multiplied by so that llama.cpp's attention scale gives HF's
    query_pre_attn_scalar**-0.5 (1.0 where the family has no such scalar)."""
    spec, scalar = m.spec, m.hp.get("query_pre_attn_scalar")
    if spec.query_scale_into is None or not scalar:
        return 1.0
    denom = m.hp["hidden_size"] / m.n_head if m.n_layer == spec.wide_scale_layers else m.head_dim
    return math.sqrt(denom / scalar)


def _rope(hp: dict) -> tuple[dict, dict | None]:
    """(full-attention rope parameters, sliding-window ones) in one shape for old and new configs."""
    rp = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    if "full_attention" in rp or "sliding_attention" in rp:
        return dict(rp.get("full_attention") or {}), rp.get("sliding_attention")
    rp.setdefault("rope_theta", hp.get("rope_theta"))
    if "type" in rp:
        rp.setdefault("rope_type", rp["type"])
    swa = {"rope_theta": hp["rope_local_base_freq"]} if hp.get("rope_local_base_freq") else None
    return rp, swa


def _llama3_rope_factors(rp: dict, head_dim: int) -> torch.Tensor:
    """Per-frequency divisors of Llama 3.1's rope scaling (llama.cpp reads them as rope_freqs)."""
    base = rp.get("rope_theta") or 10000.0
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rp.get("factor", 8.0)
    lo, hi = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split RoPE rows -> llama.cpp's interleaved pairs, per head (weights or biases)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qtype_for(name: str, shape: tuple[int, ...], ot: OutType, has_output: bool) -> tuple[T, str | None]:
    """The stored type of one tensor: llama.cpp keeps 1-D tensors, norms and biases in F32."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return T.F32, None
    base = ot.weight_type if ot.weight_type is not None else T.F32
    if ot.output_type is not None and (
        name == "output.weight" or (name == "token_embd.weight" and not has_output)
    ):
        base = ot.output_type
    block = gguf.GGML_QUANT_SIZES[base][0]
    if shape[-1] % block:
        return QUANT_FALLBACK, (
            f"{name}: rows of {shape[-1]} do not split into {base.name} blocks of {block}; "
            f"written as {QUANT_FALLBACK.name}"
        )
    return base, None


def gguf_name(m: _Model, tmap: gguf.TensorNameMap, hf: str, model_type: str | None) -> str | None:
    """The GGUF name of checkpoint tensor `hf`, or None where llama.cpp takes no such tensor (one
    it recomputes, a vision tower's, a head tied to token_embd)."""
    spec = m.spec
    if hf.endswith(DROP_SUFFIXES) or hf.startswith(spec.skip_prefixes):
        return None
    name = hf
    for old, new in spec.prefix_rewrites:
        if name.startswith(old):
            name = new + name[len(old) :]
            break
    if m.tied and name == "lm_head.weight":
        return None  # llama.cpp reuses token_embd when output.weight is absent
    gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
    if gname is None:
        raise ExportError(
            f"tensor {hf!r} has no place in llama.cpp's {m.arch} architecture; this checkpoint is "
            f"not a plain {model_type} model and cannot be exported to GGUF"
        )
    return gname


def row_maps(m: _Model, gname: str) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The linear maps of a tensor's rows that llama.cpp's layout needs (q/k reorder, the folded
    query scale): applied to a weight, or equally to the B factor of a LoRA of it."""
    spec, maps = m.spec, []
    if spec.permute_qk and _PERMUTE_QK:
        if gname.endswith(("attn_q.weight", "attn_q.bias")):
            maps.append(lambda t, h=m.n_head: _permute(t, h))
        elif gname.endswith(("attn_k.weight", "attn_k.bias")):
            maps.append(lambda t, h=m.n_kv: _permute(t, h))
    q_scale = _query_scale(m)
    if q_scale != 1.0 and gname.endswith(spec.query_scale_into):  # type: ignore[arg-type]
        maps.append(lambda t, s=q_scale: t * s)
    return maps


def chain(
    steps: list[Callable[[torch.Tensor], torch.Tensor]],
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The steps applied in order, or None when there are none."""
    if not steps:
        return None

    def transform(t: torch.Tensor, steps=tuple(steps)) -> torch.Tensor:
        for s in steps:
            t = s(t)
        return t

    return transform


def _plan(source: MergedSource, m: _Model, ot: OutType, n_vocab: int, warnings: list[str]) -> list[_Planned]:
    spec = m.spec
    tmap = gguf.get_tensor_name_map(spec.gguf_arch, m.n_layer)
    rp, _ = _rope(m.hp)
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    for info in source.infos():
        gname = gguf_name(m, tmap, info.name, source.config.get("model_type"))
        if gname is not None:
            entries.append((info.name, gname, tuple(info.shape)))
    names = {g for _, g, _ in entries}
    for required in ("token_embd.weight", "output_norm.weight"):
        if required not in names:
            raise ExportError(f"{source.root} has no tensor for {required}; the checkpoint is incomplete")
    has_output = "output.weight" in names
    plans: list[_Planned] = []
    if (rp.get("rope_type") or "").lower() == "llama3":
        factors = _llama3_rope_factors(rp, m.head_dim)
        plans.append(_Planned("rope_freqs.weight", tuple(factors.shape), T.F32, None, generated=factors))
    if m.spec.longrope and (rp.get("rope_type") or "").lower() in ("longrope", "su"):
        for kind in ("long", "short"):  # llama.cpp picks one by the context size, HF by the sequence's
            f = torch.tensor(rp[f"{kind}_factor"], dtype=torch.float32)
            if f.numel() != _rope_dims(m.hp, rp, m.head_dim) // 2:
                raise ExportError(
                    f"rope {kind}_factor has {f.numel()} entries, not rope dims / 2; fix config.json"
                )
            plans.append(_Planned(f"rope_factors_{kind}.weight", tuple(f.shape), T.F32, None, generated=f))

    for hf, gname, shape in entries:
        if gname == "token_embd.weight" and shape[0] != n_vocab:
            raise ExportError(f"internal: token_embd has {shape[0]} rows for {n_vocab} tokens")
        steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
        if spec.norm_shift and hf.endswith("norm.weight"):  # first: a folded scale multiplies 1 + w
            steps.append(lambda t, s=spec.norm_shift: t + s)
        steps += row_maps(m, gname)
        qtype, note = _qtype_for(gname, shape, ot, has_output)
        if note:
            warnings.append(note)
        plans.append(_Planned(gname, shape, qtype, hf, chain(steps)))
    return plans


def _encode(t: torch.Tensor, qtype: T) -> np.ndarray:
    """float32 tensor -> the bytes GGUF stores for qtype (as a numpy array the writer can take)."""
    if qtype == T.F32:
        return t.to(torch.float32).contiguous().numpy()
    if qtype == T.F16:
        return t.to(torch.float16).contiguous().numpy()
    if qtype == T.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(t.to(torch.float32).contiguous().numpy(), qtype)


# --- hyperparameters ---------------------------------------------------------------------------


def _add_hparams(w: gguf.GGUFWriter, m: _Model, ot: OutType, n_vocab: int, name: str) -> None:
    hp = m.hp
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(m.n_layer)
    w.add_context_length(int(hp.get("max_position_embeddings") or 2048))
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(m.n_head)
    w.add_head_count_kv(m.n_kv)
    w.add_layer_norm_rms_eps(float(hp.get("rms_norm_eps") or 1e-6))
    w.add_key_length(m.head_dim)
    w.add_value_length(m.head_dim)
    rp, swa = _rope(hp)
    w.add_rope_dimension_count(_rope_dims(hp, rp, m.head_dim))
    w.add_vocab_size(n_vocab)
    w.add_rope_freq_base(float(rp.get("rope_theta") or (1e6 if m.spec.sliding_window else 1e4)))
    rope_type = (rp.get("rope_type") or "default").lower()
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
        for key, add in (
            ("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
        ):
            if rp.get(key) is not None:
                add(float(rp[key]))
    elif rope_type in ("longrope", "su") and m.spec.longrope:  # + the rope_factors_* tensors
        orig = int(rp.get("original_max_position_embeddings") or hp["original_max_position_embeddings"])
        scale = int(hp.get("max_position_embeddings") or orig) / orig
        attn = rp.get("attention_factor") or (
            math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        )
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_attn_factors(float(attn))
    elif rope_type not in ("default", "llama3"):  # llama3: the rope_freqs tensor
        raise ExportError(
            f"rope_type {rope_type!r} has no llama.cpp equivalent for {m.arch}; supported: default, "
            "linear, yarn, llama3" + (", longrope" if m.spec.longrope else "")
        )
    if m.spec.sliding_window and hp.get("sliding_window"):
        pattern = _swa_pattern(hp, m.n_layer)
        if any(pattern):
            w.add_sliding_window(int(hp["sliding_window"]))
            w.add_sliding_window_pattern(pattern)
            if swa and swa.get("rope_theta"):
                w.add_rope_freq_base_swa(float(swa["rope_theta"]))
    if m.spec.swa_fixed_period:  # the layout is llama.cpp's own (checked in _model)
        w.add_sliding_window(int(hp["sliding_window"]))
    for key in m.spec.softcaps:
        if hp.get(key):
            w.add_float32(f"{m.arch}.{key}", float(hp[key]))
    w.add_file_type(ot.file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_dims(hp: dict, rp: dict, head_dim: int) -> int:
    """Rotated dimensions per head: all of them, or partial_rotary_factor of them (Phi-3/4)."""
    factor = rp.get("partial_rotary_factor") or hp.get("partial_rotary_factor") or 1.0
    return int(head_dim * factor)


def _swa_pattern(hp: dict, n_layer: int, default_every: int = 1) -> list[bool]:
    types = hp.get("layer_types")
    if types:
        return [t == "sliding_attention" for t in types][:n_layer]
    every = hp.get("sliding_window_pattern") or hp.get("_sliding_window_pattern") or default_every
    return [bool((i + 1) % every) for i in range(n_layer)]


# --- tokenizer ---------------------------------------------------------------------------------


@dataclass
class _Vocab:
    model: str  # tokenizer.ggml.model
    kind: str  # for the result
    tokens: list[str | bytes]
    toktypes: list[int]
    scores: list[float] | None = None
    pre: str | None = None
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    merges: bool = False


def _pb_fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of one protobuf message: enough to read tokenizer.model."""
    i, n = 0, len(buf)

    def varint(i: int) -> tuple[int, int]:
        shift = result = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result, i
            shift += 7

    while i < n:
        key, i = varint(i)
        fn, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(i)
        elif wt == 1:
            v, i = buf[i : i + 8], i + 8
        elif wt == 2:
            ln, i = varint(i)
            v, i = buf[i : i + ln], i + ln
        elif wt == 5:
            v, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"wire type {wt}")
        yield fn, wt, v


def _sentencepiece_vocab(root: Path, n_vocab: int) -> _Vocab:
    path = root / "tokenizer.model"
    try:
        model = path.read_bytes()
        tokens: list[str | bytes] = []
        scores: list[float] = []
        types: list[int] = []
        add_dummy_prefix = remove_ws = True
        for fn, _wt, v in _pb_fields(model):
            if fn == 1:  # SentencePiece
                piece, score, typ = b"", 0.0, int(TT.NORMAL)
                for pfn, _pwt, pv in _pb_fields(v):  # type: ignore[arg-type]
                    if pfn == 1:
                        piece = bytes(pv)  # type: ignore[arg-type]
                    elif pfn == 2:
                        (score,) = struct.unpack("<f", pv)  # type: ignore[arg-type]
                    elif pfn == 3:
                        typ = int(pv)  # type: ignore[arg-type]
                tokens.append(piece)
                scores.append(score)
                types.append(typ)
            elif fn == 3:  # NormalizerSpec
                for nfn, _nwt, nv in _pb_fields(v):  # type: ignore[arg-type]
                    if nfn == 3:
                        add_dummy_prefix = bool(nv)
                    elif nfn == 4:
                        remove_ws = bool(nv)
    except (ValueError, IndexError, struct.error):
        raise ExportError(f"{path} is not a sentencepiece model; re-download the tokenizer") from None
    if not tokens:
        raise ExportError(f"{path} holds no tokens; re-download the tokenizer")
    byid = {i: t for i, t in enumerate(tokens)}
    typemap = dict(enumerate(types))
    scoremap = dict(enumerate(scores))
    added = root / "added_tokens.json"
    if added.is_file():
        for text, tid in json.loads(added.read_text()).items():
            byid[tid], typemap[tid], scoremap[tid] = text.encode(), int(TT.USER_DEFINED), -1000.0
    for tid, text, special in _config_added_tokens(root):
        typ = TT.CONTROL if special or text in LOOKS_SPECIAL else TT.USER_DEFINED
        if typ == TT.USER_DEFINED:
            text = text.replace("\u2581", " ")
        byid[tid], typemap[tid], scoremap[tid] = text.encode(), int(typ), -1000.0
    toks, tts, scs = _dense(byid, typemap, n_vocab, root, scoremap)
    return _Vocab(
        "llama",
        "llama (tokenizer.model)",
        toks,
        tts,
        scs,
        pre="default",
        add_space_prefix=add_dummy_prefix,
        remove_extra_whitespaces=remove_ws,
    )


def _config_added_tokens(root: Path) -> list[tuple[int, str, bool]]:
    p = root / "tokenizer_config.json"
    if not p.is_file():
        return []
    dec = json.loads(p.read_text()).get("added_tokens_decoder") or {}
    return [(int(k), v["content"], bool(v.get("special"))) for k, v in dec.items()]


def _dense(
    byid: dict[int, str | bytes],
    types: dict[int, int],
    n_vocab: int,
    root: Path,
    scores: dict[int, float] | None = None,
) -> tuple[list, list, list | None]:
    """Token lists of exactly n_vocab entries (the embedding's rows); gaps become unused pads."""
    top = max(byid)
    if top >= n_vocab:
        raise ExportError(
            f"the tokenizer in {root} has token id {top} but the model embeds only {n_vocab} tokens; "
            "use the base model's own tokenizer"
        )
    toks = [byid.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    tts = [types.get(i, int(TT.UNUSED)) for i in range(n_vocab)]
    scs = [scores.get(i, -1000.0) for i in range(n_vocab)] if scores is not None else None
    return toks, tts, scs


def _hf_bpe_vocab(root: Path, tj: dict, n_vocab: int) -> _Vocab:
    """A tokenizer.json BPE with byte fallback (Llama 2 / Gemma as transformers writes them) is a
    sentencepiece vocabulary in llama.cpp. llama.cpp's SPM merges the adjacent pair whose result
    scores highest; BPE merges the pair of lowest merge rank. A token's score is therefore minus the
    rank of the first merge that makes it, so both take the same merges in the same order."""
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    rank: dict[str, int] = {}
    for r, pair in enumerate(model.get("merges") or []):
        a, b = pair.split(" ", 1) if isinstance(pair, str) else pair
        rank.setdefault(a + b, r)
    unk = model.get("unk_token")
    byid: dict[int, str | bytes] = {}
    types: dict[int, int] = {}
    scores: dict[int, float] = {}
    byte_re = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    for text, tid in vocab.items():
        byid[tid] = text
        if byte_re.fullmatch(text):
            types[tid] = int(TT.BYTE)
        elif text == unk:
            types[tid] = int(TT.UNKNOWN)
        else:
            types[tid] = int(TT.NORMAL)
        r = rank.get(text)
        scores[tid] = -float(r) if r is not None else (0.0 if len(text) == 1 else -1e9)
    for tok in tj.get("added_tokens") or []:
        tid, text = tok["id"], tok["content"]
        special = tok.get("special") or text in LOOKS_SPECIAL
        if special:
            types[tid] = int(TT.UNKNOWN) if text == unk else int(TT.CONTROL)
        else:
            text = text.replace("\u2581", " ")  # llama.cpp matches user-defined tokens on raw text
            types[tid] = int(TT.USER_DEFINED)
        byid[tid] = text
        scores.setdefault(tid, -1000.0)
    toks, tts, scs = _dense(byid, types, n_vocab, root, scores)
    return _Vocab(
        "llama",
        "llama (tokenizer.json byte-fallback BPE)",
        toks,
        tts,
        scs,
        pre="default",
        add_space_prefix=_prepends_space(tj),
        remove_extra_whitespaces=False,
    )


def _prepends_space(tj: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama 2 does, Gemma does not)."""
    text = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    pre = tj.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p and p.get("type") == "Metaspace":
            return (
                p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never") != "never"
            )
    return False


def _pre_tokenizer(root: Path, tj: dict, warnings: list[str]) -> str:
    """llama.cpp's name for the pre-tokenizer: by hash as its converter does, else by split rule.

    The rule is read from the tokenizer transformers actually builds, which is not always the
    file's (transformers 5 gives model_type qwen2 its own split rule whatever tokenizer.json says).
    """
    from transformers import AutoTokenizer

    digest = ""
    try:
        tok = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        digest = hashlib.sha256(str(tok.encode(PRE_CHECK_TEXT)).encode()).hexdigest()
        tj = json.loads(tok.backend_tokenizer.to_str())
    except Exception as e:  # a tokenizer transformers cannot load still has a split rule to read
        warnings.append(
            f"tokenizer: transformers could not load it ({type(e).__name__}); split rule read from tokenizer.json"
        )
    if digest in PRE_HASHES:
        return PRE_HASHES[digest]
    pre = tj.get("pre_tokenizer") or {}
    steps = [p for p in pre.get("pretokenizers", [pre]) if p]
    for p in steps:
        if p.get("type") == "Split" and (p.get("pattern") or {}).get("Regex") in PRE_REGEXES:
            return PRE_REGEXES[p["pattern"]["Regex"]]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2"
    warnings.append(
        "tokenizer: the BPE pre-tokenizer is not one llama.cpp knows; wrote 'default' (llama.cpp may split "
        "text differently from transformers)"
    )
    return "default"


def _gpt2_vocab(root: Path, tj: dict, n_vocab: int, warnings: list[str]) -> _Vocab:
    model = tj["model"]
    byid: dict[int, str | bytes] = {tid: text for text, tid in model["vocab"].items()}
    types = {tid: int(TT.NORMAL) for tid in byid}
    for tok in tj.get("added_tokens") or []:
        tid, text = tok["id"], tok["content"]
        byid[tid] = text
        special = (
            tok.get("special") or text in LOOKS_SPECIAL or (text.startswith("<|") and text.endswith("|>"))
        )
        types[tid] = int(TT.CONTROL if special else TT.USER_DEFINED)
    toks, tts, _ = _dense(byid, types, n_vocab, root)
    return _Vocab(
        "gpt2",
        "gpt2 (tokenizer.json byte-level BPE)",
        toks,
        tts,
        pre=_pre_tokenizer(root, tj, warnings),
        merges=True,
    )


def _vocab(source: MergedSource, m: _Model, n_vocab: int, warnings: list[str]) -> _Vocab:
    root = source.root
    if (root / "tokenizer.model").is_file():
        return _sentencepiece_vocab(root, n_vocab)
    tj_path = root / "tokenizer.json"
    if not tj_path.is_file():
        raise TokenizerMissingError(
            f"{root} has no tokenizer.json or tokenizer.model, which a GGUF must embed; copy the base "
            "model's tokenizer files into it"
        )
    try:
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
        kind = tj["model"]["type"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ExportError(f"{tj_path} is not a tokenizers JSON file; re-download the tokenizer") from None
    if kind != "BPE":
        raise ExportError(
            f"{tj_path} is a {kind} tokenizer; GGUF export handles BPE tokenizer.json and sentencepiece "
            "tokenizer.model, so add the model's tokenizer.model"
        )
    if tj["model"].get("byte_fallback"):
        return _hf_bpe_vocab(root, tj, n_vocab)
    return _gpt2_vocab(root, tj, n_vocab, warnings)


def _add_vocab(w: gguf.GGUFWriter, v: _Vocab, root: Path, n_vocab: int) -> None:
    w.add_tokenizer_model(v.model)
    if v.pre:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    w.add_token_types(v.toktypes)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    if v.remove_extra_whitespaces is not None:
        w.add_remove_extra_whitespaces(v.remove_extra_whitespaces)
    # bos/eos/unk/pad ids, add_bos/add_eos, merges and the chat template, read the way llama.cpp's
    # converter reads them (tokenizer_config.json, tokenizer.json's post-processor, config.json)
    special = gguf.SpecialVocab(root, load_merges=v.merges, n_vocab=n_vocab)
    special.add_to_gguf(w, quiet=True)


# --- writing -----------------------------------------------------------------------------------


class _Writer(gguf.GGUFWriter):
    """GGUFWriter whose files grow under temp names beside the final ones."""

    def __init__(self, final: Path, **kw):
        super().__init__(final, **kw)
        self.final = final
        self.temp_names: list[Path] = []

    def print_plan(self) -> list[Path]:
        finals = self.format_shard_names(self.final)
        self.finals = finals
        self.temp_names = [p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in finals]
        return self.temp_names


def model_name(name: str, tokens: list[str | bytes]) -> str:
    """general.name, kept clear of llama.cpp's name-triggered token rules that this vocabulary
    cannot satisfy (a fine-tune named phi3-... with a tokenizer of its own would not load)."""
    have = {t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in tokens}
    for triggers, needed in NAME_TRAPS:
        if any(n not in have for n in needed):
            for trig in triggers:
                name = re.sub(
                    re.escape(trig),
                    lambda mt: f"{mt.group()[:3]} {mt.group()[3:].lstrip('-')}",
                    name,
                    flags=re.I,
                )
    return name


def _split_names(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(gguf.gguf_writer.SHARD_NAME_FORMAT.format(out.stem, i + 1, n)) for i in range(n)]


def _check_out(
    out: Path,
    force: bool,
    candidates: list[Path],
    writer: str = "`sorsa merge --to gguf`",
    gtype: str = "model",
) -> None:
    if not out.parent.is_dir():
        raise ExportError(f"the directory of {out} does not exist; create it or pick another -o path")
    for p in candidates:
        if p.exists() and not force:
            raise OutputExistsError(
                f"{p} already exists; pass --force to overwrite it or pick another -o path"
            )
        if p.exists() and not _is_own_gguf(p, gtype):
            raise OutputExistsError(
                f"{p} is not a GGUF that {writer} wrote; --force only replaces one of "
                "those: pick another -o path"
            )


def _is_own_gguf(p: Path, gtype: str = "model") -> bool:
    """A regular GGUF file that sorsa-tools wrote, of general.type `gtype` (what --force may
    replace: a merge's model, or export-lora's adapter, never one for the other)."""
    if p.is_symlink() or not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        kv = read_layout(p)[0]
        return (WRITER_KEY in kv or PROVENANCE_KEY in kv) and kv.get("general.type", "model") == gtype
    except Exception:  # a file that does not parse as GGUF
        return False


def _write(
    source: MergedSource,
    out: Path,
    m: _Model,
    ot: OutType,
    plans: list[_Planned],
    vocab: _Vocab,
    n_vocab: int,
    split_max_size: int | None,
    provenance: dict | None,
    progress: Callable[[str, int, int], None] | None,
) -> list[Path]:
    w = _Writer(out, arch=m.arch, split_max_size=split_max_size or 0)
    name = str(source.config.get("_name_or_path") or source.root.name or "model")
    _add_hparams(w, m, ot, n_vocab, model_name(name, vocab.tokens))
    _add_vocab(w, vocab, source.root, n_vocab)
    w.add_string(WRITER_KEY, f"sorsa-tools {__version__}")  # marks a file --force may replace
    if provenance is not None:
        w.add_string(PROVENANCE_KEY, json.dumps(provenance, sort_keys=True))
    for p in plans:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    total = sum(p.nbytes for p in plans)

    def blocks() -> Iterator[np.ndarray]:
        read_plans = iter([p for p in plans if p.generated is None])

        def work(name: str, t: torch.Tensor, raw) -> np.ndarray:
            """On the fold thread, in plan order: transform and encode while the writer writes."""
            p = next(read_plans)
            t = t.to(torch.float32)
            if p.transform is not None:
                t = p.transform(t)
            return _encode(t, p.qtype)

        stream = source.pipeline([p.source for p in plans if p.generated is None], work)  # type: ignore[misc]
        done = 0
        try:
            for p in plans:
                data = _encode(p.generated, p.qtype) if p.generated is not None else next(stream)
                if data.nbytes != p.nbytes:
                    raise ExportError(
                        f"internal: {p.name} encoded to {data.nbytes} bytes, planned {p.nbytes}"
                    )
                yield data
                done += p.nbytes
                if progress is not None:
                    progress(p.name, done, total)
        finally:
            stream.close()  # now, not whenever the garbage collector gets to it

    return _write_out(w, out, blocks())


def _write_out(w: _Writer, out: Path, blocks: Iterator[np.ndarray]) -> list[Path]:
    """Header, metadata, tensor table, then each tensor's bytes in order, fsynced; on any failure
    the writer's temp files are removed, so nothing half-written stays behind."""
    try:
        with disk_errors(out):
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for data in blocks:
                w.write_tensor_data(data)
                del data
            for f in w.fout or []:
                f.flush()
                os.fsync(f.fileno())
            w.close()
    except BaseException:
        w.close()
        for t in w.temp_names:
            t.unlink(missing_ok=True)
        raise
    return w.temp_names


@dataclass
class _OnDisk:
    qtype: T
    shape: tuple[int, ...]  # torch order
    offset: int  # absolute, in its file
    nbytes: int
    path: Path


_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_layout(path: Path) -> tuple[dict[str, object], dict[str, _OnDisk]]:
    """A GGUF file's scalar/string metadata and tensor table, read straight from its header.

    gguf.GGUFReader builds a numpy view of every array element (seconds for a 262k-token vocab);
    this skips arrays and checks that every tensor lies inside the file."""
    from sorsa_tools.errors import VerificationError

    def bad(why: str) -> VerificationError:
        return VerificationError(f"{path} is not a valid GGUF file ({why}); export it again")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(min(size, 1 << 20))
        buf = bytearray(head)
        pos = 0

        def need(n: int) -> None:
            nonlocal buf
            while pos + n > len(buf):
                more = f.read(max(n, 1 << 24))
                if not more:
                    raise bad("header runs past the end")
                buf += more

        def take(fmt: str):
            nonlocal pos
            n = struct.calcsize(fmt)
            need(n)
            v = struct.unpack_from("<" + fmt, buf, pos)
            pos += n
            return v[0] if len(v) == 1 else v

        def string() -> str:
            nonlocal pos
            n = take("Q")
            need(n)
            v = bytes(buf[pos : pos + n]).decode("utf-8", errors="replace")
            pos += n
            return v

        def value(vt: int):
            nonlocal pos
            if vt in _SCALAR:
                return take(_SCALAR[vt])
            if vt == 8:
                return string()
            if vt == 9:
                sub, n = take("I"), take("Q")
                if sub in _SCALAR:
                    width = struct.calcsize(_SCALAR[sub])
                    need(width * n)
                    pos += width * n
                else:
                    for _ in range(n):
                        value(sub)
                return None
            raise bad(f"unknown value type {vt}")

        if take("I") != gguf.GGUF_MAGIC:
            raise bad("wrong magic")
        take("I")  # version
        n_tensors, n_kv = take("Q"), take("Q")
        kv: dict[str, object] = {}
        for _ in range(n_kv):
            key = string()
            kv[key] = value(take("I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = [take("Q") for _ in range(take("I"))]
            infos.append((name, T(take("I")), tuple(reversed(dims)), take("Q")))
        align = int(kv.get("general.alignment") or gguf.GGUF_DEFAULT_ALIGNMENT)  # type: ignore[call-overload]
        start = (pos + align - 1) // align * align
    tensors: dict[str, _OnDisk] = {}
    for name, qt, shape, off in infos:
        block, width = gguf.GGML_QUANT_SIZES[qt]
        nbytes = math.prod(shape[:-1]) * (shape[-1] // block) * width
        if start + off + nbytes > size:
            raise bad(f"{name} runs past the end of the file")
        tensors[name] = _OnDisk(qt, shape, start + off, nbytes, path)
    return kv, tensors


def _verify(
    paths: list[Path], plans: list[_Planned], source: MergedSource | None, exact_types: bool = True
) -> None:
    """Read the files back: every planned tensor there, with its shape (and type, unless
    llama.cpp's quantizer chose the types); an F32 weight equal to what was meant to be written."""
    from sorsa_tools.errors import VerificationError

    found: dict[str, _OnDisk] = {}
    for p in paths:
        found.update(read_layout(p)[1])
    want = {p.name: p for p in plans}
    if set(found) != set(want):
        diff = sorted(set(want) - set(found)) or sorted(set(found) - set(want))
        raise VerificationError(f"{paths[0]} read back with a different tensor set ({diff[0]}); export again")
    sample = None
    for p in plans:
        d = found[p.name]
        if d.shape != p.shape or (exact_types and d.qtype != p.qtype):
            raise VerificationError(
                f"{paths[0]}: {p.name} read back as {d.qtype.name}{list(d.shape)}, wrote "
                f"{p.qtype.name}{list(p.shape)}; export again"
            )
        if sample is None and exact_types and p.qtype == T.F32 and p.source is not None and len(p.shape) == 2:
            sample = p
    if sample is not None and source is not None:
        t = source.read(sample.source).to(torch.float32)  # type: ignore[arg-type]
        if sample.transform is not None:
            t = sample.transform(t)
        d = found[sample.name]
        got = np.fromfile(d.path, dtype=np.float32, count=d.nbytes // 4, offset=d.offset).reshape(d.shape)
        if not np.array_equal(got, t.numpy()):
            raise VerificationError(f"{paths[0]}: {sample.name} does not read back as written; export again")


@contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """A Ctrl-C while llama.cpp runs lands in its Python log callback, where ctypes prints and
    drops it: the quantizer went on and the export finished as if nothing happened. Remember it
    instead and raise it when the C call returns (llama.cpp's quantizer cannot be cancelled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits: list[int] = []
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: hits.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before if before is not None else signal.default_int_handler)
    if hits:
        raise KeyboardInterrupt


def _require_llama_cpp(ot: OutType):
    """llama-cpp-python, which k-quants need: checked before minutes of writing the float GGUF."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            f"--outtype {ot.name} uses llama.cpp's quantizer; install llama-cpp-python "
            "(pip install llama-cpp-python) or pick one of f32, f16, bf16, q8_0, q5_0, q4_0"
        ) from None
    return llama_cpp


def _check_space(out: Path, plans: list[_Planned], quantized: bool) -> None:
    """Enough free space for what will be written there (the float GGUF, and for a k-quant also its
    quantized copy, at most half the size), said up front as merge --to hf does."""
    need = sum(p.nbytes for p in plans) * (1.5 if quantized else 1.0)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise DiskFullError(
            f"{out} needs about {need / 1e9:.1f} GB but only {free / 1e9:.1f} GB is free there; "
            "free space or choose another -o"
        )


def _llama_quantize(src: Path, dst: Path, ot: OutType) -> None:
    llama_cpp = _require_llama_cpp(ot)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ot.file_type)
    params.nthread = max(1, os.cpu_count() or 1)
    log = logging.getLogger("llama-cpp-python")  # llama.cpp's log goes to stderr through it
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with disk_errors(dst), _deferred_interrupt():
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    finally:
        log.setLevel(level)
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp's quantizer failed on {src} (code {rc}); try --outtype f16 or q8_0")


def _resplit(src: Path, out: Path, split_max_size: int) -> list[Path]:
    """Split a finished GGUF into llama.cpp's -0000i-of-0000N files, tensor data copied as is."""
    r = gguf.GGUFReader(src)
    arch = str(r.fields["general.architecture"].contents())
    w = _Writer(out, arch=arch, split_max_size=split_max_size)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or f.name.startswith("split."):
            continue
        vt = f.types[0]
        sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vt, sub_type=sub)
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w.add_tensor_info(t.name, shape, np.dtype(np.float32), int(t.n_bytes), raw_dtype=T(t.tensor_type))
    return _write_out(w, out, (np.asarray(t.data).reshape(-1).view(np.uint8) for t in r.tensors))


def export_gguf(
    source: MergedSource,
    out: str | Path,
    outtype: str = "f16",
    *,
    split_max_size: int | None = None,
    force: bool = False,
    provenance: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> GGUFResult:
    """Write SOURCE (adapter folded in) as a GGUF file llama.cpp loads, at OUT.

    outtype: f32, f16, bf16, q8_0, q5_0, q4_0 (written here) or a llama.cpp quant such as q4_k_m
    (needs llama-cpp-python). split_max_size: bytes per file, split the way llama.cpp names them.
    """
    warnings: list[str] = []
    with _collect_gguf_log(warnings):
        return _export(source, out, outtype, split_max_size, force, provenance, progress, warnings)


# gguf-py notices that need no action here: a tokenizer's two-sequence (pair) template only
# matters for sentence-pair encoding, which llama.cpp's generation never does (BOS/EOS come from
# the single-sequence template, checked against transformers' tokenization in the tests)
GGUF_LOG_IGNORED = ("do not match TemplateProcessing<pair>", "in TemplateProcessing<pair>")


@contextmanager
def _collect_gguf_log(warnings: list[str]) -> Iterator[None]:
    """gguf-py logs what it notices; a library must not print, so its warnings join the result."""

    class _H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if not any(p in message for p in GGUF_LOG_IGNORED):
                warnings.append(f"gguf: {message}")

    log = logging.getLogger("gguf")
    h, prop = _H(logging.WARNING), log.propagate
    log.addHandler(h)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(h)
        log.propagate = prop


def _export(
    source: MergedSource,
    out: str | Path,
    outtype: str,
    split_max_size: int | None,
    force: bool,
    provenance: dict | None,
    progress: Callable[[str, int, int], None] | None,
    warnings: list[str],
) -> GGUFResult:
    start = time.monotonic()
    ot = OUTTYPES.get(str(outtype).lower())
    if ot is None:
        raise ExportError(f"unknown --outtype {outtype!r}; pick one of {', '.join(OUTTYPES)}")
    if split_max_size is not None and split_max_size <= 0:
        raise ExportError(f"split size must be a positive number of bytes, got {split_max_size}")
    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise ExportError(f"{out} does not end in .gguf; name the output file NAME.gguf")
    if out.is_dir():
        raise ExportError(f"{out} is a directory; give a file path ending in .gguf")
    remove_stale_temps(out.parent, out.stem)  # what a killed export of this name was writing
    _check_out(out, force, _existing_outputs(out))
    if ot.llama_quantize:
        _require_llama_cpp(ot)
    source.verify_residual()
    m = _model(source)
    window = m.hp.get(m.spec.ignored_window_key) if m.spec.ignored_window_key else None
    if window:
        warnings.append(
            f"{m.spec.ignored_window_key}={window}: llama.cpp's {m.arch} graph attends to the whole context, "
            f"so its outputs differ from transformers' past {window} tokens (llama.cpp's converter does the same)"
        )
    embed = next((i for i in source.infos() if i.name.endswith("embed_tokens.weight")), None)
    if embed is None:
        raise ExportError(f"{source.root} has no embed_tokens.weight; the checkpoint is incomplete")
    n_vocab = embed.shape[0]
    vocab = _vocab(source, m, n_vocab, warnings)

    if ot.llama_quantize:
        base = OUTTYPES[_float_base(source)]
        plans = _plan(source, m, base, n_vocab, warnings)
        _check_space(out, plans, quantized=True)
        tmp_float = out.with_name(f".{out.stem}.{base.name}.tmp-{os.getpid()}.gguf")
        tmp_quant = out.with_name(f".{out.stem}.{ot.name}.tmp-{os.getpid()}.gguf")
        try:
            temps = _write(source, tmp_float, m, base, plans, vocab, n_vocab, None, provenance, progress)
            temps[0].replace(tmp_float)
            _verify([tmp_float], plans, source)
            _llama_quantize(tmp_float, tmp_quant, ot)
            tmp_float.unlink(missing_ok=True)
            if split_max_size:
                temps = _resplit(tmp_quant, out, split_max_size)
                tmp_quant.unlink(missing_ok=True)
            else:
                temps = [tmp_quant]
        except BaseException:
            tmp_float.unlink(missing_ok=True)
            tmp_quant.unlink(missing_ok=True)
            raise
        check_against = None  # llama.cpp's quantizer: types and shapes, not values
    else:
        plans = _plan(source, m, ot, n_vocab, warnings)
        _check_space(out, plans, quantized=False)
        temps = _write(source, out, m, ot, plans, vocab, n_vocab, split_max_size, provenance, progress)
        check_against = source
    finals = _split_names(out, len(temps))
    try:
        _verify(temps, plans, check_against, exact_types=check_against is not None)
        _check_out(out, force, [f for f in _existing_outputs(out) if f in finals])  # appeared meanwhile?
        _put_in_place(out, temps, finals)
    except BaseException:
        for t in temps:
            t.unlink(missing_ok=True)
        raise
    return GGUFResult(
        path=finals[0],
        paths=finals,
        tensor_count=len(plans),
        bytes=sum(f.stat().st_size for f in finals),
        outtype=ot.name,
        arch=m.arch,
        seconds=time.monotonic() - start,
        tokenizer=vocab.kind,
        pre_tokenizer=vocab.pre if vocab.model == "gpt2" else None,
        warnings=warnings,
    )


def _split_files(out: Path) -> list[Path]:
    """Files of earlier split exports under this name, first parts first."""
    parts = out.parent.glob(f"{glob.escape(out.stem)}-0*-of-0*.gguf")
    return sorted(parts, key=lambda p: (not p.name.startswith(f"{out.stem}-00001-of-"), p.name))


def _existing_outputs(out: Path) -> list[Path]:
    """What an export to `out` would replace: the file, or a split's first part (the file llama.cpp
    opens). Later parts without their first are what a killed export left, not an output."""
    return [p for p in [out, *_split_files(out)] if p == out or p.name.startswith(f"{out.stem}-00001-of-")]


def _put_in_place(out: Path, temps: list[Path], finals: list[Path]) -> None:
    """Rename the temps to their final names so a kill part-way never leaves a loadable mix: the
    new first part comes last (llama.cpp opens a split through it, and a rerun ignores later parts
    without one). An earlier export under this name (--force) waits aside until the new one is in
    place, and comes back if the renames are cut short."""
    earlier = [p for p in [out, *_split_files(out)] if p.exists()]
    try:
        for p in earlier:  # first parts first: an earlier split is never left loadable but partial
            os.replace(p, aside_name(p))
        for t, f in list(zip(temps, finals, strict=True))[::-1]:
            t.replace(f)
    except BaseException:
        for t, f in zip(temps, finals, strict=True):
            if not t.exists():  # renamed already
                f.unlink(missing_ok=True)
        for p in earlier[::-1]:
            if aside_name(p).exists():
                os.replace(aside_name(p), p)
        raise
    mark_complete(finals[0])
    remove_path(*(aside_name(p) for p in earlier))


def _float_base(source: MergedSource) -> str:
    """The float file llama.cpp's quantizer starts from: the checkpoint's own precision."""
    dtypes = [i.dtype for i in source.infos() if len(i.shape) == 2]
    common = max(set(dtypes), key=dtypes.count) if dtypes else "F16"
    return {"F32": "f32", "BF16": "bf16"}.get(common, "f16")
