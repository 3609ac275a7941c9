"""The built-in dataset "lorakit/tiny-tasks": four small rule-based tasks in chat format, so the
default `lorakit train` shows a LoRA adapter learning something the base model cannot do.

    sentiment  "Review: the soup was bland and the waiter was rude. Positive or negative?" -> "negative"
    compare    "Is 37 larger than 52?"                                                -> "no"
    parity     "Is 4817 even or odd?"                                                 -> "odd"
    count      "How many words: river lemon quiet?"                                   -> "3"

Every answer follows from a rule over the prompt, so the held-out prompts (none of which appears in
the training split) are solvable by a model that learned the rule rather than the examples; the
answers are short, so exact match of greedy generations is a meaningful metric. The built-in base
model (pretrained on generic text, see `model.py`) scores 0% before fine-tuning.

The files are generated deterministically (a seeded `random.Random`, whose `randrange`, `choice`,
`sample` and `shuffle` are stable across Python versions) into the cache on first use, one JSON
object per line: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}. The preference
objectives' records are derived from these (`preference.py`), their wrong answers by `wrong_answer`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from ..files import atomic_dir
from .names import cache_root

DATA_VERSION = "v1"   # bump when the generation below changes: the cache key
SEED = 0
TRAIN_PER_TASK = 1000
EVAL_PER_TASK = 50

POSITIVE = ["great", "kind", "fresh", "lovely", "friendly", "tasty", "clean", "warm", "helpful",
            "superb", "cosy", "quick", "charming", "perfect", "pleasant", "delightful"]
NEGATIVE = ["awful", "rude", "cold", "dirty", "slow", "bland", "terrible", "noisy", "stale", "broken",
            "greasy", "cramped", "dull", "horrible", "smelly", "sloppy"]
SUBJECTS = ["the food", "the staff", "the room", "the service", "the coffee", "the view", "the music",
            "the bed", "the waiter", "the bread", "the soup", "the hotel", "the pool", "the breakfast",
            "the lobby", "the wine"]
WORDS = ("apple river stone cloud green table light sugar paper horse glass money night water bread music "
         "tiger lemon chair dream house plant smile storm train ocean pilot candy grape honey juice knife "
         "lunch magic olive piano queen radio salad sheep snake spoon tower truck uncle wheel baker cabin "
         "eagle giant hotel mouse nurse otter pearl robin tulip beach crown flame ghost heart north party "
         "quiet sunny garden window forest doctor farmer friend city road bridge market kitchen letter book "
         "song boat bird dog cat fish cake tea soup door car bike hill lake field island village castle king "
         "red blue old new happy sad bright dark warm soft fast slow tall short sweet busy empty full").split()


def sentiment(rng: random.Random) -> tuple[str, str]:
    positive = rng.random() < 0.5
    (s1, s2), (a1, a2) = rng.sample(SUBJECTS, 2), rng.sample(POSITIVE if positive else NEGATIVE, 2)
    return (f"Review: {s1} was {a1} and {s2} was {a2}. Positive or negative?",
            "positive" if positive else "negative")


def compare(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 100), 2)
    return f"Is {a} larger than {b}?", "yes" if a > b else "no"


def parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(10000)
    return f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd"


def count(rng: random.Random) -> tuple[str, str]:
    k = rng.randint(1, 9)
    return "How many words: " + " ".join(rng.choice(WORDS) for _ in range(k)) + "?", str(k)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "sentiment": sentiment, "compare": compare, "parity": parity, "count": count,
}
_PREFIXES = {"Review: ": "sentiment", "How many words: ": "count"}


def task_of(prompt: str) -> str:
    """The task a built-in prompt belongs to (for per-task metrics)."""
    for prefix, name in _PREFIXES.items():
        if prompt.startswith(prefix):
            return name
    if prompt.endswith(" even or odd?"):
        return "parity"
    if " larger than " in prompt:
        return "compare"
    raise ValueError(f"not a lorakit/tiny-tasks prompt: {prompt!r}")


ANSWERS: dict[str, tuple[str, ...]] = {
    "sentiment": ("positive", "negative"), "compare": ("yes", "no"), "parity": ("even", "odd"),
    "count": tuple(str(k) for k in range(1, 10)),
}
"""Every answer each task can give."""


def wrong_answer(prompt: str, answer: str, rng: random.Random) -> str:
    """An answer of the prompt's task other than `answer`: the other label, or for count another
    number 1-9 drawn with `rng`. What preference training is taught to rank below the right one, so
    it must be a plausible answer, not noise the model would reject anyway."""
    options = ANSWERS[task_of(prompt)]
    if answer not in options:
        raise ValueError(f"{answer!r} is not an answer of the {task_of(prompt)} task ({', '.join(options)})")
    return rng.choice([option for option in options if option != answer])


def chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def generate_examples(seed: int = SEED, train_per_task: int = TRAIN_PER_TASK,
                      eval_per_task: int = EVAL_PER_TASK) -> tuple[list[dict], list[dict]]:
    """(train, eval) chat examples: distinct prompts per task, split so no eval prompt is in train."""
    rng = random.Random(seed)
    train: list[tuple[str, str]] = []
    held_out: list[tuple[str, str]] = []
    need = train_per_task + eval_per_task
    for name, make in TASKS.items():
        seen: dict[str, str] = {}
        for _ in range(100 * need):
            if len(seen) == need:
                break
            prompt, answer = make(rng)
            seen.setdefault(prompt, answer)
        if len(seen) < need:   # a generator too small for the sizes asked: say so, never truncate
            raise ValueError(f"task {name!r} yields only {len(seen)} distinct prompts, {need} needed")
        items = list(seen.items())   # insertion order: deterministic
        rng.shuffle(items)
        held_out += items[:eval_per_task]
        train += items[eval_per_task:]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return [chat(p, a) for p, a in train], [chat(p, a) for p, a in held_out]


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def builtin_data_files() -> dict[str, Path]:
    """{"train": ..., "eval": ...} .jsonl paths of the built-in dataset, generated on first use
    (atomically: temp dir + rename, so concurrent first uses are safe)."""
    target = cache_root() / f"tiny-tasks-{DATA_VERSION}"
    files = {"train": target / "train.jsonl", "eval": target / "eval.jsonl"}
    if all(p.is_file() for p in files.values()):
        return files
    with atomic_dir(target, built_by_another=lambda: all(p.is_file() for p in files.values())) as tmp:
        train, held_out = generate_examples()
        write_jsonl(train, tmp / "train.jsonl")
        write_jsonl(held_out, tmp / "eval.jsonl")
    return files
