"""Training data: read records, tell their format, tokenize them with the trained span marked,
truncate, split off evaluation data, pack and collate.

    files / hf: / built-in  --load_records-->  (record, "path:line")
        --detect_format / to_examples-->  [Example(input_ids, labels)]   labels = -100 off the trained span
        --build_datasets-->  truncated, counted, split (train, eval, DataReport)
        --pack (optional) / collate-->  tensors for the model
    RowStream: the order the training rows are taken in, one seeded permutation per epoch

Formats (detected per record from its keys, or forced with `data.format`; `data.columns` renames
columns first):

    alpaca             instruction, input?, output  -> [user: instruction (+ "\n\n" + input), assistant: output]
    chat               messages: [{role, content, tool_calls?}], tools?   (OpenAI / transformers form;
                       roles system, user, assistant, tool)
    sharegpt           conversations: [{from, value}]
    prompt_completion  prompt, completion           plain text, no template; trained: completion + EOS
    text               text                         every token trained, EOS appended

Chat-like formats are rendered with the tokenizer's chat template (or `data.chat_template`). By
default only assistant turns are trained (their tool calls included), each with its end-of-turn
token(s), so the model learns to stop. `chat.py` renders a conversation and locates its assistant
turns as character spans, in one sequence, or in one per turn for a template that renders earlier
turns differently (Qwen3), so one record can give several samples; here the spans become token
labels through the fast tokenizer's offsets.

Labels are unshifted (labels[t] is the target of input t-1, as Hugging Face models shift inside),
so a packed row ignores the label of each sample's first token: otherwise the previous sample's
last token would be trained to predict the next, unrelated sample.

Nothing is dropped silently: truncation, samples left without a trained token, samples beyond
`max_samples` are all counted in the `DataReport`.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..builtin.tasks import builtin_data_files
from ..errors import DataError
from ..files import read_text
from .chat import ChatText, chat_texts, read_conversation, string_field
from .config import BUILTIN_DATA, DATA_FORMATS, DataSection

IGNORE_INDEX = -100
CHAT_FORMATS = ("alpaca", "chat", "sharegpt")
FORMAT_KEYS = {   # what each format reads, for error messages
    "alpaca": "instruction, input (optional), output",
    "chat": "messages",
    "sharegpt": "conversations",
    "prompt_completion": "prompt, completion",
    "text": "text",
}
SampleKind = Literal["sft", "paired", "unpaired", "prompts"]
SAMPLE_UNITS: dict[str, str] = {"sft": "samples", "paired": "pairs", "unpaired": "examples", "prompts": "prompts"}
"""What the data report calls one sample of each kind."""
FILE_FORMS = (f".jsonl, .json or .csv file, a directory saved with datasets' save_to_disk, "
              f"hf:NAME[:SPLIT] or {BUILTIN_DATA!r}")


@dataclass
class Example:
    input_ids: list[int]
    """Token ids of the whole sample."""
    labels: list[int]
    """Same length as input_ids; IGNORE_INDEX where the token is not trained (unshifted)."""
    source: str
    """Where the sample came from, "path:line" (or "path:record N", 0-based), for messages."""
    prompt_ids: list[int] | None = None
    """The prompt up to where the (last) answer starts, for generation-based evaluation."""
    reference: str | None = None
    """The expected answer text (last assistant turn or completion)."""

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class PackedRow:
    input_ids: list[int]
    """Several samples' tokens back to back."""
    labels: list[int]
    """Their labels, with each sample's first label set to IGNORE_INDEX."""
    position_ids: list[int]
    """Restarting at 0 for every sample: how the model tells the samples apart."""
    sources: list[str] = field(default_factory=list)
    """The sources of the packed samples, in order."""


