"""Sequence parallelism and activation recomputation under tensor and pipeline parallelism
(gloo, CPU; docs/parallelism.md). Two launches hold every check:

TP=2 (2 ranks):
* the sequence-parallel mappings equal their definitions, forward and backward;
* recomputation at TP=2 with attention dropout equals the run without it bit for bit; with
  the RNG tracker's restore taken out of the checkpoint (torch's own context only), the
  gradients differ — the check can fail;
* TP=2 + SP equals TP=2: the loss and the gradients of every untagged parameter bit for
  bit, the tagged (LayerNorm, row-parallel bias) gradients to 1e-6 of their largest
  element (measured: 2.3e-7); over 4 AdamW steps, losses to 1e-6 and weights to 1e-6
  (but the key bias, whose gradient is rounding noise around an exact zero); and one
  process to 1e-5;
* with dropout, recomputation under SP equals SP without it bit for bit, and each rank's
  tokens draw their own dropout masks;
* the tensors a forward keeps, counted, equal `mega plan`'s activation bytes per layer in
  every mode with SP and without (and SP keeps less);
* BERT and the encoder-decoder with SP and recomputation equal one process to 1e-5.

TP=2 x PP=2 (4 ranks), the real training loop: recomputation (full block under dropout,
full uniform with SP) trains bit for bit like the same layout without it; TP=2 x PP=2 + SP
(hidden states of [b, s/2, h] between stages) trains like TP=2 x PP=2 to 1e-6 and like one
process to 1e-5, and under model.megatron_amp_O2 (bf16) like TP=2 x PP=2 O2 to 1e-5. `_train_layout` takes any layout and model keys, so a launch with data
parallelism and the distributed optimizer can reuse it.
"""
from __future__ import annotations

import pytest
import torch

from mega.testing import full_grads, run_ranks

FULL_UNIFORM_1 = {"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "uniform",
                  "activations_checkpoint_num_layers": 1}
SELECTIVE_BOTH = {"activations_checkpoint_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]}
FULL_BLOCK_1 = dict(FULL_UNIFORM_1, activations_checkpoint_method="block")


# --- the TP=2 launch ---------------------------------------------------------------------------


def _gpt(state, dropout: float, layers: int = 2, **keys):
    from mega.plugins.models.gpt import GPTConfig, GPTModel
    from mega.runtime.rng import get_rng_tracker

    cfg = GPTConfig(num_layers=layers, hidden_size=32, num_attention_heads=4, seq_length=16,
                    make_vocab_size_divisible_by=16, hidden_dropout=dropout, attention_dropout=dropout,
                    tensor_model_parallel_size=state.tp_size, **keys)
    torch.manual_seed(0)
    get_rng_tracker().reset(0, state.tp_rank, "cpu")
    return GPTModel(cfg, 50).train()


def _gpt_batch(step: int = 0):
    g = torch.Generator().manual_seed(1 + step)
    tokens = torch.randint(0, 50, (2, 16), generator=g)
    return {"tokens": tokens, "labels": torch.randint(0, 50, (2, 16), generator=g), "loss_mask": torch.ones(2, 16)}


def _gpt_step(state, dropout: float, **keys):
    """One forward and backward: (loss, this rank's gradients after the SP sum)."""
    from mega.runtime.tensor_parallel import sum_sequence_parallel_grads

    model = _gpt(state, dropout, **keys)
    loss = model.training_loss(_gpt_batch())["loss_sum"]
    loss.backward()
    sum_sequence_parallel_grads(list(model.parameters()), state)
    tagged = {n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)}
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, tagged, model


def _gpt_adamw(state, steps: int, **keys):
    """`steps` AdamW steps on fresh batches: the losses and the gathered weights."""
    from mega.runtime.tensor_parallel import sum_sequence_parallel_grads

    model = _gpt(state, 0.0, **keys)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model.training_loss(_gpt_batch(step))["loss_sum"]
        loss.backward()
        sum_sequence_parallel_grads(list(model.parameters()), state)
        opt.step()
        losses.append(loss.detach())
    weights = {}
    for name, p in model.named_parameters():
        p.grad = p.detach()  # full_grads gathers .grad along partition_dim
    weights = full_grads(model, state)
    return torch.stack(losses), weights


