"""Per-architecture knowledge, as tables: which linear weights SORSA adapts by default.

A module name M is a weight name minus `.weight` (`model.layers.0.self_attn.q_proj`).
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass

from sorsa_tools.errors import TargetError

# Prefixes under which decoder blocks live, text-only and multimodal checkpoints alike.
_DECODER_BLOCKS = r"(?:model\.|model\.language_model\.|language_model\.model\.)?layers\.\d+\."
_LLAMA_LIKE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class ArchSpec:
    """Default targets of one architecture family: block prefix regex + module paths in a block."""

    model_types: tuple[str, ...]
    block: str
    modules: tuple[str, ...]

    @property
    def pattern(self) -> re.Pattern[str]:
        mods = "|".join(re.escape(m) for m in self.modules)
        return re.compile(rf"^{self.block}(?:{mods})$")


ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec(
        (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
            "cohere",
        ),
        _DECODER_BLOCKS,
        _LLAMA_LIKE,
    ),
    ArchSpec(
        ("phi3",),
        _DECODER_BLOCKS,
        ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    ),
    ArchSpec(
        ("gpt_neox",),
        r"gpt_neox\.layers\.\d+\.",
        ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ),
)


def spec_for(model_type: str | None) -> ArchSpec | None:
    for spec in ARCHS:
        if model_type in spec.model_types:
            return spec
    return None


def model_type_of(config: dict) -> str | None:
    return config.get("model_type")


def parse_target_spec(spec: str) -> tuple[str, list[str] | re.Pattern[str]]:
    """`q_proj,v_proj` -> names matched against the end of M; anything else is a regex on M."""
    spec = spec.strip()
    if re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*(\s*,\s*[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*)*", spec):
        return "names", [s.strip() for s in spec.split(",")]
    try:
        return "regex", re.compile(spec)
    except re.error as e:
        raise TargetError(f"--targets {spec!r} is neither a list of names nor a valid regex ({e})") from None


# Checkpoint prefixes that transformers renames when it builds the model: multimodal wrappers
# (Gemma 3, Llava-style) are saved with legacy keys. Checkpoint name -> live module name.
CHECKPOINT_PREFIX_RENAMES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head", "lm_head"),
)


def live_module_name(name: str, live: Container[str]) -> str | None:
    """The name under which the built model holds the module a checkpoint calls `name` (the
    adapter format keeps checkpoint names); None if it holds no such module."""
    if name in live:
        return name
    for old, new in CHECKPOINT_PREFIX_RENAMES:
        if name.startswith(old) and new + name[len(old) :] in live:
            return new + name[len(old) :]
    return None


def _matches(module: str, how: str, what) -> bool:
    if how == "names":
        return any(module == n or module.endswith("." + n) for n in what)
    return bool(what.search(module))


def meta_model(config: dict):
    """The model of `config` built on the meta device (no memory, no weights): its module types."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _module_of(model, live: dict, name: str):
    """The module a checkpoint name refers to (as the trainer resolves it, or with or without the
    model's base prefix); None if the name does not resolve (checkpoint and class naming differ)."""
    hit = live_module_name(name, live)
    if hit is not None:
        return live[hit]
    prefix = getattr(model, "base_model_prefix", "") + "."
    for cand in (name[len(prefix) :] if name.startswith(prefix) else None, prefix + name):
        if cand in live:
            return live[cand]
    return None


def _tied_head(model):
    """The model's output layer where it is tied to the input embeddings (no weight of its own to
    adapt), else None."""
    out = model.get_output_embeddings()
    return out if out is not None and getattr(model.config, "tie_word_embeddings", False) else None


def check_linear_targets(config: dict, targets: list[str]) -> None:
    """Refuse a --targets choice that the trainer and exporters cannot adapt: a module that is not
    an nn.Linear (an embedding), or an output layer tied to the input embeddings (its W_r would be
    ignored on load). Silent where transformers cannot build the architecture."""
    import torch

    try:
        model = meta_model(config)
    except Exception:  # unknown to this transformers: nothing to check against
        return
    tied_head = _tied_head(model)
    live = dict(model.named_modules())
    for m in targets:
        mod = _module_of(model, live, m)
        if mod is None:
            continue
        if not isinstance(mod, torch.nn.Linear):
            raise TargetError(
                f"--targets selects {m} ({type(mod).__name__}), not a linear layer: SORSA adapts nn.Linear "
                "weights only; leave it out of --targets"
            )
        if mod is tied_head:
            raise TargetError(
                f"--targets selects {m}, which this model ties to its input embeddings "
                "(tie_word_embeddings): its residual would be ignored on load; leave it out of --targets"
            )


