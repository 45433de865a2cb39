"""The `native` checkpoint format: one torch file per part of the training state.

    model.pt      the model's state dict
    optimizer.pt  the optimizer's state dict
    trainer.pt    step, consumed samples, loss scaler, RNG states

With tensor or pipeline parallelism each model-parallel rank writes its own files into
`mp_rank_{tp:02d}/` (`mp_rank_{tp:02d}_{pp:03d}/` with pipeline parallelism), the folder
names Megatron-LM uses.

All are plain tensors and containers, loaded with `weights_only=True`: opening a
checkpoint never runs code from it. Atomic writes, checksums and the `latest` pointer are
the kernel's (mega.checkpoint).
"""
from __future__ import annotations

from pathlib import Path

import torch

import mega
from mega.errors import CheckpointError
from mega.checkpoint.load_errors import describe

PARTS = ("model", "optimizer", "trainer", "sharding")


def rank_folder(directory: Path, parallel) -> Path:
    """Where this model-parallel rank's files live (the directory itself for one rank)."""
    tp, pp = (parallel.tp_size, parallel.pp_size) if parallel is not None else (1, 1)
    if tp * pp == 1:
        return directory
    name = f"mp_rank_{parallel.tp_rank:02d}" + (f"_{parallel.pp_rank:03d}" if pp > 1 else "")
    return directory / name


class NativeFormat:
    name = "native"

    def save(self, state: dict, directory: Path, parallel=None) -> None:
        folder = rank_folder(directory, parallel)
        folder.mkdir(parents=True, exist_ok=True)
        for part in PARTS:
            if part in state:
                torch.save(state[part], folder / f"{part}.pt")

    def load(self, directory: Path, parallel=None, parts=PARTS) -> dict:
        state = {}
        folder = rank_folder(directory, parallel)
        for part in parts:
            path = folder / f"{part}.pt"
            if not path.is_file():
                if part == "model":
                    raise CheckpointError(f"{path}: missing from the checkpoint")
                continue
            try:
                state[part] = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot be read: {describe(exc)}") from None
        return state


@mega.hookimpl
def register_checkpoint_formats(register):
    register("native", NativeFormat)
