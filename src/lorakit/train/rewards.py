"""Reward functions for GRPO: the built-ins, loading the user's own, and their weighted sum.

A reward function scores sampled completions. The signature is the one TRL's GRPOTrainer calls,
so a function written for it works here unchanged:

    fn(prompts: list, completions: list[str], **fields) -> list[float | None]

    prompts[i]      the prompt of completion i's record as given: a string, or a list of chat messages
    completions[i]  completion i as text, special tokens removed
    fields          every other field of the records, one list each, aligned with the completions
                    (records with an `answer` give answer=[...])

Completions come G (grpo.group_size) per prompt, so `prompts` and each field hold every record G
times in a row. Arguments are passed by keyword, and only those the function takes (all of them if
it takes **kwargs): `def f(completions, answer)` gets just those two. A parameter without a default
that is neither `prompts`, `completions` nor a field of the records is an error naming it.

A function returns one reward per completion (a list, tuple, or 1-D tensor or array): a finite
number, or None where it does not apply (a reward for one task in a mixture of tasks). Anything
else (a scalar, a string, a wrong count, NaN) is an error naming the function: it would otherwise
train on garbage without a word. The total is

    reward[i] = sum_k weight_k * reward_k[i]        None counts as 0

and each function's logged mean, "reward/<name>", is over the completions it applies to, so a
reward for a tenth of the data is not diluted tenfold in the logs. `Rewards` returns those
completions' rewards rather than their mean, so that micro-batches and processes combine as sum /
count (MetricSums); every key is there in every batch, empty where the function applied to none,
because the processes reduce their metrics in one collective over the same keys.

Built-ins (the answers of the built-in tasks are one word or number: "negative", "no", "odd", "3"):

    exact_answer  1.0 if the completion equals the record's `answer`, both normalised: trailing
                  end-of-turn texts removed, surrounding whitespace stripped, case-folded; else 0.0
    format        1.0 if the completion, its trailing end-of-turn texts and surrounding whitespace
                  removed, is one non-empty line of at most one word (a bare answer) and holds no
                  end-of-turn text (nothing was written after the turn ended); else 0.0

The end-of-turn texts are the tokenizer's (e.g. "<|im_end|>", "</s>"), passed by the caller: the
completions are decoded without special tokens, but a template whose end of turn is plain text, or
a tokenizer that does not mark it special, leaves it in the text. `format` rewards the shape of the
answer whether or not it is right, the partial credit that lets GRPO see progress before the first
exact answers appear; longer answers want `Format(max_words=N)` in a file of your own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import math
import numbers
import os
import reprlib
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, DataError, LoraError, few

RewardFunction = Callable[..., Sequence[float | None]]
"""fn(prompts, completions, **fields) -> one reward (or None) per completion; see the module docstring."""

DEFAULT_REWARD = "exact_answer"


class _RecordError(DataError):
    """A reward cannot score one record; `Rewards` prefixes the message with that record's source."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index
        """The completion (0-based) whose record is at fault."""


def _strip_end_of_turn(text: str, end_of_turn: Sequence[str]) -> str:
    """`text` without surrounding whitespace and without end-of-turn texts at its end (several, as
    when a model writes "<|im_end|></s>"), so a completion that kept its end of turn still matches."""
    text = text.strip()
    while ends := [e for e in end_of_turn if e and text.endswith(e)]:
        text = text[: -len(ends[0])].rstrip()
    return text


@dataclass(frozen=True)
class ExactAnswer:
    """The built-in `exact_answer`: 1.0 where the normalised completion equals the normalised answer."""

    end_of_turn: tuple[str, ...] = ()
    """The tokenizer's end-of-turn texts, removed from the end of completions and answers."""

    def __call__(self, completions: list[str], answer: list) -> list[float]:
        for i, value in enumerate(answer):
            if not isinstance(value, str):
                raise _RecordError(i, f"reward exact_answer needs the record's `answer` as a string, got "
                                     f"{reprlib.repr(value)} ({type(value).__name__}); write it as a string, "
                                     f"e.g. \"3\"")
        return [float(self._normal(c) == self._normal(a)) for c, a in zip(completions, answer, strict=True)]

    def _normal(self, text: str) -> str:
        return _strip_end_of_turn(text, self.end_of_turn).casefold()


