"""Registers the `t5` and `bart` encoder-decoder presets (one architecture; the presets
differ in the data objective they are paired with: span corruption vs denoising)."""
from __future__ import annotations

from attrs import define

import mega
from mega.plugins.models.encoder_decoder import EncoderDecoderConfig, EncoderDecoderModel


@define(kw_only=True)
class T5Config(EncoderDecoderConfig):
    name: str = "t5"  # span corruption


@define(kw_only=True)
class BartConfig(EncoderDecoderConfig):
    name: str = "bart"  # text infilling


def build(config, tokenizer, plugins=None) -> EncoderDecoderModel:
    return EncoderDecoderModel(config, tokenizer.vocab_size, plugins)


@mega.hookimpl
def register_models(register):
    register("t5", build, config=T5Config)
    register("bart", build, config=BartConfig)
