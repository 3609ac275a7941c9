"""The preference and RL losses (lorakit.train.preference_loss) against TRL's own code, on the same
random log-probabilities: losses, the gradients with respect to the policy's log-probabilities (or
logits, where TRL starts from logits) and the logged rewards; and against closed forms.

Written against TRL 1.16. Its losses live in trainer methods that need a model, so each test builds
the trainer with `object.__new__`, sets only the attributes that method reads, and hands it a stand-in
model that returns fixed tensors: the losses are TRL's code, the model is not."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lorakit.train.preference_loss import (
    dpo_loss,
    group_advantages,
    grpo_sum_and_count,
    grpo_token_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

pytest.importorskip("trl")   # a dev dependency, for parity only
with warnings.catch_warnings():   # CPO and ORPO are in trl.experimental, which warns on import
    warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

ATOL = 1e-5


class OneProcess:
    """The slice of an accelerate Accelerator these methods use, for one process."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def stand_in(cls, **attributes):
    """A `cls` trainer without its __init__ (which needs a model and data): just `attributes`."""
    trainer = object.__new__(cls)
    trainer.__dict__.update(accelerator=OneProcess(), model=SimpleNamespace(training=True),
                            aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
                            _total_train_tokens=0, _tp_size=1, **attributes)
    return trainer


def close(a, b):
    as32 = torch.as_tensor
    torch.testing.assert_close(as32(a, dtype=torch.float32), as32(b, dtype=torch.float32), atol=ATOL, rtol=0)


def grad(loss, leaf):
    return torch.autograd.grad(loss, leaf, retain_graph=True)[0]


def completion_rows(rows: int, length: int, seed: int):
    """input_ids, attention_mask, completion_mask (rows, length): a prompt of 1-3 tokens, a
    completion of at least one token, right padding."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.arange(length)
    prompt = torch.randint(1, 4, (rows, 1), generator=g)
    end = prompt + torch.randint(1, length - 3, (rows, 1), generator=g)
    completion = ((positions >= prompt) & (positions < end)).long()
    attention = (positions < end).long()
    return torch.randint(1, 50, (rows, length), generator=g) * attention, attention, completion


def lm_output(log_probs):
    """What TRL's fused-head forward returns, with zero statistics besides the log-probabilities."""
    zeros = torch.zeros_like(log_probs)
    return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def label_logps(logits, labels):
    """(summed log-probabilities of the labels != -100 after the shift (B,), their count (B,))."""
    targets = labels[:, 1:]
    mask = targets != -100
    logp = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(1), mask.sum(1)


# --- DPO and IPO: DPOTrainer._compute_loss, loss_type "sigmoid" / "ipo" ------------------------------

def dpo_case(pairs=5, length=9, seed=0):
    input_ids, attention, completion = completion_rows(2 * pairs, length, seed)
    g = torch.Generator().manual_seed(seed + 1)
    shift = completion[:, 1:]
    token_logps = (-2 * torch.rand(2 * pairs, length - 1, generator=g)).requires_grad_()  # (2P, L-1)
    ref = -2 * torch.rand(2 * pairs, generator=g) * shift.sum(1)                          # (2P,)
    inputs = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion,
              "ref_chosen_logps": ref[:pairs], "ref_rejected_logps": ref[pairs:]}
    return inputs, token_logps, shift


def trl_dpo(loss_type, beta, inputs, token_logps, shift):
    trainer = stand_in(DPOTrainer, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                       loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
                       use_weighting=False, args=SimpleNamespace())
    loss = trainer._compute_loss(lambda **_: lm_output(token_logps * shift), inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl_sigmoid(beta):
    inputs, token_logps, shift = dpo_case()
    trl_loss, metrics = trl_dpo("sigmoid", beta, inputs, token_logps, shift)

    chosen, rejected = (token_logps * shift).sum(1).chunk(2)          # (P,) each
    terms = dpo_loss(chosen, rejected, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], beta, 0.0)
    loss = terms.losses.mean()                                        # TRL: mean over pairs
    close(loss, trl_loss)
    close(grad(loss, token_logps), grad(trl_loss, token_logps))
    close(terms.chosen_rewards.mean(), metrics["rewards/chosen"][-1])
    close(terms.rejected_rewards.mean(), metrics["rewards/rejected"][-1])
    close((terms.chosen_rewards > terms.rejected_rewards).float().mean(), metrics["rewards/accuracies"][-1])
    assert not terms.chosen_rewards.requires_grad and not terms.rejected_rewards.requires_grad


