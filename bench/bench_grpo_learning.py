"""GRPO's learning curve, lorakit against TRL's GRPOTrainer + PEFT on the same prompts and adapter.

bench_preference.py times one step; this checks what the steps do. Both sides start from the same
SFT adapter on the built-in model (the quickstart run stopped at `--sft-steps`, made here first)
and run GRPO on the same first `--prompts` training prompts of the built-in tasks, every step
all of them (so the curve is of one fixed set, not of fresh prompts), with the exact-answer
reward, group 8, temperature 1.0, at most 16 new tokens, beta 0 (TRL's reference with PEFT is
the adapter switched off, lorakit's would be the SFT adapter: without the KL term the two
objectives are the same), loss dapo, rewards scaled by the group's std, a constant learning rate
with AdamW and gradients clipped at 1.0.

The samples differ (each side its own random streams), so the figures to compare are the mean
sampled reward of the first and the last third of the steps: a lorakit bug in the advantages,
the ratio or the loss's normalisation would show as a curve that does not rise as TRL's does.

    .venv/bin/python bench/bench_grpo_learning.py                 # 30 steps, 16 prompts (~4 min on 2 cores)
    .venv/bin/python bench/bench_grpo_learning.py --steps 10      # a quick look
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def sft_adapter(out: Path, steps: int) -> Path:
    """The quickstart run stopped at `steps`: a start with some of each task learnt, none perfect."""
    from lorakit.train.config import load_config
    from lorakit.train.loop import train

    root = Path(__file__).resolve().parents[1]
    train(load_config(str(root / "examples" / "quickstart.yaml"),
                      [f"training.max_steps={steps}", "training.eval_every=0", f"output.dir={out}",
                       "output.tensorboard=false"]))
    return out


def lorakit_rewards(sft: Path, prompts: Path, out: Path, args: argparse.Namespace) -> list[float]:
    from lorakit.train.config import load_config
    from lorakit.train.loop import train
    from lorakit.train.metrics import MetricsLog

    train(load_config(None, [
        "model.name_or_path=lorakit/tiny-llama", f"data.train={prompts}", "data.eval_fraction=0",
        "data.max_seq_len=128", "training.objective=grpo", f"training.init_from={sft}",
        f"training.max_steps={args.steps}", f"training.micro_batch_size={args.prompts}", f"training.lr={args.lr}",
        "training.schedule=constant", "training.warmup_steps=0", "grpo.group_size=8", "grpo.max_completion_len=16",
        "grpo.temperature=1.0", "grpo.beta=0.0", f"output.dir={out}", "output.tensorboard=false"]))
    return [float(r["reward"]) for r in MetricsLog.read(out / "metrics.csv") if r["reward"]]


def trl_rewards(sft: Path, records: list[dict], out: Path, args: argparse.Namespace) -> list[float]:
    import datasets
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from lorakit.builtin.model import builtin_model_dir

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_model_dir(), dtype=torch.float32),
                                      str(sft), is_trainable=True)
    eot = tokenizer.eos_token

    def exact_answer(completions, answer, **_):   # lorakit's exact_answer on TRL's conversational completions
        return [float(c[0]["content"].removesuffix(eot).strip().casefold() == a.strip().casefold())
                for c, a in zip(completions, answer, strict=True)]

    config = GRPOConfig(output_dir=str(out), per_device_train_batch_size=args.prompts * 8, num_generations=8,
                        max_completion_length=16, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo",
                        scale_rewards="group", num_iterations=1, use_vllm=False, bf16=False, use_cpu=True,
                        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                        max_grad_norm=1.0, max_steps=args.steps, logging_steps=1, report_to="none",
                        save_strategy="no", seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=exact_answer, args=config, processing_class=tokenizer,
                          train_dataset=datasets.Dataset.from_list(records))
    trainer.train()
    return [h["reward"] for h in trainer.state.log_history if "reward" in h]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sft-steps", type=int, default=350)
    args = parser.parse_args()

    from lorakit.builtin.tasks import builtin_data_files

    work = Path(tempfile.mkdtemp(prefix="bench_grpo_learning_"))
    rows = [json.loads(line) for line in open(builtin_data_files()["train"])][:args.prompts]
    records = [{"prompt": [r["messages"][0]], "answer": r["messages"][1]["content"]} for r in rows]
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    sft = sft_adapter(work / "sft", args.sft_steps)
    curves = {"lorakit GRPO": lorakit_rewards(sft, prompts, work / "lorakit", args),
              "TRL GRPOTrainer + PEFT": trl_rewards(sft, records, work / "trl", args)}
    window = max(1, args.steps // 3)
    print(f"\nGRPO on {args.prompts} fixed prompts x 8 completions, {args.steps} steps at lr {args.lr}, from the "
          f"{args.sft_steps}-step SFT adapter: mean sampled reward")
    print(f"| | steps 1-{window} | steps {args.steps - window + 1}-{args.steps} | rise |")
    print("|---|---|---|---|")
    for name, rewards in curves.items():
        first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
        print(f"| {name} | {first:.3f} | {last:.3f} | {last - first:+.3f} |")


if __name__ == "__main__":
    main()
