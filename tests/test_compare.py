"""`lorakit compare`: the table's settings and figures against the runs' own files, the marker on
what differs, the plot, and the errors for directories that are not runs."""

import json
import re

import matplotlib.image
import pytest
import yaml
from tiny_models import tiny_model_dir

from lorakit.builtin import build_tokenizer
from lorakit.cli import main as cli_main
from lorakit.schema import to_dict
from lorakit.train.config import load_config
from lorakit.train.metrics import MetricsLog

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two real 4-step runs of a tiny Llama on an echo task, differing in the learning rate only."""
    root = tmp_path_factory.mktemp("compare")
    tiny_model_dir(root / "model", build_tokenizer(), positions=256)
    words = ["red", "green", "blue", "cyan", "magenta", "yellow", "black", "white", "navy", "teal"]
    for name, items in (("train.jsonl", words[:8]), ("eval.jsonl", words[8:])):
        (root / name).write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"echo {w}"},
                                                                  {"role": "assistant", "content": w}]}) + "\n"
                                         for w in items))
    common = [f"model.name_or_path={root / 'model'}", f"data.train={root / 'train.jsonl'}",
              f"data.eval={root / 'eval.jsonl'}", "data.max_seq_len=64", "training.micro_batch_size=4",
              "training.max_steps=4", "training.schedule=constant", "lora.r=4", "lora.lora_alpha=8",
              "output.tensorboard=false"]
    for name, lr in (("lr-high", "1e-2"), ("lr-low", "1e-3")):
        assert cli_main(["train", *common, f"training.lr={lr}", f"output.dir={root / name}"]) == 0
    return root / "lr-high", root / "lr-low"


def table(out: str) -> dict[str, tuple[str, list[str]]]:
    """{row label: (marker, values per run)} of the printed table; cells are 2+ spaces apart."""
    rows = {}
    for line in out.splitlines()[1:]:
        if line[2:] and not line.startswith(("* differs", "loss curves")):
            label, *values = re.split(r"\s{2,}", line[2:])
            rows[label] = (line[0], values)
    return rows


def test_compare_two_real_runs(two_runs, tmp_path, capsys):
    high, low = two_runs
    plot = tmp_path / "curves.png"
    capsys.readouterr()
    assert cli_main(["compare", str(high), str(low), "--out", str(plot)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["lr-high", "lr-low"]
    rows = table(out)
    assert rows["training.lr"] == ("*", ["0.01", "0.001"])
    assert rows["lora.r"] == (" ", ["4", "4"]) and rows["steps"] == (" ", ["4", "4"])
    assert rows["micro batch x grad accum"] == (" ", ["4 x 1", "4 x 1"])
    assert rows["model.name_or_path"] == (" ", [str(high.parent / "model")] * 2)
    assert [label for label in rows if label.startswith("training.")] == [
        "training.lr", "training.schedule", "training.warmup_steps", "training.seed"]   # nothing else differs
    expected = {"final train loss": [], "best eval loss": [], "final eval loss": [], "eval exact match": [],
                "tokens/s": [], "trained tokens": []}
    for run in two_runs:
        csv = MetricsLog.read(run / "metrics.csv")
        train = [r for r in csv if r["loss"]]
        evals = [r for r in csv if r["eval_loss"]]
        best = min(evals, key=lambda r: float(r["eval_loss"]))
        expected["final train loss"].append(f"{float(train[-1]['loss']):.4f}")
        expected["best eval loss"].append(f"{float(best['eval_loss']):.4f} (step {best['step']})")
        expected["final eval loss"].append(f"{float(evals[-1]['eval_loss']):.4f}")
        expected["eval exact match"].append(f"{float(evals[-1]['eval_exact_match']):.1%}")
        expected["tokens/s"].append(f"{float(train[-1]['tokens_per_s']):,.0f}")
        expected["trained tokens"].append(f"{sum(int(r['trained_tokens']) for r in train):,}")
    assert {label: rows[label] for label in expected} == {label: (" ", v) for label, v in expected.items()}
    assert out.splitlines()[-2:] == ["* differs between the runs", f"loss curves written to {plot}"]
    assert plot.read_bytes()[:8] == PNG and matplotlib.image.imread(plot).ndim == 3
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]   # no temporary file left


def write_run(directory, overrides, rows):
    """A run directory as `lorakit train` leaves it: the resolved config.yaml and metrics.csv."""
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(to_dict(load_config(None, overrides)), sort_keys=False))
    log = MetricsLog(directory, None)
    for row in rows:
        log.log(row)
    log.close()


def test_compare_table_layout_names_and_differing_settings(tmp_path, capsys, monkeypatch):
    """Two runs in directories of one name: named by their parents. Settings outside the key ones
    appear when they differ; `output` never does. Logged every other step, the trained tokens say so."""
    write_run(tmp_path / "a" / "run", ["output.dir=a/run"], [
        {"step": 0, "epoch": 0, "eval_loss": 2.5, "eval_ppl": 12.2, "eval_exact_match": 0.0},
        {"step": 1, "epoch": 0.5, "loss": 2.0, "lr": 2e-4, "trained_tokens": 40, "tokens_per_s": 1234.5},
        {"step": 2, "epoch": 1.0, "loss": 1.0 / 3, "lr": 2e-4, "trained_tokens": 38, "tokens_per_s": 1500.0},
        {"step": 2, "eval_loss": 0.9, "eval_ppl": 2.46, "eval_exact_match": 0.75}])
    write_run(tmp_path / "b" / "run", ["output.dir=b/run", "data.packing=true", "training.weight_decay=0.1",
                                       "training.log_every=2", "output.merged_model=true"], [
        {"step": 2, "epoch": 1.0, "loss": 1.5, "lr": 2e-4, "trained_tokens": 1000, "tokens_per_s": 98765.4}])
    monkeypatch.chdir(tmp_path)
    assert cli_main(["compare", "a/run", "b/run"]) == 0
    assert capsys.readouterr().out == """\
                            a/run               b/run
  model.name_or_path        lorakit/tiny-llama  lorakit/tiny-llama
  lora.r                    16                  16
  lora.lora_alpha           32                  32
  lora.target_modules       all-linear          all-linear
  lora.lora_dropout         0.0                 0.0
  training.lr               0.0002              0.0002
  training.schedule         cosine              cosine
  training.warmup_steps     0                   0
  steps                     2                   2
  micro batch x grad accum  4 x 1               4 x 1
  data.max_seq_len          512                 512
