"""`training.objective` other than sft, through `lorakit train` on the tiny model: the reference is
the base exactly, the first DPO step is at log 2 (policy = reference), every objective trains and
logs its metrics, gradient accumulation and resume give the same adapter, a run starts from an
SFT run, and QLoRA trains with them."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from adapter_support import randomise
from reward_functions import BREVITY
from safetensors.torch import load_file
from tiny_models import tiny_model_dir
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.builtin import build_tokenizer
from lorakit.train.config import load_config
from lorakit.train.logprobs import collate_completions, sequence_logprobs, token_logprobs
from lorakit.train.loop import train
from lorakit.train.reference import as_reference

WORDS = ["red", "green", "blue", "cyan", "magenta", "yellow", "black", "white", "orange", "violet", "indigo",
         "teal", "olive", "maroon", "navy", "silver"]
OBJECTIVES = ["dpo", "ipo", "simpo", "orpo", "kto", "grpo"]


@pytest.fixture(scope="module")
def objective_data(tmp_path_factory):
    """'echo WORD' with WORD chosen, another word rejected: in the paired, unpaired and prompt forms."""
    path = tmp_path_factory.mktemp("objective-data")

    def write(name, rows):
        with open(path / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    user = [[{"role": "user", "content": f"echo {w}"}] for w in WORDS]
    write("pairs.jsonl", [{"prompt": u, "chosen": [{"role": "assistant", "content": w}],
                           "rejected": [{"role": "assistant", "content": WORDS[(i + 3) % 16]}]}
                          for i, (u, w) in enumerate(zip(user, WORDS, strict=True))])
    write("kto.jsonl", [{"prompt": f"echo {w}", "completion": w if i % 2 else WORDS[(i + 5) % 16], "label": bool(i % 2)}
                        for i, w in enumerate(WORDS)])
    write("prompts.jsonl", [{"prompt": u, "answer": w} for u, w in zip(user, WORDS, strict=True)])
    write("upper.jsonl", [{"prompt": u, "chosen": [{"role": "assistant", "content": w}],   # a rule to learn fast
                           "rejected": [{"role": "assistant", "content": w.upper()}]}
                          for u, w in zip(user, WORDS, strict=True)])
    return {name: path / f"{name}.jsonl" for name in ("pairs", "kto", "prompts", "upper")}


def data_for(objective):
    return {"kto": "kto", "grpo": "prompts"}.get(objective, "pairs")


def overrides(model_dir, objective_data, out, objective, *more):
    return [f"model.name_or_path={model_dir}", f"data.train={objective_data[data_for(objective)]}",
            "data.eval_fraction=0.25", "data.max_seq_len=64", "training.micro_batch_size=4", "training.lr=1e-2",
            "training.max_steps=3", "training.schedule=constant", "lora.r=4", "lora.lora_alpha=8",
            "lora.lora_dropout=0.0", "output.tensorboard=false", f"output.dir={out}",
            f"training.objective={objective}",
            *(["grpo.max_completion_len=6", f"grpo.rewards=[exact_answer,{BREVITY}]"] if objective == "grpo" else []),
            *more]


def run(*args):
    return train(load_config(None, list(args)))


def rows(out):
    with open(Path(out) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def adapter(out):
    return load_file(Path(out) / "adapter_model.safetensors")


def assert_same_adapter(a, b, atol=0.0):
    a, b = adapter(a), adapter(b)
    assert any(a[k].abs().max() > 1e-4 for k in a if "lora_B" in k), "B is still 0: the runs trained nothing"
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# ---------------------------------------------------------------------------------- log-probabilities

def pair_batch():
    prompts = [[5, 80, 90], [7, 8]]
    return collate_completions(prompts, [[100, 110, 6], [120, 6]], pad_id=0)


@pytest.mark.parametrize("chunked", [True, False])
def test_token_logprobs_equal_the_full_logits_log_softmax(model_dir, chunked):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomise(model, "default", seed=1)
    batch = pair_batch()
    logps, mask = token_logprobs(model, batch, chunked=chunked, temperature=0.8)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = torch.log_softmax(logits.float() / 0.8, dim=-1)[:, :-1].gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    expected_mask = batch["labels"][:, 1:] != -100                                  # (B, T - 1)
    assert torch.equal(mask[:, :-1], expected_mask) and not mask[:, -1].any()
    torch.testing.assert_close(logps[:, :-1], torch.where(expected_mask, full, 0.0), atol=1e-5, rtol=0)
    # gradients through the chunked path equal the plain path's
    weights = torch.randn(logps.shape)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad((logps * weights).sum(), params)
    want = torch.autograd.grad((torch.where(expected_mask, full, 0.0) * weights[:, :-1]).sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunked", [True, False])
def test_reference_by_disabled_adapter_equals_a_separately_loaded_base(model_dir, chunked):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    randomise(model, "default", seed=2)
    model.train()
    batch = pair_batch()
    with as_reference(model, None):
        ref = sequence_logprobs(model, batch, chunked)[0]
    assert model.training                                              # restored
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = sequence_logprobs(base, batch, chunked)[0]
    assert torch.equal(ref, expected)
    assert not torch.equal(sequence_logprobs(model.eval(), batch, chunked)[0], expected)   # the adapter is on


# ---------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_trains_and_logs_its_metrics(model_dir, objective_data, tmp_path, objective):
    out = tmp_path / "run"
    summary = run(*overrides(model_dir, objective_data, out, objective))
    logged = rows(out)
    steps = [r for r in logged if r["loss"]]
    assert [int(r["step"]) for r in steps] == [1, 2, 3]
    assert all(math.isfinite(float(r["loss"])) for r in steps)
    columns = {"dpo": ["rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy"],
               "kto": ["rewards_chosen", "rewards_rejected", "kl"],
               "grpo": ["reward", "reward_std", "reward/exact_answer", "kl", "completion_len", "clip_fraction"]}
    columns.update({k: columns["dpo"] for k in ("ipo", "simpo")}, orpo=[*columns["dpo"], "nll_loss"])
    for name in columns[objective]:
        assert all(r[name] != "" and math.isfinite(float(r[name])) for r in steps), (name, steps)
    evals = [r for r in logged if r["eval_loss"]]
    assert len(evals) == 2 and summary.eval_after.extra                  # before and after, with its own metrics
    card = (out / "README.md").read_text()
    assert f"| objective | {objective} (" in card
    assert lk.read_adapter_config(out).r == 4
    if objective == "grpo":   # trained_tokens: the completions' tokens, 4 prompts x 4 of them
        assert all(0 < float(r["completion_len"]) <= 6 for r in steps)
        assert all(int(r["trained_tokens"]) == round(16 * float(r["completion_len"])) for r in steps)
    else:                     # the completions' tokens, not the pairs or examples the loss counts
        assert all(int(r["trained_tokens"]) >= 4 * (2 if objective != "kto" else 1) + 1 for r in steps)


@pytest.mark.parametrize("objective", ["dpo", "ipo", "kto"])
def test_the_first_step_starts_at_the_reference(model_dir, objective_data, tmp_path, objective):
    """B = 0: the policy is the reference, so every log-ratio is 0: DPO's loss is log 2, IPO's
    (1 / (2 beta))^2, KTO's 1 - sigmoid(0) = 0.5, and every reward 0."""
    run(*overrides(model_dir, objective_data, tmp_path / "run", objective, "training.max_steps=1"))
    first = rows(tmp_path / "run")[1]
    expected = {"dpo": math.log(2), "ipo": (1 / (2 * 0.1)) ** 2, "kto": 0.5}[objective]
    assert float(first["loss"]) == pytest.approx(expected, abs=1e-6)
    assert float(first["rewards_chosen"]) == 0 and float(first["rewards_rejected"]) == 0


