"""The data of the objectives other than SFT (`training.objective`): preference pairs (dpo, ipo,
simpo, orpo), labelled completions (kto) and prompts to sample completions from (grpo).

    files / hf: / built-in  --split_records (data.py)-->  (record, "path:line"), split as SFT data is
        --build_objective_data-->  PairExample | UnpairedExample | PromptExample, truncated and counted
                                   + eval_sft: the eval examples as SFT Examples (prompt + reference
                                     answer), so the SFT evaluation (loss, exact match) runs on them

Record formats, told from the keys (the dataset forms TRL reads):

    paired    prompt, chosen, rejected        each a string or chat messages; chosen and rejected one
                                              assistant message or a list of them
              chosen, rejected                whole conversations, no prompt: the prompt is the
                                              messages they start with alike
    unpaired  prompt, completion, label       kto; label true/false ("true"/"false"/1/0 as CSV gives
                                              it); a paired record gives two (chosen true, rejected false)
    prompts   prompt, other fields            grpo; the other fields (e.g. answer) go to the rewards

The built-in data derives such records from its chat tasks (`lorakit.builtin.preference`).

Tokens. A record of plain strings is plain text, as in the prompt_completion format: the prompt
with the tokenizer's special tokens, each completion with EOS appended. Once any field is chat
messages all are (a string prompt becomes a user message, a string completion an assistant
message), and the chat template renders them: the prompt with the generation prompt, then prompt
and completion together; the completion is what the second adds to the first, so it ends with the
end-of-turn token(s) the template puts after an assistant turn and the model learns to stop.
Prompt and completion are tokenized apart, so the prompt's ids are the very ones a completion is
generated from (tokenizing them together could merge tokens across the boundary).

Truncation at data.max_seq_len keeps the prompt and cuts the completion's end; an example left with
no completion token is dropped (a pair when either completion is), as is a grpo prompt of
max_seq_len tokens or more, which leaves no room to sample. All of it is counted in the DataReport.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..builtin.preference import preference_records
from ..errors import DataError
from .chat import read_conversation
from .config import PAIRED_OBJECTIVES, DataSection
from .data import (
    IGNORE_INDEX,
    DataReport,
    Example,
    Record,
    SampleKind,
    SplitCount,
    encode,
    eos_id,
    split_records,
)

KIND_OF: dict[str, SampleKind] = {**dict.fromkeys(PAIRED_OBJECTIVES, "paired"), "kto": "unpaired", "grpo": "prompts"}
"""The records each objective reads."""
EXPECTED_KEYS: dict[str, str] = {
    "paired": "prompt, chosen, rejected (or chosen and rejected as whole conversations, without prompt)",
    "unpaired": "prompt, completion, label (or the paired keys prompt, chosen, rejected)",
    "prompts": "prompt and any other fields (e.g. answer)",
}
LABELS = {"true": True, "1": True, "false": False, "0": False}
"""kto labels given as text (a CSV column), lower-cased."""
PROMPT_ENDS = ("user", "tool")
"""The roles a prompt may end with: the turn the completions answer."""

Text = str | list[dict[str, Any]]
"""A prompt or completion: plain text, or chat messages."""


@dataclass
class PairExample:
    """dpo, ipo, simpo, orpo: one prompt, a preferred and a dispreferred completion."""
    prompt_ids: list[int]
    """The prompt, up to where a completion starts (with the generation prompt for chat)."""
    chosen_ids: list[int]
    """The preferred completion's tokens, all trained, ending with EOS or the end-of-turn tokens."""
    rejected_ids: list[int]
    """The dispreferred completion's tokens, likewise."""
    source: str
    """Where the record came from, "path:line"."""
    chosen_text: str
    """The chosen answer as text (the last assistant message's content, or the completion string)."""


