"""GPT's megatron-core state-dict keys and mega's (Megatron-LM legacy) names, both ways:
the `torch_dist` format's keys and NeMo's mcore archives.

One table, written once: mega's names inside a transformer layer -> megatron-core's with
Transformer Engine's fused layer norms (`linear_qkv.layer_norm_weight`, the TE spec that
megatron-core's checkpoints and NeMo's `mcore_gpt` use). The way back is derived from it,
and also accepts the local spec's separate norms (`input_layernorm`, `pre_mlp_layernorm`).

    language_model.embedding.X                    embedding.X
    language_model.encoder.layers.N.<mega name>   decoder.layers.N.<mcore name>
    language_model.encoder.final_layernorm.X      decoder.final_layernorm.X
    language_model.output_layer.X                 output_layer.X (the untied output layer)

Names are global (pipeline-independent layer numbers). A name neither side knows is kept
as it is, so `mega_name(mcore_name(n)) == n` for every mega name. Fused QKV rows need no
reordering: mega's per-head [q, k, v] blocks are megatron-core's `linear_qkv` layout.
"""
from __future__ import annotations

import re
from typing import Dict

# mega's names inside a layer -> megatron-core's (TE spec)
LAYER: Dict[str, str] = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "self_attention.query_key_value.weight": "self_attention.linear_qkv.weight",
    "self_attention.query_key_value.bias": "self_attention.linear_qkv.bias",
    "self_attention.dense.weight": "self_attention.linear_proj.weight",
    "self_attention.dense.bias": "self_attention.linear_proj.bias",
    "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "post_attention_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
    "mlp.dense_h_to_4h.weight": "mlp.linear_fc1.weight",
    "mlp.dense_h_to_4h.bias": "mlp.linear_fc1.bias",
    "mlp.dense_4h_to_h.weight": "mlp.linear_fc2.weight",
    "mlp.dense_4h_to_h.bias": "mlp.linear_fc2.bias",
}
# megatron-core's names inside a layer -> mega's: the inverse, plus the local spec's norms
LAYER_TO_MEGA: Dict[str, str] = {
    **{mcore: mega for mega, mcore in LAYER.items()},
    "input_layernorm.weight": "input_layernorm.weight",
    "input_layernorm.bias": "input_layernorm.bias",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.bias": "post_attention_layernorm.bias",
}
assert len({v for v in LAYER.values()}) == len(LAYER), "megatron-core's layer names must be distinct"

# (mega prefix, megatron-core prefix) of the tensors outside the layers
_PREFIXES = (("language_model.embedding.", "embedding."),
             ("language_model.encoder.final_layernorm.", "decoder.final_layernorm."),
             ("language_model.output_layer.", "output_layer."))
_MEGA_LAYER = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.(.+)$")
_MCORE_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def mcore_name(name: str) -> str:
    """mega's global state-dict name -> megatron-core's key (unknown names unchanged)."""
    m = _MEGA_LAYER.match(name)
    if m:
        return f"decoder.layers.{m.group(1)}.{LAYER.get(m.group(2), m.group(2))}"
    for ours, theirs in _PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def mega_name(key: str) -> str:
    """megatron-core's key -> mega's global state-dict name (unknown keys unchanged)."""
    m = _MCORE_LAYER.match(key)
    if m:
        return f"language_model.encoder.layers.{m.group(1)}.{LAYER_TO_MEGA.get(m.group(2), m.group(2))}"
    for ours, theirs in _PREFIXES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key
