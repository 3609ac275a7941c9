"""A plan as a human-readable table (the default) or as JSON for tools (bytes and counts as
integers, every field of the `Plan` dataclass)."""

from __future__ import annotations

import dataclasses
import json

from .estimate import METHOD_LABELS, Workload, row_length
from .result import Plan

GIB = 2**30


def render_json(plan: Plan) -> str:
    return json.dumps(dataclasses.asdict(plan), indent=2)


def _size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                                   strict=True))).rstrip()
            for r in rows]


def render_text(plan: Plan) -> str:
    p, w, lines = plan.params, plan.workload, []
    lines.append(f"model: {plan.model} ({plan.model_type}); built on the meta device, no weights loaded")
    lines += ["", "trainable parameters"]
    rows = [["module", "kind", "modules", "d_in x d_out", "r", "trainable", "r(d_in+d_out)", "share", "bytes"]]
    for g in p.groups:
        rows.append([g.name, g.kind, str(g.modules), g.shape, ",".join(map(str, g.ranks)) or "-", f"{g.trainable:,}",
                     f"{g.closed_form:,}", f"{100 * g.share:.4f}%", _size(g.bytes)])
    rows.append(["total", "", str(sum(g.modules for g in p.groups)), "", "", f"{p.trainable:,}", f"{p.closed_form:,}",
                 f"{100 * p.trainable / p.total:.4f}%", _size(sum(g.bytes for g in p.groups))])
    lines += _table(rows, {2, 5, 6, 7, 8})
    lines.append(f"  all parameters {p.total:,}; adapter_model.safetensors {_size(p.file_bytes)} ({p.file_bytes:,} "
                 f"bytes) + adapter_config.json {p.config_bytes:,} bytes")

    precision = (f"{'bf16' if w.weight_bytes == 2 else 'fp32'} weights, "
                 f"{'bf16' if w.compute_bytes == 2 else 'fp32'} activations")
    unit, scale = next((u, k) for u, k in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10))
                       if max(e.total for e in plan.estimates) >= k or u == "KiB")
    per_process = " per process" if plan.strategy != "single" else ""
    lines += ["", f"peak training memory{per_process}, {unit}: micro_batch_size {w.batch} x max_seq_len {w.seq} on "
                  f"{w.device} ({precision}, {w.attention}{', rows padded or packed' if w.masked else ''})"]
    lines += [f"  {line}" for line in objective_lines(w)]
    head = [""] + [f"{METHOD_LABELS[e.method]}{'+ckpt' if e.checkpointing else ''}" for e in plan.estimates]
    rows = [head]
    gathered = any(e.gathered for e in plan.estimates)
    sampled = any(e.kv_cache for e in plan.estimates)
    for label, attr, shown in (("frozen weights", "frozen_weights", True),
                               ("trained weights+grads+AdamW", "trained_state", True),
                               ("gathered by FSDP2 (unsharded)", "gathered", gathered),
                               ("activations kept for backward", "activations", True),
                               ("loss / logits", "loss_logits", True), ("layer recompute / backward", "recompute", True),
                               ("no-grad forwards (reference)", "reference", any(e.reference for e in plan.estimates)),
                               ("KV cache (sampling)", "kv_cache", sampled),
                               ("sampling: prefill / decoding", "sampling", sampled),
                               ("peak", "total", True),
                               ("offloaded to host memory", "host", any(e.host for e in plan.estimates))):
        if shown:
            rows.append([label] + [f"{getattr(e, attr) / scale:.2f}" for e in plan.estimates])
    if plan.fits:
        usable = f"{plan.usable_memory / GIB:.1f} usable" if plan.usable_memory != plan.memory_budget else ""
        rows.append([f"fits {plan.memory_budget / GIB:g} GiB{f' ({usable})' if usable else ''}"]
                    + ["yes" if f.fits else "no" for f in plan.fits])
        rows.append([f"largest micro_batch_size at {w.seq}"] + [str(f.largest_batch or "-") for f in plan.fits])
        rows.append([f"largest max_seq_len at batch {w.batch}"]
                    + [f"{f.largest_seq or '-'}{'*' if f.seq_at_position_limit else ''}" for f in plan.fits])
    lines += _table(rows, set(range(1, len(head))))
    alive = ("the largest of loss/logits, recompute and the no-grad forwards" if any(e.reference for e in plan.estimates)
             else "the larger of loss/logits and recompute")
    sampling = (", or KV cache + sampling when larger (sampling ends before the forward with gradients starts)"
                if sampled else "")
    lines.append(f"  peak = frozen + trained + activations + {alive} (not alive together){sampling}; +ckpt: "
                 "training.gradient_checkpointing" + (" (configured)" if plan.checkpointing else ""))
    if any(f.seq_at_position_limit for f in plan.fits):
        lines.append(f"  * the model's position limit (max_position_embeddings {plan.max_position_embeddings}), not "
                     "memory: the model takes no longer rows")
    if any(e.host for e in plan.estimates):
        lines.append("  offloaded to host memory: training.offload_activations keeps each checkpointed layer's input "
                     "in pinned host memory (not in the peak) and copies it back for that layer's backward")
    lines += [f"  {line}" for line in _per_process_lines(plan)]

    d = plan.data
    known = f"{d.examples:,} examples" if d.examples is not None else "examples unknown"
    tokens = f", {d.trained_tokens:,} trained tokens" if d.trained_tokens is not None else ""
    lines += ["", f"data: {known}{tokens} ({d.source})", "", "suggestions"]
    rows = [["key", "suggested", "now", "why"]]
    for s in plan.suggestions:
        rows.append([s.key, "-" if s.value is None else str(s.value), str(s.current), s.reason])
    lines += _table(rows, set())
    for title, items in (("warnings", plan.warnings), ("notes", plan.notes)):
        if items:
            lines += ["", title] + [f"  - {item}" for item in items]
    return "\n".join(lines)


