"""What every first-party task shares: the config it was built from, the run's tokenizer
seen as sub-words, per-split sample caches, and the head it fine-tunes.

A task (`mega.protocols.Task`) turns files into samples for its head, and the head's
outputs back into the metrics people publish and into answers for `mega predict`. The
samples of a split are built once per task object; `evaluate` reads what `build_samples`
kept in `examples[split]` (SQuAD's windows, the words each token-classification
prediction belongs to). One task object serves a whole run: the model it builds
(`model()`) holds it, and the run's data comes from that model's task.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from mega.errors import ConfigError
from mega.plugins.tasks.subwords import Subwords, subword_view

log = logging.getLogger("mega")


class TaskBase:
    head: str = ""  # the registered head model name

    def __init__(self, config):
        self.config = config
        self.examples: Dict[str, Any] = {}  # split -> what its samples were built from (build_samples keeps it)
        self._cache: Dict[str, List[Dict[str, torch.Tensor]]] = {}
        self._subwords: Optional[Subwords] = None

    # --- helpers -------------------------------------------------------------------------------
    @property
    def max_seq_length(self) -> int:
        return self.config.seq_length

    def subwords(self, tokenizer) -> Subwords:
        if self._subwords is None:
            self._subwords = subword_view(tokenizer)
        return self._subwords

    def split_path(self, split: str, key: str = "file") -> Path:
        """The file of `split`, or a ConfigError naming the key to set."""
        files = self.config.split_files(split)
        value = files.path() if key == "file" else getattr(files, key)
        if not value:
            where = self.config.split_key(split)
            shown = "file" if key == "file" else key
            hint = " or trainer.val_check_interval=0 to train without validation" if split == "valid" else ""
            raise ConfigError(f"{where}.{shown}: no {split} file set (e.g. {where}.{shown}=<path>{hint})")
        return Path(value).expanduser()

    def limit(self, split: str, items: Sequence) -> List:
        n = self.config.split_files(split).num_samples
        return list(items) if n is None or n < 0 else list(items)[:n]

    # --- the contract ----------------------------------------------------------------------------
    def model(self, tokenizer, plugins):
        """The model `model.name = "<task>"` trains: this task's head on the configured
        encoder, holding this task (mega.plugins.tasks.finetune.task_model)."""
        from mega.plugins.tasks.finetune import task_model

        return task_model(self, tokenizer, plugins)

    def check(self) -> None:
        """Key errors found from the config alone (files are read when samples are built)."""

    def head_options(self) -> Dict[str, Any]:
        return {}

    def samples(self, split: str, tokenizer) -> List[Dict[str, torch.Tensor]]:
        if split not in self._cache:
            self._cache[split] = self.build_samples(split, tokenizer)
            log.info("%s: %d %s samples", self.config.name, len(self._cache[split]), split)
        return self._cache[split]

    def build_samples(self, split: str, tokenizer) -> List[Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def evaluate(self, split: str, outputs: Sequence[Dict[str, torch.Tensor]], directory: Optional[Path]) -> Dict[str, float]:
        raise NotImplementedError

    def predict(self, inputs: Dict[str, Any], tokenizer, infer) -> Dict[str, Any]:
        raise NotImplementedError


def need(inputs: Dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if not inputs.get(k)]
    if missing:
        raise ConfigError(f"mega predict: this task needs {' and '.join('--' + k for k in missing)}")


def softmax(t: torch.Tensor) -> List[float]:
    return t.float().softmax(-1).tolist()
