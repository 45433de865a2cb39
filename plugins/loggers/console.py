"""The `console` logger: a progress bar with ETA and the latest loss on a terminal; plain
lines elsewhere (CI, SLURM, a pipe), one per logged step."""
from __future__ import annotations

import os
import sys

import mega


def progress_bar_wanted(setting) -> bool:
    if setting is not None:
        return bool(setting)
    if os.environ.get("CI") or os.environ.get("SLURM_JOB_ID"):
        return False
    return sys.stderr.isatty()


def format_metrics(metrics: dict, keys=("loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "tflops", "loss_scale")) -> str:
    parts = []
    for k in keys:
        if k in metrics:
            v = metrics[k]
            parts.append(f"{k} {v:.3e}" if k in ("lr", "loss_scale") else f"{k} {v:.4g}" if k != "tokens_per_sec" else f"tok/s {v:,.0f}")
    for k, v in metrics.items():  # extra loss terms reported by the model
        if k not in keys and k != "skipped":
            parts.append(f"{k} {v:.4g}")
    return " | ".join(parts)


class ConsoleLogger:
    def __init__(self, run):
        self.bar = None
        self.enabled = progress_bar_wanted(run.config.trainer.enable_progress_bar)

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    @mega.hookimpl
    def on_train_start(self, run):
        max_steps = run.config.trainer.max_steps
        if run.resumed_from is not None:
            self._write(f"resuming at step {run.step}/{max_steps} from {run.resumed_from}")
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    @mega.hookimpl
    def on_step_end(self, run, step, metrics):
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e}")
        else:
            self._write(f"step {step}/{run.config.trainer.max_steps} | {format_metrics(metrics)}")

    @mega.hookimpl
    def on_validation_end(self, run, step, metrics):
        self._write(f"validation at step {step} | {format_metrics(metrics)}")

    @mega.hookimpl
    def on_checkpoint_saved(self, run, step, path):
        self._write(f"checkpoint saved: {path}")

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @mega.hookimpl
    def on_train_end(self, run):
        self._close()
        self._write(f"done: {run.step} steps, run directory {run.run_dir}")

    @mega.hookimpl
    def on_exception(self, run, exception):
        self._close()


@mega.hookimpl
def register_loggers(register):
    register("console", ConsoleLogger)
