"""The `mlflow` logger: every metric mega logs, to an MLflow run.

Turned on like NeMo's exp_manager does it, `exp_manager.create_mlflow_logger = true` with
`exp_manager.mlflow_logger_kwargs` (NeMo's MLFlowParams: `experiment_name`, `run_name`,
`tracking_uri`, `tags`, `save_dir`, `prefix`, `artifact_location`, `run_id`), or by listing
`"mlflow"` in `exp_manager.loggers`. Needs `pip install 'mega-lm[mlflow]'` (mlflow-skinny);
without it the run stops before it starts, naming the extra.

* Where: `tracking_uri`, else `MLFLOW_TRACKING_URI`, else the file store `save_dir`
  (`./mlruns`, NeMo's default). MLflow 3 refuses a file store unless
  `MLFLOW_ALLOW_FILE_STORE=true`; that refusal, or an unreachable server, stops the run
  before its first step with MLflow's reason.
* Metrics: `train/<name>` at each logged step and `val/<name>` at each validation, with
  the step as MLflow's step.
* Parameters: the resolved config as flat `dotted.key` parameters. MLflow never changes a
  logged parameter, so a resumed run that changed a key (more steps, another learning
  rate) logs it as the tag `config_change.<key>` ("old -> new at step N").
* Resume: the run id is kept in `<run_dir>/trackers.json`; a run resuming from a checkpoint
  reopens that MLflow run (in the same tracking store), one starting from step 0 opens a
  new one. A `run_id` in the settings reopens that run instead.
* The run ends FINISHED, KILLED (SIGTERM, Ctrl-C) or FAILED.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

from attrs import define, field

import mega
from mega.errors import ConfigError
from mega.plugins.loggers.trackers import TrackerRuns, flat_params, logger_key, read_settings, require_package

log = logging.getLogger("mega")

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
BATCH = 100  # MLflow takes at most 100 parameters (1000 metrics) per log_batch


@define(kw_only=True)
class MlflowSettings:
    """`exp_manager.mlflow_logger_kwargs`: NeMo's MLFlowParams (Lightning's MLFlowLogger)."""

    experiment_name: Optional[str] = None  # default: exp_manager.name (NeMo)
    run_name: Optional[str] = None  # default: exp_manager.name
    tracking_uri: Optional[str] = None  # default: MLFLOW_TRACKING_URI, else the file store save_dir
    tags: Dict[str, Any] = field(factory=dict)  # set on a new run
    save_dir: str = "./mlruns"  # the file store when no tracking_uri is given (NeMo's default)
    prefix: str = ""  # put before every metric name, joined with "-" (Lightning's prefix)
    artifact_location: Optional[str] = None  # for a new experiment
    run_id: Optional[str] = None  # reopen this run instead of the stored one or a new one
    synchronous: Optional[bool] = None  # Lightning's; mega always logs synchronously
    log_model: bool = False  # Lightning uploads checkpoints as artifacts; mega keeps them in the run directory only


def settings(config) -> MlflowSettings:
    s = read_settings(config, "mlflow", MlflowSettings)
    if s.log_model:
        raise ConfigError("exp_manager.mlflow_logger_kwargs.log_model: uploading checkpoints to MLflow is not supported;"
                          " they stay in <run_dir>/checkpoints (set log_model = false)")
    if s.synchronous is False:
        raise ConfigError("exp_manager.mlflow_logger_kwargs.synchronous = false: mega logs synchronously; leave it unset")
    return s


def tracking_uri(s: MlflowSettings) -> str:
    if s.tracking_uri:
        return s.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return Path(s.save_dir).expanduser().resolve().as_uri()


class MlflowLogger:
    @staticmethod
    def check(config) -> None:
        """Before the run directory is written: the package is there, the settings read."""
        require_package("mlflow", "mlflow", logger_key(config, "mlflow"))
        settings(config)

    def __init__(self, run):
        from mlflow.tracking import MlflowClient

        s = settings(run.config)
        self.prefix = f"{s.prefix}-" if s.prefix else ""
        uri = tracking_uri(s)
        stored = TrackerRuns(run.run_dir)
        previous = stored.get("mlflow") if run.resumed_from is not None else {}
        run_id = s.run_id or (previous.get("run_id") if previous.get("tracking_uri") == uri else None)
        if previous and not s.run_id and run_id is None:
            log.warning("mlflow: the run logged to %s before, now to %s: a new MLflow run starts there",
                        previous.get("tracking_uri"), uri)
        try:
            self.client = MlflowClient(tracking_uri=uri)
            if run_id is not None:
                self.client.update_run(run_id, status="RUNNING")
            else:
                name = s.experiment_name or run.config.exp_manager.name
                experiment = self.client.get_experiment_by_name(name)
                experiment_id = (experiment.experiment_id if experiment is not None
                                 else self.client.create_experiment(name, artifact_location=s.artifact_location))
                tags = {k: str(v) for k, v in s.tags.items()}
                run_id = self.client.create_run(experiment_id, run_name=s.run_name or run.config.exp_manager.name,
                                                tags=tags).info.run_id
            self.run_id = run_id
            self._log_params(run)
        except Exception as exc:  # MLflow's errors: a refused file store, an unreachable server, an unknown run_id
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"exp_manager.mlflow_logger_kwargs: MLflow cannot log to {uri}"
                              f"{f' (run {run_id})' if run_id else ''}: {exc}") from exc
        stored.put("mlflow", {"run_id": self.run_id, "tracking_uri": uri})

    def _log_params(self, run) -> None:
        from mlflow.entities import Param, RunTag

        logged = self.client.get_run(self.run_id).data.params
        params, tags = [], []
        for key, value in flat_params(run.config, MAX_PARAM_LENGTH).items():
            if key not in logged:
                params.append(Param(key, value))
            elif logged[key] != value:
                tags.append(RunTag(f"config_change.{key}", f"{logged[key]} -> {value} at step {run.step}"))
        for i in range(0, max(len(params), len(tags)), BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + BATCH], tags=tags[i:i + BATCH])

    def _log(self, split: str, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{self.prefix}{split}/{k}", float(v), now, step)
                                                    for k, v in metrics.items()])

    @mega.hookimpl
    def on_step_end(self, run, step, metrics):
        self._log("train", step, metrics)

    @mega.hookimpl
    def on_validation_end(self, run, step, metrics):
        self._log("val", step, metrics)

    def _end(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)
            self.run_id = None

    @mega.hookimpl
    def on_train_end(self, run):
        self._end("FINISHED")

    @mega.hookimpl
    def on_exception(self, run, exception):
        self._end("KILLED" if isinstance(exception, (SystemExit, KeyboardInterrupt)) else "FAILED")


@mega.hookimpl
def register_loggers(register):
    register("mlflow", MlflowLogger)
