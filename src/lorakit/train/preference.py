"""The preference objectives: DPO, IPO, SimPO and ORPO on pairs, KTO on labelled completions.

Each is an `Objective` (lorakit.train.objective) over its own examples (lorakit.train.preference_data):

    dpo, ipo      -log sigmoid of the policy's log-ratio margin against the reference (IPO: its
                  squared distance from 1 / (2 beta)); the reference is the base with the adapter
                  off or a frozen reference adapter (lorakit.train.reference)
    simpo         reference-free: length-normalised log-probabilities against a target margin
    orpo          reference-free: the chosen completions' cross-entropy plus lambda x the odds-ratio
                  term, two parts with their own normalisers (chosen tokens, pairs); dpo and ipo take
                  the same cross-entropy with `preference.sft_weight` (RPO)
    kto           unpaired: each completion's log-ratio against a KL estimate, desirable and
                  undesirable weighted apart

Memory: a pair's chosen and rejected rows go through one forward (2P rows), and their per-token
log-probabilities come from the hidden states a chunk at a time (lorakit.train.logprobs): no full
logits of either. The reference's log-probabilities come from a no-grad forward in the same step,
or once before training with `preference.precompute_reference` (kept per example, so a resumed run
recomputes the same numbers).

The loss math (and its parity with TRL) is lorakit.train.preference_loss; here are the batches,
the forwards, the normalisation over the step and the logged rewards (TRL's rewards/chosen,
rewards/rejected, margins and accuracies).

KTO's KL estimate pairs each prompt with the completion of the next example in dataset order that
has another prompt (a paired record gives two examples with one prompt), and averages over the
global micro-batch: so it can be precomputed for the reference, and N processes estimate what one
process with their rows would.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from . import preference_loss as pl
from .config import REFERENCE_FREE, PreferenceSection
from .data import IGNORE_INDEX, RowStream
from .distributed import Dist
from .logprobs import collate_completions, sequence_logprobs
from .objective import Batch, Metrics, MetricSums, my_slice
from .preference_data import PairExample, UnpairedExample
from .reference import as_reference, scoring

PAIR_COLUMNS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")


class _Batched:
    """What the objectives share: rows off the stream, micro-batching, and the reference."""

    def __init__(self, examples: list, eval_examples: list, pad_id: int, micro_batch_size: int, grad_accum: int,
                 chunked: bool, model: nn.Module, reference: str | None, autocast: Callable[[], AbstractContextManager]
                 ) -> None:
        self.examples, self.eval_examples, self.pad_id = examples, eval_examples, pad_id
        self.micro_batch_size, self.grad_accum, self.chunked = micro_batch_size, grad_accum, chunked
        self.model, self.reference, self.autocast = model, reference, autocast
        self.held_out = len(eval_examples)
        self.sums = MetricSums()
        self.ref_logps: Tensor | None = None
        """(n, k) fp32 reference log-probabilities per example, with precompute_reference."""

    def batches(self, stream: RowStream, dist: Dist) -> list[Batch]:
        out = []
        for _ in range(self.grad_accum):
            ids = stream.take(self.micro_batch_size * dist.world)
            mine = my_slice(ids, self.micro_batch_size, dist)
            batch = self.collate(self.examples, mine)
            if self.ref_logps is not None:                     # (k, b): the rows' order in the batch
                batch["ref_logps"] = self.ref_logps[mine].T.contiguous()
            out.append(batch)
        return out

    def collate(self, examples: list, indices: list[int]) -> Batch:
        """The rows of `examples[indices]`, with their `index`; every row scored by the reference."""
        raise NotImplementedError

    def reference_logps(self, batch: Batch) -> Tensor:
        """(rows,) the reference's summed log-probabilities of every row of `batch`: precomputed
        (`ref_logps`, training batches with precompute_reference) or from a no-grad forward."""
        if "ref_logps" in batch:
            return batch["ref_logps"].flatten()
        with as_reference(self.model, self.reference):
            return sequence_logprobs(self.model, _rows(batch, slice(None)), self.chunked)[0]

    def precompute(self, batch_size: int) -> None:
        """The reference log-probabilities of every training example, once (no-grad forwards)."""
        rows = []
        with self.autocast():
            for s in range(0, len(self.examples), batch_size):
                indices = list(range(s, min(s + batch_size, len(self.examples))))
                batch = {k: v.to(_device(self.model)) for k, v in self.collate(self.examples, indices).items()}
                rows.append(self.reference_logps(batch).view(-1, len(indices)).T.float().cpu())   # (b, k)
        self.ref_logps = torch.cat(rows)                                                         # (n, k)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The `eval_columns` over the held-out examples, scored in micro-batches without gradients."""
        if not self.eval_examples:
            return {}
        sums, device = MetricSums(), _device(model)
        with scoring(model):
            for s in range(0, len(self.eval_examples), self.micro_batch_size):
                indices = list(range(s, min(s + self.micro_batch_size, len(self.eval_examples))))
                self.score_held_out(model, {k: v.to(device) for k, v in self.collate(self.eval_examples, indices).items()},
                                    sums)
        means = {k: float(total / n) if n > 0 else None for k, (total, n) in sums.take().items()}
        return {k: means.get(k) for k in self.eval_columns}

    def score_held_out(self, model: nn.Module, batch: Batch, sums: MetricSums) -> None:
        """Add one held-out micro-batch's `eval_columns` to `sums`."""
        raise NotImplementedError

    def take_metrics(self) -> Metrics:
        return self.sums.take()


