"""examples/gsm8k_study.py end to end on a tiny Gemma 3: every flow sees the same batches, starts from
the base model's loss, and the report is written; a second call reuses the finished runs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys

import pytest
import torch
from conftest import GSM8K_SLICE, ROOT

from sorsa_tools import train as T

_spec = importlib.util.spec_from_file_location("gsm8k_study", ROOT / "examples" / "gsm8k_study.py")
study = importlib.util.module_from_spec(_spec)
sys.modules["gsm8k_study"] = study
_spec.loader.exec_module(study)


@pytest.fixture
def recorder(monkeypatch):
    """Every training loss_sum call (both loops go through sorsa_tools.train.loss_sum), by flow."""
    calls: dict[str, list] = {}
    current = {"flow": None}
    orig_loss = T.loss_sum

    def loss_sum(model, batch, *a, **k):
        out = orig_loss(model, batch, *a, **k)
        calls.setdefault(current["flow"], []).append(
            (batch["input_ids"].cpu().clone(), batch["labels"].cpu().clone(), float(out[0].detach()) / out[1])
        )
        return out

    def wrap(fn, name):
        def inner(cfg, *args):
            current["flow"] = name(args)
            return fn(cfg, *args)

        return inner

    monkeypatch.setattr(T, "loss_sum", loss_sum)
    monkeypatch.setattr(
        study, "train_sorsa", wrap(study.train_sorsa, lambda a: f"sorsa-g{a[2]:g}")
    )  # (decomp, lr, gamma, out)
    monkeypatch.setattr(
        study, "train_peft", wrap(study.train_peft, lambda a: a[0])
    )  # (method, lr, out, targets)
    return calls


def test_study_smoke(tmp_path, tiny_lm_decomposed, recorder):
    src, _ = tiny_lm_decomposed("gemma3")
    doc = tmp_path / "docs" / "RESULTS.md"
    argv = [
        "--smoke",
        "--model", str(src),
        "--train", str(GSM8K_SLICE),
        "--test", str(GSM8K_SLICE),
        "--workdir", str(tmp_path / "work"),
        "--rank", "4",
        "--steps", "2",
        "--batch-size", "2",
        "--max-length", "384",
        "--lrs-sorsa", "2e-3",
        "--lrs-lora", "2e-3",
        "--lrs-pissa", "2e-3",
        "--eval-limit", "4",
        "--acc-limit", "1",
        "--max-new-tokens", "4",
        "--analyze-layers", "0,1",
        "--device", "cpu",
        "--record",
        "--doc", str(doc),
    ]  # fmt: skip
    assert study.main(argv) == 0

    # the four runs, in the order the study makes them; 2 steps each, one micro-batch a step
    assert list(recorder) == ["sorsa-g0.0004", "lora", "pissa", "sorsa-g0"]
    ref = recorder["lora"]
    assert len(ref) == 2 and ref[0][0].shape[0] == 2
    assert not torch.equal(ref[0][0], ref[1][0])  # two different batches
    for flow, calls in recorder.items():
        assert len(calls) == 2, flow
        for (ids, labels, _), (rids, rlabels, _) in zip(calls, ref, strict=True):
            assert torch.equal(ids, rids) and torch.equal(labels, rlabels), flow

    # step 1 runs before any update: every method's init preserves the model, so its loss is the
    # base model's loss_sum on that batch (PiSSA / SORSA: W_res + B A = W up to float32 rounding)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids, _, _ = ref[0]
    from transformers import AutoTokenizer

    cfg, _ = study.parse_args(argv)
    cfg.steps = 2
    ds = study.train_dataset(cfg, AutoTokenizer.from_pretrained(src))
    batch = next(study.batches(ds, cfg))
    assert torch.equal(batch["input_ids"], ids)
    with torch.no_grad():
        s, n = T.loss_sum(base, batch)
    base_loss = float(s) / n
    for flow, calls in recorder.items():
        assert calls[0][2] == pytest.approx(base_loss, rel=1e-5, abs=1e-6), flow

    work = tmp_path / "work"
    res = {p.stem: json.loads(p.read_text()) for p in (work / "results").glob("*.json")}
    assert set(res) == {
        "base",
        "sorsa-lr2e-03-g4e-04",
        "sorsa-lr2e-03-g0e+00",
        "lora-lr2e-03",
        "pissa-lr2e-03",
    }
    acc = {p.stem: json.loads(p.read_text()) for p in (work / "results" / "accuracy").glob("*.json")}
    assert set(acc) == set(res)  # the accuracy phase: kept apart, keyed by its own settings
    for k, r in res.items():
        assert r["nll_n"] == 4 and acc[k]["acc_n"] == 1 and 0 <= acc[k]["correct"] <= 1, k
        assert r["val_n"] == 4 and r["val_nll"] > 0 and r["settings"]["steps"] == 2, k
        if k != "base":
            assert r["steps"] == 2 and r["first_loss"] == pytest.approx(base_loss, rel=1e-5), k
            assert r["tokens"] > 0 and r["train_seconds"] > 0, k
            assert r["nll"] != pytest.approx(res["base"]["nll"], abs=1e-7), k  # training moved the model
    # SORSA's factors have one more vector (S) than LoRA's A and B
    assert res["sorsa-lr2e-03-g4e-04"]["trainable_params"] > res["lora-lr2e-03"]["trainable_params"]
    assert res["lora-lr2e-03"]["trainable_params"] == res["pissa-lr2e-03"]["trainable_params"]

    text = doc.read_text()
    assert text.startswith("# Results")
    assert "<!-- BEGIN gsm8k_study_smoke -->" in text and "SMOKE RUN" in text
    assert "Convergence: the first step at which each best run's training loss" in text
    # the best runs' paired NLL differences: the same sign and size as the table's own numbers
    paired = json.loads((tmp_path / "work" / "study.json").read_text())["paired"]
    assert [(p["a"], p["b"]) for p in paired] == [
        ("sorsa-lr2e-03-g4e-04", "lora-lr2e-03"),
        ("sorsa-lr2e-03-g4e-04", "pissa-lr2e-03"),
        ("pissa-lr2e-03", "lora-lr2e-03"),
        ("sorsa-lr2e-03-g0e+00", "sorsa-lr2e-03-g4e-04"),
    ]
    for p in paired:
        assert p["n"] == 4 and p["lo"] <= p["diff"] <= p["hi"]
        assert p["diff"] == pytest.approx(res[p["a"]]["nll"] - res[p["b"]]["nll"], abs=1e-9)
    assert "Paired differences of test NLL" in text
    for k in res:
        assert f"| {k} |" in text or f"| **{k}** |" in text, k
    assert (doc.parent / "results_smoke_loss.png").stat().st_size > 1000
    assert (doc.parent / "results_smoke_analyze.png").stat().st_size > 1000
    ana = json.loads((work / "analyze.json").read_text())
    labels_ = [c["label"] for c in ana["checkpoints"]]
    assert labels_ == ["sorsa-lr2e-03-g4e-04", "sorsa-lr2e-03-g0e+00", "lora-lr2e-03", "pissa-lr2e-03"]
    assert all(s["mean_delta_sigma"] > 0 for s in ana["summary"])
    # the best SORSA run over the adapter it kept at step 1 (of 2), then its final one
    traj = json.loads((work / "analyze_trajectory.json").read_text())
    assert [(c["label"], c["step"]) for c in traj["checkpoints"]] == [
        ("step-000001", 1),
        ("sorsa-lr2e-03-g4e-04", 2),
    ]
    assert 0 < traj["summary"][0]["mean_delta_d"] < traj["summary"][1]["mean_delta_d"]
    assert "over the adapters it kept" in text and "| 1 |" in text
    assert (doc.parent / "results_smoke_trajectory.png").stat().st_size > 1000

    # the lr is chosen on lines held out of training: the last --val-size of the train file
    lines = GSM8K_SLICE.read_text().splitlines(keepends=True)
    assert (work / "data" / "train.jsonl").read_text() == "".join(lines[:-4])
    assert (work / "data" / "val.jsonl").read_text() == "".join(lines[-4:])

    # a second call trains nothing and writes the same table
    recorder.clear()
    assert study.main(argv) == 0
    assert recorder == {}
    assert doc.read_text().count("| lora-lr2e-03 |") + doc.read_text().count("| **lora-lr2e-03** |") >= 1
    # --kept-grid: a grid point without a kept result is not trained, the gamma-0 twin still is
    (work / "results" / "sorsa-lr2e-03-g0e+00.json").unlink()
    shutil.rmtree(work / "runs" / "sorsa-lr2e-03-g0e+00")
    kept_argv = [a for a in argv if a != "--record"] + ["--kept-grid", "--no-analyze"]
    kept_argv[kept_argv.index("--lrs-lora") + 1] = "2e-3,5e-3"
    assert study.main(kept_argv) == 0
    assert set(recorder) == {"sorsa-g0"}
    assert not (work / "results" / "lora-lr5e-03.json").exists()
    assert (work / "results" / "sorsa-lr2e-03-g0e+00.json").is_file()
    assert json.loads((work / "study.json").read_text())["not_run"] == ["lora-lr5e-03"]
    recorder.clear()
    # other settings in the same workdir: the kept results are not reused
    argv[argv.index("--steps") + 1] = "1"
    assert study.main([a for a in argv if a not in ("--record",)]) == 0
    assert set(recorder) == {"sorsa-g0.0004", "lora", "pissa", "sorsa-g0"}
    assert all(len(c) == 1 for c in recorder.values())


def test_study_refuses_a_character_level_tokenizer(monkeypatch):
    """A tokenizer that splits text into characters (what a broken GGUF conversion gave) is refused."""
    cfg = study.StudyConfig(test=str(GSM8K_SLICE))
    monkeypatch.setattr(
        study, "_tokenizer", lambda c: lambda text, **k: {"input_ids": list(range(len(text)))}
    )
    with pytest.raises(SystemExit, match="characters per token"):
        study.check_tokenizer(cfg)
    monkeypatch.setattr(
        study, "_tokenizer", lambda c: lambda text, **k: {"input_ids": list(range(len(text) // 4))}
    )
    assert study.check_tokenizer(cfg) == pytest.approx(4.0, rel=0.05)


def test_presets_and_the_train_rows_split(tmp_path):
    """--cpu is the issue's CPU-sized study; --train-rows trains on the first lines and validates on
    the last ones, never the same."""
    cfg, _ = study.parse_args(["--cpu"])
    assert (cfg.steps, cfg.batch_size, cfg.train_rows, cfg.val_size, cfg.eval_limit) == (
        120,
        8,
        1000,
        100,
        300,
    )
    assert cfg.acc_runs == "best" and cfg.preset == "cpu" and cfg.workdir == "out/gsm8k-study-cpu"
    assert cfg.lrs_lora == [3e-4, 1e-3, 3e-3] and cfg.lrs_sorsa == [5e-5, 1e-4, 2e-4]
    assert (
        cfg.warmup_ratio == 0.03
        and study.parse_args(["--short", "--warmup-ratio", "0.25"])[0].warmup_ratio == 0.25
    )
    # another warm-up is reported in a section of its own, never over the default's table
    assert study.parse_args(["--short", "--warmup-ratio", "0.25"])[0].preset == "short_wu25"
    assert study.parse_args(["--warmup-ratio", "0.125"])[0].preset == "wu12p5"
    cfg, _ = study.parse_args(["--short", "--sorsa-scalings", "none,sv"])
    assert (cfg.steps, cfg.batch_size, cfg.train_rows) == (40, 4, 160) and cfg.sorsa_scalings == [
        "none",
        "sv",
    ]
    with pytest.raises(SystemExit):
        study.parse_args(["--cpu", "--smoke"])
    lines = [json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(10)]
    (tmp_path / "t.jsonl").write_text("".join(lines))
    cfg = study.StudyConfig(
        train=str(tmp_path / "t.jsonl"), workdir=str(tmp_path / "w"), train_rows=4, val_size=3
    )
    study.split_train(cfg)
    assert study.train_file(cfg).read_text() == "".join(lines[:4])
    assert study.val_file(cfg).read_text() == "".join(lines[-3:])
    cfg.train_rows = 8
    with pytest.raises(SystemExit, match="--train-rows must be between 1 and 7"):
        study.split_train(cfg)


def test_a_killed_peft_run_resumes_to_the_same_model(tmp_path, tiny_lm_decomposed, monkeypatch):
    """The CPU study's runs last hours: a PEFT run killed after its last saved state goes on from
    there and ends with the same merged weights and log as a run never stopped."""
    from safetensors.torch import load_file

    from sorsa_tools.model import read_decomposition

    src, decomp = tiny_lm_decomposed("gemma3")
    argv = ["--smoke", "--model", str(src), "--train", str(GSM8K_SLICE), "--workdir", str(tmp_path)]
    cfg, _ = study.parse_args(
        [*argv, "--rank", "4", "--steps", "4", "--batch-size", "2", "--max-length", "384", "--device", "cpu"]
    )
    study.split_train(cfg)
    targets = read_decomposition(decomp)["target_modules"]
    monkeypatch.setattr(study.PeftState, "SAVE_MINUTES", 0.0)  # a state after every step
    whole = study.train_peft(cfg, "pissa", 2e-3, tmp_path / "whole", targets)

    calls = {"n": 0}
    step = study.peft_step

    def killed_at_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return step(*a, **k)

    monkeypatch.setattr(study, "peft_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        study.train_peft(cfg, "pissa", 2e-3, tmp_path / "cut", targets)
    assert (tmp_path / "cut" / study.PeftState.FILE).is_file()
    monkeypatch.setattr(study, "peft_step", step)
    calls["n"] = 0
    resumed = study.train_peft(cfg, "pissa", 2e-3, tmp_path / "cut", targets)
    assert not (tmp_path / "cut" / study.PeftState.FILE).exists()  # a finished run keeps no state
    assert [r["loss"] for r in resumed["log"]] == [r["loss"] for r in whole["log"]]
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = (tmp_path / "cut" / T.LOG_FILE).read_text().splitlines()
    assert [json.loads(x)["step"] for x in logged] == [1, 2, 3, 4]


def test_the_paper_protocol_table_sets_the_papers_lrs_beside_the_best():
    """Issue 17: the paper compared LoRA and PiSSA at 2e-5 with SORSA at 3e-5; the report puts
    those runs beside each method's best, and says nothing until all three paper-lr runs exist."""
    res = {
        "sorsa-lr3e-05-g4e-04": {"lr": 3e-5, "nll": 0.95},
        "sorsa-lr1e-04-g4e-04": {"lr": 1e-4, "nll": 0.91},
        "lora-lr2e-05": {"lr": 2e-5, "nll": 1.21},
        "lora-lr3e-04": {"lr": 3e-4, "nll": 0.87},
        "pissa-lr1e-04": {"lr": 1e-4, "nll": 0.90},
    }
    best = {"sorsa": "sorsa-lr1e-04-g4e-04", "lora": "lora-lr3e-04", "pissa": "pissa-lr1e-04"}
    assert study.paper_protocol(res, best, 4e-4) == []  # PiSSA at 2e-5 not run yet
    res["pissa-lr2e-05"] = {"lr": 2e-5, "nll": 0.96}
    rows = [x for x in study.paper_protocol(res, best, 4e-4) if x.startswith("| ") and "---" not in x]
    assert rows[1:] == [
        "| SORSA | 3e-05 | 0.9500 | -0.2600 | sorsa-lr1e-04-g4e-04 | 0.9100 | +0.0400 |",
        "| PEFT LoRA | 2e-05 | 1.2100 | +0.0000 | lora-lr3e-04 | 0.8700 | +0.0000 |",
        "| PEFT PiSSA (pissa_niter_4) | 2e-05 | 0.9600 | -0.2500 | pissa-lr1e-04 | 0.9000 | +0.0300 |",
    ]


