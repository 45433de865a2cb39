"""mega's `t5` / `bart` encoder-decoders (with the hiddens module of MIM / VAE models) in
NeMo 1.x `.nemo` archives, both ways: NeMo v1.23.0's `MegatronT5Model` / `MegatronBARTModel`
(`MegatronLMEncoderDecoderModel`, legacy modules; read at v1.23.0:
nemo/collections/nlp/models/language_modeling/megatron_{lm_encoder_decoder,t5,bart}_model.py,
nemo/collections/nlp/modules/common/megatron/{token_level_encoder_decoder,
megatron_encoder_decoder,megatron_transformer_encoder,megatron_transformer_decoder,
transformer,attention}.py and the example configs megatron_{t5,bart}_config.yaml with
megatron_model_base_config.yaml).

**Names.** NeMo's module tree holds the shared embedding twice (`encoder_embedding` and,
PP = 1, the same module as `decoder_embedding`), each stack's layers under
`enc_dec_model.enc_dec_model.{encoder,decoder}.model` (a ParallelTransformer with its
final LayerNorm) and the output layer's bias as `tokens_head.bias`; inside a layer the
names are Megatron-LM's, which are mega's:

| NeMo (`enc_dec_model.` + ...) | mega |
|---|---|
| `encoder_embedding.{word,position}_embeddings.weight` (and `decoder_embedding.`) | `embedding.{word,position}_embeddings.weight` |
| `enc_dec_model.encoder.model.layers.N.*`, `...encoder.model.final_layernorm.*` | `encoder.layers.N.*`, `encoder.final_layernorm.*` |
| `enc_dec_model.decoder.model.layers.N.*`, `...decoder.model.final_layernorm.*` | `decoder.N.*`, `decoder_final_layernorm.*` |
| `enc_dec_model.hiddens_module.*` | `hiddens_module.*` (mega.plugins.hiddens.nemo) |
| `tokens_head.bias` | `tokens_head_bias` (`model.tokens_head_bias`) |

With `megatron_amp_O2` NeMo wraps the module (`enc_dec_model.module.`); that is read too.

**What mega cannot run** is refused naming the yaml key: a Perceiver encoder (NeMo's
`MegatronPerceiverEncoderModule` stacks decoder-type cross-attention blocks with an outer
residual, another block than mega's Perceiver), relative / ALiBi / KERPLE positions,
RMSNorm, bias-less or post-LN blocks, gated activations, MoE, `megatron_legacy` QKV order,
separate encoder/decoder embeddings or an untied output layer, pipeline splits.

**Vocabulary.** NeMo's T5 / BART tokenizer adds special tokens to the tokenizer's own
(`MegatronT5Model.add_special_tokens_to_tokenizer`: for sentencepiece `<cls>`, `<sep>`,
`<mask>`, and `<pad>` / `<bos>` / `<eos>` when the model has none, then
`num_sentinel_tokens` `<extra_id_i>`); the ids keep their rows both ways. On import mega's
`extra_ids` covers all of NeMo's added tokens (its sentinels and 6 base specials at most),
so every row NeMo has survives; on export the rows are padded to the size NeMo computes
from the same rule. mega's own objectives number their sentinels from the end of the
tokenizer's vocabulary, NeMo's after its base special tokens: fine-tuning an imported
model with mega's T5 objective gives those rows other meanings than NeMo's.
"""
from __future__ import annotations

import re
from typing import Dict, Optional

from mega.errors import CheckpointError, ConfigError
from mega.protocols import Match
from mega.plugins.hiddens import nemo as hiddens_nemo
from mega.plugins.models.transformer import padded_vocab_size

CONFIG = "model_config.yaml"
LM = "nemo.collections.nlp.models.language_modeling."
TARGETS = {"t5": LM + "megatron_t5_model.MegatronT5Model", "bart": LM + "megatron_bart_model.MegatronBARTModel"}
CLASSES = {"MegatronT5Model": "t5", "MegatronBARTModel": "bart"}
NEMO_RELEASE = "1.23.0"
BASE_SPECIALS = 6  # the most special tokens NeMo's T5 adds before its sentinels (cls, sep, mask, pad, bos, eos)
WORD = "embedding.word_embeddings.weight"
# per-stack yaml keys and the values mega's blocks have
STACK_FIXED = {"arch": "transformer", "position_embedding_type": "learned_absolute", "normalization": "layernorm",
               "bias": True, "transformer_block_type": "pre_ln", "headscale": False, "megatron_legacy": False,
               "num_moe_experts": 1, "normalize_attention_scores": True}