@dataclass
class DataReport:
    read: int = 0
    """Records read from all train and eval sources."""
    used_train: int = 0
    """Training samples kept."""
    used_eval: int = 0
    """Evaluation samples kept."""
    truncated: int = 0
    """Samples (train and eval) cut to max_seq_len (preference data: a completion cut)."""
    dropped_no_target: int = 0
    """Samples dropped because no token was left to train on (prompts: no room left to sample one)."""
    formats: dict[str, int] = field(default_factory=dict)
    """{format: samples converted in it}."""
    train_tokens: int = 0
    """Tokens in the kept training samples."""
    trained_tokens: int = 0
    """Of those, tokens with a label (the loss is taken over these)."""
    dropped_by_truncation: int = 0
    """Of dropped_no_target, those that had trained tokens before truncation."""
    not_used: int = 0
    """Training records left out by max_samples."""
    eval_from: str = "none"
    """Where the evaluation data came from."""
    max_seq_len: int = 0
    """The truncation length applied."""
    splits: dict[str, SplitCount] = field(default_factory=dict)
    """{"train" / "eval": what became of that split's records}."""
    per_turn: int = 0
    """Conversations (train and eval) rendered as several samples, their turns apart (chat.py)."""
    per_turn_samples: int = 0
    """The samples those conversations gave."""

    kind: SampleKind = "sft"
    """What a sample is: sft (a token sequence), paired (a prompt with a chosen and a rejected
    completion), unpaired (a prompt with one completion labelled desirable or not) or prompts (to
    sample completions of); the objectives' data (preference_data.py) reports in these terms."""
    desirable: int = 0
    """unpaired: the training samples labelled desirable (the rest are undesirable)."""

    def lines(self) -> list[str]:
        """A human-readable summary, one fact per line; the first line's counts add up to `read`."""
        formats = ", ".join(f"{name} {count}" for name, count in sorted(self.formats.items())) or "none"
        share = 100 * self.trained_tokens / self.train_tokens if self.train_tokens else 0.0
        left_out = f"; {self.not_used} left out by data.max_samples" if self.not_used else ""
        unit = SAMPLE_UNITS[self.kind]
        if self.kind == "sft":
            train = (f"train: {self.used_train} samples, {self.train_tokens} tokens, {self.trained_tokens} trained "
                     f"({share:.1f}%)")
        elif self.kind == "prompts":
            train = f"train: {self.used_train} prompts, {self.train_tokens} tokens"
        else:   # a pair's tokens are its two sequences, the prompt in each, as the model reads them
            labels = (f" ({self.desirable} desirable, {self.used_train - self.desirable} undesirable)"
                      if self.kind == "unpaired" else "")
            train = (f"train: {self.used_train} {unit}{labels}, {self.train_tokens} tokens, {self.trained_tokens} "
                     f"of them in the completions ({share:.1f}%)")
        out = [
            f"data: read {self.read} records (formats: {formats}{left_out})",
            train,
            f"eval: {self.used_eval} {unit} ({self.eval_from})",
        ]
        if self.per_turn:
            out.append(f"per turn: {self.per_turn} conversations gave {self.per_turn_samples} samples, since the chat "
                       f"template renders earlier turns differently (e.g. without their reasoning): each assistant "
                       f"turn is trained once, after the prompt it is answered from")
        if self.truncated:
            what = "cut" if self.kind == "sft" else "with a completion cut"
            out.append(f"truncated: {self.truncated} {unit} {what} to max_seq_len={self.max_seq_len}")
        if self.dropped_no_target and self.kind == "sft":
            before = self.dropped_no_target - self.dropped_by_truncation
            out.append(f"dropped: {self.dropped_no_target} samples with no trained token "
                       f"({self.dropped_by_truncation} lost theirs to truncation, {before} had none, "
                       f"e.g. no assistant turn)")
        elif self.dropped_no_target and self.kind == "prompts":
            out.append(f"dropped: {self.dropped_no_target} prompts of max_seq_len={self.max_seq_len} tokens or more, "
                       f"leaving no room for a completion")
        elif self.dropped_no_target:
            out.append(f"dropped: {self.dropped_no_target} {unit} with no completion token left after truncation "
                       f"to max_seq_len={self.max_seq_len}")
        return out


