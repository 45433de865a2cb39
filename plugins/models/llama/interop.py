"""The `llama` model's converters: how its files map to Hugging Face's Llama, Mistral and
Qwen2 classes, Megatron-LM's checkpoints and `args`, megatron-core's keys and NeMo's
archives (the contracts: `mega.protocols`). One module per tool; this class assembles them.

megatron-core, Megatron-LM and NeMo build a Llama from the same GPTModel as GPT-2, so
those mappings are GPT's (mega.plugins.models.gpt_interop), which know every
architecture option; this family adds what marks a file as its own (a gated MLP, RMSNorm,
rotary positions, an untied output layer, grouped-query attention) so that an import
names the model `llama`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping

import torch

from mega.protocols import Match
from mega.plugins.models.gpt_interop import mcore
from mega.plugins.models.gpt_interop import megatron as gpt_megatron
from mega.plugins.models.llama import huggingface, nemo
from mega.plugins.models.transformer import padded_vocab_size

DIVISIBLE_BY = 128  # GPTConfig's make_vocab_size_divisible_by, when an import leaves it unset


class LlamaInterop:
    # Llama 2 / Mistral ship a sentencepiece tokenizer.model (read first), Llama 3 / Qwen2 a tokenizer.json
    tokenizers = ("sentencepiece", "huggingface")

    # --- Hugging Face: Llama, Mistral, Qwen2 ------------------------------------------------
    hf_model_types = tuple(huggingface.MODEL_TYPES)
    hf_architectures = tuple(huggingface.MODEL_TYPES.values())

    def hf_model_table(self, hf_config: dict, where: str) -> dict:
        return huggingface.model_table(hf_config, where)

    def from_hf(self, hf_state: Mapping[str, torch.Tensor], model: dict, vocab_size: int, where: str):
        padded = padded_vocab_size(vocab_size, model.get("make_vocab_size_divisible_by", DIVISIBLE_BY))
        return huggingface.hf_to_mega(hf_state, model, padded, vocab_size, where)

    def hf_config(self, model_config, tokenizer, dtype: str) -> dict:
        return huggingface.hf_config(model_config, tokenizer, dtype)

    def to_hf(self, state: Mapping[str, torch.Tensor], model_config, vocab_size: int) -> Dict[str, torch.Tensor]:
        return huggingface.mega_to_hf(state, model_config, vocab_size)

    # --- Megatron-LM: GPT's args and names; the architecture marks the family ---------------------
    vocab_tensors = (gpt_megatron.WORD, gpt_megatron.UNTIED)

    def megatron_recognises(self, state: Mapping[str, torch.Tensor], args) -> Match:
        return Match.MARKED if gpt_megatron.marked_by_architecture(state, args) else Match.NO

    def megatron_check(self, state: Mapping[str, torch.Tensor], args, where: str) -> None:
        gpt_megatron.check_tensors_and_args(state, args, where)

    def megatron_model_table(self, state: Mapping[str, torch.Tensor], args, where: str) -> dict:
        return {**gpt_megatron.model_table(state, args, where), "name": "llama"}

    def megatron_args(self, model: dict) -> dict:
        return gpt_megatron.architecture_args(model)

    def megatron_check_resume(self, args, model_config, where: str) -> None:
        gpt_megatron.check_resume(args, model_config, where)

    # --- megatron-core names (GPT's) ----------------------------------------------------------
    def mcore_name(self, name: str) -> str:
        return mcore.mcore_name(name)

    def mega_name(self, key: str) -> str:
        return mcore.mega_name(key)

    # --- NeMo: MegatronGPTModel archives with the family's architecture -------------------------
    tied = True  # the archive's; set by nemo_model_table, read by nemo_mega_name (one archive per object)

    def nemo_recognises(self, nemo_config: dict) -> Match:
        return Match.MARKED if nemo.is_gpt(nemo_config) is not False and nemo.marked(nemo_config) else Match.NO

    def nemo_model_table(self, nemo_config: dict, where: str) -> dict:
        table = nemo.model_table(nemo_config, Path(where))
        self.tied = table["share_embeddings_and_output_weights"]
        return table

    def nemo_mega_name(self, name: str):
        return nemo.mega_name(name, self.tied)
