"""`sorsa push`: a SORSA artifact to the Hugging Face Hub, with a model card written from its
provenance.

What PATH is comes from the files it holds (the `KINDS` table): a merged HF dir, a GGUF file or
split set, a PEFT LoRA export, a trained run or a decomposed dir. The card (base model, method,
rank, gamma, lr, steps, data, metrics, how to use it, Hub metadata) is built in memory and
committed as README.md: nothing is written into PATH. A README.md that PATH already holds is the
user's and is uploaded as is (`card="auto"`); `card="overwrite"` sends the generated card in its
place (PATH's file is left alone), `card="skip"` sends no generated card.

Payloads up to LARGE_UPLOAD_BYTES go in one commit (`create_commit`: files and card together);
bigger ones through the library's resumable large-folder upload, then the card in a last commit.
The token is passed to huggingface_hub and never appears in a message.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sorsa_tools.errors import ArtifactError, HubAuthError, HubError, InputError, SorsaError
from sorsa_tools.format import ADAPTER_FILE, CONFIG_FILE, read_config
from sorsa_tools.io.placement import temp_path

PROVENANCE_FILE = "sorsa_provenance.json"  # = sorsa_tools.source.PROVENANCE_FILE (no torch import here)
GGUF_PROVENANCE_KEY = "sorsa.provenance"
PAPER_URL = "https://arxiv.org/abs/2409.00055"
CARD_FILE = "README.md"
CARD_MODES = ("auto", "overwrite", "skip")
# One commit carries up to this much; beyond, an interrupted upload should resume, not restart.
LARGE_UPLOAD_BYTES = 10 * 2**30
LARGE_UPLOAD_FILES = 200
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


@dataclass(frozen=True)
class ArtifactKind:
    """One row of the detection table: the files that identify a kind and how it is published."""

    name: str
    what: str  # how messages and the card name it
    made_by: str  # the command that writes it
    requires: tuple[str, ...]  # globs; each must match a file at the top of PATH (or PATH's name)
    is_file: bool = False  # PATH is a file, not a directory
    config_kind: str | None = None  # the "kind" its sorsa_config.json must say
    upload: tuple[str, ...] | None = None  # globs of the files sent (None: all but hidden ones)
    library_name: str | None = None
    tags: tuple[str, ...] = ()
    relation: str | None = None  # Hub `base_model_relation`
    pipeline_tag: str | None = None


# First match wins: the two sorsa_config.json kinds come before the plain checkpoint they contain.
KINDS: tuple[ArtifactKind, ...] = (
    ArtifactKind(
        "sorsa-adapter",
        "a trained SORSA adapter",
        "sorsa train",
        (ADAPTER_FILE, CONFIG_FILE),
        config_kind="trained",
        upload=(ADAPTER_FILE, CONFIG_FILE, "train_log.jsonl", "loss.png"),
        tags=("sorsa", "adapter"),
        relation="adapter",
    ),
    ArtifactKind(
        "decomposition",
        "a SORSA decomposition (residual checkpoint + factors)",
        "sorsa decompose",
        (ADAPTER_FILE, CONFIG_FILE, "config.json"),
        config_kind="decomposition",
        tags=("sorsa", "decomposition"),
    ),
    ArtifactKind(
        "lora",
        "a PEFT LoRA export",
        "sorsa export-lora",
        ("adapter_config.json", "adapter_model.safetensors", PROVENANCE_FILE),
        library_name="peft",
        tags=("sorsa", "peft", "lora"),
        relation="adapter",
    ),
    ArtifactKind(
        "merged-hf",
        "a merged Hugging Face checkpoint",
        "sorsa merge --to hf",
        ("config.json", "*.safetensors", PROVENANCE_FILE),
        library_name="transformers",
        tags=("sorsa", "safetensors"),
        relation="finetune",
        pipeline_tag="text-generation",
    ),
    ArtifactKind(
        "gguf",
        "a GGUF file or split set",
        "sorsa merge --to gguf",
        ("*.gguf",),
        is_file=True,
        library_name="gguf",
        tags=("sorsa", "gguf"),
        pipeline_tag="text-generation",
    ),
)


@dataclass
class Artifact:
    """What PATH holds: its kind, the files to send (path in repo, local path, bytes), its provenance."""

    kind: ArtifactKind
    path: Path
    root: Path  # the folder the files are relative to
    files: list[tuple[str, Path, int]]
    provenance: dict
    user_card: Path | None = None  # PATH/README.md, the user's own
    base_dirs: list[Path] = field(default_factory=list)  # local copies of the base model, if any
    gguf_license: str | None = None


@dataclass
class PushResult:
    """What was (or, for a dry run, would be) sent."""

    kind: str
    repo_id: str
    revision: str | None
    private: bool
    files: list[tuple[str, int]]  # path in repo, bytes (README.md included)
    bytes: int
    url: str
    commit: str | None
    card: str | None  # the generated card, None if none is sent
    card_source: str  # "generated", "user" (PATH's README.md) or "none"
    method: str  # "commit" or "large-folder"
    dry_run: bool


def accepted_kinds() -> str:
    return "; ".join(f"{k.what} (`{k.made_by}`)" for k in KINDS)


def check_repo_id(repo_id: str) -> None:
    """USER/NAME as the Hub allows it (checked here so a typo fails before any upload)."""
    name = repo_id.split("/")[-1]
    if (
        not _REPO_ID.match(repo_id)
        or len(name) > 96
        or "--" in repo_id
        or ".." in repo_id
        or name.endswith((".", "-", ".git"))
    ):
        raise InputError(
            f"bad repo id {repo_id!r}: use USER/NAME (letters, digits, '-', '_', '.'; no '--' or '..'; "
            "name at most 96 characters), e.g. --repo-id alice/llama2-7b-sorsa"
        )


# --------------------------------------------------------------------------- detection


def _matches(d: Path, pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(p.name, pattern) for p in d.iterdir() if p.is_file())


def _listing(root: Path, upload: tuple[str, ...] | None) -> list[tuple[str, Path, int]]:
    """Files under root to send, sorted; hidden paths (.cache, .git, partial markers) never."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in rel.split("/")) or rel == CARD_FILE:
            continue
        if upload is not None and not any(fnmatch.fnmatchcase(rel, g) for g in upload):
            continue
        out.append((rel, p, p.stat().st_size))
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(
            f"{path} is not valid JSON ({e}); re-create it with the command that made it"
        ) from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} does not hold a JSON object; re-create it with the command that made it")
    return data


