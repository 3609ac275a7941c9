"""`lorakit compare RUN_DIR ...`: training runs side by side, what one otherwise opens TensorBoard
or a notebook for. It reads what `lorakit train` leaves in each run directory, `config.yaml` (the
resolved config, written when the run ends) and `metrics.csv`, and gives

- a table, one column per run: the settings that shape a run (model, adapter, learning rate and
  schedule, steps, batch, sequence length, packing, seed), then every other setting in which the
  runs differ (the `output` section aside: it says where a run went, not how it trained), each
  setting marked `*` where the runs differ; then the figures the runs ended with;
- one PNG of every run's train-loss curve with its eval losses as points.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import LoraError
from ..schema import as_yaml, flat_config
from ..train.config import TrainConfig, load_config
from ..train.metrics import MetricsLog, plot_loss_curves, series

KEY_SETTINGS = ["model.name_or_path", "lora.r", "lora.lora_alpha", "lora.target_modules", "lora.lora_dropout",
                "training.lr", "training.schedule", "training.warmup_steps"]
"""Shown for every comparison, in this order, with the steps and the batch after them."""
LATER_SETTINGS = ["data.max_seq_len", "data.packing", "training.seed"]
IN_THE_BATCH_ROW = {"training.micro_batch_size", "training.grad_accum"}
BATCH = "micro batch x grad accum"
DIFFERS = "*"


def compare_runs(run_dirs: Sequence[str | Path], plot_path: str | Path) -> str:
    """The comparison table of the runs in `run_dirs`; their loss curves are written to `plot_path`
    (PNG, replaced atomically). A directory that is not a finished run is a `LoraError`."""
    dirs = [Path(d) for d in run_dirs]
    runs = [_read_run(d) for d in dirs]
    names = _unique_names(dirs)
    plot = Path(plot_path)
    if not plot.parent.is_dir():
        raise LoraError(f"cannot write the plot to {plot}: {plot.parent} is not a directory")
    plot_loss_curves([(name, rows) for name, (_, rows) in zip(names, runs, strict=True)], plot)
    return _table(names, runs)


def _read_run(directory: Path) -> tuple[TrainConfig, list[dict[str, str]]]:
    if not directory.is_dir():
        raise LoraError(f"{directory} is not a directory; give the output.dir of lorakit train runs")
    missing = [name for name in ("config.yaml", "metrics.csv") if not (directory / name).is_file()]
    if missing:
        raise LoraError(f"{directory} is not a finished lorakit train run: it has no {' and no '.join(missing)}")
    return load_config(str(directory / "config.yaml")), MetricsLog.read(directory / "metrics.csv")


def _unique_names(dirs: list[Path]) -> list[str]:
    """Each run's directory name; where two share one, with their parent folders' names
    (`a/run`, `b/run`), and where those clash too (the same directory twice), numbered."""
    base = [d.resolve().name for d in dirs]
    names = [f"{d.resolve().parent.name}/{n}" if base.count(n) > 1 else n for d, n in zip(dirs, base, strict=True)]
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return unique


def _settings(runs: list[tuple[TrainConfig, list[dict[str, str]]]]) -> list[tuple[str, list[str]]]:
    """(setting, its value in each run): the key settings, then the others in which the runs differ."""
    flat = [{k: as_yaml(v) for k, v in flat_config(cfg).items()} for cfg, _ in runs]
    settings = [(key, [f[key] for f in flat]) for key in KEY_SETTINGS]
    settings.append(("steps", [str(max((s for s, _ in series(rows, "loss")), default=0)) for _, rows in runs]))
    settings.append((BATCH, [f"{cfg.training.micro_batch_size} x {cfg.training.grad_accum}" for cfg, _ in runs]))
    settings += [(key, [f[key] for f in flat]) for key in LATER_SETTINGS]
    shown = set(KEY_SETTINGS) | set(LATER_SETTINGS) | IN_THE_BATCH_ROW
    settings += [(key, [f[key] for f in flat]) for key in flat[0]
                 if key not in shown and not key.startswith("output.") and len({f[key] for f in flat}) > 1]
    return settings


def _figures(rows: list[dict[str, str]]) -> list[tuple[str, str]]:
    """The figures a run ended with, from its metrics.csv ("-" where it has none)."""
    train, evals = series(rows, "loss"), series(rows, "eval_loss")
    exact, speed = series(rows, "eval_exact_match"), series(rows, "tokens_per_s")
    tokens = [int(r["trained_tokens"]) for r in rows if r["trained_tokens"]]
    steps = max((s for s, _ in train), default=0)
    trained = f"{sum(tokens):,}" if tokens else "-"
    if tokens and len(tokens) < steps:   # training.log_every > 1: the steps between rows are not in the csv
        trained += f" ({len(tokens)} of {steps} steps logged)"
    best = min(evals, key=lambda e: e[1]) if evals else None
    return [
        ("final train loss", f"{train[-1][1]:.4f}" if train else "-"),
        ("best eval loss", f"{best[1]:.4f} (step {best[0]})" if best else "-"),
        ("final eval loss", f"{evals[-1][1]:.4f}" if evals else "-"),
        ("eval exact match", f"{exact[-1][1]:.1%}" if exact else "-"),
        ("tokens/s", f"{speed[-1][1]:,.0f}" if speed else "-"),
        ("trained tokens", trained),
    ]


def _table(names: list[str], runs: list[tuple[TrainConfig, list[dict[str, str]]]]) -> str:
    settings = _settings(runs)
    per_run = [_figures(rows) for _, rows in runs]
    figures = [(label, [f[i][1] for f in per_run]) for i, (label, _) in enumerate(per_run[0])]
    rows = settings + figures
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(values[i]) for _, values in rows + [("", names)]) for i in range(len(names))]

    def line(mark: str, label: str, values: list[str]) -> str:
        cells = "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True))
        return f"{mark} {label.ljust(label_width)}  {cells}".rstrip()

    lines = [line(" ", "", names)]
    lines += [line(DIFFERS if len(set(v)) > 1 else " ", label, v) for label, v in settings]
    lines.append("")
    lines += [line(" ", label, v) for label, v in figures]
    if len(names) > 1:
        lines += ["", f"{DIFFERS} differs between the runs"]
    return "\n".join(lines)
