"""Megatron-style encoder-decoder (`t5` and `bart` presets) with an optional Perceiver
encoder and the hiddens module between encoder and decoder (NeMo's MIM / VAE models).

The encoder is bidirectional over the padded input (`model.encoder.arch = "transformer"`),
or a Perceiver: `hidden_steps` learned latents cross-attend to the input, so the hiddens
have a fixed length whatever the input length. The decoder is causal, with
cross-attention (`inter_attention`) over the encoder output — or over the hiddens output
named by `model.hiddens.enc_output_name` (e.g. the sample `z` of MIM / VAE). Word
embeddings are shared by encoder, decoder and the output layer.
"""
from __future__ import annotations

from pathlib import Path

from typing import Any, Dict, Literal, Optional, Tuple

import contextlib

import torch
from attrs import define, field
from torch import nn

import mega
from mega.config import ModelConfig
from mega.errors import ConfigError
from mega.plugins.data.objectives import DenoisingObjective
from mega.plugins.hiddens import HiddensConfig, get_hiddens_module
from mega.plugins.models.scaling import (
    RecomputeKeys,
    SequenceParallelKey,
    check_recompute,
    check_sequence_parallel,
    eager_reason,
)
from mega.plugins.models.transformer import (
    MLP,
    BlockConfig,
    CrossAttention,
    Embedding,
    SelfAttention,
    TransformerLayer,
    TransformerStack,
    check_shape,
    layer_norm,
    output_logits,
    padded_vocab_size,
)
from mega.runtime import recompute
from mega.runtime.parallel import current
from mega.runtime.tensor_parallel import (
    gather_from_sp,
    gather_from_tp,
    get_rng_tracker,
    mark_replicated,
    sequence_parallel_active,
    sequence_parallel_region,
    shard,
    vocab_parallel_cross_entropy,
)


@define(kw_only=True)
class StackConfig(RecomputeKeys):
    """`model.encoder.*` / `model.decoder.*`."""

    arch: str = "transformer"  # encoder: "transformer" or "perceiver"
    num_layers: int = 6
    hidden_size: int = 512
    num_attention_heads: int = 8
    ffn_hidden_size: Optional[int] = None  # None: 4 x hidden_size
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    hidden_steps: int = 32  # Perceiver latents: the fixed length of the hiddens
    layernorm_epsilon: float = 1e-5
    activation: Literal["gelu", "gelu_tanh"] = "gelu"  # exact GELU, or its tanh approximation