@dataclass
class UnpairedExample:
    """kto: one prompt and one completion, labelled desirable or not."""
    prompt_ids: list[int]
    """The prompt, up to where the completion starts."""
    completion_ids: list[int]
    """The completion's tokens, all trained, ending with EOS or the end-of-turn tokens."""
    label: bool
    """Whether the completion is desirable."""
    source: str
    """Where the record came from, "path:line"."""
    completion_text: str
    """The completion as text (the last assistant message's content, or the completion string)."""


@dataclass
class PromptExample:
    """grpo: a prompt to sample a group of completions from and score them with reward functions."""
    prompt_ids: list[int]
    """The prompt encoded, or for chat rendered with the generation prompt."""
    prompt: Text
    """The prompt as the record gives it, for the reward functions."""
    extras: dict[str, Any]
    """Every other field of the record (e.g. "answer"), for the reward functions."""
    source: str
    """Where the record came from, "path:line"."""


ObjectiveExample = PairExample | UnpairedExample | PromptExample


@dataclass
class ObjectiveData:
    train: list[ObjectiveExample]
    """The training examples, all of the objective's one type."""
    eval: list[ObjectiveExample]
    """The held-out examples, of the same type."""
    eval_sft: list[Example]
    """The held-out examples as SFT samples for `evaluate` (loss, exact match): prompt + the
    reference answer (chosen; a desirable completion; the `answer` field), labels on the answer."""
    report: DataReport
    """What was read, kept, cut and dropped."""


@dataclass
class _Fields:
    """A record's prompt and completions, all plain text or all chat messages (validated)."""
    prompt: Text
    completions: dict[str, Text]
    """{field name: completion}, in record order."""
    tools: list[dict[str, Any]] | None = None
    """The record's tool definitions, for the template."""


def build_objective_data(cfg: DataSection, tokenizer: Any, seed: int, objective: str) -> ObjectiveData:
    """The objective's train and eval examples, split as `build_datasets` splits SFT data (data.eval,
    else the built-in eval split, else data.eval_fraction with `seed`; data.max_samples), truncated
    and counted, with the eval examples also as SFT samples."""
    kind = KIND_OF.get(objective)
    if kind is None:
        raise DataError(f"training.objective={objective} reads SFT data (build_datasets); the objectives with data "
                        f"of their own are {', '.join(KIND_OF)}")
    if cfg.format != "auto":
        raise DataError(f"data.format={cfg.format} names an SFT format, but training.objective={objective} reads "
                        f"records with {EXPECTED_KEYS[kind]}; set data.format=auto")
    report = DataReport(max_seq_len=cfg.max_seq_len, kind=kind)
    train_records, eval_records = split_records(cfg, seed, report, lambda records: preference_records(records, kind))
    reader = _Reader(tokenizer, cfg, objective, kind)
    train = reader.convert(train_records, report, "train")
    evals = reader.convert(eval_records, report, "eval")
    if not train:
        raise DataError(reader.empty_message("training", cfg.train, len(train_records)))
    if eval_records and not evals:
        raise DataError(reader.empty_message("evaluation", cfg.eval or cfg.train, len(eval_records)))
    report.used_train, report.used_eval = len(train), len(evals)
    report.train_tokens = sum(_token_counts(e)[0] for e in train)
    report.trained_tokens = sum(_token_counts(e)[1] for e in train)
    report.desirable = sum(isinstance(e, UnpairedExample) and e.label for e in train)
    eval_sft = [sft for sft in map(reader.eval_sft, evals) if sft is not None]
    return ObjectiveData(train, evals, eval_sft, report)


