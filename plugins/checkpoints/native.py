"""The `native` checkpoint format: one torch file per part of the training state.

    model.pt      the model's state dict
    optimizer.pt  the optimizer's state dict
    trainer.pt    step, consumed samples, loss scaler, RNG states

All are plain tensors and containers, loaded with `weights_only=True`: opening a
checkpoint never runs code from it. Atomic writes, checksums and the `latest` pointer are
the kernel's (mega.training.checkpointing).
"""
from __future__ import annotations

from pathlib import Path

import torch

import mega
from mega.errors import CheckpointError

PARTS = ("model", "optimizer", "trainer")


class NativeFormat:
    name = "native"

    def save(self, state: dict, directory: Path) -> None:
        for part in PARTS:
            if part in state:
                torch.save(state[part], directory / f"{part}.pt")

    def load(self, directory: Path, parts=PARTS) -> dict:
        state = {}
        for part in parts:
            path = directory / f"{part}.pt"
            if not path.is_file():
                if part == "model":
                    raise CheckpointError(f"{path}: missing from the checkpoint")
                continue
            try:
                state[part] = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
        return state


@mega.hookimpl
def register_checkpoint_formats(register):
    register("native", NativeFormat)
