"""GPT: a pre-norm decoder; by default GPT-2's shape (learned positions, LayerNorm, GELU,
multi-head attention, biases, the output layer tied to the word embedding), and with
megatron-core's architecture options (mega.plugins.models.architecture) the Llama
family's: rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases, an untied
`output_layer` (`share_embeddings_and_output_weights = false`). The `llama` model
(mega.plugins.models.llama) is this model with those defaults.

Reads like nanoGPT; named like Megatron-LM (its legacy state-dict keys:
`language_model.embedding.word_embeddings.weight`, `language_model.encoder.layers.{i}...`,
`language_model.output_layer.weight`). Honours the LanguageModule contract of
megatron-core: `compute_language_model_loss(labels, logits)` takes megatron-core's
sequence-first logits and returns [batch, seq] losses (`token_losses` takes batch-first
ones), and `shared_embedding_or_output_weight()` returns the word-embedding matrix that also
produces the logits (the untied output layer's on a last stage without the embedding).
"""
from __future__ import annotations

from pathlib import Path

from typing import Dict, Literal, Optional

import torch
import torch.nn.functional as F
from attrs import define
from torch import nn

import mega
from mega.config import key, ModelConfig
from mega.errors import ConfigError
from mega.plugins.models.architecture import ArchitectureKeys
from mega.plugins.models.estimates import (
    activation_bytes,
    block_matmul_params,
    block_param_numels,
    block_params,
    dropout_mask_bytes,
    norm_input_bytes,
    norm_internal_bytes,
    norm_params,
    param_bytes,
    pipeline_stages,
    rotary_bytes,
    stack_activation_bytes,
)
from mega.plugins.models.scaling import (
    RecomputeKeys,
    SequenceParallelKey,
    check_recompute,
    check_sequence_parallel,
    eager_reason,
)
from mega.plugins.models.transformer import (
    BlockConfig,
    Embedding,
    KVCache,
    TiedWordEmbeddingStages,
    TransformerStack,
    check_shape,
    output_layer_input,
    output_logits,
    padded_vocab_size,
)
from mega.runtime.parallel import current
from mega.runtime.tensor_parallel import (
    ColumnParallelLinear,
    chunked_linear_cross_entropy,
    copy_to_tp,
    gather_from_tp,
    sequence_parallel_region,
    vocab_parallel_cross_entropy,
)