* data.packing              false               true
  training.seed             0                   0
* training.weight_decay     0.0                 0.1
* training.log_every        1                   2

  final train loss          0.3333              1.5000
  best eval loss            0.9000 (step 2)     -
  final eval loss           0.9000              -
  eval exact match          75.0%               -
  tokens/s                  1,500               98,765
  trained tokens            78                  1,000 (1 of 2 steps logged)

* differs between the runs
loss curves written to compare.png
"""
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG


def test_directories_that_are_not_runs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "metrics.csv").write_text("step,loss\n")
    cases = [
        ([str(tmp_path / "nowhere")],
         f"{tmp_path / 'nowhere'} is not a directory; give the output.dir of lorakit train runs"),
        ([str(tmp_path / "empty")],
         f"{tmp_path / 'empty'} is not a finished lorakit train run: it has no config.yaml and no metrics.csv"),
        ([str(tmp_path / "unfinished")],
         f"{tmp_path / 'unfinished'} is not a finished lorakit train run: it has no config.yaml"),
    ]
    write_run(tmp_path / "run", [], [{"step": 1, "loss": 1.0}])
    cases.append(([str(tmp_path / "run"), "--out", str(tmp_path / "no" / "plot.png")],
                  f"cannot write the plot to {tmp_path / 'no' / 'plot.png'}: {tmp_path / 'no'} is not a directory"))
    for args, message in cases:
        assert cli_main(["compare", *args]) == 2
        assert capsys.readouterr().err == f"lorakit compare: error: {message}\n"
