"""`sorsa train` on tiny models with a real (small) tokenizer and real GSM-8K lines."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import GSM8K_SLICE, restamp
from safetensors.torch import load_file

from sorsa_tools.data import IGNORE, Dataset, parse_fields
from sorsa_tools.errors import DataError
from sorsa_tools.model import load_sorsa_model
from sorsa_tools.train import TrainConfig, TrainProgress, loss_sum, lr_factor, train


def _tree_digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]


FAST = dict(max_length=384, batch_size=4, lr=1e-2, warmup_ratio=0.1)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_sorsa_model_at_init_equals_original(tiny_lm_decomposed, kind):
    from transformers import AutoModelForCausalLM

    src, dec = tiny_lm_decomposed(kind)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model, layers, _ = load_sorsa_model(dec)
    model.eval()
    assert len(layers) == 14
    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert (a - b).abs().max() < 1e-4 * a.abs().max()


def test_loss_sum_matches_transformers_loss(tiny_lm_decomposed):
    """The chunked response-only loss equals HF's own mean loss over label tokens."""
    src, dec = tiny_lm_decomposed("llama")
    model, _, _ = load_sorsa_model(dec)
    model.eval()
    from transformers import AutoTokenizer

    ds = Dataset(GSM8K_SLICE, AutoTokenizer.from_pretrained(dec), max_length=384)
    batch = ds.collate(ds.micro_batches(0, 0, 3)[0])
    with torch.no_grad():
        total, n = loss_sum(model, batch, chunk=7, budget=0)  # chunks smaller than the batch's tokens
        whole, _ = loss_sum(model, batch)
        hf = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum()) > 0
    assert abs(float(total) / n - float(hf)) < 1e-5 and abs(float(whole) - float(total)) < 1e-3


def test_dataset_fields_template_masking_and_determinism(tiny_lm_decomposed, tmp_path):
    from transformers import AutoTokenizer

    _, dec = tiny_lm_decomposed("llama")
    tok = AutoTokenizer.from_pretrained(dec)
    ds = Dataset(GSM8K_SLICE, tok, max_length=512)
    assert ds.fields.describe() == "question,answer" and ds.n_records == 256
    ids, labels = ds.read([0])[0]
    first = json.loads(GSM8K_SLICE.read_text().splitlines()[0])
    text = tok.decode(ids)
    assert "### Instruction:\n" + first["question"] in text and "Lets think step by step." in text
    # the loss falls on the response only: the unmasked labels decode to " " + answer + eos
    resp = [t for t in labels if t != IGNORE]
    assert tok.decode(resp[:-1]).strip() == first["answer"] and resp[-1] == tok.eos_token_id
    assert labels[: len(ids) - len(resp)] == [IGNORE] * (len(ids) - len(resp))
    # seeded permutations: reproducible, different across epochs and seeds
    assert ds.epoch_order(0, 1) == ds.epoch_order(0, 1) != ds.epoch_order(1, 1)
    assert sorted(ds.epoch_order(3, 5)) == list(range(len(ds)))
    # packing keeps every loss token and fills rows up to max_length
    packed = Dataset(GSM8K_SLICE, tok, max_length=2048, pack=True)
    mb = packed.micro_batches(0, 0, 2)
    rows = [row for b in mb for row in b]
    assert sorted(i for row in rows for i in row) == list(range(len(packed)))
    assert all(sum(packed.lengths[i] for i in row) <= 2048 for row in rows) and len(rows) < len(packed) / 3
    b = packed.collate(mb[0])
    starts = (b["position_ids"][0] == 0) & (b["attention_mask"][0] == 1)
    assert b["position_ids"][0, 0] == 0 and int(starts.sum()) == len(mb[0][0])
    # plain-text mode: loss on every token
    txt = tmp_path / "t.jsonl"
    txt.write_text('{"text": "Natalia sold 48 clips."}\n')
    plain = Dataset(txt, tok, max_length=64)
    ids, labels = plain.read([0])[0]
    assert plain.fields == parse_fields("text") and ids == labels