def from_run(model_dir, objective_data, out, objective, init_from, *more):
    """`overrides` continuing the adapter in `init_from`: its config, so no lora settings."""
    return [o for o in overrides(model_dir, objective_data, out, objective, f"training.init_from={init_from}", *more)
            if not o.startswith("lora.")]


def test_dpo_from_an_sft_run_with_it_as_reference(model_dir, objective_data, data_files, tmp_path, capsys):
    """SFT, then DPO with training.init_from and training.reference_adapter the SFT run: the
    first step's policy is the SFT adapter and so is the reference (loss log 2); with the base as
    reference it is not."""
    train_file, eval_file = data_files
    sft = tmp_path / "sft"
    run(f"model.name_or_path={model_dir}", f"data.train={train_file}", f"data.eval={eval_file}",
        "data.max_seq_len=64", "training.max_steps=4", "training.lr=1e-2", "lora.r=4", "lora.lora_alpha=8",
        "output.tensorboard=false", f"output.dir={sft}")
    with_sft = tmp_path / "dpo"
    run(*from_run(model_dir, objective_data, with_sft, "dpo", sft, "training.max_steps=2",
                  f"training.reference_adapter={sft}"))
    assert "warning" not in capsys.readouterr().out
    first = rows(with_sft)[1]
    assert float(first["loss"]) == pytest.approx(math.log(2), abs=1e-6)
    with_base = tmp_path / "dpo-base"
    run(*from_run(model_dir, objective_data, with_base, "dpo", sft, "training.max_steps=1"))
    assert abs(float(rows(with_base)[1]["rewards_margin"])) > 1e-4
    assert "started from" in (with_sft / "README.md").read_text()
    assert f"reference: the adapter {sft}" in (with_sft / "README.md").read_text()
    # the trained adapter has the SFT run's config (its r, its targets)
    assert lk.read_adapter_config(with_sft).target_modules == lk.read_adapter_config(sft).target_modules


