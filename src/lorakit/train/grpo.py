"""GRPO: reinforcement learning from rewards of the model's own sampled completions.

Each micro-batch is `micro_batch_size` prompts. For each, the policy (the model with its adapter
on, in eval mode, with the KV cache of `generate`) samples `grpo.group_size` completions of at most
`grpo.max_completion_len` tokens; the reward functions (lorakit.train.rewards) score them; each
completion's advantage is its reward minus its group's mean, divided by the group's std
(`grpo.scale_rewards: group`) or not (`none`). The loss is the clipped policy-ratio objective with
a k3 KL term to the reference, the base with the adapter off (lorakit.train.preference_loss),
per token, averaged as `grpo.loss_type` says over the whole step (its count).

One optimisation step per generation (TRL's num_iterations = 1): the "old" policy is the current
one, so the ratio is 1 in value while its gradient is the policy gradient, and clipping matters
only as the bounds around it.

Sampling is made a pure function of the data order. Each sampled row gets its own random stream,
seeded by (training.seed, the prompt's place in the row stream, the completion's number in its
group), and draws a token as the argmax of the tempered, top-p-filtered logits plus Gumbel noise
from that stream (the Gumbel-max trick: a sample of the softmax), inside `generate`'s greedy
search. So a resumed run samples exactly the completions the interrupted one would have, without
any random state in the checkpoint, and N processes sample what one process would; prompts are
left-padded to the longest prompt of the global micro-batch, so a row's padding is the same
however the micro-batch is split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from . import preference_loss as pl
from .config import GrpoSection
from .data import IGNORE_INDEX, RowStream
from .distributed import Dist
from .evaluate import generate_greedy
from .logprobs import collate_completions, token_logprobs
from .objective import Batch, Metrics, MetricSums, my_slice
from .preference_data import PromptExample
from .reference import as_reference, scoring
from .rewards import Rewards, load_reward_functions


class GumbelSampler(LogitsProcessor):
    """Turns greedy search into sampling with one random stream per row: returns the tempered,
    top-p-filtered logits plus Gumbel noise, whose argmax is a sample of their softmax. The streams
    live on the logits' device (no vocabulary-wide copy per token), so a run resumes exactly on the
    kind of device it ran on."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float) -> None:
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        z = scores.float() / self.temperature                                       # (R, V)
        if self.top_p < 1.0:
            probs, order = torch.softmax(z, dim=-1).sort(dim=-1, descending=True)
            beyond = probs.cumsum(-1) - probs > self.top_p                          # before it, top_p is reached
            z = z.scatter(1, order, z.gather(1, order).masked_fill(beyond, float("-inf")))
        u = torch.stack([torch.rand(z.shape[1], generator=g, device=z.device) for g in self.generators])  # (R, V)
        tiny = torch.finfo(u.dtype).tiny                                            # u = 0 would give -inf
        return z + -torch.log(-torch.log(u.clamp(min=tiny)))