def test_ipo_matches_trl_and_averages_over_completion_tokens():
    beta = 0.2
    inputs, token_logps, shift = dpo_case(seed=3)
    trl_loss, metrics = trl_dpo("ipo", beta, inputs, token_logps, shift)

    chosen, rejected = (token_logps * shift).sum(1).chunk(2)
    tokens_chosen, tokens_rejected = inputs["completion_mask"].sum(1).chunk(2)
    terms = ipo_loss(chosen, rejected, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"],
                     tokens_chosen, tokens_rejected, beta)
    loss = terms.losses.mean()
    close(loss, trl_loss)
    close(grad(loss, token_logps), grad(trl_loss, token_logps))
    close(terms.chosen_rewards.mean(), metrics["rewards/chosen"][-1])   # beta x the summed log-ratio


def test_cdpo_label_smoothing_is_trls_smoothed_logistic():
    """TRL 1.16's DPO "sigmoid" has no label smoothing; the conservative form is its CPO "sigmoid"
    formula, here given the DPO log-ratios."""
    beta, eps = 0.3, 0.2
    g = torch.Generator().manual_seed(5)
    chosen = (-30 * torch.rand(6, generator=g)).requires_grad_()
    rejected = (-30 * torch.rand(6, generator=g)).requires_grad_()
    ref_chosen, ref_rejected = -30 * torch.rand(6, generator=g), -30 * torch.rand(6, generator=g)

    cpo = stand_in(CPOTrainer, alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=eps)
    trl_losses, trl_chosen_rewards, _ = cpo.cpo_loss(chosen - ref_chosen, rejected - ref_rejected)
    terms = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, eps)
    close(terms.losses, trl_losses)
    close(terms.chosen_rewards, trl_chosen_rewards)
    for leaf in (chosen, rejected):
        close(grad(terms.losses.sum(), leaf), grad(trl_losses.sum(), leaf))


def test_dpo_and_ipo_closed_forms():
    beta = 0.1
    logps = torch.tensor([-12.0, -40.0])
    # equal log-ratios: the margin is 0, -log sigmoid(0) = log 2, with or without smoothing
    for eps in (0.0, 0.25):
        close(dpo_loss(logps, logps - 3, logps + 1, logps - 2, beta, eps).losses, [math.log(2)] * 2)
    # IPO: ((2 - 1) / 4 - (-3 - 0) / 6 - 1 / (2 beta))^2
    terms = ipo_loss(torch.tensor([-8.0]), torch.tensor([-9.0]), torch.tensor([-10.0]), torch.tensor([-6.0]),
                     torch.tensor([4]), torch.tensor([6]), beta)
    close(terms.losses, [(2 / 4 + 3 / 6 - 5.0) ** 2])
    close(terms.chosen_rewards, [0.2])


# --- SimPO: CPOTrainer.get_batch_loss_metrics, loss_type "simpo", cpo_alpha 0 ------------------------

