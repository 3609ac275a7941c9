"""Preference and RL objectives: one lorakit DPO step and one GRPO step against TRL + PEFT, side by side.

On bench_step's model (a Llama from a config: hidden 512, intermediate 1376, 6 layers, 8 heads,
vocab 8000, seeded random weights, fp32, CPU) with r=16, alpha=32 adapters on every linear layer
but the head, and AdamW (lr 1e-5) over the adapters on every side:

DPO: 4 pairs of random token ids, each a 64-token prompt and two 192-token completions (191
random ids and EOS), so 8 rows x 256 tokens, nothing padded or truncated. One optimizer step is
the policy's forward of the 8 rows, the reference's no-grad forward of the same rows (the base
with the adapter off), the sigmoid DPO loss (beta 0.1), backward, AdamW's step and zero_grad.

  - lorakit: `lorakit.train.preference.Paired("dpo", ...)`, the objective `lorakit train` builds,
    driven as its loop drives it: `loss(model, batch) / count(batch)`, backward, step. Log-probs
    from the head's input a chunk of rows at a time, completion positions only.
  - TRL: `trl.DPOTrainer` given the base model and a `peft.LoraConfig` (so TRL calls
    `peft.get_peft_model` itself), `ref_model=None`, `precompute_ref_log_probs=False`: its reference
    is the PEFT model with the adapter disabled. `max_length=None` (no truncation),
    `gradient_checkpointing=False` and `bf16=False` (TRL's defaults are True: the same fp32
    work as lorakit). The batch comes from TRL's own collator; a step is
    `trainer.training_step(model, batch)` + `optimizer.step()` + `zero_grad()`. What
    `Trainer.train()` adds around it (gradient clipping, the LR schedule, logging, callbacks) is
    left out, as it is on lorakit's side; of its setup, `current_gradient_accumulation_steps = 1`
    and (checkpointing cases) its `activation_checkpointing_enable` call are made here. TRL 1.x computes
    the log-probs with a fused LM head of its own (`add_fused_lm_head`): no full logits either, but
    on CPU one (4096 x 32768)-bounded tile, here all 2040 positions x the whole vocabulary at once.
  - PEFT, full logits (context: how TRL computed DPO before its fused head; written here): the
    logits of all 8 rows, log_softmax, gather, masked sums, the same loss.

  With activation checkpointing (TRL's default), lorakit and TRL again (skipped with --quick
  or --no-gc).

GRPO: 2 prompts of 64 random ids, group size 4, at most 64 new tokens, temperature 1.0, top_p 1,
a constant reward, beta 0.04 (the KL term's reference forward, the adapter off), loss "dapo",
advantages scaled by the group's std, one optimisation per generation. A step is sampling the 8
completions with `generate` (KV cache on), scoring, the reference and policy forwards, backward,
AdamW's step.

  - lorakit: `lorakit.train.grpo.GRPO`: `batches()` samples (greedy search + a Gumbel-max logits
    processor with one seeded stream per row), then `loss(model, batch) / count(batch)`.
  - TRL: `trl.GRPOTrainer` with the base model and a `peft.LoraConfig`, no vLLM (transformers'
    `generate`, `do_sample=True`, top_k 0, top_p 1), `beta=0.04` (TRL's default 0 would skip the
    reference), `per_device_train_batch_size=8`, `num_generations=4`, one batch of its own
    dataloader; a step is `trainer.training_step(model, inputs)` (which generates) + AdamW's step.
  - plain `model.generate(do_sample=True)` on lorakit's model (same prompts, lengths, eos, no
    gradients, eval mode): what the per-row seeded sampler costs over transformers' own sampling.

  Generation is timed by wrapping each model's `generate` (the call both sides make); "rest" is
  the step minus it. Tokens generated: every sampled row's tokens up to and including its first
  EOS (a random model rarely samples EOS, so nearly 8 x 64).

Time: the cases run interleaved, one step each per round in a rotating order, after warmup rounds;
medians of the timed rounds, and ratios of medians (the figures to read on a shared machine).
Memory: `lorakit.train.memory.PeakMemory` (the most bytes torch tensors held at once, counting from
the start the model, the adapters, their gradients, AdamW's state and the batch: "held") over one
more step of each case after the timed rounds; "step" is peak - held (activations, log-probs,
transients). The same count `lorakit train` reports and bench_train_memory uses.

Checks: the inputs TRL tokenized equal lorakit's ids; at step 0 (B = 0, so policy = reference)
every DPO case's loss is log 2 and the mean summed log-prob of the chosen completions agrees
(TRL: its logged `logps/chosen`).

    .venv/bin/python bench/bench_preference.py              # the full run (~5 minutes on 2 cores)
    .venv/bin/python bench/bench_preference.py --quick      # 1 warmup + 3 rounds, no checkpointing, 16 new tokens
    .venv/bin/python bench/bench_preference.py --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_step import ALPHA, MB, MODEL_CONFIG, RANK, build_base, cpu_model
from torch import Tensor, nn

PAIRS, PROMPT_LEN, COMPLETION_LEN = 4, 64, 192    # DPO: 8 rows x 256 tokens
GRPO_PROMPTS, GROUP, GRPO_PROMPT_LEN, MAX_NEW = 2, 4, 64, 64
BETA_DPO, BETA_GRPO = 0.1, 0.04
LR = 1e-5
SPECIAL = ("<unk>", "<s>", "</s>")               # ids 0, 1, 2: LlamaConfig's bos 1 and eos 2
PAD, EOS = 0, 2
TARGET_PEAK, TARGET_TIME = 0.5, 1.0              # issue #16: lorakit DPO vs TRL + PEFT


# -- data ---------------------------------------------------------------------------------------


def build_tokenizer():
    """One word per id ("t3" ... "t7999"), split on whitespace: a text of those words tokenizes to
    exactly their ids, so TRL (which reads text) and lorakit (given ids) see the same tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL), MODEL_CONFIG["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def random_ids(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(len(SPECIAL), MODEL_CONFIG["vocab_size"], (n,), generator=g).tolist()


def as_text(ids: list[int]) -> str:
    return " ".join(SPECIAL[i] if i < len(SPECIAL) else f"t{i}" for i in ids)


def make_pairs() -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids; each completion ends with EOS."""
    g = torch.Generator().manual_seed(1)
    return [(random_ids(PROMPT_LEN, g), random_ids(COMPLETION_LEN - 1, g) + [EOS],
             random_ids(COMPLETION_LEN - 1, g) + [EOS]) for _ in range(PAIRS)]


def make_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return [random_ids(GRPO_PROMPT_LEN, g) for _ in range(GRPO_PROMPTS)]


def constant_reward(completions: list, **fields: Any) -> list[float]:
    """The GRPO reward of both sides (TRL's signature, which lorakit reads too)."""
    return [1.0] * len(completions)


# -- the cases ----------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    step: Callable[[], float]               # one optimizer step; returns the loss
    holders: tuple                          # what holds tensors across steps (model, optimizer, batch)
    times: list[float] = field(default_factory=list)
    loss0: float = float("nan")
    logp0: float = float("nan")             # DPO: mean summed log-prob of the chosen completions at step 0
    peak: int = 0
    held: int = 0
    timer: GenerateTimer | None = None      # GRPO: the generate calls of each timed step
    gen_times: list[float] = field(default_factory=list)
    gen_tokens: list[int] = field(default_factory=list)
    trainer: Any = None                     # TRL's trainer (DPO: its logged step-0 log-probs)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_config():
    import peft

    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear")


def add_lorakit_adapter(model: nn.Module) -> None:
    import lorakit as lk

    lk.add_adapter(model, lk.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))


def lorakit_checkpointing(model: nn.Module) -> None:
    """As `lorakit train` enables it (training.gradient_checkpointing): non-reentrant, no offload."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}, offload=False)


def lorakit_dpo(pairs: list, gc: bool) -> Case:
    from lorakit.train.config import PreferenceSection
    from lorakit.train.data import RowStream
    from lorakit.train.distributed import Dist
    from lorakit.train.logprobs import sequence_logprobs
    from lorakit.train.preference import Paired
    from lorakit.train.preference_data import PairExample

    model = build_base()
    add_lorakit_adapter(model)
    if gc:
        lorakit_checkpointing(model)
    assert model.is_activation_checkpointing == gc
    examples = [PairExample(p, c, r, f"bench:{i}", as_text(c)) for i, (p, c, r) in enumerate(pairs)]
    objective = Paired("dpo", PreferenceSection(beta=BETA_DPO), examples, [], PAD, PAIRS, 1, True, model, None,
                       contextlib.nullcontext)
    batch = objective.batches(RowStream(len(examples), 0), Dist())[0]         # (2P, T): chosen rows, rejected rows
    opt = torch.optim.AdamW(trainable(model), lr=LR)

    def step() -> float:
        loss = objective.loss(model, batch) / objective.count(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        objective.take_metrics()                                               # as the loop does every step
        return loss.item()

    case = Case(f"lorakit{', checkpointing' if gc else ''}", step, (model, opt, *batch.values()))
    with torch.no_grad():
        case.logp0 = sequence_logprobs(model, batch, True)[0][:PAIRS].mean().item()
    return case


def trl_dpo(pairs: list, tokenizer, gc: bool) -> Case:
    import datasets
    from trl import DPOConfig, DPOTrainer

    records = [{"prompt": as_text(p), "chosen": " " + as_text(c), "rejected": " " + as_text(r)} for p, c, r in pairs]
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench_preference_"), per_device_train_batch_size=PAIRS,
                     max_length=None, beta=BETA_DPO, loss_type=["sigmoid"], precompute_ref_log_probs=False,
                     gradient_checkpointing=gc, bf16=False, use_cpu=True, learning_rate=LR, report_to="none",
                     save_strategy="no", dataloader_num_workers=0, seed=0)
    trainer = DPOTrainer(model=build_base(), ref_model=None, args=args, train_dataset=datasets.Dataset.from_list(records),
                         processing_class=tokenizer, peft_config=lora_config())
    got = {tuple(r["prompt_ids"] + r["chosen_ids"]) for r in trainer.train_dataset}
    assert got == {tuple(p + c) for p, c, _ in pairs}, "TRL tokenized the pairs into other ids than lorakit's"
    model = trainer.model
    assert "ref" not in model.peft_config, "TRL made a 'ref' adapter: its reference would not be the adapter off"
    if gc:   # Trainer.train() turns it on, not __init__; this bypasses train(), so make train()'s call here
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=args.activation_checkpointing_kwargs)
    assert model.get_base_model().is_activation_checkpointing == gc
    trainer.current_gradient_accumulation_steps = 1      # set by Trainer's train loop, which this bypasses
    batch = next(iter(trainer.get_train_dataloader()))   # input_ids, attention_mask, completion_mask: (2P, T)
    opt = torch.optim.AdamW(trainable(model), lr=LR)

    def step() -> float:
        loss = trainer.training_step(model, batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return Case(f"TRL DPOTrainer + PEFT{', checkpointing' if gc else ''}", step, (model, opt, *batch.values()),
                trainer=trainer)


def full_logits_dpo(pairs: list) -> Case:
    """DPO with PEFT from the full logits: the (2P, T-1, V) log_softmax, gathered at the labels."""
    import peft

    model = peft.get_peft_model(build_base(), lora_config())
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    ids = torch.tensor(rows)                                                  # (2P, T)
    mask = torch.ones_like(ids)
    scored = torch.zeros_like(ids, dtype=torch.bool)                          # (2P, T): completion tokens
    scored[:, PROMPT_LEN:] = True
    targets, scored = ids[:, 1:], scored[:, 1:]                               # (2P, T-1): position t predicts t+1
    opt = torch.optim.AdamW(trainable(model), lr=LR)

    def logps() -> Tensor:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]    # (2P, T-1, V)
        lp = logits.float().log_softmax(-1).gather(2, targets[..., None]).squeeze(2)   # (2P, T-1)
        return (lp * scored).sum(1)                                           # (2P,)

    def step() -> float:
        policy = logps()
        with torch.no_grad(), model.disable_adapter():
            ref = logps()
        margin = (policy[:PAIRS] - ref[:PAIRS]) - (policy[PAIRS:] - ref[PAIRS:])
        loss = -F.logsigmoid(BETA_DPO * margin).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    case = Case("PEFT, full-logits DPO (context)", step, (model, opt, ids, mask))
    with torch.no_grad():
        case.logp0 = logps()[:PAIRS].mean().item()
    return case


class GenerateTimer:
    """Wraps one model's `generate` (an instance attribute, so the class's is untouched): the wall time
    of each call and the tokens it sampled, up to and including each row's first EOS."""

    def __init__(self, model: nn.Module) -> None:
        self.inner = model.generate
        model.generate = self
        self.seconds, self.tokens = 0.0, 0
        self.prompts: list[list[int]] = []

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        width = kwargs["input_ids"].shape[1]
        self.prompts = kwargs["input_ids"].tolist()
        for row in out[:, width:].tolist():
            self.tokens += row.index(EOS) + 1 if EOS in row else len(row)
        return out

    def take(self) -> tuple[float, int]:
        out = self.seconds, self.tokens
        self.seconds, self.tokens = 0.0, 0
        return out


