"""`sorsa push`: what would reach the Hub, checked at the huggingface_hub boundary (a fake HfApi
records every call; nothing touches the network): kind detection, files, model card and its
metadata, private flag, branch, large-folder path, dry run, and every bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from test_cli_errors import assert_clean_error, run

from sorsa_tools import hub
from sorsa_tools.errors import ArtifactError, HubAuthError, HubError, InputError

try:  # the HTTP client of huggingface_hub 2.x; 1.x used httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

TOKEN = "hf_TESTtokenDoNotPrint0123456789"
REPO = "alice/llama2-sorsa-gsm8k"
BASE = "meta-llama/Llama-2-7b-hf"
DATA = "/home/alice/secret-project/gsm8k_train.jsonl"
SHA = "ab" * 32


def provenance(trained: bool = True, metrics: dict | None = None, base: str = BASE, revision="0123abcd" * 5):
    return {
        "method": "SORSA",
        "paper": hub.PAPER_URL,
        "rank": 64,
        "target_modules": 224,
        "base_model": {"name_or_path": base, "revision": revision, "model_type": "llama"},
        "decomposition": {"job_id": "f00d" * 16, "svd": "auto"},
        "adapter": "trained" if trained else "untrained (gives back the base model)",
        "training": {
            "lr": 3e-5,
            "gamma": 4e-4,
            "batch_size": 4,
            "grad_accum": 8,
            "max_length": 512,
            "template": "paper",
            "steps": 1200,
            "tokens": 2_500_000,
            "final_loss": 0.3141,
            "data": DATA,
            "data_sha256": SHA,
        }
        if trained
        else None,
        "metrics": metrics,
        "tool": {"name": "sorsa-tools", "version": "0.1.0"},
    }


def write(path: Path, content: str | bytes = b"x" * 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def make_merged(d: Path, prov: dict | None = None) -> Path:
    write(d / "config.json", json.dumps({"model_type": "llama"}))
    write(d / "model.safetensors", b"w" * 1000)
    write(d / "tokenizer.json", "{}")
    write(d / "generation_config.json", "{}")
    write(d / ".cache" / "huggingface" / "junk", b"never sent")
    if prov is not False:
        write(d / hub.PROVENANCE_FILE, json.dumps(prov or provenance()))
    return d


def make_gguf(path: Path, prov: dict | None = None, license: str | None = "llama2", kv: bool = True) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    if kv:
        w.add_string(hub.GGUF_PROVENANCE_KEY, json.dumps(prov or provenance()))
    if license:
        w.add_string("general.license", license)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_lora(d: Path) -> Path:
    write(
        d / "adapter_config.json",
        json.dumps({"peft_type": "LORA", "r": 128, "base_model_name_or_path": BASE}),
    )
    write(d / "adapter_model.safetensors", b"l" * 500)
    write(d / hub.PROVENANCE_FILE, json.dumps(provenance()))
    return d


def trained_config(decomposition_path: str = "/nowhere/dir") -> dict:
    return {
        "format_version": 1,
        "kind": "trained",
        "rank": 8,
        "target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"],
        "base_model": {"name_or_path": BASE, "source": "hub", "revision": "cafe" * 10, "model_type": "llama"},
        "decomposition": {"job_id": "beef" * 16, "path": decomposition_path},
        "training": {
            "lr": 1e-4,
            "gamma": 5e-4,
            "batch_size": 2,
            "grad_accum": 1,
            "template": "paper",
            "max_length": 384,
            "data": {"path": DATA, "sha256": SHA, "examples": 256},
            "steps": 10,
            "tokens": 20480,
            "final_loss": 1.25,
            "run_id": "r1",
        },
        "tool": {"name": "sorsa-tools", "version": "0.1.0"},
    }


def make_run(d: Path) -> Path:
    write(d / "sorsa_config.json", json.dumps(trained_config()))
    write(d / "sorsa_adapter.safetensors", b"a" * 300)
    write(d / "train_log.jsonl", '{"step": 1}\n')
    write(d / "loss.png", b"\x89PNG")
    write(d / "run.json", "{}")
    return d


def make_decomposition(d: Path, base_dir: Path) -> Path:
    cfg = {
        "format_version": 1,
        "kind": "decomposition",
        "job_id": "beef" * 16,
        "rank": 8,
        "target_modules": ["model.layers.0.self_attn.q_proj"],
        "base_model": {
            "name_or_path": "./gemma-local",
            "source": "local",
            "revision": None,
            "local_path": str(base_dir),
            "model_type": "gemma3_text",
        },
        "svd": {"method": "exact"},
    }
    write(d / "sorsa_config.json", json.dumps(cfg))
    write(d / "sorsa_adapter.safetensors", b"a" * 300)
    write(d / "config.json", "{}")
    write(d / "model.safetensors", b"r" * 700)
    write(d / "tokenizer.json", "{}")
    return d


def make_base_with_license(d: Path) -> Path:
    write(
        d / "README.md",
        "---\nlicense: other\nlicense_name: gemma\nlicense_link: https://ai.google.dev/gemma/terms\n---\n# Gemma\n",
    )
    return d


class FakeApi:
    """Records what would be sent; returns what huggingface_hub returns, minimally."""

    def __init__(self, remote_private: bool = True, fail: Exception | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.remote_private = remote_private
        self.fail = fail

    def _rec(self, name, **kw):
        self.calls.append((name, kw))
        if self.fail is not None:
            raise self.fail

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def call(self, name: str) -> dict:
        found = [kw for n, kw in self.calls if n == name]
        assert len(found) == 1, (name, self.names())
        return found[0]

    def create_repo(self, repo_id, **kw):
        self._rec("create_repo", repo_id=repo_id, **kw)
        return f"https://huggingface.co/{repo_id}"

    def repo_info(self, repo_id, **kw):
        self._rec("repo_info", repo_id=repo_id, **kw)
        return SimpleNamespace(private=self.remote_private)

    def create_branch(self, repo_id, **kw):
        self._rec("create_branch", repo_id=repo_id, **kw)

    def create_commit(self, repo_id, operations, **kw):
        ops = [(op.path_in_repo, op.path_or_fileobj) for op in operations]
        self._rec("create_commit", repo_id=repo_id, operations=ops, **kw)
        return SimpleNamespace(
            oid="c0ffee" * 6 + "abcd", commit_url=f"https://huggingface.co/{repo_id}/commit/x"
        )

    def upload_folder(self, **kw):
        self._rec("upload_folder", **kw)
        return SimpleNamespace(oid="f01de4")

    def upload_file(self, **kw):
        self._rec("upload_file", **kw)
        return SimpleNamespace(oid="ca4d00")


class FakeApiWithLargeFolder(FakeApi):
    """huggingface_hub < 2: has upload_large_folder (no commit info, no token argument)."""

    def upload_large_folder(self, **kw):
        self._rec("upload_large_folder", **kw)


def sent(api: FakeApi) -> dict[str, object]:
    """path in repo -> local path (str) or bytes, of the single commit."""
    ops = api.call("create_commit")["operations"]
    names = [n for n, _ in ops]
    assert len(names) == len(set(names)), names  # README.md never twice
    return dict(ops)


def card_of(api: FakeApi) -> ModelCard:
    return ModelCard(sent(api)["README.md"].decode())


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


@pytest.fixture(autouse=True)
def _no_saved_token(monkeypatch, tmp_path):
    """No login of this machine leaks in: a token comes only from where a test puts it."""
    import huggingface_hub.constants as c

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "maker, kind, files",
    [
        (
            make_merged,
            "merged-hf",
            [
                "config.json",
                "generation_config.json",
                "model.safetensors",
                hub.PROVENANCE_FILE,
                "tokenizer.json",
            ],
        ),
        (make_lora, "lora", ["adapter_config.json", "adapter_model.safetensors", hub.PROVENANCE_FILE]),
        (
            make_run,
            "sorsa-adapter",
            ["loss.png", "sorsa_adapter.safetensors", "sorsa_config.json", "train_log.jsonl"],
        ),
    ],
)
def test_detect_directories(tmp_path, maker, kind, files):
    art = hub.detect_artifact(maker(tmp_path / "a"))
    assert art.kind.name == kind
    assert sorted(rel for rel, _, _ in art.files) == sorted(files)  # no .cache, no run.json
    assert all(size == (art.root / rel).stat().st_size for rel, _, size in art.files)


def test_detect_decomposition_and_gguf(tmp_path):
    art = hub.detect_artifact(make_decomposition(tmp_path / "d", make_base_with_license(tmp_path / "base")))
    assert art.kind.name == "decomposition"
    assert [r for r, _, _ in art.files] == [
        "config.json",
        "model.safetensors",
        "sorsa_adapter.safetensors",
        "sorsa_config.json",
        "tokenizer.json",
    ]
    assert art.provenance["rank"] == 8 and art.provenance["training"] is None
    g = hub.detect_artifact(make_gguf(tmp_path / "m.Q8_0.gguf"))
    assert g.kind.name == "gguf" and [r for r, _, _ in g.files] == ["m.Q8_0.gguf"]
    assert g.provenance == provenance() and g.gguf_license == "llama2"


def test_run_provenance_from_its_config(tmp_path):
    prov = hub.detect_artifact(make_run(tmp_path / "run")).provenance
    assert prov["method"] == "SORSA" and prov["rank"] == 8 and prov["target_modules"] == 2
    assert prov["decomposition"]["job_id"] == "beef" * 16  # the decomposition it must be merged into
    assert prov["training"]["lr"] == 1e-4 and prov["training"]["steps"] == 10
    assert prov["training"]["data_sha256"] == SHA


# --------------------------------------------------------------------------- what is sent


def test_push_merged_one_commit_with_card(tmp_path):
    d = make_merged(tmp_path / "merged")
    before = snapshot(d)
    api = FakeApi()
    r = hub.push(d, REPO, token=TOKEN, api=api)
    assert api.names() == ["create_repo", "create_commit"]  # not private: no visibility check, no branch
    assert api.call("create_repo") == {
        "repo_id": REPO,
        "private": False,
        "exist_ok": True,
        "repo_type": "model",
        "token": TOKEN,
    }
    commit = api.call("create_commit")
    assert commit["revision"] is None and commit["repo_type"] == "model"
    files = sent(api)
    assert sorted(files) == sorted([rel for rel, _, _ in hub.detect_artifact(d).files] + ["README.md"])
    assert files["model.safetensors"] == str(d / "model.safetensors")
    card = card_of(api)
    meta = card.data.to_dict()
    assert meta["base_model"] == BASE and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["sorsa", "safetensors", "llama"]
    assert "license" not in meta  # a Hub base: not known locally, so omitted rather than guessed
    for needle in (
        "A merged Hugging Face checkpoint, written by `sorsa merge --to hf`",
        "SORSA ([Cao 2024](https://arxiv.org/abs/2409.00055))",
        "| rank | 64 on 224 weight matrices |",
        "| learning rate (peak) | 3e-05 |",
        "| gamma (orthonormal regularizer) | 0.0004 |",
        "| steps | 1200 (2,500,000 tokens, batch 4 x 8 accumulation) |",
        f"| data | `gsm8k_train.jsonl` (sha256 `{SHA}`) |",
        f'AutoModelForCausalLM.from_pretrained("{REPO}", dtype="auto")',
    ):
        assert needle in card.content, needle
    assert "secret-project" not in card.content and "## Evaluation" not in card.content
    assert r.commit == "c0ffee" * 6 + "abcd" and r.card == card.content and r.card_source == "generated"
    assert r.bytes == sum(s for _, s in r.files) and r.method == "commit" and not r.dry_run
    assert snapshot(d) == before  # nothing written into PATH


def test_private_and_branch(tmp_path):
    api = FakeApi(remote_private=True)
    hub.push(make_merged(tmp_path / "m"), REPO, token=TOKEN, api=api, private=True, revision="exp-r64")
    assert api.names() == ["create_repo", "repo_info", "create_branch", "create_commit"]
    assert api.call("create_repo")["private"] is True
    assert api.call("create_branch") == {
        "repo_id": REPO,
        "branch": "exp-r64",
        "exist_ok": True,
        "token": TOKEN,
    }
    assert api.call("create_commit")["revision"] == "exp-r64"
    assert f'from_pretrained("{REPO}", revision="exp-r64", dtype="auto")' in card_of(api).content


def test_private_refused_on_an_existing_public_repo(tmp_path):
    api = FakeApi(remote_private=False)
    with pytest.raises(HubError, match="already exists and is public"):
        hub.push(make_merged(tmp_path / "m"), REPO, token=TOKEN, api=api, private=True)
    assert "create_commit" not in api.names()


def test_main_branch_is_not_created(tmp_path):
    api = FakeApi()
    hub.push(make_merged(tmp_path / "m"), REPO, token=TOKEN, api=api, revision="main")
    assert "create_branch" not in api.names() and api.call("create_commit")["revision"] == "main"


def test_gguf_card_and_license(tmp_path):
    api = FakeApi()
    hub.push(make_gguf(tmp_path / "llama2-ft.Q4_K_M.gguf"), REPO, token=TOKEN, api=api)
    assert sorted(sent(api)) == ["README.md", "llama2-ft.Q4_K_M.gguf"]
    card = card_of(api)
    meta = card.data.to_dict()
    assert meta["library_name"] == "gguf" and meta["license"] == "llama2" and meta["base_model"] == BASE
    assert "gguf" in meta["tags"] and "sorsa" in meta["tags"]
    assert "llama-cli -m llama2-ft.Q4_K_M.gguf" in card.content
    assert f"hf download {REPO} llama2-ft.Q4_K_M.gguf --local-dir ." in card.content


def test_split_gguf_sends_every_part(tmp_path):
    parts = [make_gguf(tmp_path / f"m-0000{i}-of-00003.gguf", kv=i == 1) for i in (1, 2, 3)]
    api = FakeApi()
    r = hub.push(parts[1], REPO, token=TOKEN, api=api)  # any part names the set
    assert [f for f, _ in r.files] == [p.name for p in parts] + ["README.md"]
    assert "llama-cli -m m-00001-of-00003.gguf" in card_of(api).content
    parts[2].unlink()
    with pytest.raises(ArtifactError, match="m-00003-of-00003.gguf is missing"):
        hub.push(parts[0], REPO, token=TOKEN, api=FakeApi())


def test_lora_card(tmp_path):
    api = FakeApi()
    hub.push(make_lora(tmp_path / "lora"), REPO, token=TOKEN, api=api)
    card = card_of(api)
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["base_model_relation"] == "adapter"
    assert meta["tags"] == ["sorsa", "peft", "lora", "llama"]
    assert f'PeftModel.from_pretrained(base, "{REPO}")' in card.content
    assert f'AutoModelForCausalLM.from_pretrained("{BASE}", dtype="auto")' in card.content


def test_run_card_tells_how_to_merge(tmp_path):
    api = FakeApi()
    hub.push(make_run(tmp_path / "run"), REPO, token=TOKEN, api=api)
    assert "run.json" not in sent(api)
    card = card_of(api)
    meta = card.data.to_dict()
    assert "library_name" not in meta and meta["base_model_relation"] == "adapter"
    assert f"sorsa decompose {BASE} --rank 8 -o base-sorsa-r8" in card.content
    assert "sorsa merge base-sorsa-r8 --adapter run --to hf -o merged" in card.content
    assert "job id `beefbeefbeef`" in card.content and "| learning rate (peak) | 0.0001 |" in card.content


def test_decomposition_carries_local_base_license(tmp_path):
    base = make_base_with_license(tmp_path / "gemma-local")
    api = FakeApi()
    hub.push(make_decomposition(tmp_path / "d", base), REPO, token=TOKEN, api=api)
    card = card_of(api)
    meta = card.data.to_dict()
    assert meta["license"] == "other" and meta["license_name"] == "gemma"
    assert meta["license_link"] == "https://ai.google.dev/gemma/terms"
    assert "base_model" not in meta  # a local path is no Hub id
    assert "`gemma-local` (a local checkpoint)" in card.content
    assert (
        "untrained" in card.content and "sorsa train base-sorsa-r8 --data train.jsonl -o run" in card.content
    )


def test_metrics_and_untrained(tmp_path):
    prov = provenance(trained=False, metrics={"gsm8k_accuracy": 0.4523, "gsm8k_nll": 1.234567})
    api = FakeApi()
    hub.push(make_merged(tmp_path / "m", prov), REPO, token=TOKEN, api=api)
    content = card_of(api).content
    assert "## Evaluation" in content and "| gsm8k_accuracy | 0.4523 |" in content
    assert "| gsm8k_nll | 1.235 |" in content
    assert "the adapter is untrained" in content and "learning rate" not in content


def test_user_readme_policy(tmp_path):
    d = make_merged(tmp_path / "m")
    write(d / "README.md", "# my own notes\n")
    api = FakeApi()
    r = hub.push(d, REPO, token=TOKEN, api=api)  # auto: theirs, untouched
    assert r.card_source == "user" and r.card is None and sent(api)["README.md"] == str(d / "README.md")
    api = FakeApi()
    r = hub.push(d, REPO, token=TOKEN, api=api, card="overwrite")
    assert r.card_source == "generated" and b"SORSA" in sent(api)["README.md"]
    assert (d / "README.md").read_text() == "# my own notes\n"
    api = FakeApi()
    r = hub.push(make_merged(tmp_path / "m2"), REPO, token=TOKEN, api=api, card="skip")
    assert r.card_source == "none" and "README.md" not in sent(api)


def test_the_card_merge_writes_is_replaced_unless_edited(tmp_path):
    """merge and export-lora write README.md (the card, named after the local dir); push sends a
    fresh card for the repository in its place, unless the user has edited it."""
    d = make_merged(tmp_path / "gemma-gsm8k")
    card = hub.write_card(d, d.name)
    text = card.read_text()
    assert hub.is_generated_card(card) and 'from_pretrained("./gemma-gsm8k"' in text
    api = FakeApi()
    r = hub.push(d, REPO, token=TOKEN, api=api)
    assert r.card_source == "generated" and f'from_pretrained("{REPO}"'.encode() in sent(api)["README.md"]
    card.write_text(text.replace("## How to use", "## How to use (my notes)"))
    assert not hub.is_generated_card(card)
    api = FakeApi()
    r = hub.push(d, REPO, token=TOKEN, api=api)
    assert r.card_source == "user" and sent(api)["README.md"] == str(card)


@pytest.mark.parametrize(
    "template, needle", [("paper", "### Instruction:\\n"), ("chat", "apply_chat_template")]
)
def test_the_usage_snippet_prompts_as_the_model_was_trained(tmp_path, template, needle):
    prov = provenance()
    prov["training"]["template"] = template
    card = str(hub.build_card(hub.detect_artifact(make_merged(tmp_path / "m", prov)), REPO))
    assert needle in card and "Question: what is" not in card
    gguf_card = str(hub.build_card(hub.detect_artifact(make_gguf(tmp_path / "m.gguf", prov)), REPO))
    assert ("-cnv" if template == "chat" else "-e -n 256 -p 'Below is an instruction") in gguf_card


@pytest.mark.parametrize(
    "api_cls, upload", [(FakeApiWithLargeFolder, "upload_large_folder"), (FakeApi, "upload_folder")]
)
def test_large_payload_uses_the_large_folder_upload(tmp_path, monkeypatch, api_cls, upload):
    monkeypatch.setattr(hub, "LARGE_UPLOAD_BYTES", 500)
    d = make_merged(tmp_path / "m")
    write(d / "weird[1].txt", "bracket names are escaped in patterns")
    api = api_cls()
    r = hub.push(d, REPO, token=TOKEN, api=api, revision="big")
    assert r.method == "large-folder" and "create_commit" not in api.names()
    assert api.names()[-2:] == [upload, "upload_file"]  # the card comes last, in its own commit
    call = api.call(upload)
    assert call["folder_path"] == str(d) and call["revision"] == "big"
    import fnmatch

    sendable = [p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()]
    matched = sorted(f for f in sendable if any(fnmatch.fnmatchcase(f, g) for g in call["allow_patterns"]))
    assert matched == sorted(rel for rel, _, _ in hub.detect_artifact(d).files)  # no README, no .cache
    card = api.call("upload_file")
    assert (
        card["path_in_repo"] == "README.md"
        and card["revision"] == "big"
        and b"SORSA" in card["path_or_fileobj"]
    )
    assert r.commit == "ca4d00"


# --------------------------------------------------------------------------- dry run, tokens, CLI


class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"a dry run called HfApi.{name}")


def test_dry_run_sends_nothing(tmp_path):
    r = hub.push(make_lora(tmp_path / "l"), REPO, dry_run=True, api=Untouchable())  # no token needed
    assert r.dry_run and r.commit is None and r.card.startswith("---\n")
    assert ("README.md", len(r.card.encode())) in r.files


def test_cli_dry_run_prints_card_and_files(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "_default_api", lambda token: Untouchable())
    res = run("push", str(make_merged(tmp_path / "m")), "--repo-id", REPO, "--dry-run")
    assert res.exit_code == 0, res.stderr
    assert "library_name: transformers" in res.stdout and "base_model: meta-llama/Llama-2-7b-hf" in res.stdout
    assert "model.safetensors" in res.stdout and "1000 B" in res.stdout
    assert "nothing (dry run)" in res.stdout


def test_cli_push_with_env_token(tmp_path, monkeypatch):
    api = FakeApi()
    monkeypatch.setattr(hub, "_default_api", lambda token: api)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    res = run("push", str(make_gguf(tmp_path / "x.gguf")), "--repo-id", REPO, "--private", "--revision", "v1")
    assert res.exit_code == 0, res.stderr
    assert api.call("create_repo")["token"] == TOKEN and api.call("create_commit")["token"] == TOKEN
    assert "c0ffee" in res.stdout and f"https://huggingface.co/{REPO}/tree/v1" in res.stdout
    assert TOKEN not in res.stdout + res.stderr


def test_no_token(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(hub, "_default_api", lambda token: called.append(token))
    res = run("push", str(make_merged(tmp_path / "m")), "--repo-id", REPO)
    assert_clean_error(res, "no Hugging Face token", "hf auth login", "HF_TOKEN")
    assert called == []
    with pytest.raises(HubAuthError):
        hub.push(make_lora(tmp_path / "l"), REPO, api=FakeApi())


def test_offline_mode_refused_before_any_request(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    res = run("push", str(make_merged(tmp_path / "m")), "--repo-id", REPO)
    assert_clean_error(res, "HF_HUB_OFFLINE=1 is set", "unset it")


def _http_error(status: int, cls=HfHubHTTPError) -> Exception:
    req = httpx.Request("POST", f"https://huggingface.co/api/repos/create?token={TOKEN}")
    return cls(f"{status} Client Error for token {TOKEN}", response=httpx.Response(status, request=req))


@pytest.mark.parametrize(
    "exc, needles",
    [
        (_http_error(401), ["rejected the token (401 Unauthorized)", "hf auth login", "HF_TOKEN"]),
        (_http_error(403), [f"may not write to {REPO} (403 Forbidden)", "write access"]),
        (_http_error(404, RepositoryNotFoundError), [f"{REPO} cannot be found with this token (404)"]),
        (_http_error(500), [f"the Hub refused the push to {REPO} (HTTP 500)", "hf_***"]),
        (httpx.ConnectError("name resolution failed"), ["could not reach the Hub (ConnectError)", "network"]),
    ],
)
def test_hub_errors_are_one_line_without_the_token(tmp_path, monkeypatch, exc, needles):
    monkeypatch.setattr(hub, "_default_api", lambda token: FakeApi(fail=exc))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    res = run("push", str(make_merged(tmp_path / "m")), "--repo-id", REPO)
    line = assert_clean_error(res, *needles)
    assert TOKEN not in res.stdout + res.stderr + line


@pytest.mark.parametrize(
    "setup, needles",
    [
        (
            lambda p: p / "nope",
            ["no such file or directory", "a merged Hugging Face checkpoint", "a GGUF file"],
        ),
        (lambda p: write(p / "notes.txt", "hi"), ["is a file but not a .gguf file", "sorsa merge --to gguf"]),
        (
            lambda p: (p / "empty").mkdir() or p / "empty",
            ["is not an artifact sorsa push knows", "sorsa export-lora"],
        ),
        (
            lambda p: make_merged(p / "plain", prov=False),
            ["looks like a merged Hugging Face checkpoint but has no sorsa_provenance.json", "hf upload"],
        ),
        (
            lambda p: make_gguf(p / "other.gguf", kv=False),
            ["has no sorsa.provenance metadata", "sorsa merge --to gguf"],
        ),
        (
            lambda p: write(p / "broken.gguf", b"GGUF\x03\x00"),
            ["is not a readable GGUF file", "export it again"],
        ),
        (
            lambda p: write(make_lora(p / "l") / hub.PROVENANCE_FILE, "{oops") and p / "l",
            ["sorsa_provenance.json is not valid JSON"],
        ),
        (
            lambda p: write(p / "ggufs" / "a.gguf", b"") and p / "ggufs",
            ["a directory holding .gguf files", "pass the .gguf file itself"],
        ),
    ],
)
def test_bad_path(tmp_path, setup, needles):
    res = run("push", str(setup(tmp_path)), "--repo-id", REPO, "--dry-run")
    assert_clean_error(res, *needles)


@pytest.mark.parametrize(
    "repo_id",
    ["justaname", "a/b/c", "alice/bad name", "alice/x--y", "alice/-x", "alice/" + "n" * 97, "/name"],
)
def test_bad_repo_id(tmp_path, repo_id):
    res = run("push", str(make_merged(tmp_path / "m")), "--repo-id", repo_id, "--dry-run")
    assert_clean_error(res, f"bad repo id {repo_id!r}", "USER/NAME")


def test_bad_options(tmp_path):
    d = str(make_merged(tmp_path / "m"))
    assert_clean_error(
        run("push", d, "--repo-id", REPO, "--card", "maybe", "--dry-run"),
        "bad card mode 'maybe'",
        "overwrite",
    )
    assert_clean_error(run("push", d, "--repo-id", REPO, "--revision", " ", "--dry-run"), "empty --revision")
    with pytest.raises(InputError):
        hub.check_repo_id("alice/name.git")
    hub.check_repo_id("alice/Llama-2_7b.sorsa-r64")  # the legal characters pass


def test_help_has_examples():
    res = run("push", "--help")
    assert (
        res.exit_code == 0 and "sorsa push gemma-gsm8k --repo-id" in res.stdout and "--dry-run" in res.stdout
    )


def test_sharded_checkpoint_missing_a_shard_is_refused(tmp_path):
    d = make_merged(tmp_path / "m")
    (d / "model.safetensors").unlink()
    shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for s in shards:
        write(d / s, b"w" * 100)
    write(d / "model.safetensors.index.json", json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    assert hub.push(d, REPO, token=TOKEN, api=FakeApi(), dry_run=True)
    (d / shards[1]).unlink()
    res = run("push", str(d), "--repo-id", REPO, "--dry-run")
    assert_clean_error(res, f"names {shards[1]}, which is missing", "sorsa merge --to hf")


def test_card_never_shows_a_local_base_path(tmp_path):
    base = tmp_path / "private" / "my-base"
    api = FakeApi()
    hub.push(
        make_merged(tmp_path / "m", provenance(base=str(base), revision=None)), REPO, token=TOKEN, api=api
    )
    card = card_of(api)
    assert str(base) not in card.content and "`my-base` (a local checkpoint)" in card.content
    lora = make_lora(tmp_path / "lora")
    cfg = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    api = FakeApi()
    hub.push(lora, REPO, token=TOKEN, api=api)
    content = card_of(api).content
    assert str(base) not in content and f'from_pretrained("{BASE}", dtype="auto")' in content
    # a relative local base that looks like a Hub id is still a local path: not in the card's code
    rel = make_lora(tmp_path / "lora-rel")
    (rel / hub.PROVENANCE_FILE).write_text(json.dumps(provenance(base="ckpt/llama", revision=None)))
    (rel / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "ckpt/llama"}))
    api = FakeApi()
    hub.push(rel, REPO, token=TOKEN, api=api)
    content = card_of(api).content
    assert "ckpt/llama" not in content and 'from_pretrained("BASE_MODEL", dtype="auto")' in content