def detect_artifact(path: str | Path) -> Artifact:
    """Which kind PATH is (the first row of KINDS whose files it has) and what to send."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ArtifactError(f"no such file or directory: {p}; pass one of: {accepted_kinds()}")
    if p.is_file():
        kind = next((k for k in KINDS if k.is_file and fnmatch.fnmatchcase(p.name, k.requires[0])), None)
        if kind is None:
            raise ArtifactError(f"{p} is a file but not a .gguf file; pass one of: {accepted_kinds()}")
        return _gguf_artifact(p, kind)
    near = None
    for kind in KINDS:
        if kind.is_file:
            continue
        missing = [g for g in kind.requires if not _matches(p, g)]
        if not missing and kind.config_kind is not None:
            if read_config(p).get("kind") != kind.config_kind:
                continue
        if not missing:
            return _dir_artifact(p, kind)
        if near is None and len(missing) == 1 and len(kind.requires) > 1:
            near = (kind, missing[0])
    if near is not None:
        kind, missing = near
        raise ArtifactError(
            f"{p} looks like {kind.what} but has no {missing}; push the output of `{kind.made_by}` "
            "(any other folder: upload it with `hf upload`)"
        )
    if any(p.glob("*.gguf")):
        raise ArtifactError(f"{p} is a directory holding .gguf files; pass the .gguf file itself")
    raise ArtifactError(f"{p} is not an artifact sorsa push knows; pass one of: {accepted_kinds()}")


CARD_MARK = "<!-- sorsa-tools card sha256:{} (sorsa push sends a fresh one for the repository unless this file is edited) -->"


def _marked(text: str) -> str:
    return (
        text.rstrip("\n") + "\n\n" + CARD_MARK.format(hashlib.sha256(text.encode()).hexdigest()[:16]) + "\n"
    )


def is_generated_card(path: Path) -> bool:
    """A README.md that merge or export-lora wrote and nobody edited since (its digest still holds)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    body, sep, _ = text.rstrip("\n").rpartition("\n\n<!-- sorsa-tools card sha256:")
    return bool(sep) and _marked(body + "\n") == text