@define(kw_only=True)
class EncoderDecoderConfig(SequenceParallelKey, ModelConfig):
    name: str = "t5"
    encoder: StackConfig = field(factory=StackConfig)
    decoder: StackConfig = field(factory=StackConfig)
    seq_length_dec: Optional[int] = None  # decoder length; None: seq_length
    max_position_embeddings: Optional[int] = None  # None: max(seq_length, seq_length_dec)
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    extra_ids: int = 100  # sentinel / mask ids after the tokenizer's vocabulary (T5's <extra_id_k>)
    mask_padded_vocab: bool = True  # ids >= vocabulary + extra_ids left out of the loss's softmax; false: Megatron-LM's
    tokens_head_bias: bool = False  # a bias over the (padded, vocabulary-parallel) vocabulary in the output layer (NeMo's tokens_head.bias; NeMo's default is true)
    hiddens: Optional[HiddensConfig] = None  # the hiddens module (docs/hiddens.md); unset: plain encoder-decoder

    def check(self, plugins=None) -> None:
        """Shapes, and the hiddens module's wiring (every output a loss or transform needs is
        produced by an earlier transform): built once and dropped, the random stream untouched."""
        check_config(self)
        with torch.random.fork_rng(devices=[]):
            _hiddens_module(self, plugins)


    @classmethod
    def tiny_preset(cls, directory) -> dict:
        """Encoder and decoder of 2 layers of width 16 on a byte tokenizer and a corpus of
        random words."""
        from mega.testing import write_corpus

        stack = {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 4}
        return {"model": {"micro_batch_size": 4, "seq_length": 32, "seq_length_dec": 32,
                          "make_vocab_size_divisible_by": 8, "encoder": dict(stack), "decoder": dict(stack),
                          "tokenizer": {"library": "bytes"},
                          "data": {"data_prefix": [str(write_corpus(Path(directory) / "corpus.txt"))],
                                   "splits_string": "80,10,10"},
                          "optim": {"lr": 1e-3, "sched": {"name": "constant"}}}}
    def memory_per_rank(self, vocab_size: int, micro_batch: int, tp: int, pp: int, precision: str,
                        device: str) -> Dict[str, Any]:
        """mega.protocols.EstimatesMemory: parameters counted on a model built on the meta
        device (nothing allocated; the hiddens module included), 2-D weights split over TP;
        activations per block as GPT's (mega.plugins.models.gpt.block_activation_bytes),
        the decoder's cross-attention over the encoder output included. One stage only:
        encoder-decoders do not pipeline."""
        from mega.plugins.models.estimates import (
            activation_bytes,
            dropout_mask_bytes,
            layernorm_stats_bytes,
            param_bytes,
            stack_activation_bytes,
        )

        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            model = EncoderDecoderModel(self, vocab_size)
        vocab = padded_vocab_size(vocab_size + self.extra_ids, self.make_vocab_size_divisible_by, tp)
        whole = sum(p.numel() for p in model.parameters())
        split = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "position" not in n)
        enc, dec = blocks(self)
        b, s_enc = micro_batch, self.seq_length
        s_dec = self.seq_length_dec or self.seq_length
        o2 = self.megatron_amp_O2
        e, r = activation_bytes(precision, o2)  # a matmul's saved input; the residual stream
        h = dec.hidden_size
        sp = self.sequence_parallel and tp > 1
        u = tp if sp else 1  # sequence parallelism splits the embeddings' and the final LayerNorms' tokens
        if self.encoder.arch == "perceiver":
            memory = self.encoder.hidden_steps
            acts, enc_rebuilt = stack_activation_bytes(enc, enc.num_layers, b, memory, memory, tp, precision, device,
                                                       cross_kv=s_enc, o2=o2)
        else:
            memory = s_enc
            acts, enc_rebuilt = stack_activation_bytes(enc, enc.num_layers, b, s_enc, s_enc, tp, precision, device, o2=o2,
                                                       sp=sp)
        dec_acts, dec_rebuilt = stack_activation_bytes(dec, dec.num_layers, b, s_dec, s_dec, tp, precision, device,
                                                       cross_kv=memory, o2=o2, sp=sp)
        acts += dec_acts
        mask = dropout_mask_bytes(enc.hidden_dropout, precision, device, o2)
        stats = layernorm_stats_bytes(precision, device, o2)
        n = b * s_dec
        # embedding dropout; the encoder's final LayerNorm input and output (the memory, whole on every rank)
        acts += b * (s_enc + s_dec) * h * mask // u + b * memory * h * r // u + b * memory * h * r
        acts += (n * h * (r + e) + stats * n) // u + 4 * n * vocab // tp  # decoder final LayerNorm; the loss's fp32 softmax
        numels = [p.numel() // tp if p.dim() == 2 and "position" not in k else p.numel() for k, p in model.named_parameters()]
        stage = {"params": whole - split + split // tp, "matmul_params": split // tp, "activations": acts,
                 "param_numels": numels,  # registration order: the distributed optimizer's buffer layout
                 "transient": (e + 4) * n * vocab // tp, "grad_transient": 2 * param_bytes(precision, o2) * vocab * h // tp,
                 "recompute_transient": max(enc_rebuilt, dec_rebuilt)}
        return {"params": whole, "flops_per_token": 6.0 * split, "stages": [stage]}

    def objective(self) -> DenoisingObjective:
        """The samples this model trains on: "t5" span corruption or "bart" infilling."""
        return DenoisingObjective(name=self.name, seq_length_dec=self.seq_length_dec, extra_ids=self.extra_ids)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the encoder output, MLP (pre-LN)."""

    def __init__(self, c: BlockConfig, layer_number: int):
        super().__init__()
        self.input_layernorm = layer_norm(c)
        self.self_attention = SelfAttention(c, layer_number)
        self.post_attention_layernorm = layer_norm(c)
        self.inter_attention = CrossAttention(c)
        self.post_inter_attention_layernorm = layer_norm(c)
        self.mlp = MLP(c)
        self.hidden_dropout = nn.Dropout(c.hidden_dropout)

    def forward(self, x, memory, memory_mask, dec_mask):
        x = x + self.hidden_dropout(self.self_attention(self.input_layernorm(x), key_mask=dec_mask, causal=True))
        x = x + self.hidden_dropout(self.inter_attention(self.post_attention_layernorm(x), memory, memory_mask))
        return x + self.hidden_dropout(self.mlp(self.post_inter_attention_layernorm(x)))


class PerceiverLayer(nn.Module):
    """Latents cross-attend to the input, then a bidirectional self-attention block."""

    def __init__(self, c: BlockConfig, layer_number: int):
        super().__init__()
        self.cross_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layernorm_epsilon)
        self.inter_attention = CrossAttention(c)
        self.hidden_dropout = nn.Dropout(c.hidden_dropout)
        self.self_layer = TransformerLayer(c, layer_number)

    def forward(self, latents, inputs, input_mask):
        latents = latents + self.hidden_dropout(self.inter_attention(self.cross_layernorm(latents), inputs, input_mask))
        return self.self_layer(latents, causal=False)


class PerceiverEncoder(nn.Module):
    def __init__(self, c: BlockConfig, hidden_steps: int):
        super().__init__()
        self.init_hidden = nn.Parameter(c.init_method(torch.empty(hidden_steps, c.hidden_size)))
        self.layers = nn.ModuleList(PerceiverLayer(c, i) for i in range(c.num_layers))
        self.final_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layernorm_epsilon)
        self.full_recompute = c.full_recompute

    def forward(self, x, mask):
        latents = self.init_hidden.unsqueeze(0).expand(x.shape[0], -1, -1)
        method, k = self.full_recompute if recompute.wanted(self) else (None, None)
        latents = recompute.run_layers(self.layers, latents, x, mask, method=method, num_layers=k)
        return self.final_layernorm(latents)


def blocks(cfg: EncoderDecoderConfig) -> Tuple[BlockConfig, BlockConfig]:
    """The encoder's and the decoder's block configs."""
    return tuple(BlockConfig.of(getattr(cfg, side), init_method_std=cfg.init_method_std, where=f"model.{side}",
                                sequence_parallel=cfg.sequence_parallel)
                 for side in ("encoder", "decoder"))


def check_config(cfg: EncoderDecoderConfig) -> None:
    if cfg.encoder.hidden_size != cfg.decoder.hidden_size:
        raise ConfigError(f"model.encoder.hidden_size={cfg.encoder.hidden_size} and model.decoder.hidden_size="
                          f"{cfg.decoder.hidden_size} must be equal (the word embedding is shared)")
    if cfg.encoder.arch not in ("transformer", "perceiver"):
        raise ConfigError(f"model.encoder.arch: expected \"transformer\" or \"perceiver\", got {cfg.encoder.arch!r}")
    if cfg.decoder.arch != "transformer":
        raise ConfigError(f"model.decoder.arch: only \"transformer\" is supported, got {cfg.decoder.arch!r}")
    if cfg.pipeline_model_parallel_size != 1:
        raise ConfigError("model.pipeline_model_parallel_size: encoder-decoder models do not support pipeline parallelism yet")
    for block in blocks(cfg):
        check_shape(block, cfg.tensor_model_parallel_size)
    for side in ("encoder", "decoder"):
        stack = getattr(cfg, side)
        check_recompute(stack, f"model.{side}", stack.num_layers)
    perceiver = cfg.encoder.arch == "perceiver"
    check_sequence_parallel(cfg, {"model.seq_length": cfg.seq_length,
                                  "model.seq_length_dec": cfg.seq_length_dec or cfg.seq_length},
                            supported="not with model.encoder.arch = \"perceiver\" (its latents cross-attend to the"
                                      " whole input)" if perceiver else None)


def _hiddens_module(cfg: EncoderDecoderConfig, plugins):
    """The hiddens module of `model.hiddens`, from the run's registries (None without one)."""
    try:
        return get_hiddens_module(cfg.hiddens, plugins=plugins)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"model.hiddens: {exc.args[0] if exc.args else exc}") from None


