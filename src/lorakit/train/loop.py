"""`lorakit train`: the training loop, top to bottom.

    setup       lock output.dir -> load tokenizer, model and data -> add the adapter (or a mixture over
                saved adapters) -> (resume) -> evaluate
    for each optimizer step (SIGTERM / SIGINT: stop after it, with a checkpoint):
      train_step  grad_accum micro-batches: loss summed over trained tokens, divided by the trained
                  tokens of the whole step (all micro-batches, all processes), plus a mixture's
                  weighted auxiliary losses averaged over the micro-batches -> backward
                  clip -> lr from the schedule (a pure function of the step) -> AdamW step
      after_step  log, evaluate every N, checkpoint every N
    finish      evaluate -> write the run directory (adapter, tokenizer, config, metrics, plot, card)

What a step minimises, and the micro-batches it computes that on, are its objective's
(lorakit.train.objective, `training.objective`): supervised fine-tuning, the preference losses
(lorakit.train.preference) or GRPO (lorakit.train.grpo), with the loop unchanged.

Data order is a pure function of (seed, epoch) (lorakit.train.data.RowStream): each epoch is a
seeded permutation of the rows and the loop keeps (epoch, position) as the data state, so a resumed
run sees exactly the rows the interrupted run would have seen.

With N processes (torchrun; `training.strategy` ddp or fsdp) each global micro-batch is the
micro-batch a single process with N x `micro_batch_size` rows would take, cut into N slices, one
per process; gradients are averaged over processes, so N processes train the same adapter as one
process with the same global batch. Every process evaluates and gathers the state to save (FSDP2
needs all of them for that); only rank 0 writes files.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from tqdm import tqdm

from .. import inject, io
from ..errors import LoraError
from ..model_io import load_model, load_tokenizer, resolve_device
from ..progress import LogLines, progress
from ..schema import to_dict
from ..verbs.merge import merge_to_model_dir
from . import checkpoint as ckpt
from .compilation import compile_decoder_layers
from .config import TrainConfig, TrainingSection
from .data import Example, RowStream, build_datasets, pack
from .distributed import Dist
from .evaluate import EvalResult, evaluate
from .grpo import grpo_rewards
from .kernels import kernels_wanted, use_kernels
from .loss import trained_tokens
from .memory import PeakMemory
from .metrics import MetricsLog, plot_losses
from .objective import SFT, Batch, Metrics, Objective
from .objectives import build_objective
from .preference_data import build_objective_data
from .reference import REFERENCE_ADAPTER
from .report import RunSummary, eval_line, eval_row, model_card, print_summary, printer
from .run_dir import RunLock, remove_leftovers
from .schedule import lr_at
from .signals import StopOnSignal, TrainingInterrupted
from .trackers import open_trackers
from .trainee import Trainee, trainee_for


class TrainingDiverged(LoraError):
    """The loss became NaN or inf; a checkpoint of the last good state was written."""


def train(cfg: TrainConfig) -> RunSummary:
    """Run the training `cfg` describes; what it changed outside the model (the Triton kernels'
    RoPE, a process-wide patch, the lock of output.dir, the signal handlers) is undone when it
    returns or fails. SIGTERM or SIGINT during the steps ends the run with `TrainingInterrupted`
    after the step under way, its checkpoint written."""
    with ExitStack() as cleanup:
        run = setup(cfg, cleanup)
        if isinstance(run, RunSummary):   # resumed from its last step: nothing to train, nothing changed
            return run
        with run.stop:
            for step in range(run.start, run.total_steps):
                stats = train_step(run, step)
                after_step(run, step, stats)
        return finish(run)


@dataclass
class Run:
    """What `setup` made, and the progress the steps make."""
    cfg: TrainConfig
    resolved: dict
    """The config as written to `config.yaml` and into every checkpoint."""
    out: Path
    dist: Dist
    tokenizer: Any
    model: nn.Module
    """The user's model, the trainee attached."""
    step_model: nn.Module
    """What the step calls: `model`, or its DDP wrapper."""
    trainee: Trainee
    objective: Objective
    eval_examples: list[Example]
    optimizer: torch.optim.AdamW
    autocast: Callable[[], AbstractContextManager]
    peak: PeakMemory
    log: Callable[[str], None]
    metrics: MetricsLog | None
    """On the main process only."""
    start: int
    """The first step to run: 0, or the step of the checkpoint resumed from."""
    total_steps: int
    stream: RowStream
    evaluates: bool = False
    """Whether there is held-out data: reference completions for the SFT evaluation, or the
    objective's own held-out examples (GRPO prompts without answers, say)."""
    eval_before: EvalResult | None = None
    losses: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    """Input tokens of this process's micro-batches so far, for the throughput."""
    t0: float = 0.0
    """`time.perf_counter()` when the steps began, for the throughput."""
    bar: tqdm | LogLines | None = None
    stop: StopOnSignal = field(default_factory=StopOnSignal)


