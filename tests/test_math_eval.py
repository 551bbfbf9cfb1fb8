"""`sorsa eval math`: answers graded as a person would, the final answer found where people put it,
MATH's formats read, and a fixture in MATH's layout end to end through the CLI (files, counts,
per-subject and per-level keys, the NLL = the trainer's loss); bad data is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli_errors import assert_clean_error, run

pytest.importorskip("math_verify")

from sorsa_tools.evaluate import math_eval as me  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "math"

# (prediction, reference, same answer?) as people write them
PAIRS = [
    ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
    ("\\dfrac12", "\\frac{1}{2}", True),
    ("0.5", "\\frac12", True),
    ("1/2", "\\frac{1}{2}", True),
    ("\\tfrac{3}{4}", "0.75", True),
    ("\\frac{3}{4}", "0.7", False),
    ("\\frac{2}{3}", "\\frac{3}{2}", False),
    ("(1,2]", "(1, 2]", True),
    ("(1,2]", "[1,2]", False),
    ("(-\\infty, 3)", "(-\\infty,3)", True),
    ("(-\\infty,3]", "(-\\infty,3)", False),
    ("[-2, 5) \\cup (7, \\infty)", "[-2,5)\\cup(7,\\infty)", True),
    ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}", True),
    ("1, 2, 3", "\\{1,2,3\\}", True),
    ("\\{1, 2\\}", "\\{1, 2, 3\\}", False),
    ("90^\\circ", "90", True),
    ("90^{\\circ}", "90^\\circ", True),
    ("45^\\circ", "90^\\circ", False),
    ("5 \\text{ cm}", "5", True),
    ("12\\text{ inches}", "12", True),
    ("\\$18", "18", True),
    ("18 \\text{ dollars}", "18", True),
    ("20\\%", "20", True),
    ("10,000", "10000", True),
    ("\\text{Monday}", "\\text{Monday}", True),
    ("\\text{Monday}", "\\text{Tuesday}", False),
    ("\\text{(C)}", "\\text{(C)}", True),
    ("-3", "3", False),
    ("-\\frac{1}{3}", "\\frac{-1}{3}", True),
    ("-7", "-7.0", True),
    ("\\pi", "\\pi", True),
    ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("9\\pi", "9 \\pi", True),
    ("9\\pi", "3\\pi", False),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\sqrt{3}", "\\sqrt{2}", False),
    ("x = 5", "5", True),
    ("x=4", "5", False),
    ("x^2 + 2x + 1", "(x+1)^2", True),
    ("x+1", "x-1", False),
    ("1000000", "10^6", True),
    ("3.0", "3", True),
    ("3.01", "3", False),
    ("\\infty", "\\infty", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", False),
    ("4", "4", True),
    ("", "4", False),
]


@pytest.mark.parametrize("pred,gold,same", PAIRS)
def test_answers_are_graded_as_a_person_would(pred, gold, same):
    assert me.is_equivalent(pred or None, gold) is same


def test_grading_works_off_the_main_thread():
    """math-verify's timeouts use signal.alarm (main thread only): elsewhere they are left off."""
    import threading

    got = []
    t = threading.Thread(target=lambda: got.append(me.is_equivalent("0.5", "\\frac12")))
    t.start()
    t.join()
    assert got == [True]


def test_there_are_enough_pairs_of_both_kinds():
    assert len(PAIRS) >= 40 and sum(s for *_, s in PAIRS) >= 25 and sum(not s for *_, s in PAIRS) >= 15


