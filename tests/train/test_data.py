"""The data pipeline: formats, masking, loading, errors, counts, splits, collation and packing.

Masks are checked by decoding the trained tokens and comparing with the exact text the built-in
template gives an assistant turn (content + "<|end|>\n"); packing is checked against the model:
a packed batch must give the same per-token losses as the same samples unpacked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from lorakit.builtin import build_tokenizer
from lorakit.builtin.model import CHAT_TEMPLATE
from lorakit.errors import LoraError
from lorakit.train.config import BUILTIN_DATA, DataSection, TrainConfig
from lorakit.train.data import (
    IGNORE_INDEX,
    DataError,
    DataReport,
    Example,
    PackedRow,
    SplitCount,
    build_datasets,
    collate,
    detect_format,
    load_records,
    pack,
    to_examples,
)
from lorakit.train.preview import preview_data, render_example

DATA = Path(__file__).parent / "data"
END = "<|end|>\n"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def bare_tok():
    """The same tokenizer without a chat template."""
    t = build_tokenizer()
    t.chat_template = None
    return t


def trained_runs(example: Example, tok) -> list[str]:
    """Each contiguous run of trained tokens, decoded."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token   # labels are unshifted copies of the inputs
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def example(record: dict, tok, fmt: str = "auto", **cfg) -> Example:
    [one] = to_examples(record, "x.jsonl:1", fmt, tok, DataSection(train="x.jsonl", **cfg))
    return one


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


# ------------------------------------------------------------------------- formats and masking

def test_alpaca_trains_the_output_and_its_end_token(tok):
    ex = example({"instruction": "Add.", "input": "2 2", "output": "4"}, tok)
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == (
        "<|user|>\nAdd.\n\n2 2<|end|>\n<|assistant|>\n4<|end|>\n")
    assert trained_runs(ex, tok) == ["4" + END]
    assert tok.decode(ex.prompt_ids, skip_special_tokens=False) == "<|user|>\nAdd.\n\n2 2<|end|>\n<|assistant|>\n"
    assert ex.reference == "4"
    assert ex.source == "x.jsonl:1"


def test_alpaca_without_input_is_the_instruction_alone(tok):
    for record in ({"instruction": "Hi.", "output": "hey"}, {"instruction": "Hi.", "input": "", "output": "hey"}):
        ex = example(record, tok)
        assert tok.decode(ex.input_ids, skip_special_tokens=False) == "<|user|>\nHi.<|end|>\n<|assistant|>\nhey" + END


def test_multi_turn_chat_trains_every_assistant_turn(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"},
                {"role": "assistant", "content": "Madrid – sí."}]   # multi-byte characters on purpose
    ex = example({"messages": messages}, tok)
    assert trained_runs(ex, tok) == ["Paris." + END, "Madrid – sí." + END]
    assert ex.reference == "Madrid – sí."
    assert tok.decode(ex.prompt_ids, skip_special_tokens=False).endswith("And of Spain?<|end|>\n<|assistant|>\n")
    assert ex.input_ids[:len(ex.prompt_ids)] == ex.prompt_ids


def test_chat_ending_with_a_user_turn_has_no_prompt_or_reference(tok):
    ex = example({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                               {"role": "user", "content": "c"}]}, tok)
    assert trained_runs(ex, tok) == ["b" + END]
    assert ex.prompt_ids is None and ex.reference is None


def test_sharegpt_maps_roles(tok):
    ex = example({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "2+3?"},
                                    {"from": "gpt", "value": "5"}, {"from": "user", "value": "x"},
                                    {"from": "model", "value": "y"}]}, tok)
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == (
        "<|system|>\nS<|end|>\n<|user|>\n2+3?<|end|>\n<|assistant|>\n5<|end|>\n<|user|>\nx<|end|>\n"
        "<|assistant|>\ny<|end|>\n")
    assert trained_runs(ex, tok) == ["5" + END, "y" + END]


