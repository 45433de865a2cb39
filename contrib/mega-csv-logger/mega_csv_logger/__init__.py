"""The `csv` logger: metrics.csv in long format (step, split, name, value).

Long format keeps one fixed header although models report different loss terms and
validation rows carry other names than training rows.
"""
from __future__ import annotations

import csv

import mega

__version__ = "0.1.0"


class CsvLogger:
    def __init__(self, run):
        self.path = run.run_dir / "metrics.csv"
        self.file = None
        self.writer = None

    @mega.hookimpl
    def on_train_start(self, run):
        new = not self.path.exists()
        self.file = self.path.open("a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "split", "name", "value"])

    def _rows(self, step, split, metrics):
        for name, value in metrics.items():
            self.writer.writerow([step, split, name, repr(float(value))])
        self.file.flush()

    @mega.hookimpl
    def on_step_end(self, run, step, metrics):
        self._rows(step, "train", metrics)

    @mega.hookimpl
    def on_validation_end(self, run, step, metrics):
        self._rows(step, "valid", metrics)

    @mega.hookimpl
    def on_train_end(self, run):
        self.file.close()

    @mega.hookimpl
    def on_exception(self, run, exception):
        if self.file is not None:
            self.file.close()


@mega.hookimpl
def register_loggers(register):
    register("csv", CsvLogger)