def grpo_base() -> nn.Module:
    """bench_step's model with the KV cache on for generation (its config turns it off for training)."""
    model = build_base()
    model.config.use_cache = True
    model.generation_config.use_cache = True
    return model


def lorakit_grpo(prompts: list[list[int]], tokenizer, max_new: int) -> tuple[Case, Case]:
    """(the step, the sampling alone: `batches()`, of which the generate call is timed)."""
    from lorakit.train.config import GrpoSection
    from lorakit.train.data import RowStream
    from lorakit.train.distributed import Dist
    from lorakit.train.grpo import GRPO, grpo_rewards
    from lorakit.train.preference_data import PromptExample

    model = grpo_base()
    add_lorakit_adapter(model)
    section = GrpoSection(group_size=GROUP, max_completion_len=max_new, temperature=1.0, top_p=1.0, beta=BETA_GRPO,
                          loss_type="dapo", scale_rewards="group",
                          rewards=[f"{Path(__file__).resolve()}:constant_reward"])
    examples = [PromptExample(p, as_text(p), {}, f"bench:{i}") for i, p in enumerate(prompts)]
    objective = GRPO(section, grpo_rewards(section, examples, []), tokenizer, Dist(), 0, examples, [], PAD,
                     GRPO_PROMPTS, 1, True, model, None, contextlib.nullcontext)
    stream, dist = RowStream(len(examples), 0), Dist()
    opt = torch.optim.AdamW(trainable(model), lr=LR)

    def step() -> float:
        batch = objective.batches(stream, dist)[0]                            # samples the G x B completions
        loss = objective.loss(model, batch) / objective.count(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        objective.take_metrics()
        return loss.item()

    def sample() -> float:
        objective.batches(stream, dist)
        return float("nan")

    timer = GenerateTimer(model)
    return (Case("lorakit GRPO", step, (model, opt), timer=timer),
            Case("lorakit's sampler (GRPO.batches), lorakit's model", sample, (model,), timer=timer))


def trl_grpo(prompts: list[list[int]], tokenizer, max_new: int) -> Case:
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench_preference_"),
                      per_device_train_batch_size=GRPO_PROMPTS * GROUP, num_generations=GROUP,
                      max_completion_length=max_new, temperature=1.0, top_p=1.0, top_k=0, beta=BETA_GRPO,
                      loss_type="dapo", scale_rewards="group", num_iterations=1, use_vllm=False,
                      gradient_checkpointing=False, bf16=False, use_cpu=True, learning_rate=LR, report_to="none",
                      save_strategy="no", dataloader_num_workers=0, shuffle_dataset=False, seed=0)
    trainer = GRPOTrainer(model=grpo_base(), reward_funcs=constant_reward, args=args,
                          train_dataset=datasets.Dataset.from_list([{"prompt": as_text(p)} for p in prompts]),
                          processing_class=tokenizer, peft_config=lora_config())
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1
    inputs = next(iter(trainer.get_train_dataloader()))   # G rows of each prompt (text); generated in the step
    opt = torch.optim.AdamW(trainable(model), lr=LR)

    def step() -> float:
        loss = trainer.training_step(model, inputs, None)   # (model, inputs, num_items_in_batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return Case("TRL GRPOTrainer + PEFT", step, (model, opt), timer=GenerateTimer(model))