class Paired(_Batched):
    """dpo, ipo, simpo or orpo over `PairExample`s: each micro-batch is P pairs, 2P rows (chosen
    rows, then rejected rows). count: pairs (with the chosen tokens' cross-entropy, orpo or
    sft_weight: pairs and chosen tokens)."""

    def __init__(self, kind: str, section: PreferenceSection, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kind, self.section, self.beta = kind, section, section.beta_for(kind)
        self.needs_reference = kind not in REFERENCE_FREE
        self.with_nll = kind == "orpo" or (kind in ("dpo", "ipo") and section.sft_weight > 0)
        self.columns = PAIR_COLUMNS + (("nll_loss",) if self.with_nll else ())
        self.progress = ("rewards_margin", "rewards_accuracy")
        self.eval_columns = ("eval_rewards_accuracy", "eval_rewards_margin", f"eval_{kind}_loss")

    def collate(self, examples: list[PairExample], indices: list[int]) -> Batch:
        pairs = [examples[i] for i in indices]
        prompts = [p.prompt_ids for p in pairs]
        batch = collate_completions(prompts + prompts, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
                                    self.pad_id)
        batch["index"] = torch.tensor(indices, dtype=torch.long)
        return batch

    def count(self, batch: Batch) -> Tensor:
        pairs = torch.tensor(float(batch["index"].numel()))
        if not self.with_nll:
            return pairs
        chosen = batch["labels"][:batch["index"].numel(), 1:]
        return torch.stack([pairs, (chosen != IGNORE_INDEX).sum().float()])

    def terms(self, model: nn.Module, batch: Batch) -> tuple[pl.PairTerms, Tensor]:
        """The pairs' loss terms and the chosen rows' summed log-probabilities (for orpo's NLL)."""
        p = batch["index"].numel()
        logps, tokens = sequence_logprobs(model, batch, self.chunked)            # (2P,), (2P,)
        chosen, rejected = logps[:p], logps[p:]
        n_chosen, n_rejected = tokens[:p].float(), tokens[p:].float()
        s = self.section
        if self.kind == "simpo":
            return pl.simpo_loss(chosen, rejected, n_chosen, n_rejected, self.beta, s.gamma, s.label_smoothing,
                                 s.length_normalize), chosen
        if self.kind == "orpo":
            return pl.orpo_loss(chosen, rejected, n_chosen, n_rejected, s.orpo_lambda), chosen
        ref = self.reference_logps(batch)
        ref_chosen, ref_rejected = ref[:p], ref[p:]
        if self.kind == "ipo":
            return pl.ipo_loss(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected, self.beta), chosen
        return pl.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, s.label_smoothing), chosen

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        terms, chosen = self.terms(model, batch)
        self._record(terms)
        if not self.with_nll:
            return terms.losses.sum()
        nll, tokens = -chosen.sum(), self.count(batch)[1]
        self.sums.add_total("nll_loss", nll, tokens)
        weight = 1.0 if self.kind == "orpo" else self.section.sft_weight
        return torch.stack([terms.losses.sum(), weight * nll])

    def _record(self, t: pl.PairTerms, prefix: str = "", sums: MetricSums | None = None) -> None:
        sums = sums or self.sums
        sums.add(f"{prefix}rewards_chosen", t.chosen_rewards)
        sums.add(f"{prefix}rewards_rejected", t.rejected_rewards)
        sums.add(f"{prefix}rewards_margin", t.chosen_rewards - t.rejected_rewards)
        sums.add(f"{prefix}rewards_accuracy", (t.chosen_rewards > t.rejected_rewards).float())

    def score_held_out(self, model: nn.Module, batch: Batch, sums: MetricSums) -> None:
        """Preference accuracy, reward margin and the loss of held-out pairs."""
        terms, _ = self.terms(model, batch)
        self._record(terms, "eval_", sums)
        sums.add(f"eval_{self.kind}_loss", terms.losses)