@dataclass(frozen=True)
class Format:
    """The built-in `format`: 1.0 where the completion is a bare answer of at most `max_words` words."""

    end_of_turn: tuple[str, ...] = ()
    """The tokenizer's end-of-turn texts: allowed at the end, anywhere else they mean text after the turn."""
    max_words: int = 1
    """Whitespace-separated words allowed; 1 fits the built-in tasks, whose answers are one word or number."""

    def __call__(self, completions: list[str]) -> list[float]:
        return [float(self._is_bare(c)) for c in completions]

    def _is_bare(self, completion: str) -> bool:
        text = _strip_end_of_turn(completion, self.end_of_turn)
        return (not any(e and e in text for e in self.end_of_turn) and len(text.splitlines()) == 1
                and 1 <= len(text.split()) <= self.max_words)


BUILTINS: dict[str, type[ExactAnswer] | type[Format]] = {"exact_answer": ExactAnswer, "format": Format}


@dataclass(frozen=True)
class RewardTerm:
    """One reward function of the sum, with what its signature lets it be given."""

    name: str
    """The name it is logged under: the built-in's, or the function's (after the ':' of its spec)."""
    fn: RewardFunction
    weight: float
    takes: frozenset[str] | None
    """The keywords it accepts; None: any (it takes **kwargs)."""
    needs: frozenset[str]
    """The keywords it cannot do without (parameters without a default)."""

    @classmethod
    def of(cls, name: str, fn: RewardFunction, weight: float) -> RewardTerm:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.VAR_KEYWORD)]
        named = [p for p in params if p.kind is not p.VAR_KEYWORD]
        takes = None if len(named) < len(params) else frozenset(p.name for p in named)
        return cls(name, fn, weight, takes, frozenset(p.name for p in named if p.default is p.empty))


