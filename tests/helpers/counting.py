"""A GPT that counts what the kernel calls on it (a protocol-conformance probe)."""
from __future__ import annotations

import torch

from mega.plugins.models.gpt import GPTModel


class CountingGPT(GPTModel):
    """A StatefulModel for the test: each micro-batch's loss is scaled by a function of a
    running value carried from earlier batches, so losses after a resume differ unless
    the carried state was saved and restored."""

    def __init__(self, *args):
        super().__init__(*args)
        self.memory = torch.zeros(())

    def training_loss(self, batch):
        out = super().training_loss(batch)
        out["loss_sum"] = out["loss_sum"] * (1.0 + 0.1 * torch.tanh(self.memory))
        self.memory = (self.memory + batch["tokens"].float().mean() / 100.0).detach()
        return out

    def carried_state(self):
        return {"memory": self.memory}

    def load_carried_state(self, state):
        self.memory = state["memory"].clone()