def pair_logits_case(pairs=4, length=10, vocab=11, seed=0):
    """A CPO / ORPO batch (chosen_*, rejected_* keys, labels -100 on prompt and padding) and the
    logits (2P, L, V) a stand-in model returns for it."""
    input_ids, attention, completion = completion_rows(2 * pairs, length, seed)
    input_ids = input_ids % vocab
    labels = input_ids.masked_fill(completion == 0, -100)
    batch = {}
    for side, rows in (("chosen", slice(0, pairs)), ("rejected", slice(pairs, 2 * pairs))):
        batch |= {f"{side}_input_ids": input_ids[rows], f"{side}_attention_mask": attention[rows],
                  f"{side}_labels": labels[rows]}
    logits = torch.randn(2 * pairs, length, vocab, generator=torch.Generator().manual_seed(seed + 1))
    return batch, logits.requires_grad_()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_matches_trl_cpo(eps):
    beta, gamma, p = 2.0, 0.5, 4
    batch, logits = pair_logits_case(p)
    cpo = stand_in(CPOTrainer, alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma,
                   label_smoothing=eps, cpo_alpha=0.0, is_encoder_decoder=False, pad_token_id=0)
    trl_loss, metrics = cpo.get_batch_loss_metrics(lambda *_, **__: SimpleNamespace(logits=logits), batch)

    sums, tokens = label_logps(logits, torch.cat([batch["chosen_labels"], batch["rejected_labels"]]))
    terms = simpo_loss(sums[:p], sums[p:], tokens[:p], tokens[p:], beta, gamma, eps, length_normalize=True)
    loss = terms.losses.mean()
    close(loss, trl_loss)
    close(grad(loss, logits), grad(trl_loss, logits))
    close(terms.chosen_rewards.mean(), metrics["rewards/chosen"])
    close(terms.rejected_rewards.mean(), metrics["rewards/rejected"])


def test_simpo_without_length_normalisation_is_trls_formula_on_sums():
    beta, gamma = 2.0, 0.5
    g = torch.Generator().manual_seed(2)
    chosen = (-20 * torch.rand(5, generator=g)).requires_grad_()
    rejected = (-20 * torch.rand(5, generator=g)).requires_grad_()
    cpo = stand_in(CPOTrainer, alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma,
                   label_smoothing=0.0)
    trl_losses, _, _ = cpo.cpo_loss(chosen, rejected)
    terms = simpo_loss(chosen, rejected, torch.ones(5), torch.ones(5), beta, gamma, 0.0,
                       length_normalize=False)
    close(terms.losses, trl_losses)
    close(grad(terms.losses.sum(), chosen), grad(trl_losses.sum(), chosen))
    # and by hand: mean log-probabilities -1 and -2 per token, beta (m_c - m_r) - gamma = 1.5
    close(simpo_loss(torch.tensor([-3.0]), torch.tensor([-8.0]), torch.tensor([3]), torch.tensor([4]),
                     beta, gamma, 0.0, length_normalize=True).losses, [-F.logsigmoid(torch.tensor(1.5))])


# --- ORPO: ORPOTrainer.get_batch_loss_metrics (odds_ratio_loss + the chosen NLL) --------------------

def test_orpo_matches_trl_with_the_nll_as_a_second_term():
    """TRL's loss is NLL (mean over the chosen rows' tokens, prompt included) - mean(odds-ratio
    term); with orpo_loss the objective writes it as two sums over their own counts."""
    lam, p = 0.25, 4
    batch, logits = pair_logits_case(p, seed=7)
    orpo = stand_in(ORPOTrainer, beta=lam, is_encoder_decoder=False, padding_value=0)
    trl_loss, metrics = orpo.get_batch_loss_metrics(lambda *_, **__: SimpleNamespace(logits=logits), batch)

    sums, tokens = label_logps(logits, torch.cat([batch["chosen_labels"], batch["rejected_labels"]]))
    terms = orpo_loss(sums[:p], sums[p:], tokens[:p], tokens[p:], lam)
    nll_labels = batch["chosen_input_ids"].masked_fill(batch["chosen_attention_mask"] == 0, -100)
    chosen_sums, nll_tokens = label_logps(logits[:p], nll_labels)
    loss = -chosen_sums.sum() / nll_tokens.sum() + terms.losses.sum() / p
    close(loss, trl_loss)
    close(grad(loss, logits), grad(trl_loss, logits))
    close(terms.chosen_rewards.mean(), metrics["rewards/chosen"])
    close(terms.rejected_rewards.mean(), metrics["rewards/rejected"])
    close(terms.log_odds.mean(), metrics["log_odds_chosen"])
    close(F.logsigmoid(terms.log_odds).mean(), metrics["log_odds_ratio"])


