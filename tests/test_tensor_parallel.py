"""Tensor parallelism against one process: each layer, the vocab-parallel cross entropy
and the whole GPT give the single-process numbers (fp32, gloo, 2 ranks)."""
from __future__ import annotations

import pytest
import torch

from mega.testing import full_grads, run_ranks


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
    model = _gpt()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (2, 16), generator=g)
    labels = torch.randint(0, 50, (2, 16), generator=g)
    mask = torch.ones(2, 16)
    logits = model(tokens)
    out = model.training_loss({"tokens": tokens, "labels": labels, "loss_mask": mask})
    out["loss_sum"].backward()
    grads = full_grads(model, state)
    return logits.detach(), out["loss_sum"].item(), grads


@pytest.mark.slow
def test_gpt_tp2_equals_tp1():
    ref_logits, ref_loss, ref_grads = _in_process(_tp_gpt_forward_backward)
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


def _masked_ce(state, vocab_sizes):
    """Losses and logit gradients of this rank's slice for each real vocabulary size, with
    the padded logits (ids >= vocab) set huge: they must not count."""
    from mega.runtime.tensor_parallel import vocab_parallel_cross_entropy

    out = []
    for vocab in vocab_sizes:
        full, target = _padded_logits(vocab)
        local = full.chunk(state.tp_size, dim=-1)[state.tp_rank].clone().float().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, vocab_size=vocab)
        (loss * torch.arange(15.0).view(3, 5)).sum().backward()
        out.append((loss.detach(), local.grad))
    return out


def _padded_logits(vocab):
    """Logits over a padded vocabulary of 16, huge (1e4) at the padded ids; targets real."""
    g = torch.Generator().manual_seed(vocab)
    full = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    full[..., vocab:] = 1e4
    return full, torch.randint(0, vocab, (3, 5), generator=g)


# 11: the padding is part of rank 1's slice at TP=2; 7: rank 1 holds padding only; 16: none
MASKED_VOCABS = (11, 7, 16)


def test_cross_entropy_leaves_the_padded_vocabulary_out_of_the_softmax():
    """The loss is -log softmax over the real ids only (float64 reference), at TP=1 and
    TP=2; padded logits, however large, get exactly zero gradient."""
    from mega.runtime.parallel import current

    assert current().tp_size == 1
    results = {1: [_masked_ce(current(), MASKED_VOCABS)], 2: run_ranks(_masked_ce, world=2, tp=2, args=(MASKED_VOCABS,))}
    for i, vocab in enumerate(MASKED_VOCABS):
        full, target = _padded_logits(vocab)
        real = full[..., :vocab].clone().requires_grad_()
        ref = -real.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        (ref * torch.arange(15.0, dtype=torch.float64).view(3, 5)).sum().backward()
        ref_grad = torch.cat([real.grad, torch.zeros(3, 5, 16 - vocab, dtype=torch.float64)], dim=-1)
        for tp, ranks in results.items():
            for rank, per_vocab in enumerate(ranks):
                loss, grad = per_vocab[i]
                assert torch.isfinite(loss).all() and loss.max() < 10, (tp, vocab)
                torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6, msg=f"TP={tp} vocab={vocab}")
                torch.testing.assert_close(grad.double(), ref_grad.chunk(tp, dim=-1)[rank], rtol=1e-5, atol=1e-6,
                                           msg=f"TP={tp} vocab={vocab} rank={rank}")
                padded = torch.arange(16).chunk(tp)[rank] >= vocab
                assert torch.count_nonzero(grad[..., padded]) == 0


def test_cross_entropy_without_vocab_size_keeps_the_padding_in_the_softmax():
    """No vocab_size (model.mask_padded_vocab = false): Megatron-LM's loss over every
    column, padded ones included."""
    from mega.runtime.tensor_parallel import vocab_parallel_cross_entropy

    full, target = _padded_logits(11)
    full[..., 11:] = 2.0
    ref = -full.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(vocab_parallel_cross_entropy(full.float(), target).double(), ref, rtol=1e-5, atol=1e-6)
    masked = vocab_parallel_cross_entropy(full.float(), target, vocab_size=11).double()
    assert (masked < ref).all()  # the padded ids no longer take probability mass


def _rank_layout(state):
    return (state.rank, state.tp_rank, state.dp_rank, state.pp_rank, state.pp_ranks)