def write_card(path: str | Path, name: str) -> Path:
    """README.md in PATH (a merged dir or LoRA export, before it is put in place): the card push
    would send, used from the local directory NAME. push replaces it with the repository's own
    while it is unedited; an edited one is the user's and is sent as it is."""
    p = Path(path)
    text = _marked(str(build_card(detect_artifact(p), f"./{name}")))
    dst = p / CARD_FILE
    tmp = temp_path(dst)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _dir_artifact(p: Path, kind: ArtifactKind) -> Artifact:
    base_dirs: list[Path] = []
    if kind.config_kind is not None:
        cfg = read_config(p)
        prov = _sorsa_provenance(cfg)
        local = (cfg.get("base_model") or {}).get("local_path")
        if local:
            base_dirs.append(Path(local))
    else:
        prov = _read_json(p / PROVENANCE_FILE)
    for index in sorted(p.glob("*.safetensors.index.json")):  # a sharded checkpoint goes up whole
        shards = sorted(set((_read_json(index).get("weight_map") or {}).values()))
        missing = next((s for s in shards if not (p / s).is_file()), None)
        if missing is not None:
            raise ArtifactError(
                f"{p} is incomplete: {index.name} names {missing}, which is missing; re-create it with "
                f"`{kind.made_by}`"
            )
    readme = p / CARD_FILE
    return Artifact(
        kind,
        p,
        p,
        _listing(p, kind.upload),
        prov,
        user_card=readme if readme.is_file() and not is_generated_card(readme) else None,
        base_dirs=base_dirs,
    )


def _sorsa_provenance(cfg: dict) -> dict:
    """provenance() of a run or decomposition, from its sorsa_config.json (and the decomposition
    the run names, when it is still on this disk)."""
    from sorsa_tools.model import fingerprint
    from sorsa_tools.source import provenance

    if cfg.get("kind") == "decomposition":
        return provenance(SimpleNamespace(decomposition=cfg, adapter_config=cfg))
    job = fingerprint(cfg)
    decomposition = {**cfg, "job_id": job}
    dpath = (cfg.get("decomposition") or {}).get("path")
    if dpath:
        try:
            dcfg = read_config(Path(dpath))
            if dcfg.get("job_id") == job:
                decomposition = dcfg
        except SorsaError:
            pass  # moved or deleted: the run's own config says enough
    return provenance(SimpleNamespace(decomposition=decomposition, adapter_config=cfg))


