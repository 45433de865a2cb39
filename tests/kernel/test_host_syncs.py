"""No host synchronisation in a training step (issue 24): `mega.testing.count_host_syncs`
catches each way the host can wait for the device, and the training loop of every model
family issues none outside logging steps, where the metrics are read in one copy.

The counts are per loop iteration, between the watchdog beats that start each step, so
the whole iteration is covered: batch, forward/backward, loss scaler, clipping,
optimizer, metrics bookkeeping, the time-limit and signal checks."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import mega
from mega.config import config_from_dict
from mega.testing import count_host_syncs, tiny_preset
from tests.helpers.model_tables import T5_HIDDENS


def test_each_kind_of_host_read_is_counted_with_its_line():
    x = torch.randn(8)
    with count_host_syncs() as syncs:
        float(x.sum())
        if x[0] > 0:  # a Python `if` on a tensor
            pass
        x.tolist()
        x.cpu()
        x.numpy()
        x.nonzero()
        x[x > 0]
        x.masked_select(x > 0)
    ops = syncs.by_op()
    assert ops == Counter({"aten._local_scalar_dense": 2, "Tensor.tolist": 1, "Tensor.cpu": 1, "Tensor.numpy": 1,
                           "aten.nonzero": 1, "aten.index with a boolean mask": 1, "aten.masked_select": 1}), ops
    assert all("test_host_syncs.py" in e.where for e in syncs.events), syncs.summary()


def test_device_side_work_counts_nothing_and_methods_are_restored():
    p = torch.nn.Parameter(torch.randn(4, 4))
    p.grad = torch.randn(4, 4)
    before = torch.Tensor.tolist
    with count_host_syncs() as syncs:
        norm = torch.nn.utils.clip_grad_norm_([p], 1.0)  # no error_if_nonfinite: no read
        total = torch.zeros(())
        total = total + norm  # accumulated on the device
        torch.where(norm > 1, p, -p).sum()
    assert syncs.count == 0, syncs.summary()
    assert torch.Tensor.tolist is before and not isinstance(torch.Tensor.__dict__.get("tolist"), type(lambda: 0))


def test_device_filter_ignores_host_tensors():
    with count_host_syncs(device="cuda") as syncs:
        float(torch.ones(()))
        torch.ones(2).tolist()
    assert syncs.count == 0


def syncs_per_step(tmp_path, monkeypatch, name, steps=5, log_every=4, **sections):
    """Host syncs of each loop iteration of a `mega run` of model `name`'s tiny preset
    (validation off): {step: HostSyncs events}."""
    import mega.training.loop as loop

    trainer = {"max_steps": steps, "log_every_n_steps": log_every, "val_check_interval": 0,
               **sections.pop("trainer", {})}
    config = config_from_dict(tiny_preset(name, tmp_path, trainer=trainer, **sections), [], mega.get_plugins())
    marks = []
    beat = loop.watchdog.beat
    with count_host_syncs() as syncs:
        monkeypatch.setattr(loop.watchdog, "beat", lambda step: (marks.append(len(syncs.events)), beat(step)))
        mega.run(config)
    marks.append(len(syncs.events))
    return {step: syncs.events[marks[step - 1]:marks[step]] for step in range(1, len(marks))}


def _ops(events):
    return Counter(e.op for e in events)




@pytest.mark.parametrize("name,sections", [
    ("gpt", {}),
    ("gpt", {"trainer": {"gradient_clip_val": 0.5}}),
    ("gpt", {"trainer": {"precision": "bf16"}, "model": {"megatron_amp_O2": True}}),
    ("gpt", {"model": {"loss_chunk_size": 16}}),
    ("bert", {}),
    ("t5", {"model": T5_HIDDENS}),
    pytest.param("bart", {}, marks=pytest.mark.slow),
    pytest.param("transformer_xl", {"model": {"adaptive_static_shapes": True}}, marks=pytest.mark.slow),
    pytest.param("transformer_xl", {"trainer": {"precision": "bf16"},
                                    "model": {"megatron_amp_O2": True, "adaptive_static_shapes": True}},
                 marks=pytest.mark.slow),
], ids=["gpt", "gpt-clip", "gpt-bf16-O2", "gpt-chunked-loss", "bert", "t5-hiddens", "bart", "txl", "txl-bf16-O2"])
def test_training_steps_do_not_wait_for_the_device(tmp_path, monkeypatch, name, sections):
    """Steps 1-3 (not logging): no sync at all. Steps 4 and 5 (logging): exactly one, the
    metrics' single device-to-host copy. Transformer-XL was at 15 per step: its memory slot
    read from the stream id (2), `nonzero` per adaptive bucket (12,
    tests/models/test_txl_static_buckets.py) and the unreached buckets' flags (1,
    tests/models/test_txl_unreached.py), with its buckets' fixed shapes (what compiled steps
    use; see the next test for the eager default)."""
    per_step = syncs_per_step(tmp_path, monkeypatch, name, **sections)
    for step in (1, 2, 3):
        assert per_step[step] == [], f"step {step}:\n" + "\n".join(map(str, per_step[step]))
    for step in (4, 5):
        assert _ops(per_step[step]) == Counter({"Tensor.tolist": 1}), per_step[step]
        assert "read_metrics" in per_step[step][0].where


@pytest.mark.slow
def test_transformer_xl_eager_default_syncs_only_for_its_sparse_buckets(tmp_path, monkeypatch):
    """model.adaptive_static_shapes unset, eager: the buckets run on the rows `nonzero`
    finds (cheaper than every row at WikiText-103 shapes): per micro-batch (2 per step) 3
    buckets in the embedding and 3 in the softmax, and nothing else."""
    per_step = syncs_per_step(tmp_path, monkeypatch, "transformer_xl")
    for step in (1, 2, 3):
        assert _ops(per_step[step]) == Counter({"aten.nonzero": 12}), per_step[step]
        assert {e.where.split(" in ")[-1] for e in per_step[step]} == {"forward", "nll"}


def test_fp16_loss_scaler_reads_one_flag_per_step(tmp_path, monkeypatch):
    """The fp16 scaler must decide on the host whether to skip the optimizer step (as
    torch.amp.GradScaler and Megatron do): one read of the overflow flag per step, nothing
    else."""
    per_step = syncs_per_step(tmp_path, monkeypatch, "gpt", trainer={"precision": 16, "gradient_clip_val": 1.0})
    for step in (1, 2, 3):
        assert len(per_step[step]) == 1 and "unscale_and_check" in per_step[step][0].where, per_step[step]


def test_watchdog_heartbeat_does_not_touch_the_device():
    from mega.runtime.watchdog import Watchdog

    class Store(dict):
        def set(self, k, v):
            self[k] = v

    dog = Watchdog(Store(), rank=0, world=2, timeout_s=60.0)
    with count_host_syncs() as syncs:
        for step in range(1, 4):
            dog.beat(step)
    assert syncs.count == 0


def test_read_metrics_reads_every_value_in_one_copy():
    from mega.training.loop import read_metrics

    metrics = {"loss": torch.tensor(2.5), "grad_norm": torch.tensor(0.125, dtype=torch.float64),
               "binary_acc": torch.tensor(3), "lr": 1e-3, "data_wait_ms": 4.0}
    with count_host_syncs() as syncs:
        values = read_metrics(metrics)
    assert values == {"loss": 2.5, "grad_norm": 0.125, "binary_acc": 3.0, "lr": 1e-3, "data_wait_ms": 4.0}
    assert list(values) == list(metrics) and all(type(v) is float for v in values.values())
    assert _ops(syncs.events) == Counter({"Tensor.tolist": 1})


def _parallel_step_syncs(state, directory, tp):
    """On each rank: two steps of a 4-layer GPT at DP or TP 2 (gloo), then the syncs of a
    third `train_step` (its metrics not read: not a logging step)."""
    from pathlib import Path

    from mega.testing import write_corpus
    from mega.training.loop import train_step
    from mega.training.run import build_run
    from mega.training.run_dir import unlock_run_dir

    d = Path(directory)
    corpus = d / "corpus.txt"
    if state.is_main:
        write_corpus(corpus)
    state.barrier()
    config = config_from_dict({
        "trainer": {"devices": state.world_size, "max_steps": 3, "val_check_interval": 0, "gradient_clip_val": 0.5,
                    "accelerator": "cpu"},
        "exp_manager": {"exp_dir": str(d), "loggers": []},
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "micro_batch_size": 2,
                  "global_batch_size": 8, "make_vocab_size_divisible_by": 130, "tensor_model_parallel_size": tp,
                  "tokenizer": {"library": "bytes"}, "data": {"data_prefix": [str(corpus)]}},
    })
    run = build_run(config)
    for _ in range(2):
        train_step(run)
        run.step += 1
    with count_host_syncs() as syncs:
        train_step(run)
    unlock_run_dir(run.run_dir)
    return [str(e) for e in syncs.events]


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2], ids=["ddp2", "tp2"])
def test_data_and_tensor_parallel_steps_do_not_wait_for_the_device(tmp_path, tp):
    """DDP (gradient accumulation over 2 micro-batches, no_sync) and tensor parallelism
    (vocab-parallel loss, the clipping norm all-reduced): no sync on any rank."""
    from mega.testing import run_ranks

    per_rank = run_ranks(_parallel_step_syncs, world=2, tp=tp, args=(str(tmp_path), tp))
    assert per_rank == [[], []], per_rank