@define(kw_only=True)
class GPTConfig(ArchitectureKeys, RecomputeKeys, SequenceParallelKey, ModelConfig):
    """`model.*` keys of the `gpt` model (Megatron-LM / NeMo names)."""

    num_layers: int = key(12, help="transformer layers")
    hidden_size: int = key(768, help="model width")
    num_attention_heads: int = key(12, help="must divide hidden_size")
    ffn_hidden_size: Optional[int] = key(None, help="MLP width (per branch of a gated MLP); None: 4 x hidden_size, or"
                                         " Megatron's int(8 x hidden_size / 3 / 64) x 64 with swiglu")
    max_position_embeddings: Optional[int] = key(None, help="None: seq_length")
    hidden_dropout: float = key(0.1, help="on embeddings and each residual branch")
    attention_dropout: float = key(0.1, help="on attention probabilities")
    init_method_std: float = key(0.02, help="N(0, std) init; residual outputs scaled by 1/sqrt(2 * num_layers)")
    layernorm_epsilon: float = key(1e-5, help="every LayerNorm (Megatron-LM's --layernorm-epsilon)")
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = key("gelu",
            help="exact GELU, the tanh approximation (GPT-2, Megatron's fused), or the gated SiLU MLP (Llama; --swiglu)")
    share_embeddings_and_output_weights: bool = key(True,
            help="the output layer is the word embedding; false: an output_layer of its own"
                 " (--untie-embeddings-and-output-weights; HF tie_word_embeddings)")
    make_vocab_size_divisible_by: int = key(128, help="vocabulary padded to a multiple of this (x TP)")
    mask_padded_vocab: bool = key(True,
            help="padded ids left out of the loss's softmax (same loss at every TP); false: Megatron-LM's")
    loss_chunk_size: int = key(0,
            help="output layer + loss this many tokens at a time (no whole fp32 logits; exact); 0: all at once")
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = key("auto",
            help="SDPA kernel (CPU: auto or math)")

    def check(self, plugins=None) -> None:
        check_config(self)

    @classmethod
    def tiny_preset(cls, directory) -> dict:
        """2 layers of width 32 on a byte tokenizer and a corpus of random words: the tiny
        experiment `mega.testing` has always trained."""
        from mega.testing import tiny_raw, write_corpus

        return {"model": tiny_raw(directory, write_corpus(Path(directory) / "corpus.txt"))["model"]}

    def memory_per_rank(self, vocab_size: int, micro_batch: int, tp: int, pp: int, precision: str,
                        device: str) -> Dict[str, object]:
        """mega.protocols.EstimatesMemory: parameters counted from the keys (exactly what
        GPTModel builds), activations from what autograd keeps in each block, per
        recomputation mode and with sequence parallelism (equal to the tensors a forward
        keeps and within 15% of measured peaks on CPU, tests/kernel/test_plan.py)."""
        block = BlockConfig.of(self)
        h, L, s, b = self.hidden_size, self.num_layers, self.seq_length, micro_batch
        sp = self.sequence_parallel and tp > 1
        u = tp if sp else 1  # sequence parallelism splits the embedding's and the final norm's tokens
        vocab = padded_vocab_size(vocab_size, self.make_vocab_size_divisible_by, tp)
        learned = self.position_embedding_type == "learned_absolute"
        positions = (self.max_position_embeddings or s) if learned else 0  # rotary / no positions: no table
        tied = self.share_embeddings_and_output_weights
        n = b * s  # tokens of one micro-batch
        o2 = self.megatron_amp_O2
        e, r = activation_bytes(precision, o2)  # a matmul's saved input; the residual stream
        g = param_bytes(precision, o2)  # a gradient as autograd makes it
        norm = norm_params(block)
        # the final norm keeps its input (RMSNorm: in fp32) and its statistics (RMSNorm: and the normalised tensor)
        final = n * h * norm_input_bytes(block, precision, o2) + norm_internal_bytes(block, n, precision, device, o2)
        word = vocab * h // tp
        layer = {"params": block_params(block, tp), "matmul_params": block_matmul_params(block, tp),
                 "param_numels": block_param_numels(block, tp)}
        kept, rebuilt = stack_activation_bytes(block, L // pp, b, s, s, tp, precision, device, o2=o2, sp=sp)
        # RoPE's fp32 cos and sin, once per stage: kept by fp32 layers, or as checkpointed regions' inputs
        per_stage_rope = rotary_bytes(block, s, "32")[1] if (
            rotary_bytes(block, s, precision, o2)[1] or self.activations_checkpoint_granularity == "full") else 0
        stack = {"activations": kept + per_stage_rope, "recompute_transient": rebuilt}
        first = {"params": word + positions * h, "param_numels": [word] + ([positions * h] if positions else []),
                 "activations": n * h * dropout_mask_bytes(self.hidden_dropout, precision, device, o2) // u,
                 "grad_transient": g * word}  # the embedding's dense gradient before it is accumulated
        head = word if pp > 1 or not tied else 0  # the tied head's copy, or the untied output layer
        last = {"params": norm + head,  # final norm and the head
                "param_numels": [h] * (norm // h) + ([word] if head else []),
                "matmul_params": word,  # the head, cast once (the tied embedding without pipelining)
                "grad_transient": g * word}  # the output layer's gradient of its matrix
        real = min(vocab_size, vocab) if self.mask_padded_vocab and tp == 1 else vocab // tp
        if self.loss_chunk_size:  # final norm's input; gradients of the hidden states and the head, made in forward
            last["activations"] = final // u + 4 * n * h + 4 * word
            last["transient"] = (8 + e) * min(n, self.loss_chunk_size) * vocab // tp  # one chunk's logits
        else:  # final norm in/out (the output layer's saved input); the loss's fp32 softmax; logits and their gradient
            last["activations"] = (final + n * h * e) // u + 4 * n * real
            last["transient"] = (e + 4) * n * vocab // tp
        stages = pipeline_stages(pp, L, layer, first, last, stack)
        whole = L * block_params(block, 1) + padded_vocab_size(vocab_size, self.make_vocab_size_divisible_by) * h * (
            1 if tied else 2) + positions * h + norm
        return {"params": whole, "flops_per_token": training_flops_per_token(block, vocab, s), "stages": stages}


class TransformerLanguageModel(nn.Module):
    """Megatron's `language_model` (its TransformerLanguageModel): embedding (first
    pipeline stage) + transformer `encoder` (this stage's layers; the final LayerNorm on
    the last stage)."""

    def __init__(self, cfg: GPTConfig, vocab: int):
        super().__init__()
        st = current()
        block = BlockConfig.of(cfg)
        embedding = Embedding(vocab, block, cfg.max_position_embeddings or cfg.seq_length)
        self.embedding = embedding if st.is_first_stage else None
        tied = cfg.share_embeddings_and_output_weights
        # The last stage's copy of the tied word embedding starts from the same values.
        self.head_weight_init = embedding.word_embeddings.weight.detach() if tied and not st.is_first_stage else None
        per_stage = cfg.num_layers // st.pp_size
        self.encoder = TransformerStack(block, keep=range(st.pp_rank * per_stage, (st.pp_rank + 1) * per_stage),
                                        final_layernorm=st.is_last_stage)
        # An untied output layer (vocabulary-parallel, no bias), drawn on every stage after
        # the layers so each stage starts from the single-stage model's weights; kept on the last.
        output_layer = None if tied else ColumnParallelLinear(cfg.hidden_size, vocab, block.init_method, bias=False)
        self.output_layer = output_layer if st.is_last_stage else None


def check_config(cfg: GPTConfig) -> None:
    """The blocks' shape (mega.plugins.models.transformer.check_shape) and GPT's own keys."""
    check_shape(BlockConfig.of(cfg), cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size)
    if cfg.loss_chunk_size < 0:
        raise ConfigError(f"model.loss_chunk_size: must be >= 0 (0: unchunked), got {cfg.loss_chunk_size}")
    for name in ("seq_length", "make_vocab_size_divisible_by"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"model.{name}: must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_position_embeddings is not None and cfg.max_position_embeddings < cfg.seq_length:
        raise ConfigError(f"model.max_position_embeddings={cfg.max_position_embeddings} is smaller than model.seq_length={cfg.seq_length}")
    check_recompute(cfg, "model", cfg.num_layers // cfg.pipeline_model_parallel_size)
    check_sequence_parallel(cfg, {"model.seq_length": cfg.seq_length})


class GPTModel(TiedWordEmbeddingStages, nn.Module):
    def __init__(self, cfg: GPTConfig, vocab_size: int):
        super().__init__()
        check_config(cfg)
        self.config = cfg
        self.vocab_size = vocab_size  # the tokenizer's; logits beyond it are padding
        self.padded_vocab_size = padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, current().tp_size)
        self.max_positions = cfg.max_position_embeddings or cfg.seq_length
        st = current()
        self.pre_process, self.post_process = st.is_first_stage, st.is_last_stage
        self.share_embeddings_and_output_weights = cfg.share_embeddings_and_output_weights
        self.language_model = TransformerLanguageModel(cfg, self.padded_vocab_size)
        self.eager_reason = eager_reason(cfg)  # trainer.compile leaves the step eager with these keys on
        self.finish_stages()  # the last stage's copy of the tied word embedding, resharding aliases

    # --- the LanguageModule contract (shared_embedding_or_output_weight: TiedWordEmbeddingStages) ---
    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """megatron-core's LanguageModule contract, in its layout: `labels` [batch, seq],
        `logits` SEQUENCE-FIRST [seq, batch, vocab] (what megatron-core's output layer
        returns), [batch, seq] losses. Logits of another shape (batch-first ones, as
        `forward` returns) are refused with a ValueError; when batch == seq the shapes
        cannot tell, so pass `logits.transpose(0, 1)` of batch-first logits. Cross entropy
        in fp32 over this rank's vocabulary slice (`token_losses`)."""
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (labels.shape[1], labels.shape[0]):
            raise ValueError(f"compute_language_model_loss: logits of shape {list(logits.shape)} for labels of shape"
                             f" {list(labels.shape)}: megatron-core's layout is sequence-first, [seq, batch, vocab] ="
                             f" [{labels.shape[1]}, {labels.shape[0]}, vocab]; batch-first logits (GPTModel.forward's)"
                             " go in as logits.transpose(0, 1), or to token_losses")
        return self.token_losses(labels, logits.transpose(0, 1))

    def token_losses(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Cross entropy over the vocabulary in fp32 of BATCH-FIRST `logits` [batch, seq,
        vocab]: [batch, seq] losses. `logits` are this rank's vocabulary slice under tensor
        parallelism (never gathered). Padded ids are out of the softmax unless
        `model.mask_padded_vocab = false` (Megatron-LM's loss)."""
        return vocab_parallel_cross_entropy(logits, labels, self.vocab_size if self.config.mask_padded_vocab else None)

    # --- forward ---------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, parallel_output: bool = False) -> torch.Tensor:
        """Logits [batch, seq, padded_vocab] for `tokens` [batch, seq]; with
        `parallel_output`, only this tensor-parallel rank's vocabulary slice."""
        if not (self.pre_process and self.post_process):
            raise ValueError("forward() needs the whole model; under pipeline parallelism use stage_forward()")
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + tokens.shape[1], device=tokens.device).unsqueeze(0)
        if int(position_ids.max()) >= self.max_positions:
            raise ValueError(f"position {int(position_ids.max())} exceeds max_position_embeddings {self.max_positions}")
        h = self.language_model.embedding(tokens, position_ids)
        h = self.language_model.encoder(h, cache)
        logits = F.linear(copy_to_tp(h), self.output_weight())
        return logits if parallel_output else gather_from_tp(logits)

    def training_loss(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The kernel's model contract: the sum of masked token losses (the kernel divides
        by the global batch's token count) plus any extra terms to log."""
        return self.stage_forward(batch, None)

    def stage_forward(self, batch: Dict[str, torch.Tensor], hidden: Optional[torch.Tensor]):
        """This pipeline stage's part: embed (first stage) or take `hidden`, run the local
        layers, and on the last stage return the loss dict; else the hidden states (this
        rank's slice of the sequence under `model.sequence_parallel`)."""
        with sequence_parallel_region(self.config.sequence_parallel):
            return self._stage_forward(batch, hidden)

    def _stage_forward(self, batch, hidden):
        sp = self.config.sequence_parallel
        if self.pre_process:
            tokens = batch["tokens"]
            positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
            hidden = self.language_model.embedding(tokens, positions)
        hidden = self.language_model.encoder(hidden)
        if not self.post_process:
            return hidden
        if self.config.loss_chunk_size:  # the same sum without the [tokens, vocab] logits
            vocab = self.vocab_size if self.config.mask_padded_vocab else None
            return {"loss_sum": chunked_linear_cross_entropy(
                output_layer_input(hidden, sp), self.output_weight(), batch["labels"],
                batch["loss_mask"], vocab, self.config.loss_chunk_size)}
        logits = output_logits(hidden, self.output_weight(), sp)
        losses = self.token_losses(batch["labels"], logits)
        return {"loss_sum": (losses * batch["loss_mask"]).sum()}

    def activation_shape(self, batch: Dict[str, torch.Tensor]) -> tuple:
        """Shape of the hidden states passed between pipeline stages: [b, s / TP, h] under
        sequence parallelism (Megatron's [s / TP, b, h])."""
        b, s = batch["tokens"].shape
        if self.config.sequence_parallel:
            s //= current().tp_size
        return (b, s, self.config.hidden_size)

    def output_weight(self) -> torch.Tensor:
        """The matrix that produces the logits: the untied output layer's, or the word
        embedding (its last-stage copy under pipelining)."""
        if not self.share_embeddings_and_output_weights:
            return self.language_model.output_layer.weight
        return self.shared_embedding_or_output_weight()

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        """Keys and values of this rank's key/value heads (num_query_groups / TP) per layer."""
        block = BlockConfig.of(self.config)
        w = self.output_weight()
        return KVCache(block.num_layers, batch, block.query_groups // current().tp_size, max_len, block.head_dim,
                       w.device, w.dtype)

    # --- FLOPs, so MFU says which count it uses ----------------------------------------------
    def flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs per token: 6 x (matmul parameters, output layer included) plus
        attention scores and values, 12 x layers x hidden x seq (no causal discount), the
        count of the PaLM paper's appendix B and Megatron-LM's throughput reports."""
        return training_flops_per_token(BlockConfig.of(self.config), self.padded_vocab_size, seq_length)


def training_flops_per_token(block: BlockConfig, padded_vocab: int, seq_length: int) -> float:
    """GPTModel.flops_per_token, from the config alone (`mega plan` counts with it):
    6 x the matmul weights (QKV (heads + 2 x groups) x head_dim rows, the attention output,
    2 or, gated, 3 MLP matrices, the output layer once, tied or not; the input embedding
    is a lookup) + 12 x layers x heads x head_dim x seq for the scores and the weighted
    sum (query heads: grouped-query attention shares K and V, not the scores)."""
    h, L = block.hidden_size, block.num_layers
    q, kv = block.num_attention_heads * block.head_dim, block.query_groups * block.head_dim
    per_layer = h * (q + 2 * kv) + q * h + (3 if block.gated else 2) * h * block.ffn
    return 6.0 * (L * per_layer + padded_vocab * h) + 12.0 * L * q * seq_length


# --- registration ------------------------------------------------------------------------------


def build_gpt(config: GPTConfig, tokenizer, plugins=None) -> GPTModel:
    return GPTModel(config, tokenizer.vocab_size)


@mega.hookimpl
def register_models(register):
    register("gpt", build_gpt, config=GPTConfig)


@mega.hookimpl
def register_model_converters(register):
    """GPT's Hugging Face (GPT-2), Megatron-LM, megatron-core and NeMo mappings
    (mega.plugins.models.gpt_interop)."""
    from mega.plugins.models.gpt_interop import GPTInterop

    register("gpt", GPTInterop)