@dataclass
class StepStats:
    """What one optimizer step measured: the training columns of its metrics row."""
    loss: float
    """Mean loss per trained token of the step, over all processes."""
    lr: float
    grad_norm: float | None
    """Before clipping; None without `training.max_grad_norm`."""
    trained_tokens: int
    """Of the whole step, all processes."""
    tokens: int
    """Input tokens of this process's micro-batches."""
    aux: dict[str, float]
    """A mixture's auxiliary losses, each averaged over the micro-batches and processes."""
    stop: bool
    """A process got SIGTERM or SIGINT before the step's loss was summed: all of them stop after it."""


def setup(cfg: TrainConfig, cleanup: ExitStack) -> Run | RunSummary:
    """Everything before the first step, the evaluation before training included, in an order the
    random draws depend on: the adapter's initialisation follows the seed, and from there each
    process draws its own dropout masks. Resuming a run that is complete (its checkpoint is at the
    last step) returns the summary instead, before anything in the run directory is touched."""
    t = cfg.training
    cfg.check_adapter_paths()
    out = Path(cfg.output.dir)
    dist = Dist.setup(t.strategy, resolve_device(cfg.model.device))
    device = dist.device
    peak = PeakMemory(device)
    torch.manual_seed(t.seed)
    log = printer(dist.is_main)
    _lock_run_dir(out, dist, cleanup, log)
    _warn_of_another_base(cfg, log)

    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    if cfg.data.chat_template:   # saved with the tokenizer, so generation uses the template trained on
        tokenizer.chat_template = cfg.data.chat_template
    rewards = None   # the data and GRPO's reward functions are checked before the (slow) model load
    if t.objective == "sft":
        train_examples, eval_examples, report = build_datasets(cfg.data, tokenizer, t.seed)
        rows = pack(train_examples, cfg.data.max_seq_len) if cfg.data.packing else train_examples
    else:
        data = build_objective_data(cfg.data, tokenizer, t.seed, t.objective)
        rows, eval_examples, report = data.train, data.eval_sft, data.report
        if t.objective == "grpo":
            rewards = grpo_rewards(cfg.grpo, data.train, data.eval)
    for line in report.lines():
        log(line)
    model = load_model(cfg.model.name_or_path, cfg.model.dtype, str(device), cfg.model.attn_implementation,
                       cfg.model.revision, cfg.model.trust_remote_code, cfg.model.quantize_base)

    trainee = trainee_for(cfg)
    trainee.attach(model)
    if cfg.training.reference_adapter:
        io.load_adapter(model, cfg.training.reference_adapter, REFERENCE_ADAPTER, trainable=False, activate=False)
        log(f"reference: the adapter {cfg.training.reference_adapter} (frozen)")
    if t.objective != "sft" and _disable_base_dropout(model):
        log("dropout of the base model off: the policy is scored against a reference without it (as TRL's "
            "disable_dropout); lora.lora_dropout still applies to the adapter")
    if dist.world > 1:   # the same initial adapter on every process; from here, each its own dropout masks
        torch.manual_seed(t.seed + dist.rank)
    model.train()
    kernels_on = _prepare_model(model, t, device, cleanup, log)
    log(inject.trainable_summary(model))
    experts = inject.expert_summary(model)
    if experts:
        log(experts)
    step_model = dist.wrap(model)
    if dist.world > 1:
        log(dist.describe(model))
    optimizer = build_optimizer(model, t.lr, t.weight_decay, t.lora_plus_ratio, device)   # after wrap: FSDP2 swaps params

    global_rows = t.micro_batch_size * t.grad_accum * dist.world
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * len(rows) / global_rows))
    resolved = to_dict(cfg)
    start, stream = 0, RowStream(len(rows), t.seed)
    resume_from = ckpt.find_resume_checkpoint(t.resume, out) if t.resume else None
    if resume_from is not None:
        _check_same_run(ckpt.read_checkpoint_config(resume_from), resolved, resume_from)
        state = ckpt.load_checkpoint(resume_from, model, optimizer, trainee, dist)
        start, stream = state.step, RowStream(len(rows), t.seed, state.epoch, state.position)
        if start >= total_steps:
            log(f"already complete at step {start} of {total_steps} ({resume_from}); nothing was changed. "
                "To train further, raise training.max_steps")
            dist.close()
            return RunSummary(out, start, None, None, tokens_per_s=0.0, peak_memory_bytes=0, losses=[])
        log(f"resumed from {resume_from} at step {start}")
    use_bf16 = t.bf16 is True or (t.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    if t.objective == "sft":
        objective = SFT(rows, tokenizer.pad_token_id, t.micro_batch_size, t.grad_accum, chunked=t.chunked_loss,
                        kernel=kernels_on)
    else:
        objective = build_objective(cfg, data, tokenizer, model, dist, autocast, log, rewards)
    metrics = None
    if dist.is_main:
        resume_step = start if resume_from else None
        trackers = open_trackers(cfg, out, resolved, resume_step, log)   # one not installed stops the run here
        metrics = cleanup.enter_context(MetricsLog(out, resume_step, trackers,   # a failure ends them as failed
                                                   (*objective.columns, *objective.eval_columns)))
    run = Run(cfg, resolved, out, dist, tokenizer, model, step_model, trainee, objective, eval_examples, optimizer,
              autocast, peak, log, metrics, start, total_steps, stream,
              evaluates=bool(eval_examples) or objective.held_out > 0)
    if run.evaluates and start == 0:
        run.eval_before = _evaluate(run)
        log(eval_line("before training", run.eval_before))
        if metrics:
            metrics.log({"step": 0, "epoch": 0, **eval_row(run.eval_before)})
    run.t0 = time.perf_counter()
    run.bar = progress(total_steps, "train", initial=start, enabled=dist.is_main)
    cleanup.callback(run.bar.close)   # on a failure too, so that the error starts a line of its own
    return run


def train_step(run: Run, step: int) -> StepStats:
    """One optimizer step on the objective's micro-batches. A loss that is not finite raises
    `TrainingDiverged` before the optimizer steps, with the state before this step saved."""
    t, dist = run.cfg.training, run.dist
    micro = run.objective.batches(run.stream, dist)
    # (K + 1,): the terms each of the loss's K parts sums, over the whole step, and its trained (label)
    # tokens, for the log: an objective's count may be pairs or completions instead
    counts = dist.sum(sum(torch.cat([torch.atleast_1d(run.objective.count(b)).float(),
                                     trained_tokens(b["labels"]).float()[None]]).to(dist.device) for b in micro))
    n_trained, labelled = counts[:-1], counts[-1]
    step_loss, aux_sums, tokens = _backward(run, micro, n_trained)
    # the stop flag rides on the loss's sum, so every process sees the same one at the same step
    summed = dist.sum(torch.cat([step_loss, torch.tensor([float(run.stop.requested)], device=dist.device)]))
    total, stop = summed[:-1], summed[-1]
    mean_loss = (total / n_trained.clamp(min=1)).sum().item()
    if not math.isfinite(mean_loss):   # summed over processes: all of them stop here together
        run.optimizer.zero_grad(set_to_none=True)
        where = _save(run, step)
        raise TrainingDiverged(
            f"the loss became {mean_loss} at step {step + 1}; stopped with the last good state saved in {where}. "
            "Lower training.lr, keep training.max_grad_norm set, or check the data for broken samples"
        )
    grad_norm = None
    if t.max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]],
                                              t.max_grad_norm)
        grad_norm = float(io.gather_full(norm))   # over FSDP2 shards a DTensor: the norm of the whole gradient
    lr = lr_at(step, run.total_steps, t.lr, t.warmup_steps, t.schedule)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    aux = {k: (dist.sum(v) / (t.grad_accum * dist.world)).item() for k, v in aux_sums.items()}
    aux.update(_reduce_metrics(run.objective.take_metrics(), dist))
    return StepStats(mean_loss, lr, grad_norm, int(labelled.item()), tokens, aux, bool(stop.item()))


