"""The schedules of `mega.runtime.pipeline` called directly, with no training run: the plain
schedule gives the token mean of the whole batch however it is cut into micro-batches, and
1F1B over two gloo ranks gives the plain schedule's loss, terms and gradients."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mega.testing import run_ranks

VOCAB, HIDDEN, SEQ = 11, 8, 5


class TwoStages(torch.nn.Module):
    """Stage 0 embeds and mixes tokens; stage 1 (the last) returns the training_loss dict.
    `stage=None` runs both, as a model without pipelining does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.mix = torch.nn.Linear(HIDDEN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)

    def forward_step(self, stage=None):
        def step(batch, hidden):
            if stage != 1:
                hidden = torch.tanh(self.mix(self.embed(batch["tokens"])))
                if stage == 0:
                    return hidden
            mask = batch["loss_mask"].flatten()
            token_loss = F.cross_entropy(self.head(hidden).flatten(0, 1), batch["labels"].flatten(), reduction="none")
            square = hidden.pow(2).sum(-1).flatten()
            return {"loss_sum": (token_loss * mask).sum(), "terms": {"sq": (square * mask).sum()}}
        return step


def _batch():
    """Four sequences with unequal numbers of loss-bearing tokens (so a mean of per-micro-batch
    means would differ from the token mean)."""
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(4, SEQ)
    mask[0, 2:] = 0
    mask[3, 4:] = 0
    return {"tokens": torch.randint(0, VOCAB, (4, SEQ), generator=g),
            "labels": torch.randint(0, VOCAB, (4, SEQ), generator=g), "loss_mask": mask}


def _cut(batch, n):
    return [{k: v.chunk(n)[i] for k, v in batch.items()} for i in range(n)]


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _whole_batch_reference():
    """A hand-written step: the whole batch at once, loss = token-loss sum / tokens."""
    model, batch = TwoStages(), _batch()
    out = model.forward_step()(batch, None)
    loss = out["loss_sum"] / batch["loss_mask"].sum()
    loss.backward()
    return loss.detach(), out["terms"]["sq"].detach() / batch["loss_mask"].sum(), _grads(model)


@pytest.mark.parametrize("n_micro", [1, 2, 4])
def test_plain_schedule_is_the_token_mean_of_the_whole_batch(n_micro):
    from mega.runtime.pipeline import forward_backward_no_pipelining

    ref_loss, ref_sq, ref_grads = _whole_batch_reference()
    model, batch = TwoStages(), _batch()
    loss, terms = forward_backward_no_pipelining(model.forward_step(), _cut(batch, n_micro), batch["loss_mask"].sum(),
                                                 loss_scale=8.0)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(terms["sq"], ref_sq)
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():  # the loss scale multiplies gradients, never the reported loss
        torch.testing.assert_close(g, 8.0 * ref_grads[name], msg=name)


def test_forward_only_leaves_gradients_alone():
    from mega.runtime.pipeline import forward_backward_no_pipelining

    ref_loss, _, _ = _whole_batch_reference()
    model, batch = TwoStages(), _batch()
    with torch.no_grad():
        loss, _ = forward_backward_no_pipelining(model.forward_step(), _cut(batch, 2), batch["loss_mask"].sum(),
                                                 forward_only=True)
    torch.testing.assert_close(loss, ref_loss)
    assert _grads(model) == {}


def _pipelined(state):
    """This stage's (loss, terms, gradients) after 1F1B, and the forward-only loss."""
    from mega.runtime.pipeline import forward_backward_pipelining

    model, batch = TwoStages(), _batch()
    kwargs = {"parallel": state, "device": torch.device("cpu"), "tensor_shape": (1, SEQ, HIDDEN), "loss_scale": 8.0}
    loss, terms = forward_backward_pipelining(model.forward_step(state.pp_rank), _cut(batch, 4),
                                              batch["loss_mask"].sum(), **kwargs)
    grads = _grads(model)
    with torch.no_grad():
        val_loss, _ = forward_backward_pipelining(model.forward_step(state.pp_rank), _cut(batch, 4),
                                                  batch["loss_mask"].sum(), **{**kwargs, "forward_only": True})
    return loss, terms, grads, val_loss


@pytest.mark.slow
def test_one_f_one_b_on_two_stages_equals_the_plain_schedule():
    from mega.runtime.pipeline import forward_backward_no_pipelining

    model, batch = TwoStages(), _batch()
    ref_loss, ref_terms = forward_backward_no_pipelining(model.forward_step(), _cut(batch, 4), batch["loss_mask"].sum(),
                                                         loss_scale=8.0)
    ref_grads = _grads(model)
    stages = run_ranks(_pipelined, world=2, pp=2, timeout=120)
    for loss, terms, _, val_loss in stages:  # every stage reports the last stage's numbers
        assert torch.equal(loss, ref_loss) and torch.equal(val_loss, ref_loss)
        assert terms.keys() == ref_terms.keys() and torch.equal(terms["sq"], ref_terms["sq"])
    assert set(stages[0][2]) == {"embed.weight", "mix.weight", "mix.bias"}
    assert set(stages[1][2]) == {"head.weight", "head.bias"}
    for _, _, grads, _ in stages:
        for name, g in grads.items():
            assert torch.equal(g, ref_grads[name]), name


def test_the_runtime_does_not_import_the_training_package():
    """Schedules take what they need as arguments; the training loop depends on the runtime,
    never the other way round."""
    runtime = Path(__file__).resolve().parents[1] / "kernel" / "runtime"
    for path in runtime.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("mega.training") for n in names), path.name
