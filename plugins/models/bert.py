"""Megatron-BERT: Megatron-LM's (legacy) BertModel and the Hugging Face MegatronBert* heads.

A pre-LayerNorm encoder ("layer norm and residual swapped" relative to the original BERT)
over word + position + token-type embeddings (no embedding LayerNorm), a final LayerNorm,
and heads: the pooler (dense + tanh on the first token), the masked-LM head (dense, GeLU,
LayerNorm, decoder tied to the word embedding, vocabulary-parallel, with its own bias) and
the binary (sentence-order / next-sentence) head. Parameter names are Megatron-LM's legacy
state-dict keys (`language_model.embedding.tokentype_embeddings.weight`,
`language_model.pooler.dense.*`, `lm_head.dense.*`, `lm_head.layernorm.*`, `lm_head.bias`,
`binary_head.*`, ...), so its checkpoints map key for key.

Attention is bidirectional under the padding mask: a padded key is never attended to.
Megatron-LM also masks padded *queries* (their rows come out as a uniform average); their
hidden states never reach a loss or a real position, so real positions are the same
either way, and we leave those rows to the key mask alone.

One registered model per Hugging Face class, all on the same encoder:

| model name                     | Hugging Face class                       | trains on (batch keys)                      |
|--------------------------------|------------------------------------------|---------------------------------------------|
| `bert`                         | MegatronBertForPreTraining               | BertObjective samples: `tokens`, `tokentype_ids`, `padding_mask`, `labels` (-1 where not predicted), `loss_mask`, `is_random` |
| `bert_masked_lm`               | MegatronBertForMaskedLM                  | the same, single segment; `is_random` unused |
| `bert_causal_lm`               | MegatronBertForCausalLM                  | next-token samples ("lm"): `tokens`, `labels`, `loss_mask` |
| `bert_next_sentence`           | MegatronBertForNextSentencePrediction    | BertObjective samples; label `is_random`    |
| `bert_sequence_classification` | MegatronBertForSequenceClassification    | `tokens`, `tokentype_ids`, `padding_mask` [b, s]; `label` [b] (int64 class, float for regression when num_labels = 1, float multi-hot [b, num_labels] for multi-label); optional `loss_mask` [b]: per-sample class weights (a weighted mean) |
| `bert_multiple_choice`         | MegatronBertForMultipleChoice            | `tokens`, `tokentype_ids`, `padding_mask` [b, choices, s]; `label` [b] in [0, choices) |
| `bert_token_classification`    | MegatronBertForTokenClassification       | `tokens`, `tokentype_ids`, `padding_mask` [b, s]; `labels` [b, s] with `loss_mask` [b, s] (1 where a label counts) |
| `bert_question_answering`      | MegatronBertForQuestionAnswering         | `tokens`, `tokentype_ids`, `padding_mask` [b, s]; `start_positions`, `end_positions` [b] (a position >= s is ignored) |

`tokentype_ids` and `padding_mask` may be left out (all zeros; no padding). The
downstream models declare the objective of their own name ("sequence_classification",
"multiple_choice", "token_classification", "question_answering"), which a data source
for those tasks provides.

`BertModel.logits(batch)` is the inference entry point: the outputs of the matching
Hugging Face class (`prediction_logits` and `seq_relationship_logits`, `logits`,
`start_logits` and `end_logits`) plus `last_hidden_state` and, with a pooler,
`pooler_output`; vocabulary logits cover the padded vocabulary, as Megatron-LM's.

Loss (Megatron-LM's pretrain_bert): the masked-LM loss is a token mean over the predicted
positions, the binary-head loss a per-sample mean, and the loss their sum; logged as
`lm_loss`, `sop_loss` (or `nsp_loss`) and the binary head's accuracy `binary_acc`.
"""
from __future__ import annotations

from pathlib import Path

import math
from typing import Dict, Literal, Optional

import torch
from attrs import define
from torch import nn

