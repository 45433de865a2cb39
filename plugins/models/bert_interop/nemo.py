"""Megatron-BERT in NeMo 1.x `.nemo` archives, both ways.

Two NeMo classes hold a Megatron-BERT, in two layouts; both are read at a named release:

* **`MegatronBertModel`** (NeMo v1.23.0, `nemo/collections/nlp/models/language_modeling/
  megatron_bert_model.py` and `megatron/bert_model.py`, legacy `mcore_bert: false`): the
  pretraining model, what `megatron_lm_ckpt_to_nemo.py` writes and NGC's
  `megatron_bert_345m_*.nemo` are. Its state dict is `model.` + Megatron-LM's legacy names
  (`language_model.{embedding,encoder,pooler}`, `lm_head`, `binary_head`), which are
  mega's `bert` (`bert_binary_head: true`: token types, pooler, binary head) or
  `bert_masked_lm` (`false`: none of the three). Its MLP runs NeMo's fused bias-GELU
  (tanh) unless `bias_gelu_fusion: false`; the LM head exact GELU (NeMo passes no
  `openai_gelu`).
* **`MegatronBertEncoder`** (NeMo v1.0.0-1.4.0, `nemo/collections/nlp/modules/common/
  megatron/megatron_bert.py`): the encoder NeMo's NLP task models (token and text
  classification, question answering) put under `bert_model.`: Megatron-LM 2.x's
  `language_model` built with `add_pooler=False` and 2 token types, its architecture in a
  JSON artifact (`language_model.config_file`, `<name>_encoder_config.json`: Megatron
  argument names, `max_seq_length` = positions). NeMo starts Megatron-LM with
  `bias_gelu_fusion=False`, and its argument defaults that a config cannot change
  (`layernorm_epsilon` 1e-5, `make_vocab_size_divisible_by` 128): exact GELU, eps 1e-5, the
  vocabulary padded to 128 x TP. The task heads are the tasks' (mega.plugins.tasks.nemo_interop).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

from mega.errors import CheckpointError, ConfigError
from mega.plugins.models.transformer import padded_vocab_size

CONFIG = "model_config.yaml"

# --- MegatronBertModel (NeMo 1.23.0) ------------------------------------------------------------

BERT_MODEL = "nemo.collections.nlp.models.language_modeling.megatron_bert_model.MegatronBertModel"
NEMO_RELEASE = "1.23.0"
COPIED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "max_position_embeddings",
          "layernorm_epsilon", "make_vocab_size_divisible_by", "hidden_dropout", "init_method_std", "micro_batch_size",
          "global_batch_size")


def is_bert_model(cfg: dict) -> bool:
    return str(cfg.get("target", "")).endswith(".MegatronBertModel")


def _refuse(source, cfg: dict, key: str, why: str):
    raise CheckpointError(f"{source}: {CONFIG}: {key}={cfg.get(key)!r}: {why}")


def bert_model_table(cfg: dict, source) -> dict:
    """mega's `bert` / `bert_masked_lm` table for a MegatronBertModel yaml."""
    if cfg.get("mcore_bert", False):
        _refuse(source, cfg, "mcore_bert", "mega reads NeMo's legacy BERT (mcore_bert: false) archives")
    if cfg.get("position_embedding_type", "learned_absolute") != "learned_absolute":
        _refuse(source, cfg, "position_embedding_type", "mega's BERT has learned absolute positions only")
    if cfg.get("megatron_legacy", False):
        _refuse(source, cfg, "megatron_legacy", "the pre-2021 fused QKV order of NeMo's megatron_legacy is not read")
    heads = cfg.get("num_attention_heads")
    if cfg.get("kv_channels") not in (None, (cfg.get("hidden_size") or 0) // max(heads or 1, 1)):
        _refuse(source, cfg, "kv_channels", "mega's BERT uses hidden_size / num_attention_heads per head")
    if cfg.get("share_embeddings_and_output_weights", True) is not True:
        _refuse(source, cfg, "share_embeddings_and_output_weights", "mega's BERT ties its LM head to the word embedding")
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if not isinstance(cfg.get(key), int):
            _refuse(source, cfg, key, "needed, as an integer")
    binary = bool(cfg.get("bert_binary_head", True))
    seq = cfg.get("encoder_seq_length") or cfg.get("max_position_embeddings") or 512
    table = {"name": "bert" if binary else "bert_masked_lm", "seq_length": seq,
             "max_position_embeddings": cfg.get("max_position_embeddings") or seq,
             "num_tokentypes": 2 if binary else 0,
             "activation": "gelu_tanh" if cfg.get("bias_gelu_fusion", True) else "gelu", "lm_head_activation": "gelu"}
    if binary:
        table["add_binary_head"] = True
    table.update({k: cfg[k] for k in COPIED if cfg.get(k) is not None and k != "max_position_embeddings"})
    return table


def bert_model_config(mc, tokenizer_section: dict, tp: int) -> dict:
    """model_config.yaml of MegatronBertModel for mega's `bert` / `bert_masked_lm` `mc`."""
    from mega.plugins.models.gpt_interop.nemo import optim_section

    if mc.name not in ("bert", "bert_masked_lm"):
        raise ConfigError(f"model.name={mc.name!r}: NeMo's MegatronBertModel is the pretraining model (bert,"
                          " bert_masked_lm); export a fine-tuned task (model.name = token_classification, ...) as its"
                          " NeMo task model")
    binary = mc.name == "bert" and mc.add_binary_head
    if mc.num_tokentypes != (2 if binary else 0):
        raise ConfigError(f"model.num_tokentypes={mc.num_tokentypes}: NeMo's MegatronBertModel has"
                          f" {2 if binary else 0} token types {'with' if binary else 'without'} its binary head")
    if mc.lm_head_activation != "gelu":
        raise ConfigError(f"model.lm_head_activation={mc.lm_head_activation!r}: NeMo's BERT LM head runs exact GELU")
    if mc.num_attention_heads % tp:
        raise ConfigError(f"model.num_attention_heads={mc.num_attention_heads} is not divisible by --option"
                          f" tensor_parallel={tp}")
    return {
        "mcore_bert": False, "micro_batch_size": mc.micro_batch_size,
        "global_batch_size": mc.global_batch_size or mc.micro_batch_size, "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": 1, "virtual_pipeline_model_parallel_size": None,
        "encoder_seq_length": mc.seq_length, "max_position_embeddings": mc.max_position_embeddings,
        "position_embedding_type": "learned_absolute", "num_layers": mc.num_layers, "hidden_size": mc.hidden_size,
        "ffn_hidden_size": mc.ffn_hidden_size or 4 * mc.hidden_size, "num_attention_heads": mc.num_attention_heads,
        "init_method_std": mc.init_method_std, "hidden_dropout": mc.hidden_dropout, "kv_channels": None,
        "apply_query_key_layer_scaling": True, "layernorm_epsilon": mc.layernorm_epsilon,
        "make_vocab_size_divisible_by": mc.make_vocab_size_divisible_by, "pre_process": True, "post_process": True,
        "bert_binary_head": binary, "bias_gelu_fusion": mc.activation == "gelu_tanh", "tokenizer": tokenizer_section,
        "native_amp_init_scale": mc.native_amp_init_scale, "native_amp_growth_interval": mc.native_amp_growth_interval,
        "fp32_residual_connection": False, "fp16_lm_cross_entropy": False, "megatron_amp_O2": False,
        "grad_allreduce_chunk_size_mb": 125, "grad_div_ar_fusion": False, "seed": mc.seed, "use_cpu_initialization": False,
        "onnx_safe": False, "precision": 32, "sequence_parallel": False, "activations_checkpoint_granularity": None,
        "activations_checkpoint_method": None, "activations_checkpoint_num_layers": None,
        "data": {"data_prefix": [], "data_impl": "mmap", "splits_string": "900,50,50", "seq_length": mc.seq_length,
                 "skip_warmup": True, "num_workers": 0, "dataloader_type": "single",
                 "masked_lm_prob": getattr(mc, "masked_lm_prob", 0.15), "short_seq_prob": getattr(mc, "short_seq_prob", 0.1)},
        "optim": optim_section(mc),
        "target": BERT_MODEL, "nemo_version": NEMO_RELEASE,
    }


# --- MegatronBertEncoder (NeMo 1.0-1.4 NLP models) -------------------------------------------------

ENCODER = "bert_model."  # NeMo's NLP models keep their encoder under this attribute
ENCODER_RELEASE = "1.4.0"
# what NeMo 1.4's Megatron-LM runs whatever the config says (its argument defaults and injected arguments)
ENCODER_FIXED = {"activation": "gelu", "layernorm_epsilon": 1e-5, "make_vocab_size_divisible_by": 128}
# Megatron argument (dashes as underscores; NeMo renames max_seq_length) -> mega's key
ENCODER_ARGS = {"hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads", "num_layers": "num_layers",
                "max_seq_length": "max_position_embeddings", "max_position_embeddings": "max_position_embeddings",
                "ffn_hidden_size": "ffn_hidden_size", "num_tokentypes": "num_tokentypes"}
# NeMo's pretrained Megatron names with a built-in config (MEGATRON_CONFIG_MAP's 345m)
ARCH_345M = {"hidden_size": 1024, "num_attention_heads": 16, "num_layers": 24, "max_position_embeddings": 512}


def encoder_arch(cfg: dict, config_file: Optional[bytes], source) -> Dict[str, object]:
    """The encoder keys (`model.language_model.config`) of an NLP model's yaml, by NeMo
    1.4's precedence: the config_file artifact, else `language_model.config`, else the
    pretrained name's built-in config; plus what its Megatron-LM runs regardless."""
    lm = cfg.get("language_model") or {}
    name = str(lm.get("pretrained_model_name") or "")
    if "megatron" not in name:
        raise CheckpointError(f"{source}: {CONFIG}: language_model.pretrained_model_name={name or None!r}: mega reads"
                              " NeMo NLP models on a Megatron-BERT encoder (a name with 'megatron' in it); this one is"
                              " a Hugging Face encoder")
    if config_file is not None:
        try:
            raw = json.loads(config_file)
        except ValueError as exc:
            raise CheckpointError(f"{source}: member named by language_model.config_file is not JSON ({exc})") from None
        where = "language_model.config_file"
    elif isinstance(lm.get("config"), dict):
        raw, where = lm["config"], "language_model.config"
    elif "345m" in name:
        raw, where = ARCH_345M, "language_model.pretrained_model_name"
    else:
        raise CheckpointError(f"{source}: {CONFIG}: language_model: neither config_file nor config describes the"
                              f" encoder of {name!r}")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: {CONFIG}: {where} is not a mapping of Megatron arguments")
    arch: Dict[str, object] = {}
    for key, value in raw.items():
        ours = ENCODER_ARGS.get(str(key).replace("-", "_"))
        if ours is not None and value is not None:
            arch[ours] = value
    for key in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"):
        if not isinstance(arch.get(key), int):
            raise CheckpointError(f"{source}: {CONFIG}: {where} does not give {key} (an integer)")
    return {**arch, **ENCODER_FIXED}


def encoder_mega_name(name: str) -> Optional[str]:
    """An NLP model's encoder weight (`bert_model.language_model...`, already without the
    older Megatron spellings) under mega's name; None for anything else."""
    return name[len(ENCODER):] if name.startswith(ENCODER + "language_model.") else None


def encoder_nemo_name(name: str) -> Optional[str]:
    """mega's encoder tensor -> the NLP model's key; None for the rest (heads)."""
    return ENCODER + name if name.startswith("language_model.") else None


def check_encoder_export(arch: Dict[str, object]) -> None:
    """What NeMo 1.4's MegatronBertEncoder cannot run, named by the task's keys."""
    for key, value in ENCODER_FIXED.items():
        if key != "make_vocab_size_divisible_by" and arch.get(key, value) != value:
            raise ConfigError(f"model.language_model.config.{key}={arch.get(key)!r}: NeMo 1.4's MegatronBertEncoder"
                              f" runs Megatron-LM with {key}={value!r} whatever its config says")


def encoder_config_json(arch: Dict[str, object], lower_case: bool) -> bytes:
    """`<name>_encoder_config.json` as NeMo's `register_bert_model` writes it (the encoder's
    Megatron arguments, sorted, indent 2): NeMo rebuilds the encoder from it on restore."""
    config = {"hidden_size": arch["hidden_size"], "num_attention_heads": arch["num_attention_heads"],
              "num_layers": arch["num_layers"], "max_position_embeddings": arch["max_position_embeddings"],
              "ffn_hidden_size": arch.get("ffn_hidden_size") or 4 * int(arch["hidden_size"]),
              "vocab_file": "vocab.txt", "tokenizer_type": "BertWordPieceLowerCase" if lower_case else "BertWordPieceCase",
              "lazy_mpu_init": True, "onnx_safe": True}
    if arch.get("num_tokentypes", 2) != 2:  # NeMo pops it before saving; written only when it is not the default
        config["num_tokentypes"] = arch["num_tokentypes"]
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def encoder_vocab_rows(vocab_size: int, tp: int) -> int:
    """NeMo 1.4's Megatron-LM pads the vocabulary to 128 x TP (its default, which a config cannot change)."""
    return padded_vocab_size(vocab_size, ENCODER_FIXED["make_vocab_size_divisible_by"], tp)


def checkpoint_version_json() -> bytes:
    """`megatron_checkpoint_version.json`: mega's QKV rows are Megatron-LM's current order (3.0)."""
    return json.dumps({"checkpoint_version": 3.0}).encode()


def encoder_name_for(lower_case: bool) -> str:
    """The pretrained name NeMo 1.4 reads a user-described Megatron-BERT by."""
    return "megatron-bert-uncased" if lower_case else "megatron-bert-cased"


def config_file_name(pretrained: str) -> str:
    return Path(f"{pretrained}_encoder_config.json").name
