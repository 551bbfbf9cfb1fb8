"""`sorsa export-lora --to gguf`: a llama.cpp LoRA adapter, checked in the real llama.cpp runtime.

llama.cpp loads the ORIGINAL model's GGUF (`sorsa merge DIR --to gguf`, DIR's own adapter) with
the adapter over it; its logits must be those of `sorsa merge DIR --adapter RUN --to gguf`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_checks_fire import _fake_run
from test_cli_errors import assert_clean_error, run
from test_gguf_export import build, cpp_logits, token_ids

from sorsa_tools import decompose
from sorsa_tools.errors import ExportError, InputError, ModelMismatchError, OutputExistsError
from sorsa_tools.gguf_export import export_gguf, read_layout
from sorsa_tools.gguf_lora import export_lora_gguf
from sorsa_tools.lora_export import export_lora
from sorsa_tools.source import MergedSource, provenance

llama_cpp = pytest.importorskip("llama_cpp")
RANK = 16  # 2r = 32: lora_b rows split into whole Q8_0 blocks


def _perturb(seed: int = 1):
    g = torch.Generator().manual_seed(seed)

    def change(m, U, S, Vt):  # as training would: every module moved
        return (
            U + 0.05 * torch.randn(U.shape, generator=g),
            S * (1 + 0.5 * torch.rand(S.shape, generator=g)),
            Vt,
        )

    return change


def _trained(dec: Path, run_dir: Path) -> Path:
    """A run of DIR as training leaves it: every module moved, its training recorded."""
    r = _fake_run(dec, run_dir, _perturb())
    cfg = json.loads((r / "sorsa_config.json").read_text())
    cfg["training"] = {"steps": 10, "tokens": 5120, "final_loss": 1.5, "lr": 5e-5}
    (r / "sorsa_config.json").write_text(json.dumps(cfg))
    return r


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """By kind: (source, DIR, RUN, base GGUF = merge of DIR's own adapter, merged GGUF of RUN)."""
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            root = tmp_path_factory.mktemp(f"lora-gguf-{kind}")
            src = build(root / "src", kind)
            dec = root / "dec"
            decompose(str(src), RANK, dec, svd="exact", check_sample=0)
            r = _trained(dec, root / "run")
            base, merged = (  # as `sorsa merge DIR [--adapter RUN] --to gguf` writes them
                export_gguf(s, root / name, "f32", provenance=provenance(s)).path
                for s, name in (
                    (MergedSource(dec), "base.f32.gguf"),
                    (MergedSource(dec, r), "merged.f32.gguf"),
                )
            )
            cache[kind] = (src, dec, r, base, merged)
        return cache[kind]

    return get


def lora_logits(base: Path, adapter: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(
        model_path=str(base),
        lora_path=str(adapter),
        logits_all=True,
        type_k=0,
        type_v=0,
        verbose=False,
        n_ctx=128,
        n_threads=2,
    )
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)])
    llm.close()
    return out


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gemma2", "phi3"])  # q/k reorder, scale folded, fused
def test_adapter_over_the_base_gives_the_merged_model(kind, case, tmp_path):
    src, dec, r, base, merged = case(kind)
    ids = token_ids(src)
    want, plain = cpp_logits(merged, ids), cpp_logits(base, ids)
    moved = np.abs(want - plain).max()
    assert moved > 0.5, moved  # the run changed the model: the checks below can fail
    for outtype in ("f32", "f16", "bf16", "q8_0"):
        res = export_lora_gguf(dec, r, tmp_path / f"a.{outtype}.gguf", outtype=outtype, base=base)
        got = lora_logits(base, res.path, ids)
        err, top1 = np.abs(got - want).max(), (got.argmax(-1) == want.argmax(-1)).mean()
        print(
            f"{kind} adapter {outtype}: max|dlogit| vs merge {err:.2e}, top-1 {top1:.3f} (moved {moved:.2f})"
        )
        if outtype == "f32":  # measured 2.3e-6 (llama, phi3), 1.8e-4 (Gemma: llama.cpp's fp16 GELU table)
            assert err < 1e-3 and top1 == 1.0, (err, top1)
        assert top1 >= 0.9, top1  # measured 0.958 to 1.000 (half and 8-bit factors)
        modules = 8 if kind == "phi3" else 14  # phi3: qkv_proj, o_proj, gate_up_proj, down_proj
        assert (
            res.rank == 2 * RANK
            and res.modules == modules
            and res.warnings == []
            and res.base_checked == base
        )
    kv, tensors = read_layout(res.path)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["adapter.lora.alpha"] == 2 * RANK and kv["general.architecture"] == kind
    assert json.loads(kv["sorsa.provenance"])["adapter"] == "trained"
    assert len(tensors) == 2 * modules and {t.qtype.name for t in tensors.values()} == {"Q8_0"}
    q, q_rows = ("attn_qkv", 128) if kind == "phi3" else ("attn_q", 64)
    assert tensors[f"blk.0.{q}.weight.lora_a"].shape == (32, 64)
    assert tensors[f"blk.0.{q}.weight.lora_b"].shape == (q_rows, 32)
    assert tensors["blk.1.ffn_down.weight.lora_b"].shape == (64, 32)


