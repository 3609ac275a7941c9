"""`lorakit eval`: a trained run (or given adapters) scored on the config's evaluation data or a
data file (the metrics are `lorakit.train.evaluate.evaluate`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoraError
from ..train.config import load_config
from ..train.data import SplitCount, build_datasets
from ..train.evaluate import EvalResult, evaluate
from ..train.preference_data import build_objective_data
from .generate import load_for_inference


@dataclass
class EvalRun:
    """The scores, and what became of the records scored: a sample with no trained token left
    after truncation has no loss, so it is not among `result.n_examples`, and the user is told."""
    result: EvalResult
    records: SplitCount
    max_seq_len: int

    def dropped_line(self) -> str | None:
        return self.records.dropped_line("evaluation", self.max_seq_len)


def run_eval(config: str | None, overrides: list[str], data: str | None = None, model: str | None = None,
             adapters: list[str] | None = None, batch_size: int = 8,
             attn_implementation: str | None = None) -> EvalRun:
    """`lorakit eval`: the config's model with its trained adapter (output.dir) or the given ones,
    on the config's evaluation data or on `data`; `model` and `attn_implementation` replace the
    config's `model.name_or_path` and `model.attn_implementation`."""
    cfg = load_config(config, overrides)
    if adapters is None and (Path(cfg.output.dir) / "adapter_config.json").is_file():
        adapters = [cfg.output.dir]
    net, tokenizer = load_for_inference(model or cfg.model.name_or_path, adapters or [], cfg.model.dtype,
                                        cfg.model.device, attn_implementation or cfg.model.attn_implementation)
    if cfg.training.objective != "sft":   # its records' reference completions (chosen, desirable, answer)
        section = cfg.data if data is None else dataclasses.replace(cfg.data, train=data, eval=data, max_samples=None)
        built = build_objective_data(section, tokenizer, cfg.training.seed, cfg.training.objective)
        examples, records = built.eval_sft, built.report.splits["eval"]
    elif data is not None:
        section = dataclasses.replace(cfg.data, train=data, eval=None, eval_fraction=0.0, max_samples=None)
        examples, _, report = build_datasets(section, tokenizer, cfg.training.seed)
        records = report.splits["train"]
    else:
        _, examples, report = build_datasets(cfg.data, tokenizer, cfg.training.seed)
        records = report.splits["eval"]
    if not examples:
        raise LoraError("no evaluation data: set data.eval or data.eval_fraction in the config, or pass --data FILE")
    return EvalRun(evaluate(net, tokenizer, examples, batch_size, net.device), records, cfg.data.max_seq_len)
