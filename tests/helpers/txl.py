"""The tiny Transformer-XL experiment the TXL tests share."""
from __future__ import annotations

from pathlib import Path

from mega.config import config_from_dict
from mega.testing import deep_update


def txl_raw(tmp_path, corpus, **sections) -> dict:
    raw = {
        "trainer": {"max_steps": 4, "val_check_interval": 2, "limit_val_batches": 1, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "accelerator": "cpu", "gradient_clip_val": 0.25},
        "exp_manager": {"exp_dir": str(Path(tmp_path) / "results"), "name": "txl", "loggers": ["jsonl"],
                        "checkpoint": {"every_n_train_steps": 0}},
        "model": {"name": "transformer_xl", "micro_batch_size": 2, "global_batch_size": 4, "tgt_len": 16,
                  "mem_len": 16, "n_layer": 2, "d_model": 32, "n_head": 2, "d_head": 16, "d_inner": 64,
                  "dropout": 0.1, "dropatt": 0.1, "cutoffs": [64, 128], "div_val": 2,
                  "tokenizer": {"library": "bytes"},
                  "data": {"data_impl": "lm_ordered", "data_prefix": [str(corpus)], "splits_string": "80,10,10"},
                  "optim": {"lr": 3e-3, "weight_decay": 0.0, "sched": {"name": "cosine", "warmup_steps": 1}}},
    }
    return deep_update(raw, sections)


def txl_config(tmp_path, corpus, plugins, overrides=(), **sections):
    return config_from_dict(txl_raw(tmp_path, corpus, **sections), list(overrides), plugins)