def _mappings(state):
    """scatter/gather/reduce-scatter along the sequence (dim 1) and their backwards."""
    import torch.distributed as dist

    from mega.runtime.tensor_parallel import gather_from_sp, reduce_scatter_to_sp, scatter_to_sp

    g = torch.Generator().manual_seed(5)
    full = torch.randn(3, 8, 4, generator=g)  # the same on every rank
    mine = full.chunk(state.tp_size, dim=1)[state.tp_rank]
    out = {}
    x = full.clone().requires_grad_()
    y = scatter_to_sp(x)
    (y * (state.tp_rank + 1)).sum().backward()
    out["scatter"] = (torch.equal(y, mine), x.grad)
    x = mine.clone().requires_grad_()
    y = gather_from_sp(x)
    (y * (state.tp_rank + 1)).sum().backward()
    out["gather"] = (torch.equal(y, full), x.grad)
    x = mine.clone().requires_grad_()
    y = gather_from_sp(x, reduce_grads=False)
    (y * 2).sum().backward()
    out["gather_split"] = x.grad
    part = full * (state.tp_rank + 1)  # each rank's partial sum
    x = part.clone().requires_grad_()
    y = reduce_scatter_to_sp(x)
    y.sum().backward()
    summed = part.clone()
    dist.all_reduce(summed, group=state.tp_group)
    out["reduce_scatter"] = (torch.equal(y, summed.chunk(state.tp_size, dim=1)[state.tp_rank]), x.grad)
    return out


def _masks(state):
    """Which of this rank's embedding outputs dropout zeroed, under SP."""
    from mega.runtime.tensor_parallel import sequence_parallel_region

    model = _gpt(state, 0.5, sequence_parallel=True)
    batch = _gpt_batch()
    with sequence_parallel_region():
        emb = model.language_model.embedding(batch["tokens"], torch.arange(16).unsqueeze(0))
    return emb.shape, emb == 0


MEMORY_MODES = {"none": {}, "selective": {"activations_checkpoint_granularity": "selective"},
                "selective core_attn+mlp": SELECTIVE_BOTH, "full/uniform/1": FULL_UNIFORM_1, "full/block/1": FULL_BLOCK_1}


def _kept_bytes(state):
    """{(sp, precision, mode): ((counted, planned) at 2 layers, at 3 layers)}: the tensors a
    forward leaves alive (mega.runtime.tensor_bytes; autocast's weight copies taken out)
    and the plan's activations of the stage."""
    from mega.plugins.models.gpt import GPTConfig, GPTModel
    from mega.runtime.rng import get_rng_tracker
    from mega.runtime.tensor_bytes import TensorBytes

    out = {}
    for sp in (False, True):
        for precision in ("32", "bf16"):
            for name, keys in MEMORY_MODES.items():
                rows = []
                for layers in (2, 3):
                    cfg = GPTConfig(num_layers=layers, hidden_size=64, num_attention_heads=4, seq_length=32,
                                    tensor_model_parallel_size=2, sequence_parallel=sp, make_vocab_size_divisible_by=64,
                                    **keys)
                    torch.manual_seed(0)
                    get_rng_tracker().reset(0, state.tp_rank, "cpu")
                    model = GPTModel(cfg, 256).train()
                    tok = torch.randint(0, 256, (2, 32))
                    with TensorBytes() as counted, torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                        loss = model.training_loss({"tokens": tok, "labels": tok, "loss_mask": torch.ones(2, 32)})
                        live = counted.live
                    del loss
                    stage = cfg.memory_per_rank(256, 2, 2, 1, precision, "cpu")["stages"][0]
                    casts = 2 * stage["matmul_params"] if precision == "bf16" else 0
                    rows.append((live - casts, stage["activations"]))
                out[(sp, precision, name)] = rows
    return out


