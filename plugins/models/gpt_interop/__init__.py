"""GPT's converters: how mega's `gpt` maps to Hugging Face's GPT-2, Megatron-LM's legacy
checkpoints and `args`, megatron-core's keys (`torch_dist`, NeMo mcore) and NeMo's
`MegatronGPTModel` archives. Registered by `mega.plugins.models.gpt`
(`register_model_converters`); the checkpoint formats keep the file I/O and call these
(the contracts: `mega.protocols.HuggingFaceModelConverter`, `MegatronModelConverter`,
`MegatronCoreNames`, `NemoModelConverter`).

One module per tool: `huggingface.py` (GPT-2's names and config.json), `megatron.py`
(`args`, what mega's GPT cannot run), `mcore.py` (megatron-core's names), `nemo.py`
(model_config.yaml). This class only assembles them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping

import torch

from mega.errors import CheckpointError
from mega.protocols import Match
from mega.plugins.models.gpt_interop import huggingface, mcore, megatron, nemo
from mega.plugins.models.transformer import padded_vocab_size

DIVISIBLE_BY = 128  # GPTConfig's make_vocab_size_divisible_by, when an import leaves it unset


class GPTInterop:
    # the tokenizers GPT checkpoints come with, in the order an import tries them
    tokenizers = ("sentencepiece", "huggingface", "wordpiece", "bytes")

    # --- Hugging Face: GPT-2 -----------------------------------------------------------------
    hf_model_types = (huggingface.MODEL_TYPE,)
    hf_architectures = ("GPT2LMHeadModel",)

    def hf_model_table(self, hf_config: dict, where: str) -> dict:
        return huggingface.mega_model_config(hf_config, where)

    def from_hf(self, hf_state: Mapping[str, torch.Tensor], model: dict, vocab_size: int, where: str):
        padded = padded_vocab_size(vocab_size, model.get("make_vocab_size_divisible_by", DIVISIBLE_BY))
        return huggingface.hf_to_mega(dict(hf_state), model["num_layers"], model["num_attention_heads"], padded,
                                      vocab_size, where)

    def hf_config(self, model_config, tokenizer, dtype: str) -> dict:
        return huggingface.gpt2_config(model_config, tokenizer, dtype)

    def to_hf(self, state: Mapping[str, torch.Tensor], model_config, vocab_size: int) -> Dict[str, torch.Tensor]:
        return huggingface.checked_mega_to_hf(dict(state), model_config, vocab_size)

    # --- Megatron-LM (legacy) ----------------------------------------------------------------
    vocab_tensors = (megatron.WORD, megatron.UNTIED)

    def megatron_recognises(self, state: Mapping[str, torch.Tensor], args) -> Match:
        """Any legacy language model fits GPT's names (every architecture option is GPT's);
        a family with more marks itself (the Llama family: its architecture)."""
        return Match.FITS if any(k.startswith("language_model.") for k in state) else Match.NO

    def megatron_check(self, state: Mapping[str, torch.Tensor], args, where: str) -> None:
        megatron.check_tensors_and_args(state, args, where)

    def megatron_model_table(self, state: Mapping[str, torch.Tensor], args, where: str) -> dict:
        return megatron.model_table(state, args, where)

    def megatron_args(self, model: dict) -> dict:
        return megatron.architecture_args(model)

    def megatron_check_resume(self, args, model_config, where: str) -> None:
        megatron.check_resume(args, model_config, where)

    # --- megatron-core names -----------------------------------------------------------------
    def mcore_name(self, name: str) -> str:
        return mcore.mcore_name(name)

    def mega_name(self, key: str) -> str:
        return mcore.mega_name(key)

    # --- NeMo --------------------------------------------------------------------------------
    def nemo_recognises(self, nemo_config: dict) -> Match:
        """A GPT class marks the archive GPT's, unless its yaml asks for what GPT-2's NeMo
        mapping refuses (another family's architecture, such as the Llama family's: it
        only fits then, and that family's converter, which marks it, reads it)."""
        gpt = nemo.is_gpt(nemo_config)
        if gpt:
            try:
                nemo.model_config(nemo_config)
            except CheckpointError:
                return Match.FITS
        return Match.FITS if gpt is None else Match.MARKED if gpt else Match.NO

    def nemo_model_table(self, nemo_config: dict, where: str) -> dict:
        return nemo.model_config(nemo_config, Path(where))

    def nemo_mega_name(self, name: str):
        return nemo.mega_name(name)

    # NeMo export (NemoModelExporter): MegatronGPTModel of NeMo 1.23.0, legacy names
    nemo_tokenizer_style = "megatron"
    nemo_gzip = False

    def nemo_config(self, model_config, tokenizer_section: dict, tp: int) -> dict:
        huggingface.check_gpt2_shape(model_config, "the GPT-2-shaped MegatronGPTModel archive mega writes")
        return nemo.export_config(model_config, tokenizer_section, tp)

    def nemo_names(self, name: str, model_config):
        return (nemo.nemo_name(name),)

    def nemo_vocab_rows(self, model_config, tokenizer, tp: int) -> int:
        return padded_vocab_size(tokenizer.vocab_size, model_config.make_vocab_size_divisible_by, tp)

    def nemo_artifacts(self, model_config, tp: int):
        return {}
