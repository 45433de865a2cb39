"""NeMo 1.x task keys that mega accepts so NeMo's own configs load, and does not use.

A NeMo fine-tuning config carries keys for things mega does differently: DataLoader
options (mega's task samples are in memory and every batch is full: an epoch wraps into
the next), feature caches (mega rebuilds features in seconds), the `.nemo` path written
after training (`mega export RUN PATH` writes mega's). Each is a
field declared with `nemo_key(note)`: unset by default, and a run that sets one gets one
log line naming every such key and what mega does instead (`note_unused`), the same way
for every task. Keys with a meaning in mega (`shuffle`, `model.label_ids`, a token
classification's `class_labels.class_labels_file`, the head sections of
mega.plugins.tasks.heads) are ordinary fields of the tasks.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import attrs
from attrs import define, field

log = logging.getLogger("mega")

LOADER = "NeMo's DataLoader options, mega's samples are in memory and its batches always full"
BATCH = "NeMo's per-GPU batch, mega's is model.micro_batch_size"
CACHE = "mega rebuilds the features each run"
LOWER_CASE = "model.tokenizer.do_lower_case decides the lower-casing"


def nemo_key(note: str, same: Any = None):
    """A NeMo key mega accepts and does not use: unset by default; `note` says what mega
    does instead, logged when a run sets the key to anything but `same` (what mega does
    anyway, e.g. `use_cache = false`)."""
    return field(default=None, metadata={"nemo": note, "same": same})


def unused(config, prefix: str = "model") -> List[Tuple[str, str]]:
    """(dotted key, note) for each NeMo-only key set in the attrs tree `config`."""
    out = []
    for a in attrs.fields(type(config)):
        value = getattr(config, a.name)
        if "nemo" in a.metadata:
            if value is not None and value != a.metadata["same"]:
                out.append((f"{prefix}.{a.name}", a.metadata["nemo"]))
        elif attrs.has(type(value)):
            out.extend(unused(value, f"{prefix}.{a.name}"))
    return out


def note_unused(config) -> None:
    """One log line naming the NeMo-only keys a run sets, grouped by what mega does instead
    (nothing when it sets none)."""
    groups: Dict[str, List[str]] = {}
    for key, note in unused(config):
        groups.setdefault(note, []).append(key)
    if groups:
        log.warning("NeMo keys accepted and not used by mega: %s",
                    "; ".join(f"{', '.join(keys)} ({note})" for note, keys in groups.items()))