def _gguf_artifact(p: Path, kind: ArtifactKind) -> Artifact:
    m = _SPLIT.match(p.name)
    shards = [p]
    if m:
        n = int(m["n"])
        shards = [p.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise ArtifactError(
                f"the split GGUF set of {p.name} is incomplete: {absent[0]} is missing "
                f"({len(absent)} of {n}); put every part in {p.parent} or export again"
            )
    fields = _gguf_fields(shards[0])
    raw = fields.get(GGUF_PROVENANCE_KEY)
    if raw is None:
        raise ArtifactError(
            f"{shards[0]} has no {GGUF_PROVENANCE_KEY} metadata, so it was not written by "
            f"`{kind.made_by}`; push its output (any other GGUF: upload it with `hf upload`)"
        )
    try:
        prov = json.loads(raw)
        assert isinstance(prov, dict)
    except (json.JSONDecodeError, AssertionError):
        raise ArtifactError(
            f"the {GGUF_PROVENANCE_KEY} metadata of {shards[0]} is not a JSON object; export it again"
        ) from None
    files = [(s.name, s, s.stat().st_size) for s in shards]
    return Artifact(kind, shards[0], p.parent, files, prov, gguf_license=fields.get("general.license"))


def _gguf_fields(path: Path) -> dict[str, Any]:
    """The string metadata of a GGUF file (the reader maps the file; tensors are not read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError on bad bytes
        raise ArtifactError(
            f"{path} is not a readable GGUF file ({e.__class__.__name__}: {e}); export it again"
        ) from None
    out = {}
    for name in (GGUF_PROVENANCE_KEY, "general.license"):
        f = reader.fields.get(name)
        if f is not None:
            v = f.contents()
            if isinstance(v, str):
                out[name] = v
    return out


# --------------------------------------------------------------------------- the model card


def _hub_base(prov: dict) -> str | None:
    """The base model's Hub id, when it came from the Hub (decompose records a revision then)."""
    from sorsa_tools.io.hub import looks_like_repo_id

    base = prov.get("base_model") or {}
    name = base.get("name_or_path")
    if name and base.get("revision") and looks_like_repo_id(name):
        return name
    return None


def _base_license(art: Artifact) -> dict:
    """license (and license_name / license_link for "other") from a local base model's README
    front matter, else the GGUF's general.license; {} when unknown."""
    from huggingface_hub import metadata_load

    name = (art.provenance.get("base_model") or {}).get("name_or_path")
    candidates = [*art.base_dirs] + ([Path(name).expanduser()] if name else [])
    for d in candidates:
        readme = d / CARD_FILE
        try:
            meta = metadata_load(readme) if readme.is_file() else None
        except Exception:  # a broken front matter is no reason to refuse the push
            meta = None
        if meta and meta.get("license"):
            keys = ("license", "license_name", "license_link")
            return {k: meta[k] for k in keys if isinstance(meta.get(k), str)}
    return {"license": art.gguf_license} if art.gguf_license else {}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _facts(art: Artifact) -> list[tuple[str, str]]:
    prov = art.provenance
    base = prov.get("base_model") or {}
    name = base.get("name_or_path")
    hub = _hub_base(prov)
    if hub:
        base_s = f"[{hub}](https://huggingface.co/{hub})" + (
            f" (revision `{base['revision'][:12]}`)" if base.get("revision") else ""
        )
    else:
        base_s = f"`{Path(name).name}` (a local checkpoint)" if name else "unknown"
    rows = [
        ("base model", base_s + (f", {base['model_type']}" if base.get("model_type") else "")),
        ("method", f"SORSA ([Cao 2024]({PAPER_URL}))" if prov.get("method") == "SORSA" else "unknown"),
    ]
    if prov.get("rank") is not None:
        n = prov.get("target_modules")
        rows.append(("rank", f"{prov['rank']}" + (f" on {n} weight matrices" if n else "")))
    t = prov.get("training")
    if t:
        for key, label in (("lr", "learning rate (peak)"), ("gamma", "gamma (orthonormal regularizer)")):
            if t.get(key) is not None:
                rows.append((label, _fmt(t[key])))
        if t.get("steps") is not None:
            extra = [f"{t['tokens']:,} tokens"] if t.get("tokens") else []
            if t.get("batch_size") is not None:
                extra.append(f"batch {t['batch_size']} x {t.get('grad_accum', 1)} accumulation")
            rows.append(("steps", f"{t['steps']}" + (f" ({', '.join(extra)})" if extra else "")))
        if t.get("final_loss") is not None:
            rows.append(("final training loss", _fmt(t["final_loss"])))
        if t.get("data"):
            # the file name only: the local path would publish the trainer's directory layout
            digest = f" (sha256 `{t['data_sha256']}`)" if t.get("data_sha256") else ""
            rows.append(("data", f"`{Path(t['data']).name}`{digest}"))
        for key in ("template", "max_length"):
            if t.get(key) is not None:
                rows.append((key.replace("_", " "), str(t[key])))
    elif prov.get("method") == "SORSA":
        rows.append(("training", "none: the adapter is untrained, so the weights equal the base model's"))
    return rows


EXAMPLE_QUESTION = "A baker makes 12 trays of 7 rolls. How many rolls is that?"


def _trained_template(prov: dict) -> str | None:
    return (prov.get("training") or {}).get("template")


def _prompt_py(prov: dict) -> str:
    """The example's Python lines up to `inputs`, in the prompt format the model was trained with."""
    from sorsa_tools.prompts import render_prompt

    template = _trained_template(prov)
    if template == "chat":
        return (
            f'messages = [{{"role": "user", "content": {EXAMPLE_QUESTION!r}}}]\n'
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
            'return_tensors="pt", return_dict=True)\n'
        )
    prompt = render_prompt(EXAMPLE_QUESTION, template) if template == "paper" else EXAMPLE_QUESTION
    note = "  # the prompt format it was trained with (--template paper)" if template == "paper" else ""
    return f"prompt = {prompt!r}{note}\n" + 'inputs = tokenizer(prompt, return_tensors="pt")\n'


def _prompt_cli(prov: dict, model: str) -> str:
    """llama-cli lines in the trained prompt format (-e turns the \\n into new lines)."""
    from sorsa_tools.prompts import render_prompt

    template = _trained_template(prov)
    if template == "chat":
        return f"llama-cli -m {model} -cnv    # a conversation, in the model's own chat template\n"
    prompt = render_prompt(EXAMPLE_QUESTION, template) if template == "paper" else EXAMPLE_QUESTION
    quoted = "'" + prompt.replace("\n", "\\n").replace("'", "'\\''") + "'"
    return f"llama-cli -m {model} -e -n 256 -p {quoted}\n"


def _usage(art: Artifact, repo_id: str, revision: str | None) -> str:
    kind = art.kind.name
    rev_py = f', revision="{revision}"' if revision else ""
    rev_sh = f" --revision {revision}" if revision else ""
    prov = art.provenance
    base = _hub_base(prov) or "BASE_MODEL"  # a local base is named in the table, never by its path
    if kind == "merged-hf":
        return (
            "The SORSA factors are folded into the weights: load it like any causal LM.\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{rev_py})\n'
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{rev_py}, dtype="auto")\n'
            + _prompt_py(prov)
            + "out = model.generate(**inputs, max_new_tokens=256)\n"
            "print(tokenizer.decode(out[0], skip_special_tokens=True))\n```\n"
        )
    if kind == "gguf" and (prov.get("export") or {}).get("format") == "llama.cpp-lora":
        first = art.files[0][0]  # `sorsa export-lora --to gguf`: an adapter, run over the base's GGUF
        return (
            f"A llama.cpp LoRA adapter (`sorsa export-lora --to gguf`) for the GGUF of the original {base} "
            "(not of a fine-tune), with [llama.cpp](https://github.com/ggml-org/llama.cpp):\n\n"
            f"```bash\nhf download {repo_id} {first} --local-dir .{rev_sh}\n"
            f"llama-cli -m BASE.gguf --lora {first}    # BASE.gguf: the original model's GGUF\n```\n"
        )
    if kind == "gguf":
        names = " ".join(rel for rel, _, _ in art.files)
        first = art.files[0][0]
        split = (
            " (llama.cpp finds the other parts of the split set beside the first)"
            if len(art.files) > 1
            else ""
        )
        return (
            f"With [llama.cpp](https://github.com/ggml-org/llama.cpp){split}:\n\n"
            f"```bash\nhf download {repo_id} {names} --local-dir .{rev_sh}\n"
            + _prompt_cli(prov, first)
            + f"llama-server -m {first}    # OpenAI-compatible server on :8080\n```\n"
        )
    if kind == "lora":  # the base as provenance records it: adapter_config's name may be a local path
        return (
            "A PEFT LoRA adapter exported from the SORSA adapter (`sorsa export-lora`).\n\n"
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}", dtype="auto")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{repo_id}"{rev_py})\n'
            "model = model.merge_and_unload()  # optional: fold it into the weights\n```\n"
        )
    rank = prov.get("rank") or "R"
    if kind == "sorsa-adapter":
        job = (prov.get("decomposition") or {}).get("job_id") or ""
        return (
            "A SORSA adapter (U, S, Vt of every adapted weight) for sorsa-tools: fold it into the "
            "decomposition it was "
            f"trained on (job id `{job[:12]}`; `sorsa decompose` with the same settings gives it back).\n\n"
            f"```bash\nhf download {repo_id} --local-dir run{rev_sh}\n"
            f"sorsa decompose {base} --rank {rank} -o base-sorsa-r{rank}\n"
            f"sorsa merge base-sorsa-r{rank} --adapter run --to hf -o merged\n```\n"
        )
    return (
        "A SORSA decomposition: the residual weights W_r (a Hugging Face checkpoint) and the factors "
        "U, S, Vt (`sorsa_adapter.safetensors`); train the factors, then merge them back.\n\n"
        f"```bash\nhf download {repo_id} --local-dir base-sorsa-r{rank}{rev_sh}\n"
        f"sorsa train base-sorsa-r{rank} --data train.jsonl -o run\n"
        f"sorsa merge base-sorsa-r{rank} --adapter run --to hf -o merged\n```\n"
    )