class EncoderDecoderModel(nn.Module):
    def __init__(self, cfg: EncoderDecoderConfig, vocab_size: int, plugins=None):
        super().__init__()
        check_config(cfg)
        self.config, self.vocab_size = cfg, vocab_size
        self.padded_vocab_size = padded_vocab_size(vocab_size + cfg.extra_ids, cfg.make_vocab_size_divisible_by,
                                                   current().tp_size)
        enc, dec = blocks(cfg)
        self.max_positions = cfg.max_position_embeddings or max(cfg.seq_length, cfg.seq_length_dec or cfg.seq_length)
        self.embedding = Embedding(self.padded_vocab_size, enc, self.max_positions)
        if cfg.encoder.arch == "perceiver":
            self.encoder = PerceiverEncoder(enc, cfg.encoder.hidden_steps)
        else:
            self.encoder = TransformerStack(enc)
        self.decoder = nn.ModuleList(DecoderLayer(dec, i) for i in range(dec.num_layers))
        self.decoder_final_layernorm = layer_norm(dec)
        # NeMo's MegatronTokenLevelHead bias: this rank's slice of the vocabulary, zeros at first
        self.tokens_head_bias = shard(torch.zeros(self.padded_vocab_size), 0) if cfg.tokens_head_bias else None
        self.decoder_recompute = dec.full_recompute
        self.hiddens_module = _hiddens_module(cfg, plugins)
        self.eager_reason = " and ".join(filter(None, [eager_reason(cfg.encoder, "model.encoder"),
                                                       eager_reason(cfg.decoder, "model.decoder"),
                                                       "model.sequence_parallel" if cfg.sequence_parallel else None])) or None
        mark_replicated(self)

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.embedding.word_embeddings.weight

    def _embed(self, tokens):
        return self.embedding(tokens, torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0))

    def encode(self, text_enc: torch.Tensor, enc_mask: torch.Tensor, batch_data=None) -> Dict[str, torch.Tensor]:
        """Encoder output and every hiddens output; hiddens are sequence-first [S, B, H] as in
        NeMo, `hiddens_mask` is [B, S] (all ones for a Perceiver). Under sequence
        parallelism the encoder output is gathered to the whole sequence once: the hiddens
        module and every decoder layer's key/value projection read it whole."""
        x = self._embed(text_enc)
        if isinstance(self.encoder, PerceiverEncoder):
            h = self.encoder(x, enc_mask)
            mask = torch.ones(h.shape[:2], dtype=enc_mask.dtype, device=h.device)
        else:
            h, mask = self.encoder(x, key_mask=enc_mask, causal=False), enc_mask
            if sequence_parallel_active(self.config.sequence_parallel):
                h = gather_from_sp(h, reduce_grads=False)  # its consumers' gradient is whole on every rank
        out = {"hiddens": h.transpose(0, 1), "hiddens_mask": mask}
        if self.hiddens_module is None:
            out["enc_output"] = out["hiddens"]
            return out
        return self.hiddens_module.apply_hidden_transforms(out, batch_data)

    def decode(self, text_dec, memory, memory_mask, dec_mask=None, parallel_output: bool = False) -> torch.Tensor:
        """Logits [B, S_dec, V] (this rank's vocabulary slice with `parallel_output`);
        `memory` is [B, S, H]."""
        x = self._embed(text_dec)
        sp = sequence_parallel_active(self.config.sequence_parallel)
        method, k = self.decoder_recompute if recompute.wanted(self) else (None, None)
        with get_rng_tracker().fork() if sp else contextlib.nullcontext():  # as TransformerStack
            x = recompute.run_layers(self.decoder, x, memory, memory_mask, dec_mask, method=method, num_layers=k)
            x = self.decoder_final_layernorm(x)
        logits = output_logits(x, self.shared_embedding_or_output_weight(), self.config.sequence_parallel)
        if self.tokens_head_bias is not None:
            logits = logits + self.tokens_head_bias
        return logits if parallel_output else gather_from_tp(logits)

    def training_loss(self, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """The kernel divides by the global batch's loss tokens, so the joint loss of the
        hiddens module (hidden terms reduced over samples + tokens_loss_weight x token mean,
        NeMo's joint loss) is returned per token of this micro-batch: hidden terms are
        multiplied by its token count n. With one micro-batch the result is NeMo's loss
        exactly; with several, micro-batches are weighted by tokens instead of equally."""
        with sequence_parallel_region(self.config.sequence_parallel):
            return self._training_loss(batch)

    def _training_loss(self, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        enc = self.encode(batch["text_enc"], batch["enc_mask"], batch_data=batch)
        logits = self.decode(batch["text_dec"], enc["enc_output"].transpose(0, 1), enc["hiddens_mask"],
                             batch.get("dec_mask"), parallel_output=True)
        real = self.vocab_size + self.config.extra_ids  # sentinels are real ids; the rest is padding
        nll = vocab_parallel_cross_entropy(logits, batch["labels"], real if self.config.mask_padded_vocab else None)
        mask = batch["loss_mask"]
        nll_sum, n = (nll * mask).sum(), mask.sum()
        if self.hiddens_module is None:
            return {"loss_sum": nll_sum}
        d = self.hiddens_module.apply_loss_transforms(enc, batch_data=batch)
        terms = {"tokens_loss": nll_sum.detach()}
        for k, v in d.items():
            if k != "tokens_loss_weight" and torch.is_tensor(v):
                terms[k] = v.detach().float().mean() * n  # logged as a per-token-weighted mean
        return {"loss_sum": d["tokens_loss_weight"] * nll_sum + d["hiddens_loss"] * n, "terms": terms}

    @torch.no_grad()
    def greedy_decode(self, text_enc, enc_mask, bos_id: int, eos_id: int, max_len: int) -> torch.Tensor:
        """Greedy decoding from the hiddens (z_mean in eval when hiddens sample)."""
        enc = self.encode(text_enc, enc_mask)
        memory, memory_mask = enc["enc_output"].transpose(0, 1), enc["hiddens_mask"]
        out = torch.full((text_enc.shape[0], 1), bos_id, dtype=torch.long, device=text_enc.device)
        for _ in range(max_len - 1):
            logits = self.decode(out, memory, memory_mask)[:, -1, : self.vocab_size]
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
            if (out == eos_id).any(dim=1).all():
                break
        return out

    def flops_per_token(self, seq_length: int) -> float:
        """6 x matmul parameters (encoder and decoder stacks, output layer), no attention term."""
        n = sum(p.numel() for name, p in self.named_parameters() if p.dim() == 2 and "position" not in name)
        return 6.0 * n * current().tp_size


# --- registration: the `t5` and `bart` presets --------------------------------------------------
# One architecture; the presets differ in the samples they train on (their objective()):
# span corruption vs text infilling.


@define(kw_only=True)
class T5Config(EncoderDecoderConfig):
    name: str = "t5"  # span corruption


@define(kw_only=True)
class BartConfig(EncoderDecoderConfig):
    name: str = "bart"  # text infilling


def build(config, tokenizer, plugins=None) -> EncoderDecoderModel:
    return EncoderDecoderModel(config, tokenizer.vocab_size, plugins)


@mega.hookimpl
def register_models(register):
    register("t5", build, config=T5Config)
    register("bart", build, config=BartConfig)


@mega.hookimpl
def register_model_converters(register):
    """NeMo's MegatronT5Model / MegatronBARTModel archives, hiddens included
    (mega.plugins.models.encoder_decoder_interop)."""
    from mega.plugins.models.encoder_decoder_interop import EncoderDecoderInterop

    register("t5", EncoderDecoderInterop)
    register("bart", EncoderDecoderInterop)