def _reduce_metrics(metrics: Metrics, dist: Dist) -> dict[str, float]:
    """{column: sum / count} over all processes, in one collective."""
    if not metrics:
        return {}
    names = sorted(metrics)
    sums = dist.sum(torch.stack([torch.stack([torch.as_tensor(metrics[k][0], dtype=torch.float32, device=dist.device),
                                              torch.as_tensor(metrics[k][1], dtype=torch.float32, device=dist.device)])
                                 for k in names]))                                 # (columns, 2)
    return {k: s / c if c > 0 else None for k, (s, c) in zip(names, sums.tolist(), strict=True)}


def _backward(run: Run, micro: list[Batch], n_trained: Tensor) -> tuple[Tensor, dict[str, Tensor], int]:
    """Forward and backward of each micro-batch, gradients accumulating; returns this process's loss
    sum, its sums of the trainee's auxiliary losses and its input tokens."""
    t, dist = run.cfg.training, run.dist
    step_loss = torch.zeros(n_trained.shape, device=dist.device)
    aux_sums: dict[str, Tensor] = {}
    tokens = 0
    try:
        with run.peak.step(max(b["input_ids"].numel() for b in micro), run.model, run.optimizer):
            for batch in micro:
                batch = {k: v.to(dist.device) for k, v in batch.items()}
                with run.autocast():
                    s = torch.atleast_1d(run.objective.loss(run.step_model, batch))   # (K,)
                aux = run.trainee.aux_losses(run.model)
                # DDP averages gradients over processes: scale by world so the result is the sum / n_trained
                loss = ((s * dist.world / n_trained.clamp(min=1)).sum()
                        + sum(w * v for w, v in aux.values()) / t.grad_accum)
                loss.backward()
                step_loss += s.detach()
                for name, (_, v) in aux.items():
                    aux_sums[name] = aux_sums.get(name, 0) + v.detach()
                tokens += int(batch["input_ids"].numel())
    except torch.OutOfMemoryError:
        raise LoraError(
            "out of memory in the training step. Reduce training.micro_batch_size (raise training.grad_accum to "
            "keep the batch), reduce data.max_seq_len, set training.gradient_checkpointing: true, or "
            "lower lora.r / target fewer modules"
        ) from None
    return step_loss, aux_sums, tokens


