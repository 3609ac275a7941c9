"""`lorakit VERB ...`: one verb, one function.

    train CONFIG.yaml [key.sub=value ...] [--nproc N]   train an adapter (lorakit.train.loop.train)
    preview-data CONFIG.yaml [key=value ...]            samples as tokens, trained span marked
    eval CONFIG.yaml | --data FILE --model M            loss, perplexity, exact match
    merge ADAPTER_DIR --out DIR [--dtype]               base + adapter as a plain HF model directory
    combine DIR DIR ... --weights W W ... --method M --out DIR   several adapters as one adapter
    generate --prompt TEXT | --messages JSON            text from a model with adapters or merged
    chat                                                interactive chat
    inspect ADAPTER_DIR                                 what a saved adapter holds
    plan CONFIG.yaml [key=value ...] | --model M        parameters, adapter size, memory, hyperparameters
    compare RUN_DIR RUN_DIR ... [--out PLOT.png]        runs' settings and results side by side, loss curves
    serve --model M [--adapter NAME=DIR ...] [--adapters-dir DIR]   OpenAI-compatible multi-adapter server
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import get_args

from . import __version__
from .compose.settings import METHODS
from .dtypes import DtypeChoice, DtypeName, QuantizeBase
from .errors import LoraError


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                   "-m", "lorakit", "train", *([args.config] if args.config else []), *args.overrides]
        return subprocess.call(command)
    from .train.config import load_config
    from .train.loop import train

    train(load_config(args.config, args.overrides))
    return 0


def cmd_preview_data(args: argparse.Namespace) -> int:
    from .model_io import load_tokenizer
    from .train.config import load_config
    from .train.preview import preview_data

    cfg = load_config(args.config, args.overrides)
    print(preview_data(cfg, load_tokenizer(cfg.model.name_or_path, cfg.model.revision), args.n))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .verbs.evaluate import run_eval

    run = run_eval(args.config, args.overrides, data=args.data, model=args.model, adapters=args.adapter,
                   batch_size=args.batch_size, attn_implementation=args.attn_implementation)
    result = run.result
    em = f" exact_match={result.exact_match:.4f}" if result.exact_match is not None else ""
    print(f"eval_loss={result.loss:.4f} perplexity={result.ppl:.3f}{em} examples={result.n_examples}")
    if dropped := run.dropped_line():
        print(f"note: {dropped}; raise data.max_seq_len to score them" if run.records.dropped_by_truncation
              else f"note: {dropped}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .verbs.merge import merge_to_model_dir

    out = merge_to_model_dir(args.adapter_dir, args.out, dtype=args.dtype, base=args.base,
                             max_shard_size=args.max_shard_size, quantize_base=args.quantize_base,
                             attn_implementation=args.attn_implementation)
    print(f"merged model written to {out}/")
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    from .verbs.combine import combine_dirs

    out = combine_dirs(args.adapter_dirs, args.out, args.weights, args.method, base=args.base, density=args.density,
                       majority_sign=args.majority_sign, svd_rank=args.svd_rank, seed=args.seed)
    print(f"combined adapter ({args.method}) written to {out}/")
    return 0


def _device(flag: str) -> str:
    """The device `--device` names, checked here so that a bad one is reported as the flag the user
    gave (the library reports it as `model.device`), before any weights are read."""
    from .model_io import resolve_device

    return str(resolve_device(flag, source="--device"))


def cmd_generate(args: argparse.Namespace) -> int:
    from .files import read_text
    from .verbs.generate import generate_text, load_for_inference

    messages = None
    if args.messages is not None:   # before the model loads, so a bad argument fails at once
        text = read_text(args.messages) if os.path.isfile(args.messages) else args.messages
        try:
            messages = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoraError(f"--messages is not valid JSON (line {e.lineno}: {e.msg}); give a list of "
                            '{"role": ..., "content": ...} objects or a file holding one') from None
    model, tokenizer = load_for_inference(args.model, args.adapter, args.dtype, _device(args.device),
                                          args.attn_implementation)
    text = generate_text(model, tokenizer, prompt=args.prompt, messages=messages, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         stream=None if args.no_stream else sys.stdout)
    if args.no_stream:
        print(text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .verbs.generate import chat_loop, load_for_inference

    model, tokenizer = load_for_inference(args.model, args.adapter, args.dtype, _device(args.device),
                                          args.attn_implementation)
    chat_loop(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .io import read_adapter_config, read_adapter_weights

    config = read_adapter_config(args.adapter_dir)
    tensors = read_adapter_weights(args.adapter_dir)
    total = sum(t.numel() for t in tensors.values())
    targets = config.target_modules
    shown = targets if isinstance(targets, str) else f"{len(targets or [])} modules"
    print(f"adapter {args.adapter_dir}: r={config.r} lora_alpha={config.lora_alpha} use_rslora={config.use_rslora} "
          f"use_dora={config.use_dora} target_modules={shown}")
    print(f"{len(tensors)} tensors, {total:,d} parameters, dtypes {sorted({str(t.dtype) for t in tensors.values()})}")
    for key in sorted(tensors)[:8]:
        print(f"  {key} {tuple(tensors[key].shape)}")
    if len(tensors) > 8:
        print(f"  ... {len(tensors) - 8} more")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import make_plan, parse_size, render_json, render_text
    from .train.config import load_config

    plan = make_plan(load_config(args.config, args.overrides), model=args.model,
                     memory=parse_size(args.memory) if args.memory else None, examples=args.examples, task=args.task,
                     new_tokens=args.new_tokens, device=args.device, processes=args.nproc)
    print(render_json(plan) if args.json else render_text(plan))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .verbs.compare import compare_runs

    print(compare_runs(args.run_dirs, args.out))
    print(f"loss curves written to {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import logging

    from .serve import ServeConfig, require_extra

    require_extra()   # before loading any weights
    from .serve.server import load_server, run

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s:     %(message)s")
    config = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    loaded = load_server(args.model, args.adapter, args.adapters_dir, args.router, config,
                         served_model_name=args.served_model_name, dtype=args.dtype,
                         device=_device(args.device), attn_implementation=args.attn_implementation)
    run(loaded, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    import dataclasses

    from .schema import field_docs
    from .serve.config import ServeConfig

    p.add_argument("--model", required=True, help="base model directory or hub id (lorakit/tiny-llama: the built-in)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve the adapter in DIR as model NAME; repeat for more")
    p.add_argument("--adapters-dir", metavar="DIR", help="serve every adapter subdirectory of DIR (by its name) and "
                   "allow POST /v1/adapters to load more from inside DIR")
    p.add_argument("--router", metavar="DIR", help="a saved Router: model 'auto' picks the adapter per request")
    p.add_argument("--served-model-name", help="the name that means the base model (default: --model as given)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", choices=get_args(DtypeChoice))
    p.add_argument("--device", default="auto")
    _attention_arg(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    docs = field_docs(ServeConfig)
    for f in dataclasses.fields(ServeConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=int if f.type == "int" else float, default=f.default,
                       help=f"{docs.get(f.name, '')} (default {f.default})")


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory or hub id (default: the first adapter's base)")
    p.add_argument("--adapter", action="append", default=[], help="adapter directory; repeat to sum several")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", default="auto", choices=get_args(DtypeChoice))
    p.add_argument("--device", default="auto")
    _attention_arg(p)


def _attention_arg(p: argparse.ArgumentParser, default: str | None = "auto", shown: str = "auto") -> None:
    p.add_argument("--attn-implementation", default=default, metavar="NAME",
                   help="transformers attention implementation: auto (transformers' choice for the model: sdpa, or "
                        f"eager where the model has no sdpa, as Gemma 2), sdpa, eager, flash_attention_2, ... "
                        f"(default {shown})")


def build_parser() -> argparse.ArgumentParser:
    from .plan.tasks import TASK_RANKS
    from .schema import reference_text
    from .train.config import TrainConfig

    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning toolkit (PEFT-compatible).")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("train", help="train an adapter from a YAML config",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Train a LoRA adapter. Settings come from CONFIG.yaml, then key.sub=value "
                                     "overrides.", epilog="configuration keys:\n" + reference_text(TrainConfig))
    p.add_argument("config", nargs="?", help="YAML config (omit for the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. training.lr=1e-4")
    p.add_argument("--nproc", type=int, help="launch this many processes with torchrun (strategy ddp or fsdp)")
    p.set_defaults(run=cmd_train)

    p = verbs.add_parser("preview-data", help="show training samples as tokens with the trained span marked")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("-n", type=int, default=3, help="samples to show")
    p.set_defaults(run=cmd_preview_data)

    p = verbs.add_parser("eval", help="loss, perplexity and exact match on evaluation data")
    p.add_argument("config", nargs="?", help="a train config: its model, data.eval and output.dir adapter")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--data", help="evaluation file (instead of the config's)")
    p.add_argument("--model", help="base model (instead of the config's)")
    p.add_argument("--adapter", action="append", help="adapter directory (default: the config's output.dir)")
    p.add_argument("--batch-size", type=int, default=8)
    _attention_arg(p, default=None, shown="the config's model.attn_implementation")
    p.set_defaults(run=cmd_eval)

    p = verbs.add_parser("merge", help="write base + adapter as a plain Hugging Face model directory")
    p.add_argument("adapter_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=get_args(DtypeName), help="default: the base model's dtype")
    p.add_argument("--base", help="base model (default: the adapter config's base_model_name_or_path)")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--quantize-base", choices=get_args(QuantizeBase),
                   help="merge into the NF4-dequantized base a QLoRA adapter trained on (default: as the run's "
                        "config.yaml says, else none)")
    _attention_arg(p)
    p.set_defaults(run=cmd_merge)

    p = verbs.add_parser("combine", help="combine several adapters into one (linear, cat, svd, ties, dare, ...)")
    p.add_argument("adapter_dirs", nargs="+", help="adapter directories (PEFT format)")
    p.add_argument("--weights", type=float, nargs="+", required=True, help="one weight per adapter")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--density", type=float, help="fraction of entries kept (ties, dare, magnitude_prune)")
    p.add_argument("--majority-sign", default="total", choices=["total", "frequency"], help="TIES sign election")
    p.add_argument("--svd-rank", type=int, help="rank of the *svd results (default: the largest input rank)")
    p.add_argument("--seed", type=int, help="seed of the DARE masks")
    p.add_argument("--base", help="base model (default: the first adapter config's base_model_name_or_path)")
    p.add_argument("--out", required=True, help="output adapter directory (must be new or empty)")
    p.set_defaults(run=cmd_combine)

    p = verbs.add_parser("generate", help="generate text with a model and adapters")
    _generation_args(p)
    p.add_argument("--prompt", help="raw text prompt")
    p.add_argument("--messages", help="chat messages as JSON, or a file holding them")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    p.set_defaults(run=cmd_generate)

    p = verbs.add_parser("chat", help="interactive chat (stdin; /exit or EOF ends)")
    _generation_args(p)
    p.add_argument("--system", help="system prompt")
    p.set_defaults(run=cmd_chat)

    p = verbs.add_parser("inspect", help="show what a saved adapter directory holds")
    p.add_argument("adapter_dir")
    p.set_defaults(run=cmd_inspect)

    p = verbs.add_parser("plan", help="trainable parameters, adapter size, peak memory and starting hyperparameters "
                                      "of a run, without loading weights")
    p.add_argument("config", nargs="?", help="a train config (omit for the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. lora.r=16 data.max_seq_len=4096")
    p.add_argument("--model", help="model directory, its config.json, or a hub id (instead of model.name_or_path)")
    p.add_argument("--memory", help="memory to fit, e.g. 24GB (binary units, as GPUs are sold)")
    p.add_argument("--examples", type=int, help="training examples (default: counted from the config's data files)")
    p.add_argument("--task", choices=list(TASK_RANKS), help="what the adapter should learn, for the rank suggestion")
    p.add_argument("--new-tokens", type=int, default=0, help="tokens you add to the vocabulary")
    p.add_argument("--device", choices=["cuda", "cpu"], help="plan for (default: cuda unless model.device is cpu)")
    p.add_argument("--nproc", type=int, default=1, help="processes of a training.strategy ddp or fsdp run, as "
                   "lorakit train --nproc takes them; the memory is then per process (default 1, whatever "
                   "WORLD_SIZE says)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_plan)

    p = verbs.add_parser("compare", help="training runs side by side: key settings, final losses and exact match, "
                                         "and one plot of their loss curves")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (output.dir of lorakit train)")
    p.add_argument("--out", default="compare.png", help="the loss-curve plot to write (default: compare.png)")
    p.set_defaults(run=cmd_compare)

    p = verbs.add_parser("serve", help="serve the base model and many adapters over an OpenAI-compatible HTTP API")
    _serve_args(p)
    p.set_defaults(run=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = getattr(args, "config", None)
    if config is not None and "=" in config and not os.path.exists(config):   # no config, only overrides
        args.overrides, args.config = [config, *args.overrides], None
    try:
        return args.run(args)
    except LoraError as e:
        message = str(e)
    except OSError as e:
        # lorakit's own FileNotFoundErrors carry a whole message; the system's name the file. One
        # naming no file (a dropped connection, a disk failing mid-write) is not the user's input
        # being wrong, so it keeps its traceback, as every other exception does.
        if e.filename is None and not isinstance(e, FileNotFoundError):
            raise
        message = str(e) if e.filename is None else f"{e.filename}: {e.strerror}"
    print(f"lorakit {args.verb}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