def _family(state, family: str, keys: dict):
    """BERT or T5 loss and gathered gradients, dropout off."""
    from mega.runtime.rng import get_rng_tracker

    get_rng_tracker().reset(0, state.tp_rank, "cpu")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if family == "bert":
        from mega.plugins.models.bert import TASKS, BertConfig, BertModel

        cfg = BertConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, hidden_dropout=0.0,
                         attention_dropout=0.0, make_vocab_size_divisible_by=16, tensor_model_parallel_size=state.tp_size,
                         **keys)
        model = BertModel(cfg, 64, TASKS["bert"]).train()
        tok = torch.randint(0, 64, (2, 16), generator=g)
        padding = torch.ones_like(tok)
        padding[1, 12:] = 0
        batch = {"tokens": tok, "labels": tok, "loss_mask": (torch.rand(2, 16, generator=g) < 0.3).float(),
                 "tokentype_ids": torch.zeros_like(tok), "padding_mask": padding, "is_random": torch.tensor([0, 1])}
        out = model.training_loss(batch)
        loss = out["loss_sum"] + out["sample_loss_sum"]
    else:
        from mega.plugins.models.encoder_decoder import EncoderDecoderModel, StackConfig, T5Config

        stack = StackConfig(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0,
                            **{k: v for k, v in keys.items() if k != "sequence_parallel"})
        # 64 ids + 100 sentinels pad to 192 at TP=1 and TP=2 alike: the same initial weights
        cfg = T5Config(encoder=stack, decoder=stack, seq_length=16, seq_length_dec=8, make_vocab_size_divisible_by=96,
                       tensor_model_parallel_size=state.tp_size, sequence_parallel=keys.get("sequence_parallel", False))
        model = EncoderDecoderModel(cfg, 64).train()
        batch = {"text_enc": torch.randint(0, 64, (2, 16), generator=g), "enc_mask": torch.ones(2, 16, dtype=torch.long),
                 "text_dec": torch.randint(0, 64, (2, 8), generator=g), "labels": torch.randint(0, 64, (2, 8), generator=g),
                 "loss_mask": torch.ones(2, 8), "dec_mask": torch.ones(2, 8, dtype=torch.long)}
        batch["enc_mask"][1, 13:] = 0
        loss = model.training_loss(batch)["loss_sum"]
    loss.backward()
    from mega.runtime.tensor_parallel import sum_sequence_parallel_grads

    sum_sequence_parallel_grads(list(model.parameters()), state)
    return loss.detach(), full_grads(model, state)


FAMILY_KEYS = {"bert": dict(FULL_UNIFORM_1, sequence_parallel=True), "t5": dict(SELECTIVE_BOTH, sequence_parallel=True)}


def _tp2_checks(state):
    import mega.runtime.recompute as recompute
    import torch.utils.checkpoint

    out = {"mappings": _mappings(state)}
    out["R2"] = [_gpt_step(state, 0.1)[:2], _gpt_step(state, 0.1, **FULL_UNIFORM_1)[:2]]
    contexts = recompute._contexts
    recompute._contexts = torch.utils.checkpoint.noop_context_fn  # torch's RNG stash alone
    try:
        out["R2n"] = _gpt_step(state, 0.1, **FULL_UNIFORM_1)[:2]
    finally:
        recompute._contexts = contexts
    tp = _gpt_step(state, 0.0)
    sp = _gpt_step(state, 0.0, sequence_parallel=True)
    out["S1"] = (tp[:2], sp[:3], full_grads(sp[3], state))
    out["S2"] = (_gpt_adamw(state, 4), _gpt_adamw(state, 4, sequence_parallel=True))
    out["R4"] = [_gpt_step(state, 0.1, sequence_parallel=True, **keys)[:2] for keys in ({}, FULL_UNIFORM_1, SELECTIVE_BOTH)]
    out["S7"] = _masks(state)
    out["S9"] = _kept_bytes(state)
    out["A2"] = {family: _family(state, family, keys) for family, keys in FAMILY_KEYS.items()}
    return out


@pytest.fixture(scope="module")
def tp2():
    return run_ranks(_tp2_checks, world=2, tp=2, timeout=400)


def _one_process(fn, *args):
    from mega.runtime.parallel import current

    assert current().world_size == 1
    torch.set_num_threads(1)
    return fn(current(), *args)


@pytest.mark.slow
def test_sequence_parallel_mappings(tp2):
    g = torch.Generator().manual_seed(5)
    full = torch.randn(3, 8, 4, generator=g)
    for rank, result in enumerate(tp2):
        m = result["mappings"]
        ok, grad = m["scatter"]  # backward: the slices' gradients gathered
        assert ok and torch.equal(grad, torch.cat([torch.full((3, 4, 4), 1.0), torch.full((3, 4, 4), 2.0)], dim=1))
        ok, grad = m["gather"]  # backward: the gradients of every rank summed, this rank's slice
        assert ok and torch.equal(grad, torch.full((3, 4, 4), 3.0))
        assert torch.equal(m["gather_split"], torch.full((3, 4, 4), 2.0))  # reduce_grads=False: whole already
        ok, grad = m["reduce_scatter"]
        assert ok and torch.equal(grad, torch.ones(3, 8, 4))  # backward: all-gather of the slices' gradients
    assert full.shape == (3, 8, 4)


