"""GRPO reward functions: the built-ins on crafted completions, the user's own loaded by file path and
by module, the keywords each is given, the weighted sum, and every error a user can meet (exact text)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch

from lorakit.errors import ConfigError, DataError, LoraError
from lorakit.train.rewards import ExactAnswer, Format, Rewards, RewardTerm, load_reward_functions

EOT = ("<|im_end|>", "</s>")


def score(rewards: Rewards, completions: list[str], **fields: list) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Score completions, one record per completion, with prompts and sources made up to fit; the
    per-function rewards as lists."""
    n = len(completions)
    total, per_function = rewards([f"prompt {i}" for i in range(n)], completions, fields,
                                  [f"data.jsonl:{i + 1}" for i in range(n)])
    assert total.dtype == torch.float32 and total.shape == (n,)
    assert list(per_function) == list(rewards.columns)
    assert all(v.dtype == torch.float32 and v.dim() == 1 for v in per_function.values())
    return total, {k: v.tolist() for k, v in per_function.items()}


def terms(*fns, weights: list[float] | None = None) -> tuple[RewardTerm, ...]:
    """Terms of plain functions, named after them (what load_reward_functions builds from specs)."""
    return tuple(RewardTerm.of(fn.__name__, fn, w) for fn, w in zip(fns, weights or [1.0] * len(fns), strict=True))


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


# ------------------------------------------------------------------------------------------- built-ins

@pytest.mark.parametrize(("completion", "answer", "expected"), [
    ("odd", "odd", 1.0),
    ("ODD", "odd", 1.0),                      # case-folded
    ("Straße", "STRASSE", 1.0),               # casefold, not lower
    ("  odd\n", "odd", 1.0),                  # surrounding whitespace
    ("odd<|im_end|>", "odd", 1.0),            # the end of turn left in the text
    ("odd <|im_end|>\n</s>", "odd", 1.0),     # several, with whitespace between
    ("odd", " odd</s>", 1.0),                 # the answer is normalised too
    ("odd.", "odd", 0.0),
    ("even", "odd", 0.0),
    ("odd<|im_end|>more", "odd", 0.0),        # text after the end of turn
    ("<|im_end|>odd", "odd", 0.0),            # only a trailing end of turn goes
    ("", "odd", 0.0),
])
def test_exact_answer(completion, answer, expected):
    assert ExactAnswer(EOT)([completion], [answer]) == [expected]


def test_exact_answer_keeps_end_of_turn_it_was_not_told_about():
    assert ExactAnswer()(["odd<|im_end|>"], ["odd"]) == [0.0]


@pytest.mark.parametrize(("completion", "expected"), [
    ("odd", 1.0),
    ("3", 1.0),
    ("  negative \n", 1.0),
    ("odd<|im_end|>", 1.0),
    ("odd</s>\n", 1.0),
    ("odd even", 0.0),                        # two words
    ("The answer is odd", 0.0),
    ("odd\nbecause 4817 ends in 7", 0.0),     # a second line
    ("odd<|im_end|>\nuser: thanks", 0.0),     # text after the end of turn
    ("", 0.0),
    ("<|im_end|>", 0.0),                      # nothing but the end of turn
])
def test_format(completion, expected):
    assert Format(EOT)([completion]) == [expected]


def test_format_with_more_words_still_wants_one_line():
    fmt = Format(EOT, max_words=3)
    assert fmt(["New York City", "New York City now", "New\nYork"]) == [1.0, 0.0, 0.0]


def test_builtins_through_rewards_get_end_of_turn():
    rewards = load_reward_functions(["exact_answer", "format"], None, ("answer",), end_of_turn=EOT)
    assert rewards.columns == ("reward/exact_answer", "reward/format")
    total, per_function = score(rewards, ["odd<|im_end|>", "Even", "it is odd"], answer=["odd", "odd", "odd"])
    assert total.tolist() == [2.0, 1.0, 0.0]
    assert per_function == {"reward/exact_answer": [1.0, 0.0, 0.0], "reward/format": [1.0, 1.0, 0.0]}