def plain_generate(model: nn.Module, prompts: list[list[int]], max_new: int, name: str) -> Case:
    """transformers' own sampling on `model`: the same rows (G per prompt, no padding needed: equal
    lengths), eval mode, no gradients, as lorakit's sampler runs."""
    ids = torch.tensor([p for p in prompts for _ in range(GROUP)])           # (B * G, prompt)
    timer = model.generate if isinstance(model.generate, GenerateTimer) else GenerateTimer(model)

    def step() -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, pad_token_id=PAD, eos_token_id=EOS)
        model.train(was)
        return float("nan")

    return Case(name, step, (model,), timer=timer)


# -- running and measuring ----------------------------------------------------------------------


def run(cases: list[Case], warmup: int, steps: int, log: Callable[[str], None], what: str) -> None:
    """Interleaved rounds, one step of each case per round, the order rotating; the first round is
    warmup (and gives the step-0 loss)."""
    n = len(cases)
    for rnd in range(warmup + steps):
        t_round = time.perf_counter()
        for i in range(n):
            case = cases[(i + rnd) % n]
            if case.timer is not None:
                case.timer.take()
            t0 = time.perf_counter()
            loss = case.step()
            dt = time.perf_counter() - t0
            if rnd == 0:
                case.loss0 = loss
            if rnd >= warmup:
                case.times.append(dt)
                if case.timer is not None:
                    seconds, tokens = case.timer.take()
                    case.gen_times.append(seconds)
                    case.gen_tokens.append(tokens)
        kind = "warmup" if rnd < warmup else "timed"
        log(f"  {what} round {rnd + 1}/{warmup + steps} ({kind}) {time.perf_counter() - t_round:.1f}s")


