"""--data beyond one JSONL file: Parquet, Arrow, CSV, saved datasets, the Hub cache offline, and
conversations rendered with a chat template, the loss on assistant turns only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import GSM8K_SLICE, make_tokenizer

from sorsa_tools import chat
from sorsa_tools.data import IGNORE, Dataset
from sorsa_tools.errors import DataError
from sorsa_tools.io.records import DataSpec, open_source

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
CONVERSATION = [
    {"role": "system", "content": "You are a careful math tutor."},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "3 + 4 = 7."},
    {"role": "user", "content": "And times 2?"},
    {"role": "assistant", "content": "7 x 2 = 14. The answer is 14."},
]


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """datasets' processed cache and the Hub file cache inside the test's directory."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _rows(n: int = 40) -> list[dict]:
    rows = [json.loads(x) for x in GSM8K_SLICE.read_text().splitlines()[:n]]
    return [{"query": r["question"], "response": r["answer"]} for r in rows]  # MetaMathQA's names


def _tokens(ds: Dataset) -> list[tuple[list[int], list[int]]]:
    return ds.read(list(range(len(ds))))


def test_parquet_csv_arrow_and_saved_dataset_give_the_jsonl_examples(tmp_path, tok):
    rows = _rows()
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "d.parquet")
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(table.slice(0, 25), folder / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(25), folder / "train-00001-of-00002.parquet")
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "d.csv")
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")

    want = _tokens(Dataset(jl, tok))
    assert len(want) == 40 and all(any(x != IGNORE for x in lab) for _, lab in want)
    for data in ("d.parquet", "shards", "d.csv", "saved"):
        ds = Dataset(tmp_path / data, tok)
        assert ds.fields.describe() == "query,response", data
        assert _tokens(ds) == want, data
        assert ds.describe()["rows"] == 40 and ds.describe()["path"] == str((tmp_path / data).resolve())
    sliced = Dataset(DataSpec(str(tmp_path / "d.parquet"), split="train[:10]"), tok)
    assert _tokens(sliced) == want[:10]
    assert Dataset(DataSpec(str(tmp_path / "d.parquet"), split="train[75%:]"), tok).n_records == 10


def test_a_hub_dataset_in_the_hub_cache_loads_offline(caches, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(hc.HF_HUB_CACHE) / "datasets--someone--metamath-mini"
    snap = repo / "snapshots" / sha / "data"
    snap.mkdir(parents=True)
    table = pa.Table.from_pylist(_rows())
    pq.write_table(table, snap / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 5), snap / "test-00000-of-00001.parquet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)

    ds = Dataset(DataSpec("someone/metamath-mini", split="train[:12]"), tok)
    assert len(ds) == 12 and ds.path is None
    d = ds.describe()
    assert (d["dataset"], d["split"], d["revision"], d["rows"]) == (
        "someone/metamath-mini",
        "train[:12]",
        sha,
        12,
    )
    assert Dataset(DataSpec("someone/metamath-mini", split="test"), tok).n_records == 5

    with pytest.raises(
        DataError, match=r"^--data someone/absent: the Hub cannot be reached \(offline\) and "
    ):
        open_source(DataSpec("someone/absent"))
    with pytest.raises(DataError, match=r"Unknown split \"validation\".*pass one of those to --split$"):
        open_source(DataSpec("someone/metamath-mini", split="validation"))
    with pytest.raises(DataError, match=r"'nope' not found.*pass one of those to --subset$"):
        open_source(DataSpec("someone/metamath-mini", subset="nope"))


def test_bad_table_inputs_are_one_line_errors(tmp_path, tok):
    pq.write_table(pa.Table.from_pylist(_rows(5)), tmp_path / "d.parquet")
    cases = [
        (DataSpec(str(tmp_path / "d.parquet"), split="test"), r"^--split test: .*local files form one split"),
        (DataSpec(str(tmp_path / "missing.parquet")), r"^data file not found: .*missing\.parquet"),
        (DataSpec(str(tmp_path / "d.parquet"), subset="x"), r"^--subset and --data-revision are for Hub"),
        (DataSpec(str(GSM8K_SLICE), split="train[:5]"), r"^--split: for Parquet, Arrow, CSV and Hub data"),
        (DataSpec(str(tmp_path / "gone.jsonl")), r"^data file not found"),
    ]
    for spec, msg in cases:
        with pytest.raises(DataError, match=msg):
            Dataset(spec, tok)
    with pytest.raises(DataError, match=r"^d\.parquet: no column 'question' \(columns: query, response\)"):
        Dataset(
            tmp_path / "d.parquet",
            tok,
            fields=__import__("sorsa_tools.data").data.parse_fields("question,answer"),
        )
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"^--data .*bad\.parquet: not readable as parquet"):
        Dataset(tmp_path / "bad.parquet", tok)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pq.write_table(pa.Table.from_pylist(_rows(2)), mixed / "a.parquet")
    (mixed / "b.csv").write_text("query,response\nq,r\n")
    with pytest.raises(DataError, match=r"mixes file kinds \(\.csv, \.parquet\)"):
        Dataset(mixed, tok)