@dataclass
class SplitCount:
    """What became of one split's records once converted (a record is kept when one of its
    samples is)."""
    records: int
    """Converted (after the split and data.max_samples)."""
    kept: int
    """Kept as samples; the rest were dropped with no trained token."""
    dropped_by_truncation: int
    """Of the dropped, those that had trained tokens before truncation."""

    def dropped_line(self, what: str, max_seq_len: int) -> str | None:
        """Why fewer samples than records, or None when none were dropped."""
        dropped = self.records - self.kept
        if not dropped:
            return None
        cut = self.dropped_by_truncation
        return (f"{dropped} of {self.records} {what} records dropped with no trained token ({cut} lost theirs to "
                f"truncation at data.max_seq_len={max_seq_len}, {dropped - cut} had none)")


# ----------------------------------------------------------------------------------------- loading

def load_records(spec: str | list[str], columns: dict[str, str], split: str = "train") -> list[tuple[dict, str]]:
    """Read every record of one or more sources (concatenated) as (record, "where"), with
    `columns` renames applied. `split` picks the built-in dataset's file ("train" or "eval") and
    the default split of "hf:NAME"."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    records: list[tuple[dict, str]] = []
    for one in specs:
        for record, source in _read_source(str(one), split):
            records.append((_rename(record, columns, source), source))
    return records


def _read_source(spec: str, split: str) -> list[tuple[dict, str]]:
    if spec == BUILTIN_DATA:
        return _read_jsonl(Path(builtin_data_files()["eval" if split == "eval" else "train"]))
    if spec.startswith("hf:"):
        return _read_hub(spec, split)
    path = Path(spec)
    if path.is_dir():
        return _read_saved_dataset(path)
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: data file not found; give a {FILE_FORMS}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    raise DataError(f"{spec}: unsupported data file type {suffix or '(no extension)'!r}; give a {FILE_FORMS}")


def _read_jsonl(path: Path) -> list[tuple[dict, str]]:
    out = []
    for lineno, line in enumerate(io.StringIO(read_text(path, DataError), newline=None), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        out.append((_object(record, where), where))
    return out


def _read_json(path: Path) -> list[tuple[dict, str]]:
    try:
        data = json.loads(read_text(path, DataError))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records or {{\"data\": [...]}}, got "
                        f"{type(data).__name__}; for one record per line use a .jsonl file")
    return [(_object(record, f"{path}:record {i}"), f"{path}:record {i}") for i, record in enumerate(data)]


def _read_csv(path: Path) -> list[tuple[dict, str]]:
    out = []
    reader = csv.DictReader(io.StringIO(read_text(path, DataError), newline=""))
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:   # DictReader files surplus fields under the key None
            raise DataError(f"{where}: {len(reader.fieldnames or []) + len(row[None])} fields but the header "
                            f"has {len(reader.fieldnames or [])}")
        # a short row leaves None values: treat them as absent so "missing field" errors fire
        out.append(({k: v for k, v in row.items() if v is not None}, where))
    return out


def _datasets_module() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("reading a Hugging Face dataset needs the `datasets` package: pip install datasets") from None
    return datasets


def _read_hub(spec: str, split: str) -> list[tuple[dict, str]]:
    name, _, chosen = spec[len("hf:"):].partition(":")
    if not name:
        raise DataError(f"{spec}: give a dataset name, hf:NAME[:SPLIT]")
    if not chosen:
        if split != "train":
            raise DataError(f"{spec}: name the split to evaluate on, e.g. hf:{name}:test")
        chosen = "train"
    ds = _datasets_module().load_dataset(name, split=chosen)
    return [(dict(row), f"{spec}:record {i}") for i, row in enumerate(ds)]


def _read_saved_dataset(path: Path) -> list[tuple[dict, str]]:
    datasets = _datasets_module()
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: a directory but not one saved with datasets' save_to_disk; give a "
                                f"{FILE_FORMS}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); "
                            f"give the split's directory {path}/SPLIT")
        ds = ds["train"]
    return [(dict(row), f"{path}:record {i}") for i, row in enumerate(ds)]


def _object(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _rename(record: dict, columns: dict[str, str], source: str) -> dict:
    if not columns:
        return record
    out = {}
    for key, value in record.items():
        new = columns.get(key, key)
        if new != key and new in record and new not in columns:
            raise DataError(f"{source}: data.columns renames {key!r} to {new!r}, but the record already has "
                            f"{new!r}; drop one of them or rename {new!r} too")
        out[new] = value
    return out


# ------------------------------------------------------------------------------------- conversion

def detect_format(record: dict, source: str) -> str:
    """The format a record's keys say it is in (first match in the order below)."""
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    known = "; ".join(f"{name} ({keys})" for name, keys in FORMAT_KEYS.items())
    raise DataError(f"{source}: cannot tell the data format from the record keys ({', '.join(map(str, record))}); "
                    f"known formats: {known}. Rename columns with data.columns or set data.format")


