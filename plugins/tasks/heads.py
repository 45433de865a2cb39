"""NeMo's head sections of a task's `model` table, which build NeMo's MLP heads.

A task trains Megatron-LM's head by default (docs/downstream.md). A NeMo config names its
head in a section of its own -- text classification's `model.classifier_head`, token
classification's `model.head`, question answering's `model.token_classifier` -- and a run
that sets the section gets that head, as NeMo 1.x builds it (read at NeMo v1.4.0:
`TokenClassifier`, `SequenceClassifier`, `MultiLayerPerceptron`): dropout on the encoder's
output, then a stack of linear layers with the activation between them, on every token or
on the first one (no pooler); keys left out take NeMo's example-config values. The head
model's keys it becomes are `classifier_layers`, `classifier_activation`,
`classifier_dropout`, `classifier_log_softmax` (mega.plugins.models.bert.ClassifierMLPKeys),
and a `.nemo` of such a model maps key for key.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from attrs import define

from mega.errors import ConfigError
from mega.plugins.tasks.nemo_keys import nemo_key

INIT = "mega draws head weights as Megatron-LM does: N(0, init_method_std), zero bias, NeMo's transformer init"


@define(kw_only=True)
class SequenceClassifierHead:
    """`model.classifier_head` (text classification, relation extraction): set, the head is
    NeMo's SequenceClassifier (relu between its layers) on the first token, no pooler."""

    num_output_layers: int = 2  # linear layers (NeMo's default 2)
    fc_dropout: float = 0.1  # dropout on the first token's hidden state


@define(kw_only=True)
class TokenClassifierHead:
    """`model.head` (token classification): set, the head is NeMo's TokenClassifier."""

    num_fc_layers: int = 2  # linear layers (NeMo's default 2)
    fc_dropout: float = 0.5  # dropout on each token's hidden state
    activation: str = "relu"  # between the layers (relu, tanh, sigmoid, selu)
    use_transformer_init: Optional[bool] = nemo_key(INIT, same=True)  # NeMo's: accepted; false (PyTorch's init) is not used


@define(kw_only=True)
class QuestionAnsweringHead:
    """`model.token_classifier` (question answering): set, the head is NeMo's TokenClassifier
    with 2 outputs per token (start, end)."""

    num_layers: int = 1  # linear layers (NeMo's default 1: the same map as mega's qa_head)
    dropout: float = 0.0  # dropout on each token's hidden state
    num_classes: int = 2  # must be 2: the start and end logits
    activation: str = "relu"  # between the layers (relu, tanh, sigmoid, selu)
    log_softmax: bool = False  # true: log-probabilities over (start, end) per token, NeMo's option
    use_transformer_init: Optional[bool] = nemo_key(INIT, same=True)  # NeMo's: accepted; false (PyTorch's init) is not used


def mlp_options(head, key: str) -> Dict[str, Any]:
    """The head model's keys for a NeMo head section (`key` names it in errors); {} unset."""
    if head is None:
        return {}
    if isinstance(head, SequenceClassifierHead):
        layers, dropout, activation, log_softmax = head.num_output_layers, head.fc_dropout, "relu", False
    elif isinstance(head, TokenClassifierHead):
        layers, dropout, activation, log_softmax = head.num_fc_layers, head.fc_dropout, head.activation, False
    else:
        if head.num_classes != 2:
            raise ConfigError(f"{key}.num_classes: question answering has 2 outputs per token (start, end), got"
                              f" {head.num_classes}")
        layers, dropout, activation, log_softmax = head.num_layers, head.dropout, head.activation, head.log_softmax
    return {"classifier_layers": layers, "classifier_dropout": dropout, "classifier_activation": activation,
            "classifier_log_softmax": log_softmax}
