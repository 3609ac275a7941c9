"""`lorakit preview-data`: show what the model will be trained on, before spending compute.

A few training samples are printed as the model sees them (template, special tokens and all) with
the trained tokens wrapped in [[ ]], followed by the data report. For the other objectives the
samples are theirs (preference_data.py): a pair's prompt, then its chosen and rejected completions;
a kto example's prompt, label and completion; a grpo prompt and the fields its rewards read. Plain
text on purpose: it has to read the same in a terminal, a log file and a CI page.
"""

from __future__ import annotations

import json
from typing import Any

from .config import TrainConfig
from .data import IGNORE_INDEX, Example, build_datasets, pack
from .preference_data import PairExample, PromptExample, UnpairedExample, build_objective_data

OPEN, CLOSE = "[[", "]]"


def preview_data(cfg: TrainConfig, tokenizer: Any, n: int = 3) -> str:
    """The first `n` training samples with the trained span marked, then the data report."""
    if cfg.training.objective != "sft":
        return _preview_objective(cfg, tokenizer, n)
    train, _, report = build_datasets(cfg.data, tokenizer, cfg.training.seed)
    out = [f"{OPEN}...{CLOSE} marks trained tokens (the loss is taken on them); the rest is context only.", ""]
    for i, example in enumerate(train[:n]):
        out.append(f"--- sample {i + 1} of {len(train)}: {example.source} "
                   f"({len(example.input_ids)} tokens, {example.num_trained} trained)")
        out.append(render_example(example, tokenizer))
        out.append("")
    out += report.lines()
    if cfg.data.packing:
        rows = pack(train, cfg.data.max_seq_len)
        fill = report.train_tokens / (len(rows) * cfg.data.max_seq_len)
        out.append(f"packing: {len(train)} samples into {len(rows)} rows of at most {cfg.data.max_seq_len} tokens "
                   f"({100 * fill:.1f}% filled)")
    return "\n".join(out)


def _preview_objective(cfg: TrainConfig, tokenizer: Any, n: int) -> str:
    data = build_objective_data(cfg.data, tokenizer, cfg.training.seed, cfg.training.objective)
    if data.report.kind == "prompts":
        out = ["Prompts as the model reads them; training samples completions from each and scores them with the "
               "reward functions, which also get the fields shown.", ""]
    else:
        out = [f"{OPEN}...{CLOSE} marks the completion tokens (the loss is taken on them); the prompt is context "
               f"only.", ""]
    total = len(data.train)
    for i, example in enumerate(data.train[:n]):
        prompt = _decode_span(tokenizer, example.prompt_ids, 0, len(example.prompt_ids))
        if isinstance(example, PairExample):
            out += [f"--- pair {i + 1} of {total}: {example.source} ({len(example.prompt_ids)} prompt tokens; "
                    f"chosen {len(example.chosen_ids)}, rejected {len(example.rejected_ids)} completion tokens)",
                    "prompt:", prompt,
                    "chosen:", _completion(example.prompt_ids, example.chosen_ids, tokenizer),
                    "rejected:", _completion(example.prompt_ids, example.rejected_ids, tokenizer)]
        elif isinstance(example, UnpairedExample):
            label = "true: desirable" if example.label else "false: undesirable"
            out += [f"--- example {i + 1} of {total}: {example.source} (label {label}; {len(example.prompt_ids)} "
                    f"prompt tokens, {len(example.completion_ids)} completion tokens)",
                    "prompt:", prompt,
                    "completion:", _completion(example.prompt_ids, example.completion_ids, tokenizer)]
        elif isinstance(example, PromptExample):
            out += [f"--- prompt {i + 1} of {total}: {example.source} ({len(example.prompt_ids)} tokens)", prompt]
            out += [f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in example.extras.items()]
        out.append("")
    return "\n".join(out + data.report.lines())


def _completion(prompt_ids: list[int], completion_ids: list[int], tokenizer: Any) -> str:
    """The completion as it reads after its prompt, its (all trained) tokens marked."""
    ids = prompt_ids + completion_ids
    return render_example(Example(ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids, ""), tokenizer,
                          from_token=len(prompt_ids))


def render_example(example: Example, tokenizer: Any, from_token: int = 0) -> str:
    """The sample's text from token `from_token` on, each run of trained tokens wrapped in [[ ]]."""
    ids, trained = example.input_ids, [label != IGNORE_INDEX for label in example.labels]
    pieces, start = [], from_token
    while start < len(ids):
        end = start
        while end < len(ids) and trained[end] == trained[start]:
            end += 1
        text = _decode_span(tokenizer, ids, start, end)
        pieces.append(f"{OPEN}{text}{CLOSE}" if trained[start] else text)
        start = end
    return "".join(pieces)


def _decode_span(tokenizer: Any, ids: list[int], start: int, end: int) -> str:
    # Decoding a run on its own can lose a leading space (SentencePiece) or split a character's
    # bytes; the difference of two prefix decodings keeps the text exactly as in the whole.
    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    head, whole = decode(ids[:start]), decode(ids[:end])
    return whole[len(head):] if whole.startswith(head) else decode(ids[start:end])