def test_init_from_refuses_lora_settings_and_warns_of_another_base(model_dir, objective_data, tmp_path, capsys):
    from lorakit.errors import ConfigError
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.objective=dpo", "training.init_from=runs/sft", "lora.r=8", "lora.lora_alpha=16"])
    assert str(err.value).endswith("training.init_from continues the adapter in runs/sft with its own configuration, "
                                   "so the lora section's lora.r, lora.lora_alpha would be ignored; drop them, or drop "
                                   "training.init_from to train a new adapter")
    sft = tmp_path / "sft"
    run(*overrides(model_dir, objective_data, sft, "dpo", "training.max_steps=1"))
    saved = json.loads((sft / "adapter_config.json").read_text())
    (sft / "adapter_config.json").write_text(json.dumps({**saved, "base_model_name_or_path": "org/other-model"}))
    run(*from_run(model_dir, objective_data, tmp_path / "dpo", "dpo", sft, "training.max_steps=1"))
    assert (f"warning: training.init_from: {sft} was trained on org/other-model, and this run's base is {model_dir}; "
            "if that is another model, the adapter does not fit it") in capsys.readouterr().out


@pytest.mark.parametrize("objective", ["dpo", "orpo", "grpo"])
def test_gradient_accumulation_gives_the_adapter_of_the_whole_batch(model_dir, objective_data, tmp_path, objective):
    """orpo: two parts with their own counts (pairs, chosen tokens); grpo: the completions sampled
    are a function of the data order, not of how the batch is split."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(*overrides(model_dir, objective_data, whole, objective, "training.max_steps=2"))
    run(*overrides(model_dir, objective_data, split, objective, "training.max_steps=2", "training.micro_batch_size=2",
                   "training.grad_accum=2"))
    assert_same_adapter(whole, split, atol=2e-6)
    if objective == "grpo":
        assert [r["completion_len"] for r in rows(whole)] == [r["completion_len"] for r in rows(split)]


@pytest.mark.parametrize("objective", ["dpo", "kto", "grpo"])
def test_resume_continues_exactly(model_dir, objective_data, tmp_path, objective):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(*overrides(model_dir, objective_data, straight, objective, "training.max_steps=4"))
    run(*overrides(model_dir, objective_data, resumed, objective, "training.max_steps=2"))
    run(*overrides(model_dir, objective_data, resumed, objective, "training.max_steps=4", "training.resume=auto"))
    assert_same_adapter(straight, resumed)
    trained = [[(r["step"], r["loss"]) for r in rows(out) if r["loss"]] for out in (straight, resumed)]
    assert trained[0] == trained[1]


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_precomputed_reference_trains_the_same_adapter(model_dir, objective_data, tmp_path, objective):
    live, once = tmp_path / "live", tmp_path / "once"
    run(*overrides(model_dir, objective_data, live, objective))
    summary = run(*overrides(model_dir, objective_data, once, objective, "preference.precompute_reference=true"))
    assert_same_adapter(live, once, atol=1e-6)
    assert summary.steps == 3


def test_dpo_trains_a_qlora_base(objective_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    wide = tmp_path / "model"
    tiny_model_dir(wide, build_tokenizer(), width=64, positions=256)   # NF4 on CPU: widths of 64-weight blocks
    out = tmp_path / "run"
    run(*overrides(wide, objective_data, out, "dpo", "model.quantize_base=nf4"))
    first = rows(out)[1]
    assert float(first["loss"]) == pytest.approx(math.log(2), abs=1e-6)     # the 4-bit base is its own reference


def test_the_policy_learns_the_preference(model_dir, objective_data, tmp_path):
    """Chosen: the word, rejected: the word in capitals. A dozen DPO steps: the preference accuracy
    rises from 0 to 1 and the margin from 0 (measured: 0.138)."""
    out = tmp_path / "run"
    summary = run(*overrides(model_dir, objective_data, out, "dpo", "training.max_steps=12",
                             f"data.train={objective_data['upper']}", f"data.eval={objective_data['upper']}",
                             "data.eval_fraction=0"))
    before, after = summary.eval_before.extra, summary.eval_after.extra
    assert before["eval_rewards_accuracy"] == 0 and before["eval_rewards_margin"] == 0
    assert after["eval_rewards_accuracy"] == 1 and after["eval_rewards_margin"] > 0.1


def test_objective_specific_settings_are_checked():
    from lorakit.errors import ConfigError
    with pytest.raises(ConfigError, match="preference.gamma is set but training.objective is dpo; it applies to "
                                          "simpo only"):
        load_config(None, ["training.objective=dpo", "preference.gamma=1.0"])
    with pytest.raises(ConfigError, match="training.reference_adapter is set but training.objective is simpo"):
        load_config(None, ["training.objective=simpo", "training.reference_adapter=runs/sft"])
    with pytest.raises(ConfigError, match="data.packing is for training.objective=sft"):
        load_config(None, ["training.objective=dpo", "data.packing=true"])
    with pytest.raises(ConfigError, match="grpo settings are given but training.objective is sft"):
        load_config(None, ["grpo.group_size=8"])
    with pytest.raises(ConfigError, match="grpo.group_size must be >= 2"):
        load_config(None, ["training.objective=grpo", "grpo.group_size=1"])
    with pytest.raises(ConfigError, match="training.objective=grpo samples with generate"):
        load_config(None, ["training.objective=grpo", "training.strategy=fsdp"])


def test_a_missing_init_or_reference_adapter_names_its_key(model_dir, objective_data, tmp_path):
    from lorakit.errors import ConfigError
    for key in ("init_from", "reference_adapter"):
        with pytest.raises(ConfigError, match=f"training.{key}: {tmp_path / 'none'} is not a saved adapter"):
            run(*(from_run(model_dir, objective_data, tmp_path / "run", "dpo", tmp_path / "none") if key == "init_from"
                  else overrides(model_dir, objective_data, tmp_path / "run", "dpo", f"training.{key}={tmp_path / 'none'}")))


def write_prompts_and_reward(tmp_path, records):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "reward.py").write_text("def brevity(completions, colour):\n"
                                       "    return [1.0 / (1 + len(c)) for c in completions]\n")
    return data, f"grpo.rewards=[{tmp_path / 'reward.py'}:brevity]"


def test_grpo_without_answers_is_evaluated_by_its_reward(model_dir, objective_data, tmp_path, capsys):
    """Prompts without an answer have no reference completion, so no eval loss or exact match: the
    held-out evaluation is the mean reward alone, before and after training."""
    data, reward = write_prompts_and_reward(tmp_path, [{"prompt": f"name a colour like {w}", "colour": w}
                                                       for w in WORDS])
    out = tmp_path / "run"
    summary = run(*overrides(model_dir, objective_data, out, "grpo", f"data.train={data}", reward))
    evals = [r for r in rows(out) if r["eval_reward"]]
    assert [int(r["step"]) for r in evals] == [0, 3]
    assert all(r["eval_loss"] == "" and r["eval_exact_match"] == "" and 0 < float(r["eval_reward"]) <= 1
               for r in evals)
    assert summary.eval_after.loss is None and summary.eval_after.n_examples == 4
    assert f"eval loss n/a, reward {float(evals[0]['eval_reward']):.4f} on 4 examples" in capsys.readouterr().out


def test_a_record_without_a_field_its_reward_needs_fails_before_the_model_loads(model_dir, objective_data, tmp_path,
                                                                                  monkeypatch):
    """Checked over every record up front (with DDP it would otherwise stop one process mid-run)."""
    from lorakit.errors import DataError
    from lorakit.train import loop

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data and rewards were checked")

    monkeypatch.setattr(loop, "load_model", load_model)
    data, reward = write_prompts_and_reward(tmp_path, [{"prompt": "name a colour", "colour": "red"},
                                                       {"prompt": "name another", "shade": "dark"}])
    with pytest.raises(DataError) as err:
        run(*overrides(model_dir, objective_data, tmp_path / "run", "grpo", f"data.train={data}",
                       "data.eval_fraction=0", reward))
    assert str(err.value) == (f"{data}:2: reward function brevity needs the `colour` field, which this record "
                              "lacks; add it to every record, or give the parameter a default")


def test_lorakit_eval_reads_a_preference_runs_data(model_dir, objective_data, tmp_path):
    """`lorakit eval` on a dpo run's config scores its held-out pairs' chosen completions (the SFT
    reader would not take pair records), and `--data` a pairs file."""
    from lorakit.verbs.evaluate import run_eval
    out = tmp_path / "run"
    run(*overrides(model_dir, objective_data, out, "dpo", "training.max_steps=1"))
    held_out = run_eval(str(out / "config.yaml"), [])
    assert held_out.result.n_examples == 4 and held_out.result.exact_match is not None
    other = run_eval(str(out / "config.yaml"), [], data=str(objective_data["upper"]))
    assert other.result.n_examples == 16


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grpo_steps_raise_the_completions_with_positive_advantage(model_dir, loss_type):
    """On fixed completions, a few SGD steps on GRPO's loss raise the log-probability of the
    completion with advantage +1 and lower the one with -1 (the policy gradient's direction)."""
    import contextlib

    from lorakit.builtin import build_tokenizer as tokenizer_of
    from lorakit.train.config import GrpoSection
    from lorakit.train.distributed import Dist
    from lorakit.train.grpo import GRPO, grpo_rewards
    from lorakit.train.preference_data import PromptExample
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    example = PromptExample([5, 80, 90], "p", {"answer": "x"}, "file:1")
    section = GrpoSection(loss_type=loss_type)
    grpo = GRPO(section, grpo_rewards(section, [example], []), tokenizer_of(), Dist.setup("single", torch.device("cpu")),
                0, [example], [], 0, 1, 1, True, model, None, contextlib.nullcontext)
    batch = collate_completions([[5, 80, 90]] * 2, [[100, 110, 6], [120, 130, 6]], 0)
    batch["advantages"] = torch.tensor([1.0, -1.0])
    before = sequence_logprobs(model, batch, True)[0].detach()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        (grpo.loss(model, batch) / grpo.count(batch)).backward()
        optimizer.step()
    after = sequence_logprobs(model, batch, True)[0].detach()
    assert after[0] > before[0] + 0.05 and after[1] < before[1] - 0.05, (before, after)


def test_the_base_models_dropout_is_off_so_gpt2_starts_at_log_2(objective_data, tmp_path):
    """GPT-2 has dropout 0.1 in its blocks: on in the policy's forward, off in the reference's
    (eval mode), it would make the first step differ from log 2."""
    path = tmp_path / "gpt2"
    model = tiny_model_dir(path, build_tokenizer(), arch="gpt2", positions=256)
    assert model.config.resid_pdrop > 0
    out = tmp_path / "run"
    run(*overrides(path, objective_data, out, "dpo", "training.max_steps=1"))
    assert float(rows(out)[1]["loss"]) == pytest.approx(math.log(2), abs=1e-6)


def test_kto_pairs_each_prompt_with_another_prompts_completion():
    """A paired record gives two examples with one prompt in a row: the KL row of each takes the
    completion of the next example with another prompt."""
    from lorakit.train.preference import _kl_partners
    from lorakit.train.preference_data import UnpairedExample
    prompts = [[1], [1], [2], [2], [3], [3]]
    examples = [UnpairedExample(p, [9], i % 2 == 0, "f:1", "x") for i, p in enumerate(prompts)]
    assert _kl_partners(examples) == [2, 2, 4, 4, 0, 0]
    assert _kl_partners(examples[:2]) == [0, 1]                         # one prompt only: itself


def test_the_gumbel_sampler_draws_from_the_tempered_top_p_softmax():
    """The argmax of its output is a sample of softmax(z / T) restricted to the top-p tokens, and
    each row's draws are a function of its own stream alone."""
    from lorakit.train.grpo import GumbelSampler
    z = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    temperature, top_p = 0.8, 0.9
    p = torch.softmax(z[0] / temperature, dim=0)
    kept = (p.sort(descending=True).values.cumsum(0) - p.sort(descending=True).values) <= top_p   # first 3 tokens
    expected = torch.where(kept[p.argsort(descending=True).argsort()], p, 0.0)
    expected /= expected.sum()
    sampler = GumbelSampler([torch.Generator().manual_seed(i) for i in range(200)], temperature, top_p)
    draws = torch.cat([sampler(None, z.expand(200, -1)).argmax(1) for _ in range(100)])            # 20000
    frequencies = torch.bincount(draws, minlength=5).float() / draws.numel()
    torch.testing.assert_close(frequencies, expected, atol=0.012, rtol=0)                          # ~3.5 sigma
    assert frequencies[3:].sum() == 0 and expected[3:].sum() == 0
    again = GumbelSampler([torch.Generator().manual_seed(i) for i in (7, 3)], temperature, top_p)
    alone = GumbelSampler([torch.Generator().manual_seed(3)], temperature, top_p)
    assert torch.equal(again(None, z.expand(2, -1))[1], alone(None, z)[0])