def test_peft_pissa_from_an_exact_svd_is_the_top_r_part_of_w(tiny_lm_decomposed):
    """The diagnosis's `pissa:init=pissa` variant: PEFT's exact-SVD PiSSA puts the top-r part of W in
    B A (what SORSA's U S Vt holds), where pissa_niter_4 only approximates it."""
    src, _ = tiny_lm_decomposed("gemma3")
    cfg = study.StudyConfig(model=str(src), rank=4)
    base = study.peft_model(cfg, "lora", torch.device("cpu"), init=False)[1]
    w0 = {n: m.base_layer.weight.detach().clone() for n, m in base.items()}
    _, layers, init = study.peft_model(cfg, "pissa", torch.device("cpu"), init="pissa")
    for n, (A, B) in init.items():
        U, S, Vh = torch.linalg.svd(w0[n].double(), full_matrices=False)
        top = (U[:, :4] * S[:4]) @ Vh[:4]
        assert torch.allclose((B @ A).double(), top, atol=1e-4), n
        assert torch.allclose(
            layers[n].base_layer.weight.double() + (B @ A).double(), w0[n].double(), atol=1e-4
        )


def test_pissa_random_subspace_has_pissas_sizes_not_its_subspace(tiny_lm_decomposed):
    """--pissa-init random_subspace: the model is unchanged at step 0 (W_res + B A = W), B and A
    carry sqrt of W's top-r singular values as PiSSA's factors do, on orthonormal directions that
    are not W's principal ones; the same seed rebuilds the same init (resume)."""
    src, _ = tiny_lm_decomposed("gemma3")
    cfg = study.StudyConfig(model=str(src), rank=4, pissa_init="random_subspace")
    base = study.peft_model(cfg, "lora", torch.device("cpu"), init=False)[1]
    w0 = {n: m.base_layer.weight.detach().clone() for n, m in base.items()}
    _, layers, init = study.peft_model(cfg, "pissa", torch.device("cpu"))
    _, _, again = study.peft_model(cfg, "pissa", torch.device("cpu"))
    for n, (A, B) in init.items():
        U, S, Vh = torch.linalg.svd(w0[n].double(), full_matrices=False)
        s = S[:4].sqrt()
        assert torch.allclose(torch.linalg.norm(B.double(), dim=0), s, rtol=1e-5), n  # column i: sqrt(s_i)
        assert torch.allclose(torch.linalg.norm(A.double(), dim=1), s, rtol=1e-5), n
        assert torch.allclose(
            layers[n].base_layer.weight.double() + (B @ A).double(), w0[n].double(), atol=1e-5
        )
        # random directions: far from the principal subspace (PiSSA's would give overlap 4)
        overlap = float((U[:, :4].T @ (B.double() / s)).pow(2).sum())
        assert overlap < 2.5, (n, overlap)
        assert torch.equal(A, again[n][0]) and torch.equal(B, again[n][1])
    cfg, _ = study.parse_args(["--short", "--pissa-init", "random_subspace"])
    assert cfg.preset == "short_random_subspace"
    assert (
        study.tag("pissa", 1e-4, variant=study.peft_variant(cfg, "pissa")) == "pissa-lr1e-04-random_subspace"
    )
    assert study.peft_variant(cfg, "lora") == "" and study.peft_variant(study.StudyConfig(), "pissa") == ""


