"""Transformer-XL's training step, made ready for CUDA-graph capture (issue 24): the memory
of every stream is one device buffer, gathered and scattered by the batch's stream ids on
the device, at its full length from the first step (the positions before a stream's text
masked), so the step reads no slot id on the host and no shape changes. That carrying it
so changes no number is shown here against the per-micro-batch memory it replaced, and by
the Transformer-XL training tests against the reference (test_txl_training.py)."""
from __future__ import annotations

import torch

import mega
from mega.config import config_from_dict
from mega.plugins.models.transformer_xl import TransformerXLConfig, TransformerXLModel
from mega.plugins.models.transformer_xl_memory import StreamMemory, from_slot_tensors
from mega.testing import tiny_preset


def _memory_per_step(tmp_path, monkeypatch, steps=4, **trainer):
    import mega.training.loop as loop
    from mega.training.run import build_run

    raw = tiny_preset("transformer_xl", tmp_path, trainer={"max_steps": steps, "val_check_interval": 0, **trainer})
    run = build_run(config_from_dict(raw, [], mega.get_plugins()))
    seen = []
    beat = loop.watchdog.beat

    def snapshot(step):
        seen.append({k: (m.data_ptr(), tuple(m.shape), m.dtype) for k, m in run.model.carried_state().items()})
        beat(step)

    monkeypatch.setattr(loop.watchdog, "beat", snapshot)
    loop.train(run)
    seen.append({k: (m.data_ptr(), tuple(m.shape), m.dtype) for k, m in run.model.carried_state().items()})
    return run, seen[1:]  # the memory after each step


def test_memory_is_one_buffer_updated_in_place_from_the_first_step(tmp_path, monkeypatch):
    run, after = _memory_per_step(tmp_path, monkeypatch)
    cfg = run.config.model
    assert after[0]["mems"][1:] == ((cfg.n_layer, cfg.mem_len, cfg.global_batch_size, cfg.d_model), torch.float32)
    assert all(step == after[0] for step in after[1:]), after


def _tiny(**kw) -> TransformerXLConfig:
    base = dict(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, dropatt=0.0, tgt_len=4, mem_len=10,
                cutoffs=[20, 50], div_val=2, d_embed=16, global_batch_size=4, micro_batch_size=2)
    base.update(kw)
    return TransformerXLConfig(**base)


def _per_slot_reference(model, segments):
    """The memory as mega kept it before: one growing tensor per micro-batch, via `hidden`."""
    mems, out = {}, []
    for tokens, first in segments:
        h, mems[first] = model.hidden(tokens, mems.get(first))
        out.append(h)
    return out, mems


def _streamed(model, segments):
    out = []
    for tokens, first in segments:
        batch = {"tokens": tokens.t(), "stream": torch.arange(first, first + tokens.size(1))}
        store = model._memory(True)
        idx = store.index(batch, tokens.size(1), tokens.device)
        mems, valid = store.read(idx, model.r_w_bias.dtype, tokens.device)
        h, new = model.hidden(tokens, mems, mem_valid=valid)
        store.write(idx, new, (valid + tokens.size(0)).clamp(max=model.config.mem_len))
        out.append(h)
    return out


def test_the_full_length_masked_memory_equals_the_growing_one(monkeypatch):
    """Mem_len 10 over segments of 4: the memory fills over 3 steps, the slots interleave.
    fp64: equal to rounding; the same_length rule is also left unchanged by the padding."""
    for same_length in (False, True):
        torch.manual_seed(0)
        model = TransformerXLModel(_tiny(same_length=same_length), 100).double()
        g = torch.Generator().manual_seed(1)
        segments = [(torch.randint(0, 100, (4, 2), generator=g), first) for _ in range(4) for first in (0, 2)]
        ref, ref_mems = _per_slot_reference(model, segments)
        new = _streamed(model, segments)
        for a, b in zip(ref, new):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        buf = model._train_mems
        torch.testing.assert_close(buf.mems, torch.cat([ref_mems[0], ref_mems[2]], 2), rtol=1e-12, atol=1e-12)
        assert buf.valid.tolist() == [10] * 4


def test_an_old_checkpoints_per_micro_batch_memory_is_converted_on_load():
    """A checkpoint of the layout before (`mems.{first stream}`, [n_layer, mlen, bsz, d],
    here mlen 6 of 10) resumes: each row lands in its stream's slot, right-aligned, with
    its length, and the next segment gives what the old memory gave."""
    torch.manual_seed(0)
    model = TransformerXLModel(_tiny(), 100).double()
    g = torch.Generator().manual_seed(2)
    warm = [(torch.randint(0, 100, (4, 2), generator=g), first) for _ in range(2) for first in (0, 2)]
    _, old = _per_slot_reference(model, warm)
    assert old[0].shape == (2, 8, 2, 16)
    model.load_carried_state({f"mems.{k}": v for k, v in old.items()})
    assert model._train_mems.valid.tolist() == [8] * 4
    nxt = [(torch.randint(0, 100, (4, 2), generator=g), first) for first in (0, 2)]
    ref = [model.hidden(t, old[first])[0] for t, first in nxt]
    for a, b in zip(ref, _streamed(model, nxt)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    # no stream ids (key -1): rows 0..bsz-1
    mems, valid = from_slot_tensors({-1: old[0]}, (2, 10, 4, 16))
    assert valid.tolist() == [8, 8, 0, 0] and torch.equal(mems[:, 2:, :2], old[0]) and not mems[:, :2].any()


def test_a_memory_of_another_shape_is_refused_naming_the_key():
    import pytest
    from mega.errors import CheckpointError

    store = StreamMemory(2, 10, 16, 4)
    with pytest.raises(CheckpointError, match="carried_state.mems"):
        store.load({"mems": torch.zeros(2, 10, 8, 16), "mems_valid": torch.zeros(8)})