def test_prompt_completion_is_plain_text_trained_on_completion_and_eos(tok):
    ex = example({"prompt": "Q: sky?\nA:", "completion": " blue"}, tok)
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == "Q: sky?\nA: blue<|end|>"
    assert trained_runs(ex, tok) == [" blue<|end|>"]
    assert ex.prompt_ids == tok("Q: sky?\nA:")["input_ids"]
    assert ex.reference == " blue"


def test_text_trains_every_token_and_appends_eos(tok):
    ex = example({"text": "all of it"}, tok)
    assert ex.input_ids == tok("all of it")["input_ids"] + [tok.eos_token_id]
    assert ex.labels == ex.input_ids
    assert ex.prompt_ids is None and ex.reference is None


def test_train_on_inputs_trains_every_token(tok):
    for record in ({"instruction": "Add.", "output": "4"}, {"prompt": "Q", "completion": " A"},
                   {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}):
        ex = example(record, tok, train_on_inputs=True)
        assert ex.labels == ex.input_ids


def test_system_prompt_is_added_only_where_there_is_none(tok):
    ex = example({"instruction": "Hi.", "output": "hey"}, tok, system_prompt="Be kind.")
    assert tok.decode(ex.input_ids, skip_special_tokens=False).startswith("<|system|>\nBe kind.<|end|>\n<|user|>")
    assert trained_runs(ex, tok) == ["hey" + END]
    ex = example({"messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "u"},
                               {"role": "assistant", "content": "a"}]}, tok, system_prompt="Be kind.")
    assert "Be kind." not in tok.decode(ex.input_ids, skip_special_tokens=False)


def test_configured_chat_template_serves_a_tokenizer_without_one(tok, bare_tok):
    record = {"instruction": "Hi.", "output": "hey"}
    ex = example(record, bare_tok, chat_template=CHAT_TEMPLATE)
    assert ex.input_ids == example(record, tok).input_ids
    assert trained_runs(ex, bare_tok) == ["hey" + END]


def test_forced_format_and_auto_detection(tok):
    assert detect_format({"messages": []}, "s") == "chat"
    assert detect_format({"conversations": []}, "s") == "sharegpt"
    assert detect_format({"instruction": "", "output": ""}, "s") == "alpaca"
    assert detect_format({"prompt": "", "completion": ""}, "s") == "prompt_completion"
    assert detect_format({"text": "", "id": 3}, "s") == "text"
    # a record with both prompt and text: data.format decides
    record = {"prompt": "P", "completion": " C", "text": "T"}
    assert example(record, tok).reference == " C"
    assert example(record, tok, format="text").labels == tok("T")["input_ids"] + [tok.eos_token_id]


# ---------------------------------------------------------------------------------------- loading

def test_jsonl_mixed_formats_with_blank_lines(tok):
    records = load_records(str(DATA / "mixed.jsonl"), {})
    sources = [s for _, s in records]
    assert sources == [f"{DATA / 'mixed.jsonl'}:{n}" for n in (1, 2, 4, 5, 6, 7)]   # line 3 is blank
    assert [detect_format(r, s) for r, s in records] == [
        "alpaca", "alpaca", "chat", "sharegpt", "prompt_completion", "text"]


def test_csv_with_column_renames(tok):
    path = DATA / "qa.csv"
    records = load_records(str(path), {"question": "instruction", "context": "input", "answer": "output"})
    assert [s for _, s in records] == [f"{path}:2", f"{path}:4", f"{path}:5"]   # line_num: where a row ends
    assert records[1][0] == {"instruction": "Multi-line\nquestion?", "input": "some context", "output": "yes"}
    cfg = DataSection(train=str(path), columns={"question": "instruction", "context": "input", "answer": "output"})
    train, _, report = build_datasets(cfg, tok, seed=0)
    assert [trained_runs(e, tok) for e in train] == [["2" + END], ["yes" + END], ["apple" + END]]
    assert report.formats == {"alpaca": 3}


def test_json_list_and_data_key(tmp_path, tok):
    listed = write(tmp_path / "l.json", json.dumps([{"text": "a"}, {"text": "b"}]))
    assert load_records(str(listed), {}) == [({"text": "a"}, f"{listed}:record 0"), ({"text": "b"}, f"{listed}:record 1")]
    wrapped = DATA / "records.json"
    assert [s for _, s in load_records(str(wrapped), {})] == [f"{wrapped}:record 0", f"{wrapped}:record 1"]