def test_orpo_closed_form():
    # mean token probabilities 1/2 and 1/5: odds 1 and 1/4, so the log odds ratio is log 4
    lam = 0.1
    terms = orpo_loss(torch.tensor([3 * math.log(0.5)]), torch.tensor([2 * math.log(0.2)]),
                      torch.tensor([3]), torch.tensor([2]), lam)
    close(terms.log_odds, [math.log(4)])
    close(terms.losses, [-lam * math.log(0.8)])


# --- KTO: KTOTrainer._compute_loss, loss_type "kto" --------------------------------------------------

@pytest.mark.parametrize("kl_shift", [-4.0, 6.0], ids=["kl_positive", "kl_clamped"])
def test_kto_matches_trl(kl_shift):
    beta, w_d, w_u, n, length = 0.1, 1.0, 1.33, 7, 9
    input_ids, attention, completion = completion_rows(n, length, seed=11)
    kl_ids, kl_attention, kl_completion = completion_rows(n, length + 2, seed=12)
    g = torch.Generator().manual_seed(13)
    shift = completion[:, 1:]
    token_logps = (-2 * torch.rand(n, length - 1, generator=g)).requires_grad_()          # (N, L-1)
    kl_token_logps = -2 * torch.rand(n, length + 1, generator=g) * kl_completion[:, 1:]   # (N, L+1)
    ref = -2 * torch.rand(n, generator=g) * shift.sum(1)
    ref_kl = kl_token_logps.sum(1) + kl_shift * torch.rand(n, generator=g)
    labels = torch.tensor([True, False, True, True, False, False, True])

    def model(input_ids, **_):   # the completions or the mismatched KL rows, told apart by length
        return lm_output(token_logps * shift if input_ids.size(1) == length else kl_token_logps)

    kto = stand_in(KTOTrainer, calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta,
                   desirable_weight=w_d, undesirable_weight=w_u)
    inputs = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion,
              "label": labels, "KL_input_ids": kl_ids, "KL_attention_mask": kl_attention,
              "KL_completion_mask": kl_completion, "ref_logps": ref, "ref_KL_logps": ref_kl}
    trl_loss = kto._compute_loss(model, inputs, return_outputs=False)
    metrics = kto._metrics["train"]

    kl = kto_kl_estimate((kl_token_logps.sum(1) - ref_kl).sum(), torch.tensor(float(len(ref_kl))))
    assert (kl == 0) == (kl_shift > 0)
    losses, rewards = kto_loss((token_logps * shift).sum(1), ref, labels, kl, beta, w_d, w_u)
    loss = losses.mean()                                              # TRL: mean over completions
    close(loss, trl_loss)
    close(grad(loss, token_logps), grad(trl_loss, token_logps))
    close(kl, metrics["kl"][-1])
    close(rewards[labels].mean(), metrics["rewards/chosen"][-1])
    close(rewards[~labels].mean(), metrics["rewards/rejected"][-1])
    assert not rewards.requires_grad and not kl.requires_grad


def test_kto_closed_form():
    # a log-ratio of 0 against z = 0: each loss is its weight x (1 - sigmoid(0))
    logps = torch.tensor([-5.0, -7.0])
    losses, rewards = kto_loss(logps, logps, torch.tensor([True, False]), torch.tensor(0.0), 0.1, 2.0, 3.0)
    close(losses, [1.0, 1.5])
    close(rewards, [0.0, 0.0])
    close(kto_kl_estimate(torch.tensor(1.0 - 3.0), torch.tensor(2.0)), 0.0)   # mean -1, clamped
    close(kto_kl_estimate(torch.tensor(3.0), torch.tensor(2.0)), 1.5)


# --- GRPO advantages: GRPOTrainer._generate_and_score_completions ------------------------------------