def _sentencepiece_style_tokenizer(dst: Path):
    """A Llama-2-style tokenizer.json: "▁" prepended and for spaces (legacy SentencePiece), pieces
    that start at a word ("▁N", never "p▁"), byte fallback; trained on GSM-8K lines."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # training only
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    lines = [json.loads(x) for x in GSM8K_SLICE.read_text().splitlines()]
    tk.train_from_iterator(
        [r["question"] + " " + r["answer"] for r in lines],
        trainers.BpeTrainer(vocab_size=600, special_tokens=special),
    )
    tk.pre_tokenizer = None  # as in Llama 2's tokenizer.json: the merges alone keep words apart
    tk.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(dst)
    return fast


def test_examples_are_tokenized_as_one_text_with_sentencepiece_tokenizers(tmp_path):
    """Prompt and response encoded apart gave every example a token the text does not hold: the
    response's leading space became "▁" + "▁N..." where the whole text reads "▁N..." (Llama 2,
    Mistral). The ids must be the whole text's, and the loss must start where the response does."""
    from sorsa_tools.prompts import render_prompt, response_prefix

    tok = _sentencepiece_style_tokenizer(tmp_path / "tok")
    assert tok(" Natalia", add_special_tokens=False)["input_ids"][0] == tok.convert_tokens_to_ids("▁")
    ds = Dataset(GSM8K_SLICE, tok, max_length=4096)
    records = [json.loads(x) for x in GSM8K_SLICE.read_text().splitlines()]
    for (ids, labels), r in zip(ds.read(list(range(len(ds)))), records, strict=True):
        prompt = render_prompt(r["question"], "paper", tok)
        whole = tok(prompt + response_prefix("paper") + r["answer"])["input_ids"] + [tok.eos_token_id]
        assert ids == whole
        n_prompt = len(tok(prompt)["input_ids"])
        assert labels == [IGNORE] * n_prompt + ids[n_prompt:]