def test_the_diagnosis_variants_and_the_settings_they_are_recorded_under():
    sys.path.insert(0, str(ROOT / "examples"))
    import sorsa_lr_diagnosis as D

    assert D.parse_variant("pissa:lr=1e-4,init=pissa") == ("pissa", {"lr": 1e-4, "init": "pissa"})
    assert D.parse_variant("sorsa:lr_scaling=pissa,gamma=0") == (
        "sorsa",
        {"lr_scaling": "pissa", "gamma": 0.0, "lr": 3e-4},
    )
    with pytest.raises(SystemExit, match="init is PEFT's"):
        D.parse_variant("sorsa:init=pissa")
    with pytest.raises(SystemExit, match="unknown key 'beta'"):
        D.parse_variant("lora:beta=2")
    assert "first 1000 GSM-8K train lines, batch 8" in D.probe_intro(1000, 8, 120, "")
    assert "= 4 steps" in D.probe_intro(1000, 8, 120, "")


def test_a_regularizer_variant_reaches_sorsa_train_and_names_its_runs(monkeypatch, tmp_path):
    """--reg-tol / --reg-update go to every SORSA run's TrainConfig, into the run names (never the
    default's kept results) and into a report section of their own."""
    cfg, _ = study.parse_args(["--cpu", "--reg-tol", "1e-4"])
    assert (cfg.reg_tol, cfg.reg_update, cfg.preset) == (1e-4, "eq10", "cpu_tol1e-04")
    assert study.parse_args(["--short", "--reg-update", "eq9"])[0].preset == "short_eq9"
    assert study.parse_args(["--cpu"])[0].preset == "cpu"
    with pytest.raises(SystemExit):
        study.parse_args(["--reg-update", "eq8"])
    v = study.reg_variant(1e-4, "eq9")
    assert study.tag("sorsa", 1e-4, 4e-4, "pissa", v) == "sorsa-pissa-lr1e-04-g4e-04-tol1e-04-eq9"
    assert study.tag("sorsa", 1e-4, 4e-4) == "sorsa-lr1e-04-g4e-04"  # the default's names unchanged
    row = {"lr": 1e-4, "lr_scaling": "none", "reg_variant": "-tol1e-04"}
    assert study.gamma0_tag({"k": row}, {"sorsa": "k"}) == "sorsa-lr1e-04-g0e+00-tol1e-04"
    assert study.reg_words(dataclasses.asdict(cfg)) == ", `--reg-tol 0.0001`"
    assert study.reg_words(dataclasses.asdict(study.StudyConfig())) == ""

    seen = {}

    def fake_train(*args, config, **kw):
        seen["config"] = config
        raise RuntimeError("stop here")

    monkeypatch.setattr(study.T, "train", fake_train)
    with pytest.raises(RuntimeError, match="stop here"):
        study.train_sorsa(cfg, tmp_path, 1e-4, 4e-4, tmp_path / "run")
    assert (seen["config"].reg_tol, seen["config"].reg_update) == (1e-4, "eq10")


