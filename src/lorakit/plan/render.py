"""A plan as a human-readable table (the default) or as JSON for tools (bytes and counts as
integers, every field of the `Plan` dataclass)."""

from __future__ import annotations

import dataclasses
import json

from .result import Plan

GIB = 2**30
_LABELS = {"lora": "LoRA", "qlora": "QLoRA", "full": "full"}


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
    lines += ["", f"peak training memory, {unit}: micro_batch_size {w.batch} x max_seq_len {w.seq} on {w.device} "
                  f"({precision}, {w.attention}{', rows padded or packed' if w.masked else ''})"]
    head = [""] + [f"{_LABELS[e.method]}{'+ckpt' if e.checkpointing else ''}" for e in plan.estimates]
    rows = [head]
    for label, attr in (("frozen weights", "frozen_weights"), ("trained weights+grads+AdamW", "trained_state"),
                        ("activations kept for backward", "activations"), ("loss / logits", "loss_logits"),
                        ("layer recompute / backward", "recompute"), ("peak", "total")):
        rows.append([label] + [f"{getattr(e, attr) / scale:.2f}" for e in plan.estimates])
    if plan.fits:
        usable = f"{plan.usable_memory / GIB:.1f} usable" if plan.usable_memory != plan.memory_budget else ""
        rows.append([f"fits {plan.memory_budget / GIB:g} GiB{f' ({usable})' if usable else ''}"]
                    + ["yes" if f.fits else "no" for f in plan.fits])
        rows.append([f"largest micro_batch_size at {w.seq}"] + [str(f.largest_batch or "-") for f in plan.fits])
        rows.append([f"largest max_seq_len at batch {w.batch}"] + [str(f.largest_seq or "-") for f in plan.fits])
    lines += _table(rows, set(range(1, len(head))))
    lines.append("  peak = frozen + trained + activations + the larger of loss/logits and recompute (not alive "
                 "together); +ckpt: training.gradient_checkpointing" + (" (configured)" if plan.checkpointing else ""))

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
