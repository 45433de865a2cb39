"""Background batch reading: a step whose data is slow to read does not wait for it when
the next batch is read ahead, the batches are the same ones, and a run trains bit for bit
the same with and without prefetching (resume relies on the position alone)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from mega.testing import read_metrics, tiny_config
from mega.training.batches import BatchLoader, load_micro_batches, micro_batch_positions
from mega.training.loop import train
from mega.training.run import build_run

DELAY = 0.02  # seconds per sample


class SlowDataset:
    """Sample i is [i, i, i, i], read in DELAY seconds; counts reads per thread."""

    def __init__(self):
        self.reader_threads = set()

    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        self.reader_threads.add(threading.current_thread().name)
        time.sleep(DELAY)
        return {"tokens": torch.full((4,), i), "loss_mask": torch.ones(4)}


def _wait_until(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "the reader never finished the next batch"
        time.sleep(0.005)


def _steps(loader, n, work):
    """Take n steps; `work(step)` stands for the model's compute between two batches."""
    waits, batches = [], []
    for step in range(n):
        mbs, wait = loader.get(step)
        waits.append(wait)
        batches.append(mbs)
        work(step)
    return waits, batches


@pytest.mark.slow
def test_a_prefetched_step_does_not_wait_for_slow_data():
    ds = SlowDataset()
    gbs, mbs = 8, 2  # 8 samples: each batch takes >= 8 * DELAY to read
    sync = BatchLoader(ds, gbs, mbs, 0, 1, torch.device("cpu"), prefetch=0)
    ahead = BatchLoader(SlowDataset(), gbs, mbs, 0, 1, torch.device("cpu"), prefetch=1, end_step=4)
    waits0, b0 = _steps(sync, 4, lambda s: None)
    # the step's compute lasts until the next batch is read: the next step finds it ready
    waits1, b1 = _steps(ahead, 4, lambda s: s < 3 and _wait_until(lambda: ahead.ready(s + 1)))
    ahead.close()
    assert all(w >= gbs * DELAY for w in waits0)  # synchronous: every step waits for its 8 samples
    assert all(w < 0.1 * gbs * DELAY for w in waits1[1:])  # read ahead: no wait after the first
    for x, y in zip(b0, b1):  # the same batches, in the same order
        assert all(torch.equal(p[k], q[k]) for p, q in zip(x, y) for k in p)
    ref = load_micro_batches(ds, micro_batch_positions(2, gbs, mbs, 0, 1), torch.device("cpu"))
    assert all(torch.equal(p["tokens"], q["tokens"]) for p, q in zip(ref, b1[2]))


def test_asking_another_step_restarts_the_reader_and_errors_reach_their_step():
    class Failing(SlowDataset):
        def __getitem__(self, i):
            if i >= 12:
                raise ValueError(f"bad sample {i}")
            return super().__getitem__(i)

    loader = BatchLoader(Failing(), 4, 2, 0, 1, torch.device("cpu"), prefetch=2)
    assert loader.get(1)[0][0]["tokens"][:, 0].tolist() == [4, 5]
    assert loader.get(0)[0][1]["tokens"][:, 0].tolist() == [2, 3]  # out of order: restarted
    loader.get(1), loader.get(2)
    with pytest.raises(ValueError, match="bad sample 12"):
        loader.get(3)
    loader.close()


def _weights(run):
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


@pytest.mark.slow
def test_training_with_and_without_prefetch_is_identical(tmp_path, corpus, plugins):
    runs = []
    for prefetch in (0, 2):
        cfg = tiny_config(tmp_path, corpus, plugins, [f"exp_manager.name=p{prefetch}", f"model.data.prefetch={prefetch}"],
                          trainer={"max_steps": 4})
        run = build_run(cfg, plugins)
        train(run)
        runs.append(run)
    a, b = _weights(runs[0]), _weights(runs[1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = read_metrics(runs[0].run_dir), read_metrics(runs[1].run_dir)
    assert [m.get("loss") for m in la] == [m.get("loss") for m in lb]
    assert all("data_wait_ms" in m and "loss_tokens_per_sec" in m for m in lb if "loss" in m)