def test_alpaca_input_is_part_of_the_prompt(tiny_lm_decomposed, tmp_path):
    """Alpaca records: a non-empty "input" follows the instruction under "### Input:" (it was
    dropped), an empty one adds nothing; --fields PROMPT,INPUT,RESPONSE names them explicitly."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_decomposed("llama")[1])
    f = tmp_path / "alpaca.jsonl"
    rows = [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for fields in (None, parse_fields("instruction,input,output")):
        ds = Dataset(f, tok, fields=fields, max_length=512)
        assert ds.fields.describe() == "instruction,input,output"
        (ids0, lab0), (ids1, _) = ds.read([0, 1])
        text0, text1 = tok.decode(ids0), tok.decode(ids1)
        assert "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:" in text0
        assert "### Input:" not in text1 and "### Instruction:\nAdd 2 and 3.\n\n### Response:" in text1
        assert tok.decode([t for t in lab0 if t != IGNORE][:-1]).strip() == "Bonjour"
    assert parse_fields("instruction,output").context is None  # two names: no input field
    ds = Dataset(f, tok, fields=parse_fields("instruction,output"), max_length=512)
    assert "Good morning" not in tok.decode(ds.read([0])[0][0])  # named fields are taken as named


def test_data_file_changed_after_the_scan_is_a_clear_error(tiny_lm_decomposed, tmp_path):
    """Examples are read back by byte offset: a file rewritten during training used to give a
    JSONDecodeError traceback, or silently other data where it stayed valid JSON."""
    import os

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_decomposed("llama")[1])
    f = tmp_path / "d.jsonl"
    lines = GSM8K_SLICE.read_text().splitlines(keepends=True)[:4]
    f.write_text("".join(lines))
    ds = Dataset(f, tok, max_length=512)
    before = ds.read([1, 2])
    expected = f"{f} changed after it was read (size or time differ); restore it and rerun with --resume"
    f.write_text('{"foo": 1}\n' * 40)  # not the data, and no longer the fields
    with pytest.raises(DataError) as e:
        ds.read([1, 2])
    assert str(e.value).startswith(expected)
    f.write_text("".join(lines[::-1]))  # valid, same size, other examples at the offsets
    with pytest.raises(DataError) as e:
        ds.read([1, 2])
    assert str(e.value).startswith(expected)
    f.write_text("".join(lines))
    st = ds.source._stamp
    os.utime(f, ns=(st[1], st[1]))  # put back as it was: reads again
    assert ds.read([1, 2]) == before


def test_training_lowers_loss_and_changes_only_the_factors(tiny_lm_decomposed, tmp_path):
    src, dec = tiny_lm_decomposed("llama")
    before = _tree_digest(dec)
    run = tmp_path / "run"
    r = train(dec, GSM8K_SLICE, run, config=TrainConfig(**FAST, max_steps=40), device="cpu")
    assert _tree_digest(dec) == before  # never writes to DIR
    log = _log(run)
    assert [x["step"] for x in log] == list(range(1, 41)) and r.steps == 40
    first, last = sum(x["loss"] for x in log[:5]) / 5, sum(x["loss"] for x in log[-5:]) / 5
    assert last < first, (first, last)
    assert {"loss", "reg_loss", "ortho_error_max", "grad_norm", "lr", "tokens_per_s", "memory_gib"} <= set(
        log[0]
    )
    assert sorted(p.name for p in run.iterdir()) == [
        "loss.png",
        "run.json",
        "sorsa_adapter.safetensors",
        "sorsa_config.json",
        "train_log.jsonl",
    ]
    cfg = json.loads((run / "sorsa_config.json").read_text())
    dcfg = json.loads((dec / "sorsa_config.json").read_text())
    assert cfg["kind"] == "trained" and cfg["decomposition"]["job_id"] == dcfg["job_id"]
    assert cfg["target_modules"] == dcfg["target_modules"] and cfg["training"]["steps"] == 40
    new, old = load_file(run / "sorsa_adapter.safetensors"), load_file(dec / "sorsa_adapter.safetensors")
    assert new.keys() == old.keys() and all(v.dtype == torch.float32 for v in new.values())
    assert all(not torch.equal(new[k], old[k]) for k in new)  # every factor trained
    # on a fixed batch, the trained adapter (loaded back on its decomposition) has a lower loss
    from transformers import AutoTokenizer

    ds = Dataset(GSM8K_SLICE, AutoTokenizer.from_pretrained(dec), max_length=384)
    batch = ds.collate([[i] for i in range(8)])
    losses = []
    for adapter in (None, run):
        model, layers, acfg = load_sorsa_model(dec, adapter)
        with torch.no_grad():
            total, n = loss_sum(model, batch)
        losses.append(float(total) / n)
    assert acfg["kind"] == "trained" and losses[1] < losses[0] - 0.05, losses


def test_regularizer_keeps_factors_orthonormal(tiny_lm_decomposed, tmp_path):
    """gamma > 0 ends with a smaller orthonormality error than gamma = 0 (the paper's ablation)."""
    _, dec = tiny_lm_decomposed("llama")
    errs = {}
    for gamma in (0.0, 2e-2):
        run = tmp_path / f"g{gamma}"
        train(
            dec,
            GSM8K_SLICE,
            run,
            config=TrainConfig(**{**FAST, "lr": 5e-3}, gamma=gamma, max_steps=25),
            device="cpu",
        )
        errs[gamma] = _log(run)[-1]["ortho_error_max"]
    assert errs[2e-2] < 0.5 * errs[0.0], errs


class _StopAt(TrainProgress):
    def __init__(self, at: int):
        self.at = at

    def step(self, record: dict) -> None:
        if record["step"] == self.at:
            raise KeyboardInterrupt


def test_resume_restores_the_random_state(tiny_lm_decomposed, tmp_path):
    """With dropout the random stream matters: a resumed run draws the masks the uninterrupted
    one draws (the checkpoint's RNG state), so the adapters are equal."""
    import shutil

    _, dec0 = tiny_lm_decomposed("llama")
    dec = tmp_path / "dec"
    shutil.copytree(dec0, dec)
    c = json.loads((dec / "config.json").read_text())
    (dec / "config.json").write_text(json.dumps({**c, "attention_dropout": 0.5}))
    cfg = TrainConfig(**{**FAST, "max_length": 256}, max_steps=4)
    train(dec, GSM8K_SLICE, tmp_path / "full", config=cfg, save_every=2, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        train(dec, GSM8K_SLICE, tmp_path / "cut", config=cfg, save_every=2, device="cpu", progress=_StopAt(3))
    train(dec, GSM8K_SLICE, tmp_path / "cut", config=cfg, save_every=2, device="cpu", resume=True)
    a, b = (load_file(tmp_path / d / "sorsa_adapter.safetensors") for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_equals_uninterrupted(tiny_lm_decomposed, tmp_path):
    """Also --keep-adapters: the snapshots of a resumed run equal those of an uninterrupted one."""
    _, dec = tiny_lm_decomposed("llama")
    cfg = dict(**FAST, max_steps=7, grad_accum=2)
    kw = dict(save_every=2, device="cpu", keep_adapters=True)
    full = tmp_path / "full"
    train(dec, GSM8K_SLICE, full, config=TrainConfig(**cfg), **kw)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(dec, GSM8K_SLICE, cut, config=TrainConfig(**cfg), progress=_StopAt(5), **kw)
    assert json.loads((cut / "checkpoint" / "state.json").read_text())["step"] == 4
    assert not (cut / "sorsa_adapter.safetensors").exists()
    stale = cut / "steps" / "step-000006"  # as if written by a run killed before its checkpoint
    stale.mkdir()
    (stale / "sorsa_config.json").write_text("{}")
    r = train(dec, GSM8K_SLICE, cut, config=TrainConfig(**cfg), resume=True, **kw)
    assert r.resumed_from == 4 and r.steps == 7
    full_cfg, cut_cfg = (json.loads((d / "sorsa_config.json").read_text()) for d in (full, cut))
    assert cut_cfg["training"] == full_cfg["training"]  # tokens, final loss, run id: all carried over
    assert r.tokens == full_cfg["training"]["tokens"] > 0
    a, b = load_file(full / "sorsa_adapter.safetensors"), load_file(cut / "sorsa_adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    snaps = ["step-000002", "step-000004", "step-000006"]
    for run in (full, cut):
        assert sorted(p.name for p in (run / "steps").iterdir()) == snaps
    final_cfg = json.loads((full / "sorsa_config.json").read_text())
    for name in snaps:
        x, y = (
            load_file(full / "steps" / name / "sorsa_adapter.safetensors"),
            load_file(cut / "steps" / name / "sorsa_adapter.safetensors"),
        )
        assert x.keys() == a.keys() and all(torch.equal(x[k], y[k]) for k in x)
        c = json.loads((cut / "steps" / name / "sorsa_config.json").read_text())
        assert c["kind"] == "trained" and c["training"]["steps"] == int(name[5:])
        assert c["training"]["run_id"] == final_cfg["training"]["run_id"]
        assert c["decomposition"] == final_cfg["decomposition"]
    assert any(not torch.equal(x[k], a[k]) for k in a)  # step 6 is not the final (step 7) adapter
    assert [x["step"] for x in _log(cut)] == list(range(1, 8))
    assert [x["loss"] for x in _log(cut)] == [x["loss"] for x in _log(full)]
    # a finished run is reported as done, not redone
    again = train(dec, GSM8K_SLICE, cut, config=TrainConfig(**cfg), save_every=2, device="cpu")
    assert again.already_done and again.steps == 7


def test_schedule_warmup_then_cosine():
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False)) and f[-1] < 0.01
    assert f[55] == pytest.approx(0.5)


def test_data_errors_name_the_line(tiny_lm_decomposed, tmp_path):
    from transformers import AutoTokenizer

    _, dec = tiny_lm_decomposed("llama")
    tok = AutoTokenizer.from_pretrained(dec)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n{"question": "c"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'answer' is missing"):
        Dataset(bad, tok)


@pytest.mark.parametrize("kind, checkpointing", [("llama", (False, True)), ("qwen2", (False,))])
def test_offloaded_residual_gives_the_same_training(tiny_lm_decomposed, tmp_path, kind, checkpointing):
    """--offload-residual runs W_r through the fetch-in-forward-and-backward path (on the CPU
    without copies): the same losses and the same adapter as the plain path, with and without
    gradient checkpointing (which replays the forward inside the backward); qwen2's q/k/v carry
    a bias, which the offloaded path must add too."""
    _, dec = tiny_lm_decomposed(kind)
    if kind == "qwen2":  # a random init has zero biases: give them values that matter
        import shutil

        from safetensors.torch import save_file

        dec = shutil.copytree(dec, tmp_path / "dec")
        g, biased = torch.Generator().manual_seed(0), 0
        for f in dec.glob("model*.safetensors"):
            t = load_file(f)
            for n in [n for n in t if n.endswith("_proj.bias")]:
                t[n] = torch.randn(t[n].shape, generator=g)
                biased += 1
            save_file(t, f, metadata={"format": "pt"})
        restamp(dec)
        assert biased == 6  # q, k, v of both layers
    for ckpt in checkpointing:
        runs = []
        for off in (False, True):
            run = tmp_path / f"r{ckpt}{off}"
            cfg = TrainConfig(**FAST, max_steps=3, grad_checkpointing=ckpt, offload_residual=off)
            train(dec, GSM8K_SLICE, run, config=cfg, device="cpu")
            runs.append(run)
        a, b = (load_file(r / "sorsa_adapter.safetensors") for r in runs)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
        assert [x["loss"] for x in _log(runs[0])] == pytest.approx(
            [x["loss"] for x in _log(runs[1])], abs=1e-6
        )


def test_residual_store_prefetches_along_the_recorded_trace(tiny_lm_decomposed):
    from sorsa_tools.offload import ResidualStore

    _, dec = tiny_lm_decomposed("llama")
    model, layers, _ = load_sorsa_model(dec, trainable=True, offload_residual=True)
    store = next(iter(layers.values())).residual_store
    assert isinstance(store, ResidualStore) and len(store.host) == 14
    assert all(layer.weight.numel() == 0 for layer in layers.values())  # W_r is not in the module
    ids = torch.randint(3, 384, (1, 16))
    for _ in range(2):
        store.begin_step()
        model(ids, labels=ids).loss.backward()
    # the forward fetches all 14 W_r; the backward all but layer 0's q, k, v, whose input (the
    # frozen embeddings) needs no gradient: 25 fetches, replayed along the trace in step 2
    assert len(store.trace) == 25 and set(store.trace[:14]) == set(range(14))
    assert len(set(store.trace[14:])) == 11 and not store.recording and store.pos == 25
    # a step of two micro-batches replays the one-micro-batch trace twice: no re-recording, and
    # every fetch was prefetched (the last forward layer stays resident for its backward)
    store.begin_step()
    misses = store.misses
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
    assert not store.recording and store.pos == 50 and store.misses == misses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("offload", [False, True])
def test_cuda_training_matches_cpu_direction_and_offload(tiny_lm_decomposed, tmp_path, offload):
    """On CUDA (bf16 autocast, float32 frozen weights here), training lowers the loss, and the
    offloaded residual path gives the same adapter as the resident one."""
    _, dec = tiny_lm_decomposed("llama")
    cfg = dict(**FAST, max_steps=10, dtype="float32", grad_checkpointing=True)
    ref = tmp_path / "ref"
    train(dec, GSM8K_SLICE, ref, config=TrainConfig(**cfg), device="cuda")
    run = tmp_path / "run"
    train(dec, GSM8K_SLICE, run, config=TrainConfig(**cfg, offload_residual=offload), device="cuda")
    a, b = load_file(ref / "sorsa_adapter.safetensors"), load_file(run / "sorsa_adapter.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    log = _log(run)
    assert log[-1]["loss"] < log[0]["loss"] and log[0]["memory_gib"] > 0


def _tok(d: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d)


def _lines(tmp_path: Path, n: int, name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(GSM8K_SLICE.read_text().splitlines(keepends=True)[:n]))
    return p


def test_packed_examples_do_not_see_each_other(tiny_lm_decomposed, tmp_path):
    """Packed after another example, an example's loss and targets are what they are alone."""
    from transformers import AutoTokenizer

    _, dec = tiny_lm_decomposed("llama")
    tok = AutoTokenizer.from_pretrained(dec)
    data = _lines(tmp_path, 3)
    ds = Dataset(data, tok, max_length=1024, pack=True)
    model, _, _ = load_sorsa_model(dec)
    alone, packed = ds.collate([[1]]), ds.collate([[0, 1], [2]])
    packed["labels"][0, : ds.lengths[0]] = IGNORE  # count example 1's targets only
    packed["labels"][1] = IGNORE
    with torch.no_grad():
        (a, na), (p, np_) = loss_sum(model, alone), loss_sum(model, packed)
    assert na == np_ and abs(float(a) / na - float(p) / np_) < 1e-5, (float(a) / na, float(p) / np_)
    # raw text: the next example's first token is no target of the previous example's last
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "one two three"}\n{"text": "four five"}\n')
    tds = Dataset(text, tok, fields=parse_fields("text"), template="raw", max_length=64, pack=True)
    b = tds.collate([[0, 1]])
    assert b["labels"][0, tds.lengths[0]] == IGNORE
    assert int((b["labels"][:, 1:] != IGNORE).sum()) == sum(tds.lengths) - 2


def test_epochs_with_packing_count_each_epochs_rows(tiny_lm_decomposed, tmp_path):
    from transformers import AutoTokenizer

    _, dec = tiny_lm_decomposed("llama")
    tok = AutoTokenizer.from_pretrained(dec)
    data = _lines(tmp_path, 7)
    cfg = dict(max_length=1024, batch_size=1, pack=True, lr=1e-3)
    ds = Dataset(data, tok, max_length=1024, pack=True)
    per_epoch = [len(ds.micro_batches(e, 0, 1)) for e in range(3)]
    assert len(set(per_epoch)) > 1, per_epoch  # the shuffles pack into different numbers of rows
    r = train(dec, data, tmp_path / "run", config=TrainConfig(epochs=3, **cfg), device="cpu")
    assert r.steps == sum(per_epoch)
    assert [x["epoch"] for x in _log(tmp_path / "run")] == [e for e in range(3) for _ in range(per_epoch[e])]


def test_logged_epoch_of_a_short_last_accumulation_group(tiny_lm_decomposed, tmp_path):
    _, dec = tiny_lm_decomposed("llama")
    data = _lines(tmp_path, 11)  # 6 micro-batches of 2 an epoch: accumulation groups of 4 and 2
    cfg = TrainConfig(max_length=384, batch_size=2, grad_accum=4, epochs=2, lr=1e-3)
    train(dec, data, tmp_path / "run", config=cfg, device="cpu")
    assert [x["epoch"] for x in _log(tmp_path / "run")] == [0, 0, 1, 1]


def test_resume_before_the_first_checkpoint_starts_over(tiny_lm_decomposed, tmp_path):
    _, dec = tiny_lm_decomposed("llama")
    cfg = TrainConfig(**FAST, max_steps=3)
    train(dec, GSM8K_SLICE, tmp_path / "full", config=cfg, device="cpu")
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(dec, GSM8K_SLICE, cut, config=cfg, device="cpu", progress=_StopAt(2))
    assert not (cut / "checkpoint").exists()
    r = train(dec, GSM8K_SLICE, cut, config=cfg, device="cpu", resume=True)
    assert r.resumed_from is None and r.steps == 3
    a, b = (
        load_file(tmp_path / "full" / "sorsa_adapter.safetensors"),
        load_file(cut / "sorsa_adapter.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [x["step"] for x in _log(cut)] == [1, 2, 3]


def test_examples_without_a_target_and_invalid_unicode(tiny_lm_decomposed, tmp_path):
    from transformers import AutoTokenizer

    _, dec = tiny_lm_decomposed("llama")
    tok = AutoTokenizer.from_pretrained(dec)
    tok._tokenizer.post_processor = None  # no BOS: "" encodes to [eos] alone, which predicts nothing
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": ""}\n{"text": "one two"}\n')
    ds = Dataset(text, tok, fields=parse_fields("text"), template="raw", max_length=64)
    assert len(ds) == 1 and ds.n_too_long == 1
    bad = tmp_path / "u.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n{"question": "x \\ud800 y", "answer": "b"}\n')
    with pytest.raises(DataError, match=r"u.jsonl:2: field 'question' is not valid Unicode"):
        Dataset(bad, AutoTokenizer.from_pretrained(dec))


def test_force_keeps_the_data_file_inside_the_run(tiny_lm_decomposed, tmp_path):
    from sorsa_tools.errors import OutputDirError

    _, dec = tiny_lm_decomposed("llama")
    run = tmp_path / "run"
    cfg = TrainConfig(**FAST, max_steps=1)
    train(dec, GSM8K_SLICE, run, config=cfg, device="cpu")
    data = _lines(run, 20, "mine.jsonl")  # the user keeps the data in the run dir
    with pytest.raises(OutputDirError, match="it holds .*mine.jsonl, an input of this job"):
        train(dec, data, run, config=cfg, device="cpu", force=True)
    assert data.is_file()


def test_offloaded_lm_head_is_still_chunked(tiny_lm_decomposed, tmp_path, monkeypatch):
    """With W_r offloaded the head's weight is empty: the chunking decision must not read it."""
    import sorsa_tools.train as T
    from sorsa_tools import decompose

    src, _ = tiny_lm_decomposed("llama")
    dec = tmp_path / "dec"
    decompose(str(src), 4, dec, targets="q_proj,lm_head", svd="exact", check_sample=0)
    model, _, _ = load_sorsa_model(dec, trainable=True, offload_residual=True)
    assert model.get_output_embeddings().weight.numel() == 0
    chunks = []
    orig = T.head_cross_entropy
    monkeypatch.setattr(
        T, "head_cross_entropy", lambda m, h, t, **k: chunks.append(len(t)) or orig(m, h, t, **k)
    )
    batch = {
        k: torch.as_tensor(v)
        for k, v in Dataset(GSM8K_SLICE, _tok(dec), max_length=384).collate([[0], [1]]).items()
    }
    T.loss_sum(model, batch, chunk=16, budget=16 * 384)
    assert len(chunks) > 1 and max(chunks) <= 16


def test_one_step_applies_eq_10_clip_then_regularizer(tiny_lm_decomposed):
    """The gradient the optimizer steps on is clip(task gradient) + scale * grad L_reg: the task
    gradient alone is clipped (the official order), the regularizer's is added whole after it."""
    from transformers import AutoTokenizer

    from sorsa_tools.layer import orthonormality_errors
    from sorsa_tools.train import factor_params, optimizer_step

    _, dec = tiny_lm_decomposed("llama")
    model, layers, _ = load_sorsa_model(dec, trainable=True)
    layer_list = list(layers.values())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # factors clearly off orthonormal, so L_reg has a real gradient
        for m in layer_list:
            m.sorsa_U.mul_(1.2).add_(0.05 * torch.randn(m.sorsa_U.shape, generator=g))
            m.sorsa_Vt.mul_(0.9)
    params = factor_params(layer_list)
    batch = Dataset(GSM8K_SLICE, AutoTokenizer.from_pretrained(dec), max_length=256).collate([[0], [1]])
    clip, scale = 1e-4, 0.5

    # the expectation, by autograd: task gradient, its clipped version, the regularizer's gradient
    total, n = loss_sum(model, batch)
    task = torch.autograd.grad(total / n, params)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in task]))
    assert norm > 100 * clip  # clipping acts
    reg = sum(sum(orthonormality_errors(m.sorsa_U, m.sorsa_Vt)) for m in layer_list) / len(layer_list)
    reg_grads = torch.autograd.grad(reg, params, allow_unused=True)
    want = [
        t * (clip / (norm + 1e-6)) + (0 if r is None else scale * r)
        for t, r in zip(task, reg_grads, strict=True)
    ]
    assert any(r is not None and r.abs().max() > 10 * clip for r in reg_grads)  # would show if clipped

    seen: list[torch.Tensor] = []

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            seen.extend(p.grad.clone() for p in params)

    opt = Capture(params, lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    out = optimizer_step(model, layer_list, opt, sched, [batch], clip, scale, "cpu")
    assert out.stepped and abs(out.grad_norm - float(norm)) < 1e-4 * float(norm)
    assert abs(out.reg_loss - float(reg)) < 1e-5 * float(reg)
    for got, exp in zip(seen, want, strict=True):
        assert torch.allclose(got, exp, rtol=1e-4, atol=1e-7), (got - exp).abs().max()


def test_under_sgd_eq_9_and_eq_10_are_the_same_step(tiny_lm_decomposed):
    """The paper: eq. 10 is eq. 9 written for one optimizer. Under plain SGD (lr eta, gamma / eta
    as reg_scale) the two updates agree; --reg-update eq9 is the same step taken apart (and so,
    under AdamW, a different one)."""
    from transformers import AutoTokenizer

    from sorsa_tools.train import optimizer_step

    _, dec = tiny_lm_decomposed("llama")
    batch = Dataset(GSM8K_SLICE, AutoTokenizer.from_pretrained(dec), max_length=256).collate([[0], [1]])
    after = {}
    for mode in ("eq10", "eq9"):
        model, layers, _ = load_sorsa_model(dec, trainable=True)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # off orthonormal, so L_reg has a real gradient
            for m in layers.values():
                m.sorsa_U.mul_(1.2).add_(0.05 * torch.randn(m.sorsa_U.shape, generator=g))
        lst = list(layers.values())
        opt = torch.optim.SGD([p for m in lst for p in (m.sorsa_U, m.sorsa_S, m.sorsa_Vt)], lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)  # eta_t = eta_max / 2
        before = {n: m.sorsa_U.detach().clone() for n, m in layers.items()}
        optimizer_step(model, lst, opt, sched, [batch], 1.0, 2.0, "cpu", reg_update=mode)
        after[mode] = {n: m.sorsa_U.detach().clone() for n, m in layers.items()}
    moved = max(float((after["eq9"][n] - before[n]).abs().max()) for n in before)
    diff = max(float((after["eq9"][n] - after["eq10"][n]).abs().max()) for n in before)
    assert moved > 1e-3 and diff < 1e-6 * max(1.0, moved) + 1e-7, (moved, diff)


def test_checkpoints_by_time_keep_a_killed_runs_work(tiny_lm_decomposed, tmp_path, monkeypatch):
    """--save-every 200 alone made a killed run shorter than 200 steps restart from zero: a
    checkpoint also lands when --save-minutes have passed, and resuming from it changes nothing."""
    import sorsa_tools.train as T

    _, dec = tiny_lm_decomposed("llama")
    clock = iter(range(0, 10**6, 400))  # each reading of the clock: 400 s later
    monkeypatch.setattr(T.time, "monotonic", lambda: float(next(clock)))
    cfg = TrainConfig(**FAST, max_steps=5)
    kw = dict(save_every=1000, save_minutes=10, device="cpu")
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(dec, GSM8K_SLICE, cut, config=cfg, progress=_StopAt(4), **kw)
    step = json.loads((cut / "checkpoint" / "state.json").read_text())["step"]
    assert step == 4  # by time (every second 400-s step passes 10 min), not by --save-every 1000
    r = train(dec, GSM8K_SLICE, cut, config=cfg, resume=True, **kw)
    assert r.resumed_from == step
    full = tmp_path / "full"
    train(dec, GSM8K_SLICE, full, config=cfg, save_every=1000, save_minutes=0, device="cpu")
    a, b = (load_file(d / "sorsa_adapter.safetensors") for d in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="--save-minutes must be >= 0"):
        train(dec, GSM8K_SLICE, tmp_path / "x", config=cfg, save_minutes=-1, device="cpu")