import mega
from mega.config import key, ModelConfig
from mega.errors import ConfigError
from mega.plugins.data.objectives import BertObjective
from mega.plugins.models.bert_heads import (
    MLP_ACTIVATIONS,
    BertLMHead,
    ClassifierMLP,
    Pooler,
    binary_losses,
    classification_losses,
    linear,
    masked_lm_loss,
    span_losses,
    weighted_losses,
)
from mega.plugins.models.estimates import (
    activation_bytes,
    block_matmul_params,
    block_params,
    dropout_mask_bytes,
    layernorm_stats_bytes,
    param_bytes,
    pipeline_stages,
    stack_activation_bytes,
)
from mega.plugins.models.gpt import training_flops_per_token
from mega.plugins.models.scaling import (
    RecomputeKeys,
    SequenceParallelKey,
    check_recompute,
    check_sequence_parallel,
    eager_reason,
)
from mega.plugins.models.transformer import (
    ACTIVATIONS,
    BlockConfig,
    Embedding,
    TiedWordEmbeddingStages,
    TransformerStack,
    check_shape,
    padded_vocab_size,
)
from mega.protocols import SampleObjective
from mega.runtime.parallel import current
from mega.runtime.tensor_parallel import (
    gather_from_sp,
    gather_from_tp,
    sequence_parallel_active,
    sequence_parallel_region,
)