def test_a_list_of_specs_concatenates(tok):
    records = load_records([str(DATA / "records.json"), str(DATA / "mixed.jsonl")], {})
    assert len(records) == 2 + 6


def test_builtin_data_uses_its_eval_file(tmp_path, tok, monkeypatch):
    files = {"train": jsonl(tmp_path / "train.jsonl", [{"prompt": f"p{i}", "completion": " c"} for i in range(5)]),
             "eval": jsonl(tmp_path / "eval.jsonl", [{"prompt": "e", "completion": " c"}])}
    monkeypatch.setattr("lorakit.train.data.builtin_data_files", lambda: files)
    train, evals, report = build_datasets(DataSection(train=BUILTIN_DATA, eval_fraction=0.5), tok, seed=0)
    assert (len(train), len(evals)) == (5, 1)
    assert evals[0].source == f"{files['eval']}:1"
    assert report.eval_from == "the built-in eval split"


def test_saved_datasets_directory(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "ds"))
    records = load_records(str(tmp_path / "ds"), {})
    assert records == [({"text": "a"}, f"{tmp_path / 'ds'}:record 0"), ({"text": "b"}, f"{tmp_path / 'ds'}:record 1")]


def test_hub_dataset_spec_reads_a_dataset_repository(tmp_path, monkeypatch):
    """`hf:NAME[:SPLIT]` goes through `datasets.load_dataset`, here on a local dataset repository
    (the same call a hub id makes, without the download)."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    repo = tmp_path / "repo"
    repo.mkdir()
    jsonl(repo / "train.jsonl", [{"prompt": "p1", "completion": " c1"}, {"prompt": "p2", "completion": " c2"}])
    jsonl(repo / "test.jsonl", [{"prompt": "q", "completion": " a"}])
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    assert load_records(f"hf:{repo}", {}) == [({"prompt": "p1", "completion": " c1"}, f"hf:{repo}:record 0"),
                                              ({"prompt": "p2", "completion": " c2"}, f"hf:{repo}:record 1")]
    assert load_records(f"hf:{repo}:test", {"prompt": "question"}, split="eval") == [
        ({"question": "q", "completion": " a"}, f"hf:{repo}:test:record 0")]


def test_datasets_package_missing_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)   # makes `import datasets` fail
    for spec in ("hf:someone/data", str(tmp_path)):
        with pytest.raises(DataError) as e:
            load_records(spec, {})
        assert str(e.value) == "reading a Hugging Face dataset needs the `datasets` package: pip install datasets"


def test_hub_eval_data_needs_a_named_split(tok):
    with pytest.raises(DataError, match="^hf:someone/data: name the split to evaluate on, e.g. hf:someone/data:test$"):
        load_records("hf:someone/data", {}, split="eval")


# ----------------------------------------------------------------------------------------- errors

def raises(exc: type, fn, *args) -> str:
    with pytest.raises(exc) as e:
        fn(*args)
    return str(e.value)


def test_file_errors_name_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"text": "a"}\n\n{"text": "b",}\n')
    assert raises(DataError, load_records, str(bad), {}) == (
        f"{bad}:3: not valid JSON (Expecting property name enclosed in double quotes at column 14)")
    bad_json = write(tmp_path / "bad.json", '[\n  {"text": "a"},\n  {"text" "b"}\n]')
    assert raises(DataError, load_records, str(bad_json), {}) == (
        f"{bad_json}:3: not valid JSON (Expecting ':' delimiter at column 11)")
    not_object = write(tmp_path / "list.jsonl", '{"text": "a"}\n["text"]\n')
    assert raises(DataError, load_records, str(not_object), {}) == f"{not_object}:2: expected a JSON object, got list"
    scalar = write(tmp_path / "s.json", '"text"')
    assert raises(DataError, load_records, str(scalar), {}).startswith(
        f"{scalar}: expected a JSON list of records or {{\"data\": [...]}}, got str")
    wide = write(tmp_path / "w.csv", "text\na\nb,c\n")
    assert raises(DataError, load_records, str(wide), {}) == f"{wide}:3: 2 fields but the header has 1"
    missing = tmp_path / "nope.jsonl"
    assert raises(FileNotFoundError, load_records, str(missing), {}).startswith(f"{missing}: data file not found")
    parquet = write(tmp_path / "d.parquet", "")
    assert raises(DataError, load_records, str(parquet), {}).startswith(
        f"{parquet}: unsupported data file type '.parquet'")
    assert issubclass(DataError, LoraError)


def test_record_errors_name_source_and_problem(tok):
    def err(record: dict, fmt: str = "auto", **cfg) -> str:
        with pytest.raises(DataError) as e:
            example(record, tok, fmt, **cfg)
        return str(e.value)

    assert err({"instruction": "i", "input": "x"}) == (
        "x.jsonl:1: missing 'output' for format alpaca (record keys: instruction, input)")
    assert err({"prompt": "p"}) == "x.jsonl:1: missing 'completion' for format prompt_completion (record keys: prompt)"
    assert err({"instruction": "i", "output": 4}) == "x.jsonl:1: 'output' must be a string for format alpaca, got int"
    assert err({"messages": "hi"}) == (
        "x.jsonl:1: 'messages' must be a non-empty list of {role, content} objects, got 'hi'")
    assert err({"messages": [{"role": "user", "content": 3}]}) == (
        "x.jsonl:1: messages[0]: 'content' must be a string or a list of text parts, got int")
    assert err({"messages": [{"role": "bot", "content": "a"}]}) == (
        "x.jsonl:1: messages[0]: unknown role 'bot'; known roles: system, user, assistant, tool")
    assert err({"messages": [{"content": "a"}]}) == "x.jsonl:1: messages[0] needs 'role' and 'content' (keys: content)"
    assert err({"conversations": [{"from": "bot", "value": "a"}]}) == (
        "x.jsonl:1: conversations[0]: unknown 'from' value 'bot'; known: human, user, gpt, assistant, model, system")
    assert err({"question": "q", "answer": "a"}) == (
        "x.jsonl:1: cannot tell the data format from the record keys (question, answer); known formats: "
        "alpaca (instruction, input (optional), output); chat (messages); sharegpt (conversations); "
        "prompt_completion (prompt, completion); text (text). Rename columns with data.columns or set data.format")
    assert err({"text": "t"}, "chat") == "x.jsonl:1: missing 'messages' for format chat (record keys: text)"


def test_missing_chat_template_names_the_fix(bare_tok):
    with pytest.raises(DataError) as e:
        example({"instruction": "i", "output": "o"}, bare_tok)
    assert str(e.value) == ("x.jsonl:1: chat-like data needs a chat template and the tokenizer has none; set "
                            "data.chat_template to a Jinja template (or use the prompt_completion or text format)")
    assert example({"prompt": "p", "completion": "c"}, bare_tok).reference == "c"   # plain formats need none


def test_template_that_is_not_prefix_stable_is_refused(tok):
    # renders the last message without newlines: the assistant turn cannot be cut out of the whole
    unstable = ("{% for m in messages %}{% if loop.last %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    with pytest.raises(DataError, match=r"^x\.jsonl:1: the chat template is not prefix-stable: .*assistant turn 1 "
                                        r"cannot be located; set data.chat_template"):
        example({"instruction": "i", "output": "o"}, tok, chat_template=unstable)
    ex = example({"instruction": "i", "output": "o"}, tok, chat_template=unstable, train_on_inputs=True)
    assert ex.labels == ex.input_ids


def test_column_rename_onto_an_existing_column_is_an_error(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", [{"question": "q", "instruction": "i", "output": "o"}])
    assert raises(DataError, load_records, str(path), {"question": "instruction"}) == (
        f"{path}:1: data.columns renames 'question' to 'instruction', but the record already has 'instruction'; "
        f"drop one of them or rename 'instruction' too")


def test_empty_file_is_an_error(tmp_path, tok):
    empty = write(tmp_path / "e.jsonl", "\n")
    with pytest.raises(DataError, match=f"^no training records in {empty}: the data is empty$"):
        build_datasets(DataSection(train=str(empty)), tok, seed=0)


def test_empty_dataset_after_filtering_says_why(tmp_path, tok):
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": "x" * 40, "completion": " y"},
                                        {"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(DataError) as e:
        build_datasets(DataSection(train=str(path), max_seq_len=16), tok, seed=0)
    assert str(e.value) == (
        f"no training samples left from {path}: 2 records converted, all dropped with no trained token (1 lost "
        f"them to truncation at data.max_seq_len=16, the rest had none, e.g. a conversation without an assistant "
        f"turn); raise data.max_seq_len, check the data, or set data.train_on_inputs: true")


# ------------------------------------------------------------------- counts, truncation, splitting

def test_truncation_and_drops_are_counted(tmp_path, tok):
    path = jsonl(tmp_path / "d.jsonl", [
        {"prompt": "short", "completion": " ok"},                           # 9 tokens: kept whole
        {"prompt": "p", "completion": " a long completion here"},           # 25 tokens: cut, still trained
        {"prompt": "a prompt far longer than the limit", "completion": " z"},   # cut before the completion
        {"messages": [{"role": "user", "content": "u"}]},                   # nothing to train at all
    ])
    train, evals, report = build_datasets(DataSection(train=str(path), max_seq_len=12), tok, seed=0)
    assert [e.source for e in train] == [f"{path}:1", f"{path}:2"]
    assert all(len(e.input_ids) <= 12 for e in train)
    assert trained_runs(train[1], tok) == [" a long com"]
    assert (report.read, report.used_train, report.used_eval) == (4, 2, 0)
    assert (report.truncated, report.dropped_no_target, report.dropped_by_truncation) == (2, 2, 1)
    assert report.formats == {"prompt_completion": 3, "chat": 1}
    assert report.train_tokens == 9 + 12 and report.trained_tokens == 4 + 11
    lines = report.lines()
    assert "truncated: 2 samples cut to max_seq_len=12" in lines
    assert ("dropped: 2 samples with no trained token (1 lost theirs to truncation, 1 had none, "
            "e.g. no assistant turn)") in lines
    assert lines[1] == "train: 2 samples, 21 tokens, 15 trained (71.4%)"
    assert report.splits["train"] == SplitCount(records=4, kept=2, dropped_by_truncation=1)
    assert report.splits["train"].dropped_line("training", 12) == (
        "2 of 4 training records dropped with no trained token (1 lost theirs to truncation at "
        "data.max_seq_len=12, 1 had none)")
    assert report.splits["eval"].dropped_line("evaluation", 12) is None


def test_eval_fraction_split_is_seeded_and_disjoint(tmp_path, tok):
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": " c"} for i in range(20)])
    cfg = DataSection(train=str(path), eval_fraction=0.25)
    train, evals, report = build_datasets(cfg, tok, seed=3)
    assert (len(train), len(evals)) == (15, 5)
    assert {e.source for e in train}.isdisjoint(e.source for e in evals)
    again, evals_again, _ = build_datasets(cfg, tok, seed=3)
    assert [e.source for e in again] == [e.source for e in train]
    assert [e.source for e in evals_again] == [e.source for e in evals]
    _, other, _ = build_datasets(cfg, tok, seed=4)
    assert [e.source for e in other] != [e.source for e in evals]
    assert report.eval_from == "eval_fraction=0.25 of the training records, seed 3"

    capped, evals_capped, report = build_datasets(DataSection(train=str(path), eval_fraction=0.25, max_samples=4),
                                                  tok, seed=3)
    assert [e.source for e in evals_capped] == [e.source for e in evals]   # the cap does not move the split
    assert [e.source for e in capped] == [e.source for e in train[:4]]
    assert report.not_used == 11
    assert report.lines()[0] == "data: read 20 records (formats: prompt_completion 9; 11 left out by data.max_samples)"
    assert sum(report.formats.values()) + report.not_used == report.read   # the counts add up
    assert report.splits["eval"] == SplitCount(records=5, kept=5, dropped_by_truncation=0)

    tiny = jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="data.eval_fraction=0.5 of 1 records leaves no training data"):
        build_datasets(DataSection(train=str(tiny), eval_fraction=0.5), tok, seed=0)


def test_explicit_eval_file_and_file_order_kept(tmp_path, tok):
    path = jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}"} for i in range(5)])
    ev = jsonl(tmp_path / "e.jsonl", [{"text": "e"}])
    train, evals, report = build_datasets(DataSection(train=str(path), eval=str(ev), eval_fraction=0.5), tok, seed=0)
    assert [e.source for e in train] == [f"{path}:{i}" for i in range(1, 6)]   # no split, no cap: file order
    assert [e.source for e in evals] == [f"{ev}:1"]
    assert (report.read, report.eval_from) == (6, "data.eval")


# --------------------------------------------------------------------------- collation and packing

def test_collate_right_pads_with_mask(tok):
    a = Example([5, 6, 7], [IGNORE_INDEX, 6, 7], "a")
    b = Example([8, 9], [8, 9], "b")
    batch = collate([a, b], pad_id=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, 9, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())
    with pytest.raises(DataError, match="mix of packed and unpacked"):
        collate([a, PackedRow([1], [1], [0])], 0)


def test_pack_restarts_positions_and_ignores_each_first_label():
    examples = [Example(list(range(10 * k, 10 * k + n)), list(range(10 * k, 10 * k + n)), f"s{k}")
                for k, n in enumerate([5, 3, 4, 6, 2])]
    rows = pack(examples, max_seq_len=8)
    assert all(len(r.input_ids) <= 8 for r in rows)
    assert sorted(s for r in rows for s in r.sources) == [f"s{k}" for k in range(5)]
    assert sum(len(r.input_ids) for r in rows) == 5 + 3 + 4 + 6 + 2
    assert len(rows) == 3   # best fit: 5+3, 4+2, 6 (in order it would take 4 rows: 5+3, 4, 6+2 ... )
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert all(row.labels[i] == IGNORE_INDEX for i in starts)
        assert all(row.labels[i] == row.input_ids[i] for i in range(len(row.labels)) if i not in starts)
    batch = collate(rows, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    short = min(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    n = len(rows[short].input_ids)
    assert batch["position_ids"][short, n:].tolist() == list(range(8 - n))   # padding: a sample of its own
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    with pytest.raises(DataError, match="s9: 9 tokens, longer than max_seq_len=8"):
        pack([Example(list(range(9)), list(range(9)), "s9")], 8)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) next-token losses, 0 where not trained; in float64 so that sums of a few hundred
    of them compare at 1e-5 (an fp32 sum of ~300 only resolves ~3e-5)."""
    return F.cross_entropy(logits[:, :-1].double().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                           reduction="none")


