"""Checkpoint mechanics: atomic save, the latest pointer written last, corruption named by
file, fallback to the last good checkpoint, pruning."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mega.errors import CheckpointError
from mega.plugins.checkpoints.native import NativeFormat
from mega.checkpoint import CheckpointManager, resolve_checkpoint, verify


def _state(x: float) -> dict:
    return {"model": {"w": torch.full((4, 4), x)}, "trainer": {"step": int(x)}}


def _manager(tmp_path, k=3):
    return CheckpointManager(tmp_path / "checkpoints", NativeFormat(), keep_last_k=k)


def test_save_then_load_round_trips(tmp_path):
    m = _manager(tmp_path)
    path = m.save(1, _state(1.0), {"config.toml": "a = 1\n"})
    assert (m.root / "latest").read_text().strip() == "step_0000001"
    manifest = verify(path)
    assert set(manifest["files"]) == {"model.pt", "trainer.pt", "config.toml"}
    assert torch.equal(NativeFormat().load(path)["model"]["w"], torch.full((4, 4), 1.0))


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path):
    class Exploding(NativeFormat):
        def save(self, state, directory, parallel=None):
            (directory / "model.pt").write_bytes(b"partial")
            raise OSError("disk full")

    good = _manager(tmp_path)
    good.save(1, _state(1.0), {})
    bad = CheckpointManager(good.root, Exploding())
    with pytest.raises(OSError, match="disk full"):
        bad.save(2, _state(2.0), {})
    assert [p.name for p in good.root.iterdir() if not p.name.startswith("latest")] == ["step_0000001"]
    assert good.latest_good().name == "step_0000001"


@pytest.mark.parametrize("damage,message", [
    (lambda f: f.write_bytes(f.read_bytes()[:-10]), "truncated"),
    (lambda f: f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:]), "corrupt"),
    (lambda f: f.unlink(), "missing"),
])
def test_damaged_file_is_named(tmp_path, damage, message):
    m = _manager(tmp_path)
    path = m.save(1, _state(1.0), {})
    damage(path / "model.pt")
    with pytest.raises(CheckpointError, match=rf"model.pt: .*{message}"):
        verify(path)


def test_missing_manifest_means_incomplete(tmp_path):
    m = _manager(tmp_path)
    path = m.save(1, _state(1.0), {})
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json: missing; the checkpoint is incomplete"):
        verify(path)


def test_resume_falls_back_to_the_newest_good_checkpoint(tmp_path, caplog):
    m = _manager(tmp_path)
    m.save(1, _state(1.0), {})
    latest = m.save(2, _state(2.0), {})
    (latest / "trainer.pt").write_bytes(b"garbage")
    assert m.latest_good().name == "step_0000001"
    assert "trainer.pt" in caplog.text


def test_keep_last_k(tmp_path):
    m = _manager(tmp_path, k=2)
    for step in range(1, 6):
        m.save(step, _state(float(step)), {})
    assert [p.name for p in m.checkpoints()] == ["step_0000004", "step_0000005"]


def test_resave_of_the_same_step_replaces_it(tmp_path):
    m = _manager(tmp_path)
    m.save(3, _state(1.0), {})
    path = m.save(3, _state(9.0), {})
    assert torch.equal(NativeFormat().load(path)["model"]["w"], torch.full((4, 4), 9.0))
    assert json.loads((path / "manifest.json").read_text())["step"] == 3


def test_resolve_accepts_run_dir_checkpoints_dir_and_checkpoint(tmp_path):
    m = _manager(tmp_path)
    path = m.save(7, _state(1.0), {})
    assert resolve_checkpoint(tmp_path) == path
    assert resolve_checkpoint(m.root) == path
    assert resolve_checkpoint(path) == path
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path / "elsewhere")


def test_training_refuses_when_no_checkpoint_verifies(tmp_path, corpus, plugins):
    from mega.training.loop import train
    from mega.training.run import build_run
    from mega.testing import tiny_config

    cfg = tiny_config(tmp_path, corpus, plugins, trainer={"max_steps": 1, "val_check_interval": 0})
    run = build_run(cfg, plugins)
    train(run)
    (run.checkpoints.checkpoints()[0] / "model.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="none verifies"):
        build_run(cfg, plugins)


class _SlowSecondRank(NativeFormat):
    """Each model-parallel rank writes its own part; rank 1 writes half, pauses, then the
    rest. A manifest listed while it pauses would record half a file."""

    def save(self, state, directory, parallel=None):
        import time

        with (directory / f"part{parallel.rank}.bin").open("wb") as f:
            f.write(b"x" * 1000)
            if parallel.rank == 1:
                f.flush()
                time.sleep(1.0)
                f.write(b"x" * 1000)


def _save_and_verify(parallel, root):
    path = CheckpointManager(Path(root), _SlowSecondRank()).save(1, {}, {}, parallel=parallel)
    return verify(path)["files"]


def test_the_manifest_waits_for_every_ranks_part(tmp_path):
    """Rank 0 writes the manifest only when every rank's part is whole on disk (seen
    under load: a TP=2 checkpoint whose manifest had rank 1's optimizer.pt half written)."""
    from mega.testing import run_ranks

    files = run_ranks(_save_and_verify, world=2, tp=2, args=(str(tmp_path / "checkpoints"),))
    assert files[0]["part1.bin"]["size"] == 2000 and files[0]["part0.bin"]["size"] == 1000