class KTO(_Batched):
    """kto over `UnpairedExample`s: each micro-batch is N completions, scored against the KL
    estimate of its mismatched pairs (module docstring). count: completions."""

    columns = ("rewards_chosen", "rewards_rejected", "kl")
    progress = ("kl",)
    eval_columns = ("eval_kto_loss", "eval_rewards_chosen", "eval_rewards_rejected", "eval_kl")

    def __init__(self, section: PreferenceSection, dist: Dist, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.section, self.beta, self.dist = section, section.beta_for("kto"), dist
        self.partners = {id(self.examples): _kl_partners(self.examples),
                         id(self.eval_examples): _kl_partners(self.eval_examples)}

    def collate(self, examples: list[UnpairedExample], indices: list[int]) -> Batch:
        """2N rows: the completions, then the KL rows (prompt i, the completion of its partner)."""
        chosen = [examples[i] for i in indices]
        partners = [examples[self.partners[id(examples)][i]] for i in indices]
        prompts = [e.prompt_ids for e in chosen]
        batch = collate_completions(prompts + prompts, [e.completion_ids for e in chosen]
                                    + [e.completion_ids for e in partners], self.pad_id)
        batch["index"] = torch.tensor(indices, dtype=torch.long)
        batch["label"] = torch.tensor([e.label for e in chosen], dtype=torch.bool)
        return batch

    def count(self, batch: Batch) -> Tensor:
        return torch.tensor(float(batch["index"].numel()))

    def terms(self, model: nn.Module, batch: Batch, dist: Dist | None) -> tuple[Tensor, Tensor, Tensor]:
        """(losses (N,), rewards (N,), the KL estimate) of one micro-batch; `dist` averages the
        estimate over processes (None: over this batch alone)."""
        n = batch["index"].numel()
        policy = sequence_logprobs(model, _rows(batch, slice(0, n)), self.chunked)[0]        # (N,)
        with scoring(self.model):
            policy_kl = sequence_logprobs(self.model, _rows(batch, slice(n, 2 * n)), self.chunked)[0]
        ref = self.reference_logps(batch)                                                     # (2N,)
        kl_sum = (policy_kl - ref[n:]).sum()
        count = torch.tensor(float(n), device=kl_sum.device)
        if dist is not None:
            kl_sum, count = dist.sum(torch.stack([kl_sum, count]))
        kl = pl.kto_kl_estimate(kl_sum, count)
        s = self.section
        losses, rewards = pl.kto_loss(policy, ref[:n], batch["label"], kl, self.beta, s.desirable_weight,
                                      s.undesirable_weight)
        return losses, rewards, kl

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        losses, rewards, kl = self.terms(model, batch, self.dist)
        self._record(rewards, batch["label"], kl, self.sums)
        return losses.sum()

    @staticmethod
    def _record(rewards: Tensor, label: Tensor, kl: Tensor, sums: MetricSums, prefix: str = "") -> None:
        sums.add(f"{prefix}rewards_chosen", rewards[label])
        sums.add(f"{prefix}rewards_rejected", rewards[~label])
        sums.add(f"{prefix}kl", kl[None])

    def score_held_out(self, model: nn.Module, batch: Batch, sums: MetricSums) -> None:
        """The loss, rewards and KL estimate of held-out completions (the estimate over this batch)."""
        losses, rewards, kl = self.terms(model, batch, None)
        self._record(rewards, batch["label"], kl, sums, "eval_")
        sums.add("eval_kto_loss", losses)


def _kl_partners(examples: list[UnpairedExample]) -> list[int]:
    """For each example, the next one in dataset order (cyclically) with another prompt; itself
    when every example has the same prompt."""
    n = len(examples)
    return [next((j % n for j in range(i + 1, i + n) if examples[j % n].prompt_ids != e.prompt_ids), i)
            for i, e in enumerate(examples)]


def _rows(batch: Batch, rows: slice) -> Batch:
    """The model inputs and labels of `rows` of a batch."""
    return {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels")}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
