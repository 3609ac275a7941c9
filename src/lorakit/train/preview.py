"""`lorakit preview-data`: show what the model will be trained on, before spending compute.

A few training samples are printed as the model sees them (template, special tokens and all) with
the trained tokens wrapped in [[ ]], followed by the data report. Plain text on purpose: it has to
read the same in a terminal, a log file and a CI page.
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig
from .data import IGNORE_INDEX, Example, build_datasets, pack

OPEN, CLOSE = "[[", "]]"


def preview_data(cfg: TrainConfig, tokenizer: Any, n: int = 3) -> str:
    """The first `n` training samples with the trained span marked, then the data report."""
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


def render_example(example: Example, tokenizer: Any) -> str:
    """The sample's text with each run of trained tokens wrapped in [[ ]]."""
    ids, trained = example.input_ids, [label != IGNORE_INDEX for label in example.labels]
    pieces, start = [], 0
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
