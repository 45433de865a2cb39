"""Registers the `gpt` model."""
from __future__ import annotations

import mega
from mega.plugins.models.gpt import GPTConfig, GPTModel


def build_gpt(config: GPTConfig, tokenizer, plugins=None) -> GPTModel:
    return GPTModel(config, tokenizer.vocab_size)


@mega.hookimpl
def register_models(register):
    register("gpt", build_gpt, config=GPTConfig)
