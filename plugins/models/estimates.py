"""Memory estimates of the transformer blocks, for `mega plan` and the memory check of
`mega run` (`mega.protocols.EstimatesMemory`), shared by the model plugins.

Parameters are counted as the blocks of mega.plugins.models.transformer build them;
activations are what autograd keeps for one micro-batch, written from the code and
calibrated against measured peaks on CPU (tests/test_plan.py). `pipeline_stages` splits
a stack over pipeline stages the way the models do (TransformerStack keeps `layers // pp`
layers per stage; the embedding lives on the first stage, the head on the last), so every
model's `memory_per_rank` only says what its embedding and head add.

Bytes of an activation follow the precision layout (`activation_bytes`): fp32 everything;
under bf16/fp16 autocast the matmul inputs are 16-bit but the residual stream and the
LayerNorms stay fp32; under `model.megatron_amp_O2` the model runs in 16 bits outside
autocast, so the residual stream and the LayerNorm inputs are 16-bit too.
"""
from __future__ import annotations

from typing import Dict, List

from mega.plugins.models.transformer import BlockConfig

STAGE_KEYS = ("params", "matmul_params", "activations", "transient", "grad_transient")


def activation_bytes(precision: str, o2: bool = False) -> tuple:
    """(bytes of a matmul's saved input, bytes of the residual stream / a LayerNorm's
    input) under `trainer.precision` and `model.megatron_amp_O2`."""
    e = 4 if str(precision) == "32" else 2
    return e, (2 if o2 and e == 2 else 4)


def param_bytes(precision: str, o2: bool = False) -> int:
    """Bytes of one model parameter (and of the gradient autograd makes for it): 16-bit
    under model.megatron_amp_O2, else fp32."""
    return 2 if o2 and str(precision) != "32" else 4


def pipeline_stages(pp: int, layers: int, layer: Dict[str, int], first: Dict[str, int],
                    last: Dict[str, int]) -> List[Dict[str, int]]:
    """EstimatesMemory's per-stage dicts for `layers` equal layers split evenly over `pp`
    pipeline stages, each layer contributing `layer`, plus the embedding's `first` on
    stage 0 and the head's `last` on stage pp - 1 (both on the one stage without
    pipelining). Keys: STAGE_KEYS (a missing key counts 0), and `param_numels` (each
    parameter tensor's size in registration order) when all three parts list theirs."""
    per_stage = layers // pp
    stages = []
    lists = all("param_numels" in part for part in (layer, first, last))
    for p in range(pp):
        stage = {k: per_stage * layer.get(k, 0) for k in STAGE_KEYS}
        for part, here in ((first, p == 0), (last, p == pp - 1)):
            if here:
                for k in STAGE_KEYS:
                    stage[k] += part.get(k, 0)
        if lists:  # registration order: embedding, this stage's layers, final LayerNorm and head
            stage["param_numels"] = ((first["param_numels"] if p == 0 else []) + layer["param_numels"] * per_stage
                                     + (last["param_numels"] if p == pp - 1 else []))
        stages.append(stage)
    return stages


def block_params(block: BlockConfig, tp: int) -> int:
    """Parameters of one TransformerLayer on one tensor-parallel rank: column-parallel
    weights and biases split, row-parallel weights split (their biases and the LayerNorms
    replicated)."""
    h, f = block.hidden_size, block.ffn
    return 4 * h + (3 * h * h + 3 * h) // tp + h * h // tp + h + (h * f + f) // tp + f * h // tp + h


def block_param_numels(block: BlockConfig, tp: int) -> List[int]:
    """block_params, one entry per parameter tensor in the order TransformerLayer registers
    them (what the distributed optimizer lays out: mega.runtime.param_layout)."""
    h, f = block.hidden_size, block.ffn
    return [h, h, 3 * h * h // tp, 3 * h // tp, h * h // tp, h, h, h, h * f // tp, f // tp, f * h // tp, h]


def block_matmul_params(block: BlockConfig, tp: int) -> int:
    """The parameters of one TransformerLayer that autocast casts to 16 bits: what goes
    into an F.linear (weights, the column-parallel biases); not the LayerNorms nor the
    row-parallel biases, which are added after the reduction."""
    return block_params(block, tp) - 6 * block.hidden_size


def dropout_mask_bytes(p: float, precision: str, device: str) -> int:
    """Bytes per element of a saved dropout mask: none without dropout; CUDA keeps a bool
    mask, CPU multiplies by a mask of the tensor's own dtype."""
    if not p:
        return 0
    return 1 if device == "cuda" else (4 if str(precision) == "32" else 2)


def block_activation_bytes(block: BlockConfig, b: int, s: int, s_kv: int, tp: int, precision: str, device: str,
                           cross_kv: int = 0, o2: bool = False) -> int:
    """What autograd keeps for one TransformerLayer (pre-LN, SDPA, GELU MLP) at micro-batch
    `b`, `s` queries over `s_kv` keys, on one of `tp` ranks. Measured on CPU in fp32: LayerNorm
    inputs (the residual stream) and outputs, Q/K/V, the attention output, both MLP
    activations, per-token LayerNorm statistics and the SDPA log-sum-exp; with attention
    dropout on CPU, SDPA takes its math path and keeps probabilities, mask and dropped
    probabilities (3 fp32 tensors of b x heads x s x s_kv). Bytes per element:
    activation_bytes.
    `cross_kv` adds a cross-attention sublayer over that many memory positions (the
    decoder's inter-attention)."""
    h, f, a = block.hidden_size, block.ffn, block.num_attention_heads // tp
    e, r = activation_bytes(precision, o2)
    n = b * s
    mask = dropout_mask_bytes(block.hidden_dropout, precision, device)
    out = 2 * r * n * h + 2 * e * n * h  # LayerNorm inputs (the residual stream) and the linears' inputs
    out += (3 * e * n * h + e * n * h) // tp + 2 * e * n * f // tp  # Q, K, V; attention output; MLP
    out += 2 * mask * n * h + 16 * n  # residual dropout masks; LayerNorm mean and rstd
    out += _attention_bytes(block, b, s, s_kv, a, e, device)
    if cross_kv:
        out += r * n * h + e * n * h + e * n * h // tp + 2 * e * b * cross_kv * h // tp + e * n * h // tp + mask * n * h + 8 * n
        out += _attention_bytes(block, b, s, cross_kv, a, e, device)
    return out


def _attention_bytes(block: BlockConfig, b: int, s: int, s_kv: int, heads: int, e: int, device: str) -> int:
    if block.attention_dropout and device != "cuda":
        # SDPA's math path on CPU computes in fp32 whatever the inputs' dtype: it keeps
        # three fp32 b x heads x s x s_kv tensors and, for 16-bit inputs, fp32 copies of Q, K, V
        upcast = 4 * b * heads * (s + 2 * s_kv) * block.head_dim if e == 2 else 0
        return 3 * 4 * b * heads * s * s_kv + upcast
    return 4 * b * heads * s  # the fused kernels' log-sum-exp