@pytest.mark.slow
def test_recomputation_at_tp2_is_bit_for_bit_and_needs_the_tracker_restore(tp2):
    for result in tp2:
        (ref_loss, ref), (loss, grads) = result["R2"]
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(grads[k], ref[k]) for k in ref)
        broken_loss, broken = result["R2n"]
        assert torch.equal(broken_loss, ref_loss)  # the forward is the same; the recomputed masks are not
        assert any(not torch.equal(broken[k], ref[k]) for k in ref)


@pytest.mark.slow
def test_sequence_parallel_equals_tensor_parallel_and_one_process(tp2):
    one_loss, one_grads, _, one_model = _one_process(_gpt_step, 0.0)
    one_grads = {n: p.grad for n, p in one_model.named_parameters()}
    one_losses, one_weights = _one_process(_gpt_adamw, 4)
    for result in tp2:
        (tp_loss, tp_grads), (sp_loss, sp_grads, tagged), sp_full = result["S1"]
        assert torch.equal(sp_loss, tp_loss)
        assert tagged and all("layernorm" in n or n.endswith("dense.bias") or n.endswith("dense_4h_to_h.bias")
                              for n in tagged)
        for name, grad in tp_grads.items():
            if name in tagged:  # two chunk sums added, not one sum over every row: a few ulp of the largest
                torch.testing.assert_close(sp_grads[name], grad, rtol=1e-6, atol=1e-6 * float(grad.abs().max()), msg=name)
            else:
                assert torch.equal(sp_grads[name], grad), name
        # one process (the TP=2 vs TP=1 bar)
        torch.testing.assert_close(sp_loss, one_loss, rtol=1e-5, atol=1e-5)
        for name, grad in one_grads.items():
            torch.testing.assert_close(sp_full[name], grad, rtol=1e-4, atol=1e-5, msg=name)
        (tp_losses, tp_weights), (sp_losses, sp_weights) = result["S2"]
        torch.testing.assert_close(sp_losses, tp_losses, rtol=1e-6, atol=0)
        torch.testing.assert_close(sp_losses, one_losses, rtol=1e-5, atol=0)
        for name, w in tp_weights.items():
            sp_w, one_w = sp_weights[name], one_weights[name]
            if name.endswith("query_key_value.bias"):  # leave out the key bias: its gradient is exactly zero
                # (softmax ignores a shift shared by a query's scores), so AdamW makes steps of +-lr of
                # rounding noise, whichever layout
                keep = torch.ones(4, 3, 8, dtype=torch.bool)
                keep[:, 1] = False
                w, sp_w, one_w = w[keep.flatten()], sp_w[keep.flatten()], one_w[keep.flatten()]
            torch.testing.assert_close(sp_w, w, rtol=0, atol=1e-6, msg=name)
            torch.testing.assert_close(sp_w, one_w, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_recomputation_under_sequence_parallelism_is_bit_for_bit(tp2):
    for result in tp2:
        (ref_loss, ref), *others = result["R4"]
        for loss, grads in others:
            assert torch.equal(loss, ref_loss)
            assert all(torch.equal(grads[k], ref[k]) for k in ref)


@pytest.mark.slow
def test_each_rank_draws_its_own_dropout_masks(tp2):
    (shape0, zeros0), (shape1, zeros1) = (r["S7"] for r in tp2)
    assert shape0 == shape1 == (2, 8, 32)  # this rank's half of the sequence
    assert zeros0.any() and zeros1.any() and not torch.equal(zeros0, zeros1)


@pytest.mark.slow
def test_plan_counts_the_tensors_a_forward_keeps_with_sequence_parallelism(tp2):
    """Per layer exactly (the difference of 3 and 2 layers); the whole stage within 2 KiB
    (the loss's scalars, the vocab-parallel masks); SP keeps less."""
    for result in tp2:
        for (sp, precision, mode), ((counted2, planned2), (counted3, planned3)) in result["S9"].items():
            where = f"sp={sp} precision={precision} {mode}"
            assert abs((counted3 - counted2) - (planned3 - planned2)) <= 256, where
            assert abs(counted3 - planned3) <= 2048, where
            if sp:
                assert counted3 < result["S9"][(False, precision, mode)][1][0], where


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_KEYS))
def test_bert_and_encoder_decoder_with_sequence_parallelism_equal_one_process(tp2, family):
    ref_loss, ref_grads = _one_process(_family, family, {})
    for result in tp2:
        loss, grads = result["A2"][family]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


