"""Tensor parallelism against one process: each layer, the vocab-parallel cross entropy
and the whole GPT give the single-process numbers (fp32, gloo, 2 ranks)."""
from __future__ import annotations

import pytest
import torch

from tests.multiproc import run_ranks


def _gpt(vocab=50, dropout=0.0):
    from mega.config import config_from_dict
    from mega.plugins.models.gpt import GPTModel

    cfg = config_from_dict({"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
                                      "make_vocab_size_divisible_by": 16, "hidden_dropout": dropout,
                                      "attention_dropout": dropout}}).model
    torch.manual_seed(0)
    return GPTModel(cfg, vocab)


def _tp_gpt_forward_backward(state):
    """Logits, loss and the full (gathered) gradients of a TP model on fixed data."""
    import torch.distributed as dist

    from mega.runtime.tensor_parallel import gather_from_tp

    model = _gpt()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (2, 16), generator=g)
    labels = torch.randint(0, 50, (2, 16), generator=g)
    mask = torch.ones(2, 16)
    logits = model(tokens)
    out = model.training_loss({"tokens": tokens, "labels": labels, "loss_mask": mask})
    out["loss_sum"].backward()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad
        if p.partition_dim is not None and state.tp_size > 1:
            parts = [torch.empty_like(grad) for _ in range(state.tp_size)]
            dist.all_gather(parts, grad.contiguous(), group=state.tp_group)
            grad = torch.cat(parts, dim=p.partition_dim)
        grads[name] = grad
    return logits.detach(), out["loss_sum"].item(), grads


@pytest.mark.slow
def test_gpt_tp2_equals_tp1():
    ref_logits, ref_loss, ref_grads = run_ranks(_tp_gpt_forward_backward, world=1)[0]
    results = run_ranks(_tp_gpt_forward_backward, world=2, tp=2)
    for logits, loss, grads in results:
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5, msg=k)


def _vocab_parallel_ce(state):
    from mega.runtime.tensor_parallel import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(3)
    full = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    target = torch.randint(0, 16, (3, 5), generator=g)
    local = full.chunk(state.tp_size, dim=-1)[state.tp_rank].clone().float().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target)
    (loss * torch.arange(15.0).view(3, 5)).sum().backward()
    return loss.detach(), local.grad


def test_vocab_parallel_cross_entropy_equals_the_formula():
    g = torch.Generator().manual_seed(3)
    full = torch.randn(3, 5, 16, generator=g, dtype=torch.float64).requires_grad_()
    target = torch.randint(0, 16, (3, 5), generator=g)
    ref = -full.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    (ref * torch.arange(15.0, dtype=torch.float64).view(3, 5)).sum().backward()
    for rank, (loss, grad) in enumerate(run_ranks(_vocab_parallel_ce, world=2, tp=2)):
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), full.grad.chunk(2, dim=-1)[rank], rtol=1e-5, atol=1e-6)


def _rank_layout(state):
    return (state.rank, state.tp_rank, state.dp_rank, state.pp_rank, state.pp_ranks)


def test_rank_order_is_megatrons():
    """TP ranks adjacent, then DP, then PP (world 8 would be too many processes for CI:
    4 ranks at TP=2, PP=2)."""
    layouts = run_ranks(_rank_layout, world=4, tp=2, pp=2)
    assert layouts == [(0, 0, 0, 0, (0, 2)), (1, 1, 0, 0, (1, 3)), (2, 0, 0, 1, (0, 2)), (3, 1, 0, 1, (1, 3))]


def test_sizes_that_do_not_divide_are_a_config_error():
    from mega.errors import ConfigError
    from mega.runtime.parallel import layout

    assert layout(8, 2, 2) == 2
    with pytest.raises(ConfigError, match="world size 6 is not divisible by model.tensor_model_parallel_size=4"):
        layout(6, 4, 1)
