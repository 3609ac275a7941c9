"""The experiment trackers a run reports to (`output.report_to`; TensorBoard also by default, when
installed). Each gets the run's name and config when the run starts, every metrics row as it is
logged, and the final adapter when the run ends:

    tensorboard  scalars in `tensorboard/` of the run directory (TensorBoard keeps no config or files)
    wandb        a W&B run in project $WANDB_PROJECT (default "lorakit"), its files in the run
                 directory (or $WANDB_DIR); W&B reads the rest of its environment itself, so
                 WANDB_MODE=offline writes an offline run to sync later, with no network
    mlflow       an MLflow run in experiment $MLFLOW_EXPERIMENT_NAME (default "lorakit") of the
                 tracking store MLflow picks ($MLFLOW_TRACKING_URI, else its default), the flat
                 config as params (MLflow truncates a value past its length limit, with a warning)

The adapter goes to W&B as an artifact of type "model" named `adapter-<run id>`, and to MLflow
under `adapter/` of the run's artifacts. A resumed run continues the W&B and MLflow runs the
interrupted one started: their ids are kept in `trackers.json` in the run directory.

The tracker libraries are optional extras, imported when a run names them; one named in
`output.report_to` but not installed stops the run at setup, before it trains, naming the extra.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from .. import io
from ..compose import mixture_files
from ..errors import LoraError
from ..files import atomic_write, read_text
from ..schema import flat_config
from .config import TRACKERS, TrainConfig

STATE_NAME = "trackers.json"
"""In the run directory: {tracker: run id} of the W&B and MLflow runs, for a resumed run to continue."""
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The module each tracker needs; its pip extra has the tracker's name."""


class Tracker(Protocol):
    def log(self, row: dict[str, float], step: int) -> None:
        """One metrics row (no None values) at optimizer step `step`."""

    def finish(self, run_dir: Path) -> None:
        """The run succeeded and `run_dir` holds its final adapter: record it and end the run."""

    def close(self) -> None:
        """The run failed or was interrupted: end it as failed, without an adapter."""


def open_trackers(cfg: TrainConfig, out_dir: Path, resolved: dict[str, Any], resume_step: int | None,
                  log: Callable[[str], None]) -> list[Tracker]:
    """Start the trackers `cfg.output` asks for: every one of `report_to` (each must be installed,
    or a `LoraError` names its extra before any is started) and TensorBoard when `tensorboard` is
    on and it is installed. `resume_step` is the checkpoint's step on a resumed run (None for a new
    run); W&B and MLflow then continue the runs `trackers.json` names."""
    modules = {name: _require(name) for name in cfg.output.report_to}
    if cfg.output.tensorboard and "tensorboard" not in modules:
        try:
            modules["tensorboard"] = importlib.import_module(MODULES["tensorboard"])
        except ImportError:   # the default: TensorBoard when it is there
            pass
    previous = _read_state(out_dir) if resume_step is not None else {}
    name = cfg.output.run_name or out_dir.resolve().name
    started: dict[str, Tracker] = {}
    with ExitStack() as on_error:   # a tracker that cannot start ends those started before it
        for tracker in sorted(modules, key=TRACKERS.index):
            module = modules[tracker]
            if tracker == "tensorboard":
                started[tracker] = TensorBoardTracker(module, out_dir / "tensorboard", resume_step)
            elif tracker == "wandb":
                started[tracker] = WandbTracker(module, name, resolved, out_dir, previous.get("wandb"))
            else:
                started[tracker] = MlflowTracker(module, name, cfg, previous.get("mlflow"), log)
            on_error.callback(started[tracker].close)
        ids = {k: t.run_id for k, t in started.items() if isinstance(t, WandbTracker | MlflowTracker)}
        if ids:
            text = json.dumps(ids, indent=2) + "\n"
            atomic_write(out_dir / STATE_NAME, lambda tmp: Path(tmp).write_text(text))
        on_error.pop_all()
    return list(started.values())


def _require(tracker: str) -> ModuleType:
    try:
        return importlib.import_module(MODULES[tracker])
    except ImportError:
        raise LoraError(f"output.report_to names {tracker}, which is not installed; "
                        f"pip install 'lorakit[{tracker}]'") from None


def _read_state(out_dir: Path) -> dict[str, str]:
    """The run ids an interrupted run kept; none when it reported to no tracker with runs."""
    file = out_dir / STATE_NAME
    if not file.is_file():
        return {}
    try:
        state = json.loads(read_text(file))
    except json.JSONDecodeError as e:
        raise LoraError(f"{file}:{e.lineno}: not valid JSON ({e.msg}); delete it to start new tracker runs") from None
    if not isinstance(state, dict) or not all(isinstance(v, str) for v in state.values()):
        raise LoraError(f"{file} is not a map of tracker names to run ids; delete it to start new tracker runs")
    return state


