"""`lorakit train`: the training loop, top to bottom.

    load tokenizer, model and data -> add the adapter (or a mixture over saved adapters) ->
    (resume) -> evaluate ->
    for each optimizer step:
        grad_accum micro-batches: loss summed over trained tokens, divided by the trained tokens
        of the whole step (all micro-batches, all processes), plus a mixture's weighted auxiliary
        losses averaged over the micro-batches -> backward
        clip -> lr from the schedule (a pure function of the step) -> AdamW step
        log, evaluate every N, checkpoint every N
    -> evaluate -> write the run directory (adapter, tokenizer, config, metrics, plot, card)

Data order is a pure function of (seed, epoch): each epoch is a seeded permutation of the rows
and the loop keeps (epoch, position) as the data state, so a resumed run sees exactly the rows
the interrupted run would have seen.

With N processes (torchrun; `training.strategy` ddp or fsdp) each global micro-batch is the
micro-batch a single process with N x `micro_batch_size` rows would take, cut into N slices, one
per process; gradients are averaged over processes, so N processes train the same adapter as one
process with the same global batch. Every process evaluates and gathers the state to save (FSDP2
needs all of them for that); only rank 0 writes files.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from .. import inject, io
from ..errors import LoraError
from ..kernels.model import kernels_wanted, use_kernels
from ..schema import to_dict
from . import checkpoint as ckpt
from .compilation import compile_decoder_layers
from .config import TrainConfig
from .data import build_datasets, collate, pack
from .distributed import Dist
from .evaluate import EvalResult, evaluate
from .loss import loss_sum
from .memory import PeakMemory
from .metrics import MetricsLog, plot_losses
from .model_io import load_model, load_tokenizer, resolve_device
from .schedule import lr_at
from .trainee import Trainee, trainee_for


class TrainingDiverged(LoraError):
    """The loss became NaN or inf; a checkpoint of the last good state was written."""


@dataclass
class RunSummary:
    out_dir: Path
    steps: int
    eval_before: EvalResult | None
    eval_after: EvalResult | None
    tokens_per_s: float
    peak_memory_bytes: int
    losses: list[float]


class RowStream:
    """Rows in the order of seeded per-epoch permutations, from a resumable (epoch, position)."""

    def __init__(self, n_rows: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.n, self.seed, self.epoch, self.position = n_rows, seed, epoch, position
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000003 + epoch)).tolist()

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            k = min(count - len(out), self.n - self.position)
            out.extend(self._order[self.position:self.position + k])
            self.position += k
        return out


def train(cfg: TrainConfig) -> RunSummary:
    """Run the training `cfg` describes; what it changed outside the model (the Triton kernels'
    RoPE, a process-wide patch) is undone when it returns or fails."""
    with ExitStack() as cleanup:
        return _train(cfg, cleanup)


def _train(cfg: TrainConfig, cleanup: ExitStack) -> RunSummary:
    t = cfg.training
    out = Path(cfg.output.dir)
    dist = Dist.setup(t.strategy, resolve_device(cfg.model.device))
    device = dist.device
    peak = PeakMemory(device)
    torch.manual_seed(t.seed)
    log = _printer(dist.is_main)

    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    if cfg.data.chat_template:   # saved with the tokenizer, so generation uses the template trained on
        tokenizer.chat_template = cfg.data.chat_template
    model = load_model(cfg.model.name_or_path, cfg.model.dtype, str(device), cfg.model.attn_implementation,
                       cfg.model.revision, cfg.model.trust_remote_code, cfg.model.quantize_base)
    train_examples, eval_examples, report = build_datasets(cfg.data, tokenizer, t.seed)
    rows = pack(train_examples, cfg.data.max_seq_len) if cfg.data.packing else train_examples
    for line in report.lines():
        log(line)

    trainee = trainee_for(cfg)
    trainee.attach(model)
    if dist.world > 1:   # the same initial adapter on every process; from here, each its own dropout masks
        torch.manual_seed(t.seed + dist.rank)
    model.train()
    if t.gradient_checkpointing:
        _enable_checkpointing(model, offload=t.offload_activations and device.type == "cuda")
    if t.compile:
        log(f"training.compile: compiling {compile_decoder_layers(model)} decoder layers (on the first steps)")
    kernels_on = kernels_wanted(t.kernels, device, t.compile)
    if kernels_on:
        kernels = use_kernels(model)
        cleanup.callback(kernels.remove)
        log(kernels.describe())
    log(inject.trainable_summary(model))
    step_model = dist.wrap(model)
    if dist.world > 1:
        log(dist.describe(model))
    optimizer = _optimizer(model, t.lr, t.weight_decay, t.lora_plus_ratio, device)   # after wrap: FSDP2 swaps params

    global_rows = t.micro_batch_size * t.grad_accum * dist.world
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * len(rows) / global_rows))
    resolved = to_dict(cfg)
    start, stream = 0, RowStream(len(rows), t.seed)
    resume_from = ckpt.find_resume_checkpoint(t.resume, out) if t.resume else None
    if resume_from is not None:
        _check_same_run(ckpt.read_checkpoint_config(resume_from), resolved, resume_from)
        state = ckpt.load_checkpoint(resume_from, model, optimizer, trainee, dist)
        start, stream = state.step, RowStream(len(rows), t.seed, state.epoch, state.position)
        log(f"resumed from {resume_from} at step {start}")
    metrics = None
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(out, start if resume_from else None, cfg.output.tensorboard)

    use_bf16 = t.bf16 == "true" or (t.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    eval_before = None
    if eval_examples and start == 0:
        eval_before = _evaluate(model, tokenizer, eval_examples, t.micro_batch_size, device, autocast)
        log(_eval_line("before training", eval_before))
        if metrics:
            metrics.log({"step": 0, "epoch": 0, **_eval_row(eval_before)})

    losses: list[float] = []
    tokens_seen, t0 = 0, time.perf_counter()
    bar = tqdm(total=total_steps, initial=start, disable=not dist.is_main, desc="train", dynamic_ncols=True,
               mininterval=0.5, file=sys.stderr)
    for step in range(start, total_steps):
        micro = []
        for _ in range(t.grad_accum):
            ids = stream.take(t.micro_batch_size * dist.world)
            mine = ids[dist.rank * t.micro_batch_size:(dist.rank + 1) * t.micro_batch_size]
            micro.append(collate([rows[i] for i in mine], tokenizer.pad_token_id))
        n_trained = dist.sum(sum((b["labels"][:, 1:] != -100).sum() for b in micro).to(device).float())
        step_loss = torch.zeros((), device=device)
        aux_sums: dict[str, torch.Tensor] = {}
        try:
            with peak.step(max(b["input_ids"].numel() for b in micro), model, optimizer):
                for batch in micro:
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with autocast():
                        s, _ = loss_sum(step_model, batch, chunked=t.chunked_loss, kernel=kernels_on)
                    aux = trainee.aux_losses(model)
                    # DDP averages gradients over processes: scale by world so the result is the sum / n_trained
                    loss = s * dist.world / n_trained + sum(w * v for w, v in aux.values()) / t.grad_accum
                    loss.backward()
                    step_loss += s.detach()
                    for name, (_, v) in aux.items():
                        aux_sums[name] = aux_sums.get(name, 0) + v.detach()
                    tokens_seen += int(batch["input_ids"].numel())
        except torch.OutOfMemoryError:
            raise LoraError(
                "out of memory in the training step. Reduce training.micro_batch_size (raise training.grad_accum to "
                "keep the batch), reduce data.max_seq_len, set training.gradient_checkpointing: true, or "
                "lower lora.r / target fewer modules"
            ) from None
        mean_loss = (dist.sum(step_loss) / n_trained).item()
        if not math.isfinite(mean_loss):   # summed over processes: all of them stop here together
            optimizer.zero_grad(set_to_none=True)
            where = ckpt.save_checkpoint(out, model, optimizer, _trainer_state(step, stream, total_steps, dist),
                                         resolved, t.keep_last, trainee, dist)
            raise TrainingDiverged(
                f"the loss became {mean_loss} at step {step + 1}; stopped with the last good state saved in {where}. "
                "Lower training.lr, keep training.max_grad_norm set, or check the data for broken samples"
            )
        grad_norm = None
        if t.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                  t.max_grad_norm)
            grad_norm = float(io.gather_full(norm))   # over FSDP2 shards a DTensor: the norm of the whole gradient
        lr = lr_at(step, total_steps, t.lr, t.warmup_steps, t.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(mean_loss)
        done = step + 1
        elapsed = time.perf_counter() - t0
        tok_s = tokens_seen * dist.world / max(elapsed, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        row = {"step": done, "epoch": round(stream.epoch + stream.position / max(len(rows), 1), 4),
               "loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "trained_tokens": int(n_trained.item()),
               "tokens_per_s": round(tok_s, 1), "elapsed_s": round(elapsed, 3),
               **{k: (dist.sum(v) / (t.grad_accum * dist.world)).item() for k, v in aux_sums.items()}}
        if t.eval_every and done % t.eval_every == 0 and done != total_steps and eval_examples:
            result = _evaluate(model, tokenizer, eval_examples, t.micro_batch_size, device, autocast)
            log(_eval_line(f"step {done}", result))
            row.update(_eval_row(result))
        if metrics and (done % t.log_every == 0 or done == total_steps or "eval_loss" in row):
            metrics.log(row)
        if done == total_steps or (t.save_every and done % t.save_every == 0):
            ckpt.save_checkpoint(out, model, optimizer, _trainer_state(done, stream, total_steps, dist), resolved,
                                 t.keep_last, trainee, dist)
        dist.barrier()
    bar.close()
    elapsed = time.perf_counter() - t0

    eval_after = None
    if eval_examples:
        eval_after = _evaluate(model, tokenizer, eval_examples, t.micro_batch_size, device, autocast)
        if metrics:
            metrics.log({"step": total_steps, **_eval_row(eval_after)})
    summary = RunSummary(out, total_steps, eval_before, eval_after,
                         tokens_per_s=tokens_seen * dist.world / max(elapsed, 1e-9),
                         peak_memory_bytes=peak.peak_bytes, losses=losses)
    trained = trainee.gather(model)
    if dist.is_main:
        metrics.close()
        _write_run_dir(out, trainee, trained, tokenizer, cfg, resolved, summary)
        _print_summary(summary, log)
    dist.barrier()
    dist.close()
    return summary


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


def _trainer_state(step: int, stream: RowStream, total_steps: int, dist: Dist) -> ckpt.TrainerState:
    return ckpt.TrainerState(step, stream.epoch, stream.position, total_steps, dist.world)


def _optimizer(model, lr: float, weight_decay: float, lora_plus_ratio: float | None, device) -> torch.optim.AdamW:
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
            ("training", "seed")]
    changed = []
    for path in keys:
        a, b = saved, current
        for k in path:
            a, b = a.get(k), b.get(k)
        if a != b:
            changed.append(".".join(path))
    if changed:
        raise LoraError(f"cannot resume from {where}: {', '.join(changed)} differ from the checkpoint's config.yaml; "
                        "resume with the same settings or start a new output.dir")


def _evaluate(model, tokenizer, examples, batch_size, device, autocast) -> EvalResult:
    with autocast():
        return evaluate(model, tokenizer, examples, batch_size, device)


def _eval_row(r: EvalResult) -> dict:
    return {"eval_loss": r.loss, "eval_ppl": r.ppl, "eval_exact_match": r.exact_match}


def _eval_line(when: str, r: EvalResult) -> str:
    em = f", exact match {r.exact_match:.1%}" if r.exact_match is not None else ""
    return f"{when}: eval loss {r.loss:.4f} (perplexity {r.ppl:.2f}){em} on {r.n_examples} examples"


def _printer(enabled: bool):
    def log(message: str) -> None:
        if enabled:
            tqdm.write(message, file=sys.stdout)
    return log


def _write_run_dir(out: Path, trainee: Trainee, trained, tokenizer, cfg: TrainConfig, resolved: dict,
                   summary: RunSummary) -> None:
    """The run directory as a complete artifact: adapter (PEFT format, from whole tensors) or mixture,
    tokenizer, resolved config, metrics, loss plot, model card, and the merged model when asked."""
    trainee.write(out, trained)
    tokenizer.save_pretrained(out)
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    plot_losses(out / "metrics.csv", out / "loss.png")
    (out / "README.md").write_text(_model_card(cfg, trainee, summary))
    if cfg.output.merged_model:
        from ..export import merge_to_model_dir

        merge_to_model_dir(out, out / "merged")


def _model_card(cfg: TrainConfig, trainee: Trainee, s: RunSummary) -> str:
    def ev(r: EvalResult | None) -> str:
        if r is None:
            return "n/a"
        em = f", exact match {r.exact_match:.1%}" if r.exact_match is not None else ""
        return f"loss {r.loss:.4f}, perplexity {r.ppl:.2f}{em}"

    return f"""# {trainee.title} for {cfg.model.name_or_path}

