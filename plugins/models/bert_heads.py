"""The heads on top of the Megatron-BERT encoder, and the loss each one trains with.

Named as Megatron-LM names them in its checkpoints, so its files map key for key:
`language_model.pooler.dense`, `lm_head.{dense,layernorm,bias}`, `binary_head`,
`classification_head` (its Classification model), `multichoice_head` (its MultipleChoice
model); `token_classification_head` and `qa_head` are ours (Megatron-LM has no such
models; they play Hugging Face's `classifier` / `qa_outputs`). NeMo's MLP heads are
`ClassifierMLP`, under NeMo's names (`classifier.mlp.layer0`, ...).

Every loss is returned in the kernel's two-divisor form (mega.protocols.LossOutput): token
losses as a sum over `loss_mask` positions (divided by the global batch's loss tokens),
sentence-level losses as a sum over samples (divided by its sample count).

Class-weighted cross entropy (NeMo's `class_balancing = "weighted_loss"`) is the weighted
mean sum(w[y] * loss) / sum(w[y]) over the global batch. Its divisor must be known before
any micro-batch runs, so the weights travel in the batch as `loss_mask` (w[y] at each
labelled position, or per sample for a sequence classifier): the head returns the
weighted sum as a token loss (`loss_sum`) and the kernel divides by the global sum of
`loss_mask`. One micro-batch on one process gives exactly
`F.cross_entropy(logits, labels, weight=w)`; any micro-batching or data parallelism gives
that same value for the whole global batch.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mega.plugins.models.transformer import ACTIVATIONS, BlockConfig
from mega.runtime.tensor_parallel import copy_to_tp, shard, vocab_parallel_cross_entropy


def linear(cfg: BlockConfig, in_features: int, out_features: int) -> nn.Linear:
    """Megatron's `get_linear_layer`: weight N(0, init_method_std), bias zero (replicated)."""
    layer = nn.Linear(in_features, out_features)
    cfg.init_method(layer.weight.data)
    layer.bias.data.zero_()
    return layer


# NeMo's MultiLayerPerceptron takes its activation as `getattr(torch, name)`
MLP_ACTIVATIONS = ("relu", "tanh", "sigmoid", "selu")


class ClassifierMLP(nn.Module):
    """NeMo's classifier heads (`TokenClassifier`, `SequenceClassifier`): `layers` linear
    layers with the activation between them, optionally a log-softmax, under NeMo's own
    parameter names (`mlp.layer0`, `mlp.layer2`, ...: its MultiLayerPerceptron counts the
    parameter-free activations as layers 1, 3, ...), so a NeMo head maps key for key. Read
    at NeMo v1.4.0: nemo/collections/common/parts/multi_layer_perceptron.py,
    nemo/collections/nlp/modules/common/{token,sequence}_classifier.py. Weights are drawn as
    `linear` draws them (N(0, init_method_std), zero bias: NeMo's transformer_weights_init)."""

    def __init__(self, cfg: BlockConfig, in_features: int, out_features: int, layers: int, activation: str = "relu",
                 log_softmax: bool = False):
        super().__init__()
        self.mlp = nn.Module()
        for i in range(layers - 1):
            setattr(self.mlp, f"layer{2 * i}", linear(cfg, in_features, in_features))
        setattr(self.mlp, f"layer{2 * (layers - 1)}", linear(cfg, in_features, out_features))
        self.layers, self.activation, self.log_softmax = layers, getattr(torch, activation), log_softmax

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i in range(self.layers):
            h = getattr(self.mlp, f"layer{2 * i}")(h)
            if i < self.layers - 1:
                h = self.activation(h)
        return torch.log_softmax(h, dim=-1) if self.log_softmax else h


