"""Experiment trackers (`output.report_to`), with the real libraries in their local modes: W&B
offline (its run file read back), MLflow on a file store in tmp_path, TensorBoard's event files.
Nothing here reaches the network: W&B runs with WANDB_MODE=offline and no login."""

import json
import os
import struct
import sys
from pathlib import Path

import pytest

from lorakit.cli import main as cli_main
from lorakit.errors import ConfigError, LoraError
from lorakit.schema import flat_config
from lorakit.train import loop
from lorakit.train.config import load_config
from lorakit.train.metrics import MetricsLog


def run(overrides):
    return loop.train(load_config(None, overrides))


def csv_series(out, column):
    """(step, value) of a metrics.csv column where it has a value, as the trackers must have them."""
    return [(int(r["step"]), float(r[column])) for r in MetricsLog.read(out / "metrics.csv") if r[column]]


@pytest.fixture
def local_trackers(tmp_path, monkeypatch):
    """W&B offline and MLflow on a file store, every file they write under tmp_path; afterwards W&B's
    service process is stopped, and none may be left."""
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3 keeps the file store behind this switch
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")   # off under pytest anyway; no network, whatever runs it
    yield tmp_path
    if "wandb" in sys.modules and sys.modules["wandb"] is not None:
        sys.modules["wandb"].teardown()
        assert wandb_services() == []


