"""`trainer.max_time` (Lightning's Timer: training time over every start) and
`exp_manager.max_time_per_run` (NeMo's StatelessTimer: this start) in NeMo's "DD:HH:MM:SS":
the run stops after the step that reaches the limit, saves, exits 0, every rank at the same
step; what it resumes into ends with an uninterrupted run's losses. Every subprocess has a
timeout."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomli_w

from mega.errors import ConfigError
from mega.testing import read_metrics, tiny_config, tiny_raw

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value, normalised, seconds", [
    ("00:03:55:00", "00:03:55:00", 14100),
    ("2:00:00:01", "02:00:00:01", 2 * 86400 + 1),
    ({"hours": 3, "minutes": 55}, "00:03:55:00", 14100),
    ({"days": 1, "seconds": 90}, "01:00:01:30", 86490),
    ({"weeks": 1}, "07:00:00:00", 7 * 86400),
])
def test_max_time_takes_nemos_string_and_lightnings_table(tmp_path, corpus, value, normalised, seconds):
    config = tiny_config(tmp_path, corpus, trainer={"max_time": value}, exp_manager={"max_time_per_run": value})
    assert config.trainer.max_time == normalised and config.trainer.max_time.seconds == seconds
    assert config.exp_manager.max_time_per_run == normalised


@pytest.mark.parametrize("value", ["03:55:00", "00:24:00:00", "00:00:61:00", "00:00:00:00", {"hours": -1}, {"hour": 1},
                                   3600, True])
def test_a_bad_max_time_is_a_config_error_naming_the_key(tmp_path, corpus, value):
    with pytest.raises(ConfigError, match=r"trainer\.max_time"):
        tiny_config(tmp_path, corpus, trainer={"max_time": value})


def test_max_time_on_the_command_line(tmp_path, corpus):
    config = tiny_config(tmp_path, corpus, overrides=["trainer.max_time=00:00:10:00",
                                                      "exp_manager.max_time_per_run={minutes=5}"])
    assert (config.trainer.max_time.seconds, config.exp_manager.max_time_per_run.seconds) == (600, 300)


@pytest.mark.slow
def test_ranks_take_the_time_decision_together():
    """One all-reduce carries the stop signal and the time decision: a rank whose clock is
    past the limit stops every rank."""
    from mega.testing import run_ranks

    assert run_ranks(_decide, 2) == [(0, 1), (0, 1)]


def _decide(state):
    return state.max_ints(0, 1 if state.rank == 1 else 0)


# --- whole runs ------------------------------------------------------------------------------

def _exp(tmp_path, corpus, max_steps) -> Path:
    raw = tiny_raw(tmp_path, corpus, trainer={"val_check_interval": 0, "accelerator": "cpu", "max_steps": max_steps},
                   model={"hidden_dropout": 0.0, "attention_dropout": 0.0, "micro_batch_size": 4, "global_batch_size": 8})
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def _slow_steps(tmp_path, seconds=0.5) -> dict:
    (tmp_path / "slow_steps.py").write_text(textwrap.dedent(f"""
        import time, mega
        @mega.hookimpl
        def on_step_end(run, step, metrics):
            time.sleep({seconds})
    """))
    return {"MEGA_PLUGIN_MODULES": "slow_steps"}


def _mega(tmp_path, args, env=None, timeout=180):
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "mega", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _latest(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])


def _losses(run_dir: Path) -> dict:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


@pytest.mark.slow
def test_max_time_stops_with_a_checkpoint_and_the_runs_resumed_after_it_equal_an_uninterrupted_one(tmp_path, corpus):
    exp = _exp(tmp_path, corpus, max_steps=8)
    slow = _slow_steps(tmp_path)
    straight = _mega(tmp_path, ["run", str(exp), "exp_manager.name=straight"])
    assert straight.returncode == 0, straight.stderr

    # trainer.max_time: the budget of the whole run
    first = _mega(tmp_path, ["run", str(exp), "exp_manager.name=budget", "trainer.max_time={seconds=2}"], slow)
    assert first.returncode == 0, first.stderr
    assert "trainer.max_time=00:00:00:02 reached after step" in first.stderr, first.stderr
    budget = tmp_path / "results" / "budget"
    stopped_at = _latest(budget)
    assert 1 <= stopped_at < 8, stopped_at
    spent = _mega(tmp_path, ["run", str(exp), "exp_manager.name=budget", "trainer.max_time={seconds=2}"], slow)
    assert spent.returncode == 0 and "nothing to do: trainer.max_time=00:00:00:02 is spent" in spent.stderr, spent.stderr
    assert _latest(budget) == stopped_at  # the checkpoint carried the time trained
    rest = _mega(tmp_path, ["run", str(exp), "exp_manager.name=budget"])  # the limit lifted: trains on
    assert rest.returncode == 0 and "resumed from" in rest.stderr, rest.stderr
    assert _losses(budget) == _losses(tmp_path / "results" / "straight")

    # exp_manager.max_time_per_run: each start trains about two seconds, the next one resumes
    per_run = tmp_path / "results" / "per_run"
    starts, messages = [], []
    for _ in range(8):
        proc = _mega(tmp_path, ["run", str(exp), "exp_manager.name=per_run", "exp_manager.max_time_per_run={seconds=2}"],
                     slow)
        assert proc.returncode == 0, proc.stderr
        starts.append(_latest(per_run))
        messages.append(proc.stderr)
        if starts[-1] == 8:
            break
    assert len(starts) >= 2 and starts == sorted(set(starts)), starts
    assert f"exp_manager.max_time_per_run=00:00:00:02 reached after step {starts[0]} " in messages[0], messages[0]
    assert "re-run the same command to resume" in messages[0]
    assert _losses(per_run) == _losses(tmp_path / "results" / "straight")


@pytest.mark.slow
def test_one_ranks_clock_past_the_limit_stops_every_rank_at_the_same_step(tmp_path, corpus):
    """Rank 1's clock alone passes exp_manager.max_time_per_run at step 2: both ranks stop
    there (had rank 1 stopped alone, rank 0 would wait in the next step's all-reduce)."""
    (tmp_path / "late_clock.py").write_text(textwrap.dedent("""
        import os, mega
        @mega.hookimpl
        def on_step_end(run, step, metrics):
            if step == 2 and os.environ["RANK"] == "1":
                run.started_at -= 2 * 86400  # this rank's clock says two days have passed
    """))
    exp = _exp(tmp_path, corpus, max_steps=8)
    proc = _mega(tmp_path, ["run", str(exp), "trainer.devices=2", "trainer.dist_timeout_s=30",
                            "exp_manager.max_time_per_run=01:00:00:00"], {"MEGA_PLUGIN_MODULES": "late_clock"})
    assert proc.returncode == 0, proc.stderr
    assert _latest(tmp_path / "results" / "tiny") == 2
    assert [m["step"] for m in read_metrics(tmp_path / "results" / "tiny") if "loss" in m] == [1, 2]