def build_card(art: Artifact, repo_id: str, revision: str | None = None):
    """The model card (huggingface_hub.ModelCard): Hub metadata front matter and a body with the
    base model, method, hyper-parameters, data, metrics when known, and how to use it."""
    from huggingface_hub import ModelCard, ModelCardData

    k = art.kind
    prov = art.provenance
    base = _hub_base(prov)
    model_type = (prov.get("base_model") or {}).get("model_type")
    extra = {"base_model_relation": k.relation} if base and k.relation else {}
    data = ModelCardData(
        base_model=base,
        library_name=k.library_name,
        pipeline_tag=k.pipeline_tag,
        tags=list(dict.fromkeys([*k.tags, *([model_type] if model_type else [])])),
        **_base_license(art),
        **extra,
    )
    lines = [f"# {repo_id.split('/')[-1]}", ""]
    lines.append(
        f"{k.what[0].upper()}{k.what[1:]}, written by `{k.made_by}` (sorsa-tools). SORSA (Singular Values "
        f"and Orthonormal Regularized Singular Vectors Adaptation, [arXiv:2409.00055]({PAPER_URL})) splits "
        "each adapted weight by SVD into a frozen residual and a trainable U diag(S) Vt, trained with an "
        "orthonormality regularizer."
    )
    lines += ["", "## Training", "", "| | |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in _facts(art)]
    metrics = prov.get("metrics")
    if isinstance(metrics, dict) and metrics:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_fmt(v)} |" for name, v in metrics.items()]
    lines += ["", "## How to use", "", _usage(art, repo_id, revision).rstrip()]
    version = (prov.get("tool") or {}).get("version")
    lines += ["", f"*Made with sorsa-tools{' ' + version if version else ''} (`sorsa push`).*", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# --------------------------------------------------------------------------- push


def _default_api(token: str):
    """The real client; refused up front in offline mode (it would fail on the first request)."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE=1 is set, so nothing can be pushed; unset it and run again")
    return HfApi(token=token)


def _saved_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def push(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    api: Any = None,
    card: str = "auto",
    commit_message: str | None = None,
) -> PushResult:
    """Create the repo (and branch) if needed and send PATH's files with a model card. A dry run
    builds the same card and file list and sends nothing (no token needed)."""
    _check_push_args(repo_id, card, revision)
    art = detect_artifact(path)
    card_text, card_source = _plan_card(art, repo_id, revision, card)
    card_bytes = card_text.encode("utf-8") if card_text is not None else None
    listing = [(rel, size) for rel, _, size in art.files]
    if card_source == "user":
        listing.append((CARD_FILE, art.user_card.stat().st_size))
    if card_bytes is not None:
        listing.append((CARD_FILE, len(card_bytes)))
    total = sum(s for _, s in listing)
    large = total > LARGE_UPLOAD_BYTES or len(listing) > LARGE_UPLOAD_FILES
    from huggingface_hub import constants

    url = f"{constants.ENDPOINT}/{repo_id}" + (f"/tree/{revision}" if revision else "")
    result = PushResult(
        art.kind.name,
        repo_id,
        revision,
        private,
        listing,
        total,
        url,
        None,
        card_text,
        card_source,
        "large-folder" if large else "commit",
        dry_run,
    )
    if dry_run:
        return result
    token = token or _saved_token()
    if not token:
        raise HubAuthError(
            "no Hugging Face token: run `hf auth login`, or set HF_TOKEN (a token with write access)"
        )
    message = commit_message or f"Upload {art.kind.what} with sorsa push"
    try:
        api = api if api is not None else _default_api(token)
        _prepare_repo(api, repo_id, private, revision, token)
        send_user_card = card_source == "user"
        if large:
            info = _upload_large(api, art, repo_id, revision, private, token, message, send_user_card)
            if card_bytes is not None:  # the card goes last, in its own commit
                info = api.upload_file(
                    path_or_fileobj=card_bytes,
                    path_in_repo=CARD_FILE,
                    repo_id=repo_id,
                    revision=revision,
                    repo_type="model",
                    commit_message="Model card (sorsa push)",
                    token=token,
                )
        else:
            info = _one_commit(api, art, repo_id, revision, token, message, send_user_card, card_bytes)
    except SorsaError:
        raise
    except Exception as e:
        mapped = _hub_error(e, repo_id, revision)
        if mapped is None:
            raise
        raise type(mapped)(str(mapped).replace(token, "hf_***")) from None
    result.commit = getattr(info, "oid", None)
    return result


def _check_push_args(repo_id: str, card: str, revision: str | None) -> None:
    check_repo_id(repo_id)
    if card not in CARD_MODES:
        raise InputError(f"bad card mode {card!r}; use one of {', '.join(CARD_MODES)}")
    if revision is not None and not revision.strip():
        raise InputError("empty --revision; name a branch (it is created if missing) or leave it out")


def _plan_card(art: Artifact, repo_id: str, revision: str | None, card: str) -> tuple[str | None, str]:
    """(generated card text or None, where the card comes from: user / generated / none). A README
    of the user's own is kept unless --card asks for a generated one."""
    if art.user_card is not None and card in ("auto", "skip"):
        return None, "user"
    if card == "skip":
        return None, "none"
    return str(build_card(art, repo_id, revision)), "generated"


def _prepare_repo(api, repo_id: str, private: bool, revision: str | None, token: str) -> None:
    """The repo exists (and is private if asked: never silently public) and so does the branch."""
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    if private and not getattr(api.repo_info(repo_id, token=token), "private", True):
        raise HubError(
            f"{repo_id} already exists and is public, and --private does not change that; make it "
            "private in its settings on the Hub, or push without --private"
        )
    if revision and revision != "main" and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)


