"""Shared fixtures: tiny corpora and tiny experiments that train in a second or two."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from mega.config import config_from_dict
from mega.plugin_manager import load_plugins

WORDS = ("the model reads a token and predicts the next one while the loss falls slowly "
         "data flows through layers of attention and feed forward blocks").split()


def write_corpus(path: Path, lines: int = 200, seed: int = 0) -> Path:
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(lines))
    path.write_text(text + "\n")
    return path


@pytest.fixture(scope="session")
def plugins():
    return load_plugins()


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


def tiny_raw(tmp_path: Path, corpus: Path, **sections) -> dict:
    """A raw config dict for a 2-layer byte-level GPT; `sections` deep-update it."""
    raw = {
        "trainer": {"max_steps": 6, "val_check_interval": 3, "limit_val_batches": 2, "log_every_n_steps": 1,
                    "enable_progress_bar": False},
        "exp_manager": {"exp_dir": str(tmp_path / "results"), "name": "tiny", "loggers": ["jsonl"],
                        "checkpoint": {"every_n_train_steps": 0}},
        "model": {"name": "gpt", "micro_batch_size": 4, "seq_length": 32, "num_layers": 2, "hidden_size": 32,
                  "num_attention_heads": 4, "make_vocab_size_divisible_by": 8, "hidden_dropout": 0.1,
                  "attention_dropout": 0.1,
                  "tokenizer": {"library": "bytes"},
                  "data": {"data_prefix": [str(corpus)], "splits_string": "80,10,10"},
                  "optim": {"lr": 1e-3, "sched": {"name": "cosine", "warmup_steps": 2}}},
    }
    _deep_update(raw, sections)
    return raw


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def tiny_config(tmp_path: Path, corpus: Path, plugins, overrides=(), **sections):
    return config_from_dict(tiny_raw(tmp_path, corpus, **sections), overrides, plugins)


def read_metrics(run_dir: Path) -> list:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