def test_packed_batch_gives_the_unpacked_per_token_losses(tok):
    """No attention across samples and restarting positions: each sample's logits are the same
    packed or alone, so the loss over trained tokens is too."""
    model = tiny_model(layers=4, width=128, intermediate=344, vocab=len(tok), positions=256,
                       pad_token_id=tok.pad_token_id, attn_implementation="sdpa")
    train, _, _ = build_datasets(DataSection(train=str(DATA / "mixed.jsonl"), max_seq_len=64), tok, seed=0)
    rows = pack(train, max_seq_len=96)
    assert len(rows) >= 2 and any(len(r.sources) >= 2 for r in rows)

    with torch.no_grad():
        loose = collate(train, tok.pad_token_id)
        loose_logits = model(input_ids=loose["input_ids"], attention_mask=loose["attention_mask"],
                             use_cache=False).logits                                  # (N, T, V)
        packed = collate(rows, tok.pad_token_id)
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                              use_cache=False).logits                                 # (R, L, V)
        naive_logits = model(input_ids=packed["input_ids"], use_cache=False).logits   # positions 0..L-1, one causal mask
    loose_losses = token_losses(loose_logits, loose["labels"])
    packed_losses = token_losses(packed_logits, packed["labels"])
    trained = loose["labels"][:, 1:] != IGNORE_INDEX
    assert torch.allclose(loose_losses.sum(), packed_losses.sum(), atol=1e-5, rtol=0)
    assert (packed["labels"][:, 1:] != IGNORE_INDEX).sum() == trained.sum()

    by_source = {e.source: i for i, e in enumerate(train)}
    for r, row in enumerate(rows):
        offset = 0
        for source in row.sources:
            i, n = by_source[source], len(train[by_source[source]].input_ids)
            mask = train[i].labels   # trained positions of this sample (label t is predicted at t-1)
            at = [t - 1 for t in range(1, n) if mask[t] != IGNORE_INDEX]
            assert torch.allclose(loose_logits[i, at], packed_logits[r, [offset + t for t in at]], atol=1e-5, rtol=0)
            assert torch.allclose(loose_losses[i, at], packed_losses[r, [offset + t for t in at]], atol=1e-5, rtol=0)
            offset += n
    # the check has teeth: without restarting positions the samples would see each other
    assert not torch.allclose(token_losses(naive_logits, packed["labels"]).sum(), packed_losses.sum(), atol=1e-3)