def after_step(run: Run, step: int, stats: StepStats) -> None:
    """Log the step, evaluate every `eval_every` steps, checkpoint every `save_every` and at the end;
    on a signal, checkpoint and raise `TrainingInterrupted`."""
    t, dist, done = run.cfg.training, run.dist, step + 1
    run.losses.append(stats.loss)
    run.tokens_seen += stats.tokens
    elapsed = time.perf_counter() - run.t0
    tok_s = run.tokens_seen * dist.world / max(elapsed, 1e-9)
    shown = {name: f"{stats.aux[name]:.4f}" for name in run.objective.progress if stats.aux.get(name) is not None}
    run.bar.set_postfix(loss=f"{stats.loss:.4f}", **shown, lr=f"{stats.lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
    run.bar.update(1)
    row = {"step": done, "epoch": round(run.stream.epochs_done, 4), "loss": stats.loss, "lr": stats.lr,
           "grad_norm": stats.grad_norm, "trained_tokens": stats.trained_tokens, "tokens_per_s": round(tok_s, 1),
           "elapsed_s": round(elapsed, 3), **stats.aux}
    if t.eval_every and done % t.eval_every == 0 and done != run.total_steps and run.evaluates:
        result = _evaluate(run)
        run.log(eval_line(f"step {done}", result))
        row.update(eval_row(result))
    if run.metrics and (done % t.log_every == 0 or done == run.total_steps or "eval_loss" in row):
        run.metrics.log(row)
    if done == run.total_steps or (t.save_every and done % t.save_every == 0) or stats.stop:
        where = _save(run, done)
    dist.barrier()
    if stats.stop:
        got = signal.Signals(run.stop.signum).name if run.stop.requested else "a signal to another process"
        raise TrainingInterrupted(f"stopped by {got} after step {done} of {run.total_steps}, checkpoint in {where}; "
                                  "to continue, run the same command with training.resume=auto")


def finish(run: Run) -> RunSummary:
    """Evaluate, write the run directory and print the summary; leave the process group."""
    run.bar.close()
    elapsed = time.perf_counter() - run.t0
    dist = run.dist
    eval_after = None
    if run.evaluates:
        eval_after = _evaluate(run)
        if run.metrics:
            run.metrics.log({"step": run.total_steps, **eval_row(eval_after)})
    summary = RunSummary(run.out, run.total_steps, run.eval_before, eval_after,
                         tokens_per_s=run.tokens_seen * dist.world / max(elapsed, 1e-9),
                         peak_memory_bytes=run.peak.peak_bytes, losses=run.losses)
    trained = run.trainee.gather(run.model)
    if dist.is_main:
        run.metrics.close()
        _write_run_dir(run, trained, summary)
        run.metrics.finish(run.out)   # after the adapter is written: the trackers record it
        print_summary(summary, run.log)
    dist.barrier()
    dist.close()
    return summary


def _lock_run_dir(out: Path, dist: Dist, cleanup: ExitStack, log: Callable[[str], None]) -> None:
    """Lock `out` for this run until `train` returns, and clear what a killed run left there. Only
    the main process writes `out`, so it alone takes the lock; the others learn whether it could, so
    that they stop with it rather than wait for it in a collective."""
    error = None
    if dist.is_main:
        try:
            cleanup.callback(RunLock.acquire(out).release)
        except LoraError as e:
            error = e
        else:
            if removed := remove_leftovers(out):
                log(f"removed {len(removed)} temporary file(s) a killed run left in {out}")
    failed = dist.sum(torch.tensor(float(error is not None), device=dist.device)).item()
    if error is not None:
        raise error
    if failed:
        raise LoraError(f"the main process could not take output.dir {out}; its error says why")


def _warn_of_another_base(cfg: TrainConfig, log: Callable[[str], None]) -> None:
    """A saved adapter the run starts from or compares with, recorded as trained on another base:
    loading checks its shapes, but a same-shaped other model (base vs instruct) would pass silently."""
    for key in ("init_from", "reference_adapter"):
        where = getattr(cfg.training, key)
        trained_on = where and io.read_adapter_config(where).base_model_name_or_path
        if trained_on and trained_on != cfg.model.name_or_path:
            log(f"warning: training.{key}: {where} was trained on {trained_on}, and this run's base is "
                f"{cfg.model.name_or_path}; if that is another model, the adapter does not fit it")


def _disable_base_dropout(model: nn.Module) -> bool:
    """Set every `nn.Dropout` of the model to p = 0 (the adapters' dropout is not one); whether any
    had p > 0."""
    changed = False
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p, changed = 0.0, True
    return changed


def _prepare_model(model: nn.Module, t: TrainingSection, device: torch.device, cleanup: ExitStack,
                   log: Callable[[str], None]) -> bool:
    """Activation checkpointing, torch.compile and the Triton kernels, as `t` asks; returns whether
    the kernels are on (the chunked loss then uses their softmax too)."""
    if t.gradient_checkpointing:
        _enable_checkpointing(model, offload=t.offload_activations and device.type == "cuda")
    if t.compile:
        compiled = compile_decoder_layers(model)
        cleanup.callback(compiled.remove)
        log(f"training.compile: compiling {len(compiled)} decoder layers (on the first steps)")
    kernels_on = kernels_wanted(t.kernels, device, t.compile)
    if kernels_on:
        kernels = use_kernels(model)
        cleanup.callback(kernels.remove)
        log(kernels.describe())
    return kernels_on


def _enable_checkpointing(model, offload: bool) -> None:
    """Non-reentrant activation checkpointing of the decoder layers, their inputs held in pinned
    host memory with `offload` (transformers' `activation_checkpointing_enable`, the newer name of
    `gradient_checkpointing_enable`; older releases have only the latter, without offload)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=offload)
    elif offload:
        raise LoraError("training.offload_activations needs transformers' activation_checkpointing_enable "
                        "(transformers 5); upgrade transformers or set training.offload_activations: false")
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, lora_plus_ratio: float | None,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; with LoRA+ the B matrices get `lora_plus_ratio` x lr."""
    a, b = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (b if lora_plus_ratio and (".lora_B." in name or ".lora_embedding_B." in name) else a).append(p)
    groups = [{"params": a, "lr_scale": 1.0}]
    if b:
        groups.append({"params": b, "lr_scale": float(lora_plus_ratio)})
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused)