def trl_advantages(rewards_per_func, weights, group_size, scale):
    """The advantages TRL's generation step returns for these rewards (rows: completions, columns:
    reward functions), with generation and reward functions replaced by the given numbers."""
    n = rewards_per_func.size(0)
    trainer = stand_in(
        GRPOTrainer, environment_factories=None, tools=None, environments=None,
        _tokenizer=SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None, mask_truncated_completions=False,
        use_vllm=False, beta=0.0, num_iterations=1,
        args=SimpleNamespace(per_device_train_batch_size=n, steps_per_generation=1,
                             gradient_accumulation_steps=1, gradient_checkpointing_kwargs=None),
        num_generations=group_size, multi_objective_aggregation="sum_then_normalize", scale_rewards=scale,
        reward_weights=torch.tensor(weights), reward_func_names=[f"r{i}" for i in range(len(weights))],
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list)},
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False,
        _generate=lambda prompts: ([[1, 2]] * n, [[3, 4, 5]] * n, None, ["c"] * n, None, {}, None, None),
        _calculate_rewards=lambda *_: rewards_per_func)
    trainer.model.is_gradient_checkpointing = False
    return trainer._generate_and_score_completions([{"prompt": "p"}] * n)["advantages"]


@pytest.mark.parametrize("scale", ["group", "none"])
def test_group_advantages_match_trl(scale):
    g = torch.Generator().manual_seed(21)
    rewards_per_func = torch.rand(12, 2, generator=g)
    rewards_per_func[4:8] = 0.5                                       # a group of equal rewards
    weights = [1.0, 0.5]
    rewards = rewards_per_func @ torch.tensor(weights)                # (N,) the weighted sum, as TRL
    close(group_advantages(rewards, 4, scale), trl_advantages(rewards_per_func, weights, 4, scale))


def test_group_advantages_closed_form():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 7.0, 7.0])
    std = math.sqrt(5 / 3)                                            # unbiased std of 1, 2, 3, 4
    close(group_advantages(rewards[:4], 4, "group"), torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4))
    close(group_advantages(rewards, 2, "none"), [-0.5, 0.5, -0.5, 0.5, 0.0, 0.0])
    close(group_advantages(rewards, 2, "group")[4:], [0.0, 0.0])     # equal rewards: no advantage
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, 4, "group")


# --- GRPO loss: GRPOTrainer._compute_loss, loss types dapo / grpo / dr_grpo -------------------------

MAX_LEN = 8


def grpo_case(n=6, seed=31):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([8, 3, 5, 1, 6, 2])[:n]
    mask = (torch.arange(MAX_LEN) < lengths[:, None]).long()          # (N, T)
    logps = (-3 * torch.rand(n, MAX_LEN, generator=g)).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(n, MAX_LEN, generator=g)  # ratios both inside and past the clip
    ref = logps.detach() + 0.5 * torch.randn(n, MAX_LEN, generator=g)
    advantages = torch.randn(n, generator=g)
    return logps, old, ref, advantages, mask


def trl_grpo_loss(loss_type, logps, mask, advantages, old, ref, beta, bias_correction, num_items,
                  accumulation_steps=1, rows=slice(None)):
    """TRL's loss of the micro-batch `rows`, in an optimizer step of `accumulation_steps` of them
    whose generation batch holds `num_items` completion tokens."""
    entropies = torch.zeros_like(logps[rows])
    trainer = stand_in(
        GRPOTrainer, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
        use_vllm=False, current_gradient_accumulation_steps=accumulation_steps, max_completion_length=MAX_LEN,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=bias_correction, delta=None,
                             steps_per_generation=accumulation_steps),
        _get_per_token_logps_and_entropies=lambda *_, **__: (logps[rows], entropies, None))
    n = mask[rows].size(0)
    prompt = torch.ones(n, 2, dtype=torch.long)
    inputs = {"prompt_ids": prompt, "prompt_mask": prompt,
              "completion_ids": torch.ones(n, MAX_LEN, dtype=torch.long), "completion_mask": mask[rows],
              "advantages": advantages[rows], "num_items_in_batch": torch.tensor(num_items)}
    if old is not None:
        inputs["old_per_token_logps"] = old[rows]
    if ref is not None:
        inputs["ref_per_token_logps"] = ref[rows]
    return trainer._compute_loss(None, inputs), trainer._metrics["train"]


GRPO_CASES = [  # (beta, KL bias correction, off-policy)
    (0.0, True, False), (0.0, True, True), (0.04, True, True), (0.04, False, True), (0.04, True, False)]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize(("beta", "bias_correction", "off_policy"), GRPO_CASES)