def test_default_is_exact_answer():
    rewards = load_reward_functions([], None, ("answer",))
    assert [(t.name, t.weight) for t in rewards.terms] == [("exact_answer", 1.0)]
    assert score(rewards, ["odd", "even"], answer=["odd", "odd"])[0].tolist() == [1.0, 0.0]


def test_exact_answer_needs_string_answers():
    rewards = load_reward_functions(["exact_answer"], None, ("answer",))
    with pytest.raises(DataError) as err:
        score(rewards, ["3", "3"], answer=["3", 3])
    assert str(err.value) == ("data.jsonl:2: reward exact_answer needs the record's `answer` as a string, got 3 "
                              "(int); write it as a string, e.g. \"3\"")


# ------------------------------------------------------------------------------------ the user's own

def test_function_from_a_file_relative_to_the_working_directory(tmp_path, monkeypatch):
    write(tmp_path / "scripts" / "my_rewards.py", """
        from dataclasses import dataclass   # a dataclass needs its module registered, as an import does

        @dataclass
        class Length:
            limit: int

        def short(prompts, completions, answer):
            return [float(len(c) <= Length(len(a)).limit) for c, a in zip(completions, answer)]

        def long(completions, **kwargs):
            return [float(len(c) > 3) for c in completions]
    """)
    monkeypatch.chdir(tmp_path)
    rewards = load_reward_functions(["scripts/my_rewards.py:short", "scripts/my_rewards.py:long"], None, ("answer",))
    assert [t.name for t in rewards.terms] == ["short", "long"]
    total, per_function = score(rewards, ["odd", "oddly"], answer=["odd", "odd"])
    assert total.tolist() == [1.0, 1.0]
    assert per_function == {"reward/short": [1.0, 0.0], "reward/long": [0.0, 1.0]}


def test_function_from_an_absolute_path(tmp_path):
    path = write(tmp_path / "r.py", """
        def one(completions):
            return [1.0] * len(completions)
    """)
    rewards = load_reward_functions([f"{path}:one"], None, ())
    assert score(rewards, ["a", "b"])[0].tolist() == [1.0, 1.0]


