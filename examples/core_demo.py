"""The lorakit core in one run, offline, on a tiny Llama built from a config.

1. add a LoRA adapter to every linear layer (the base is frozen; B = 0, so the output is unchanged);
2. train it for a few hundred steps on a task the random base cannot do (count upwards modulo the
   vocabulary: after token t comes t + 1) and show the eval loss and next-token accuracy before
   and after;
3. merge it into the weights (same logits), save it in PEFT's format, load it into a fresh copy
   of the base (same logits again), and unload to a plain transformers model.

Run: `make demo` (or `python examples/core_demo.py [--steps N] [--out DIR]`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import lorakit as lk

VOCAB = 64


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg)


def counting_batch(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Rows like [s, s+1, s+2, ...] modulo VOCAB, random start s."""
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    return (start + torch.arange(length)) % VOCAB                       # (n, length)


@torch.no_grad()
def evaluate(model, ids: torch.Tensor) -> tuple[float, float]:
    model.eval()
    out = model(ids, labels=ids)
    accuracy = (out.logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item()
    return out.loss.item(), accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default="runs/core_demo", help="where the adapter is saved")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    hf_logging.disable_progress_bar()

    gen = torch.Generator().manual_seed(0)
    eval_ids = counting_batch(32, 24, gen)
    model = tiny_llama()
    base_logits = model.eval()(eval_ids).logits

    lk.add_adapter(model, lk.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear"))
    print(lk.trainable_summary(model))
    assert torch.equal(model(eval_ids).logits, base_logits), "B = 0 at init: the output must equal the base"
    loss0, acc0 = evaluate(model, eval_ids)
    print(f"before training: eval loss {loss0:.3f}, next-token accuracy {acc0:.1%}")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        model.train()
        ids = counting_batch(16, 24, gen)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}  train loss {loss.item():.3f}")
    loss1, acc1 = evaluate(model, eval_ids)
    print(f"after {args.steps} steps ({time.perf_counter() - start:.0f}s): eval loss {loss1:.3f}, "
          f"next-token accuracy {acc1:.1%}")

    prompt = eval_ids[:1, :4]
    with lk.disable_adapters(model):
        before = model.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()
    after = model.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()
    print(f"generate from {prompt[0].tolist()}: base -> {before[4:]}, with adapter -> {after[4:]}")

    adapted = model(eval_ids).logits
    lk.merge_adapters(model)
    merged_err = (model(eval_ids).logits - adapted).abs().max().item()
    lk.unmerge_adapters(model)

    out = Path(args.out)
    lk.save_adapter(model, out)
    fresh = tiny_llama().eval()
    lk.load_adapter(fresh, out)
    reload_err = (fresh(eval_ids).logits - adapted).abs().max().item()
    plain = lk.unload(fresh, merge=True)
    unload_err = (plain(eval_ids).logits - adapted).abs().max().item()
    print(f"merged vs unmerged logits: max |diff| {merged_err:.1e}")
    print(f"saved to {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))}); reloaded: max |diff| {reload_err:.1e}")
    print(f"unloaded to a plain {type(plain).__name__}: max |diff| {unload_err:.1e}")
    with tempfile.TemporaryDirectory() as tmp:   # the plain model saves like any transformers model
        plain.save_pretrained(tmp)
        reloaded = LlamaForCausalLM.from_pretrained(tmp).eval()
        print(f"save_pretrained + from_pretrained of the merged model: max |diff| "
              f"{(reloaded(eval_ids).logits - adapted).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