def objective_lines(w: Workload) -> list[str]:
    """What the forwards of `training.objective` are, and so why the rows are 2x or Gx (none for sft)."""
    f, b, t = w.forwards, w.batch, w.seq
    name = f"training.objective={f.objective}"
    if f.objective == "sft":
        return []
    if f.objective == "grpo":
        rows, length = b * f.rows, row_length(w)
        reference = ("and a no-grad forward of them by the reference (the base, adapter off; grpo.beta > 0)"
                     if f.reference_rows else "and no reference forward (grpo.beta=0)")
        line = (f"{name}: micro_batch_size {b} prompts x grpo.group_size {f.rows} = {rows} completions; each row "
                f"is a prompt shorter than max_seq_len ({t - 1} tokens at most) and up to grpo.max_completion_len "
                f"{f.sampled} sampled tokens, {length} in all. Sampling holds the KV cache of the {rows} rows; then "
                f"one forward with gradients of them {reference}")
    elif f.objective == "kto":
        reference = (f" and the reference's {b} + {b} = {b * f.reference_rows} (completions and KL rows)"
                     if f.reference_rows else " (the reference's log-probabilities: once before training, "
                     "preference.precompute_reference)")
        line = (f"{name}: micro_batch_size {b} completions, one forward with gradients of {b} rows of up to "
                f"max_seq_len {t}; no-grad forwards in the step: the policy's {b} KL rows{reference}. A KL row pairs "
                f"a prompt with another example's completion, so a batch can be wider than max_seq_len (up to "
                f"{2 * t - 2} tokens), which this plan does not assume")
    else:
        if f.reference_rows:
            reference = (f"; the reference (the base, adapter off) scores the same {b * f.rows} rows in a no-grad "
                         "forward in the step")
        elif f.objective in ("simpo", "orpo"):
            reference = f"; {f.objective} compares no reference"
        else:
            reference = ("; the reference's log-probabilities are computed once before training "
                         "(preference.precompute_reference), so no reference forward in the step")
        line = (f"{name}: micro_batch_size {b} pairs, one forward with gradients of 2 x {b} = {b * f.rows} rows "
                f"(the chosen, then the rejected completions) of up to max_seq_len {t}{reference}")
    lines = [line, "loss / logits: the completions' log-probabilities (lorakit.train.logprobs) in place of the "
             "cross-entropy"]
    if f.reference_rows:
        lines.append("full fine-tuning has no adapter to switch off for the reference: its columns count a second "
                     "copy of the weights in frozen weights")
    return lines


def _per_process_lines(plan: Plan) -> list[str]:
    """What the figures of a run over several processes are (none for training.strategy single)."""
    n = plan.processes
    if plan.strategy == "single":
        return []
    qlora = ("QLoRA columns: one process with the whole model (model.quantize_base=nf4 trains with "
             "training.strategy=single only)")
    if plan.strategy == "ddp":
        return [f"per process of {n} (training.strategy=ddp): each holds the whole model, its gradients and AdamW "
                "state, and runs its own micro-batch", qlora]
    if n == 1:
        return ["training.strategy=fsdp on 1 process shards nothing: these are the whole model's figures; plan "
                "for N processes with --nproc N", qlora]
    return [f"per process of {n} (training.strategy=fsdp, --nproc {n}): FSDP2 shards the weights, gradients and "
            f"AdamW state {n} ways (frozen and trained rows: one shard); gathered: the unsharded root group "
            "(embeddings, final norm, head) and two decoder layers; activations: the process's own micro-batch",
            "the loss row is the full logits: lorakit's chunked loss (training.chunked_loss) does not run under "
            "FSDP2", qlora]
