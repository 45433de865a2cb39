"""Adaptive buckets a training step does not reach are left alone, as in NVIDIA's
Transformer-XL: it sets every `.grad` to None before a step, a bucket no token falls in
gets none, and its LAMB skips `p.grad is None`, so the bucket's weights and moments stay
as they were. mega gives such buckets zero gradients (DDP needs every parameter), which
LAMB's momentum would still apply; the model records which buckets were computed
(`mega.protocols.SparselyReached`) and the training loop drops the others' gradients.
Checked through the kernel's train_step (fp32 and model.megatron_amp_O2) and over two
data-parallel ranks."""
from __future__ import annotations

import pytest
import torch

from mega.plugins.models.transformer_xl import TransformerXLConfig, TransformerXLModel
from mega.runtime.unreached import unreached_parameters
from mega.training.loop import train_step
from mega.training.run import build_run
from mega.testing import run_ranks
from tests.helpers.txl import txl_config


def tiny(**kw) -> TransformerXLConfig:
    base = dict(n_layer=1, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, dropatt=0.0, tgt_len=6, mem_len=6,
                cutoffs=[20, 50, 80], div_val=2, d_embed=16, global_batch_size=2, micro_batch_size=2)
    base.update(kw)
    return TransformerXLConfig(**base)


def _names(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def test_the_sparse_parameters_are_the_buckets_a_batch_can_miss():
    model = TransformerXLModel(tiny(), 100)
    assert _names(model, model.sparse_parameters()) == [
        "word_emb.emb_projs.0", "word_emb.emb_layers.1.weight", "word_emb.emb_projs.1", "word_emb.emb_layers.2.weight",
        "word_emb.emb_projs.2", "word_emb.emb_layers.3.weight", "word_emb.emb_projs.3", "crit.out_layers_biases.1",
        "crit.out_layers_biases.2", "crit.out_layers_biases.3"]  # table 0 is tied to the head, always computed
    untied = TransformerXLModel(tiny(div_val=1, d_embed=8, tie_weight=False, tie_projs=[False] * 4), 100)
    assert _names(untied, untied.sparse_parameters()) == ["crit.out_projs.1", "crit.out_projs.2", "crit.out_projs.3"]
    assert TransformerXLModel(tiny(div_val=1), 100).sparse_parameters() == []  # one table, sliced: always reached
    # nothing recorded (no forward with gradients since the last call): nothing is dropped
    assert model.take_reached() == [True] * 10
    with torch.no_grad():
        model.crit.nll(model.hidden(torch.randint(0, 20, (6, 2)))[0].reshape(-1, 16), torch.randint(0, 20, (12,)))
    assert model.take_reached() == [True] * 10


def test_reached_flags_follow_the_tokens_of_the_forwards_since_the_last_step():
    model = TransformerXLModel(tiny(), 100)
    for tokens, targets in ((torch.tensor([0, 1, 2, 3, 25, 26]), torch.arange(6)), (torch.arange(6), torch.tensor([1, 2, 3, 4, 5, 60]))):
        h, _ = model.hidden(tokens[:, None])
        model.crit.nll(h.reshape(-1, 16), targets).sum().backward()
    names = _names(model, model.sparse_parameters())
    reached = dict(zip(names, model.take_reached()))
    assert [n for n, r in reached.items() if r] == ["word_emb.emb_projs.0", "word_emb.emb_layers.1.weight",
                                                     "word_emb.emb_projs.1", "word_emb.emb_layers.2.weight",
                                                     "word_emb.emb_projs.2", "crit.out_layers_biases.2"]
    assert model.take_reached() == [True] * len(names)  # the record started afresh


def _samples(vocab: int, low: int, seq: int = 16):
    """Step 0: ids over the whole vocabulary; step 1: ids below `low` only (bucket 0)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(8):
        ids = torch.randint(0, vocab if i < 4 else low, (seq + 1,), generator=g)
        out.append({"tokens": ids[:-1], "labels": ids[1:], "loss_mask": torch.ones(seq), "stream": torch.tensor(i % 4)})
    return out


@pytest.mark.parametrize("layout", ["fp32", "o2", pytest.param("compiled", marks=pytest.mark.slow)])
def test_a_bucket_the_step_does_not_reach_keeps_its_weights_and_lamb_state(tmp_path, corpus, plugins, layout,
                                                                           monkeypatch):
    """Also under torch.compile (the default on CUDA), whose traced forwards must still
    record the buckets they compute. What is checked is dynamo's and AOTAutograd's tracing,
    so the compiled case runs the `aot_eager` backend (inductor's C++ build of this model
    took 75-120 s on 2 cores; tests/models/test_compile.py builds a real inductor step)."""
    if layout == "compiled":
        import functools

        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    extra = {"fp32": [], "o2": ["trainer.precision=bf16", "model.megatron_amp_O2=true"],
             "compiled": ["trainer.compile=true"]}[layout]
    run = build_run(txl_config(tmp_path, corpus, plugins, ["model.dropout=0.0", "model.dropatt=0.0"] + extra), plugins)
    run.train_data = _samples(run.tokenizer.vocab_size, 64)  # cutoffs 64, 128: step 1 stays in bucket 0
    run.step = 0
    train_step(run)
    run.step = 1
    model_params = dict(run.model.named_parameters())
    main = run.main_params
    stepped = {n: (main.to_main[id(p)] if main is not None else p) for n, p in model_params.items()}
    before = {n: p.detach().clone() for n, p in stepped.items()}
    state = {n: {k: v.clone() for k, v in run.optimizer.state[p].items()} for n, p in stepped.items()}
    assert len(state["word_emb.emb_layers.2.weight"]) == 3  # step 0 reached every bucket
    train_step(run)
    unreached = {"word_emb.emb_layers.1.weight", "word_emb.emb_projs.1", "word_emb.emb_layers.2.weight",
                 "word_emb.emb_projs.2", "crit.out_layers_biases.1", "crit.out_layers_biases.2"}
    for name, p in stepped.items():
        moved = not torch.equal(p.detach(), before[name])
        assert moved == (name not in unreached), name
        for k, v in run.optimizer.state[p].items():
            assert torch.equal(v, state[name][k]) == (name in unreached), (name, k)
    if layout == "compiled":
        assert not run.loss_module.fallen_back  # the steps ran compiled, not eagerly


def _two_ranks(parallel, reach_on):
    torch.manual_seed(0)
    model = TransformerXLModel(tiny(), 100)
    tokens = torch.arange(6) if parallel.dp_rank not in reach_on else torch.tensor([0, 1, 2, 3, 4, 90])
    h, _ = model.hidden(tokens[:, None])
    model.crit.nll(h.reshape(-1, 16), torch.arange(6)).sum().backward()
    return _names(model, unreached_parameters(model, parallel, torch.device("cpu")))


@pytest.mark.slow
def test_a_bucket_one_data_parallel_rank_reaches_is_reached_on_every_rank():
    bucket3 = ["word_emb.emb_layers.3.weight", "word_emb.emb_projs.3"]
    for reach_on, expected in (((0,), []), ((), bucket3)):
        ranks = run_ranks(_two_ranks, world=2, args=(reach_on,))
        assert all(set(bucket3) & set(r) == set(expected) for r in ranks), ranks
        assert ranks[0] == ranks[1]


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_a_tensor_unreached_before_it_has_state_gets_state_that_starts_like_none(optimizer):
    """`KeepUnreached` (the device-side skip): a tensor the first step does not reach keeps
    its weights, and the zeros and step 0 it is left with make the next step's update equal
    to the one of a tensor the optimizer never saw (the reference: no state at all)."""
    from mega.plugins.optim.lamb import Lamb
    from mega.runtime.unreached import KeepUnreached

    def make():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(2)]
        opt = torch.optim.AdamW(ps, lr=0.1) if optimizer == "adamw" else Lamb(ps, lr=0.1, weight_decay=0.01)
        return ps, opt

    ps, opt = make()
    ref, ref_opt = make()
    w1 = ps[1].detach().clone()
    for p, r in zip(ps, ref):
        p.grad, r.grad = torch.ones(3, 4), torch.ones(3, 4)
    ps[1].grad.zero_()
    ref[1].grad = None  # the reference drops it
    with KeepUnreached(ps, torch.tensor([True, False]), opt):
        opt.step()
    ref_opt.step()
    assert torch.equal(ps[1], w1) and torch.equal(ps[0], ref[0])
    assert float(opt.state[ps[1]]["step"]) == 0 and not opt.state[ps[1]]["exp_avg"].any()
    for p, r in zip(ps, ref):
        p.grad, r.grad = torch.full((3, 4), 0.5), torch.full((3, 4), 0.5)
    opt.step()
    ref_opt.step()
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p, r, rtol=0, atol=0)
