"""Signals and hangs: SIGINT and SIGTERM stop a run after the current step with a checkpoint
(exit 130 / 143), through the launcher too; a second SIGINT aborts at once; a rank stopped
in the middle of a step ends the run within trainer.dist_timeout_s, naming it. Every
subprocess has a timeout."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mega.testing import read_metrics
from tests.helpers.launch import ROOT, experiment as _exp, mega_cli as _mega, plugin_module as _plugin


def test_sigint_sets_the_stop_flag_and_a_second_one_aborts():
    from mega.training.loop import stop_flag

    before = signal.getsignal(signal.SIGINT)
    with stop_flag() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.is_set() and stop.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal decides the exit status
        time.sleep(0.05)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back


def test_the_watchdog_names_a_frozen_rank_and_one_left_behind():
    from mega.runtime.watchdog import Watchdog

    class Store(dict):
        def set(self, k, v):
            self[k] = v

        def check(self, keys):
            return all(k in self for k in keys)

        def multi_get(self, keys):
            return [self[k].encode() for k in keys]

    store, hung = Store(), []
    peers = [Watchdog(store, r, 3, 0.4, interval_s=0.05, on_hang=hung.append if r == 0 else lambda m: None)
             for r in range(3)]
    peers[1].beat(2), peers[2].beat(1)  # rank 2 never reaches step 2
    peers[1].start(), peers[2].start()
    peers[1]._stop.set()  # rank 1 freezes: its heartbeat stops
    w = peers[0]
    w.beat(2)
    w.start()
    deadline = time.monotonic() + 5
    while not hung and time.monotonic() < deadline:
        time.sleep(0.05)
    peers[2].stop(), w._stop.set()
    assert hung, "the watchdog did not fire"
    assert "rank 1 hung: no heartbeat" in hung[0] and "rank 2 hung: still at step 1" in hung[0]


def test_the_heartbeat_carries_the_step_a_rank_is_in_not_the_one_of_its_last_tick():
    """Issue 20: the hung-worker message named the step of a frozen rank's last periodic
    heartbeat (up to `interval` seconds of steps old). A started step is published at once,
    so a rank that freezes mid-step is named at that step."""
    import json

    from mega.runtime.watchdog import Watchdog

    class Store(dict):
        def set(self, k, v):
            self[k] = v

    store = Store()
    w = Watchdog(store, 1, 2, timeout_s=600, interval_s=30)  # ticks far apart, as on a long timeout
    w.beat(1)
    w.start()
    try:
        for step in range(2, 6):  # fast steps, well inside one tick
            w.beat(step)
            time.sleep(0.01)
        deadline = time.monotonic() + 5
        while json.loads(store[w._key(1)])["step"] != 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert json.loads(store[w._key(1)])["step"] == 5
    finally:
        w._stop.set(), w._wake.set()


@pytest.mark.slow
def test_sigint_saves_the_finished_step_exits_130_and_the_rerun_resumes(tmp_path, corpus):
    env = _plugin(tmp_path, "sigint_at_2", """
        import os, signal, mega
        @mega.hookimpl
        def on_step_end(run, step, metrics):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)
    """)
    exp = _exp(tmp_path, corpus, trainer={"max_steps": 4, "val_check_interval": 0})
    first = _mega(["run", str(exp)], tmp_path, env, timeout=120)
    assert first.returncode == 130, first.stderr
    assert "SIGINT: checkpoint of step 2 saved at" in first.stderr and "Traceback" not in first.stderr
    run_dir = tmp_path / "results" / "tiny"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    second = _mega(["run", str(exp)], tmp_path, timeout=120)
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr
    assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_and_exits_143_without_a_traceback(tmp_path, corpus):
    env = _plugin(tmp_path, "term_launcher", """
        import os, signal, mega
        @mega.hookimpl
        def on_step_end(run, step, metrics):
            if step == 2 and os.environ["RANK"] == "0":
                os.kill(os.getppid(), signal.SIGTERM)  # the launching process
    """)
    exp = _exp(tmp_path, corpus, trainer={"max_steps": 8, "val_check_interval": 0})
    proc = _mega(["run", str(exp), "trainer.devices=2", "model.micro_batch_size=2"], tmp_path, env, timeout=180)
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "SIGTERM: the workers stopped" in proc.stderr
    latest = (tmp_path / "results" / "tiny" / "checkpoints" / "latest").read_text().strip()
    assert "step_0000002" <= latest < "step_0000008", latest  # stopped mid-run (the signal takes a step or two)


@pytest.mark.slow
def test_workers_stop_with_a_checkpoint_when_their_launcher_is_killed(tmp_path, corpus):
    """Issue 20: SIGKILL cannot be forwarded, and the workers of a killed launcher trained on
    to the end, each heartbeat to the dead rendezvous store printing a C++ stack trace. They
    now notice, stop after their step with a checkpoint, and say so in a few lines."""
    pids = tmp_path / "pids"
    pids.mkdir()
    env = _plugin(tmp_path, "kill_launcher", f"""
        import os, signal, time, mega
        @mega.hookimpl
        def on_train_start(run):
            open(os.path.join({str(pids)!r}, os.environ["RANK"]), "w").write(str(os.getpid()))
        @mega.hookimpl
        def on_step_end(run, step, metrics):
            if step == 2 and os.environ["RANK"] == "0":
                os.kill(os.getppid(), signal.SIGKILL)  # the launching process: nothing is forwarded
            time.sleep(0.02)  # steps of a few ms: the run would otherwise end before anyone notices
    """)
    exp = _exp(tmp_path, corpus, trainer={"max_steps": 3000, "val_check_interval": 0, "log_every_n_steps": 1})
    proc = subprocess.Popen([sys.executable, "-m", "mega", "run", str(exp), "trainer.devices=2", "model.micro_batch_size=2"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=150)  # the pipes close when the workers have exited too
    finally:
        for f in pids.iterdir():  # never leave a worker behind
            try:
                os.kill(int(f.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    latest = (tmp_path / "results" / "tiny" / "checkpoints" / "latest").read_text().strip()
    assert "step_0000002" <= latest < "step_0003000", latest  # stopped soon after, with a checkpoint
    assert "the launching process" in err and "is gone" in err, err
    assert "frame #" not in err and "Traceback" not in err and len(err.splitlines()) < 12, err


@pytest.mark.slow
def test_a_rank_stopped_inside_backward_ends_the_run_within_the_timeout_naming_it(tmp_path, corpus):
    """Rank 1 freezes (SIGSTOP) in the middle of step 2's backward; rank 0 then waits in
    DDP's gradient all-reduce. The watchdog must end the run within about the timeout."""
    pid_file = tmp_path / "stopped.pid"
    (tmp_path / "stop_in_backward.py").write_text(textwrap.dedent(f"""
        import os, signal, torch, mega
        from mega.plugins.models.gpt import GPTConfig, GPTModel

        class StopInBackward(GPTModel):
            calls = 0

            def training_loss(self, batch):
                out = super().training_loss(batch)
                if torch.is_grad_enabled():
                    StopInBackward.calls += 1
                    if os.environ["RANK"] == "1" and StopInBackward.calls == 3:  # step 2 (2 micro-batches a step)
                        def stop(grad):
                            open({str(pid_file)!r}, "w").write(str(os.getpid()))
                            os.kill(os.getpid(), signal.SIGSTOP)
                            return grad
                        out["loss_sum"].register_hook(stop)
                return out

        @mega.hookimpl
        def register_models(register):
            register("stop_in_backward", lambda config, tok, plugins: StopInBackward(config, tok.vocab_size), config=GPTConfig)
    """))
    env = {"MEGA_PLUGIN_MODULES": "stop_in_backward"}
    exp = _exp(tmp_path, corpus, model={"name": "stop_in_backward", "micro_batch_size": 2, "global_batch_size": 8},
               trainer={"max_steps": 4, "val_check_interval": 0})
    timeout_s = 8
    try:
        t0 = time.monotonic()
        proc = _mega(["run", str(exp), "trainer.devices=2", f"trainer.dist_timeout_s={timeout_s}"], tmp_path, env, timeout=150)
        took = time.monotonic() - t0
    finally:
        if pid_file.exists():  # never leave a stopped process behind
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    assert pid_file.exists(), proc.stderr  # rank 1 did stop inside backward
    assert proc.returncode == 1, proc.stderr
    assert "rank 1 hung: no heartbeat" in proc.stderr, proc.stderr
    assert "last at step 2)" in proc.stderr, proc.stderr  # the step it froze in
    print(f"hung run ended after {took:.1f} s (dist_timeout_s={timeout_s})")
    assert took < 60 + timeout_s, took  # start-up included; without the watchdog it waits for 30 min