@define(kw_only=True)
class BertEncoderConfig(RecomputeKeys, SequenceParallelKey, ModelConfig):
    """`model.*` keys every `bert` model has: the encoder (Megatron-LM / NeMo names)."""

    name: str = "bert"
    num_layers: int = key(24, help="transformer layers")
    hidden_size: int = key(1024, help="model width")
    num_attention_heads: int = key(16, help="must divide hidden_size")
    ffn_hidden_size: Optional[int] = key(None, help="None: 4 x hidden_size")
    max_position_embeddings: int = key(512, help="rows of the position table; at least seq_length")
    hidden_dropout: float = key(0.1, help="on embeddings, each residual branch and before classifiers")
    attention_dropout: float = key(0.1, help="on attention probabilities")
    init_method_std: float = key(0.02, help="N(0, std) init; residual outputs scaled by 1/sqrt(2 * num_layers)")
    layernorm_epsilon: float = key(1e-5, help="every LayerNorm (Megatron-LM's; Hugging Face BERT's default is 1e-12)")
    activation: Literal["gelu", "gelu_tanh"] = key("gelu",
            help="MLP: exact (erf) GeLU, or the tanh approximation (Megatron's fused bias-GeLU)")
    lm_head_activation: Literal["gelu", "gelu_tanh"] = key("gelu",
            help="LM head's GeLU (Megatron-LM: exact unless --openai-gelu)")
    make_vocab_size_divisible_by: int = key(128, help="vocabulary padded to a multiple of this (x TP)")
    mask_padded_vocab: bool = key(True,
            help="padded ids left out of the LM loss's softmax (same loss at every TP); false: Megatron-LM's")
    num_tokentypes: int = key(2, help="rows of the token-type table (0: none, Megatron-LM's --bert-no-binary-head)")

    def check(self, plugins=None) -> None:
        check_config(self)

    @classmethod
    def tiny_preset(cls, directory) -> dict:
        """2 layers of width 32 with a WordPiece vocabulary of the test words, on documents
        of sentences (BERT's sentence pairs); the heads are built on the same encoder."""
        from mega.testing import write_documents, write_vocab

        directory = Path(directory)
        return {"model": {"micro_batch_size": 4, "seq_length": 32, "max_position_embeddings": 64, "num_layers": 2,
                          "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64,
                          "make_vocab_size_divisible_by": 8,
                          "tokenizer": {"library": "wordpiece", "vocab_file": str(write_vocab(directory / "vocab.txt"))},
                          "data": {"data_prefix": [str(write_documents(directory / "documents.txt"))],
                                   "splits_string": "80,10,10"},
                          "optim": {"lr": 1e-3, "sched": {"name": "constant"}}}}

    def memory_per_rank(self, vocab_size: int, micro_batch: int, tp: int, pp: int, precision: str,
                        device: str) -> Dict[str, object]:
        """mega.protocols.EstimatesMemory, as GPT's (mega.plugins.models.gpt): parameters
        counted from the keys (exactly what BertModel builds), activations per block, plus
        the heads on the last stage; the LM head's logits only at the predicted positions
        (`masked_lm_prob` of the tokens; every token for the causal LM)."""
        task = TASKS[self.name]
        block = BlockConfig.of(self)
        h, L, s, b = self.hidden_size, self.num_layers, self.seq_length, micro_batch
        vocab = padded_vocab_size(vocab_size, self.make_vocab_size_divisible_by, tp)
        n = b * s
        o2 = self.megatron_amp_O2
        e, r = activation_bytes(precision, o2)  # a matmul's saved input; the residual stream
        g = param_bytes(precision, o2)  # a gradient as autograd makes it
        stats = layernorm_stats_bytes(precision, device, o2)  # the final LayerNorm's mean and rstd, per token
        word = vocab * h // tp
        head_params = 2 * h  # final LayerNorm
        lm = task in ("pretraining", "masked_lm", "causal_lm")
        binary = task == "next_sentence" or (task == "pretraining" and self.add_binary_head)
        if lm:
            head_params += h * h + h + 2 * h + vocab // tp
        mlp = getattr(self, "classifier_layers", None)
        if binary or (task == "sequence_classification" and mlp is None) or task == "multiple_choice":
            head_params += h * h + h  # pooler
        head_params += {"sequence_classification": (h + 1) * getattr(self, "num_labels", 0), "multiple_choice": h + 1,
                        "token_classification": (h + 1) * getattr(self, "num_labels", 0),
                        "question_answering": 2 * h + 2}.get(task, 0) + (2 * h + 2 if binary else 0)
        if mlp is not None:  # NeMo's MLP head: its hidden layers besides the output one
            head_params += (mlp - 1) * (h * h + h)
        predicted = n if task == "causal_lm" else math.ceil(n * getattr(self, "masked_lm_prob", 1.0)) if lm else 0
        sp = self.sequence_parallel and tp > 1
        u = tp if sp else 1  # sequence parallelism splits the embedding's and the final LayerNorm's tokens
        layer = {"params": block_params(block, tp), "matmul_params": block_matmul_params(block, tp)}
        kept, rebuilt = stack_activation_bytes(block, L // pp, b, s, s, tp, precision, device, o2=o2, sp=sp)
        stack = {"activations": kept, "recompute_transient": rebuilt}
        first = {"params": word + (self.max_position_embeddings + self.num_tokentypes) * h,
                 "activations": n * h * dropout_mask_bytes(self.hidden_dropout, precision, device, o2) // u,
                 "grad_transient": g * word}
        last = {"params": head_params + (word if pp > 1 else 0),
                # everything but the LayerNorms (the final one, the LM head's); the tied decoder
                "matmul_params": head_params - 2 * h - (2 * h - word if lm else 0),
                "activations": (n * h * r + stats * n) // u + n * h * e}  # final LayerNorm in (a slice under SP) and out
        if lm:  # the head's dense, GeLU and LayerNorm at the predicted positions; the loss's fp32 softmax
            last["activations"] += predicted * h * (3 * e + 8) + 4 * predicted * vocab // tp
            last["transient"] = (e + 4) * predicted * vocab // tp
            last["grad_transient"] = g * word
        stages = pipeline_stages(pp, L, layer, first, last, stack)
        whole_vocab = padded_vocab_size(vocab_size, self.make_vocab_size_divisible_by)
        whole = L * block_params(block, 1) + whole_vocab * h + (self.max_position_embeddings + self.num_tokentypes) * h \
            + head_params - (vocab // tp if lm else 0) + (whole_vocab if lm else 0)
        return {"params": whole, "flops_per_token": training_flops_per_token(block, vocab, s), "stages": stages}


@define(kw_only=True, slots=False)
class ClassifierMLPKeys:
    """NeMo's MLP head instead of Megatron-LM's (sequence and token classification, question
    answering): what NeMo's `classifier_head` / `head` / `token_classifier` sections build."""

    classifier_layers: Optional[int] = key(None,
            help="NeMo's MLP head (`classifier.mlp.layer*`) of this many linear layers; unset: Megatron-LM's head (pooler + one layer for sequences)")
    classifier_activation: str = key("relu",
            help="with classifier_layers: between its layers (relu, tanh, sigmoid, selu: NeMo's torch functions)")
    classifier_dropout: Optional[float] = key(None,
            help="with classifier_layers: on the head's input; unset: hidden_dropout")
    classifier_log_softmax: bool = key(False,
            help="with classifier_layers: log-probabilities instead of logits (NeMo's log_softmax)")


@define(kw_only=True)
class BertConfig(BertEncoderConfig):
    """`bert`: masked LM + binary head, and the keys of its pretraining samples."""

    name: str = "bert"
    add_binary_head: bool = key(True,
            help="pooler + binary head and sentence-pair samples; false: masked LM only, single segments")
    binary_head: Literal["sop", "nsp"] = key("sop",
            help="sentence-order prediction (Megatron-LM) or next-sentence prediction (BERT)")
    masked_lm_prob: float = key(0.15, help="share of tokens predicted (80% [MASK], 10% random, 10% kept)")
    short_seq_prob: float = key(0.1, help="share of samples with a shorter random target length")
    max_predictions_per_seq: Optional[int] = key(None,
            help="cap on predicted tokens; None: masked_lm_prob x target length")
    whole_word_masking: bool = key(True, help="mask every piece of a word together")

    def objective(self):
        """BertObjective samples: sentence pairs with the binary head, single segments without."""
        return self._samples(self.binary_head if self.add_binary_head else None)

    def _samples(self, binary_head):
        return BertObjective(binary_head=binary_head, masked_lm_prob=self.masked_lm_prob,
                             short_seq_prob=self.short_seq_prob, max_predictions_per_seq=self.max_predictions_per_seq,
                             whole_word_masking=self.whole_word_masking)


@define(kw_only=True)
class BertMaskedLMConfig(BertConfig):
    """`bert_masked_lm`: the LM head only, trained on single-segment masked samples
    (`add_binary_head` and `binary_head` are not used)."""

    name: str = "bert_masked_lm"

    def objective(self):
        return self._samples(None)


@define(kw_only=True)
class BertNextSentenceConfig(BertConfig):
    """`bert_next_sentence`: pooler + binary head only, on sentence pairs (`add_binary_head` not used)."""

    name: str = "bert_next_sentence"

    def objective(self):
        return self._samples(self.binary_head)


@define(kw_only=True)
class BertCausalLMConfig(BertEncoderConfig):
    """`bert_causal_lm`: the encoder under a causal mask, trained on next-token samples."""

    name: str = "bert_causal_lm"

    def objective(self):
        return SampleObjective()


@define(kw_only=True)
class BertSequenceClassificationConfig(ClassifierMLPKeys, BertEncoderConfig):
    """`bert_sequence_classification`: pooled output -> dropout -> `classification_head`; with
    `classifier_layers`, NeMo's: the first token's hidden state -> dropout -> `classifier` (no pooler)."""

    name: str = "bert_sequence_classification"
    num_labels: int = key(2, help="classes (1: regression)")

    def objective(self):
        return SampleObjective("sequence_classification")


@define(kw_only=True)
class BertMultipleChoiceConfig(BertEncoderConfig):
    """`bert_multiple_choice`: each choice's pooled output -> dropout -> one logit (`multichoice_head`)."""

    name: str = "bert_multiple_choice"

    def objective(self):
        return SampleObjective("multiple_choice")


@define(kw_only=True)
class BertTokenClassificationConfig(ClassifierMLPKeys, BertEncoderConfig):
    """`bert_token_classification`: each token's hidden state -> dropout -> `token_classification_head`
    (`classifier`, NeMo's MLP, with `classifier_layers`)."""

    name: str = "bert_token_classification"
    num_labels: int = key(2, help="classes per token")

    def objective(self):
        return SampleObjective("token_classification")


@define(kw_only=True)
class BertQuestionAnsweringConfig(ClassifierMLPKeys, BertEncoderConfig):
    """`bert_question_answering`: start and end logits per token (`qa_head`, [2, hidden]; with
    `classifier_layers`, NeMo's `classifier`: dropout, its MLP to 2 outputs)."""

    name: str = "bert_question_answering"

    def objective(self):
        return SampleObjective("question_answering")


# model name -> the task its BertModel is built for
TASKS = {
    "bert": "pretraining",
    "bert_masked_lm": "masked_lm",
    "bert_causal_lm": "causal_lm",
    "bert_next_sentence": "next_sentence",
    "bert_sequence_classification": "sequence_classification",
    "bert_multiple_choice": "multiple_choice",
    "bert_token_classification": "token_classification",
    "bert_question_answering": "question_answering",
}


def check_config(cfg: BertEncoderConfig) -> None:
    """The blocks' shape (mega.plugins.models.transformer.check_shape) and BERT's own keys."""
    check_shape(BlockConfig.of(cfg), cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size)
    for name in ("make_vocab_size_divisible_by", "max_position_embeddings"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"model.{name}: must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_position_embeddings < cfg.seq_length:
        raise ConfigError(f"model.max_position_embeddings={cfg.max_position_embeddings} is smaller than model.seq_length={cfg.seq_length}")
    if cfg.num_tokentypes < 0:
        raise ConfigError(f"model.num_tokentypes: must be at least 0, got {cfg.num_tokentypes}")
    if cfg.lm_head_activation not in ACTIVATIONS:
        raise ConfigError(f"model.lm_head_activation: expected one of {', '.join(map(repr, ACTIVATIONS))}, got {cfg.lm_head_activation!r}")
    if isinstance(cfg, BertConfig):  # the pretraining samples' keys
        if cfg.binary_head not in ("sop", "nsp"):
            raise ConfigError(f"model.binary_head: expected 'sop' or 'nsp', got {cfg.binary_head!r}")
        if not 0.0 < cfg.masked_lm_prob < 1.0:
            raise ConfigError(f"model.masked_lm_prob: must be in (0, 1), got {cfg.masked_lm_prob}")
        if not 0.0 <= cfg.short_seq_prob <= 1.0:
            raise ConfigError(f"model.short_seq_prob: must be in [0, 1], got {cfg.short_seq_prob}")
        if cfg.max_predictions_per_seq is not None and cfg.max_predictions_per_seq < 1:
            raise ConfigError(f"model.max_predictions_per_seq: must be at least 1, got {cfg.max_predictions_per_seq}")
    if getattr(cfg, "num_labels", 1) < 1:
        raise ConfigError(f"model.num_labels: must be at least 1, got {cfg.num_labels}")
    if isinstance(cfg, ClassifierMLPKeys) and cfg.classifier_layers is not None:
        if cfg.classifier_layers < 1:
            raise ConfigError(f"model.classifier_layers: must be at least 1, got {cfg.classifier_layers}")
        if cfg.classifier_activation not in MLP_ACTIVATIONS:
            raise ConfigError(f"model.classifier_activation: expected one of {', '.join(map(repr, MLP_ACTIVATIONS))},"
                              f" got {cfg.classifier_activation!r}")
    check_recompute(cfg, "model", cfg.num_layers // cfg.pipeline_model_parallel_size)
    check_sequence_parallel(cfg, {"model.seq_length": cfg.seq_length})


class BertEmbedding(Embedding):
    """Word (vocab-parallel) + position + token-type embeddings, then dropout; no LayerNorm
    (Megatron's `language_model.embedding` with `num_tokentypes`)."""

    def __init__(self, vocab: int, cfg: BlockConfig, max_positions: int, num_tokentypes: int):
        super().__init__(vocab, cfg, max_positions)
        self.tokentype_embeddings = None
        if num_tokentypes:
            self.tokentype_embeddings = nn.Embedding(num_tokentypes, cfg.hidden_size)
            cfg.init_method(self.tokentype_embeddings.weight.data)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                tokentype_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.word_embeddings(tokens) + self.position_embeddings(position_ids)
        if self.tokentype_embeddings is not None:
            x = x + (self.tokentype_embeddings(tokentype_ids) if tokentype_ids is not None
                     else self.tokentype_embeddings.weight[0])
        return self.dropout_out(x)


class BertLanguageModel(nn.Module):
    """Megatron's `language_model`: embedding (first pipeline stage), the `encoder` (this
    stage's layers; the final LayerNorm on the last stage) and the `pooler` (last stage)."""

    def __init__(self, cfg: BertEncoderConfig, vocab: int, pooler: bool):
        super().__init__()
        st = current()
        block = BlockConfig.of(cfg)
        embedding = BertEmbedding(vocab, block, cfg.max_position_embeddings, cfg.num_tokentypes)
        self.embedding = embedding if st.is_first_stage else None
        # The last stage's copy of the tied word embedding starts from the same values.
        self.head_weight_init = embedding.word_embeddings.weight.detach() if not st.is_first_stage else None
        per_stage = cfg.num_layers // st.pp_size
        self.encoder = TransformerStack(block, keep=range(st.pp_rank * per_stage, (st.pp_rank + 1) * per_stage),
                                        final_layernorm=st.is_last_stage)
        # built on every stage so that each stage draws the same weights as one process
        pool = Pooler(block) if pooler else None
        self.pooler = pool if st.is_last_stage else None


class BertModel(TiedWordEmbeddingStages, nn.Module):
    """The encoder with the heads of `task` (a value of TASKS)."""

    def __init__(self, cfg: BertEncoderConfig, vocab_size: int, task: str = "pretraining"):
        super().__init__()
        check_config(cfg)
        st = current()
        self.config, self.task = cfg, task
        self.vocab_size = vocab_size  # the tokenizer's; logits beyond it are padding
        self.padded_vocab_size = padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, st.tp_size)
        self.max_positions = cfg.max_position_embeddings
        self.pre_process, self.post_process = st.is_first_stage, st.is_last_stage
        block = BlockConfig.of(cfg)
        binary = task == "next_sentence" or (task == "pretraining" and cfg.add_binary_head)
        self.has_lm_head = task in ("pretraining", "masked_lm", "causal_lm")
        self.causal = task == "causal_lm"
        # NeMo's MLP head (ClassifierMLPKeys): on the first token's hidden state, no pooler
        mlp = getattr(cfg, "classifier_layers", None)
        self.mlp_head = mlp is not None and task in ("sequence_classification", "token_classification",
                                                     "question_answering")
        pooler = binary or (task == "sequence_classification" and not self.mlp_head) or task == "multiple_choice"
        self.language_model = BertLanguageModel(cfg, self.padded_vocab_size, pooler)
        heads = {}  # built on every stage (same random stream as one process), kept on the last
        if self.has_lm_head:
            heads["lm_head"] = BertLMHead(block, self.padded_vocab_size, cfg.lm_head_activation)
        if binary:
            heads["binary_head"] = linear(block, cfg.hidden_size, 2)
        if self.mlp_head:
            heads["classifier"] = ClassifierMLP(block, cfg.hidden_size, 2 if task == "question_answering" else cfg.num_labels,
                                                mlp, cfg.classifier_activation, cfg.classifier_log_softmax)
        elif task == "sequence_classification":
            heads["classification_head"] = linear(block, cfg.hidden_size, cfg.num_labels)
        elif task == "multiple_choice":
            heads["multichoice_head"] = linear(block, cfg.hidden_size, 1)
        elif task == "token_classification":
            heads["token_classification_head"] = linear(block, cfg.hidden_size, cfg.num_labels)
        elif task == "question_answering":
            heads["qa_head"] = linear(block, cfg.hidden_size, 2)
        for name, module in heads.items():
            setattr(self, name, module if self.post_process else None)
        dropout = getattr(cfg, "classifier_dropout", None) if self.mlp_head else None
        self.classifier_dropout = nn.Dropout(cfg.hidden_dropout if dropout is None else dropout)
        self.eager_reason = eager_reason(cfg)  # trainer.compile leaves the step eager with these keys on
        # Heads without a decoder keep the last stage's copy of the word embedding too, so
        # every pipeline has the same tied pair.
        self.finish_stages()

    # --- pieces (shared_embedding_or_output_weight: TiedWordEmbeddingStages) -----------------
    def _flat(self, batch: Dict[str, torch.Tensor], key: str) -> Optional[torch.Tensor]:
        """`batch[key]` as [samples, seq] (multiple choice flattens [b, choices, s])."""
        t = batch.get(key)
        return None if t is None else t.reshape(-1, t.shape[-1])

    def _key_mask(self, batch) -> Optional[torch.Tensor]:
        """The padding mask, always passed (as Megatron and Hugging Face do): asking whether a
        batch has padding reads the mask on the host (a wait for the device every
        micro-batch, a graph break under torch.compile)."""
        mask = self._flat(batch, "padding_mask")
        return None if mask is None else mask.bool()

    def _embed(self, batch) -> torch.Tensor:
        tokens = self._flat(batch, "tokens")
        s = tokens.shape[1]
        if s > self.max_positions:
            raise ValueError(f"sequence of {s} tokens exceeds max_position_embeddings {self.max_positions}")
        positions = torch.arange(s, device=tokens.device).unsqueeze(0)
        return self.language_model.embedding(tokens, positions, self._flat(batch, "tokentype_ids"))

    def _encode(self, batch, hidden: Optional[torch.Tensor]) -> torch.Tensor:
        """This stage's layers; on the last stage the whole sequence (gathered from the
        sequence-parallel slices, once, before the heads, which every rank runs whole)."""
        if self.pre_process:
            hidden = self._embed(batch)
        h = self.language_model.encoder(hidden, key_mask=self._key_mask(batch), causal=self.causal)
        if self.post_process and sequence_parallel_active(self.config.sequence_parallel):
            h = gather_from_sp(h, reduce_grads=False)  # the heads' gradient is whole on every rank
        return h

    def _outputs(self, batch, h: torch.Tensor, full_logits: bool) -> Dict[str, torch.Tensor]:
        """Head outputs from the final hidden states `h` [samples, s, H]; the LM logits only
        with `full_logits` (the loss computes them at the predicted positions only)."""
        out: Dict[str, torch.Tensor] = {"last_hidden_state": h}
        pooled = self.language_model.pooler(h) if self.language_model.pooler is not None else None
        if pooled is not None:
            out["pooler_output"] = pooled
        if self.has_lm_head and full_logits:
            out["lm_logits"] = self.lm_head(h, self.shared_embedding_or_output_weight())
        if getattr(self, "binary_head", None) is not None:
            out["binary_logits"] = self.binary_head(pooled)
        if self.mlp_head:  # NeMo's: dropout, then the MLP on the first token (sequences) or every token
            x = self.classifier_dropout(h[:, 0] if self.task == "sequence_classification" else h)
            if self.task == "question_answering":
                out["start_logits"], out["end_logits"] = self.classifier(x).unbind(-1)
            else:
                out["logits"] = self.classifier(x)
        elif self.task == "sequence_classification":
            out["logits"] = self.classification_head(self.classifier_dropout(pooled))
        elif self.task == "multiple_choice":
            out["logits"] = self.multichoice_head(self.classifier_dropout(pooled)).view(batch["tokens"].shape[:-1])
        elif self.task == "token_classification":
            out["logits"] = self.token_classification_head(self.classifier_dropout(h))
        elif self.task == "question_answering":
            start, end = self.qa_head(h).unbind(-1)
            out["start_logits"], out["end_logits"] = start, end
        return out

    # --- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """What the matching Hugging Face MegatronBert* class returns (prediction_logits and
        seq_relationship_logits; logits; start_logits and end_logits), plus
        `last_hidden_state` and `pooler_output`. Vocabulary logits are gathered over
        tensor-parallel ranks and cover the padded vocabulary. Needs the whole model (under
        pipeline parallelism each stage runs `stage_logits`)."""
        if not (self.pre_process and self.post_process):
            raise ValueError("logits() needs the whole model; under pipeline parallelism use stage_logits()")
        return self._stage_logits(batch, None)

    @torch.no_grad()
    def stage_logits(self, batch: Dict[str, torch.Tensor], hidden: Optional[torch.Tensor]):
        """This pipeline stage's part of `logits`, for inference under pipeline parallelism
        (as `stage_forward` is for training): embed (first stage) or take `hidden`, run the
        local layers; the last stage returns the outputs of `logits`, the others the hidden
        states for the next stage (a sequence-parallel slice, as `activation_shape` says)."""
        with sequence_parallel_region(self.config.sequence_parallel):
            return self._stage_logits(batch, hidden)

    def _stage_logits(self, batch, hidden):
        h = self._encode(batch, hidden)
        if not self.post_process:
            return h
        out = self._outputs(batch, h, full_logits=True)
        lm = out.pop("lm_logits", None)
        binary = out.pop("binary_logits", None)
        if self.task == "pretraining":
            out["prediction_logits"] = gather_from_tp(lm)
            if binary is not None:
                out["seq_relationship_logits"] = binary
        elif lm is not None:
            out["logits"] = gather_from_tp(lm)
        elif binary is not None:
            out["logits"] = binary
        return out

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.logits(batch)

    # --- training ----------------------------------------------------------------------------
    def training_loss(self, batch: Dict[str, torch.Tensor]):
        """The kernel's model contract (mega.protocols.LossOutput): token-loss sums over
        `loss_mask` and per-sample loss sums, with their terms."""
        return self.stage_forward(batch, None)

    def stage_forward(self, batch: Dict[str, torch.Tensor], hidden: Optional[torch.Tensor]):
        """This pipeline stage's part: embed (first stage) or take `hidden`, run the local
        layers, and on the last stage return the loss dict; else the hidden states (this
        rank's slice of the sequence under `model.sequence_parallel`)."""
        with sequence_parallel_region(self.config.sequence_parallel):
            return self._stage_forward(batch, hidden)

    def _stage_forward(self, batch, hidden):
        h = self._encode(batch, hidden)
        if not self.post_process:
            return h
        out = self._outputs(batch, h, full_logits=False)
        loss: Dict[str, object] = {"terms": {}, "sample_terms": {}}
        if self.has_lm_head:
            lm = masked_lm_loss(self.lm_head, self.shared_embedding_or_output_weight(), h, batch["labels"],
                                batch["loss_mask"], self.vocab_size if self.config.mask_padded_vocab else None,
                                batch.get("lm_positions"))
            loss["loss_sum"] = lm
            loss["terms"]["lm_loss"] = lm.detach()
        if "binary_logits" in out:
            b = binary_losses(out["binary_logits"], batch["is_random"])
            loss["sample_loss_sum"] = b["sum"]
            loss["sample_terms"].update({f"{self.config.binary_head}_loss": b["sum"].detach(), "binary_acc": b["right"]})
        weights = batch.get("loss_mask") if self.task == "sequence_classification" else None
        if weights is not None and weights.dim() == 1:  # per-sample class weights (bert_heads docstring)
            c = weighted_losses(out["logits"], batch["label"], batch["loss_mask"])
            loss["loss_sum"] = c["sum"]
            loss["terms"]["cls_loss"] = c["sum"].detach()
            loss["sample_terms"]["cls_acc"] = c["right"]
        elif self.task in ("sequence_classification", "multiple_choice"):
            c = classification_losses(out["logits"], batch["label"])
            loss["sample_loss_sum"] = c["sum"]
            loss["sample_terms"].update({"cls_loss": c["sum"].detach(), **({"cls_acc": c["right"]} if "right" in c else {})})
        elif self.task == "token_classification":
            logits, labels, mask = out["logits"], batch["labels"], batch["loss_mask"]
            where = mask.bool()
            losses = torch.nn.functional.cross_entropy(logits[where].float(), labels[where], reduction="none")
            weights = mask[where].to(losses.dtype)
            loss["loss_sum"] = (losses * weights).sum()
            loss["terms"]["tok_acc"] = ((logits[where].argmax(-1) == labels[where]).to(losses.dtype) * weights).sum()
        elif self.task == "question_answering":
            q = span_losses(out["start_logits"], out["end_logits"], batch["start_positions"], batch["end_positions"])
            loss["sample_loss_sum"] = q["sum"]
            loss["sample_terms"]["span_acc"] = q["right"]
        return loss

    def activation_shape(self, batch: Dict[str, torch.Tensor]) -> tuple:
        """Shape of the hidden states passed between pipeline stages ([b, s / TP, h] under
        sequence parallelism)."""
        tokens = batch["tokens"]
        s = tokens.shape[-1] // (current().tp_size if self.config.sequence_parallel else 1)
        return (tokens[..., 0].numel(), s, self.config.hidden_size)

    def flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs per token as GPT counts them (6 x matmul parameters including the
        vocabulary projection, plus attention), an upper bound: the LM head runs only at
        the predicted positions."""
        return training_flops_per_token(BlockConfig.of(self.config), self.padded_vocab_size, seq_length)


# --- registration ------------------------------------------------------------------------------

CONFIGS = {
    "bert": BertConfig,
    "bert_masked_lm": BertMaskedLMConfig,
    "bert_causal_lm": BertCausalLMConfig,
    "bert_next_sentence": BertNextSentenceConfig,
    "bert_sequence_classification": BertSequenceClassificationConfig,
    "bert_multiple_choice": BertMultipleChoiceConfig,
    "bert_token_classification": BertTokenClassificationConfig,
    "bert_question_answering": BertQuestionAnsweringConfig,
}


def build_bert(config: BertEncoderConfig, tokenizer, plugins=None) -> BertModel:
    return BertModel(config, tokenizer.vocab_size, TASKS[config.name])


@mega.hookimpl
def register_models(register):
    for name, config in CONFIGS.items():
        register(name, build_bert, config=config)


@mega.hookimpl
def register_model_converters(register):
    """Megatron-BERT's Hugging Face (MegatronBert*), Megatron-LM and megatron-core mappings
    (mega.plugins.models.bert_interop), for every BERT model name."""
    from mega.plugins.models.bert_interop import BertInterop

    for name in CONFIGS:
        register(name, BertInterop)