def _one_commit(api, art: Artifact, repo_id, revision, token, message, send_user_card, card_bytes):
    """A small upload: every file and the card in one commit (all or nothing)."""
    from huggingface_hub import CommitOperationAdd

    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p, _ in art.files]
    if send_user_card:
        ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=str(art.user_card)))
    if card_bytes is not None:
        ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card_bytes))
    return api.create_commit(
        repo_id, ops, commit_message=message, revision=revision, repo_type="model", token=token
    )


def _upload_large(api, art: Artifact, repo_id, revision, private, token, message, send_user_card):
    """Many or big files: the library's resumable upload (`upload_large_folder` where this
    huggingface_hub has it; from 2.x `upload_folder` itself streams, batches commits and resumes)."""
    patterns = [glob.escape(rel) for rel, _, _ in art.files] + ([CARD_FILE] if send_user_card else [])
    if hasattr(api, "upload_large_folder"):  # it keeps its resume state in PATH/.cache/huggingface
        api.upload_large_folder(
            repo_id=repo_id,
            folder_path=str(art.root),
            repo_type="model",
            revision=revision,
            private=private,
            allow_patterns=patterns,
        )
        return None
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(art.root),
        allow_patterns=patterns,
        revision=revision,
        repo_type="model",
        commit_message=message,
        token=token,
    )


