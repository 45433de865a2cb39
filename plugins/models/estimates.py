"""Memory estimates of the transformer blocks, for `mega plan` and the memory check of
`mega run` (`mega.protocols.EstimatesMemory`), shared by the model plugins.

Parameters are counted as the blocks of mega.plugins.models.transformer build them;
activations are what autograd keeps for one micro-batch, written from the code and
calibrated against measured peaks on CPU (tests/kernel/test_plan.py). `pipeline_stages` splits
a stack over pipeline stages the way the models do (TransformerStack keeps `layers // pp`
layers per stage; the embedding lives on the first stage, the head on the last), so every
model's `memory_per_rank` only says what its embedding and head add.

Bytes of an activation follow the precision layout (`activation_bytes`): fp32 everything;
under bf16/fp16 autocast the matmul inputs are 16-bit but the residual stream and the
LayerNorms stay fp32; under `model.megatron_amp_O2` the model runs in 16 bits outside
autocast, so the residual stream and the LayerNorm inputs are 16-bit too.

`stack_activation_bytes` counts a stage's layers under the activation-memory keys
(mega.plugins.models.scaling): what each recomputation mode keeps and the transient its
backward recomputes, and the 1/TP of sequence parallelism on the terms TP leaves
replicated. tests/kernel/test_plan.py holds them equal to the tensors a real forward keeps.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

from mega.plugins.models.transformer import BlockConfig

# recompute_transient: what a backward recomputes at once (one checkpointed region's
# activations), on top of the end of the backward (mega.plan.stage_memory)
STAGE_KEYS = ("params", "matmul_params", "activations", "transient", "grad_transient", "recompute_transient")


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
                    last: Dict[str, int], stack: Optional[Dict[str, int]] = None) -> List[Dict[str, int]]:
    """EstimatesMemory's per-stage dicts for `layers` equal layers split evenly over `pp`
    pipeline stages, each layer contributing `layer`, plus the embedding's `first` on
    stage 0 and the head's `last` on stage pp - 1 (both on the one stage without
    pipelining), and `stack` (what a stage's layers add together: stack_activation_bytes)
    on every stage. Keys: STAGE_KEYS (a missing key counts 0), and `param_numels` (each
    parameter tensor's size in registration order) when `layer`, `first` and `last` all
    list theirs."""
    per_stage = layers // pp
    stages = []
    lists = all("param_numels" in part for part in (layer, first, last))
    for p in range(pp):
        stage = {k: per_stage * layer.get(k, 0) + (stack or {}).get(k, 0) for k in STAGE_KEYS}
        for part, here in ((first, p == 0), (last, p == pp - 1)):
            if here:
                for k in STAGE_KEYS:
                    stage[k] += part.get(k, 0)
        if lists:  # registration order: embedding, this stage's layers, final LayerNorm and head
            stage["param_numels"] = ((first["param_numels"] if p == 0 else []) + layer["param_numels"] * per_stage
                                     + (last["param_numels"] if p == pp - 1 else []))
        stages.append(stage)
    return stages


def norm_params(block: BlockConfig) -> int:
    """One norm of the residual stream: LayerNorm's weight and bias, RMSNorm's weight."""
    return block.hidden_size * (1 if block.normalization == "RMSNorm" else 2)


def block_params(block: BlockConfig, tp: int) -> int:
    """Parameters of one TransformerLayer on one tensor-parallel rank: column-parallel
    weights and biases split, row-parallel weights split (their biases and the norms
    replicated). QKV has (heads + 2 x query groups) x head_dim rows; a gated MLP's fc1 two
    halves of ffn rows; biases per add_bias_linear / add_qkv_bias."""
    h, f = block.hidden_size, block.ffn
    q, kv = block.num_attention_heads * block.head_dim, block.query_groups * block.head_dim
    g = 2 if block.gated else 1
    bias = h if block.add_bias_linear else 0
    return (2 * norm_params(block) + (h * (q + 2 * kv) + (q + 2 * kv if block.qkv_bias else 0)) // tp + q * h // tp
            + bias + (g * h * f + (g * f if block.add_bias_linear else 0)) // tp + f * h // tp + bias)


def block_param_numels(block: BlockConfig, tp: int) -> List[int]:
    """block_params, one entry per parameter tensor in the order TransformerLayer registers
    them (what the distributed optimizer lays out: mega.runtime.param_layout)."""
    h, f = block.hidden_size, block.ffn
    q, kv = block.num_attention_heads * block.head_dim, block.query_groups * block.head_dim
    g = 2 if block.gated else 1
    norm = [h] * (norm_params(block) // h)  # weight (and LayerNorm's bias)
    bias = block.add_bias_linear
    return (norm + [h * (q + 2 * kv) // tp] + ([(q + 2 * kv) // tp] if block.qkv_bias else []) + [q * h // tp]
            + ([h] if bias else []) + norm + [g * h * f // tp] + ([g * f // tp] if bias else []) + [f * h // tp]
            + ([h] if bias else []))


def block_matmul_params(block: BlockConfig, tp: int) -> int:
    """The parameters of one TransformerLayer that autocast casts to 16 bits: what goes
    into an F.linear (weights, the column-parallel biases); not the norms nor the
    row-parallel biases, which are added after the reduction."""
    return block_params(block, tp) - 2 * norm_params(block) - (2 * block.hidden_size if block.add_bias_linear else 0)


def norm_input_bytes(block: BlockConfig, precision: str, o2: bool = False) -> int:
    """Bytes per element a norm keeps of its input: the residual stream itself (LayerNorm,
    and RMSNorm on an fp32 stream), or RMSNorm's fp32 copy of a 16-bit stream (HF's order
    normalises in fp32)."""
    r = activation_bytes(precision, o2)[1]
    return 4 if block.normalization == "RMSNorm" else r


def norm_internal_bytes(block: BlockConfig, n: int, precision: str, device: str, o2: bool = False) -> int:
    """What one norm keeps for `n` tokens besides its input: LayerNorm's mean and rstd;
    RMSNorm's fp32 rstd and the normalised tensor its weight multiplies (fp32, or cast to
    the 16-bit stream's dtype)."""
    if block.normalization == "RMSNorm":
        return 4 * n + n * block.hidden_size * activation_bytes(precision, o2)[1]
    return layernorm_stats_bytes(precision, device, o2) * n


def rotary_bytes(block: BlockConfig, s: int, precision: str, o2: bool = False) -> Tuple[int, int]:
    """(bytes per layer, bytes per stage) the rotary embedding keeps: cos and sin of the
    `s` positions, [s, rotated dims] each, in fp32 shared by the stage's layers, or cast
    to 16 bits by each layer (the fp32 pair then freed after the forward)."""
    if block.position_embedding_type != "rope":
        return 0, 0
    d = int(block.head_dim * block.rotary_percent)
    e = activation_bytes(precision, o2)[0]
    return (2 * s * d * e, 0) if e == 2 else (0, 2 * s * d * 4)


def layernorm_stats_bytes(precision: str, device: str, o2: bool = False) -> int:
    """Bytes a LayerNorm keeps per token for its backward: mean and rstd, fp32 on CUDA, in
    the input's dtype on the CPU (16-bit under model.megatron_amp_O2)."""
    return 2 * (4 if device == "cuda" else activation_bytes(precision, o2)[1])


def dropout_mask_bytes(p: float, precision: str, device: str, o2: bool = False) -> int:
    """Bytes per element of a saved dropout mask of the residual stream: none without
    dropout; CUDA keeps a bool mask, CPU multiplies by a mask of the tensor's own dtype,
    the residual stream's (fp32 under autocast, whose dropouts act after the bias add)."""
    if not p:
        return 0
    return 1 if device == "cuda" else activation_bytes(precision, o2)[1]


def block_activation_bytes(block: BlockConfig, b: int, s: int, s_kv: int, tp: int, precision: str, device: str,
                           cross_kv: int = 0, o2: bool = False, sp: bool = False) -> int:
    """What autograd keeps for one TransformerLayer (pre-LN, SDPA, GELU MLP) at micro-batch
    `b`, `s` queries over `s_kv` keys, on one of `tp` ranks. Measured on CPU in fp32: LayerNorm
    inputs (the residual stream) and outputs, Q/K/V, the attention output, both MLP
    activations, per-token LayerNorm statistics and the SDPA log-sum-exp; with attention
    dropout on CPU, SDPA takes its math path and keeps probabilities, mask and dropped
    probabilities (3 fp32 tensors of b x heads x s x s_kv). Bytes per element:
    activation_bytes.
    `cross_kv` adds a cross-attention sublayer over that many memory positions (the
    decoder's inter-attention).
    `sp` (sequence parallelism): what TP leaves replicated (LayerNorm inputs, outputs and
    statistics, the residual dropout masks; the linears' saved inputs, which the
    sequence-parallel linear keeps as this rank's slice) is split over the `tp` ranks."""
    h, f, a = block.hidden_size, block.ffn, block.num_attention_heads // tp
    e, r = activation_bytes(precision, o2)
    n = b * s
    u = tp if sp else 1
    mask = dropout_mask_bytes(block.hidden_dropout, precision, device, o2)
    stats = layernorm_stats_bytes(precision, device, o2)
    q, kv = block.num_attention_heads * block.head_dim, block.query_groups * block.head_dim
    # norm inputs (the residual stream) and the linears' inputs; residual dropout masks;
    # the norms' statistics (and RMSNorm's normalised tensors)
    norm = norm_input_bytes(block, precision, o2)
    out = (2 * norm * n * h + 2 * e * n * h + 2 * mask * n * h + 2 * norm_internal_bytes(block, n, precision, device, o2)) // u
    keep = _keeps_qkv(block, e, device)
    # Q, K, V (the QKV linear's output; with RoPE also the rotated Q and K); attention output; MLP
    rotated = q + kv if block.position_embedding_type == "rope" else 0
    out += (keep * e * n * (q + 2 * kv + rotated) + e * n * q) // tp + (4 if block.gated else 2) * e * n * f // tp
    out += rotary_bytes(block, s, precision, o2)[0]
    out += _attention_bytes(block, b, s, s_kv, a, e, device)
    if cross_kv:  # LayerNorm in/out, query input, dropout mask, statistics; Q, K, V; attention output
        out += (r * n * h + e * n * h + mask * n * h + stats * n) // u
        out += keep * (e * n * h // tp + 2 * e * b * cross_kv * h // tp) + e * n * h // tp
        out += _attention_bytes(block, b, s, cross_kv, a, e, device)
    return out


def recompute_savings(block: BlockConfig, b: int, s: int, s_kv: int, tp: int, precision: str, device: str,
                      cross_kv: int = 0, o2: bool = False, sp: bool = False) -> Dict[str, int]:
    """Bytes of one layer that selective recomputation of each module does not keep: the
    core attention's scores, probabilities and dropout (`_attention_bytes`, self- and
    cross-attention), the MLP's GeLU input and output. The checkpointed MLP keeps its input
    as the LayerNorm made it (the residual stream's dtype) where fc1 kept its 16-bit cast."""
    h, f, a = block.hidden_size, block.ffn, block.num_attention_heads // tp
    e, r = activation_bytes(precision, o2)
    n = b * s
    u = tp if sp else 1
    # the checkpointed core keeps its inputs Q, K, V, which the CPU math path with 16-bit
    # inputs otherwise drops for its fp32 copies
    q, kv = block.num_attention_heads * block.head_dim, block.query_groups * block.head_dim
    kept_inputs = 0 if _keeps_qkv(block, e, device) else e * n * (q + 2 * kv) // tp
    core = _attention_bytes(block, b, s, s_kv, a, e, device) - kept_inputs
    if cross_kv:
        core += _attention_bytes(block, b, s, cross_kv, a, e, device)
        if kept_inputs:
            core -= e * n * h // tp + 2 * e * b * cross_kv * h // tp
    mlp = (4 if block.gated else 2) * e * n * f // tp  # fc1's output(s) and the activation's (gated: and the product)
    return {"core_attn": core, "mlp": mlp - (r - e) * n * h // u}


def stack_activation_bytes(block: BlockConfig, layers: int, b: int, s: int, s_kv: int, tp: int, precision: str,
                           device: str, cross_kv: int = 0, o2: bool = False, sp: bool = False) -> Tuple[int, int]:
    """(bytes `layers` layers of one pipeline stage keep for one micro-batch, bytes their
    backward recomputes at once) under the block's recomputation keys:

    * none: every layer's block_activation_bytes; nothing recomputed;
    * selective: each layer without its modules' recompute_savings; the largest module
      of one layer recomputed at a time;
    * full, uniform k: the input of each chunk of k layers (the residual stream, this
      rank's slice under SP); one chunk recomputed at a time, whose linears keep the
      gathered input under SP (inside a checkpointed region nothing is saved cleverly);
    * full, block k: the inputs of the first k layers, everything of the others; one layer
      recomputed at a time."""
    act = block_activation_bytes(block, b, s, s_kv, tp, precision, device, cross_kv, o2, sp)
    granularity = block.activations_checkpoint_granularity
    # the backward of a recomputed attention core holds the gradient of its probabilities
    # beside them (the CPU math path's, b x heads x s x s_kv in fp32)
    core_grad = 4 * b * (block.num_attention_heads // tp) * s * s_kv \
        if block.attention_dropout and device != "cuda" else 0
    if granularity == "selective":
        savings = recompute_savings(block, b, s, s_kv, tp, precision, device, cross_kv, o2, sp)
        saved = [savings[m] + (core_grad if m == "core_attn" else 0) for m in block.recompute_modules if m in savings]
        return layers * (act - sum(savings[m] for m in block.recompute_modules if m in savings)), max(saved, default=0)
    method, k = block.full_recompute
    if method is None:
        return layers * act, 0
    e, r = activation_bytes(precision, o2)
    n, h, u = b * s, block.hidden_size, (tp if sp else 1)
    whole_inputs = (2 + (1 if cross_kv else 0)) * e * n * h * (u - 1) // u if sp else 0  # gathered, not sliced
    k = min(k, layers)
    # the last layer of the region: its MLP's GeLU tensors are freed before its attention's
    # backward holds the gradient of the probabilities
    late = max(0, core_grad - 2 * e * n * block.ffn // tp)
    if method == "uniform":
        return math.ceil(layers / k) * r * n * h // u, k * (act + whole_inputs) + late
    return k * r * n * h // u + (layers - k) * act, act + whole_inputs + late


def _keeps_qkv(block: BlockConfig, e: int, device: str) -> int:
    """1 when the attention keeps Q, K, V as its linears made them; 0 on the CPU math path
    (attention dropout) with 16-bit inputs, which keeps fp32 copies instead (counted in
    _attention_bytes)."""
    return 0 if block.attention_dropout and device != "cuda" and e == 2 else 1


def _attention_bytes(block: BlockConfig, b: int, s: int, s_kv: int, heads: int, e: int, device: str) -> int:
    if block.attention_dropout and device != "cuda":
        # SDPA's math path on CPU computes in fp32 whatever the inputs' dtype: it keeps
        # three fp32 b x heads x s x s_kv tensors and, for 16-bit inputs, fp32 copies of Q, K, V
        upcast = 4 * b * heads * (s + 2 * s_kv) * block.head_dim if e == 2 else 0
        return 3 * 4 * b * heads * s * s_kv + upcast
    return 4 * b * heads * s  # the fused kernels' log-sum-exp
