"""The examples run or load, so the README's `make demo` and the shipped configs cannot rot."""

import runpy
import sys
from pathlib import Path

import pytest

from lorakit.train.config import load_config
from lorakit.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples").glob("*.yaml"))


def test_core_demo_learns_and_round_trips(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["core_demo.py", "--steps", "60", "--out", str(tmp_path / "adapter")])
    runpy.run_path(str(ROOT / "examples" / "core_demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    lines = {line.split(":")[0]: line for line in out.splitlines()}
    acc_before = float(lines["before training"].rsplit(" ", 1)[-1].rstrip("%"))
    acc_after = float(next(v for k, v in lines.items() if k.startswith("after 60 steps")).rsplit(" ", 1)[-1].rstrip("%"))
    assert acc_before < 20 and acc_after > 90, out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    for prefix in ("merged vs unmerged logits", "unloaded to a plain LlamaForCausalLM"):
        err = float(next(line for line in out.splitlines() if line.startswith(prefix)).rsplit(" ", 1)[-1])
        assert err < 1e-5, out
    assert "reloaded: max |diff| 0.0e+00" in out


@pytest.mark.slow   # trains its experts on the built-in model; tests/compose covers each call on tiny models
def test_composition_demo_uses_the_library_every_way(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["composition_demo.py", "--steps", "20", "--out", str(tmp_path)])
    runpy.run_path(str(ROOT / "examples" / "composition_demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    line = {text.split(":")[0]: text for text in out.splitlines()}
    assert float(line["combine cat == sum of the experts"].rsplit(" ", 1)[-1]) < 1e-4, out
    assert (tmp_path / "ties" / "adapter_model.safetensors").is_file()
    assert line["per-sample adapters"].endswith("every row equals that row run alone: True"), out
    assert int(line["router"].split("%")[0].rsplit(" ", 1)[-1]) >= 90, out
    losses = dict(pair.rsplit(" ", 1) for pair in line["held-out loss on both tasks"].split(": ", 1)[1].split(", "))
    losses = {k: float(v) for k, v in losses.items()}
    assert losses["mixture"] < min(losses["sentiment"], losses["parity"]), losses
    assert losses["fusion"] < min(losses["sentiment"], losses["parity"]), losses


@pytest.mark.slow   # the README's GRPO figures: 450 SFT steps, then examples/grpo.yaml (100 steps, 256 completions each)
def test_grpo_example_raises_the_held_out_reward_and_exact_match(tmp_path):
    from lorakit.train.metrics import MetricsLog
    sft = tmp_path / "sft-450"
    _quickstart(tmp_path, "training.max_steps=450", "training.eval_every=0", f"output.dir={sft}")
    out = tmp_path / "grpo"
    cfg = load_config(str(ROOT / "examples" / "grpo.yaml"),
                      [f"output.dir={out}", "output.tensorboard=false", f"training.init_from={sft}",
                       f"training.reference_adapter={sft}"])
    summary = train(cfg)
    before, after = summary.eval_before, summary.eval_after
    # the held-out reward is the exact match of greedy completions: with the exact_answer reward, the same figure
    assert before.extra["eval_reward"] == before.exact_match and after.extra["eval_reward"] == after.exact_match
    assert after.exact_match >= before.exact_match + 0.02, (before, after)
    sampled = [float(r["reward"]) for r in MetricsLog.read(out / "metrics.csv") if r["reward"]]
    assert sum(sampled[-20:]) > sum(sampled[:20]), sampled                 # the training reward rises too


def test_every_example_config_loads():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "llama3_8b_alpaca.yaml", "multi_gpu_fsdp.yaml"}
    for path in CONFIGS:
        cfg = load_config(str(path))
        assert cfg.output.dir.startswith("runs/"), path
    fsdp = load_config(str(ROOT / "examples" / "multi_gpu_fsdp.yaml"))
    assert fsdp.training.strategy == "fsdp" and fsdp.data.train == ["chat_part1.jsonl", "chat_part2.jsonl"]


def _quickstart(tmp_path, *overrides):
    cfg = load_config(str(ROOT / "examples" / "quickstart.yaml"),
                      [f"output.dir={tmp_path / 'run'}", "output.tensorboard=false", *overrides])
    return train(cfg)


@pytest.mark.slow   # 150 steps; tests/train/test_golden_losses.py runs 20 steps of the same config in the fast suite
def test_quickstart_shows_learning_on_held_out_prompts(tmp_path):
    """A shortened `make demo`: the base scores 0% on the held-out tasks; 150 steps already help."""
    s = _quickstart(tmp_path, "training.max_steps=150", "training.eval_every=0")
    assert s.eval_before.exact_match == 0.0 and s.eval_before.loss > 4
    assert s.eval_after.exact_match >= 0.3 and s.eval_after.loss < 0.6, s.eval_after
    assert s.eval_before.n_examples == s.eval_after.n_examples == 200


@pytest.mark.slow
def test_make_demo_learns_the_tasks(tmp_path):
    """Exactly what `make demo` runs, with the demo's claim: near-perfect exact match after training."""
    s = _quickstart(tmp_path)
    assert s.eval_before.exact_match == 0.0 and s.eval_after.exact_match >= 0.9, s.eval_after


@pytest.mark.slow   # the README's DPO figures: 60 SFT steps, then examples/dpo.yaml (150 steps; 73 s on 2 idle cores)
def test_dpo_example_raises_preference_accuracy_and_keeps_exact_match(tmp_path):
    sft = tmp_path / "sft-short"
    _quickstart(tmp_path, "training.max_steps=60", "training.warmup_steps=5", f"output.dir={sft}")
    cfg = load_config(str(ROOT / "examples" / "dpo.yaml"),
                      [f"output.dir={tmp_path / 'dpo'}", "output.tensorboard=false", f"training.init_from={sft}",
                       f"training.reference_adapter={sft}"])
    summary = train(cfg)
    before, after = summary.eval_before, summary.eval_after
    assert before.extra["eval_rewards_accuracy"] == 0 and before.extra["eval_dpo_loss"] == pytest.approx(0.6931, abs=1e-4)
    assert after.extra["eval_rewards_accuracy"] > 0.55 and after.extra["eval_rewards_margin"] > 0.005
    assert after.exact_match >= before.exact_match