def test_rank_order_is_megatrons(tp2_pp2_training):
    """TP ranks adjacent, then DP, then PP (world 8 would be too many processes for CI:
    4 ranks at TP=2, PP=2; read from the TP=2 x PP=2 training launch, which records each
    rank's layout before it trains)."""
    layouts = [layout for layout, _ in tp2_pp2_training]
    assert layouts == [(0, 0, 0, 0, (0, 2)), (1, 1, 0, 0, (1, 3)), (2, 0, 0, 1, (0, 2)), (3, 1, 0, 1, (1, 3))]


def test_rank_groups_for_eight_ranks():
    """Megatron's example layout: 8 ranks, TP=2, PP=2 -> DP=2."""
    from mega.runtime.parallel import rank_groups

    groups = {}
    for kind, members in rank_groups(tp=2, dp=2, pp=2):
        groups.setdefault(kind, []).append(members)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["embedding"] == groups["pp"]


def test_sizes_that_do_not_divide_are_a_config_error():
    from mega.errors import ConfigError
    from mega.runtime.parallel import layout

    assert layout(8, 2, 2) == 2
    with pytest.raises(ConfigError, match="world size 6 is not divisible by model.tensor_model_parallel_size=4"):
        layout(6, 4, 1)


def _pp_train(state, steps, micro, d):
    """Train a few steps through the real loop at this layout; the losses every rank saw."""
    from mega.config import config_from_dict
    from mega.training.loop import train_step
    from mega.training.run import build_run
    from mega.testing import write_corpus

    d = d / f"world{state.world_size}tp{state.tp_size}pp{state.pp_size}"
    corpus = d / "c.txt"
    if state.rank == 0:
        d.mkdir()
        write_corpus(corpus)
    state.barrier()
    cfg = config_from_dict({
        "trainer": {"devices": state.world_size, "max_steps": steps, "val_check_interval": 0, "gradient_clip_val": 0.5,
                    "accelerator": "cpu"},
        "exp_manager": {"exp_dir": str(d), "loggers": []},
        "model": {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
                  # 130: 258 byte ids pad to 260 at every TP size, so each layout draws the same initial weights
                  "micro_batch_size": 8 // micro, "global_batch_size": 8, "make_vocab_size_divisible_by": 130,
                  "hidden_dropout": 0.0, "attention_dropout": 0.0,
                  "tensor_model_parallel_size": state.tp_size, "pipeline_model_parallel_size": state.pp_size,
                  "tokenizer": {"library": "bytes"}, "data": {"data_prefix": [str(corpus)]}},
    })
    from mega.training.run_dir import unlock_run_dir

    run = build_run(cfg)
    losses = []
    for _ in range(steps):
        m = train_step(run)
        run.step += 1
        losses.append((float(m["loss"]), float(m["grad_norm"])))
    unlock_run_dir(run.run_dir)
    return losses


def _layout_and_pp_train(state, steps, micro, d):
    return _rank_layout(state), _pp_train(state, steps, micro, d)


@pytest.fixture(scope="module")
def pp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pp")


@pytest.fixture(scope="module")
def one_process_pp_reference(pp_dir):
    """The one-process losses every layout is compared with, computed once in this process
    (the same code at one rank; each parameter of the layout test used to start a process
    for it)."""
    from mega.runtime.parallel import current

    assert current().world_size == 1
    return _pp_train(current(), 4, 4, pp_dir)