def _hub_error(e: Exception, repo_id: str, revision: str | None) -> SorsaError | None:
    """One line with the fix for what the Hub (or the network) said; None: not a Hub failure."""
    from huggingface_hub import errors as hf

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hf.OfflineModeIsEnabled):
        return HubError("HF_HUB_OFFLINE=1 is set, so nothing can be pushed; unset it and run again")
    if isinstance(e, hf.RevisionNotFoundError):
        return HubError(
            f"{repo_id} has no revision {revision!r}; push to a branch name (it is created if missing)"
        )
    if status == 401:
        return HubAuthError(
            "the Hub rejected the token (401 Unauthorized): it is wrong, expired or revoked; run "
            "`hf auth login` again or set HF_TOKEN to a valid token"
        )
    if status == 403:
        return HubAuthError(
            f"the token may not write to {repo_id} (403 Forbidden); use a token with write access "
            "(https://huggingface.co/settings/tokens) for a namespace you own or belong to"
        )
    if isinstance(e, hf.RepositoryNotFoundError) or status == 404:
        return HubError(
            f"{repo_id} cannot be found with this token (404); check the USER/NAME and that the token "
            "belongs to that user or organization"
        )
    if isinstance(e, hf.HfHubHTTPError):
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        return HubError(f"the Hub refused the push to {repo_id} (HTTP {status}): {first}; try again later")
    if isinstance(e, hf.HFValidationError):
        return InputError(f"{e}".splitlines()[0] + "; fix --repo-id / --revision")
    if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.startswith(
        ("httpx", "httpcore", "requests", "urllib3")
    ):
        return HubError(
            f"could not reach the Hub ({e.__class__.__name__}); check the network and run the same "
            "command again (files already uploaded are not sent twice)"
        )
    return None
