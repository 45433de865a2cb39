"""Transformer-XL training through the kernel: the ordered data source's sample -> (stream,
segment) mapping as ranks and micro-batches see it, memory carried per micro-batch slot,
bit-exact resume, data parallelism equal to one process, and the evaluation protocol
against a direct transcription of the reference's loop."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch

from mega.config import config_from_dict
from mega.plugins.data.lm_ordered import LMOrderedSamples
from mega.testing import deep_update, read_metrics
from mega.training.batches import micro_batch_positions
from mega.training.loop import train
from mega.training.run import build_run
from tests.helpers.txl import txl_raw, txl_config

ROOT = Path(__file__).resolve().parents[2]


# --- the ordered data source ------------------------------------------------------------------------


@pytest.mark.parametrize("dp_size,micro", [(1, 2), (2, 2), (2, 1), (4, 1)])
def test_each_micro_batch_slot_of_each_rank_reads_its_own_streams_consecutive_segments(dp_size, micro):
    stream = torch.arange(8 * 41)
    G, tgt = 8, 5
    data = LMOrderedSamples(stream, G, tgt, num_samples=G * 16, seed=0)
    rows = stream.view(G, 41)
    assert data.segments == 8
    for rank in range(dp_size):
        slots = None
        for step in range(16):
            positions = micro_batch_positions(step, G, micro, rank, dp_size)
            streams = [[int(data[i]["stream"]) for i in r] for r in positions]
            # the reference's data.chunk(world_size, dim=1)[rank], cut into batch chunks
            first = rank * G // dp_size
            assert streams == [list(range(first + m * micro, first + (m + 1) * micro)) for m in range(len(positions))]
            slots = slots or streams
            assert streams == slots
            seg = step % 8  # epochs start again at the top of each stream
            for r in positions:
                for i in r:
                    s = data[i]
                    row = rows[int(s["stream"])]
                    assert torch.equal(s["tokens"], row[seg * tgt: seg * tgt + tgt])
                    assert torch.equal(s["labels"], row[seg * tgt + 1: seg * tgt + tgt + 1])


def test_roll_rotates_each_stream_per_epoch_and_keeps_segments_consecutive_within_one():
    stream = torch.arange(4 * 31)
    data = LMOrderedSamples(stream, 4, 5, num_samples=4 * 18, seed=3, roll=True)
    rows = stream.view(4, 31)
    for epoch in range(3):
        for j in range(4):
            text = torch.cat([data[(epoch * 6 + seg) * 4 + j]["tokens"] for seg in range(6)])
            shift = data._shift(epoch, j)
            assert torch.equal(text, torch.roll(rows[j], shift)[:30])
    assert data._shift(0, 0) != data._shift(1, 0) or data._shift(0, 1) != data._shift(1, 1)


@pytest.mark.parametrize("roll", [False, True])
def test_each_epoch_ends_with_the_shorter_last_segment_as_the_references_iterator(roll):
    """NVIDIA's LMOrderedIterator yields range(0, n_step - 1, tgt_len) with seq_len =
    min(tgt_len, n_step - 1 - i): a row of 43 tokens in segments of 5 gives 8 segments and
    a ninth of 2. Every epoch therefore reads the whole row (inputs row[:-1], targets
    row[1:]); drop_last leaves the short one out."""
    stream = torch.arange(3 * 43)
    rows = stream.view(3, 43)
    data = LMOrderedSamples(stream, 3, 5, num_samples=3 * 9 * 2, seed=1, roll=roll)
    assert data.segments == 9
    for epoch in range(2):
        for j in range(3):
            samples = [data[(epoch * 9 + seg) * 3 + j] for seg in range(9)]
            assert [len(s["tokens"]) for s in samples] == [5] * 8 + [2]
            assert [int(s["loss_mask"].sum()) for s in samples] == [5] * 8 + [2]
            row = torch.roll(rows[j], data._shift(epoch, j))
            assert torch.equal(torch.cat([s["tokens"] for s in samples]), row[:-1])
            assert torch.equal(torch.cat([s["labels"] for s in samples]), row[1:])
    dropped = LMOrderedSamples(stream, 3, 5, num_samples=3 * 16, seed=1, roll=roll, drop_last=True)
    assert dropped.segments == 8 and all(len(dropped[i]["tokens"]) == 5 for i in range(3 * 16))
    assert LMOrderedSamples(torch.arange(3 * 4), 3, 5, num_samples=3, seed=0).segments == 1  # one short segment
    with pytest.raises(Exception, match="fewer than 3 x \\(5 \\+ 1\\)"):
        LMOrderedSamples(torch.arange(3 * 4), 3, 5, num_samples=3, seed=0, drop_last=True)


def test_a_step_on_the_short_last_segment_trains_on_its_tokens(tmp_path, plugins):
    """Through the kernel: the step that reads each stream's short last segment runs (the
    memory carried on), its loss averages its own tokens, and the next epoch starts over."""
    corpus = tmp_path / "short.txt"
    corpus.write_text("".join(f"line {i} of a small text\n" for i in range(13)))
    run = build_run(txl_config(tmp_path, corpus, plugins, ["trainer.max_steps=8", "trainer.val_check_interval=0",
                                                           "model.data.splits_string=100,0,0"]), plugins)
    data = run.train_data
    per_epoch = data.segments
    short = data.n_step - 1 - (per_epoch - 1) * data.seq_length
    assert 0 < short < data.seq_length and per_epoch < 8
    seen, real = [], run.model.training_loss

    def recording(batch):
        seen.append((int(batch["stream"][0]), batch["tokens"].shape[1], int(batch["loss_mask"].sum())))
        return real(batch)

    run.model.training_loss = recording
    train(run)
    lengths = [n for _, n, _ in seen]  # two micro-batches a step
    assert lengths[: 2 * (per_epoch + 1)] == [16] * 2 * (per_epoch - 1) + [short] * 2 + [16] * 2
    assert all(mask == 2 * n for _, n, mask in seen)
    state = run.model.carried_state()
    assert sorted(state) == ["mems", "mems_valid"] and state["mems_valid"].tolist() == [16] * 4
    assert all(math.isfinite(m["loss"]) for m in read_metrics(run.run_dir) if "loss" in m)


def test_the_stream_has_every_line_and_an_eos_after_each(tmp_path, plugins):
    from mega.plugins.data.lm_ordered import LMOrderedConfig, LMOrderedSource
    from mega.plugins.tokenizers.bytes import ByteTokenizer

    for split, text in (("train", "ab\n\ncd\n"), ("valid", "x\n"), ("test", "yz\n")):
        (tmp_path / f"{split}.txt").write_text(text)
    src = LMOrderedSource(LMOrderedConfig(data_dir=str(tmp_path)), tmp_path / "run")
    tok = ByteTokenizer()
    assert src.token_stream("train", tok).tolist() == [97, 98, 257, 257, 99, 100, 257]
    assert src.token_stream("train", tok).tolist() == [97, 98, 257, 257, 99, 100, 257]  # from the cache
    assert list((tmp_path / "run" / "data").glob("lm_ordered.train.*.npy"))


# --- training through the kernel ------------------------------------------------------------------


def test_memory_is_kept_per_micro_batch_slot_and_training_lowers_the_loss(tmp_path, corpus, plugins):
    run = build_run(txl_config(tmp_path, corpus, plugins, ["trainer.max_steps=12", "trainer.val_check_interval=6"]),
                    plugins)
    train(run)
    state = run.model.carried_state()
    assert sorted(state) == ["mems", "mems_valid"]  # one buffer: the 4 streams (two micro-batches of 2)
    assert state["mems"].shape == (2, 16, 4, 32) and not state["mems"].requires_grad
    assert state["mems_valid"].tolist() == [16] * 4
    losses = [m["loss"] for m in read_metrics(run.run_dir) if "loss" in m]
    assert losses[-1] < losses[0] - 0.5, losses
    assert any("val_loss" in m for m in read_metrics(run.run_dir))


@pytest.mark.slow
def test_resume_continues_bit_for_bit(tmp_path, corpus, plugins):
    sections = dict(exp_manager={"checkpoint": {"every_n_train_steps": 2}})
    straight = build_run(txl_config(tmp_path, corpus, plugins, ["exp_manager.name=straight"], **sections), plugins)
    train(straight)
    first = build_run(txl_config(tmp_path, corpus, plugins, ["exp_manager.name=resumed", "trainer.max_steps=2"],
                                 **sections), plugins)
    train(first)
    resumed = build_run(txl_config(tmp_path, corpus, plugins, ["exp_manager.name=resumed"], **sections), plugins)
    assert resumed.step == 2
    for k, v in first.model.carried_state().items():
        assert torch.equal(resumed.model.carried_state()[k], v)
    train(resumed)
    a = [m for m in read_metrics(straight.run_dir)]
    b = [m for m in read_metrics(resumed.run_dir)]
    assert [m.get("loss") for m in a if m["step"] > 2] == [m.get("loss") for m in b if m["step"] > 2]
    assert [m.get("val_loss") for m in a if m["step"] > 2] == [m.get("val_loss") for m in b if m["step"] > 2]
    for k, v in straight.model.carried_state().items():
        assert torch.equal(resumed.model.carried_state()[k], v)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def _mega(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "mega", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env)


@pytest.mark.slow
def test_data_parallel_2_equals_one_process(tmp_path, corpus):
    raw = txl_raw(tmp_path, corpus, model={"dropout": 0.0, "dropatt": 0.0})
    exp = tmp_path / "txl.toml"
    exp.write_text(tomli_w.dumps(raw))
    one = _mega(["run", str(exp), "exp_manager.name=one"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _mega(["run", str(exp), "exp_manager.name=two", "trainer.devices=2", "model.micro_batch_size=1"], tmp_path)
    assert two.returncode == 0, two.stderr
    a, b = read_metrics(tmp_path / "results" / "one"), read_metrics(tmp_path / "results" / "two")
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5), (x["step"], key)


# --- the evaluation protocol ----------------------------------------------------------------------


def test_evaluation_follows_the_references_loop_with_warm_up(tmp_path, corpus, plugins):
    """A direct transcription of NVIDIA's evaluate: streams as columns, ceil(mem/tgt) warm-up
    segments from the previous column's tail (column 0 from the last), only later segments
    scored, the last segment shorter; and the memory of a scored token is full."""
    from mega.plugins.models.transformer_xl import TransformerXLConfig, TransformerXLModel

    torch.manual_seed(0)
    cfg = TransformerXLConfig(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, cutoffs=[40],
                              tgt_len=8, mem_len=8, global_batch_size=2, eval_tgt_len=5, eval_mem_len=7, eval_clamp_len=4,
                              eval_same_length=True, eval_batch_size=3)
    model = TransformerXLModel(cfg, 60).double()
    stream = torch.randint(0, 60, (3 * 23 + 2,))
    got = model.evaluate_stream(stream)
    torch.set_grad_enabled(False)
    cols = stream[:69].view(3, 23)
    total, count = 0.0, 0
    for c in range(3):
        prev = cols[(c - 1) % 3]
        text = torch.cat([prev[-10:], cols[c]])  # 2 warm-up segments of 5
        mems = None
        for i in range(0, text.numel() - 1, 5):
            n = min(5, text.numel() - 1 - i)
            x, y = text[i:i + n, None], text[i + 1:i + 1 + n]
            h, mems = model.hidden(x, mems, mem_len=7, clamp_len=4, same_length=True)
            if i >= 10:
                total += float(model.crit.nll(h[:, 0], y).sum())
                count += n
    torch.set_grad_enabled(True)
    assert got["tokens"] == count == 3 * 22
    assert got["loss"] == pytest.approx(total / count, rel=1e-12)
    assert got["perplexity"] == pytest.approx(math.exp(total / count)) and got["bpc"] == pytest.approx(total / count / math.log(2))


def test_evaluation_memory_defaults_are_the_references(tmp_path):
    """The reference's train.py: a model trained without memory (mem_len 0) is evaluated
    without one (not with tgt_len - eval_tgt_len positions), and an eval_tgt_len longer than
    tgt_len + mem_len is refused (its memory would be negative) unless eval_mem_len is given."""
    from mega.errors import ConfigError
    from mega.plugins.models.transformer_xl import TransformerXLConfig, TransformerXLModel

    base = dict(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, cutoffs=[40], global_batch_size=2,
                eval_batch_size=3)
    no_mem = TransformerXLConfig(tgt_len=16, mem_len=0, eval_tgt_len=8, **base)
    assert no_mem.eval_settings()["mem_len"] == 0
    assert TransformerXLConfig(tgt_len=16, mem_len=4, eval_tgt_len=8, **base).eval_settings()["mem_len"] == 12
    torch.manual_seed(0)
    model = TransformerXLModel(no_mem, 60).double()
    stream = torch.randint(0, 60, (3 * 30,))
    got = model.evaluate_stream(stream)
    assert got == model.evaluate_stream(stream, mem_len=0)
    assert got["loss"] != model.evaluate_stream(stream, mem_len=8)["loss"]
    for mem_len in (0, 4):
        with pytest.raises(ConfigError, match=rf"eval_tgt_len=21: must be at most tgt_len \+ mem_len = 16 \+ {mem_len}"):
            TransformerXLConfig(tgt_len=16, mem_len=mem_len, eval_tgt_len=21, **base).check()
    TransformerXLConfig(tgt_len=16, mem_len=4, eval_tgt_len=20, **base).check()
    TransformerXLConfig(tgt_len=16, mem_len=0, eval_tgt_len=21, eval_mem_len=0, **base).check()