# ------------------------------------------------------------------------------------------ preview

def test_preview_marks_the_trained_span_and_reports(tok):
    cfg = TrainConfig(data=DataSection(train=str(DATA / "mixed.jsonl"), packing=True, max_seq_len=128))
    text = preview_data(cfg, tok, n=3)
    assert "[[4<|end|>\n]]" in text
    assert "[[Paris.<|end|>\n]]<|user|>\nAnd of Spain?<|end|>\n<|assistant|>\n[[Madrid – sí.<|end|>\n]]" in text
    assert f"--- sample 1 of 6: {DATA / 'mixed.jsonl'}:1 (30 tokens, 3 trained)" in text
    assert "sample 4 of" not in text
    assert "data: read 6 records (formats: alpaca 2, chat 1, prompt_completion 1, sharegpt 1, text 1)" in text
    assert "packing: 6 samples into" in text
    assert render_example(Example([0, 1], [IGNORE_INDEX, 1], "s"), tok) == "<pad>[[<s>]]"


def test_report_lines_on_defaults():
    assert DataReport(read=2, used_train=2).lines() == [
        "data: read 2 records (formats: none)", "train: 2 samples, 0 tokens, 0 trained (0.0%)", "eval: 0 samples (none)"]


def test_sharegpt_turns_with_chat_keys_point_to_the_fix(tmp_path, tok):
    path = jsonl(tmp_path / "c.jsonl", [{"conversations": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "yo"}]}])
    with pytest.raises(DataError) as e:
        build_datasets(DataSection(train=str(path)), tok, seed=0)
    assert str(e.value) == (f"{path}:1: conversations[0] needs 'from' and 'value' (keys: role, content); these are "
                            "the chat format's keys: read the column as chat messages with "
                            "data.columns={conversations: messages}")
    train, _, _ = build_datasets(DataSection(train=str(path), columns={"conversations": "messages"}), tok, seed=0)
    assert trained_runs(train[0], tok) == ["yo<|end|>\n"]


def test_long_samples_are_counted_not_warned_about_by_transformers(tmp_path, tok):
    """The tokenizer's own "Token indices sequence length is longer than ..." warning says what the
    data report's truncation count already says; lorakit's tokenization does not trigger it (the
    tokenizer records in `deprecation_warnings` that it warned)."""
    long = "word " * (tok.model_max_length // 4)
    path = jsonl(tmp_path / "l.jsonl", [{"prompt": long, "completion": " end"},
                                        {"messages": [{"role": "user", "content": long},
                                                      {"role": "assistant", "content": "end"}]}])
    tok.deprecation_warnings.clear()
    _, _, report = build_datasets(DataSection(train=str(path), max_seq_len=64, train_on_inputs=True), tok, seed=0)
    assert report.truncated == 2
    assert "sequence-length-is-longer-than-the-specified-maximum" not in tok.deprecation_warnings
    tok(long)   # what the flag records when transformers does warn
    assert "sequence-length-is-longer-than-the-specified-maximum" in tok.deprecation_warnings
