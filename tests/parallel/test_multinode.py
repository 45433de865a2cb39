"""Two machines, played by two `torchrun --nnodes 2` node launchers on this one (loopback
rendezvous, gloo on CPU): they train like one process of the same global batch, and after
one node is killed mid-run, restarting both resumes and ends exactly where an
uninterrupted two-node run ends. Every subprocess has a timeout."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from mega.testing import read_metrics, tiny_raw

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exp(tmp_path, corpus, **trainer) -> Path:
    raw = tiny_raw(tmp_path, corpus, trainer={"val_check_interval": 0, "accelerator": "cpu", "dist_timeout_s": 10, **trainer},
                   model={"hidden_dropout": 0.0, "attention_dropout": 0.0, "micro_batch_size": 4, "global_batch_size": 8})
    raw["exp_manager"]["checkpoint"] = {"every_n_train_steps": 3, "keep_last_k": 0}
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def _nodes(tmp_path, exp: Path, name: str, *overrides, env=None) -> list:
    """Start the two node launchers of `torchrun --nnodes 2 --nproc-per-node 1 ... -m mega run`."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}",
               "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "mega", "run", str(exp),
               f"exp_manager.name={name}", "trainer.num_nodes=2", *overrides]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    return procs


def _wait(procs, timeout=240) -> list:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            _, err = p.communicate()
        out.append((p.returncode, err))
    return out


def _losses(run_dir: Path) -> dict:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


@pytest.mark.slow
def test_two_nodes_train_like_one_process_and_resume_after_a_node_is_killed(tmp_path, corpus):
    exp = _exp(tmp_path, corpus, max_steps=6)
    one = subprocess.run([sys.executable, "-m", "mega", "run", str(exp), "exp_manager.name=one", "model.micro_batch_size=8"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=240)
    assert one.returncode == 0, one.stderr
    for code, err in _wait(_nodes(tmp_path, exp, "straight")):
        assert code == 0, err
    single, straight = _losses(tmp_path / "results" / "one"), _losses(tmp_path / "results" / "straight")
    assert sorted(straight) == sorted(single)
    for step in single:
        assert straight[step] == pytest.approx(single[step], rel=1e-5), step

    # Node 1 dies mid-run (its worker kills its node launcher, then itself, at step 4: after
    # the checkpoint of step 3); node 0 must stop rather than hang; both restarted, the run
    # resumes from step 3 and ends with the uninterrupted run's losses.
    (tmp_path / "kill_node1.py").write_text(
        "import os, signal, mega\n@mega.hookimpl\ndef on_step_end(run, step, metrics):\n"
        "    if step == 4 and os.environ['RANK'] == '1':\n"
        "        os.kill(os.getppid(), signal.SIGKILL)\n        os.kill(os.getpid(), signal.SIGKILL)\n")
    procs = _nodes(tmp_path, exp, "killed", env={"MEGA_PLUGIN_MODULES": "kill_node1"})
    (code0, err0), (code1, _) = _wait(procs, timeout=180)
    assert code1 != 0 and code0 != 0, err0[-2000:]  # node 0 notices its peer is gone and stops: no hang
    ckpts = tmp_path / "results" / "killed" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000003"
    results = _wait(_nodes(tmp_path, exp, "killed"))  # the same command again on both nodes
    for code, err in results:
        assert code == 0, err[-3000:]
    assert any("resumed from" in err for _, err in results)
    resumed = _losses(tmp_path / "results" / "killed")
    assert sorted(resumed) == sorted(straight) and resumed == straight
