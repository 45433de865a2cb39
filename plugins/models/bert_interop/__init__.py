"""Megatron-BERT's converters: how mega's `bert` models (and their downstream heads) map
to Hugging Face's `MegatronBert*` classes, Megatron-LM's legacy checkpoints and `args`,
and megatron-core's keys. Registered by `mega.plugins.models.bert` under each of its model
names (`register_model_converters`); the checkpoint formats keep the file I/O.

`huggingface.py` holds the transformers mapping, `megatron.py` Megatron-LM's, `nemo.py`
NeMo's `MegatronBertModel` archives and the Megatron-BERT encoder of NeMo's NLP task models
(whose heads are the tasks': mega.plugins.tasks.nemo_interop); the encoder is GPT's
transformer, so what Megatron `args` it cannot run and megatron-core's layer names are
GPT's (mega.plugins.models.gpt_interop).
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

from mega.protocols import Match
from mega.plugins.models.bert_interop import huggingface, megatron, nemo
from mega.plugins.models.gpt_interop import mcore
from mega.plugins.models.gpt_interop.megatron import architecture_args, check_tensors_and_args
from mega.plugins.models.transformer import padded_vocab_size

DIVISIBLE_BY = 128  # BertConfig's make_vocab_size_divisible_by, when an import leaves it unset


class BertInterop:
    # the tokenizers Megatron-BERT checkpoints come with, in the order an import tries them
    tokenizers = ("wordpiece", "bytes")

    # --- Hugging Face: MegatronBert* ---------------------------------------------------------
    hf_model_types = (huggingface.MODEL_TYPE,)
    hf_architectures = tuple(huggingface.ARCHITECTURES.values())

    def hf_model_table(self, hf_config: dict, where: str) -> dict:
        return huggingface.mega_model_config(hf_config, huggingface.architecture_of(hf_config, where), where)

    def from_hf(self, hf_state: Mapping[str, torch.Tensor], model: dict, vocab_size: int, where: str):
        padded = padded_vocab_size(vocab_size, model.get("make_vocab_size_divisible_by", DIVISIBLE_BY))
        return huggingface.hf_to_mega(hf_state, model["name"], model["num_layers"], model["num_attention_heads"],
                                      padded, vocab_size, where)

    def hf_config(self, model_config, tokenizer, dtype: str) -> dict:
        return huggingface.hf_config(model_config, tokenizer, dtype)

    def to_hf(self, state: Mapping[str, torch.Tensor], model_config, vocab_size: int) -> Dict[str, torch.Tensor]:
        return huggingface.checked_mega_to_hf(state, model_config, vocab_size)

    # --- Megatron-LM (legacy) ----------------------------------------------------------------
    vocab_tensors = ("language_model.embedding.word_embeddings.weight", "lm_head.bias")  # the LM-head bias spans it too

    def megatron_recognises(self, state: Mapping[str, torch.Tensor], args) -> Match:
        return Match.MARKED if megatron.is_bert(state, args) else Match.NO

    def megatron_check(self, state: Mapping[str, torch.Tensor], args, where: str) -> None:
        check_tensors_and_args(state, args, where)

    def megatron_model_table(self, state: Mapping[str, torch.Tensor], args, where: str) -> dict:
        return megatron.model_table(dict(state), args, where)

    def megatron_args(self, model: dict) -> dict:
        return {**architecture_args(model), **megatron.bert_args(model)}

    # --- megatron-core names: the encoder's are GPT's ----------------------------------------
    def mcore_name(self, name: str) -> str:
        return mcore.mcore_name(name)

    def mega_name(self, key: str) -> str:
        return mcore.mega_name(key)

    # --- NeMo: MegatronBertModel (NeMo 1.23.0), both ways -------------------------------------
    nemo_tokenizer_style = "megatron"
    nemo_gzip = False

    def nemo_recognises(self, nemo_config: dict) -> Match:
        return Match.MARKED if nemo.is_bert_model(nemo_config) else Match.NO

    def nemo_model_table(self, nemo_config: dict, where: str) -> dict:
        return nemo.bert_model_table(nemo_config, where)

    def nemo_mega_name(self, name: str):
        return name  # `model.` + Megatron-LM's legacy names, mega's own

    def nemo_config(self, model_config, tokenizer_section: dict, tp: int) -> dict:
        return nemo.bert_model_config(model_config, tokenizer_section, tp)

    def nemo_names(self, name: str, model_config):
        return ("model." + name,)

    def nemo_vocab_rows(self, model_config, tokenizer, tp: int) -> int:
        return padded_vocab_size(tokenizer.vocab_size, model_config.make_vocab_size_divisible_by, tp)

    def nemo_artifacts(self, model_config, tp: int):
        return {}