class _Reader:
    """Records of one objective as examples: fields read and validated, rendered, tokenized, truncated."""

    def __init__(self, tokenizer: Any, cfg: DataSection, objective: str, kind: SampleKind) -> None:
        self.tokenizer, self.cfg, self.objective, self.kind = tokenizer, cfg, objective, kind

    def convert(self, records: list[Record], report: DataReport, split: str) -> list[ObjectiveExample]:
        """The records' examples that fit data.max_seq_len, counting what is cut and dropped."""
        formats: Counter[str] = Counter(report.formats)
        kept_records = cut_records = 0
        out: list[ObjectiveExample] = []
        for record, source in records:
            fmt, examples = self.read(record, source)
            formats[fmt] += 1
            kept = 0
            for example in examples:
                keep, cut = _fit(example, self.cfg.max_seq_len)
                report.truncated += cut
                if not keep:   # nothing of the completion fits, or no room to sample one: by truncation
                    report.dropped_no_target += 1
                    report.dropped_by_truncation += 1
                    continue
                out.append(example)
                kept += 1
            kept_records += kept > 0
            cut_records += kept == 0
        report.formats = dict(formats)
        report.splits[split] = SplitCount(len(records), kept_records, cut_records)
        return out

    def read(self, record: dict, source: str) -> tuple[str, list[ObjectiveExample]]:
        """(the record's format, its examples, not truncated)."""
        if self.kind != "prompts" and "chosen" in record and "rejected" in record:
            fields = self._pair_fields(record, source)
            prompt_ids, (chosen, rejected) = self._tokens(fields, source)
            chosen_text, rejected_text = (_answer_text(fields.completions[k]) for k in ("chosen", "rejected"))
            if self.kind == "paired":
                return "paired", [PairExample(prompt_ids, chosen, rejected, source, chosen_text)]
            return "paired", [UnpairedExample(prompt_ids, chosen, True, source, chosen_text),
                              UnpairedExample(list(prompt_ids), rejected, False, source, rejected_text)]
        if self.kind == "unpaired" and "completion" in record:
            if record.get("label") is None:
                raise DataError(f"{source}: missing 'label' (true: the completion is desirable, false: it is not); "
                                f"training.objective={self.objective} reads {EXPECTED_KEYS[self.kind]}")
            label = _label(record["label"], source)
            fields = self._fields(record, source, self._field(record, "prompt", source),
                                  {"completion": self._field(record, "completion", source, completion=True)})
            prompt_ids, (completion,) = self._tokens(fields, source)
            return "unpaired", [UnpairedExample(prompt_ids, completion, label, source,
                                                _answer_text(fields.completions["completion"]))]
        if self.kind == "prompts" and "prompt" in record:
            fields = self._fields(record, source, self._field(record, "prompt", source), {})
            prompt_ids, _ = self._tokens(fields, source)
            extras = {key: value for key, value in record.items() if key != "prompt"}
            return "prompts", [PromptExample(prompt_ids, record["prompt"], extras, source)]
        sft = ("; records of SFT formats (e.g. messages) train with training.objective=sft"
               if {"messages", "conversations", "instruction", "text"} & set(record) else "")
        raise DataError(f"{source}: cannot read a training.objective={self.objective} record from its keys "
                        f"({', '.join(map(str, record))}); it reads {EXPECTED_KEYS[self.kind]}{sft}. Rename "
                        f"columns with data.columns")

    def eval_sft(self, example: ObjectiveExample) -> Example | None:
        """The example as an SFT sample of its reference answer; None when it has none (an
        undesirable completion, a prompt without a string `answer`)."""
        if isinstance(example, PairExample):
            return _sft(example.prompt_ids, example.chosen_ids, example.source, example.chosen_text)
        if isinstance(example, UnpairedExample):
            return (_sft(example.prompt_ids, example.completion_ids, example.source, example.completion_text)
                    if example.label else None)
        answer = example.extras.get("answer")
        if not isinstance(answer, str):
            return None
        # rendered as the prompt's completion; the prompt is under max_seq_len, so some of it fits
        fields = self._fields(example.extras, example.source, example.prompt, {"answer": answer})
        prompt_ids, (completion,) = self._tokens(fields, example.source)
        return _sft(prompt_ids, completion[:self.cfg.max_seq_len - len(prompt_ids)], example.source, answer)

    def empty_message(self, what: str, spec: str | list[str], n: int) -> str:
        if self.kind == "prompts":
            why = f"every prompt has data.max_seq_len={self.cfg.max_seq_len} tokens or more"
        else:
            why = f"no completion token fits after the prompt in data.max_seq_len={self.cfg.max_seq_len}"
        return (f"no {what} examples left from {spec}: {n} records converted, all dropped: {why}; raise it or "
                f"shorten the prompts")

    # --------------------------------------------------------------------------------- the fields

    def _field(self, record: dict, key: str, source: str, completion: bool = False) -> Text:
        """record[key]: a string or chat messages (for a completion, also one message object)."""
        value = record.get(key)
        if value is None:
            raise DataError(f"{source}: missing {key!r}; training.objective={self.objective} reads "
                            f"{EXPECTED_KEYS[self.kind]} (record keys: {', '.join(map(str, record))})")
        if isinstance(value, str) or (isinstance(value, list) and value):
            return value
        if completion and isinstance(value, dict):
            return [value]
        one = ", or one" if completion else ""
        got = "an empty list" if value == [] else type(value).__name__
        raise DataError(f"{source}: {key!r} must be a string or chat messages (a list of {{role, content}} "
                        f"objects{one}), got {got}")

    def _pair_fields(self, record: dict, source: str) -> _Fields:
        chosen = self._field(record, "chosen", source, completion=True)
        rejected = self._field(record, "rejected", source, completion=True)
        if "prompt" in record:
            return self._fields(record, source, self._field(record, "prompt", source),
                                {"chosen": chosen, "rejected": rejected})
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise DataError(f"{source}: no 'prompt', and 'chosen' and 'rejected' are not both whole conversations "
                            f"(lists of messages) to take it from; give a 'prompt' field")
        chosen, rejected = (_messages(value, key, source, None) for key, value in
                            (("chosen", chosen), ("rejected", rejected)))
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise DataError(f"{source}: no 'prompt', and 'chosen' and 'rejected' do not start with the same message "
                            f"to take as the prompt; give a 'prompt' field, or conversations that start alike")
        for key, messages in (("chosen", chosen), ("rejected", rejected)):
            if shared == len(messages):
                raise DataError(f"{source}: {key!r} has no message after the {shared} that 'chosen' and "
                                f"'rejected' share as the prompt, so its completion is empty")
        return self._fields(record, source, chosen[:shared],
                            {"chosen": chosen[shared:], "rejected": rejected[shared:]})

    def _fields(self, record: dict, source: str, prompt: Text, completions: dict[str, Text]) -> _Fields:
        """Plain text when every field is a string; else all as validated messages (a string prompt a
        user message, a string completion an assistant one), data.system_prompt before the prompt."""
        if isinstance(prompt, str) and all(isinstance(value, str) for value in completions.values()):
            return _Fields(prompt, completions)
        conversation = read_conversation({"messages": _as_messages(prompt, "user"), "tools": record.get("tools")},
                                         "chat", f"{source}: prompt", self.cfg.system_prompt)
        ends = conversation.messages[-1]["role"]
        if ends not in PROMPT_ENDS:
            raise DataError(f"{source}: the prompt's last message has role {ends}; it must be the user (or tool) "
                            f"message the completions answer")
        done = {}
        for key, value in completions.items():
            messages = _messages(_as_messages(value, "assistant"), key, source, None)
            other = next((m["role"] for m in messages if m["role"] != "assistant"), None)
            if other is not None:
                raise DataError(f"{source}: {key!r} holds a {other} message; a completion is the assistant's answer, "
                                f"assistant messages only")
            done[key] = messages
        return _Fields(conversation.messages, done, conversation.tools)

    # -------------------------------------------------------------------------------------- tokens

    def _tokens(self, fields: _Fields, source: str) -> tuple[list[int], list[list[int]]]:
        """(prompt ids, each completion's ids), tokenized apart (see the module docstring)."""
        if isinstance(fields.prompt, str):
            return (encode(self.tokenizer, fields.prompt, True),
                    [encode(self.tokenizer, text, False) + [eos_id(self.tokenizer, source)]
                     for text in fields.completions.values()])
        prompt_text = self._render(fields.prompt, fields.tools, True, source)
        completions = []
        for key, messages in fields.completions.items():
            full = self._render(fields.prompt + messages, fields.tools, False, source)
            if not full.startswith(prompt_text):
                raise DataError(f"{source}: the chat template does not render the prompt (with the generation prompt) "
                                f"as a prefix of the prompt and its {key!r} completion, so the completion cannot be "
                                f"located; set data.chat_template to a template whose generation prompt starts the "
                                f"assistant turn as it renders it")
            if len(full) == len(prompt_text):
                raise DataError(f"{source}: the chat template renders the {key!r} completion as nothing, so there is "
                                f"no answer to train; set data.chat_template to a template that renders it")
            completions.append(encode(self.tokenizer, full[len(prompt_text):], False))
        return encode(self.tokenizer, prompt_text, False), completions

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, generation_prompt: bool,
                source: str) -> str:
        template = self.cfg.chat_template or None
        if template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise DataError(f"{source}: chat messages need a chat template and the tokenizer has none; set "
                            f"data.chat_template to a Jinja template, or give prompt and completions as strings")
        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=generation_prompt, chat_template=template)
        except Exception as e:   # jinja raises its own types, templates raise_exception() with anything
            raise DataError(f"{source}: the chat template failed on these messages: {e}") from None
        if not isinstance(text, str):
            raise DataError(f"{source}: the chat template rendered {type(text).__name__}, not a string")
        return text