def wandb_services():
    """The W&B service processes this test process started (they name its pid)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"wandb-core") for a in argv) and str(os.getpid()).encode() in argv:
            found.append(proc.name)
    return found


def wandb_records(run_file):
    """The records of a W&B run file (`run-<id>.wandb`): a 7-byte header, then LevelDB-log blocks of
    32 KiB whose chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) hold `Record` protos."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:   # too little room left in the block for a chunk header
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(run_dir):
    """What an offline W&B run directory recorded: name, config, history per key, artifacts, exit code."""
    (run_file,) = run_dir.glob("run-*.wandb")
    got = {"name": None, "config": {}, "history": {}, "artifacts": [], "exit_code": None}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            got["name"], got["id"] = record.run.display_name, record.run.run_id
            got["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    got["history"].setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
        elif kind == "artifact":
            a = record.artifact
            got["artifacts"].append((a.name, a.type, sorted(c.path for c in a.manifest.contents)))
        elif kind == "exit":
            got["exit_code"] = record.exit.exit_code
    return got


def test_wandb_offline_run_has_name_config_metrics_and_adapter(base_overrides, local_trackers):
    pytest.importorskip("wandb")
    out = local_trackers / "run"
    run(base_overrides + ["output.report_to=[wandb]", "output.run_name=echo-lr-1e-2"])
    (run_dir,) = (local_trackers / "wandb_dir" / "wandb").glob("offline-run-*")
    got = wandb_run(run_dir)
    assert got["name"] == "echo-lr-1e-2"
    assert json.loads((out / "trackers.json").read_text()) == {"wandb": got["id"]}
    assert got["config"]["training"]["lr"] == 0.01 and got["config"]["lora"]["r"] == 4
    assert got["config"]["output"]["report_to"] == ["wandb"]
    assert got["history"]["loss"] == csv_series(out, "loss")   # steps 1..6, the csv's values exactly
    assert [s for s, _ in got["history"]["loss"]] == [1, 2, 3, 4, 5, 6]
    assert got["history"]["eval_loss"] == csv_series(out, "eval_loss")   # before training and at the end
    assert got["artifacts"] == [(f"adapter-{got['id']}", "model",
                                 ["adapter_config.json", "adapter_model.safetensors"])]
    assert got["exit_code"] == 0


def mlflow_client(root):
    from mlflow.tracking import MlflowClient

    return MlflowClient((root / "mlruns").as_uri())


def test_mlflow_file_store_run_has_params_metrics_and_adapter(base_overrides, local_trackers):
    pytest.importorskip("mlflow")
    out = local_trackers / "run"
    run(base_overrides + ["output.report_to=[mlflow]"])
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    client = mlflow_client(local_trackers)
    logged = client.get_run(run_id)
    assert logged.info.run_name == "run" and logged.info.status == "FINISHED"   # the name of output.dir
    assert client.get_experiment(logged.info.experiment_id).name == "lorakit"
    cfg = load_config(None, base_overrides + ["output.report_to=[mlflow]"])
    assert logged.data.params == {k: str(v) for k, v in flat_config(cfg).items()}
    assert logged.data.params["training.lr"] == "0.01" and logged.data.params["lora.target_modules"] == "all-linear"
    for column in ("loss", "lr", "trained_tokens", "eval_loss"):
        history = [(m.step, m.value) for m in client.get_metric_history(run_id, column)]
        assert history == csv_series(out, column), column
    assert sorted(a.path for a in client.list_artifacts(run_id, "adapter")) == [
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    local = Path(client.download_artifacts(run_id, "adapter/adapter_model.safetensors", str(local_trackers)))
    assert local.read_bytes() == (out / "adapter_model.safetensors").read_bytes()


def test_a_resumed_run_continues_its_tracker_runs(base_overrides, local_trackers, monkeypatch):
    """A run that fails after its step-3 checkpoint ends its tracker runs as failed; resumed, it
    continues the same W&B and MLflow runs. MLflow keeps the failed run's value for step 4 (logged
    past the checkpoint) next to the resumed run's; metrics.csv has the resumed run's only."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    out = local_trackers / "run"
    overrides = base_overrides + ["output.report_to=[wandb,mlflow]", "training.save_every=3"]
    after_step = loop.after_step

    def fail_after_step_4(run, step, stats):
        after_step(run, step, stats)
        if step + 1 == 4:
            raise RuntimeError("the machine went away")

    monkeypatch.setattr(loop, "after_step", fail_after_step_4)
    with pytest.raises(RuntimeError, match="the machine went away"):
        run(overrides)
    ids = json.loads((out / "trackers.json").read_text())
    client = mlflow_client(local_trackers)
    assert client.get_run(ids["mlflow"]).info.status == "FAILED"
    interrupted_step_4 = [m.value for m in client.get_metric_history(ids["mlflow"], "loss") if m.step == 4]

    monkeypatch.setattr(loop, "after_step", after_step)
    run(overrides + ["training.resume=auto"])
    assert json.loads((out / "trackers.json").read_text()) == ids
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"
    history = [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "loss")]
    assert sorted(history) == sorted(csv_series(out, "loss") + [(4, interrupted_step_4[0])])
    failed, resumed = (wandb_run(d) for d in sorted((local_trackers / "wandb_dir" / "wandb").glob("offline-run-*")))
    assert failed["id"] == resumed["id"] == ids["wandb"]   # W&B offline: a second directory of the same run
    assert failed["exit_code"] == 1 and failed["artifacts"] == []
    assert resumed["history"]["loss"] == csv_series(out, "loss")[3:]   # steps 4..6
    assert resumed["exit_code"] == 0 and len(resumed["artifacts"]) == 1


def test_tensorboard_through_report_to(base_overrides, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(base_overrides + ["output.tensorboard=true", "output.report_to=[tensorboard]"])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    out = tmp_path / "run"
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (s, pytest.approx(v, rel=1e-6)) for s, v in csv_series(out, "loss")]   # TensorBoard keeps float32
    assert [e.step for e in events.Scalars("eval_loss")] == [0, 6]
    assert not (out / "trackers.json").exists()   # no runs to continue


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_not_installed_stops_the_run_before_training(base_overrides, tmp_path, monkeypatch, capsys,
                                                               tracker):
    monkeypatch.setitem(sys.modules, tracker, None)   # import fails as when the package is missing
    assert cli_main(["train", *base_overrides, f"output.report_to=[tensorboard,{tracker}]",
                     "output.tensorboard=true"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"lorakit train: error: output.report_to names {tracker}, which is not installed; "
        f"pip install 'lorakit[{tracker}]'")
    assert not (tmp_path / "run" / "metrics.csv").exists() and not (tmp_path / "run" / "tensorboard").exists()


def test_an_mlflow_store_that_cannot_be_used_is_one_line(base_overrides, local_trackers, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")   # MLflow 3 refuses its file store without it
    uri = (local_trackers / "mlruns").as_uri()
    with pytest.raises(LoraError) as e:
        run(base_overrides + ["output.report_to=[mlflow]"])
    message = str(e.value)
    assert message.startswith(f"output.report_to mlflow: the tracking store {uri} cannot be used (")
    assert message.endswith("); set MLFLOW_TRACKING_URI to a tracking server, or to file:DIR with "
                            "MLFLOW_ALLOW_FILE_STORE=true")
    assert "\n" not in message


@pytest.mark.parametrize("overrides, message", [
    (["output.report_to=[neptune]"],
     "override 'output.report_to=[neptune]': output.report_to: unknown tracker 'neptune'; "
     "valid: tensorboard, wandb, mlflow"),
    (["output.report_to=[wandb, mlflow, wandb]"],
     "override 'output.report_to=[wandb, mlflow, wandb]': output.report_to names wandb twice; "
     "name each tracker once"),
    (["output.report_to=[tensorboard]", "output.tensorboard=false"],
     "override 'output.tensorboard=false': output.report_to names tensorboard but output.tensorboard is "
     "false; drop one of them"),
    (["output.report_to=wandb"],
     "override 'output.report_to=wandb': output.report_to must be list[str], got 'wandb'"),
])
def test_report_to_is_validated(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value) == message


def test_an_empty_run_name_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text('output: {run_name: ""}\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(config))
    assert str(e.value) == f"{config}: output.run_name is empty; give a name, or null for the name of output.dir"
