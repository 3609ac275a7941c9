"""Semantic routing over a library of single-task adapters, on the built-in tasks.

Trains one adapter per built-in task (sentiment, compare, parity, count) on that task's training
prompts only, cached under runs/bench_routing/ (reused while the recipe is unchanged), and the
4-task adapter of examples/quickstart.yaml for comparison. Then, on the 200 held-out prompts:

  - routing accuracy of `lk.Router` (base-model embeddings) by the number of example prompts
    registered per task, and with one-sentence descriptions instead of examples (with and
    without the chat template around the texts embedded);
  - exact match of greedy answers: the base model; each prompt with its own task's adapter (the
    oracle); routed (`Router.generate`: route, then one batch with per-sample adapters); each
    prompt with the next task's adapter (what a routing mistake costs); the 4-task adapter;
  - fallback: thresholds fitted (`Router.fit`) on labelled prompts, tasks plus generic sentences
    labelled "__base__", then routing accuracy on held-out prompts of both kinds;
  - time: routing (embedding) per prompt against routed and oracle generation.

    .venv/bin/python bench/bench_routing.py             # part of `make bench`
    .venv/bin/python bench/bench_routing.py --multitask-adapter runs/quickstart --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import lorakit as lk
from lorakit.builtin import builtin_data_files, builtin_model_dir
from lorakit.builtin.model import VERSION as MODEL_VERSION
from lorakit.builtin.model import pretraining_document
from lorakit.builtin.tasks import DATA_VERSION, task_of
from lorakit.model_io import load_model, load_tokenizer
from lorakit.train.config import load_config
from lorakit.train.evaluate import generate_greedy
from lorakit.train.loop import train

TASKS = ["sentiment", "compare", "parity", "count"]
DESCRIPTIONS = {
    "sentiment": "Say whether a review of a restaurant or hotel is positive or negative.",
    "compare": "Say whether one number is larger than another.",
    "parity": "Say whether a number is even or odd.",
    "count": "Count how many words are in a list.",
}
QUICKSTART = "examples/quickstart.yaml"
# The single-task recipe: quickstart's adapter and optimiser (16 rows per step) with fewer steps
# than the 750 of the 4-task run. Held-out exact match per task (sentiment, compare, parity,
# count) was 0.76 / 0.58 / 1.00 / 0.90 after 150 steps and 1.00 / 0.96 / 1.00 / 0.94 after 300.
SINGLE_TASK = ["training.warmup_steps=10", "output.tensorboard=false"]


def chat_rows(split: str) -> list[dict]:
    return [json.loads(line) for line in open(builtin_data_files()[split], encoding="utf-8")]


def train_cached(out: Path, overrides: list[str], stamp: dict) -> Path:
    """Train with `overrides` into `out` unless it already holds an adapter made with `stamp`."""
    stamp_file = out / "bench_stamp.json"
    done = (out / "adapter_config.json").is_file() and stamp_file.is_file()
    if done and json.loads(stamp_file.read_text()) == stamp:
        print(f"reusing {out}")
        return out
    t0 = time.perf_counter()
    train(load_config(QUICKSTART, overrides + [f"output.dir={out}"]))
    stamp_file.write_text(json.dumps(stamp) + "\n")
    print(f"trained {out} in {time.perf_counter() - t0:.0f} s")
    return out


def train_library(root: Path, steps: int, multitask: bool, multitask_adapter: str | None) -> dict[str, Path]:
    rows = chat_rows("train")
    paths = {}
    for task in TASKS:
        data = root / "data" / f"train_{task}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows if task_of(r["messages"][0]["content"]) == task))
        stamp = {"task": task, "steps": steps, "recipe": SINGLE_TASK, "data": DATA_VERSION, "model": MODEL_VERSION}
        paths[task] = train_cached(root / "adapters" / task, SINGLE_TASK + [f"data.train={data}",
                                                                            f"training.max_steps={steps}"], stamp)
    if multitask_adapter:
        paths["all"] = Path(multitask_adapter)
    elif multitask:
        stamp = {"task": "all", "recipe": QUICKSTART, "data": DATA_VERSION, "model": MODEL_VERSION}
        paths["all"] = train_cached(root / "adapters" / "all", ["output.tensorboard=false"], stamp)
    return paths


def chat_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True), add_special_tokens=False).input_ids
            for p in prompts]


def answers(model, tokenizer, prompts: list[str], names: list[str], batch: int, max_new: int) -> list[str]:
    """Greedy answers, each prompt under its own adapter ("__base__": none), `batch` rows at a time."""
    ids, out = chat_ids(tokenizer, prompts), []
    for i in range(0, len(prompts), batch):
        with lk.per_sample_adapters(model, names[i:i + batch]), torch.no_grad():
            out += generate_greedy(model, tokenizer, ids[i:i + batch], model.device, max_new)
    return out


def exact_match(outputs: list[str], refs: list[str], tasks: list[str]) -> dict[str, float]:
    hits = [o.strip() == r.strip() for o, r in zip(outputs, refs, strict=True)]
    scores = {t: [h for h, k in zip(hits, tasks, strict=True) if k == t] for t in TASKS}
    return {**{t: sum(s) / len(s) for t, s in scores.items()}, "all": sum(map(sum, scores.values())) / len(outputs)}


def routing_accuracy(chosen: list[str], labels: list[str]) -> float:
    return sum(c == x for c, x in zip(chosen, labels, strict=True)) / len(labels)


def generic_prompts(seed: int, n: int) -> list[str]:
    """Generic text from the base model's pretraining distribution: no task, so "__base__"."""
    rng = random.Random(seed)
    return [pretraining_document(rng).replace("\n", " ") for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per single-task adapter")
    parser.add_argument("--examples", type=int, default=16, help="example prompts registered per task")
    parser.add_argument("--no-multitask", action="store_true", help="skip the 4-task adapter (750 steps)")
    parser.add_argument("--multitask-adapter", help="use this 4-task adapter instead of training one, e.g. "
                                                    "runs/quickstart after `make demo`")
    parser.add_argument("--root", default="runs/bench_routing", help="cache of data and adapters")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=50, help="rows per generate call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.root)

    paths = train_library(root, args.steps, not args.no_multitask, args.multitask_adapter)
    model = load_model(str(builtin_model_dir()), dtype="fp32", device="cpu")
    tokenizer = load_tokenizer(str(builtin_model_dir()))
    for name, path in paths.items():
        lk.load_adapter(model, path, name=name)
    train_prompts = {t: [r["messages"][0]["content"] for r in chat_rows("train")
                         if task_of(r["messages"][0]["content"]) == t] for t in TASKS}
    rows = chat_rows("eval")
    prompts = [r["messages"][0]["content"] for r in rows]
    refs = [r["messages"][1]["content"] for r in rows]
    labels = [task_of(p) for p in prompts]
    max_new = max(len(tokenizer(r, add_special_tokens=False).input_ids) for r in refs) + 8
    print(f"\n{len(prompts)} held-out prompts ({', '.join(f'{labels.count(t)} {t}' for t in TASKS)}); "
          f"torch threads {args.threads}\n")

    # -- routing accuracy -------------------------------------------------------------------
    print("| registered per task | routing accuracy | wrong routes |\n|---|---|---|")
    for k in (1, 4, 16, 64):
        router = lk.Router(model, tokenizer)
        for t in TASKS:
            router.register(t, examples=train_prompts[t][:k])
        acc = routing_accuracy(router.choose(prompts), labels)
        print(f"| {k} example{'s' if k > 1 else ''} | {acc:.3f} | {round((1 - acc) * len(prompts))} |")
    for with_examples, template in ((0, True), (0, False), (args.examples, True)):
        router = lk.Router(model, tokenizer, chat_template=template)
        for t in TASKS:
            router.register(t, description=DESCRIPTIONS[t], examples=train_prompts[t][:with_examples])
        acc = routing_accuracy(router.choose(prompts), labels)
        what = "description only" if not with_examples else f"description + {with_examples} examples"
        what += "" if template else ", no chat template"
        print(f"| {what} | {acc:.3f} | {round((1 - acc) * len(prompts))} |")

    # -- exact match ------------------------------------------------------------------------
    router = lk.Router(model, tokenizer)
    for t in TASKS:
        router.register(t, examples=train_prompts[t][:args.examples])
    t0 = time.perf_counter()
    chosen = router.choose(prompts)
    t_route = time.perf_counter() - t0
    t0 = time.perf_counter()
    routed = []
    for i in range(0, len(prompts), args.batch):
        routed += router.generate(prompts[i:i + args.batch], max_new_tokens=max_new, do_sample=False)
    t_routed = time.perf_counter() - t0
    assert [n for n, _ in routed] == chosen
    t0 = time.perf_counter()
    oracle = answers(model, tokenizer, prompts, labels, args.batch, max_new)
    t_oracle = time.perf_counter() - t0
    cases = [
        ("base (no adapter)", answers(model, tokenizer, prompts, ["__base__"] * len(prompts), args.batch, max_new)),
        ("oracle: own task's adapter", oracle),
        (f"routed ({args.examples} examples per task)", [text for _, text in routed]),
        ("next task's adapter", answers(model, tokenizer, prompts, [TASKS[(TASKS.index(t) + 1) % 4] for t in labels],
                                        args.batch, max_new)),
    ]
    if "all" in paths:
        cases.append(("4-task adapter (quickstart)", answers(model, tokenizer, prompts, ["all"] * len(prompts),
                                                             args.batch, max_new)))
    print(f"\nrouting accuracy {routing_accuracy(chosen, labels):.3f}; single-task adapters trained "
          f"{args.steps} steps\n")
    print("| adapter per prompt | " + " | ".join(TASKS) + " | all |\n|---|" + "---|" * (len(TASKS) + 1))
    for name, outputs in cases:
        em = exact_match(outputs, refs, labels)
        print(f"| {name} | " + " | ".join(f"{em[t]:.2f}" for t in TASKS) + f" | **{em['all']:.3f}** |")
    same = [r == o for (n, r), o, t in zip(routed, oracle, labels, strict=True) if n == t]
    print(f"\nrouted == oracle text on the {len(same)} prompts routed to their own adapter: {sum(same)}/{len(same)}")
    print(f"time: routing {1000 * t_route / len(prompts):.1f} ms/prompt; routed generation (routing included) "
          f"{t_routed:.1f} s; oracle generation {t_oracle:.1f} s ({args.batch} rows per batch)")

    # -- fallback to the base ---------------------------------------------------------------
    fit_prompts = [p for t in TASKS for p in train_prompts[t][100:125]] + generic_prompts(1, 100)
    fit_labels = [task_of(p) for p in fit_prompts[:100]] + ["__base__"] * 100
    test_prompts = prompts + generic_prompts(2, 100)
    test_labels = labels + ["__base__"] * 100
    print("\n| thresholds | fit set accuracy | held-out: task prompts routed right | held-out: generic text to base "
          "| held-out accuracy |\n|---|---|---|---|---|")
    for fitted in (False, True):
        fit_acc = router.fit(fit_prompts, fit_labels).accuracy if fitted else routing_accuracy(
            router.choose(fit_prompts), fit_labels)
        got = router.choose(test_prompts)
        task_ok = routing_accuracy(got[:len(prompts)], test_labels[:len(prompts)])
        base_ok = routing_accuracy(got[len(prompts):], test_labels[len(prompts):])
        what = ("fitted: " + ", ".join(f"{t} {v:.3f}" for t, v in router.thresholds.items()) if fitted
                else "0 (never fall back)")
        accuracy = routing_accuracy(got, test_labels)
        print(f"| {what} | {fit_acc:.3f} | {task_ok:.3f} | {base_ok:.3f} | {accuracy:.3f} |")


if __name__ == "__main__":
    main()
