"""The `wandb` logger: every metric mega logs, to a Weights & Biases run.

Turned on like NeMo's exp_manager does it, `exp_manager.create_wandb_logger = true` with
`exp_manager.wandb_logger_kwargs` (Lightning's WandbLogger names: `name`, `project`,
`id`/`version`, `save_dir`/`dir`, `offline`, `prefix`, plus `entity`, `group`, `job_type`,
`tags`, `notes`, `mode`), or by listing `"wandb"` in `exp_manager.loggers`. Needs
`pip install 'mega-lm[wandb]'`; without it the run stops before it starts, naming the extra.

* Metrics: `train/<name>` at each logged step and `val/<name>` at each validation (the
  names of mega's TensorBoard events), against `trainer/global_step` (W&B's x-axis, as
  Lightning logs it), so a resumed run may log a step again without W&B dropping it.
* Parameters: the resolved config (nested tables) as the run's config.
* Resume: the run id is kept in `<run_dir>/trackers.json`; a run resuming from a checkpoint
  reopens that W&B run (`resume="allow"`), one starting from step 0 opens a new one. An
  `id` (or Lightning's `version`) in the settings pins the run id instead.
* Offline: `offline = true` (or `WANDB_MODE=offline`) writes the run under
  `<save_dir>/wandb/offline-run-*` for `wandb sync`; `save_dir` defaults to the run directory.
"""
from __future__ import annotations

import secrets
from typing import List, Literal, Optional

from attrs import define, field

import mega
from mega.config import to_dict
from mega.errors import ConfigError
from mega.plugins.loggers.trackers import TrackerRuns, logger_key, read_settings, require_package

STEP_METRIC = "trainer/global_step"


@define(kw_only=True)
class WandbSettings:
    """`exp_manager.wandb_logger_kwargs`: Lightning's WandbLogger arguments that NeMo passes
    through, and the wandb.init arguments runs commonly set."""

    name: Optional[str] = None  # the run's display name; default exp_manager.name
    project: Optional[str] = None  # default: W&B's ("uncategorized")
    entity: Optional[str] = None  # the user or team owning the project
    id: Optional[str] = None  # pin the W&B run id (default: a new id, kept in trackers.json for resuming)
    version: Optional[str] = None  # Lightning's name for id
    save_dir: Optional[str] = None  # where W&B writes its files (<save_dir>/wandb/); default: the run directory
    dir: Optional[str] = None  # Lightning's other name for save_dir
    offline: bool = False  # write the run locally for `wandb sync` (mode = "offline")
    mode: Optional[Literal["online", "offline", "disabled"]] = None  # wandb.init's mode; default: WANDB_MODE, else online
    anonymous: Optional[Literal["allow", "must", "never"]] = None
    group: Optional[str] = None
    job_type: Optional[str] = None
    tags: List[str] = field(factory=list)
    notes: Optional[str] = None
    prefix: str = ""  # put before every metric name, joined with "-" (Lightning's prefix)
    resume: Literal["allow", "must", "never"] = "allow"  # wandb.init's resume for a stored or pinned id (Lightning: "allow")
    log_model: bool = False  # Lightning uploads checkpoints as artifacts; mega keeps them in the run directory only


def settings(config) -> WandbSettings:
    s = read_settings(config, "wandb", WandbSettings)
    if s.log_model:
        raise ConfigError("exp_manager.wandb_logger_kwargs.log_model: uploading checkpoints to W&B is not supported;"
                          " they stay in <run_dir>/checkpoints (set log_model = false)")
    if s.id and s.version and s.id != s.version:
        raise ConfigError(f"exp_manager.wandb_logger_kwargs: id={s.id!r} and version={s.version!r} name two runs; give one")
    if s.save_dir and s.dir and s.save_dir != s.dir:
        raise ConfigError(f"exp_manager.wandb_logger_kwargs: save_dir={s.save_dir!r} and dir={s.dir!r}; give one")
    return s


class WandbLogger:
    @staticmethod
    def check(config) -> None:
        """Before the run directory is written: the package is there, the settings read."""
        require_package("wandb", "wandb", logger_key(config, "wandb"))
        settings(config)

    def __init__(self, run):
        import wandb

        s = settings(run.config)
        self.prefix = f"{s.prefix}-" if s.prefix else ""
        stored = TrackerRuns(run.run_dir)
        run_id = s.id or s.version or (stored.get("wandb").get("id") if run.resumed_from is not None else None)
        run_id = run_id or secrets.token_hex(4)  # W&B's own ids are 8 characters of [a-z0-9]
        save_dir = s.save_dir or s.dir or str(run.run_dir)
        mode = "offline" if s.offline else s.mode
        try:
            self.run = wandb.init(
                id=run_id, resume=s.resume, name=s.name or run.config.exp_manager.name, project=s.project,
                entity=s.entity, dir=save_dir, mode=mode, anonymous=s.anonymous, group=s.group, job_type=s.job_type,
                tags=s.tags or None, notes=s.notes)
        except Exception as exc:  # wandb's own errors (a run that must resume and does not exist, no login, ...)
            raise ConfigError(f"exp_manager.wandb_logger_kwargs: W&B could not open run {run_id!r}: {exc}") from exc
        self.run.config.update(to_dict(run.config), allow_val_change=True)  # a resumed run may change safe keys
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC, step_sync=True)
        stored.put("wandb", {"id": self.run.id, "project": self.run.project, "dir": save_dir})

    def _log(self, split: str, step: int, metrics: dict) -> None:
        self.run.log({**{f"{self.prefix}{split}/{k}": float(v) for k, v in metrics.items()}, STEP_METRIC: step})

    @mega.hookimpl
    def on_step_end(self, run, step, metrics):
        self._log("train", step, metrics)

    @mega.hookimpl
    def on_validation_end(self, run, step, metrics):
        self._log("val", step, metrics)

    def _finish(self, exit_code: int) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None

    @mega.hookimpl
    def on_train_end(self, run):
        self._finish(0)

    @mega.hookimpl
    def on_exception(self, run, exception):
        code = exception.code if isinstance(exception, SystemExit) and isinstance(exception.code, int) else 1
        self._finish(code)


@mega.hookimpl
def register_loggers(register):
    register("wandb", WandbLogger)