def to_examples(record: dict, source: str, fmt: str, tokenizer: Any, cfg: DataSection) -> list[Example]:
    """One record as token ids with labels (not truncated: `build_datasets` does that, counting):
    one sample, or for a conversation whose template renders earlier turns differently, one per
    run of assistant turns it renders alike (chat.py). `fmt` "auto" defers to `cfg.format`, then
    to the record's keys."""
    if fmt == "auto":
        fmt = cfg.format if cfg.format != "auto" else detect_format(record, source)
    if fmt not in DATA_FORMATS:
        raise DataError(f"{source}: unknown data format {fmt!r}; data.format is one of {', '.join(DATA_FORMATS)}")
    if fmt == "text":
        ids = encode(tokenizer, string_field(record, "text", fmt, source), True) + [eos_id(tokenizer, source)]
        return [Example(ids, list(ids), source)]
    if fmt == "prompt_completion":
        prompt = encode(tokenizer, string_field(record, "prompt", fmt, source), True)
        completion_text = string_field(record, "completion", fmt, source)
        completion = encode(tokenizer, completion_text, False) + [eos_id(tokenizer, source)]
        ids = prompt + completion
        labels = list(ids) if cfg.train_on_inputs else [IGNORE_INDEX] * len(prompt) + completion
        return [Example(ids, labels, source, prompt_ids=prompt, reference=completion_text)]
    conversation = read_conversation(record, fmt, source, cfg.system_prompt)
    return [_chat_example(chat, tokenizer) for chat in chat_texts(conversation, source, tokenizer, cfg.chat_template,
                                                                   cfg.train_on_inputs)]


def encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """The token ids of `text`, with the tokenizer's BOS etc. when `add_special_tokens` (plain text
    prompts; a rendered chat template writes its own)."""
    # verbose=False: no "Token indices sequence length is longer than ..." from transformers; the
    # samples are truncated to data.max_seq_len and counted in the data report instead
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def eos_id(tokenizer: Any, source: str) -> int:
    """The EOS id plain-text completions end with, so the model learns to stop."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"{source}: the tokenizer has no EOS token, which plain-text completions end with "
                        f"(prompt_completion and text formats, string completions of preference data); use chat "
                        f"messages or a tokenizer with eos_token set")
    return tokenizer.eos_token_id


def _chat_example(chat: ChatText, tokenizer: Any) -> Example:
    """A token is trained when its first character lies in a trained span."""
    try:
        enc = tokenizer(chat.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)   # see encode
    except NotImplementedError:
        raise DataError("chat-like data needs a fast tokenizer (offsets map turns to tokens); load the model's "
                        "tokenizer with use_fast=True") from None
    ids = list(enc["input_ids"])
    trained = bytearray(len(chat.text) + 1)   # 1 per character inside a trained span
    for start, end in chat.spans:
        trained[start:end] = b"\x01" * (end - start)
    labels = [t if trained[start] else IGNORE_INDEX for t, (start, _) in zip(ids, enc["offset_mapping"], strict=True)]
    prompt_ids = encode(tokenizer, chat.prompt, False) if chat.prompt is not None else None
    return Example(ids, labels, chat.source, prompt_ids=prompt_ids, reference=chat.reference)


# ------------------------------------------------------------------------------------ the datasets

Record = tuple[dict, str]
"""A record as read, with where it came from ("path:line")."""


def is_builtin(spec: str | list[str] | None) -> bool:
    """Whether `spec` is the built-in dataset alone (so its own eval split applies)."""
    return spec == BUILTIN_DATA or (isinstance(spec, list) and spec == [BUILTIN_DATA])


def build_datasets(cfg: DataSection, tokenizer: Any, seed: int) -> tuple[list[Example], list[Example], DataReport]:
    """(train, eval, report): records read, split, capped (`split_records`), converted, truncated
    and counted."""
    report = DataReport(max_seq_len=cfg.max_seq_len)
    train_records, eval_records = split_records(cfg, seed, report)

    train = _convert(train_records, tokenizer, cfg, report, "train")
    evals = _convert(eval_records, tokenizer, cfg, report, "eval")
    if not train:
        raise DataError(_empty_message("training", cfg.train, len(train_records), report))
    if eval_records and not evals:
        raise DataError(_empty_message("evaluation", cfg.eval or cfg.train, len(eval_records), report))
    report.used_train, report.used_eval = len(train), len(evals)
    report.train_tokens = sum(len(e.input_ids) for e in train)
    report.trained_tokens = sum(e.num_trained for e in train)
    return train, evals, report


def split_records(cfg: DataSection, seed: int, report: DataReport,
                  builtin: Callable[[list[Record]], list[Record]] | None = None) -> tuple[list[Record], list[Record]]:
    """(train, eval) records, with `report.read`, `eval_from` and `not_used` filled in; shared by
    every objective's data, so they all split alike.

    Evaluation data is `cfg.eval` if set, else the built-in eval file for the built-in data, else
    `cfg.eval_fraction` of the training records after a shuffle seeded with `seed` (the same seed
    gives the same split). `cfg.max_samples` caps the training records after that shuffle. Only
    when splitting or capping are the records reordered; otherwise they keep their file order.
    `builtin`, when given, replaces the built-in dataset's records (each split's file, in file
    order) before any of that: how the preference objectives derive theirs from its chat tasks.
    """
    def load(spec: str | list[str], split: str) -> list[Record]:
        records = load_records(spec, cfg.columns, split)
        return builtin(records) if builtin is not None and is_builtin(spec) else records

    train_records = load(cfg.train, "train")
    eval_records: list[Record] = []
    if cfg.eval is not None:
        eval_records = load(cfg.eval, "eval")
        report.eval_from = "data.eval"
    elif is_builtin(cfg.train):
        eval_records = load(BUILTIN_DATA, "eval")
        report.eval_from = "the built-in eval split"
    report.read = len(train_records) + len(eval_records)
    if not train_records:
        raise DataError(f"no training records in {cfg.train}: the data is empty")
    if cfg.eval is not None and not eval_records:
        raise DataError(f"no evaluation records in {cfg.eval}: the data is empty")

    hold_out = cfg.eval is None and not is_builtin(cfg.train) and cfg.eval_fraction > 0
    if hold_out or cfg.max_samples is not None:
        random.Random(seed).shuffle(train_records)
    if hold_out:
        n_eval = max(1, round(cfg.eval_fraction * len(train_records)))
        if n_eval >= len(train_records):
            raise DataError(f"data.eval_fraction={cfg.eval_fraction} of {len(train_records)} records leaves no "
                            f"training data; lower it or give data.eval")
        eval_records, train_records = train_records[:n_eval], train_records[n_eval:]
        report.eval_from = f"eval_fraction={cfg.eval_fraction} of the training records, seed {seed}"
    if cfg.max_samples is not None and len(train_records) > cfg.max_samples:
        report.not_used = len(train_records) - cfg.max_samples
        train_records = train_records[:cfg.max_samples]
    return train_records, eval_records


def _convert(records: list[tuple[dict, str]], tokenizer: Any, cfg: DataSection, report: DataReport,
             split: str) -> list[Example]:
    formats: Counter[str] = Counter(report.formats)
    kept_records = cut_records = 0
    out = []
    for record, source in records:
        fmt = detect_format(record, source) if cfg.format == "auto" else cfg.format
        formats[fmt] += 1
        examples = to_examples(record, source, fmt, tokenizer, cfg)
        if len(examples) > 1:
            report.per_turn += 1
            report.per_turn_samples += len(examples)
        kept = cut = 0
        for example in examples:
            had_target = example.num_trained > 0
            if len(example.input_ids) > cfg.max_seq_len:
                example.input_ids = example.input_ids[:cfg.max_seq_len]
                example.labels = example.labels[:cfg.max_seq_len]
                report.truncated += 1
            if example.num_trained == 0:
                report.dropped_no_target += 1
                report.dropped_by_truncation += had_target
                cut += had_target
                continue
            out.append(example)
            kept += 1
        kept_records += kept > 0
        cut_records += kept == 0 and cut > 0
    report.formats = dict(formats)
    report.splits[split] = SplitCount(len(records), kept_records, cut_records)
    return out


def _empty_message(what: str, spec: str | list[str], n: int, report: DataReport) -> str:
    return (f"no {what} samples left from {spec}: {n} records converted, all dropped with no trained token "
            f"({report.dropped_by_truncation} lost them to truncation at data.max_seq_len={report.max_seq_len}, "
            f"the rest had none, e.g. a conversation without an assistant turn); raise data.max_seq_len, "
            f"check the data, or set data.train_on_inputs: true")


# ------------------------------------------------------------------------------ packing, batching

def pack(examples: list[Example], max_seq_len: int) -> list[PackedRow]:
    """Pack samples into rows of at most `max_seq_len` tokens, best fit (each sample goes to the
    open row it fills most tightly; deterministic for a given input order).

    Positions restart at 0 for every sample, and `collate` gives packed rows no attention mask,
    so transformers builds a block-diagonal causal mask from the position ids: no token attends
    across a sample boundary. That detection only runs without a KV cache: call the model with
    `use_cache=False` (as training does).
    """
    rows: list[list[Example]] = []
    free: list[tuple[int, int]] = []   # (room left, row index), sorted
    for example in examples:
        n = len(example.input_ids)
        if n > max_seq_len:
            raise DataError(f"{example.source}: {n} tokens, longer than max_seq_len={max_seq_len}; truncate "
                            f"before packing (build_datasets does)")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, index = free.pop(at)
        else:
            room, index = max_seq_len, len(rows)
            rows.append([])
        rows[index].append(example)
        if room - n > 0:
            bisect.insort(free, (room - n, index))
    packed = []
    for members in rows:
        row = PackedRow([], [], [], [])
        for example in members:
            row.input_ids += example.input_ids
            row.labels += [IGNORE_INDEX] + example.labels[1:]
            row.position_ids += range(len(example.input_ids))
            row.sources.append(example.source)
        packed.append(row)
    return packed


def collate(rows: list[Example] | list[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest into tensors.

    Unpacked: input_ids, labels, attention_mask. Packed: input_ids, labels, position_ids and no
    attention mask (the position ids carry the sample boundaries); padding gets positions
    0, 1, ... of its own, so it forms one more "sample" that nothing real attends to.
    """
    if not rows:
        raise DataError("collate got no rows")
    packed = isinstance(rows[0], PackedRow)
    if any(isinstance(row, PackedRow) != packed for row in rows):
        raise DataError("collate got a mix of packed and unpacked rows")
    width = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)          # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)       # (B, T)
    extra = torch.zeros((len(rows), width), dtype=torch.long)                      # (B, T) mask or positions
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[b, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(row.labels, dtype=torch.long)
        if packed:
            extra[b, :n] = torch.tensor(row.position_ids, dtype=torch.long)
            extra[b, n:] = torch.arange(width - n)
        else:
            extra[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}


class RowStream:
    """Rows in the order of seeded per-epoch permutations, from a resumable (epoch, position).

    The order is a pure function of (seed, epoch), so (epoch, position) is all the data state a
    checkpoint needs: a resumed run takes exactly the rows the interrupted run would have taken.
    """

    def __init__(self, n_rows: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.n, self.seed, self.epoch, self.position = n_rows, seed, epoch, position
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000003 + epoch)).tolist()

    def take(self, count: int) -> list[int]:
        """The indices of the next `count` rows, running on into the next epoch's order."""
        out = []
        while len(out) < count:
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            k = min(count - len(out), self.n - self.position)
            out.extend(self._order[self.position:self.position + k])
            self.position += k
        return out

    @property
    def epochs_done(self) -> float:
        """Epochs trained so far, fractional (the metrics' `epoch` column)."""
        return self.epoch + self.position / max(self.n, 1)
