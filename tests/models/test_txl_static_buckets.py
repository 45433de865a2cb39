"""Transformer-XL's adaptive embedding and softmax with fixed shapes (issue 24): every
bucket computed on every row and each row keeping its own bucket's value (`torch.where`),
instead of the rows `nonzero` finds. No data-dependent shape is left for a CUDA graph to
refuse and no host sync; losses and gradients equal the sparse path's, to rounding (fp64
1e-12, fp32 1e-6), and the reached-bucket record is the same."""
from __future__ import annotations

import pytest
import torch

from mega.plugins.models.adaptive_softmax import use_static_shapes
from mega.plugins.models.transformer_xl import TransformerXLConfig, TransformerXLModel
from mega.testing import count_host_syncs


def tiny(**kw) -> TransformerXLConfig:
    base = dict(n_layer=1, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, dropatt=0.0, tgt_len=6, mem_len=6,
                cutoffs=[20, 50, 80], div_val=2, d_embed=16, global_batch_size=2, micro_batch_size=2)
    base.update(kw)
    return TransformerXLConfig(**base)


def _loss_and_grads(model, tokens, targets, static):
    model.word_emb.static_shapes = model.crit.static_shapes = static
    model.zero_grad(set_to_none=True)
    h, _ = model.hidden(tokens)
    nll = model.crit.nll(h.reshape(-1, model.d_model), targets.reshape(-1))
    nll.sum().backward()
    reached = [bool(r) for r in model.take_reached()]
    return nll.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, reached


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("kw", [dict(div_val=2), dict(div_val=1), dict(div_val=1, d_embed=8, tie_weight=False, tie_projs=[False] * 4),
                                dict(div_val=2, tie_projs=[False] * 4)], ids=["div2", "div1", "div1-untied", "untied-projs"])
def test_static_buckets_give_the_sparse_paths_losses_gradients_and_reached_flags(dtype, tol, kw):
    torch.manual_seed(0)
    model = TransformerXLModel(tiny(**kw), 100).to(dtype)
    tokens = torch.tensor([[0, 1, 2, 25, 3, 4], [5, 26, 7, 8, 9, 10]]).t()  # buckets 0 and 1 in; 2 and 3 not
    targets = torch.tensor([[1, 2, 60, 3, 4, 5], [6, 7, 8, 9, 10, 11]]).t()  # 0 and 2 in
    nll_a, grads_a, reached_a = _loss_and_grads(model, tokens, targets, static=False)
    nll_b, grads_b, reached_b = _loss_and_grads(model, tokens, targets, static=True)
    torch.testing.assert_close(nll_b, nll_a, rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=tol, atol=tol, msg=name)
    assert reached_b == reached_a
    assert not all(reached_a) or kw == dict(div_val=1)  # (one table, tied: nothing a batch can miss)


def test_the_static_path_issues_no_host_sync():
    torch.manual_seed(0)
    model = TransformerXLModel(tiny(), 100)
    tokens, targets = torch.randint(0, 100, (6, 2)), torch.randint(0, 100, (12,))
    for static, expected in ((True, 0), (False, 8)):  # sparse: one `nonzero` per bucket, embedding and softmax
        model.word_emb.static_shapes = model.crit.static_shapes = static
        with count_host_syncs() as syncs:
            h, _ = model.hidden(tokens)
            model.crit.nll(h.reshape(-1, 16), targets).sum().backward()
        assert syncs.count == expected, syncs.summary()


def test_the_static_path_is_taken_under_compile_or_when_the_config_says():
    """model.adaptive_static_shapes: None (default) static under torch.compile only (eager
    keeps the sparse path: 1.6-3.9x cheaper at the WikiText-103 shapes, see
    benchmarks/bench_txl_buckets.py); true / false force it."""
    assert not use_static_shapes(None) and use_static_shapes(True) and not use_static_shapes(False)
    assert torch.compile(lambda x: x + use_static_shapes(None), backend="eager", fullgraph=True)(torch.zeros(())) == 1
    model = TransformerXLModel(tiny(adaptive_static_shapes=True), 100)
    assert model.word_emb.static_shapes is True and model.crit.static_shapes is True
    with torch.device("meta"):
        base = TransformerXLModel(tiny(d_model=512, d_embed=512, div_val=1, cutoffs=[19997, 39997, 199997]), 267735)
    assert base.crit.static_cost() == pytest.approx(13.39, abs=0.01)  # the tails' rows: 12x the head's