@pytest.fixture(scope="module")
def tp2_pp2_training(pp_dir):
    """One launch of 4 ranks at TP=2 x PP=2: (layout, losses) of each rank."""
    return run_ranks(_layout_and_pp_train, world=4, tp=2, pp=2, args=(4, 4, pp_dir), timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("world,tp,pp", [(2, 1, 2), (4, 2, 2), (4, 1, 2)])
def test_pipeline_parallel_trains_like_one_process(request, pp_dir, one_process_pp_reference, world, tp, pp):
    """PP=2 (micro-batches through 1F1B), TP=2 x PP=2 and DP=2 x PP=2 give one process's per-step
    losses and clipped grad norms."""
    ref = one_process_pp_reference
    if (world, tp, pp) == (4, 2, 2):
        results = [losses for _, losses in request.getfixturevalue("tp2_pp2_training")]
    else:
        results = run_ranks(_pp_train, world=world, tp=tp, pp=pp, args=(4, 4, pp_dir), timeout=240)
    assert len(results) == world
    for losses in results:
        assert len(losses) == len(ref) == 4
        for (l0, g0), (l1, g1) in zip(ref, losses):
            assert l1 == pytest.approx(l0, rel=1e-5) and g1 == pytest.approx(g0, rel=1e-4)


def _layout_run(state, d, name, steps, model=None):
    """Build (resuming, resharding if needed) and train to `steps` at this layout; return
    the validation loss computed through this layout's forward path. `model`: keys over
    the defaults here (vocabulary multiple 130, so 258 byte ids pad to 260 at TP=1 and
    TP=2 alike and both layouts draw the same initial weights)."""
    from mega.config import config_from_dict
    from mega.training.loop import train, validate
    from mega.training.run import build_run
    from mega.testing import write_corpus

    corpus = d / "c.txt"
    if state.rank == 0 and not corpus.exists():
        write_corpus(corpus)
    state.barrier()
    cfg = config_from_dict({
        "trainer": {"devices": state.world_size, "max_steps": steps, "val_check_interval": 100, "limit_val_batches": 2,
                    "accelerator": "cpu"},
        "exp_manager": {"exp_dir": str(d), "name": name, "loggers": []},
        "model": {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
                  "micro_batch_size": 2, "global_batch_size": 4, "make_vocab_size_divisible_by": 130,
                  "hidden_dropout": 0.0, "attention_dropout": 0.0,
                  "tensor_model_parallel_size": state.tp_size, "pipeline_model_parallel_size": state.pp_size,
                  "tokenizer": {"library": "bytes"}, "data": {"data_prefix": [str(corpus)], "splits_string": "80,20,0"},
                  **(model or {})},
    })
    from mega.training.run_dir import unlock_run_dir

    run = build_run(cfg)
    try:
        train(run)
        return validate(run)["val_loss"]
    finally:  # as the end of a process would: the next run of this directory may be in this one
        unlock_run_dir(run.run_dir)


def _layout_runs(state, d, jobs):
    """_layout_run for each (name, steps, model) in turn, in one launch of this layout."""
    return [_layout_run(state, d, *job) for job in jobs]


def _in_process(fn, *args):
    """fn(parallel state, *args) at one rank in this process (no process to start): the
    one-process reference is the same code at world size 1."""
    from mega.runtime.parallel import current

    assert current().world_size == 1
    return fn(current(), *args)


@pytest.mark.slow
def test_checkpoints_load_across_tensor_and_pipeline_sizes(tmp_path):
    """Save at TP=2 x PP=2 and load at TP=1 x PP=1, and the reverse: the same validation
    loss (every logit of the valid batches enters it). One 4-rank launch trains its own
    run and then loads the one-process checkpoint."""
    single = _in_process(_layout_run, tmp_path, "single", 2)
    split, from_single = zip(*run_ranks(_layout_runs, world=4, tp=2, pp=2,
                                        args=(tmp_path, [("split", 2), ("single", 2)]), timeout=240))
    assert split[0] == pytest.approx(single, rel=1e-4)  # trained at either layout: the same model
    # TP=2 x PP=2 checkpoint -> one process
    assert _in_process(_layout_run, tmp_path, "split", 2) == pytest.approx(split[0], rel=1e-6)
    # one-process checkpoint -> TP=2 x PP=2
    assert len(from_single) == 4
    for value in from_single:
        assert value == pytest.approx(single, rel=1e-6)
    from mega.checkpoint import restore

    model, _, _ = restore(tmp_path / "split")  # mega generate's path
    assert model.language_model.embedding is not None and len(model.language_model.encoder.layers) == 4


@pytest.mark.slow
def test_tp2_checkpoint_loads_at_tp1_with_the_default_vocabulary_multiple(tmp_path):
    """make_vocab_size_divisible_by = 128 (the default): 258 byte ids pad to 512 at TP=2 and
    to 384 at TP=1, so loading cuts 128 padded rows. The padded ids are out of the loss's
    softmax, so the validation loss does not move; with model.mask_padded_vocab = false
    (Megatron-LM's loss, padded logits in the softmax) it moves, by 0.29 nats here.
    Both TP=2 runs share one launch."""
    cases = [(True, "masked"), (False, "megatron")]
    models = {name: {"make_vocab_size_divisible_by": 128, "mask_padded_vocab": mask} for mask, name in cases}
    ranks = run_ranks(_layout_runs, world=2, tp=2, args=(tmp_path, [(name, 2, models[name]) for _, name in cases]),
                      timeout=240)
    for i, (mask, name) in enumerate(cases):
        split = [values[i] for values in ranks]
        assert split[0] == split[1]
        one = _in_process(_layout_run, tmp_path, name, 2, models[name])
        if mask:
            assert one == pytest.approx(split[0], rel=1e-5, abs=1e-5)
        else:
            assert abs(one - split[0]) > 0.05