@dataclass(frozen=True)
class Rewards:
    """The reward functions of a GRPO run and their weights; calling it scores a batch of completions."""

    terms: tuple[RewardTerm, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        """The logged names, "reward/<name>" per function in order: the keys of every call's second value."""
        return tuple(f"reward/{t.name}" for t in self.terms)

    def __call__(self, prompts: list, completions: list[str], fields: dict[str, list],
                 sources: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """The (N,) float32 total reward of N completions, and per function ("reward/<name>") the
        float32 rewards of the completions it applies to, whose mean is the one to log. `prompts`,
        every list of `fields` and `sources` (each record's "path:line", for messages) hold one entry
        per completion."""
        n = len(completions)
        lengths = {"prompts": len(prompts), "sources": len(sources), **{k: len(v) for k, v in fields.items()}}
        if wrong := [f"{k} has {m}" for k, m in lengths.items() if m != n]:
            raise LoraError(f"reward inputs do not line up: {n} completions, but {', '.join(wrong)}; pass one "
                            f"entry per completion (each record repeated once per completion)")
        args = {"prompts": prompts, "completions": completions, **fields}
        total = [0.0] * n
        per_function: dict[str, Tensor] = {}
        for column, term in zip(self.columns, self.terms, strict=True):
            values = self._score(term, args, sources)
            total = [t + term.weight * (0.0 if v is None else v) for t, v in zip(total, values, strict=True)]
            per_function[column] = torch.tensor([v for v in values if v is not None], dtype=torch.float32)
        return torch.tensor(total, dtype=torch.float32), per_function   # (N,), {column: (applied,)}

    def ending_turns_with(self, end_of_turn: Sequence[str]) -> Rewards:
        """These rewards with the built-ins (and `Format`s of the user's own) told the end-of-turn texts."""
        eot = tuple(e for e in end_of_turn if e)
        return Rewards(tuple(dataclasses.replace(t, fn=dataclasses.replace(t.fn, end_of_turn=eot))
                             if isinstance(t.fn, (ExactAnswer, Format)) else t for t in self.terms))

    def check_records(self, records: Sequence[tuple[dict[str, Any], str]]) -> None:
        """Every field a function cannot do without is in every record ((fields, "path:line") each),
        checked before the first step: a record without it would otherwise stop the run when its
        batch comes, on that one process of several."""
        for term in self.terms:
            for name in sorted(term.needs - {"prompts", "completions"}):
                if lacking := next((source for fields, source in records if fields.get(name) is None), None):
                    raise DataError(f"{lacking}: reward function {term.name} needs {_fields([name])}, which this "
                                    f"record lacks; add it to every record, or give the parameter a default")

    @staticmethod
    def _score(term: RewardTerm, args: dict[str, list], sources: list[str]) -> list[float | None]:
        """One function's rewards, checked: its mistakes are reported as its own, not as a bad loss later."""
        if missing := sorted(term.needs - args.keys()):
            fields = few(sorted(args.keys() - {"prompts", "completions"})) or "none"
            raise LoraError(f"reward function {term.name} needs {', '.join(missing)}, which the records do not "
                            f"have (their fields: {fields}); add it to every record, or give the parameter a "
                            f"default")
        n = len(args["completions"])
        try:
            out = term.fn(**{k: v for k, v in args.items() if term.takes is None or k in term.takes})
        except _RecordError as exc:
            raise DataError(f"{sources[exc.index]}: {exc}") from exc
        except Exception as exc:
            where = f" (batch from {sources[0]})" if sources else ""
            raise LoraError(f"reward function {term.name} raised {_one_line(exc)}{where}; fix the function or "
                            f"the records it reads") from exc
        kind = type(out).__name__
        if hasattr(out, "tolist"):   # a tensor or a numpy array
            out = out.tolist()
        if not isinstance(out, Sequence) or isinstance(out, (str, bytes)):
            raise LoraError(f"reward function {term.name} returned a {kind}, not a list; return one reward per "
                            f"completion")
        if len(out) != n:
            raise LoraError(f"reward function {term.name} returned {len(out)} rewards for {n} completions; return "
                            f"one per completion (prompts and fields repeat each record once per completion)")
        values: list[float | None] = []
        for i, v in enumerate(out):
            if v is not None and (not isinstance(v, numbers.Real) or not math.isfinite(v)):
                raise LoraError(f"{sources[i]}: reward function {term.name} returned {reprlib.repr(v)} "
                                f"({type(v).__name__}) for completion {i}; return a finite number, or None where "
                                f"the reward does not apply")
            values.append(None if v is None else float(v))
        return values


def load_reward_functions(specs: list[str], weights: list[float] | None, fields: Collection[str], *,
                          end_of_turn: Sequence[str] = ()) -> Rewards:
    """The reward functions of `grpo.rewards` (empty: exact_answer) with `grpo.reward_weights` (None: all
    1). `fields`: the names of the records' fields besides the prompt (e.g. answer), which the
    functions may need; `end_of_turn`: the tokenizer's end-of-turn texts, for the built-ins (or set
    later with `Rewards.ending_turns_with`, once the model that says them is loaded). Each spec is a
    built-in name, path/to/file.py:fn (relative to the working directory) or package.module:fn.
    Raises ConfigError for a spec that does not resolve to a function, a function that needs a field
    the records do not have, and weights that do not fit: all before a model is loaded or a step run."""
    has_answer = "answer" in fields
    if not specs and not has_answer:
        raise ConfigError("grpo.rewards is empty, so the reward is exact_answer, which needs an `answer` field "
                          "in every record; add one, or set grpo.rewards to your own reward functions")
    specs = list(specs) or [DEFAULT_REWARD]
    weights = [1.0] * len(specs) if weights is None else list(weights)
    if len(weights) != len(specs):
        raise ConfigError(f"grpo.reward_weights has {len(weights)} weights for {len(specs)} reward function(s); "
                          f"give one weight per function")
    if bad := [w for w in weights if not math.isfinite(w)]:
        raise ConfigError(f"grpo.reward_weights must be finite, got {bad[0]}")
    eot = tuple(e for e in end_of_turn if e)
    modules: dict[str, ModuleType] = {}   # a file that gives several functions is run once
    terms = [RewardTerm.of(*_resolve(spec, eot, modules), float(weight))
             for spec, weight in zip(specs, weights, strict=True)]
    for spec, term in zip(specs, terms, strict=True):
        if missing := sorted(term.needs - {"prompts", "completions"} - set(fields)):
            raise ConfigError(f"grpo.rewards: {spec!r} needs {_fields(missing)} in every record, and the records "
                              f"have none (their fields: {few(sorted(fields)) or 'none'}); add it, or remove the "
                              f"function from grpo.rewards")
    names = [t.name for t in terms]
    if dup := next((name for name in names if names.count(name) > 1), None):
        clash = ", ".join(repr(s) for s, name in zip(specs, names, strict=True) if name == dup)
        raise ConfigError(f"grpo.rewards: more than one reward function is named {dup!r} ({clash}); list each "
                          f"once, or rename one so their logged rewards can be told apart")
    return Rewards(tuple(terms))


def _resolve(spec: str, end_of_turn: tuple[str, ...],
             modules: dict[str, ModuleType]) -> tuple[str, RewardFunction]:
    """(name, function) of one spec; `modules` holds those already loaded, by where they came from."""
    if spec in BUILTINS:
        return spec, BUILTINS[spec](end_of_turn=end_of_turn)
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ConfigError(f"grpo.rewards: unknown reward {spec!r}; use a built-in ({', '.join(BUILTINS)}), "
                          f"path/to/file.py:fn or package.module:fn")
    is_file = where.endswith(".py") or "/" in where or os.sep in where
    if where not in modules:
        modules[where] = _load_file(spec, Path(where)) if is_file else _import(spec, where)
    if not hasattr(modules[where], attr):
        raise ConfigError(f"grpo.rewards: {spec!r}: {where} has no function {attr!r}; define it there, or fix "
                          f"the name after the ':'")
    fn = getattr(modules[where], attr)
    if not callable(fn):
        raise ConfigError(f"grpo.rewards: {spec!r}: {attr} is {reprlib.repr(fn)} ({type(fn).__name__}), not a "
                          f"function; point the spec at a reward function")
    return attr, fn


def _load_file(spec: str, path: Path) -> ModuleType:
    """Run a .py file as a module. It is registered in sys.modules under a name unique to its path,
    as an import would, so dataclasses and pickling inside it work."""
    if not path.is_file():
        raise ConfigError(f"grpo.rewards: {spec!r}: no file {path.absolute()}; give the path to your .py file, "
                          f"relative to the working directory or absolute")
    name = "lorakit_reward_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module = ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    try:
        SourceFileLoader(name, str(path)).exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"grpo.rewards: {spec!r}: running {path} raised {_one_line(exc)}; fix the "
                          f"file") from exc
    return module


def _import(spec: str, name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as exc:
        gone = isinstance(exc, ModuleNotFoundError) and exc.name and (name + ".").startswith(exc.name + ".")
        if gone:   # the module itself, not something it imports
            raise ConfigError(f"grpo.rewards: {spec!r}: no module {name}; install it or put its directory on "
                              f"PYTHONPATH, or give a file as path/to/file.py:fn") from exc
        raise ConfigError(f"grpo.rewards: {spec!r}: importing {name} raised {_one_line(exc)}; fix the "
                          f"module") from exc


def _fields(names: Sequence[str]) -> str:
    return "the " + ", ".join(f"`{n}`" for n in names) + (" fields" if len(names) > 1 else " field")


def _one_line(exc: BaseException) -> str:
    """"Type: message" of an exception, its message's lines joined, for a one-line error."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