_spec2 = importlib.util.spec_from_file_location("seed_spread", ROOT / "examples" / "seed_spread.py")
spread = importlib.util.module_from_spec(_spec2)
_spec2.loader.exec_module(spread)


def _kept(work, run: str, seed: int, nll: float, **settings) -> None:
    (work / "results").mkdir(parents=True, exist_ok=True)
    row = {"nll": nll, "val_nll": nll + 0.04, "settings": {"steps": 40, "seed": seed} | settings}
    (work / "results" / f"{run}.json").write_text(json.dumps(row))


def test_seed_spread_tables_golden_values_and_refusals(tmp_path, capsys):
    """Per-seed NLLs, mean and sd; gaps to the first run with the t interval (t_{0.975,2} = 4.303);
    workdirs that differ in more than the seed are refused in one line."""
    nll = {"lora": [0.86, 0.88, 0.87], "sorsa": [0.90, 0.91, 0.89]}
    works = []
    for s in range(3):
        works.append(tmp_path / f"w{s}")
        for r, xs in nll.items():
            _kept(works[-1], r, s, xs[s])
    doc = tmp_path / "RESULTS.md"
    assert spread.main([*map(str, works), "--runs", "lora,sorsa", "--record", "--doc", str(doc)]) == 0
    out = capsys.readouterr().out
    assert "| lora | 0.8600 | 0.8800 | 0.8700 | 0.8700 | 0.0100 | 0.9100 |" in out
    # gaps 0.04, 0.03, 0.02: mean 0.03, sd 0.01, half-width 4.303 * 0.01 / sqrt(3) = 0.0248
    assert "| sorsa | +0.0400 | +0.0300 | +0.0200 | +0.0300 | +0.0052 to +0.0548 |" in out
    assert "<!-- BEGIN seed_spread -->" in doc.read_text()
    _kept(works[2], "sorsa", 2, 0.89, batch_size=8)
    assert spread.main([*map(str, works), "--runs", "lora,sorsa"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "differ in batch_size, not only the seed" in err and "\n" not in err
    assert spread.main([str(works[0]), str(works[0]), "--runs", "lora"]) == 2
    assert "seed 0 twice for lora" in capsys.readouterr().err
    assert spread.main([str(works[0]), str(tmp_path / "none"), "--runs", "lora"]) == 2
    assert "no kept result: run it with gsm8k_study.py --workdir" in capsys.readouterr().err