def _row_seed(seed: int, draw: int, member: int) -> int:
    """A 63-bit seed for completion `member` of the prompt drawn `draw`-th from the row stream."""
    digest = hashlib.blake2b(f"lorakit-grpo:{seed}:{draw}:{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class GRPO:
    """GRPO over `PromptExample`s (module docstring). count: completion tokens (loss_type dapo),
    completions (grpo) or completions x max_completion_len (dr_grpo)."""

    def __init__(self, section: GrpoSection, rewards: Rewards, tokenizer: Any, dist: Dist, seed: int,
                 examples: list[PromptExample], eval_examples: list[PromptExample], pad_id: int,
                 micro_batch_size: int, grad_accum: int, chunked: bool, model: nn.Module, reference: str | None,
                 autocast: Callable[[], AbstractContextManager]) -> None:
        self.section, self.tokenizer, self.dist, self.seed = section, tokenizer, dist, seed
        self.examples, self.eval_examples, self.pad_id = examples, eval_examples, pad_id
        self.held_out = len(eval_examples)
        self.micro_batch_size, self.grad_accum, self.chunked = micro_batch_size, grad_accum, chunked
        self.model, self.reference, self.autocast = model, reference, autocast
        self.rewards = rewards.ending_turns_with(_end_of_turn_texts(tokenizer, model))
        self.fields = _field_names(examples + eval_examples)
        """Every batch passes all of them (None where a record lacks one), the same keys on every process."""
        self.eos_ids = _eos_ids(tokenizer, model)
        self.sums = MetricSums()
        self.columns = ("reward", "reward_std", *self.rewards.columns, "kl", "completion_len", "clip_fraction")
        self.eval_columns = ("eval_reward",)
        self.progress = ("reward", "kl")

    def batches(self, stream: RowStream, dist: Dist) -> list[Batch]:
        out = []
        for _ in range(self.grad_accum):
            first = stream.epoch * stream.n + stream.position              # the stream's draw counter
            ids = stream.take(self.micro_batch_size * dist.world)
            width = max(len(self.examples[i].prompt_ids) for i in ids)    # of the global micro-batch
            lo = dist.rank * self.micro_batch_size                        # where this process's slice starts
            mine = my_slice(ids, self.micro_batch_size, dist)
            out.append(self._rollout(mine, range(first + lo, first + lo + len(mine)), width))
        return out

    def _rollout(self, indices: list[int], draws: range, width: int) -> Batch:
        """Sample, score and collate the completions of the prompts `examples[indices]`."""
        g, examples = self.section.group_size, [self.examples[i] for i in indices]
        prompts = [e.prompt_ids for e in examples for _ in range(g)]            # (B * G) rows
        device = next(self.model.parameters()).device   # the noise is drawn where the logits are
        generators = [torch.Generator(device).manual_seed(_row_seed(self.seed, d, m)) for d in draws for m in range(g)]
        completions = self._sample(prompts, generators, width)
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        fields = {k: [e.extras.get(k) for e in examples for _ in range(g)] for k in self.fields}
        rewards, per_function = self.rewards([e.prompt for e in examples for _ in range(g)], texts, fields,
                                             [e.source for e in examples for _ in range(g)])
        advantages = pl.group_advantages(rewards, g, self.section.scale_rewards)   # (B * G,)
        self.sums.add("reward", rewards)
        self.sums.add("reward_std", rewards.view(-1, g).std(dim=1))
        for name, values in per_function.items():
            self.sums.add(name, values)
        self.sums.add("completion_len", torch.tensor([float(len(c)) for c in completions]))
        batch = collate_completions(prompts, completions, self.pad_id)
        batch["advantages"] = advantages
        return batch

    @torch.no_grad()
    def _sample(self, prompts: list[list[int]], generators: list[torch.Generator], width: int) -> list[list[int]]:
        """One completion per prompt row (its stream in `generators`), cut after the first end token."""
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):                                   # left padding
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        device = next(self.model.parameters()).device
        s = self.section
        with self.autocast(), scoring(self.model):
            # a generation config of its own: the model's (repetition penalty, ...) would change the
            # distribution sampled from, which the loss takes to be softmax(logits / temperature)
            config = GenerationConfig(max_new_tokens=s.max_completion_len, do_sample=False,
                                      pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                logits_processor=LogitsProcessorList([GumbelSampler(generators, s.temperature, s.top_p)]))
        completions = []
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            completions.append(row if end is None else row[:end + 1])
        return completions

    def count(self, batch: Batch) -> Tensor:
        mask = batch["labels"][:, 1:] != IGNORE_INDEX                           # (N, T-1)
        return pl.grpo_count(mask, self.section.loss_type, self.section.max_completion_len).float()

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        s = self.section
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        logps, mask = token_logprobs(model, inputs, self.chunked, s.temperature)        # (N, T)
        ref = None
        if s.beta > 0:
            with as_reference(self.model, self.reference):
                ref = token_logprobs(self.model, inputs, self.chunked, s.temperature)[0]
        eps_high = s.epsilon if s.epsilon_high is None else s.epsilon_high
        terms = pl.grpo_token_loss(logps, logps.detach(), ref, batch["advantages"], s.epsilon, eps_high, s.beta)
        total, _ = pl.grpo_sum_and_count(terms.per_token_loss, mask, s.loss_type, s.max_completion_len)
        tokens = mask.sum()
        if ref is not None:
            self.sums.add_total("kl", (terms.kl * mask).sum(), tokens)
        self.sums.add_total("clip_fraction", (terms.clipped * mask).sum(), tokens)
        return total

    def take_metrics(self) -> Metrics:
        return self.sums.take()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The mean reward of greedy completions of the held-out prompts."""
        if not self.eval_examples:
            return {}
        device = next(model.parameters()).device
        total = 0.0
        for s in range(0, len(self.eval_examples), self.micro_batch_size):
            chunk = self.eval_examples[s:s + self.micro_batch_size]
            with scoring(model):
                texts = generate_greedy(model, self.tokenizer, [e.prompt_ids for e in chunk], device,
                                        self.section.max_completion_len, self.eos_ids)
            fields = {k: [e.extras.get(k) for e in chunk] for k in self.fields}
            rewards, _ = self.rewards([e.prompt for e in chunk], texts, fields, [e.source for e in chunk])
            total += float(rewards.sum())
        return {"eval_reward": total / len(self.eval_examples)}


def grpo_rewards(section: GrpoSection, train: list[PromptExample], held_out: list[PromptExample]) -> Rewards:
    """The run's reward functions, resolved and checked against every record before the model loads:
    a misspelt spec or a record without a field a function needs is an error now, not after minutes
    of loading or on one process mid-run."""
    records = train + held_out
    rewards = load_reward_functions(section.rewards, section.reward_weights, _field_names(records))
    rewards.check_records([(e.extras, e.source) for e in records])
    return rewards


def _field_names(examples: list[PromptExample]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(k for e in examples for k in e.extras))


def _eos_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS and the model's generation EOS(s)
    (chat models end a turn with their own token, e.g. <|im_end|>)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return [i for i in dict.fromkeys(ids) if i is not None]


def _end_of_turn_texts(tokenizer: Any, model: nn.Module) -> list[str]:
    return [tokenizer.convert_ids_to_tokens(i) for i in _eos_ids(tokenizer, model)]