def test_the_factors_are_the_peft_exports(case, tmp_path):
    """--to gguf and --to peft write one Delta W: A as is, B with the base GGUF's row order."""
    from safetensors.torch import load_file

    from sorsa_tools.gguf_export import _permute

    _, dec, r, base, _ = case("llama")
    peft = load_file(export_lora(dec, r, tmp_path / "peft").out_dir / "adapter_model.safetensors")
    g = export_lora_gguf(dec, r, tmp_path / "a.gguf", outtype="f32")
    assert g.base_checked is None
    _, tensors = read_layout(g.path)

    def read(name):
        t = tensors[name]
        return torch.from_numpy(
            np.fromfile(t.path, np.float32, t.nbytes // 4, offset=t.offset).reshape(t.shape)
        )

    key = "base_model.model.model.layers.1.self_attn.{}.lora_{}.weight"
    assert torch.equal(read("blk.1.attn_v.weight.lora_a"), peft[key.format("v_proj", "A")])
    assert torch.equal(read("blk.1.attn_v.weight.lora_b"), peft[key.format("v_proj", "B")])
    assert torch.equal(read("blk.1.attn_q.weight.lora_a"), peft[key.format("q_proj", "A")])
    assert torch.equal(read("blk.1.attn_q.weight.lora_b"), _permute(peft[key.format("q_proj", "B")], 4))


def test_rank_8_q8_0_falls_back_to_f16_for_lora_b(tmp_path):
    """2r = 16 columns do not split into Q8_0 blocks of 32: lora_b is F16, as llama.cpp's converter
    writes it, and said once."""
    src = build(tmp_path / "src", "llama")
    dec = tmp_path / "dec"
    decompose(str(src), 8, dec, svd="exact", check_sample=0)
    r = _trained(dec, tmp_path / "run")
    res = export_lora_gguf(dec, r, tmp_path / "a.gguf", outtype="q8_0")
    types = {n: t.qtype.name for n, t in read_layout(res.path)[1].items()}
    assert types["blk.0.attn_q.weight.lora_a"] == "Q8_0" and types["blk.0.attn_q.weight.lora_b"] == "F16"
    assert res.warnings == [
        "14 tensors (e.g. blk.0.ffn_down.weight.lora_b) have rows that do not split into Q8_0 blocks; "
        "written as F16, as llama.cpp's converter does"
    ]


def test_a_base_that_does_not_fit_is_refused_before_writing(case, tmp_path):
    src, dec, r, base, merged = case("llama")
    _, _, _, gemma_base, _ = case("gemma3")
    out = tmp_path / "a.gguf"
    fix = f"pass the GGUF of the model {dec} was decomposed from (`sorsa merge {dec} --to gguf`)"
    wide = build(tmp_path / "wide", "llama", hidden=128)
    wide_base = export_gguf(MergedSource.plain(wide), tmp_path / "wide.gguf", "f16").path
    adapter = export_lora_gguf(dec, r, tmp_path / "other.gguf", outtype="f16").path
    (tmp_path / "junk.gguf").write_text("not a gguf")
    for bad, error, message in (
        (gemma_base, ModelMismatchError, f"--base {gemma_base} is a gemma3 model, this adapter is for llama; {fix}"),
        (wide_base, ModelMismatchError,
         f"--base {wide_base}: blk.0.ffn_down.weight is [128, 256], the adapter's is [64, 96]; {fix}"),
        (merged, ModelMismatchError,
         f"--base {merged} is a merged fine-tune (its sorsa.provenance says trained), not the original model; {fix}"),
        (adapter, InputError, f"--base {adapter} is itself an adapter, not a model; {fix}"),
        (tmp_path / "junk.gguf", InputError, f"--base {tmp_path / 'junk.gguf'} is not a readable GGUF file; {fix}"),
        (tmp_path / "nope.gguf", InputError, f"--base {tmp_path / 'nope.gguf'}: no such file; {fix}"),
    ):  # fmt: skip
        with pytest.raises(error) as e:
            export_lora_gguf(dec, r, out, base=bad)
        assert str(e.value) == message
        assert not out.exists() and not list(tmp_path.glob(".a.gguf*"))
    # llama.cpp only logs its own refusal ("model arch and LoRA arch mismatch") and
    # llama-cpp-python 0.3.36 then crashes in decode (a segmentation fault): the reason the check exists
    probe = (
        f"import llama_cpp; m = llama_cpp.Llama(model_path={str(gemma_base)!r}, lora_path={str(adapter)!r}, "
        "verbose=False, n_ctx=64); m.eval([1, 2, 3])"
    )
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120).returncode != 0


