"""Meta's original Llama release (`consolidated.NN.pth` + `params.json` + `tokenizer.model`) read as
the Hugging Face Llama checkpoint that transformers' `convert_llama_weights_to_hf` makes of it,
one tensor at a time, so `decompose` streams it like any HF checkpoint and writes an ordinary one.

The conversion rules (transformers 4.x's converter): names mapped by `LAYER_RULES` / `TOP_RULES`;
wq and wk permuted from Meta's interleaved rotary pairs into HF's two halves per head; the
config from params.json (intermediate_size by `intermediate_size()`, Meta's formula); models
split over several model-parallel files joined along each tensor's split dimension (wq, wk, wv,
w1, w3, output: rows; wo, w2: columns; tok_embeddings: columns in Llama 1/2, rows in Llama 3,
told apart by shape; norms replicated, and checked equal). The tokenizer is transformers'
LlamaTokenizer built from tokenizer.model (needs sentencepiece and protobuf).

Files are opened only with `torch.load(weights_only=True, mmap=True)`: never an unrestricted
unpickler, and a file that the restricted one refuses is refused. Peak memory: a read allocates
the tensor in the HF layout and maps the part files one after the other (mmap: pages come in as
they are touched and go with the mapping), copying each part's piece straight into its place,
q/k permuted on the way. So one read holds one materialised tensor plus one mapped piece: for a
7B (1 file) never more than one tensor beyond the mmap; for N files one tensor plus 1/N of it,
with one consolidated file mapped at a time. `decompose` keeps a few reads in flight (its
lookahead, each read bounded so), as for an HF checkpoint; the model is never resident. Remapping a part per tensor
costs some tens of ms, nothing beside an SVD.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sorsa_tools.errors import CheckpointError, MissingDependencyError
from sorsa_tools.io.checkpoint import Checkpoint
from sorsa_tools.io.safetensors_file import DTYPE_CODES, MACHINE_LOCAL_KEYS, TensorInfo, atomic_write_bytes

PARAMS = "params.json"
TOKENIZER = "tokenizer.model"
PART_GLOB = "consolidated.*.pth"
_PART = re.compile(r"^consolidated\.(\d+)\.pth$")
OUTPUT_SHARD_BYTES = 5 * 10**9  # the output is split like transformers' save_pretrained splits
IGNORED = {"rope.freqs"}  # Llama 1/2 store the rotary frequencies, which HF computes itself
NOT_COPIED = (PARAMS, "*.chk")  # Meta's side files that an HF checkpoint does not carry
EMBED_SPLIT = -1  # tok_embeddings: the split dimension is read from the pieces' shapes


@dataclass(frozen=True)
class Rule:
    """One Meta tensor: its HF name, the model-parallel dimension its parts are joined along
    (None: replicated in every part), the params.json key of its head count where q/k's rotary
    layout is permuted, and its HF shape from the config (`rows x cols` of dims() keys)."""

    meta: str
    hf: str
    split: int | None
    heads: str | None
    shape: tuple[str, ...]


LAYER_RULES: tuple[Rule, ...] = (
    Rule("attention.wq.weight", "self_attn.q_proj.weight", 0, "n_heads", ("q", "dim")),
    Rule("attention.wk.weight", "self_attn.k_proj.weight", 0, "n_kv_heads", ("kv", "dim")),
    Rule("attention.wv.weight", "self_attn.v_proj.weight", 0, None, ("kv", "dim")),
    Rule("attention.wo.weight", "self_attn.o_proj.weight", 1, None, ("dim", "q")),
    Rule("feed_forward.w1.weight", "mlp.gate_proj.weight", 0, None, ("ffn", "dim")),
    Rule("feed_forward.w3.weight", "mlp.up_proj.weight", 0, None, ("ffn", "dim")),
    Rule("feed_forward.w2.weight", "mlp.down_proj.weight", 1, None, ("dim", "ffn")),
    Rule("attention_norm.weight", "input_layernorm.weight", None, None, ("dim",)),
    Rule("ffn_norm.weight", "post_attention_layernorm.weight", None, None, ("dim",)),
)
TOP_RULES: tuple[Rule, ...] = (  # (first, last): around the layers, in HF's order
    Rule("tok_embeddings.weight", "model.embed_tokens.weight", EMBED_SPLIT, None, ("vocab", "dim")),
    Rule("norm.weight", "model.norm.weight", None, None, ("dim",)),
    Rule("output.weight", "lm_head.weight", 0, None, ("vocab", "dim")),  # absent where tied (3.2 1B)
)
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "norm_eps")
OPTIONAL = {"output.weight"}  # absent where the output layer is tied to the embeddings (Llama 3.2 1B)


def intermediate_size(dim: int, ffn_dim_multiplier: float = 1.0, multiple_of: int = 256) -> int:
    """The FFN width Meta's model code computes: 2/3 of 4 dim, scaled, rounded up to multiple_of."""
    hidden = int(ffn_dim_multiplier * int(8 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def recognizes(root: Path) -> bool:
    """A directory in Meta's format: no HF config.json, and Meta's weights, or params.json and no
    safetensors (Mistral's own format has params.json and consolidated.safetensors: not this one;
    a Hub snapshot before its weights came down has params.json alone)."""
    if (root / "config.json").exists():
        return False
    if any(_PART.match(p.name) for p in root.glob(PART_GLOB)):
        return True
    return (root / PARAMS).is_file() and not any(root.glob("*.safetensors"))


def _params(root: Path) -> dict:
    path = root / PARAMS
    if not path.is_file():
        raise CheckpointError(
            f"{root} holds Meta-format Llama weights ({PART_GLOB}) but no {PARAMS}; put the {PARAMS} "
            "that came with them beside the weights"
        )
    try:
        p = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore the original file") from None
    p = p.get("model", p) if isinstance(p, dict) else p  # some releases nest it under "model"
    missing = [k for k in REQUIRED_PARAMS if not isinstance(p, dict) or k not in p]
    if missing:
        raise CheckpointError(f"{path} lacks {missing[0]!r}; restore the {PARAMS} of this model")
    bad = [
        k
        for k in REQUIRED_PARAMS
        if not isinstance(p[k], (int, float)) or isinstance(p[k], bool) or p[k] <= 0
    ]
    if bad:
        raise CheckpointError(
            f"{path}: {bad[0]} is {p[bad[0]]!r}, not a positive number; restore the original file"
        )
    return p


def _parts(root: Path) -> list[Path]:
    found = sorted((int(m[1]), p) for p in root.glob(PART_GLOB) if (m := _PART.match(p.name)))
    if not found:
        raise CheckpointError(f"{root} has {PARAMS} but no {PART_GLOB} weights; download them beside it")
    numbers = [n for n, _ in found]
    if numbers != list(range(len(numbers))):
        gap = next(i for i in range(len(numbers) + 1) if i not in numbers)
        raise CheckpointError(
            f"{root}: consolidated.{gap:02d}.pth is missing (found "
            f"{', '.join(f'{n:02d}' for n in numbers)}); put every model-parallel part in {root}"
        )
    return [p for _, p in found]


def load_part(path: Path) -> dict[str, torch.Tensor]:
    """One part file, memory-mapped, through the restricted unpickler only."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln), "")
        why = (
            why.removeprefix("WeightsUnpickler error: ").split(" was not an allowed")[0] or "a pickled object"
        )
        raise CheckpointError(
            f"{path} is not a plain tensor dict: torch.load(weights_only=True) refuses it ({why}); it is "
            "not read, since unpickling it could run code: use the original file"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path} is truncated, corrupt or in torch's legacy (non-zip) format, which cannot be "
            f"memory-mapped ({str(e).splitlines()[0][:120]}); re-download it"
        ) from None
    if not isinstance(sd, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise CheckpointError(
            f"{path} holds a {type(sd).__name__} that is not a plain dict of tensors; it is not a Meta "
            "Llama checkpoint part: use the original consolidated.NN.pth"
        )
    return sd


@dataclass(frozen=True)
class Source:
    """Where one HF tensor comes from and how its pieces are assembled."""

    rule: Rule
    meta: str
    split: int | None
    heads: int | None  # heads per part, for the rotary permutation
    shape: tuple[int, ...]
    dtype: torch.dtype


def _permute_into(dst: torch.Tensor, piece: torch.Tensor, heads: int) -> None:
    """Meta's rotary layout (per head, interleaved (re, im) pairs) into HF's (per head, all re
    then all im): row 2i+j of a head goes to row j*hd/2+i. The permutation stays inside heads, so
    each part's whole heads are permuted on their own, straight into their rows of the output."""
    rows, cols = piece.shape
    dst.view(heads, 2, rows // heads // 2, cols).copy_(
        piece.view(heads, rows // heads // 2, 2, cols).transpose(1, 2)
    )


class Reader:
    """HF tensors from the part files, read on demand (see the module docstring for the memory)."""

    def __init__(self, parts: list[Path], sources: dict[str, Source]):
        self.parts = parts
        self.sources = sources

    def read(self, name: str) -> torch.Tensor:
        s = self.sources[name]
        if s.split is None:  # replicated (checked equal on opening): part 0's copy
            sd = load_part(self.parts[0])
            out = sd[s.meta].clone()
            del sd
            return out
        out = torch.empty(s.shape, dtype=s.dtype)
        pos = 0
        for part in self.parts:  # one part mapped at a time; its piece copied into place
            sd = load_part(part)
            t = sd[s.meta]
            dst = out.narrow(s.split, pos, t.shape[s.split])
            pos += t.shape[s.split]
            if s.heads:
                _permute_into(dst, t, s.heads)
            else:
                dst.copy_(t)
            del sd, t  # the mapping goes here: nothing of the part stays resident
        return out


class MetaShard:
    """One output shard of the HF layout; `decompose` streams it like a safetensors source shard."""

    def __init__(self, name: str, infos: list[TensorInfo], reader: Reader):
        self.path = Path(name)
        self.tensors = {i.name: i for i in infos}
        self.metadata = {"format": "pt"}
        self.size = sum(i.nbytes for i in infos)
        self.reader = reader

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read_tensor(self, name: str) -> torch.Tensor:
        return self.reader.read(name)


@dataclass
class MetaLlamaCheckpoint(Checkpoint):
    """A Meta-format directory seen as the HF checkpoint it converts to: `config` is the HF
    config, `generated` the files an HF checkpoint has and Meta's release lacks (config.json,
    tokenizer.json, tokenizer_config.json), written beside the output by `write_side_files`."""

    generated: dict[str, bytes] = field(default_factory=dict)
    digest: str = ""

    def side_files(self) -> list[Path]:
        return [p for p in super().side_files() if not any(fnmatch.fnmatch(p.name, g) for g in NOT_COPIED)]

    def fingerprint(self) -> str:
        return self.digest

    def write_side_files(self, out: Path) -> None:
        super().write_side_files(out)
        for name, data in self.generated.items():
            atomic_write_bytes(out / name, data)


def _replicated(meta: str) -> bool:
    rules = (*LAYER_RULES, *TOP_RULES)
    return any(r.split is None and (meta == r.meta or meta.endswith("." + r.meta)) for r in rules)


def _listing(parts: list[Path]) -> list[dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """(shape, dtype) of every tensor of every part, one part mapped at a time; the replicated
    tensors (norms, small) compared with part 0's on the way."""
    out = []
    first: dict[str, torch.Tensor] = {}
    for i, p in enumerate(parts):
        sd = load_part(p)
        out.append({k: (tuple(v.shape), v.dtype) for k, v in sd.items() if k not in IGNORED})
        for k, v in sd.items():
            if len(parts) == 1 or not _replicated(k):
                continue
            if i == 0:
                first[k] = v.clone()
            elif k in first and v.shape == first[k].shape and not torch.equal(v, first[k]):
                raise CheckpointError(
                    f"{k} differs between {parts[0].name} and {p.name}, but it is replicated in every "
                    "model-parallel part: the parts come from different models"
                )
        del sd
    return out


def _dims(p: dict, listing: list[dict]) -> dict[str, int]:
    dim, n_heads = int(p["dim"]), int(p["n_heads"])
    kv = int(p.get("n_kv_heads") or n_heads)
    if dim % n_heads or n_heads % kv:
        raise CheckpointError(
            f"{PARAMS}: dim {dim}, n_heads {n_heads}, n_kv_heads {kv} do not divide evenly; restore the "
            f"original {PARAMS}"
        )
    hd = dim // n_heads
    if "tok_embeddings.weight" not in listing[0]:
        raise CheckpointError(
            "the Meta checkpoint has no tok_embeddings.weight; it is not a Llama checkpoint"
        )
    rows = [lst["tok_embeddings.weight"][0][0] for lst in listing if "tok_embeddings.weight" in lst]
    split_rows = len(listing) > 1 and listing[0]["tok_embeddings.weight"][0][-1] == dim  # Llama 3
    vocab = sum(rows) if split_rows else rows[0]
    ffn = intermediate_size(dim, p.get("ffn_dim_multiplier") or 1.0, int(p.get("multiple_of", 256)))
    return {
        "dim": dim,
        "q": n_heads * hd,
        "kv": kv * hd,
        "ffn": ffn,
        "vocab": vocab,
        "n_heads": n_heads,
        "n_kv_heads": kv,
    }


def _rules(layers: int, keys: set[str]) -> list[tuple[Rule, str, str]]:
    """(rule, Meta name, HF name) of every tensor, in HF order; output.weight only where stored."""
    first, *last = TOP_RULES
    out = [(first, first.meta, first.hf)]
    out += [
        (r, f"layers.{i}.{r.meta}", f"model.layers.{i}.{r.hf}") for i in range(layers) for r in LAYER_RULES
    ]
    return out + [(r, r.meta, r.hf) for r in last if r.meta in keys or r.meta not in OPTIONAL]


def _sources(p: dict, parts: list[Path], listing: list[dict]) -> dict[str, Source]:
    """Every HF tensor's Source, after checking that the parts fit together and match params.json."""
    d = _dims(p, listing)
    layers = int(p["n_layers"])
    keys = set(listing[0])
    for path, lst in zip(parts[1:], listing[1:], strict=True):
        if set(lst) != keys:
            raise CheckpointError(
                f"{path.name} and {parts[0].name} hold different tensors (e.g. {sorted(set(lst) ^ keys)[0]}); "
                "the model-parallel parts come from different models"
            )
    rules = _rules(layers, keys)
    extra = sorted(keys - {meta for _, meta, _ in rules})
    if extra:
        raise CheckpointError(
            f"{parts[0].name} holds {extra[0]}, which Llama with n_layers {layers} ({PARAMS}) does not have; "
            f"this is not a Llama checkpoint, or {PARAMS} belongs to another model"
        )
    return {hf: _source(rule, meta, d, parts, listing, layers) for rule, meta, hf in rules}


def _source(
    rule: Rule, meta: str, d: dict[str, int], parts: list[Path], listing: list[dict], layers: int
) -> Source:
    n = len(parts)
    if meta not in listing[0]:
        raise CheckpointError(
            f"{parts[0].name} lacks {meta}, which Llama with n_layers {layers} ({PARAMS}) has; "
            "re-download the checkpoint"
        )
    shapes = [lst[meta][0] for lst in listing]
    dtypes = sorted({str(lst[meta][1]).removeprefix("torch.") for lst in listing})
    if len(dtypes) > 1:
        raise CheckpointError(
            f"{meta} is stored as {' and '.join(dtypes)} in different parts: the model-parallel parts come "
            "from different models"
        )
    split = rule.split
    if split == EMBED_SPLIT:  # Llama 3 splits the vocabulary (rows), Llama 1/2 the width (columns)
        split = 0 if shapes[0][-1] == d["dim"] and n > 1 else 1
    want = tuple(d[k] for k in rule.shape)
    got = _joined(shapes, split, parts, meta)
    if got != want:
        raise CheckpointError(
            f"{meta} joined over {n} part(s) has shape {got}, but {PARAMS} implies {want}: a model-parallel "
            f"part is missing or of another model, or {PARAMS} does not belong to these weights"
        )
    if rule.heads and d[rule.heads] % n:
        raise CheckpointError(
            f"{rule.heads} {d[rule.heads]} does not split over {n} model-parallel parts (heads replicated "
            "across parts); such a checkpoint is not read here"
        )
    return Source(rule, meta, split, d[rule.heads] // n if rule.heads else None, want, listing[0][meta][1])


def _joined(
    shapes: list[tuple[int, ...]], split: int | None, parts: list[Path], meta: str
) -> tuple[int, ...]:
    """The shape of the pieces joined along `split` (None: replicated, all equal)."""
    first = shapes[0]
    for path, s in zip(parts[1:], shapes[1:], strict=True):
        same = [i for i in range(len(first)) if i != split]
        if len(s) != len(first) or any(s[i] != first[i] for i in same) or (split is None and s != first):
            raise CheckpointError(
                f"{meta} is {'x'.join(map(str, s))} in {path.name} but {'x'.join(map(str, first))} in "
                f"{parts[0].name}: the model-parallel parts do not fit together (another model's part?)"
            )
    if split is None:
        return first
    return tuple(sum(s[split] for s in shapes) if i == split else first[i] for i in range(len(first)))


def max_positions(p: dict) -> int:
    """The context length: params.json's max_seq_len where it says, else by release as the
    converter's per-version table gives it (Code Llama's rope_theta 1e6: 16384; LLaMA 1, told by
    its norm_eps 1e-6: 2048; Llama 2: 4096)."""
    if p.get("max_seq_len"):
        return int(p["max_seq_len"])
    if float(p.get("rope_theta", 10000.0)) > 10000.0:
        return 16384
    return 2048 if float(p["norm_eps"]) == 1e-6 else 4096


def _tokenizer_files(root: Path) -> tuple[dict[str, bytes], object]:
    """tokenizer.model as the converter turns it into HF files (LlamaTokenizer), in memory, and
    the tokenizer (its bos / eos ids go into the config)."""
    path = root / TOKENIZER
    if not path.is_file():
        raise CheckpointError(
            f"{root} has no {TOKENIZER}; put the {TOKENIZER} that came with the weights beside them"
        )
    try:
        import google.protobuf  # noqa: F401  transformers reads the .model proto with it
        import sentencepiece as spm
    except ImportError:
        raise MissingDependencyError(
            f"reading {TOKENIZER} needs the sentencepiece and protobuf packages: "
            "pip install sentencepiece protobuf"
        ) from None
    try:
        spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):
        raise CheckpointError(
            f"{path} is not a sentencepiece model (Llama 3 ships a tiktoken one, which is not read here: "
            "use its Hugging Face repo, e.g. meta-llama/Meta-Llama-3-8B)"
        ) from None
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory(prefix="sorsa-tok-") as tmp:
        t = Path(tmp)
        (t / "src").mkdir()
        (t / "src" / TOKENIZER).write_bytes(path.read_bytes())
        tok = LlamaTokenizer.from_pretrained(t / "src", add_bos_token=True, add_eos_token=False)
        tok.save_pretrained(t / "out")
        files = {p.name: p.read_bytes() for p in sorted((t / "out").iterdir()) if p.name != TOKENIZER}
    for name, data in files.items():  # what describes this machine, not the model, is not published
        if name.endswith("config.json"):
            cfg = {k: v for k, v in json.loads(data).items() if k not in MACHINE_LOCAL_KEYS}
            files[name] = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
    return files, tok


def _config_bytes(p: dict, d: dict[str, int], tok, tied: bool, dtype: torch.dtype) -> bytes:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=d["dim"],
        intermediate_size=d["ffn"],
        num_attention_heads=d["n_heads"],
        num_key_value_heads=d["n_kv_heads"],
        num_hidden_layers=int(p["n_layers"]),
        rms_norm_eps=float(p["norm_eps"]),
        vocab_size=d["vocab"],
        rope_theta=float(p.get("rope_theta", 10000.0)),
        max_position_embeddings=max_positions(p),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=tied,
        architectures=["LlamaForCausalLM"],
    )
    cfg.dtype = dtype
    return (cfg.to_json_string(use_diff=True)).encode()


def _layout(sources: dict[str, Source]) -> list[list[TensorInfo]]:
    """HF order, cut into shards of at most OUTPUT_SHARD_BYTES (a bigger tensor alone)."""
    shards: list[list[TensorInfo]] = [[]]
    size = pos = 0
    for name, s in sources.items():
        numel = 1
        for k in s.shape:
            numel *= k
        nbytes = numel * torch.empty((), dtype=s.dtype).element_size()
        if shards[-1] and size + nbytes > OUTPUT_SHARD_BYTES:
            shards.append([])
            size = pos = 0
        shards[-1].append(TensorInfo(name, DTYPE_CODES[s.dtype], s.shape, pos, pos + nbytes))
        size += nbytes
        pos += nbytes
    return shards


def open_source(root: str | Path) -> MetaLlamaCheckpoint:
    """Check the directory whole (params, every part's tensor list and shapes, the tokenizer)
    before anything is written, and lay out the HF checkpoint it converts to."""
    root = Path(root)
    p = _params(root)
    parts = _parts(root)
    listing = _listing(parts)
    sources = _sources(p, parts, listing)
    d = _dims(p, listing)
    if int(p.get("vocab_size") or -1) > 0 and int(p["vocab_size"]) != d["vocab"]:
        raise CheckpointError(
            f"{PARAMS} says vocab_size {p['vocab_size']} but tok_embeddings has {d['vocab']} rows; "
            f"restore the original {PARAMS}"
        )
    files, tok = _tokenizer_files(root)
    tied = "lm_head.weight" not in sources
    embed_dtype = sources["model.embed_tokens.weight"].dtype
    files = {"config.json": _config_bytes(p, d, tok, tied, embed_dtype), **files}
    reader = Reader(parts, sources)
    layout = _layout(sources)
    if len(layout) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(layout):05d}.safetensors" for i in range(len(layout))]
    shards = [MetaShard(n, infos, reader) for n, infos in zip(names, layout, strict=True)]
    weight_map = {i.name: s.path.name for s in shards for i in s.tensors.values()}
    index = {"metadata": {}, "weight_map": weight_map} if len(shards) > 1 else None
    h = hashlib.sha256((root / PARAMS).read_bytes())
    for path, lst in zip(parts, listing, strict=True):
        h.update(f"{path.name}:{path.stat().st_size}".encode())
        h.update(json.dumps(sorted((k, list(s), str(t)) for k, (s, t) in lst.items())).encode())
    h.update(hashlib.sha256((root / TOKENIZER).read_bytes()).digest())
    return MetaLlamaCheckpoint(
        root,
        json.loads(files["config.json"]),
        shards,
        index,
        weight_map,
        generated=files,
        digest=h.hexdigest(),
    )