def _as_messages(value: Text, role: str) -> list[dict[str, Any]]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _messages(value: list[dict[str, Any]], key: str, source: str, system_prompt: str | None) -> list[dict[str, Any]]:
    """Validated and normalised as chat records' messages are (chat.py)."""
    return read_conversation({"messages": value}, "chat", f"{source}: {key}", system_prompt).messages


def _answer_text(completion: Text) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _label(value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABELS:
        return LABELS[value.strip().lower()]
    raise DataError(f"{source}: 'label' must be true or false (or \"true\"/\"false\"/1/0), got {value!r}")


def _fit(example: ObjectiveExample, max_seq_len: int) -> tuple[bool, bool]:
    """(keep, cut): the example's completions cut to fit after the prompt in max_seq_len tokens (in
    place); kept when every completion keeps a token, or for a prompt, when it leaves room for one."""
    if isinstance(example, PromptExample):
        return len(example.prompt_ids) < max_seq_len, False
    room = max(0, max_seq_len - len(example.prompt_ids))
    if isinstance(example, PairExample):
        cut = len(example.chosen_ids) > room or len(example.rejected_ids) > room
        example.chosen_ids, example.rejected_ids = example.chosen_ids[:room], example.rejected_ids[:room]
        return bool(example.chosen_ids and example.rejected_ids), cut
    cut = len(example.completion_ids) > room
    example.completion_ids = example.completion_ids[:room]
    return bool(example.completion_ids), cut


def _token_counts(example: ObjectiveExample) -> tuple[int, int]:
    """(tokens the model reads for the example, of them completion tokens); a pair is read as two
    sequences, the prompt in each."""
    if isinstance(example, PairExample):
        completions = len(example.chosen_ids) + len(example.rejected_ids)
        return 2 * len(example.prompt_ids) + completions, completions
    if isinstance(example, UnpairedExample):
        return len(example.prompt_ids) + len(example.completion_ids), len(example.completion_ids)
    return len(example.prompt_ids), 0


def _sft(prompt_ids: list[int], completion_ids: list[int], source: str, reference: str) -> Example:
    """An answer with no text (only tool calls) has nothing to match exactly: no reference."""
    return Example(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids, source,
                   prompt_ids=list(prompt_ids), reference=reference or None)