STACK_COPIED = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "hidden_dropout",
                "attention_dropout", "layernorm_epsilon")


def model_of(cfg: dict) -> Optional[str]:
    return CLASSES.get(str(cfg.get("target", "")).rsplit(".", 1)[-1])


def _refuse(source, key: str, value, why: str):
    raise CheckpointError(f"{source}: {CONFIG}: {key}={value!r}: {why}")


def _stack(cfg: dict, side: str, source) -> dict:
    stack = cfg.get(side)
    if not isinstance(stack, dict):
        _refuse(source, side, stack, "NeMo's encoder-decoder yaml has an encoder and a decoder section")
    for key, value in STACK_FIXED.items():
        if stack.get(key, value) != value:
            why = ("NeMo's Perceiver encoder is another block than mega's (decoder-type cross-attention layers with an"
                   " outer residual)" if key == "arch" else f"mega's {side} has {value!r} only")
            _refuse(source, f"{side}.{key}", stack.get(key), why)
    if stack.get("activation", "gelu") != "gelu":
        _refuse(source, f"{side}.activation", stack.get("activation"), "mega's blocks run GELU (exact or tanh) only")
    heads = stack.get("num_attention_heads")
    if stack.get("kv_channels") not in (None, (stack.get("hidden_size") or 0) // max(heads or 1, 1)):
        _refuse(source, f"{side}.kv_channels", stack.get("kv_channels"), "mega uses hidden_size / num_attention_heads")
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if not isinstance(stack.get(key), int):
            _refuse(source, f"{side}.{key}", stack.get(key), "needed, as an integer")
    out = {k: stack[k] for k in STACK_COPIED if stack.get(k) is not None}
    # NeMo's fused bias-GELU (bias_activation_fusion, default true) and openai_gelu are the tanh form
    tanh = stack.get("openai_gelu", False) or stack.get("bias_activation_fusion", stack.get("bias_gelu_fusion", True))
    out["activation"] = "gelu_tanh" if tanh else "gelu"
    return out


def model_table(cfg: dict, source) -> dict:
    """mega's `t5` / `bart` table for a MegatronT5Model / MegatronBARTModel yaml."""
    name = model_of(cfg)
    if name is None:
        _refuse(source, "target", cfg.get("target"), "not a NeMo encoder-decoder mega reads")
    for key, want in (("share_token_embeddings", True), ("share_decoder_tokens_head_embeddings", True),
                      ("pipeline_model_parallel_size", 1)):
        if cfg.get(key, want) != want:
            _refuse(source, key, cfg.get(key), f"mega's encoder-decoder needs {want!r}")
    encoder, decoder = _stack(cfg, "encoder", source), _stack(cfg, "decoder", source)
    seq = cfg.get("seq_length")
    if not isinstance(seq, int):
        _refuse(source, "seq_length", seq, "needed, as an integer")
    data = cfg.get("data") or {}
    tok = cfg.get("tokenizer") or {}
    table = {"name": name, "encoder": encoder, "decoder": decoder, "seq_length": seq,
             "seq_length_dec": data.get("seq_length_dec") if isinstance(data.get("seq_length_dec"), int) else seq,
             "max_position_embeddings": cfg.get("max_position_embeddings") or seq,
             "init_method_std": (cfg.get("encoder") or {}).get("init_method_std", 0.02),
             "make_vocab_size_divisible_by": cfg.get("make_vocab_size_divisible_by", 128),
             "tokens_head_bias": bool(cfg.get("tokens_head_bias", True)),
             # every row NeMo's tokenizer adds (its sentinels and base special tokens) is kept
             "extra_ids": int(tok.get("num_sentinel_tokens") or 0) + BASE_SPECIALS}
    for key in ("micro_batch_size", "global_batch_size"):
        if isinstance(cfg.get(key), int):
            table[key] = cfg[key]
    hiddens = hiddens_nemo.hiddens_table(cfg.get("hiddens"))
    if hiddens is not None:
        table["hiddens"] = hiddens
    return table


# NeMo name (after `enc_dec_model.`) <-> mega name, both ways
_TO_MEGA = [(re.compile(r"^(?:encoder|decoder)_embedding\.(word|position)_embeddings\.weight$"), r"embedding.\1_embeddings.weight"),
            (re.compile(r"^enc_dec_model\.encoder\.model\.(layers\.\d+\..+|final_layernorm\..+)$"), r"encoder.\1"),
            (re.compile(r"^enc_dec_model\.decoder\.model\.layers\.(\d+\..+)$"), r"decoder.\1"),
            (re.compile(r"^enc_dec_model\.decoder\.model\.final_layernorm\.(.+)$"), r"decoder_final_layernorm.\1"),
            (re.compile(r"^enc_dec_model\.(hiddens_module\..+)$"), r"\1"),
            (re.compile(r"^tokens_head\.bias$"), "tokens_head_bias")]


def mega_name(name: str) -> Optional[str]:
    """A NeMo encoder-decoder key under mega's name; anything unknown unchanged (for the
    format to name)."""
    if not name.startswith("enc_dec_model."):
        return name
    short = name[len("enc_dec_model."):]
    short = short[len("module."):] if short.startswith("module.") else short  # megatron_amp_O2's wrapper
    for pattern, ours in _TO_MEGA:
        if pattern.match(short):
            return pattern.sub(ours, short)
    return name


def nemo_names(name: str):
    """mega's tensor -> NeMo's keys (the shared embedding under both of NeMo's names)."""
    p = "enc_dec_model."
    if name.startswith("embedding."):
        return (p + "encoder_" + name, p + "decoder_" + name)
    if name.startswith("encoder."):
        return (p + "enc_dec_model.encoder.model." + name[len("encoder."):],)
    if name.startswith("decoder_final_layernorm."):
        return (p + "enc_dec_model.decoder.model.final_layernorm." + name[len("decoder_final_layernorm."):],)
    if name.startswith("decoder."):
        return (p + "enc_dec_model.decoder.model.layers." + name[len("decoder."):],)
    if name.startswith("hiddens_module."):
        return (p + "enc_dec_model." + name,)
    if name == "tokens_head_bias":
        return (p + "tokens_head.bias",)
    return (p + name,)


def _stack_yaml(stack, init_std: float) -> dict:
    from mega.plugins.models.gpt_interop.nemo import nemo_activation

    act = nemo_activation(stack.activation)
    return {"num_layers": stack.num_layers, "hidden_size": stack.hidden_size,
            "ffn_hidden_size": stack.ffn_hidden_size or 4 * stack.hidden_size,
            "num_attention_heads": stack.num_attention_heads, "init_method_std": init_std,
            "hidden_dropout": stack.hidden_dropout, "attention_dropout": stack.attention_dropout, "ffn_dropout": 0.0,
            "position_embedding_type": "learned_absolute", "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, "relative_position_bias_self_attention_only": True,
            "kv_channels": None, "apply_query_key_layer_scaling": False, "layernorm_epsilon": stack.layernorm_epsilon,
            "persist_layer_norm": True, "bias_activation_fusion": act["bias_activation_fusion"],
            "grad_div_ar_fusion": True, "masked_softmax_fusion": True, "bias_dropout_add_fusion": True, "bias": True,
            "normalization": "layernorm", "arch": "transformer", "activation": "gelu", "headscale": False,
            "transformer_block_type": "pre_ln", "hidden_steps": 32, "num_self_attention_per_cross_attention": 1,
            "openai_gelu": False, "onnx_safe": False, "fp32_residual_connection": False,
            "activations_checkpoint_method": None, "activations_checkpoint_num_layers": 1,
            "activations_checkpoint_granularity": None, "megatron_legacy": False, "normalize_attention_scores": True,
            "num_moe_experts": 1, "moe_frequency": 1, "moe_dropout": 0.0, "use_flash_attention": False}


def nemo_config(mc, tokenizer_section: dict, tp: int) -> dict:
    """model_config.yaml of MegatronT5Model / MegatronBARTModel for mega's `mc`."""
    from mega.config import to_dict
    from mega.plugins.models.gpt_interop.nemo import optim_section

    if mc.encoder.arch != "transformer":
        raise ConfigError(f"model.encoder.arch={mc.encoder.arch!r}: NeMo's Perceiver encoder is another block than"
                          " mega's; only transformer encoders export")
    for side in ("encoder", "decoder"):
        heads = getattr(mc, side).num_attention_heads
        if heads % tp:
            raise ConfigError(f"model.{side}.num_attention_heads={heads} is not divisible by --option tensor_parallel={tp}")
    section = dict(tokenizer_section)
    section["num_sentinel_tokens"] = mc.extra_ids
    if section.get("library") == "sentencepiece":
        section["sentencepiece_legacy"] = True  # NeMo adds its special tokens to a sentencepiece tokenizer only so
    seq_dec = mc.seq_length_dec or mc.seq_length
    cfg = {
        "micro_batch_size": mc.micro_batch_size, "global_batch_size": mc.global_batch_size or mc.micro_batch_size,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1, "pipeline_model_parallel_split_rank": 0,
        "make_vocab_size_divisible_by": mc.make_vocab_size_divisible_by, "megatron_amp_O2": False,
        "seq_length": mc.seq_length, "max_position_embeddings": mc.max_position_embeddings or max(mc.seq_length, seq_dec),
        "encoder": _stack_yaml(mc.encoder, mc.init_method_std), "decoder": _stack_yaml(mc.decoder, mc.init_method_std),
        "tokenizer": section, "embedding_init_method_std": mc.init_method_std,
        "embedding_dropout": mc.encoder.hidden_dropout, "share_token_embeddings": True,
        "share_decoder_tokens_head_embeddings": True, "tokens_head_bias": bool(mc.tokens_head_bias),
        "native_amp_init_scale": mc.native_amp_init_scale, "native_amp_growth_interval": mc.native_amp_growth_interval,
        "fp16_lm_cross_entropy": False, "seed": mc.seed, "use_cpu_initialization": False, "precision": 32,
        "data": {"data_prefix": [], "data_impl": "mmap", "splits_string": "949,45,5", "seq_length": mc.seq_length,
                 "seq_length_dec": seq_dec, "skip_warmup": True, "num_workers": 0, "dataloader_type": "single",
                 "dataset_type": mc.name},
        "optim": optim_section(mc),
        "target": TARGETS[mc.name], "nemo_version": NEMO_RELEASE,
    }
    if mc.hiddens is not None:
        cfg["hiddens"] = hiddens_nemo.hiddens_yaml(to_dict(mc.hiddens))
    return cfg


def nemo_vocab_size(tokenizer, library: Optional[str], sentinels: int) -> int:
    """The vocabulary NeMo's T5 / BART tokenizer has after `add_special_tokens_to_tokenizer`
    (v1.23.0): for a sentencepiece model `<cls>`, `<sep>`, `<mask>`, then `<pad>`, `<bos>`,
    `<eos>` unless the model has them (id > 0), then the sentinels, each only when the model
    lacks the piece; other tokenizers get the sentinels."""
    sp = getattr(tokenizer, "sp", None)
    if library != "sentencepiece" or sp is None:
        return tokenizer.vocab_size + sentinels
    size, unk, added = sp.get_piece_size(), sp.unk_id(), set()
    for token in ["<cls>", "<sep>", "<mask>"] + [t for t, i in (("<pad>", sp.pad_id()), ("<bos>", sp.bos_id()),
                                                                  ("<eos>", sp.eos_id())) if not i > 0]:
        if sp.piece_to_id(token) == unk and token not in added:
            added.add(token)
    for i in range(sentinels):
        token = f"<extra_id_{i}>"
        if len(sp.encode(token)) != 1 and sp.piece_to_id(token) == unk and token not in added:
            added.add(token)
    return size + len(added)


class EncoderDecoderInterop:
    """NeMo's MegatronT5Model / MegatronBARTModel (NemoModelConverter, NemoModelExporter,
    NemoSplitDims), registered by mega.plugins.models.encoder_decoder for `t5` and `bart`."""

    vocab_tensors = (WORD, "tokens_head_bias")
    nemo_tokenizer_style = "megatron"
    nemo_gzip = False

    def nemo_recognises(self, nemo_config: dict) -> Match:
        return Match.MARKED if model_of(nemo_config) else Match.NO

    def nemo_model_table(self, nemo_config: dict, where: str) -> dict:
        return model_table(nemo_config, where)

    def nemo_mega_name(self, name: str):
        return mega_name(name)

    def nemo_config(self, model_config, tokenizer_section: dict, tp: int) -> dict:
        return nemo_config(model_config, tokenizer_section, tp)

    def nemo_names(self, name: str, model_config):
        return nemo_names(name)

    def nemo_vocab_rows(self, model_config, tokenizer, tp: int) -> int:
        library = model_config.tokenizer.library
        size = max(nemo_vocab_size(tokenizer, library, model_config.extra_ids), tokenizer.vocab_size + model_config.extra_ids)
        return padded_vocab_size(size, model_config.make_vocab_size_divisible_by, tp)

    def nemo_artifacts(self, model_config, tp: int):
        return {}

    def nemo_split_dims(self, model_config) -> Dict[str, Optional[int]]:
        from mega.config import to_dict

        if model_config.hiddens is None:
            return {}
        return hiddens_nemo.split_dims(to_dict(model_config.hiddens))