def measure_peak(case: Case) -> None:
    """One more step under PeakMemory: its peak, and what was held when it began."""
    from lorakit.train.memory import PeakMemory, _held_tensors

    case.held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                     for t in _held_tensors(case.holders)}.values())
    meter = PeakMemory("cpu")
    with meter.region(*case.holders):
        case.step()
    case.peak = meter.peak_bytes


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def dpo_table(cases: list[Case], ref: Case) -> str:
    tokens = 2 * PAIRS * (PROMPT_LEN + COMPLETION_LEN)
    rows = ["| case | step ms (median) | min ms | tokens/s | vs TRL | peak MB | vs TRL | held MB | step MB (peak - held) "
            "| vs TRL |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        med = median_ms(c.times)
        rows.append(f"| {c.name} | {med:.0f} | {min(c.times) * 1e3:.0f} | {tokens / med * 1e3:.0f} "
                    f"| {ratio(med, median_ms(ref.times))} | {c.peak / MB:.1f} | {ratio(c.peak, ref.peak)} "
                    f"| {c.held / MB:.1f} | {(c.peak - c.held) / MB:.1f} | {ratio(c.peak - c.held, ref.peak - ref.held)} |")
    return "\n".join(rows)


def tok_s(c: Case) -> tuple[float, float]:
    """Median tokens sampled per second of generation, and per second of the whole step."""
    gen = statistics.median(n / g for n, g in zip(c.gen_tokens, c.gen_times, strict=True))
    step = statistics.median(n / t for n, t in zip(c.gen_tokens, c.times, strict=True))
    return gen, step


def grpo_table(cases: list[Case], ref: Case) -> str:
    rows = ["| case | step ms (median) | min ms | vs TRL | generate ms | vs TRL | rest ms | vs TRL | tokens sampled "
            "| tok/s of generate | vs TRL | tok/s of step | vs TRL | peak MB | vs TRL |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def stats(c: Case) -> tuple[float, float, float, float, float]:
        rest = statistics.median(t - g for t, g in zip(c.times, c.gen_times, strict=True)) * 1e3
        return (median_ms(c.times), median_ms(c.gen_times), rest, *tok_s(c))

    r = stats(ref)
    for c in cases:
        s = stats(c)
        rows.append(f"| {c.name} | {s[0]:.0f} | {min(c.times) * 1e3:.0f} | {ratio(s[0], r[0])} | {s[1]:.0f} "
                    f"| {ratio(s[1], r[1])} | {s[2]:.0f} | {ratio(s[2], r[2])} "
                    f"| {statistics.median(c.gen_tokens):.0f} | {s[3]:.0f} | {ratio(s[3], r[3])} | {s[4]:.0f} "
                    f"| {ratio(s[4], r[4])} | {c.peak / MB:.1f} | {ratio(c.peak, ref.peak)} |")
    return "\n".join(rows)


def gen_table(cases: list[Case], ref: Case) -> str:
    rows = [f"| generation ({GRPO_PROMPTS * GROUP} rows, prompts of {GRPO_PROMPT_LEN}) | generate ms (median) "
            "| tokens | tok/s | time vs plain | tok/s vs plain |", "|---|---|---|---|---|---|"]
    for c in cases:
        rows.append(f"| {c.name} | {median_ms(c.gen_times):.0f} | {statistics.median(c.gen_tokens):.0f} "
                    f"| {tok_s(c)[0]:.0f} | {ratio(median_ms(c.gen_times), median_ms(ref.gen_times))} "
                    f"| {ratio(tok_s(c)[0], tok_s(ref)[0])} |")
    return "\n".join(rows)


def sampler_ms(rounds: int = 50) -> tuple[float, float]:
    """Median ms of one sampling step on (rows, V) scores: lorakit's GumbelSampler (+ the argmax greedy
    search takes) and softmax + multinomial (what do_sample does after its warpers), interleaved."""
    from lorakit.train.grpo import GumbelSampler

    n = GRPO_PROMPTS * GROUP
    scores = torch.randn(n, MODEL_CONFIG["vocab_size"], generator=torch.Generator().manual_seed(3))   # (R, V)
    ids = torch.zeros(n, GRPO_PROMPT_LEN, dtype=torch.long)
    gumbel = GumbelSampler([torch.Generator().manual_seed(i) for i in range(n)], 1.0, 1.0)
    paths = {"gumbel": lambda: gumbel(ids, scores).argmax(-1),
             "multinomial": lambda: torch.multinomial(torch.softmax(scores, dim=-1), 1)}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds + 5):
        for name in sorted(paths, reverse=r % 2 == 1):
            t0 = time.perf_counter()
            paths[name]()
            if r >= 5:
                times[name].append(time.perf_counter() - t0)
    return median_ms(times["gumbel"]), median_ms(times["multinomial"])


def check_dpo(cases: list[Case]) -> None:
    """Step 0: B = 0, so policy = reference and the loss is log 2 everywhere; the chosen log-probs agree."""
    lk = cases[0]
    for c in cases:
        if c.trainer is not None:
            c.logp0 = c.trainer._metrics["train"]["logps/chosen"][0]          # TRL's own logged value, step 0
        assert abs(c.loss0 - math.log(2)) < 1e-5, f"{c.name}: step-0 loss {c.loss0!r} != log 2"
        assert abs(c.logp0 - lk.logp0) <= 1e-5 * abs(lk.logp0), \
            f"{c.name}: chosen log-prob {c.logp0!r} != lorakit's {lk.logp0!r}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (one step of every case each)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 warmup + 3 rounds, no checkpointing cases, GRPO completions of 16 tokens")
    ap.add_argument("--no-gc", action="store_true", help="skip the activation-checkpointing DPO cases")
    ap.add_argument("--skip-grpo", action="store_true", help="DPO only")
    ap.add_argument("--skip-dpo", action="store_true", help="GRPO only")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    max_new = MAX_NEW
    if args.quick:
        args.warmup, args.steps, args.no_gc, max_new = 1, 3, True, 16
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be at least 1 (round 0 gives the step-0 checks)")
    if args.threads:
        torch.set_num_threads(args.threads)

    import datasets
    import peft
    import transformers
    import trl

    import lorakit

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    print(f"# lorakit preference/RL benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}, "
          f"lorakit {lorakit.__version__}, Python {platform.python_version()}")
    print(f"# Llama {MODEL_CONFIG['num_hidden_layers']} layers, hidden {MODEL_CONFIG['hidden_size']}, "
          f"intermediate {MODEL_CONFIG['intermediate_size']}, vocab {MODEL_CONFIG['vocab_size']}, fp32; "
          f"r={RANK} alpha={ALPHA} all-linear; AdamW lr {LR:g}; {args.warmup} warmup + {args.steps} timed rounds")
    tokenizer = build_tokenizer()

    if not args.skip_dpo:
        pairs = make_pairs()
        log("DPO: building cases ...")
        lk, ref = lorakit_dpo(pairs, gc=False), trl_dpo(pairs, tokenizer, gc=False)
        cases = [lk, ref, full_logits_dpo(pairs)]
        run(cases, args.warmup, args.steps, log, "DPO")
        check_dpo(cases)
        for c in cases:
            measure_peak(c)
        gc_cases: list[Case] = []
        if not args.no_gc:
            log("DPO with checkpointing: building cases ...")
            gc_cases = [lorakit_dpo(pairs, gc=True), trl_dpo(pairs, tokenizer, gc=True)]
            run(gc_cases, args.warmup, args.steps, log, "DPO, checkpointing")
            check_dpo(gc_cases)
            for c in gc_cases:
                measure_peak(c)
        logits = 2 * PAIRS * (PROMPT_LEN + COMPLETION_LEN) * MODEL_CONFIG["vocab_size"] * 4
        print(f"\n## DPO step: {PAIRS} pairs x {PROMPT_LEN + COMPLETION_LEN} tokens (prompt {PROMPT_LEN}, completions "
              f"{COMPLETION_LEN}), policy + reference forwards, backward, AdamW\n")
        print(f"step-0 checks passed: loss = log 2 in every case; mean chosen log-prob {lk.logp0:.4f} "
              f"(lorakit) = {ref.logp0:.4f} (TRL) = {cases[2].logp0:.4f} (full logits)")
        print(f"full fp32 logits of the {2 * PAIRS} sequences: {2 * PAIRS} x {PROMPT_LEN + COMPLETION_LEN} x "
              f"{MODEL_CONFIG['vocab_size']} x 4 B = {logits / MB:.1f} MB\n")
        print(dpo_table(cases, ref))
        if gc_cases:
            print("\nwith activation checkpointing (TRL's default; lorakit's training.gradient_checkpointing):\n")
            print(dpo_table(gc_cases, gc_cases[1]))
        for a, b in [(lk, ref)] + ([(gc_cases[0], gc_cases[1])] if gc_cases else []):
            t, m = median_ms(a.times) / median_ms(b.times), a.peak / b.peak
            print(f"{a.name} vs {b.name}: time {t:.2f}x (target <= {TARGET_TIME}x: "
                  f"{'met' if t <= TARGET_TIME else 'NOT met'}), peak {m:.2f}x (target <= {TARGET_PEAK}x: "
                  f"{'met' if m <= TARGET_PEAK else 'NOT met'}), step memory (peak - held) "
                  f"{(a.peak - a.held) / (b.peak - b.held):.2f}x")

    if not args.skip_grpo:
        prompts = make_prompts()
        log("GRPO: building cases ...")
        lk_grpo, lk_sample = lorakit_grpo(prompts, tokenizer, max_new)
        trl_case = trl_grpo(prompts, tokenizer, max_new)
        run([lk_grpo, trl_case], args.warmup, args.steps, log, "GRPO")
        for c in (lk_grpo, trl_case):
            measure_peak(c)
        gen_cases = [lk_sample, plain_generate(lk_sample.holders[0], prompts, max_new,
                                               "plain generate(do_sample=True), lorakit's model"),
                     plain_generate(trl_case.holders[0], prompts, max_new,
                                    "plain generate(do_sample=True), TRL's PEFT model")]
        run(gen_cases, args.warmup, args.steps, log, "generation")
        want = sorted(p for p in prompts for _ in range(GROUP))
        for c in (lk_grpo, trl_case, *gen_cases):
            assert sorted(c.timer.prompts) == want, f"{c.name} sampled from other prompts than lorakit's"
        print(f"\n## GRPO step: {GRPO_PROMPTS} prompts x {GRPO_PROMPT_LEN} tokens, group {GROUP}, at most {max_new} "
              f"new tokens, temperature 1.0, beta {BETA_GRPO}: generate + reference and policy forwards + backward "
              f"+ AdamW\n")
        print(grpo_table([lk_grpo, trl_case], trl_case))
        print("\ngeneration alone (interleaved rounds of their own):\n")
        print(gen_table(gen_cases, gen_cases[1]))
        g_ms, m_ms = sampler_ms()
        print(f"\none sampling step on ({GRPO_PROMPTS * GROUP}, {MODEL_CONFIG['vocab_size']}) scores, median of 50: "
              f"lorakit's GumbelSampler + argmax {g_ms:.2f} ms, softmax + multinomial {m_ms:.2f} ms "
              f"({max_new} steps per generation)")

    print(f"\ntotal runtime {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
