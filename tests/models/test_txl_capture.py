"""Transformer-XL's training step, made ready for CUDA-graph capture (issue 24): once the
memory is full, each slot's memory is one tensor updated in place (the same storage, shape
and dtype every step: what a captured graph reads). That carrying it so changes no number is
shown by the Transformer-XL training tests against the reference (test_txl_training.py)."""
from __future__ import annotations

import mega
from mega.config import config_from_dict
from mega.testing import tiny_preset


def _memory_per_step(tmp_path, monkeypatch, steps=4):
    import mega.training.loop as loop
    from mega.training.run import build_run

    raw = tiny_preset("transformer_xl", tmp_path, trainer={"max_steps": steps, "val_check_interval": 0})
    run = build_run(config_from_dict(raw, [], mega.get_plugins()))
    seen = []
    beat = loop.watchdog.beat

    def snapshot(step):
        seen.append({slot: (m.data_ptr(), tuple(m.shape), m.dtype) for slot, m in run.model._train_mems.items()})
        beat(step)

    monkeypatch.setattr(loop.watchdog, "beat", snapshot)
    loop.train(run)
    seen.append({slot: (m.data_ptr(), tuple(m.shape), m.dtype) for slot, m in run.model._train_mems.items()})
    return run, seen[1:]  # the memory after each step


def test_memory_is_updated_in_place_once_full(tmp_path, monkeypatch):
    run, after = _memory_per_step(tmp_path, monkeypatch)
    cfg = run.config.model
    assert cfg.mem_len == cfg.seq_length == 16  # the preset fills its memory in one step
    assert len(after[0]) == 2  # two micro-batch slots (global batch 4, micro-batch 2)
    for slot, (ptr, shape, dtype) in after[0].items():
        assert shape == (cfg.n_layer, cfg.mem_len, cfg.micro_batch_size, cfg.d_model)
        assert all(step[slot] == (ptr, shape, dtype) for step in after[1:]), [step[slot] for step in after]