class Pooler(nn.Module):
    """tanh(dense(h[:, 0])): the final-LayerNorm output at the first token (`[CLS]`)."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.dense = linear(cfg, cfg.hidden_size, cfg.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))


class BertLMHead(nn.Module):
    """dense, GeLU, LayerNorm, then the decoder tied to the word embedding, plus a bias
    over the (padded) vocabulary. Under tensor parallelism each rank holds its slice of the
    vocabulary (of the tied matrix and of `bias`) and returns its slice of the logits."""

    def __init__(self, cfg: BlockConfig, padded_vocab: int, activation: str):
        super().__init__()
        self.dense = linear(cfg, cfg.hidden_size, cfg.hidden_size)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.bias = shard(torch.zeros(padded_vocab), 0)
        self.approximate = ACTIVATIONS[activation]

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        h = self.layernorm(F.gelu(self.dense(h), approximate=self.approximate))
        return F.linear(copy_to_tp(h), word_embeddings, self.bias)


def masked_lm_loss(head: BertLMHead, word_embeddings: torch.Tensor, h: torch.Tensor, labels: torch.Tensor,
                   loss_mask: torch.Tensor, vocab_size: Optional[int],
                   positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over `loss_mask` positions of the cross entropy of the LM head's logits (fp32,
    vocab-parallel). The head runs only on those positions (the 15% a BERT sample
    predicts, or every target of a causal sample): the others are multiplied by zero in
    Megatron-LM's loss, so skipping them changes nothing but the time spent.

    `positions` [b, k] (the samples' `lm_positions`): the rows to run, a fixed number per
    sample, each weighted by its `loss_mask` (padding rows point at a position of weight
    0). Without it the rows are picked by the mask itself, whose count only the device
    knows: the host waits for it (3 reads forward, 1 backward) and shapes change per batch."""
    if positions is not None:
        b, k = positions.shape
        weight = loss_mask.gather(1, positions)
        target = torch.where(weight != 0, labels.gather(1, positions), torch.zeros_like(positions))
        rows = h.gather(1, positions.unsqueeze(-1).expand(b, k, h.shape[-1])).reshape(b * k, h.shape[-1])
        losses = vocab_parallel_cross_entropy(head(rows, word_embeddings), target.reshape(-1), vocab_size)
        return (losses * weight.reshape(-1).to(losses.dtype)).sum()
    where = loss_mask.bool()
    logits = head(h[where], word_embeddings)
    losses = vocab_parallel_cross_entropy(logits, labels[where], vocab_size)
    return (losses * loss_mask[where].to(losses.dtype)).sum()


def binary_losses(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sample cross entropy (fp32; label -1 ignored, Megatron's `ignore_index`) summed,
    and the count of right answers."""
    losses = F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="none")
    right = ((logits.argmax(-1) == labels) & (labels >= 0)).sum().to(losses.dtype)
    return {"sum": losses.sum(), "right": right}


def weighted_losses(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Single-label classification with a weight per sample (`loss_mask`, its class's
    weight): sum(w * cross entropy) in fp32 (a token-form loss, divided by the global sum
    of the weights), and the count of right answers (unweighted)."""
    if logits.shape[-1] == 1 or labels.is_floating_point():
        raise ValueError("per-sample weights (loss_mask) need integer class labels over at least 2 classes")
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    right = (logits.argmax(-1) == labels).sum().to(losses.dtype)
    return {"sum": (losses * weights.to(losses.dtype)).sum(), "right": right}


def classification_losses(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Hugging Face's rule for its sequence classifiers (`problem_type` inferred): one
    label column is regression (squared error), integer labels are single-label
    classification (cross entropy), float labels of several columns are multi-label
    (binary cross entropy, averaged over the columns of each sample). Per-sample sums, and
    the right answers where that means something."""
    if logits.shape[-1] == 1:
        losses = (logits.float().squeeze(-1) - labels.float()) ** 2
        return {"sum": losses.sum()}
    if labels.is_floating_point():
        losses = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(-1)
        right = ((logits > 0) == (labels > 0.5)).all(-1).sum().to(losses.dtype)
        return {"sum": losses.sum(), "right": right}
    return binary_losses(logits, labels)


def span_losses(start_logits: torch.Tensor, end_logits: torch.Tensor, start: torch.Tensor,
                end: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Question answering as Hugging Face's: positions clamped to [0, s], a position of s
    (outside the sequence) ignored; per sample (start loss + end loss) / 2, summed; right
    answers are samples with both ends right."""
    s = start_logits.shape[1]
    start, end = start.clamp(0, s), end.clamp(0, s)
    ls = F.cross_entropy(start_logits.float(), start, ignore_index=s, reduction="none")
    le = F.cross_entropy(end_logits.float(), end, ignore_index=s, reduction="none")
    right = ((start_logits.argmax(-1) == start) & (end_logits.argmax(-1) == end)).sum().to(ls.dtype)
    return {"sum": ((ls + le) / 2).sum(), "right": right}