def test_an_untied_head_and_a_few_targets(tmp_path):
    """--targets q_proj,v_proj,lm_head: the adapter holds those (output.weight included), and the
    base + adapter is still the merged model."""
    src = build(tmp_path / "src", "llama")
    dec = tmp_path / "dec"
    decompose(str(src), RANK, dec, svd="exact", check_sample=0, targets="q_proj,v_proj,lm_head")
    r = _trained(dec, tmp_path / "run")
    base, merged = (export_gguf(s, tmp_path / n, "f32").path for s, n in ((MergedSource(dec), "b.gguf"),
                                                                         (MergedSource(dec, r), "m.gguf")))  # fmt: skip
    a = export_lora_gguf(dec, r, tmp_path / "a.gguf", outtype="f32", base=base)
    names = sorted(read_layout(a.path)[1])
    assert names[:2] == ["blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b"] and len(names) == 10
    assert "output.weight.lora_a" in names and "output.weight.lora_b" in names
    ids = token_ids(src)
    assert np.abs(lora_logits(base, a.path, ids) - cpp_logits(merged, ids)).max() < 1e-4  # measured 1.4e-6


def test_a_split_base_is_checked_through_all_its_parts(case, tmp_path):
    _, dec, r, _, _ = case("llama")
    split = export_gguf(MergedSource(dec), tmp_path / "b.gguf", "f32", split_max_size=150_000).paths
    assert len(split) == 3
    assert export_lora_gguf(dec, r, tmp_path / "a.gguf", base=split[0]).base_checked == split[0]
    split[2].unlink()
    with pytest.raises(InputError) as e:
        export_lora_gguf(dec, r, tmp_path / "a2.gguf", base=split[0])
    assert str(e.value).startswith(f"--base {split[0]} is split and b-00003-of-00003.gguf is missing; pass")
    assert not (tmp_path / "a2.gguf").exists()


def test_outtypes_llama_cpp_adapters_do_not_take(case, tmp_path):
    _, dec, r, _, _ = case("llama")
    for bad in ("q4_k_m", "q4_0", "f8"):
        with pytest.raises(ExportError) as e:
            export_lora_gguf(dec, r, tmp_path / "a.gguf", outtype=bad)
        assert str(e.value) == (
            f"--outtype {bad!r} is not one llama.cpp takes for a LoRA adapter; pick one of f32, f16, bf16, q8_0"
        )
    with pytest.raises(ExportError) as e:
        export_lora_gguf(dec, r, tmp_path / "a.bin")
    assert str(e.value) == f"{tmp_path / 'a.bin'} does not end in .gguf; name the adapter file NAME.gguf"
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(ExportError) as e:
        export_lora_gguf(dec, r, tmp_path / "d.gguf")
    assert str(e.value) == f"{tmp_path / 'd.gguf'} is a directory; give a file path ending in .gguf"
    assert [p.name for p in tmp_path.iterdir()] == ["d.gguf"]


def test_existing_output_and_force(case, tmp_path):
    """--force replaces an earlier adapter GGUF, never a model GGUF or someone's file."""
    _, dec, r, base, _ = case("llama")
    out = tmp_path / "a.gguf"
    export_lora_gguf(dec, r, out)
    with pytest.raises(OutputExistsError) as e:
        export_lora_gguf(dec, r, out)
    assert str(e.value) == f"{out} already exists; pass --force to overwrite it or pick another -o path"
    assert export_lora_gguf(dec, r, out, force=True, outtype="f32").outtype == "f32"
    model = tmp_path / "model.gguf"
    shutil.copy(base, model)
    with pytest.raises(OutputExistsError) as e:
        export_lora_gguf(dec, r, model, force=True)
    assert str(e.value).startswith(f"{model} is not a GGUF that `sorsa export-lora --to gguf` wrote")
    assert read_layout(model)[0]["general.type"] == "model"


def test_cli(case, tmp_path, monkeypatch):
    _, dec, r, base, _ = case("llama")
    _, _, _, gemma_base, _ = case("gemma3")
    monkeypatch.chdir(tmp_path)
    res = run("export-lora", str(dec), "--adapter", str(r), "--to", "gguf", "--base", str(base))
    assert res.exit_code == 0, res.stderr
    default = tmp_path / f"{dec.name}-{r.name}-lora.f16.gguf"
    assert f"output: {default.name} (no -o given)" in res.stdout and default.is_file()
    assert "(checked)" in res.stdout and "32 (2 x 16)" in res.stdout
    args = ["export-lora", str(dec), "--adapter", str(r), "-o", str(tmp_path / "x.gguf")]
    assert_clean_error(
        run(*args, "--to", "gguf", "--outtype", "q4_k_m"), "not one llama.cpp takes for a LoRA"
    )
    assert_clean_error(run(*args, "--to", "gguf", "--base", str(gemma_base)), "is a gemma3 model", "llama")
    assert_clean_error(run(*args, "--to", "gguf", "--dtype", "float16"), "--dtype applies to --to peft")
    assert_clean_error(run(*args, "--outtype", "f16"), "--outtype applies to --to gguf")
    assert_clean_error(run(*args, "--to", "onnx"), "--to 'onnx' is not one of peft, gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == [default.name]
    res = run("push", str(default), "--repo-id", "alice/lora-gguf", "--dry-run")  # its card: run over a base
    assert res.exit_code == 0, res.stderr
    assert f"llama-cli -m BASE.gguf --lora {default.name}" in res.stdout