def _refuse_unmatched(config: dict, labels: list[str], modules_2d: list[str]) -> None:
    """--targets names (or a regex) that select no weight. A tied output layer has no weight of its
    own in the checkpoint: it gets its own reason; anything else, what the module names look like."""
    try:
        model = meta_model(config)
        head = _tied_head(model)
        heads = [n for n, mod in model.named_modules() if mod is head]  # none where untied
    except Exception:  # unknown to this transformers: no tie to explain
        heads = []
    for label in labels:
        if any(h == label or h.endswith("." + label) for h in heads):
            raise TargetError(
                f"--targets names {label}, which this model ties to its input embeddings "
                "(tie_word_embeddings): it has no weight of its own to adapt; leave it out of --targets"
            )
    in_blocks = [m for m in modules_2d if re.search(r"\.\d+\.", m)]
    example = (in_blocks or modules_2d or ["model.layers.0.self_attn.q_proj"])[0]
    raise TargetError(
        f"--targets {', '.join(map(repr, labels))} matches no 2-D weight of this checkpoint; module names "
        f"look like {example} (use names such as q_proj,v_proj or a regex)"
    )


def generic_targets(config: dict, modules_2d: list[str]) -> list[str]:
    """Linear layers inside repeated blocks, found by building the model on the meta device."""
    try:
        import torch

        model = meta_model(config)
    except Exception as e:  # any failure means: we cannot know this architecture
        raise TargetError(
            f"architecture {config.get('model_type')!r} is not in the target table and transformers "
            f"cannot build it ({type(e).__name__}); pass --targets with module names or a regex"
        ) from None
    in_blocks = {name: mod for name, mod in model.named_modules() if re.search(r"\.\d+\.", "." + name + ".")}
    linear = {name for name, mod in in_blocks.items() if isinstance(mod, torch.nn.Linear)}
    present = set(modules_2d)
    hits = [m for m in modules_2d if m in linear]
    if not hits:
        prefix = getattr(model, "base_model_prefix", "") + "."
        hits = [m for m in present if m.startswith(prefix) and m[len(prefix) :] in linear]
        hits += [m for m in present if prefix + m in linear]
    if not hits and any(type(mod).__name__ == "Conv1D" for mod in in_blocks.values()):
        # GPT-2 style: the projections are transformers Conv1D, not nn.Linear
        raise TargetError(
            f"this {config.get('model_type')!r} checkpoint's projections are Conv1D modules, not nn.Linear: "
            "SORSA cannot adapt them (train, merge and export replace nn.Linear); use a model with linear "
            "projections"
        )
    return sorted(set(hits), key=modules_2d.index)


def select_targets(
    config: dict, weights: dict[str, tuple[int, ...]], spec: str | None = None
) -> tuple[list[str], list[str]]:
    """Choose target modules from the checkpoint's weight shapes.

    Returns (targets in checkpoint order, warnings). Only 2-D `.weight` tensors can be targets.
    """
    modules_2d = [
        n[: -len(".weight")] for n, shp in weights.items() if n.endswith(".weight") and len(shp) == 2
    ]
    warnings: list[str] = []
    if spec:
        how, what = parse_target_spec(spec)
        targets = [m for m in modules_2d if _matches(m, how, what)]
        # a list of names: each must select a weight (a typo is not silently dropped); a regex: itself
        parts = [(n, [n]) for n in what] if how == "names" else [(spec, what)]
        unmatched = [(label, w) for label, w in parts if not any(_matches(m, how, w) for m in modules_2d)]
        for label, w in unmatched:
            bad = [n for n in weights if _matches(n.removesuffix(".weight"), how, w)]
            if bad:
                raise TargetError(
                    f"--targets {label!r} matches only tensors that are not 2-D weights (e.g. {bad[0]}); "
                    "name linear layers such as q_proj,v_proj"
                )
        if unmatched:
            _refuse_unmatched(config, [label for label, _ in unmatched], modules_2d)
        check_linear_targets(config, targets)
        return targets, warnings
    mt = model_type_of(config)
    arch = spec_for(mt)
    if arch is not None:
        targets = [m for m in modules_2d if arch.pattern.match(m)]
        if not targets:
            raise TargetError(
                f"no weight of this {mt} checkpoint matches the default targets "
                f"({', '.join(arch.modules)}); pass --targets"
            )
        return targets, warnings
    targets = generic_targets(config, modules_2d)
    if not targets:
        raise TargetError(
            f"found no linear layers inside repeated blocks of this {mt!r} checkpoint; pass --targets "
            "with module names or a regex"
        )
    warnings.append(
        f"architecture {mt!r} is not in the target table: adapting every nn.Linear inside the "
        f"repeated blocks ({len(targets)} modules); pass --targets to choose"
    )
    return targets, warnings
