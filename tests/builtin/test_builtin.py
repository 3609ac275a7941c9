"""The built-in offline defaults: the tiny model directory and the tiny-tasks dataset.

The model is built (and briefly pretrained, ~20 s on two CPU cores) once into the lorakit cache
and reused by every later test and run; everything else here takes milliseconds.
"""

from __future__ import annotations

import json
import random
import re
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lorakit.builtin import tasks
from lorakit.builtin.model import CHAT_TEMPLATE, SPECIAL_TOKENS, builtin_model_dir
from lorakit.builtin.tasks import builtin_data_files, generate_examples, task_of


@pytest.fixture(scope="session")
def model_dir():
    return builtin_model_dir()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --- the model directory ---------------------------------------------------------------------

def test_model_dir_loads_through_from_pretrained(model_dir, tokenizer, model):
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (4, 128)
    assert cfg.vocab_size == len(tokenizer) == len(SPECIAL_TOKENS) + 256
    assert cfg.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|end|>")
    assert cfg.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<pad>")
    ids = tokenizer("The cat sleeps.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()


def test_model_dir_is_cached(model_dir):
    start = time.perf_counter()
    assert builtin_model_dir() == model_dir
    assert time.perf_counter() - start < 1.0


def test_base_was_pretrained(model_dir):
    record = json.loads((model_dir / "pretraining.json").read_text())
    assert len(record["losses"]) == record["recipe"]["steps"]
    assert record["loss_first"] > 5.0 and record["loss_last"] < 1.6   # from uniform (ln 263 = 5.6) to text


def test_base_does_not_know_the_tasks(tokenizer, model):
    """The point of the demo: before fine-tuning, the base answers (almost) nothing right."""
    held_out = read_jsonl(builtin_data_files()["eval"])[:64]
    prompts = [tokenizer.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False)
               for r in held_out]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    hits = sum(a.strip() == r["messages"][1]["content"] for a, r in zip(answers, held_out, strict=True))
    assert hits <= 3, answers


# --- the tokenizer ---------------------------------------------------------------------------

def random_text(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x9FFF),
              (0x1F300, 0x1F64F), (0x10000, 0x10FFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


def test_tokenizer_round_trips_any_utf8_one_token_per_byte(tokenizer):
    rng = random.Random(0)
    texts = ["", " ", "  leading and trailing  ", "tab\tnew\nline\r\n", "naïve café, Straße, 東京, 🙂👍🏽",
             "\x00\x7f", "a" * 300] + [random_text(rng, rng.randint(1, 80)) for _ in range(50)]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text.encode("utf-8")), text
        assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_tokens(tokenizer):
    for tok in SPECIAL_TOKENS:
        assert len(tokenizer(tok, add_special_tokens=False)["input_ids"]) == 1, tok
    assert tokenizer.decode(tokenizer("a<|end|>b", add_special_tokens=False)["input_ids"],
                            skip_special_tokens=True) == "ab"


# --- the chat template -----------------------------------------------------------------------

def test_chat_template_renders_as_documented(tokenizer):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is 7 even or odd?"},
                {"role": "assistant", "content": "odd"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nIs 7 even or odd?<|end|>\n<|assistant|>\nodd<|end|>\n")
    assert tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nIs 7 even or odd?<|end|>\n<|assistant|>\n")
    ids = tokenizer.apply_chat_template(messages[1:], tokenize=True, return_dict=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|user|>")
    assert ids[-2:] == [tokenizer.eos_token_id, tokenizer("\n", add_special_tokens=False)["input_ids"][0]]


# --- the dataset -----------------------------------------------------------------------------

def test_data_files_exist_parse_and_split(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    files = builtin_data_files()
    assert set(files) == {"train", "eval"} and all(p.is_file() and p.suffix == ".jsonl" for p in files.values())
    train, held_out = read_jsonl(files["train"]), read_jsonl(files["eval"])
    n_tasks = len(tasks.TASKS)
    assert len(train) == n_tasks * tasks.TRAIN_PER_TASK and len(held_out) == n_tasks * tasks.EVAL_PER_TASK
    for row in train + held_out:
        assert list(row) == ["messages"]
        (user, assistant) = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"] and assistant["content"] and len(assistant["content"]) <= 8
    train_prompts = {r["messages"][0]["content"] for r in train}
    eval_prompts = [r["messages"][0]["content"] for r in held_out]
    assert len(train_prompts) == len(train) and len(set(eval_prompts)) == len(eval_prompts)
    assert train_prompts.isdisjoint(eval_prompts)
    per_task = {name: 0 for name in tasks.TASKS}
    for prompt in eval_prompts:
        per_task[task_of(prompt)] += 1
    assert per_task == {name: tasks.EVAL_PER_TASK for name in tasks.TASKS}
    assert builtin_data_files() == files                                   # cached


def expected_answer(prompt: str) -> str:
    """Each task's rule, written independently of the generators."""
    if prompt.startswith("Review: "):
        adjectives = re.findall(r" was (\w+)", prompt)
        assert len(adjectives) == 2
        positive = [a in tasks.POSITIVE for a in adjectives]
        assert all(a in tasks.POSITIVE + tasks.NEGATIVE for a in adjectives) and len(set(positive)) == 1
        return "positive" if positive[0] else "negative"
    if m := re.fullmatch(r"Is (\d+) larger than (\d+)\?", prompt):
        return "yes" if int(m[1]) > int(m[2]) else "no"
    if m := re.fullmatch(r"Is (\d+) even or odd\?", prompt):
        return "odd" if int(m[1]) % 2 else "even"
    if m := re.fullmatch(r"How many words: ([a-z ]+)\?", prompt):
        return str(len(m[1].split()))
    raise AssertionError(f"unknown prompt {prompt!r}")


def test_answers_follow_the_rules():
    train, held_out = generate_examples()
    for row in train + held_out:
        prompt, answer = (m["content"] for m in row["messages"])
        assert answer == expected_answer(prompt), prompt


def test_answers_are_balanced():
    train, _ = generate_examples()
    answers = [r["messages"][1]["content"] for r in train]
    for label in ("positive", "negative", "yes", "no", "even", "odd"):
        assert 400 < answers.count(label) < 600, label


def test_generation_is_deterministic(tmp_path, monkeypatch):
    assert generate_examples() == generate_examples()
    assert generate_examples(seed=1) != generate_examples()
    contents = []
    for name in ("a", "b"):
        monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / name))
        files = builtin_data_files()
        contents.append({split: path.read_bytes() for split, path in files.items()})
    assert contents[0] == contents[1]
    train, held_out = generate_examples()
    assert read_jsonl(files["train"]) == train and read_jsonl(files["eval"]) == held_out


def test_task_of_rejects_foreign_prompts():
    with pytest.raises(ValueError, match="tiny-tasks"):
        task_of("Tell me a story.")