Trained with lorakit (`lorakit train`); the resolved configuration is in `config.yaml`.

| | |
|---|---|
| base model | `{cfg.model.name_or_path}` |
| trained | {trainee.describe()} |
| data | `{cfg.data.train}` |
| steps | {s.steps} (micro batch {cfg.training.micro_batch_size} x accumulation {cfg.training.grad_accum}), lr {cfg.training.lr}, {cfg.training.schedule} schedule |
| eval before | {ev(s.eval_before)} |
| eval after | {ev(s.eval_after)} |
| throughput | {s.tokens_per_s:,.0f} tokens/s, peak memory {s.peak_memory_bytes / 2**20:,.0f} MiB |

Files: {trainee.files()}, tokenizer files, `metrics.csv`, `loss.png`, `checkpoints/`.

```python
{trainee.usage(cfg.output.dir)}
```
"""


def _print_summary(s: RunSummary, log) -> None:
    if s.eval_before is not None:
        log(_eval_line("before training", s.eval_before))
    if s.eval_after is not None:
        log(_eval_line(f"after {s.steps} steps", s.eval_after))
    if s.eval_before is not None and s.eval_after is not None:
        for (prompt, ref, gen_before), (_, _, gen_after) in zip(s.eval_before.samples, s.eval_after.samples,
                                                                strict=False):
            log(f"sample: {prompt!r}\n  expected: {ref!r}\n  before:   {gen_before!r}\n  after:    {gen_after!r}")
    log(f"{s.tokens_per_s:,.0f} tokens/s, peak memory {s.peak_memory_bytes / 2**20:,.0f} MiB")
    log(f"run written to {s.out_dir}/")