def _check_same_run(saved: dict, current: dict, where: Path) -> None:
    """Resuming under another model, adapter, data or batch layout would not continue the same run."""
    keys = [("model",), ("lora",), ("mixture",), ("data",), ("training", "micro_batch_size"), ("training", "grad_accum"),
            ("training", "seed"), ("training", "objective"), ("training", "init_from"),
            ("training", "reference_adapter"), ("preference",), ("grpo",)]
    changed = []
    for path in keys:
        a, b = saved, current
        for k in path:
            a, b = a.get(k), b.get(k)
        changed += _differences(".".join(path), a, b)
    # how attention is computed (sdpa, eager, ...), not what: and checkpoints from before `auto`
    # became the default say "sdpa"
    changed = [line for line in changed if not line.startswith("model.attn_implementation:")]
    if changed:
        raise LoraError(f"cannot resume from {where}: {'; '.join(changed)}. Resume with the checkpoint's settings or "
                        "start a new output.dir")


def _differences(key: str, saved: Any, current: Any) -> list[str]:
    """'key: A in the checkpoint, B now' for each leaf setting that differs under `key`."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [line for k in dict.fromkeys([*saved, *current])
                for line in _differences(f"{key}.{k}", saved.get(k), current.get(k))]
    return [] if saved == current else [f"{key}: {saved!r} in the checkpoint, {current!r} now"]


def _save(run: Run, step: int) -> Path:
    """The checkpoint after `step` optimizer steps (every process calls it; the main one writes)."""
    s = run.stream
    state = ckpt.TrainerState(step, s.epoch, s.position, run.total_steps, run.dist.world)
    return ckpt.save_checkpoint(run.out, run.model, run.optimizer, state, run.resolved,
                                run.cfg.training.keep_last, run.trainee, run.dist)


def _evaluate(run: Run) -> EvalResult:
    """The SFT evaluation (for another objective on the held-out records' reference completions),
    with the objective's own held-out metrics."""
    with run.autocast():
        result = evaluate(run.model, run.tokenizer, run.eval_examples, run.cfg.training.micro_batch_size,
                          run.dist.device)
        result.extra = run.objective.evaluate(run.model)
    result.n_examples = max(result.n_examples, run.objective.held_out)   # KTO's undesirable ones too
    return result


def _write_run_dir(run: Run, trained, summary: RunSummary) -> None:
    """The run directory as a complete artifact: adapter (PEFT format, from whole tensors) or mixture,
    tokenizer, resolved config, metrics, loss plot, model card, and the merged model when asked."""
    out = run.out
    run.trainee.write(out, trained)
    run.tokenizer.save_pretrained(out)
    (out / "config.yaml").write_text(yaml.safe_dump(run.resolved, sort_keys=False))
    plot_losses(out / "metrics.csv", out / "loss.png")
    (out / "README.md").write_text(model_card(run.cfg, run.trainee, summary))
    if run.cfg.output.merged_model:
        merge_to_model_dir(out, out / "merged")
