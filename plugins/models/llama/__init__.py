"""The `llama` model: mega's GPT with the Llama family's defaults, and the converters of
the family's files (Llama 2/3/3.1/3.2, Mistral, Qwen2).

Why a model name of its own, when a Llama is only GPT options (docs/llama.md)? Model
converters are registered by mega model name, and on export the run's `model.name` picks
one: `gpt` exports as GPT-2 (GPT2LMHeadModel), `llama` as LlamaForCausalLM,
MistralForCausalLM or Qwen2ForCausalLM. The name gives the family's files one owner
without the checkpoint formats learning any model name, and `model.name = "llama"` is
the short way to say rotary positions, RMSNorm, SwiGLU, no biases and an untied output
layer. The network is GPTModel either way: every option, parallelism, recomputation and
loss of `gpt` applies, and a `gpt` config with these keys set computes the same model.

This package is the family's own place: the model registration and its converters
(`interop.py`), registered through the entry point `mega.plugins.models.llama`.
"""
from __future__ import annotations

from typing import Literal

from attrs import define

import mega
from mega.config import key
from mega.plugins.models.gpt import GPTConfig, build_gpt


@define(kw_only=True)
class LlamaConfig(GPTConfig):
    """`model.*` keys of the `llama` model: those of `gpt`, with Llama's defaults."""

    position_embedding_type: Literal["learned_absolute", "rope", "none"] = key("rope", help="Llama: rotary positions")
    normalization: Literal["LayerNorm", "RMSNorm"] = key("RMSNorm", help="Llama: RMSNorm")
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = key("swiglu", help="Llama: the gated SiLU MLP")
    add_bias_linear: bool = key(False, help="Llama: no biases (Qwen2: add_qkv_bias = true)")
    share_embeddings_and_output_weights: bool = key(False,
            help="Llama 2/3/3.1: an output layer of its own (3.2 and small Qwen2 tie it)")
    hidden_dropout: float = key(0.0, help="Llama trains without dropout")
    attention_dropout: float = key(0.0, help="Llama trains without dropout")

    @classmethod
    def tiny_preset(cls, directory) -> dict:
        """GPT's tiny experiment as a Llama: 4 query heads sharing 2 key/value heads, the
        gated MLP, RMSNorm, RoPE, an untied head, no dropout."""
        model = super().tiny_preset(directory)["model"]
        model.update(name="llama", num_query_groups=2, ffn_hidden_size=64, hidden_dropout=0.0, attention_dropout=0.0)
        return {"model": model}


@mega.hookimpl
def register_models(register):
    register("llama", build_gpt, config=LlamaConfig)


@mega.hookimpl
def register_model_converters(register):
    """The family's Hugging Face (Llama, Mistral, Qwen2), Megatron-LM, megatron-core and
    NeMo mappings (mega.plugins.models.llama.interop)."""
    from mega.plugins.models.llama.interop import LlamaInterop

    register("llama", LlamaInterop)
