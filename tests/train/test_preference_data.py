"""The data of the preference and RL objectives: paired, unpaired (kto) and prompt (grpo) records
from files and from the built-in tasks, their tokens, truncation, counts, errors, the SFT view of
the eval split, and the preview.

Token ids are checked against the byte tokenizer and built-in template, under which a prompt's
ids followed by its completion's are exactly the ids of the whole rendered conversation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import processors

from lorakit.builtin import build_tokenizer
from lorakit.builtin.tasks import ANSWERS, task_of, wrong_answer
from lorakit.train.config import BUILTIN_DATA, DataSection, TrainConfig, TrainingSection
from lorakit.train.data import IGNORE_INDEX, DataError, DataReport, split_records
from lorakit.train.preference_data import (
    PairExample,
    PromptExample,
    UnpairedExample,
    build_objective_data,
)
from lorakit.train.preview import preview_data

END = "<|end|>\n"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    """The byte tokenizer adding BOS to plain text, so where special tokens go shows."""
    t = build_tokenizer()
    t._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return t


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def build(path: Path, tok, objective: str = "dpo", **cfg):
    return build_objective_data(DataSection(train=str(path), **cfg), tok, seed=0, objective=objective)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def text(tok, token_ids: list[int]) -> str:
    return tok.decode(token_ids, skip_special_tokens=False)


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def bot(content: str) -> dict:
    return {"role": "assistant", "content": content}


def failure(path: Path, tok, objective: str = "dpo", **cfg) -> str:
    with pytest.raises(DataError) as e:
        build(path, tok, objective, **cfg)
    return str(e.value)


# ------------------------------------------------------------------------------------- paired

def test_paired_strings_are_plain_text_with_eos(tmp_path, bos_tok):
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
    [pair] = build(path, bos_tok).train
    assert pair == PairExample([1] + ids(bos_tok, "2+2="), ids(bos_tok, "4") + [bos_tok.eos_token_id],
                               ids(bos_tok, "5") + [bos_tok.eos_token_id], f"{path}:1", "4")


def test_paired_messages_split_the_rendered_conversation_exactly(tmp_path, bos_tok):
    record = {"prompt": [{"role": "system", "content": "Be brief."}, user("Capital of France?")],
              "chosen": [bot("Paris – oui.")], "rejected": [bot("Lyon.")]}
    [pair] = build(jsonl(tmp_path / "p.jsonl", [record]), bos_tok).train
    head = "<|system|>\nBe brief.<|end|>\n<|user|>\nCapital of France?<|end|>\n<|assistant|>\n"
    assert pair.prompt_ids == ids(bos_tok, head)   # the template's text: no BOS added to it
    assert pair.prompt_ids + pair.chosen_ids == ids(bos_tok, head + "Paris – oui." + END)
    assert pair.prompt_ids + pair.rejected_ids == ids(bos_tok, head + "Lyon." + END)
    assert text(bos_tok, pair.chosen_ids) == "Paris – oui." + END
    assert pair.chosen_text == "Paris – oui."


def test_mixed_forms_become_messages(tmp_path, tok):
    path = jsonl(tmp_path / "p.jsonl", [
        {"prompt": [user("hi")], "chosen": [bot("yo")], "rejected": [bot("no")]},
        {"prompt": "hi", "chosen": [bot("yo")], "rejected": bot("no")},   # one message object as a completion
        {"prompt": [user("hi")], "chosen": "yo", "rejected": "no"},
        {"prompt": "hi", "chosen": "yo", "rejected": [bot("no")]},
    ])
    first, *rest = build(path, tok).train
    assert text(tok, first.prompt_ids) == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    for pair in rest:
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, pair.chosen_text) == (
            first.prompt_ids, first.chosen_ids, first.rejected_ids, "yo")


def test_implicit_prompt_is_the_shared_start_of_both_conversations(tmp_path, tok):
    shared = [user("a"), bot("b"), user("c")]
    path = jsonl(tmp_path / "p.jsonl", [{"chosen": shared + [bot("good")], "rejected": shared + [bot("bad")]}])
    [pair] = build(path, tok).train
    assert text(tok, pair.prompt_ids) == "<|user|>\na<|end|>\n<|assistant|>\nb<|end|>\n<|user|>\nc<|end|>\n<|assistant|>\n"
    assert (text(tok, pair.chosen_ids), text(tok, pair.rejected_ids), pair.chosen_text) == ("good" + END, "bad" + END,
                                                                                           "good")


def test_system_prompt_and_column_renames_apply(tmp_path, tok):
    path = jsonl(tmp_path / "p.jsonl", [{"question": [user("q")], "good": "y", "bad": "n"}])
    [pair] = build(path, tok, system_prompt="S.", columns={"question": "prompt", "good": "chosen",
                                                           "bad": "rejected"}).train
    assert text(tok, pair.prompt_ids) == "<|system|>\nS.<|end|>\n<|user|>\nq<|end|>\n<|assistant|>\n"


def test_multi_message_completion_is_rendered_whole(tmp_path, tok):
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": [bot("one"), bot("two")], "rejected": "x"}])
    [pair] = build(path, tok).train
    assert text(tok, pair.chosen_ids) == "one" + END + "<|assistant|>\ntwo" + END
    assert pair.chosen_text == "two"


# --------------------------------------------------------------------------------- unpaired (kto)

def test_kto_labels_from_json_and_csv(tmp_path, tok):
    path = jsonl(tmp_path / "u.jsonl", [{"prompt": "q", "completion": "a", "label": True},
                                        {"prompt": "q", "completion": "b", "label": False},
                                        {"prompt": "q", "completion": "c", "label": 1}])
    assert [e.label for e in build(path, tok, "kto").train] == [True, False, True]
    csv = tmp_path / "u.csv"
    csv.write_text("prompt,completion,label\nq,a,true\nq,b,False\nq,c,1\nq,d,0\n", encoding="utf-8")
    data = build(csv, tok, "kto")
    assert [(e.label, e.completion_text, e.source) for e in data.train] == [
        (True, "a", f"{csv}:2"), (False, "b", f"{csv}:3"), (True, "c", f"{csv}:4"), (False, "d", f"{csv}:5")]
    [first, *_] = data.train
    assert first == UnpairedExample(ids(tok, "q"), ids(tok, "a") + [tok.eos_token_id], True, f"{csv}:2", "a")
    assert data.report.lines()[1] == ("train: 4 examples (2 desirable, 2 undesirable), 12 tokens, 8 of them in "
                                      "the completions (66.7%)")


def test_kto_label_errors_name_the_record(tmp_path, tok):
    path = jsonl(tmp_path / "u.jsonl", [{"prompt": "q", "completion": "a", "label": "yes"}])
    assert failure(path, tok, "kto") == f"{path}:1: 'label' must be true or false (or \"true\"/\"false\"/1/0), got 'yes'"
    path = jsonl(tmp_path / "v.jsonl", [{"prompt": "q", "completion": "a"}])
    assert failure(path, tok, "kto") == (f"{path}:1: missing 'label' (true: the completion is desirable, false: it "
                                         f"is not); training.objective=kto reads prompt, completion, label (or the "
                                         f"paired keys prompt, chosen, rejected)")


def test_kto_reads_a_paired_record_as_two_examples(tmp_path, tok):
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": [user("q")], "chosen": "yes", "rejected": "no"}])
    data = build(path, tok, "kto")
    good, bad = data.train
    assert (good.label, good.completion_text, bad.label, bad.completion_text) == (True, "yes", False, "no")
    assert good.prompt_ids == bad.prompt_ids and good.prompt_ids is not bad.prompt_ids
    assert text(tok, bad.completion_ids) == "no" + END
    assert (data.report.formats, data.report.desirable, data.report.used_train) == ({"paired": 1}, 1, 2)


# ------------------------------------------------------------------------------------ prompts (grpo)

def test_grpo_prompts_keep_the_other_fields_for_the_rewards(tmp_path, tok):
    messages = [user("2+2?")]
    path = jsonl(tmp_path / "g.jsonl", [{"prompt": messages, "answer": "4", "level": 1},
                                        {"prompt": "Say hi:", "tags": ["x"]}])
    data = build(path, tok, "grpo")
    chat, plain = data.train
    assert chat == PromptExample(ids(tok, "<|user|>\n2+2?<|end|>\n<|assistant|>\n"), messages,
                                 {"answer": "4", "level": 1}, f"{path}:1")
    assert plain == PromptExample(ids(tok, "Say hi:"), "Say hi:", {"tags": ["x"]}, f"{path}:2")
    assert data.report.lines()[:2] == ["data: read 2 records (formats: prompts 2)", "train: 2 prompts, 17 tokens"]


def test_grpo_eval_sft_renders_the_answer_as_the_completion(tmp_path, tok):
    train = jsonl(tmp_path / "t.jsonl", [{"prompt": "q"}])
    evals = jsonl(tmp_path / "e.jsonl", [{"prompt": [user("2+2?")], "answer": "4"}, {"prompt": "3+3=", "answer": "6"},
                                         {"prompt": "no answer"}, {"prompt": "x", "answer": 7}])
    data = build(train, tok, "grpo", eval=str(evals))
    assert len(data.eval) == 4
    chat, plain = data.eval_sft   # only records with a string answer
    assert text(tok, chat.input_ids) == "<|user|>\n2+2?<|end|>\n<|assistant|>\n4" + END
    assert chat.prompt_ids == data.eval[0].prompt_ids and chat.reference == "4"
    assert chat.labels == [IGNORE_INDEX] * len(chat.prompt_ids) + ids(tok, "4" + END)
    assert plain.input_ids == ids(tok, "3+3=6") + [tok.eos_token_id] and plain.reference == "6"


# ------------------------------------------------------------------------ eval split, eval_sft

def test_eval_sft_of_pairs_and_of_desirable_completions(tmp_path, tok):
    train = jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    evals = jsonl(tmp_path / "e.jsonl", [{"prompt": [user("q")], "chosen": "yes", "rejected": "no"}])
    data = build(train, tok, eval=str(evals))
    [sft] = data.eval_sft
    [pair] = data.eval
    assert sft.input_ids == pair.prompt_ids + pair.chosen_ids
    assert sft.labels == [IGNORE_INDEX] * len(pair.prompt_ids) + pair.chosen_ids
    assert (sft.prompt_ids, sft.reference, sft.source) == (pair.prompt_ids, "yes", f"{evals}:1")
    kto = build(train, tok, "kto", eval=str(evals))
    assert [(e.reference, e.input_ids) for e in kto.eval_sft] == [("yes", sft.input_ids)]   # the desirable one


def test_eval_split_is_the_sft_split(tmp_path, tok):
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(20)])
    cfg = DataSection(train=str(path), eval_fraction=0.25, max_samples=10)
    train_records, eval_records = split_records(cfg, 3, DataReport())
    data = build_objective_data(cfg, tok, seed=3, objective="ipo")
    assert [e.source for e in data.eval] == [source for _, source in eval_records]
    assert [e.source for e in data.train] == [source for _, source in train_records]
    assert (len(data.train), len(data.eval), data.report.not_used) == (10, 5, 5)
    assert data.report.lines() == [
        "data: read 20 records (formats: paired 15; 5 left out by data.max_samples)",
        "train: 10 pairs, 92 tokens, 40 of them in the completions (43.5%)",
        "eval: 5 pairs (eval_fraction=0.25 of the training records, seed 3)"]


# ------------------------------------------------------------------------------------ truncation

def test_truncation_cuts_completions_and_drops_what_keeps_none(tmp_path, tok):
    path = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "abcd", "chosen": "x", "rejected": "z"},        # 4 + 2 (EOS): fits
        {"prompt": "abcd", "chosen": "wxyz", "rejected": "z"},     # chosen cut to 2
        {"prompt": "abcdef", "chosen": "x", "rejected": "y"},      # no room: dropped
        {"prompt": "abcde", "chosen": "x", "rejected": "yy"},      # chosen keeps 1, rejected 1: cut, kept
    ])
    data = build(path, tok, max_seq_len=6)
    assert [e.source.rsplit(":", 1)[1] for e in data.train] == ["1", "2", "4"]
    assert data.train[1].chosen_ids == ids(tok, "wx") and data.train[1].rejected_ids == ids(tok, "z") + [6]
    assert data.train[2].chosen_ids == ids(tok, "x") and data.train[2].rejected_ids == ids(tok, "y")
    r = data.report
    assert (r.truncated, r.dropped_no_target, r.dropped_by_truncation) == (3, 1, 1)
    assert (r.splits["train"].records, r.splits["train"].kept, r.splits["train"].dropped_by_truncation) == (4, 3, 1)
    assert r.lines()[3:] == ["truncated: 3 pairs with a completion cut to max_seq_len=6",
                             "dropped: 1 pairs with no completion token left after truncation to max_seq_len=6"]


def test_grpo_drops_prompts_with_no_room_to_sample(tmp_path, tok):
    path = jsonl(tmp_path / "g.jsonl", [{"prompt": "abc"}, {"prompt": "abcd"}, {"prompt": "abcdefgh"}])
    data = build(path, tok, "grpo", max_seq_len=4)
    assert [e.prompt for e in data.train] == ["abc"]
    assert (data.report.truncated, data.report.dropped_no_target) == (0, 2)
    assert data.report.lines()[-1] == ("dropped: 2 prompts of max_seq_len=4 tokens or more, leaving no room for a "
                                       "completion")


def test_all_dropped_is_an_error(tmp_path, tok):
    path = jsonl(tmp_path / "u.jsonl", [{"prompt": "abcdef", "completion": "x", "label": True}])
    assert failure(path, tok, "kto", max_seq_len=4) == (
        f"no training examples left from {path}: 1 records converted, all dropped: no completion token fits after "
        f"the prompt in data.max_seq_len=4; raise it or shorten the prompts")


# ---------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize(("record", "objective", "message"), [
    ({"messages": [user("a"), bot("b")]}, "dpo",
     "cannot read a training.objective=dpo record from its keys (messages); it reads prompt, chosen, rejected (or "
     "chosen and rejected as whole conversations, without prompt); records of SFT formats (e.g. messages) train "
     "with training.objective=sft. Rename columns with data.columns"),
    ({"prompt": "q", "completion": "a", "label": True}, "orpo",
     "cannot read a training.objective=orpo record from its keys (prompt, completion, label); it reads prompt, "
     "chosen, rejected (or chosen and rejected as whole conversations, without prompt). Rename columns with "
     "data.columns"),
    ({"question": "q"}, "grpo",
     "cannot read a training.objective=grpo record from its keys (question); it reads prompt and any other fields "
     "(e.g. answer). Rename columns with data.columns"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "dpo",
     "'chosen' must be a string or chat messages (a list of {role, content} objects, or one), got int"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "dpo",
     "'prompt' must be a string or chat messages (a list of {role, content} objects), got an empty list"),
    ({"chosen": "a", "rejected": "b"}, "simpo",
     "no 'prompt', and 'chosen' and 'rejected' are not both whole conversations (lists of messages) to take it "
     "from; give a 'prompt' field"),
    ({"chosen": [user("a"), bot("b")], "rejected": [user("x"), bot("y")]}, "dpo",
     "no 'prompt', and 'chosen' and 'rejected' do not start with the same message to take as the prompt; give a "
     "'prompt' field, or conversations that start alike"),
    ({"chosen": [user("a"), bot("b")], "rejected": [user("a")]}, "dpo",
     "'rejected' has no message after the 1 that 'chosen' and 'rejected' share as the prompt, so its completion "
     "is empty"),
    ({"prompt": [user("a"), bot("b")], "chosen": "c", "rejected": "d"}, "dpo",
     "the prompt's last message has role assistant; it must be the user (or tool) message the completions "
     "answer"),
    ({"prompt": "a", "chosen": [user("b")], "rejected": "d"}, "dpo",
     "'chosen' holds a user message; a completion is the assistant's answer, assistant messages only"),
    ({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "d"}, "dpo",
     "prompt: messages[0] needs 'role' and 'content' (keys: role)"),
])
def test_bad_records_name_the_file_and_line(tmp_path, tok, record, objective, message):
    path = jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "chosen": "a", "rejected": "b", "completion": "c",
                                           "label": True}, record])
    assert failure(path, tok, objective) == f"{path}:2: {message}"


def test_sft_formats_and_templates_that_cannot_be_split(tmp_path, tok):
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": [user("q")], "chosen": "a", "rejected": "b"}])
    assert failure(path, tok, format="chat") == (
        "data.format=chat names an SFT format, but training.objective=dpo reads records with prompt, chosen, rejected "
        "(or chosen and rejected as whole conversations, without prompt); set data.format=auto")
    odd = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
           "{% if add_generation_prompt %}reply:{% endif %}")   # the generation prompt is not how a turn starts
    assert failure(path, tok, chat_template=odd) == (
        f"{path}:1: the chat template does not render the prompt (with the generation prompt) as a prefix of the "
        f"prompt and its 'chosen' completion, so the completion cannot be located; set data.chat_template to a "
        f"template whose generation prompt starts the assistant turn as it renders it")
    with pytest.raises(DataError, match="reads SFT data"):
        build(path, tok, "sft")


# ---------------------------------------------------------------------------------- built-in data

def test_wrong_answer_is_another_answer_of_the_task():
    assert wrong_answer("Is 4 even or odd?", "even", random.Random(0)) == "odd"
    counts = {wrong_answer("How many words: a b?", "2", random.Random(seed)) for seed in range(200)}
    assert counts == set(ANSWERS["count"]) - {"2"}
    with pytest.raises(ValueError, match="'maybe' is not an answer of the compare task"):
        wrong_answer("Is 3 larger than 4?", "maybe", random.Random(0))


@pytest.mark.parametrize("objective", ["dpo", "kto", "grpo"])
def test_builtin_data_derives_from_the_chat_tasks(tok, objective):
    cfg = DataSection(train=BUILTIN_DATA, max_samples=60)
    data = build_objective_data(cfg, tok, seed=0, objective=objective)
    again = build_objective_data(cfg, tok, seed=0, objective=objective)
    assert data.train == again.train and data.eval == again.eval   # deterministic
    assert (len(data.train), len(data.eval), data.report.eval_from) == (60, 200, "the built-in eval split")
    for sft in data.eval_sft:
        prompt = text(tok, sft.prompt_ids).removeprefix("<|user|>\n").removesuffix("<|end|>\n<|assistant|>\n")
        assert sft.reference in ANSWERS[task_of(prompt)]
    if objective == "dpo":
        for pair in data.train + data.eval:
            prompt = text(tok, pair.prompt_ids).removeprefix("<|user|>\n").removesuffix("<|end|>\n<|assistant|>\n")
            rejected = text(tok, pair.rejected_ids).removesuffix(END)
            assert rejected != pair.chosen_text and rejected in ANSWERS[task_of(prompt)]
            assert pair.chosen_text in ANSWERS[task_of(prompt)]
    elif objective == "kto":
        assert [e.label for e in data.eval[:4]] == [True, False, True, False]   # alternating along the file
        assert len(data.eval_sft) == 100
    else:
        assert all(set(e.extras) == {"answer"} for e in data.train)
        assert [e.reference for e in data.eval_sft] == [e.extras["answer"] for e in data.eval]


# ---------------------------------------------------------------------------------------- preview

def test_preview_shows_pairs_labels_and_prompts(tmp_path, tok):
    def preview(objective: str, path: Path) -> str:
        return preview_data(TrainConfig(data=DataSection(train=str(path)),
                                        training=TrainingSection(objective=objective)), tok, n=1)

    pairs = jsonl(tmp_path / "p.jsonl", [{"prompt": [user("q")], "chosen": "yes", "rejected": "no"}] * 2)
    assert preview("dpo", pairs).splitlines() == [
        "[[...]] marks the completion tokens (the loss is taken on them); the prompt is context only.", "",
        f"--- pair 1 of 2: {pairs}:1 (7 prompt tokens; chosen 5, rejected 4 completion tokens)",
        "prompt:", "<|user|>", "q<|end|>", "<|assistant|>", "",
        "chosen:", "[[yes<|end|>", "]]",
        "rejected:", "[[no<|end|>", "]]", "",
        "data: read 2 records (formats: paired 2)",
        "train: 2 pairs, 46 tokens, 18 of them in the completions (39.1%)",
        "eval: 0 pairs (none)"]
    assert "--- example 2 of 4" not in preview("kto", pairs)
    assert (f"--- example 1 of 4: {pairs}:1 (label true: desirable; 7 prompt tokens, 5 completion tokens)\nprompt:\n"
            "<|user|>\nq<|end|>\n<|assistant|>\n\ncompletion:\n[[yes<|end|>\n]]\n") in preview("kto", pairs)
    prompts = jsonl(tmp_path / "g.jsonl", [{"prompt": "2+2=", "answer": "4", "steps": ["add"]}])
    assert preview("grpo", prompts).splitlines()[2:7] == [
        f"--- prompt 1 of 1: {prompts}:1 (4 tokens)", "2+2=", 'answer: "4"', 'steps: ["add"]', ""]
