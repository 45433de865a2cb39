"""The `jsonl` logger: `metrics.jsonl` in the run directory, one JSON object per logged
step (`step`, `loss`, `lr`, ...) and per validation (`step`, `val_loss`, ...).

On resume, lines past the resumed step (written after the checkpoint by the interrupted
run) are dropped, so the file always describes the trajectory the weights came from.
"""
from __future__ import annotations

import json

import mega
from mega.checkpoint.atomic import atomic_write_text


class JsonlLogger:
    def __init__(self, run):
        self.path = run.run_dir / "metrics.jsonl"
        self.file = None

    @mega.hookimpl
    def on_train_start(self, run):
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= run.step:
                        kept.append(line)
                except ValueError:
                    pass  # a line torn by a crash
            atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        self.file = self.path.open("a", encoding="utf-8")

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    @mega.hookimpl
    def on_step_end(self, run, step, metrics):
        self._write({"step": step, **metrics})

    @mega.hookimpl
    def on_validation_end(self, run, step, metrics):
        self._write({"step": step, **metrics})

    def _close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    @mega.hookimpl
    def on_train_end(self, run):
        self._close()

    @mega.hookimpl
    def on_exception(self, run, exception):
        self._close()


@mega.hookimpl
def register_loggers(register):
    register("jsonl", JsonlLogger)