def test_function_from_a_module_on_sys_path(tmp_path, monkeypatch):
    write(tmp_path / "lorakit_test_reward_pkg" / "__init__.py", "")
    write(tmp_path / "lorakit_test_reward_pkg" / "scoring.py", """
        def mentions_answer(prompts, completions, answer):
            return [float(a in c) for c, a in zip(completions, answer)]
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = load_reward_functions(["lorakit_test_reward_pkg.scoring:mentions_answer"], [0.5], ("answer",))
    total, per_function = score(rewards, ["it is odd", "even"], answer=["odd", "odd"])
    assert total.tolist() == [0.5, 0.0]
    assert per_function == {"reward/mentions_answer": [1.0, 0.0]}   # unweighted


def test_keywords_are_filtered_by_signature():
    seen: dict[str, set[str]] = {}

    def explicit(prompts, completions, answer):
        seen["explicit"] = {"prompts", "completions", "answer"}
        return [0.0] * len(completions)

    def completions_only(completions):
        seen["completions_only"] = {"completions"}
        return [0.0] * len(completions)

    def everything(prompts, completions, **kwargs):
        seen["everything"] = {"prompts", "completions", *kwargs}
        return [0.0] * len(completions)

    def with_default(completions, hint=None):
        seen["with_default"] = {"completions"} | ({"hint"} if hint is not None else set())
        return [0.0] * len(completions)

    rewards = Rewards(terms(explicit, completions_only, everything, with_default))
    score(rewards, ["x", "y"], answer=["a", "b"], difficulty=[1, 2])
    assert seen == {"explicit": {"prompts", "completions", "answer"}, "completions_only": {"completions"},
                    "everything": {"prompts", "completions", "answer", "difficulty"}, "with_default": {"completions"}}


def test_fields_come_aligned_with_the_completions_group_by_group():
    got = {}

    def record(prompts, completions, answer):
        got.update(prompts=prompts, completions=completions, answer=answer)
        return [0.0] * len(completions)

    g = 3
    prompts = [p for p in ["p0", [{"role": "user", "content": "p1"}]] for _ in range(g)]
    answers = [a for a in ["a0", "a1"] for _ in range(g)]
    completions = [f"c{i}" for i in range(2 * g)]
    Rewards(terms(record))(prompts, completions, {"answer": answers}, ["d:1"] * g + ["d:2"] * g)
    assert got == {"prompts": prompts, "completions": completions, "answer": answers}


def test_weights_sum_and_per_function_rewards_stay_unweighted():
    def ones(completions):
        return [1.0] * len(completions)

    def halves(completions):
        return (0.5, -0.5)                       # a tuple is a sequence too

    def tensor(completions):
        return torch.tensor([2.0, 4.0])          # as is a 1-D tensor

    rewards = Rewards(terms(ones, halves, tensor, weights=[2.0, 1.0, -0.25]))
    total, per_function = score(rewards, ["a", "b"])
    assert total.tolist() == [2.0 + 0.5 - 0.5, 2.0 - 0.5 - 1.0]
    assert per_function == {"reward/ones": [1.0, 1.0], "reward/halves": [0.5, -0.5], "reward/tensor": [2.0, 4.0]}


def test_weights_from_the_config():
    rewards = load_reward_functions(["exact_answer", "format"], [1.0, 0.25], ("answer",))
    assert [t.weight for t in rewards.terms] == [1.0, 0.25]
    assert score(rewards, ["odd", "an odd"], answer=["odd", "odd"])[0].tolist() == [1.25, 0.0]


def test_none_does_not_apply():
    def math_only(completions, task):
        return [float(c == "3") if t == "count" else None for c, t in zip(completions, task, strict=True)]

    def never(completions):
        return [None] * len(completions)

    rewards = Rewards(terms(math_only, never))
    total, per_function = score(rewards, ["3", "odd", "4"], task=["count", "parity", "count"])
    assert total.tolist() == [1.0, 0.0, 0.0]
    # only the completions each applies to, so the logged mean is over those; `never` is there, empty
    assert per_function == {"reward/math_only": [1.0, 0.0], "reward/never": []}


def test_deterministic(tmp_path):
    path = write(tmp_path / "r.py", """
        def length(completions):
            return [len(c) / 10 for c in completions]
    """)
    completions = ["odd", "even<|im_end|>", "ODD ", "The answer is odd"] * 2
    answers = ["odd"] * 8
    runs = [score(load_reward_functions(["exact_answer", "format", f"{path}:length"], [1.0, 0.3, 0.7], ("answer",),
                                        end_of_turn=EOT), completions, answer=answers) for _ in range(2)]
    (t1, l1), (t2, l2) = runs
    assert torch.equal(t1, t2) and l1 == l2


# ------------------------------------------------------------------------------------ loading errors

def test_default_needs_answer():
    with pytest.raises(ConfigError) as err:
        load_reward_functions([], None, ())
    assert str(err.value) == ("grpo.rewards is empty, so the reward is exact_answer, which needs an `answer` field "
                              "in every record; add one, or set grpo.rewards to your own reward functions")


def test_listed_function_that_needs_answer(tmp_path):
    path = write(tmp_path / "r.py", """
        def f(completions, answer):
            return [0.0] * len(completions)
    """)
    for spec in ["exact_answer", f"{path}:f"]:
        with pytest.raises(ConfigError) as err:
            load_reward_functions(["format", spec], None, ())
        assert str(err.value) == (f"grpo.rewards: {spec!r} needs the `answer` field in every record, and the "
                                  f"records have none (their fields: none); add it, or remove the function from "
                                  f"grpo.rewards")


def test_a_function_needing_fields_the_records_lack(tmp_path):
    path = write(tmp_path / "r.py", """
        def f(completions, answer, unit, scale=1.0):
            return [0.0] * len(completions)
    """)
    with pytest.raises(ConfigError) as err:
        load_reward_functions([f"{path}:f"], None, ("answer", "source_id"))
    assert str(err.value) == (f"grpo.rewards: '{path}:f' needs the `unit` field in every record, and the records have "
                              f"none (their fields: answer, source_id); add it, or remove the function from "
                              f"grpo.rewards")


def test_every_record_is_checked_for_the_fields_a_function_needs():
    """Before the first step: a record without the field would stop the run only when its batch
    comes, on the one process that drew it."""
    rewards = load_reward_functions(["exact_answer", "format"], None, ("answer",))
    rewards.check_records([({"answer": "odd"}, "t.jsonl:1"), ({"answer": "3"}, "t.jsonl:2")])   # passes
    with pytest.raises(DataError) as err:
        rewards.check_records([({"answer": "odd"}, "t.jsonl:1"), ({"level": 2}, "t.jsonl:2"),
                               ({"answer": None}, "t.jsonl:3")])
    assert str(err.value) == ("t.jsonl:2: reward function exact_answer needs the `answer` field, which this record "
                              "lacks; add it to every record, or give the parameter a default")


def test_the_end_of_turn_texts_reach_the_built_ins_afterwards():
    """Resolved before the model loads, told the model's end-of-turn texts once it has."""
    rewards = load_reward_functions(["exact_answer", "format"], None, ("answer",)).ending_turns_with(["<|end|>", ""])
    assert [t.fn.end_of_turn for t in rewards.terms] == [("<|end|>",), ("<|end|>",)]
    assert score(rewards, ["odd<|end|>"], answer=["odd"])[0].tolist() == [2.0]


def test_unknown_name():
    with pytest.raises(ConfigError) as err:
        load_reward_functions(["exact"], None, ("answer",))
    assert str(err.value) == ("grpo.rewards: unknown reward 'exact'; use a built-in (exact_answer, format), "
                              "path/to/file.py:fn or package.module:fn")


def test_file_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_reward_functions(["scripts/missing.py:f"], None, ("answer",))
    assert str(err.value) == (f"grpo.rewards: 'scripts/missing.py:f': no file {tmp_path / 'scripts/missing.py'}; "
                              f"give the path to your .py file, relative to the working directory or absolute")


def test_no_such_function(tmp_path, monkeypatch):
    write(tmp_path / "r.py", "def g(completions):\n    return []\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_reward_functions(["r.py:f"], None, ("answer",))
    assert str(err.value) == ("grpo.rewards: 'r.py:f': r.py has no function 'f'; define it there, or fix the name "
                              "after the ':'")


def test_not_callable(tmp_path, monkeypatch):
    write(tmp_path / "r.py", "f = 3\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_reward_functions(["r.py:f"], None, ("answer",))
    assert str(err.value) == "grpo.rewards: 'r.py:f': f is 3 (int), not a function; point the spec at a reward function"


def test_file_that_fails_to_run(tmp_path, monkeypatch):
    write(tmp_path / "r.py", "raise RuntimeError('no GPU\\nhere')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_reward_functions(["r.py:f"], None, ("answer",))
    assert str(err.value) == "grpo.rewards: 'r.py:f': running r.py raised RuntimeError: no GPU here; fix the file"


def test_no_module():
    with pytest.raises(ConfigError) as err:
        load_reward_functions(["lorakit_no_such_pkg.scoring:f"], None, ("answer",))
    assert str(err.value) == ("grpo.rewards: 'lorakit_no_such_pkg.scoring:f': no module lorakit_no_such_pkg.scoring; "
                              "install it or put its directory on PYTHONPATH, or give a file as path/to/file.py:fn")


def test_module_whose_import_fails(tmp_path, monkeypatch):
    write(tmp_path / "lorakit_test_reward_broken.py", "import lorakit_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        load_reward_functions(["lorakit_test_reward_broken:f"], None, ("answer",))
    assert str(err.value) == ("grpo.rewards: 'lorakit_test_reward_broken:f': importing lorakit_test_reward_broken "
                              "raised ModuleNotFoundError: No module named 'lorakit_no_such_dependency'; fix the "
                              "module")


def test_two_functions_of_one_name(tmp_path):
    a = write(tmp_path / "a.py", "def score(completions):\n    return [0.0] * len(completions)\n")
    b = write(tmp_path / "b.py", "def score(completions):\n    return [0.0] * len(completions)\n")
    with pytest.raises(ConfigError) as err:
        load_reward_functions([f"{a}:score", f"{b}:score"], None, ("answer",))
    assert str(err.value) == (f"grpo.rewards: more than one reward function is named 'score' ('{a}:score', "
                              f"'{b}:score'); list each once, or rename one so their logged rewards can be told apart")


def test_weights_that_do_not_fit():
    with pytest.raises(ConfigError) as err:
        load_reward_functions(["exact_answer", "format"], [1.0], ("answer",))
    assert str(err.value) == ("grpo.reward_weights has 1 weights for 2 reward function(s); give one weight per "
                              "function")
    with pytest.raises(ConfigError) as err:
        load_reward_functions(["format"], [math.nan], ("answer",))
    assert str(err.value) == "grpo.reward_weights must be finite, got nan"


# ------------------------------------------------------------------------------------ scoring errors

def test_function_that_raises():
    def broken(completions, answer):
        raise KeyError("no\nscore")

    with pytest.raises(LoraError) as err:
        score(Rewards(terms(broken)), ["a", "b"], answer=["x", "y"])
    assert str(err.value) == ("reward function broken raised KeyError: 'no\\nscore' (batch from data.jsonl:1); fix "
                              "the function or the records it reads")
    assert isinstance(err.value.__cause__, KeyError)

    def multiline(completions):
        raise ValueError("first line\n  second line")

    with pytest.raises(LoraError) as err:
        score(Rewards(terms(multiline)), ["a"])
    assert str(err.value) == ("reward function multiline raised ValueError: first line second line (batch from "
                              "data.jsonl:1); fix the function or the records it reads")


@pytest.mark.parametrize(("returned", "message"), [
    (1.0, "reward function bad returned a float, not a list; return one reward per completion"),
    (torch.tensor(1.0), "reward function bad returned a Tensor, not a list; return one reward per completion"),
    ("1.0", "reward function bad returned a str, not a list; return one reward per completion"),
    (None, "reward function bad returned a NoneType, not a list; return one reward per completion"),
    ([1.0] * 3, "reward function bad returned 3 rewards for 8 completions; return one per completion (prompts and "
                "fields repeat each record once per completion)"),
    ([1.0] * 6 + ["yes", 1.0], "data.jsonl:7: reward function bad returned 'yes' (str) for completion 6; return a "
                               "finite number, or None where the reward does not apply"),
    ([1.0] * 2 + [math.nan] + [1.0] * 5, "data.jsonl:3: reward function bad returned nan (float) for completion 2; "
                                         "return a finite number, or None where the reward does not apply"),
    ([-math.inf] + [1.0] * 7, "data.jsonl:1: reward function bad returned -inf (float) for completion 0; return a "
                              "finite number, or None where the reward does not apply"),
])
def test_bad_return(returned, message):
    def bad(completions):
        return returned

    with pytest.raises(LoraError) as err:
        score(Rewards(terms(bad)), ["c"] * 8)
    assert str(err.value) == message


def test_missing_field():
    def needs_hint(completions, hint):
        return [0.0] * len(completions)

    with pytest.raises(LoraError) as err:
        score(Rewards(terms(needs_hint)), ["a"], answer=["x"])
    assert str(err.value) == ("reward function needs_hint needs hint, which the records do not have (their fields: "
                              "answer); add it to every record, or give the parameter a default")


def test_inputs_that_do_not_line_up():
    rewards = load_reward_functions(["format"], None, ())
    with pytest.raises(LoraError) as err:
        rewards(["p"] * 2, ["c"] * 4, {"answer": ["a"] * 2}, ["d:1"] * 4)
    assert str(err.value) == ("reward inputs do not line up: 4 completions, but prompts has 2, answer has 2; pass "
                              "one entry per completion (each record repeated once per completion)")
