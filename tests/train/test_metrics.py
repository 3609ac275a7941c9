"""Run metrics: the CSV a resumed run continues, the rows its trackers get, the loss plot."""

import pytest

from lorakit.train.metrics import MetricsLog, perplexity, plot_losses
from lorakit.train.trackers import TensorBoardTracker

ROWS = [{"step": 0, "eval_loss": 2.5, "eval_ppl": perplexity(2.5)},
        {"step": 1, "epoch": 0.5, "loss": 2.0, "lr": 1e-3, "trained_tokens": 40},
        {"step": 2, "epoch": 1.0, "loss": 1.0 / 3, "lr": 5e-4, "trained_tokens": 38, "eval_loss": 0.9}]


def test_csv_keeps_full_precision_and_resume_drops_rows_past_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, None)
    for row in ROWS:
        log.log(row)
    log.close()
    rows = MetricsLog.read(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert float(rows[2]["loss"]) == 1.0 / 3 and rows[1]["eval_loss"] == "" and rows[0]["eval_ppl"] != ""

    resumed = MetricsLog(tmp_path, resume_step=1)   # the checkpoint was at step 1
    resumed.log({"step": 2, "loss": 0.5})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in MetricsLog.read(tmp_path / "metrics.csv")] == [
        ("0", ""), ("1", "2.0"), ("2", "0.5")]


def test_tensorboard_gets_every_scalar(tmp_path):
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, None, [TensorBoardTracker(tensorboard, tmp_path / "tensorboard", None)])
    for row in ROWS:
        log.log(row)
    log.close()
    log.finish(tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"epoch", "loss", "lr", "trained_tokens", "eval_loss", "eval_ppl"}
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0), (2, pytest.approx(1 / 3))]
    assert [e.step for e in events.Scalars("eval_loss")] == [0, 2]


def test_loss_plot_is_a_png(tmp_path):
    log = MetricsLog(tmp_path, None)
    for row in ROWS:
        log.log(row)
    log.close()
    plot_losses(tmp_path / "metrics.csv", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp file left


def test_perplexity_overflow_is_inf():
    assert perplexity(0.0) == 1.0 and perplexity(1000.0) == float("inf")


class Recorder:
    """A tracker that keeps what it was sent."""

    def __init__(self):
        self.rows, self.ended = [], None

    def log(self, row, step):
        self.rows.append((step, row))

    def finish(self, run_dir):
        self.ended = ("finished", run_dir)

    def close(self):
        self.ended = ("failed", None)


def test_trackers_get_each_row_without_step_and_empty_values_and_end_once(tmp_path):
    ok, failed = Recorder(), Recorder()
    with MetricsLog(tmp_path, None, [ok]) as log:
        log.log(ROWS[0])
        log.close()
        log.finish(tmp_path)
    assert ok.rows == [(0, {"eval_loss": 2.5, "eval_ppl": perplexity(2.5)})]
    assert ok.ended == ("finished", tmp_path)   # leaving the block without an error does not end it again

    with pytest.raises(RuntimeError), MetricsLog(tmp_path, None, [failed]) as log:
        log.log(ROWS[1])
        raise RuntimeError("the step failed")
    assert failed.rows == [(1, {"epoch": 0.5, "loss": 2.0, "lr": 1e-3, "trained_tokens": 40})]
    assert failed.ended == ("failed", None)
