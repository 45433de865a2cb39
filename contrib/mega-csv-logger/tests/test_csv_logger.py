"""The third-party path end to end: the installed package shows in `mega plugins` and an
experiment uses its logger by name through `mega run`."""
from __future__ import annotations

import csv
import json
import random

from mega.cli import main


def test_mega_plugins_lists_the_installed_package(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["csv_logger"]["version"] == "0.1.0"
    assert rows["csv_logger"]["components"] == {"loggers": ["csv"]}


def test_an_experiment_uses_the_csv_logger_by_name(tmp_path):
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice("abc de fgh ij".split()) for _ in range(20)) for _ in range(50)))
    exp = tmp_path / "exp.toml"
    exp.write_text(f"""
[trainer]
max_steps = 3
val_check_interval = 3
limit_val_batches = 1
log_every_n_steps = 1
[exp_manager]
exp_dir = "{tmp_path}"
name = "csv"
loggers = ["csv"]
[model]
micro_batch_size = 2
seq_length = 16
num_layers = 1
hidden_size = 16
num_attention_heads = 2
[model.tokenizer]
library = "bytes"
[model.data]
data_prefix = ["{corpus}"]
splits_string = "80,20,0"
""")
    assert main(["run", str(exp)]) == 0
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    assert [r["step"] for r in rows if r["name"] == "loss"] == ["1", "2", "3"]
    assert [(r["split"], r["step"]) for r in rows if r["name"] == "val_loss"] == [("valid", "3")]