def adapter_files(run_dir: Path) -> list[Path]:
    """The files and folders of the run's result in `run_dir`: a PEFT adapter's config and weights,
    or a mixture's config, weights and expert folders."""
    if (run_dir / mixture_files.CONFIG_NAME).is_file():
        _, experts, _ = mixture_files.read_mixture_config(run_dir)
        return [run_dir / mixture_files.CONFIG_NAME, run_dir / mixture_files.WEIGHTS_NAME,
                *(run_dir / e for e in experts)]
    return [run_dir / io.CONFIG_NAME, run_dir / io.WEIGHTS_NAME]


def _first_line(e: BaseException) -> str:
    """The libraries' messages run to paragraphs; lorakit's errors are one line."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class TensorBoardTracker:
    def __init__(self, tensorboard: ModuleType, log_dir: Path, resume_step: int | None) -> None:
        # purge_step hides what an interrupted run logged past its checkpoint, as metrics.csv drops those rows
        self._writer = tensorboard.SummaryWriter(str(log_dir),
                                                 purge_step=None if resume_step is None else resume_step + 1)

    def log(self, row: dict[str, float], step: int) -> None:
        for key, value in row.items():
            self._writer.add_scalar(key, value, step)

    def finish(self, run_dir: Path) -> None:
        self._writer.close()

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    def __init__(self, wandb: ModuleType, name: str, config: dict[str, Any], out_dir: Path,
                 run_id: str | None) -> None:
        self._wandb = wandb
        try:
            self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lorakit"), name=name, config=config,
                                   dir=os.environ.get("WANDB_DIR", str(out_dir)), id=run_id,
                                   resume="allow" if run_id else None)
        except wandb.errors.Error as e:
            raise LoraError(f"output.report_to wandb: {_first_line(e)}") from None
        self.run_id: str = self._run.id

    def log(self, row: dict[str, float], step: int) -> None:
        self._run.log(row, step=step)

    def finish(self, run_dir: Path) -> None:
        artifact = self._wandb.Artifact(f"adapter-{self.run_id}", type="model")
        for path in adapter_files(run_dir):
            if path.is_dir():
                artifact.add_dir(str(path), name=path.name)
            else:
                artifact.add_file(str(path))
        self._run.log_artifact(artifact)
        self._run.finish()

    def close(self) -> None:
        self._run.finish(exit_code=1)


class MlflowTracker:
    def __init__(self, mlflow: ModuleType, name: str, cfg: TrainConfig, run_id: str | None,
                 log: Callable[[str], None]) -> None:
        self._mlflow = mlflow
        uri = mlflow.get_tracking_uri()
        try:
            self._client = mlflow.tracking.MlflowClient()
            if run_id is not None and not self._has_run(run_id):
                log(f"MLflow run {run_id} of {STATE_NAME} is not in {uri}; starting a new MLflow run")
                run_id = None
            if run_id is not None:
                self._client.update_run(run_id, status="RUNNING")
            else:   # params only on a new run: MLflow refuses to change one, and resuming may change a few
                experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorakit")
                found = self._client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
                run_id = self._client.create_run(experiment_id, run_name=name).info.run_id
                params = [mlflow.entities.Param(k, str(v)) for k, v in flat_config(cfg).items()]
                self._client.log_batch(run_id, params=params)
        except mlflow.exceptions.MlflowException as e:
            raise LoraError(f"output.report_to mlflow: the tracking store {uri} cannot be used ({_first_line(e)}); "
                            "set MLFLOW_TRACKING_URI to a tracking server, or to file:DIR with "
                            "MLFLOW_ALLOW_FILE_STORE=true") from None
        self.run_id: str = run_id

    def _has_run(self, run_id: str) -> bool:
        try:
            self._client.get_run(run_id)
        except self._mlflow.exceptions.MlflowException:
            return False
        return True

    def log(self, row: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._mlflow.entities.Metric(k, float(v), now, step) for k, v in row.items()]
        self._client.log_batch(self.run_id, metrics=metrics)

    def finish(self, run_dir: Path) -> None:
        for path in adapter_files(run_dir):
            if path.is_dir():
                self._client.log_artifacts(self.run_id, str(path), f"adapter/{path.name}")
            else:
                self._client.log_artifact(self.run_id, str(path), "adapter")
        self._client.set_terminated(self.run_id, "FINISHED")

    def close(self) -> None:
        self._client.set_terminated(self.run_id, "FAILED")
