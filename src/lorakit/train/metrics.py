"""Run metrics: a CSV row per logged step (the record a resumed run continues), the same rows sent
to the run's experiment trackers (lorakit.train.trackers), and a loss-curve PNG at the end."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from ..files import atomic_write
from .trackers import Tracker

COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "trained_tokens", "tokens_per_s", "elapsed_s",
           "eval_loss", "eval_ppl", "eval_exact_match", "balance_loss", "z_loss"]


class MetricsLog:
    """Appends rows to `metrics.csv` and sends them to `trackers`. Opening it for a resumed run first
    drops rows beyond the checkpoint's step, which the interrupted run may have logged before it
    died; that rewrite goes through a temporary file, so the history survives a kill or a full disk
    at that moment. Used as a context manager, leaving the block with an exception ends the
    trackers `finish` has not ended as failed runs."""

    def __init__(self, out_dir: Path, resume_step: int | None, trackers: Sequence[Tracker] = (),
                 extra_columns: Sequence[str] = ()) -> None:
        """`extra_columns`: the objective's own, after `COLUMNS`."""
        self.path = out_dir / "metrics.csv"
        self.columns = [*COLUMNS, *extra_columns]
        rows = self.read(self.path) if resume_step is not None and self.path.is_file() else []
        rows = [r for r in rows if int(r["step"]) <= (resume_step or 0)]

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.path, write)   # a kill or a full disk here leaves the history whole
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)
        self._trackers = list(trackers)

    def log(self, row: dict[str, float | int | None]) -> None:
        self._writer.writerow({k: _fmt(row.get(k)) for k in self.columns})
        self._file.flush()
        values = {k: v for k, v in row.items() if k != "step" and v is not None}
        for tracker in self._trackers:
            tracker.log(values, int(row["step"]))

    def close(self) -> None:
        """Close `metrics.csv`; it is complete."""
        self._file.close()

    def finish(self, run_dir: Path) -> None:
        """The run succeeded and `run_dir` holds its final adapter: each tracker records it and ends.
        One that fails to leaves those after it to `__exit__`, which ends them as failed."""
        while self._trackers:
            self._trackers.pop(0).finish(run_dir)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
        while kind is not None and self._trackers:   # the run failed or was interrupted before `finish`
            self._trackers.pop(0).close()

    @staticmethod
    def read(path: Path) -> list[dict[str, str]]:
        with path.open(newline="") as f:
            return list(csv.DictReader(f))


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)   # full precision: resumed and uninterrupted runs compare exactly
    return value


def series(rows: Sequence[dict[str, str]], column: str) -> list[tuple[int, float]]:
    """(step, value) of each metrics.csv row in which `column` was measured."""
    return [(int(r["step"]), float(r[column])) for r in rows if r[column]]


def plot_losses(metrics_csv: Path, out_png: Path) -> None:
    """A run's train loss (and eval loss where measured) against the step."""
    plot_loss_curves([("", MetricsLog.read(metrics_csv))], out_png)


def plot_loss_curves(runs: Sequence[tuple[str, Sequence[dict[str, str]]]], out_png: Path) -> None:
    """Each run's train loss as a line and its eval losses as points of the same colour, written to
    `out_png` atomically; runs are (name, metrics.csv rows), one named "" being a run's own plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        for i, (name, rows) in enumerate(runs):
            colour, prefix = f"C{i % 10}", f"{name} " if name else ""
            if train := series(rows, "loss"):
                ax.plot(*zip(*train, strict=True), color=colour, linewidth=1, label=f"{prefix}train loss")
            if evals := series(rows, "eval_loss"):
                ax.plot(*zip(*evals, strict=True), "o--", color=colour, label=f"{prefix}eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (per trained token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