def test_grpo_loss_matches_trl(loss_type, beta, bias_correction, off_policy):
    logps, old, ref, advantages, mask = grpo_case()
    old = old if off_policy else None
    ref = ref if beta else None
    trl_loss, metrics = trl_grpo_loss(loss_type, logps, mask, advantages, old, ref, beta, bias_correction,
                                      num_items=int(mask.sum()))

    terms = grpo_token_loss(logps, old, ref, advantages, 0.2, 0.28, beta, bias_correction)
    total, count = grpo_sum_and_count(terms.per_token_loss, mask, loss_type, MAX_LEN)
    loss = total / count
    close(loss, trl_loss)
    close(grad(loss, logps), grad(trl_loss, logps))

    def token_mean(x):
        return (x.float() * mask).sum() / mask.sum()

    close(token_mean(terms.low_clipped), metrics["clip_ratio/low_mean"][-1])
    close(token_mean(terms.high_clipped), metrics["clip_ratio/high_mean"][-1])
    close(token_mean(terms.clipped), metrics["clip_ratio/region_mean"][-1])
    if off_policy:
        assert terms.low_clipped.any() and terms.high_clipped.any()
    if beta:
        close(token_mean(terms.kl), metrics["kl"][-1])
    else:
        assert terms.kl is None and "kl" not in metrics


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grpo_sums_over_micro_batches_give_trls_loss(loss_type):
    """Two micro-batches' sums over their summed counts: TRL's loss on the whole batch, and the sum of
    TRL's losses of the two as micro-batches of one optimizer step (losses and gradients)."""
    logps, old, ref, advantages, mask = grpo_case()
    beta, tokens = 0.04, int(mask.sum())
    terms = grpo_token_loss(logps, old, ref, advantages, 0.2, 0.28, beta)
    halves = [slice(0, 3), slice(3, 6)]
    parts = [grpo_sum_and_count(terms.per_token_loss[h], mask[h], loss_type, MAX_LEN) for h in halves]
    loss = sum(s for s, _ in parts) / sum(c for _, c in parts)

    whole, _ = trl_grpo_loss(loss_type, logps, mask, advantages, old, ref, beta, True, num_items=tokens)
    close(loss, whole)
    close(grad(loss, logps), grad(whole, logps))
    accumulated = sum(trl_grpo_loss(loss_type, logps, mask, advantages, old, ref, beta, True,
                                    num_items=tokens, accumulation_steps=2, rows=h)[0] for h in halves)
    close(loss, accumulated)
    close(grad(loss, logps), grad(accumulated, logps))


def test_grpo_closed_forms():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]], requires_grad=True)
    advantages = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # on-policy, no KL: the ratio is 1, the loss -A on every token and its gradient -A
    terms = grpo_token_loss(logps, None, None, advantages, 0.2, 0.2, 0.0)
    close(terms.per_token_loss, -advantages[:, None].expand(2, 3))
    close(grad(terms.per_token_loss.sum(), logps), -advantages[:, None].expand(2, 3))
    assert not terms.low_clipped.any() and not terms.high_clipped.any()
    # the aggregations of losses 1 / 2 per token: dapo 4 tokens, grpo per-completion means, dr_grpo 2 x 3
    per_token = torch.tensor([[1.0, 1.0, 1.0], [2.0, 9.0, 9.0]])
    expected = {"dapo": (5.0, 4), "grpo": (3.0, 2), "dr_grpo": (5.0, 6)}
    for loss_type, (total, count) in expected.items():
        s, c = grpo_sum_and_count(per_token, mask, loss_type, 3)
        close(s, total)
        assert int(c) == count
    # k3 KL at equal log-probabilities is 0; ref higher by log 2: 2 - log 2 - 1
    ref = logps.detach() + math.log(2)
    kl = grpo_token_loss(logps, None, ref, advantages, 0.2, 0.2, 0.1).kl
    close(kl, torch.full((2, 3), 1 - math.log(2)))
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_token_loss(logps, None, None, advantages, 0.2, 0.2, 0.1)