# -- conversations --------------------------------------------------------------------------------
def _chat_tokenizer(tmp_path, kind: str):
    """The tiny BPE tokenizer with a real chat template and its markers as special tokens."""
    t = make_tokenizer(tmp_path / kind)
    specials = {
        "gemma3": ["<bos>", "<start_of_turn>", "<end_of_turn>"],
        "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    }[kind]
    t.add_special_tokens({"additional_special_tokens": specials})
    t.bos_token = specials[0]
    t.chat_template = (FIXTURES / f"{kind}.jinja").read_text()
    return t


@pytest.mark.parametrize("kind,end", [("gemma3", "<end_of_turn>\n"), ("llama3", "<|eot_id|>")])
def test_conversation_loss_covers_the_assistant_turns_exactly(tmp_path, kind, end):
    t = _chat_tokenizer(tmp_path, kind)
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    ds = Dataset(f, t, max_length=4096)
    assert ds.fields.chat and ds.template == "chat"
    ((ids, labels),) = ds.read([0])
    # the ids are the template's own rendering, tokenized once
    whole = t.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids == t(whole, add_special_tokens=False)["input_ids"]
    # the labelled tokens are, run by run, exactly each assistant turn and its end-of-turn marker
    runs, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(i)
    runs += [cur] if cur else []
    assert [t.decode(r) for r in runs] == ["3 + 4 = 7." + end, "7 x 2 = 14. The answer is 14." + end]
    # nothing of the system or user turns, nor the role headers, carries loss
    unlabelled = t.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE])
    for m in CONVERSATION:
        assert (m["content"] in unlabelled) == (m["role"] != "assistant")


def test_sharegpt_conversations_and_chatml(tmp_path):
    t = _chat_tokenizer(tmp_path, "gemma3")
    share = [
        {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
        for m in CONVERSATION
    ]
    a, b = tmp_path / "openai.jsonl", tmp_path / "sharegpt.jsonl"
    a.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    b.write_text(json.dumps({"conversations": share}) + "\n")
    assert Dataset(b, t, max_length=4096).read([0]) == Dataset(a, t, max_length=4096).read([0])

    plain = make_tokenizer(tmp_path / "plain")  # no chat template
    with pytest.raises(DataError, match=r"no chat template; pass --template chatml"):
        Dataset(a, plain)
    ds = Dataset(a, plain, template="chatml", max_length=4096)
    ((ids, labels),) = ds.read([0])
    text = plain.decode([i for i in labels if i != IGNORE])
    assert text == "3 + 4 = 7.<|im_end|>\n7 x 2 = 14. The answer is 14.<|im_end|>\n"
    with pytest.raises(DataError, match=r"^--template raw is for plain text; conversations need"):
        Dataset(a, plain, template="raw")


def test_bad_conversations_name_the_record(tmp_path):
    t = _chat_tokenizer(tmp_path, "gemma3")
    cases = [
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            r":1: the conversation in 'messages' has no assistant turn",
        ),
        ({"messages": [{"role": "robot", "content": "hi"}]}, r":1: turn 1 of 'messages' has role 'robot'"),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
            r"turn 1 .* must be a string",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            },
            r":1: the chat template refuses this conversation \(Conversation roles must alternate",
        ),
    ]
    for rec, msg in cases:
        f = tmp_path / "bad.jsonl"
        f.write_text(json.dumps(rec) + "\n")
        with pytest.raises(DataError, match=msg):
            Dataset(f, t)
    assert chat.is_conversation([{"role": "user"}]) and not chat.is_conversation("text")


def test_eval_reads_tables_through_the_same_loader(tmp_path, tiny_lm_decomposed):
    """eval gsm8k on a Parquet split scores what it scores on the JSONL; eval math reads tables too."""
    from sorsa_tools.evaluate import evaluate_gsm8k
    from sorsa_tools.evaluate.math_eval import read_math_records

    src, _ = tiny_lm_decomposed("llama")
    rows = [json.loads(x) for x in GSM8K_SLICE.read_text().splitlines()[:6]]
    jl = tmp_path / "g.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "g.parquet")
    kw = dict(metric="nll", device="cpu", batch_size=2)
    a = evaluate_gsm8k(src, jl, output=tmp_path / "a.jsonl", **kw)
    b = evaluate_gsm8k(src, DataSpec(str(tmp_path / "g.parquet")), output=tmp_path / "b.jsonl", **kw)
    assert a.n == b.n == 6 and b.nll == pytest.approx(a.nll, rel=1e-6)
    assert b.summary["data"]["kind"] == "parquet" and b.summary["data"]["rows"] == 6

    math_rows = [{"problem": "1+1?", "solution": "\\boxed{2}", "subject": "Algebra", "level": 1}] * 3
    pq.write_table(pa.Table.from_pylist(math_rows), tmp_path / "m.parquet")
    got = list(read_math_records(DataSpec(str(tmp_path / "m.parquet"), split="train[:2]")))
    assert [w for w, _ in got] == ["m.parquet row 1", "m.parquet row 2"] and got[0][1]["subject"] == "Algebra"


def test_hub_failures_are_one_line_with_the_way_out():
    """What the Hub says for a gated, missing or misnamed dataset (datasets' own messages) becomes
    one line that names the fix (these need the network, so they are checked on the messages)."""
    from sorsa_tools.io.records import _hub_error

    spec = DataSpec("org/name")
    cases = [
        (
            "Dataset 'org/name' is a gated dataset on the Hub. You must be authenticated to access it.",
            "accept its terms on the Hub and log in (hf auth login or HF_TOKEN)",
        ),
        (
            "Dataset 'org/name' doesn't exist on the Hub or cannot be accessed.",
            "check the id (owner/name) and --data-revision (no local file or folder org/name either)",
        ),
        ("Unknown split \"dev\". Should be one of ['train', 'test'].", "pass one of those to --split"),
        ("BuilderConfig 'x' not found. Available: ['main', 'socratic']", "pass one of those to --subset"),
    ]
    for message, how in cases:
        e = _hub_error(spec, ValueError(message + "\nmore detail"))
        assert str(e) == f"--data org/name: {message.splitlines()[0].rstrip('.')}; {how}"
