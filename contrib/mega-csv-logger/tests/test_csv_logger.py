"""The third-party path end to end: the installed package shows in `mega plugins` and an
experiment uses its logger by name through `mega run`."""
from __future__ import annotations

import csv
import json

from mega.testing import run_cli


def test_mega_plugins_lists_the_installed_package(capsys):
    assert run_cli(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["csv_logger"]["version"] == "0.1.0"
    assert rows["csv_logger"]["components"] == {"loggers": ["csv"]}


def test_an_experiment_uses_the_csv_logger_by_name(mega_experiment):
    # mega_experiment comes from mega-lm's pytest plugin (mega.testing): a tiny GPT on a
    # generated corpus, written to a TOML file here and run by name like a user would.
    exp = mega_experiment.toml(trainer={"max_steps": 3, "val_check_interval": 3, "limit_val_batches": 1},
                               exp_manager={"name": "csv", "loggers": ["csv"]})
    assert run_cli(["run", str(exp)]) == 0
    rows = list(csv.DictReader((mega_experiment.run_dir("csv") / "metrics.csv").open()))
    assert [r["step"] for r in rows if r["name"] == "loss"] == ["1", "2", "3"]
    assert [(r["split"], r["step"]) for r in rows if r["name"] == "val_loss"] == [("valid", "3")]