# --- the TP=2 x PP=2 launch: the real training loop ----------------------------------------------


def _train_layout(state, d, name: str, model: dict, steps: int = 3, trainer: dict = None):
    """Train `steps` steps of a 4-layer GPT through `mega run`'s loop at this process's
    layout (model and trainer keys over the defaults here): per-step (loss, grad norm) and
    this rank's fp32 weights. 130: 258 byte ids pad to 260 at TP=1 and TP=2, so every
    layout starts alike."""
    from mega.config import config_from_dict
    from mega.testing import write_corpus
    from mega.training.loop import train_step
    from mega.training.run import build_run
    from mega.training.run_dir import unlock_run_dir

    corpus = d / "c.txt"
    if state.rank == 0 and not corpus.exists():
        write_corpus(corpus)
    state.barrier()
    cfg = config_from_dict({
        "trainer": {"devices": state.world_size, "max_steps": steps, "val_check_interval": 0, "gradient_clip_val": 0.0,
                    "accelerator": "cpu", **(trainer or {})},
        "exp_manager": {"exp_dir": str(d), "name": f"{name}-{state.world_size}", "loggers": []},
        "model": {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "micro_batch_size": 2,
                  "global_batch_size": 8, "make_vocab_size_divisible_by": 130,
                  "tensor_model_parallel_size": state.tp_size, "pipeline_model_parallel_size": state.pp_size,
                  "tokenizer": {"library": "bytes"}, "data": {"data_prefix": [str(corpus)]}, **model},
    })
    run = build_run(cfg)
    try:
        metrics = []
        for _ in range(steps):
            m = train_step(run)
            run.step += 1
            metrics.append((float(m["loss"]), float(m["grad_norm"])))
        return metrics, {k: v.clone() for k, v in run.model_state_dict().items()}
    finally:
        unlock_run_dir(run.run_dir)


DROPOUT = {"hidden_dropout": 0.1, "attention_dropout": 0.1}
NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
# name -> model keys; (name, reference, how) pairs below compare them
LAYOUT_RUNS = {
    "dropout": DROPOUT,
    "dropout+full_block": dict(DROPOUT, **FULL_BLOCK_1),
    "dropout+sp": dict(DROPOUT, sequence_parallel=True),
    "dropout+sp+full_uniform": dict(DROPOUT, sequence_parallel=True, **FULL_UNIFORM_1),
    "plain": NO_DROPOUT,
    "sp": dict(NO_DROPOUT, sequence_parallel=True),
    "o2": dict(NO_DROPOUT, megatron_amp_O2=True),
    "o2+sp": dict(NO_DROPOUT, megatron_amp_O2=True, sequence_parallel=True),
}
BF16 = {"precision": "bf16"}


def _layout_runs(state, d):
    return {name: _train_layout(state, d, name, keys, trainer=BF16 if keys.get("megatron_amp_O2") else None)
            for name, keys in LAYOUT_RUNS.items()}


@pytest.mark.slow
def test_tp2_pp2_recomputation_and_sequence_parallelism_train_like_their_references(tmp_path):
    ranks = run_ranks(_layout_runs, world=4, tp=2, pp=2, args=(tmp_path,), timeout=500)
    one, _ = _one_process(_train_layout, tmp_path, "plain", NO_DROPOUT)
    for runs in ranks:
        for name, ref in (("dropout+full_block", "dropout"), ("dropout+sp+full_uniform", "dropout+sp")):
            assert runs[name][0] == runs[ref][0], name  # losses and grad norms, bit for bit
            assert all(torch.equal(runs[name][1][k], runs[ref][1][k]) for k in runs[ref][1]), name
        sp, plain = runs["sp"], runs["plain"]
        for (l1, g1), (l0, g0), (lo, go) in zip(sp[0], plain[0], one):
            assert l1 == pytest.approx(l0, rel=1e-6) and g1 == pytest.approx(g0, rel=1e-6)
            assert l1 == pytest.approx(lo, rel=1e-5) and g1 == pytest.approx(go, rel=1e-4)
        for k, w in plain[1].items():
            torch.testing.assert_close(sp[1][k], w, rtol=0, atol=1e-6, msg=k)
        # model.megatron_amp_O2: the tagged parameters' fp32 main gradients summed over TP
        for (l1, _), (l0, _) in zip(runs["o2+sp"][0], runs["o2"][0]):
            assert l1 == pytest.approx(l0, rel=1e-5)