EXTRACTION = [
    ("So $x = \\boxed{4}$.", "4"),
    ("First $\\boxed{3}$, no: the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),  # the last one
    ("$\\boxed{\\frac{\\sqrt{2}}{\\sqrt{3}}}$", "\\frac{\\sqrt{2}}{\\sqrt{3}}"),  # nested braces
    ("Set: $\\boxed{\\{1, 2\\}}$", "\\{1, 2\\}"),  # escaped braces are not groups
    ("$\\fbox{7}$", "7"),
    ("Thus $\\boxed 5$.", "5"),
    ("We get 12.\nThe answer is: 12", "12"),
    ("The answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("The answer is 3. Wait, the answer is 4.\nAnother question follows", "4."),
    ("$\\boxed{2}$ then a cut-off $\\boxed{\\frac{1", "2"),  # unclosed: the one before
    ("No final answer here.", None),
]


@pytest.mark.parametrize("output,answer", EXTRACTION)
def test_the_final_answer_is_found(output, answer):
    got = me.extract_answer(output)
    assert got == answer or (answer and got == answer.rstrip("."))


def test_gold_is_the_answer_field_or_the_solutions_last_box():
    assert me.gold_answer({"solution": "a $\\boxed{1}$ then $\\boxed{2}$"}) == "2"
    assert me.gold_answer({"solution": "$\\boxed{2}$", "answer": "\\frac{4}{2}"}) == "\\frac{4}{2}"
    assert me.gold_answer({"solution": "$\\boxed{2}$", "answer": ""}) == "2"
    assert me.gold_answer({"solution": "no box"}) is None


def test_records_are_read_from_a_directory_jsonl_and_json(tmp_path):
    recs = list(me.read_math_records(FIXTURE))
    assert [w for w, _ in recs[:3]] == ["test/algebra/1.json", "test/algebra/2.json", "test/algebra/10.json"]
    assert len(recs) == 7 and {r["type"] for _, r in recs} == {"Algebra", "Geometry", "Number Theory"}
    jl = tmp_path / "m.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for _, r in recs) + "\n")
    assert [r for _, r in me.read_math_records(jl)] == [r for _, r in recs]
    arr = tmp_path / "m.json"
    arr.write_text(json.dumps([r for _, r in recs[:2]]))
    assert [w for w, _ in me.read_math_records(arr)] == ["m.json[0]", "m.json[1]"]


def _tiny(tiny_lm_decomposed):
    return tiny_lm_decomposed("llama")[0]


def test_fixture_end_to_end_through_the_cli(tiny_lm_decomposed, tmp_path):
    """`python -m sorsa_tools eval math` on MATH's layout: 7 items, the subject and level keys of
    the data, NLL numbers that add up and equal the trainer's loss on the same text."""
    from transformers import AutoTokenizer

    from sorsa_tools.data import Dataset, parse_fields
    from sorsa_tools.train import loss_sum

    src = _tiny(tiny_lm_decomposed)
    out = tmp_path / "m.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "sorsa_tools",
        "eval",
        "math",
        str(src),
        "--data",
        str(FIXTURE),
        "-o",
        str(out),
    ]
    res = subprocess.run(
        cmd + ["--max-new-tokens", "8", "--device", "cpu"], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    s = json.loads(out.with_suffix(".json").read_text())
    assert len(rows) == 7 and s["n"] == 7 and s["correct"] == sum(r["correct"] for r in rows)
    assert s["ci95"][0] == 0.0 and 0 < s["ci95"][1] < 1 and s["verifier"] == "math-verify"
    assert set(s["by_subject"]) == {"Algebra", "Geometry", "Number Theory"}
    assert set(s["by_level"]) == {"Level 1", "Level 2", "Level 3", "Level 5"}
    assert [s["by_subject"][k]["n"] for k in ("Algebra", "Geometry", "Number Theory")] == [3, 2, 2]
    assert [r["gold"] for r in rows][:3] == ["4", "x+1", "(-2, 2)"] and rows[6]["gold"] == "\\frac{2}{3}"
    assert all(r["output"] is not None and r["generated_tokens"] >= 1 for r in rows)
    tokens = sum(r["n_tokens"] for r in rows)
    assert s["nll_tokens"] == tokens and s["nll"] == pytest.approx(sum(r["nll_sum"] for r in rows) / tokens)
    alg = [r for r in rows if r["type"] == "Algebra"]
    assert s["by_subject"]["Algebra"]["nll"] == pytest.approx(
        sum(r["nll_sum"] for r in alg) / sum(r["n_tokens"] for r in alg)
    )
    staged = tmp_path / "staged.jsonl"  # the same text as `sorsa train` would see it
    recs = [r for _, r in me.read_math_records(FIXTURE)]
    staged.write_text(
        "".join(json.dumps({"problem": r["problem"], "solution": r["solution"]}) + "\n" for r in recs)
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ds = Dataset(staged, AutoTokenizer.from_pretrained(src), parse_fields("problem,solution"), "paper", 4096)
    with torch.no_grad():
        total, n = loss_sum(model, ds.collate([[i] for i in range(7)]))
    assert n == tokens and s["nll"] == pytest.approx(float(total) / n, rel=1e-4)


def test_jsonl_and_directory_give_the_same_numbers(tiny_lm_decomposed, tmp_path):
    src = _tiny(tiny_lm_decomposed)
    jl = tmp_path / "m.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for _, r in me.read_math_records(FIXTURE)))
    a = me.evaluate_math(src, FIXTURE, metric="nll", device="cpu", output=tmp_path / "a.jsonl")
    b = me.evaluate_math(src, jl, metric="nll", device="cpu", output=tmp_path / "b.jsonl", limit=5)
    rows_a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert a.accuracy is None and a.n == 7 and b.n == 5 and "accuracy" not in a.by_subject["Algebra"]
    assert [r["nll_sum"] for r in rows_b] == pytest.approx([r["nll_sum"] for r in rows_a[:5]], rel=1e-6)


def test_cli_refuses_bad_data(tiny_lm_decomposed, tmp_path):
    src = str(_tiny(tiny_lm_decomposed))
    o = ["-o", str(tmp_path / "r.jsonl")]

    def err(data, *needles, extra=()):
        assert_clean_error(run("eval", "math", src, "--data", str(data), *o, *extra), *needles)

    err(tmp_path / "nope", "data not found", "JSONL file or a directory")
    (tmp_path / "empty").mkdir()
    err(tmp_path / "empty", "holds no .json files")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "solution": "$\\\\boxed{2}$"}\n{"problem": \n')
    err(bad, "bad.jsonl:2: not valid JSON")
    bad.write_text('{"question": "1+1?", "answer": "2"}\n')
    err(bad, "field 'problem' is missing", "keys: answer, question", "--fields")
    bad.write_text('{"problem": "1+1?", "solution": 2}\n')
    err(bad, "field 'solution' must be a string")
    bad.write_text('{"problem": "1+1?", "solution": "It is two."}\n')
    err(bad, "no reference answer", "--metric nll")
    (tmp_path / "m.parquet").write_bytes(b"PAR1" + bytes(range(256)))
    err(tmp_path / "m.parquet", "not readable as parquet")
    (tmp_path / "latin1.jsonl").write_bytes('{"problem": "caf\xe9"}\n'.encode("latin-1"))
    err(tmp_path / "latin1.jsonl", "not UTF-8")
    bad.write_text('["a", "b"]\n')
    err(bad, "must be a JSON object")
    err(FIXTURE, "--fields", extra=("--fields", "a,b,c"))
    err(FIXTURE, "--metric must be one of", extra=("--metric", "bleu"))
    ok = tmp_path / "q.jsonl"
    ok.write_text('{"question": "1+1?", "answer": "$\\\\boxed{2}$"}\n')
    res = run("eval", "math", src, "--data", str(ok), "--fields", "question,answer", "--metric", "nll", *o)
    assert res.exit_code == 0, res.stderr


def test_gguf_and_unmerged_dir_give_the_hf_numbers(tiny_lm_decomposed, tmp_path):
    """MATH through llama.cpp (a `sorsa merge --to gguf` f32 file) and through the decomposed DIR
    unmerged: the NLL and greedy outputs of the HF checkpoint."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sorsa_tools.gguf_export")
    from sorsa_tools.merge import merge

    src, dec = tiny_lm_decomposed("llama")
    merge(dec, tmp_path / "m.gguf", to="gguf", outtype="f32")
    kw = dict(limit=3, max_new_tokens=6, stop_strings=())
    h = me.evaluate_math(src, FIXTURE, device="cpu", output=tmp_path / "h.jsonl", **kw)
    g = me.evaluate_math(tmp_path / "m.gguf", FIXTURE, output=tmp_path / "g.jsonl", **kw)
    d = me.evaluate_math(dec, FIXTURE, device="cpu", output=tmp_path / "d.jsonl", **kw)
    assert g.summary["model_kind"] == "gguf" and d.summary["model_kind"] == "sorsa-unmerged"
    assert g.nll_tokens == h.nll_tokens == d.nll_tokens > 0
    assert g.nll == pytest.approx(h.nll, rel=1e-4) and d.nll == pytest.approx(h.nll, rel=1e-4)
    outs = [
        [json.loads(x)["output"] for x in (tmp_path / f"{k}.jsonl").read_text().splitlines()] for k in "hd"
    ]
    assert outs[0] == outs[1]
