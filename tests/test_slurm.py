"""SLURM: `srun mega run ...` makes each task one worker (ranks, world size and master
address from the SLURM_* variables, nothing launched on top), settings that contradict the
allocation are refused naming keys and variables, and SIGUSR1 (SLURM's warning before the
time limit) saves and exits 138 so a requeued job resumes where it stopped.

The tasks of an srun step are played on loopback by processes started with the variables
srun sets (no srun binary). Every subprocess has a timeout."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from mega.errors import ConfigError
from mega.runtime.slurm import adopt_srun_task, expand_hostlist, srun_task
from mega.testing import read_metrics, tiny_raw

ROOT = Path(__file__).resolve().parents[1]
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("spec, hosts", [
    ("node07", ["node07"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu[9-11]", ["gpu9", "gpu10", "gpu11"]),
    ("a[1-2]-ib,b3", ["a1-ib", "a2-ib", "b3"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("host1,host2 host3", ["host1", "host2", "host3"]),
    ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
])
def test_node_lists_expand_as_slurm_writes_them(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["node[03-01]", "node[01-03", "node01]", "node[a-b]"])
def test_a_malformed_node_list_is_a_config_error_naming_the_variable(spec):
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        expand_hostlist(spec)


def _task_env(rank, ntasks, local, nodes=1, nodelist="node[01-02]", job_id="4123456", **extra):
    return {"SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(ntasks),
            "SLURM_LOCALID": str(local), "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": nodelist,
            "SLURM_JOB_NAME": "train", **extra}


def test_an_srun_task_reads_rank_world_size_local_rank_and_master_from_slurm():
    task = srun_task(_task_env(5, 8, 1, nodes=2))
    assert (task.rank, task.world_size, task.local_rank, task.num_nodes) == (5, 8, 1, 2)
    assert task.master_addr == "node01"
    assert task.master_port == 15000 + 3456  # the last four digits of the job id, as Lightning
    step = _task_env(0, 2, 0, SLURM_STEP_NODELIST="node02")  # srun on a part of the allocation
    assert srun_task(step).master_addr == "node02"


def test_the_batch_script_and_interactive_jobs_are_not_srun_tasks():
    batch = _task_env(0, 8, 0)
    del batch["SLURM_STEP_ID"]  # the batch script has SLURM_NTASKS and SLURM_PROCID, but is no task of a step
    assert srun_task(batch) is None
    assert srun_task(_task_env(0, 8, 0, SLURM_JOB_NAME="interactive")) is None
    assert srun_task({}) is None


@pytest.fixture
def slurm_env(monkeypatch):
    """Set SLURM variables for one test. Adopting a task writes RANK, WORLD_SIZE, ... into
    os.environ itself, which monkeypatch does not see: the whole environment is put back
    afterwards, or a later in-process run of the session would wait for 3 peers."""
    import mega.runtime.slurm as slurm

    saved = dict(os.environ)
    for k in TORCH_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(slurm, "_ADOPTED", False)

    def set_env(**env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    yield set_env
    os.environ.clear()
    os.environ.update(saved)


def test_adopting_an_srun_task_sets_what_torch_distributed_reads(slurm_env):
    slurm_env(**_task_env(3, 4, 1, nodes=2))
    assert adopt_srun_task(devices=2, num_nodes=2)
    assert {k: os.environ[k] for k in TORCH_VARS} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node01",
        "MASTER_PORT": str(15000 + 3456)}
    assert adopt_srun_task(devices=2, num_nodes=2)  # idempotent


def test_master_address_and_port_set_by_the_cluster_win(slurm_env):
    slurm_env(**_task_env(0, 2, 0), MASTER_ADDR="10.0.0.9", MASTER_PORT="29400")
    assert adopt_srun_task(devices=2, num_nodes=1)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.9", "29400")


def test_one_task_or_torchrun_inside_the_task_is_left_alone(slurm_env):
    slurm_env(**_task_env(0, 1, 0))  # one task: `mega run trainer.devices=N` launches N local workers itself
    assert not adopt_srun_task(devices=4, num_nodes=1)
    assert "RANK" not in os.environ
    # `srun --ntasks-per-node=1 torchrun ...`: a worker torchrun started, whatever its RANK (here equal to SLURM_PROCID)
    slurm_env(**_task_env(0, 2, 0, nodes=2), RANK="0", WORLD_SIZE="16", LOCAL_RANK="0", TORCHELASTIC_RUN_ID="x")
    assert not adopt_srun_task(devices=8, num_nodes=2)  # no ConfigError for 8 x 2 != SLURM_NTASKS=2
    assert os.environ["WORLD_SIZE"] == "16"


@pytest.mark.parametrize("env, devices, nodes, names", [
    (_task_env(0, 8, 0, nodes=2), 1, 1, ("trainer.devices=1", "trainer.num_nodes=1", "SLURM_NTASKS=8")),
    (_task_env(0, 8, 0, nodes=2), 8, 1, ("trainer.devices=8", "trainer.num_nodes=1", "SLURM_NNODES=2")),  # 8 x 1 = 8, on 2 nodes
    (_task_env(0, 8, 0, nodes=1), 4, 2, ("trainer.num_nodes=2", "SLURM_NNODES=1")),
    (_task_env(5, 8, 5, nodes=2), 4, 2, ("SLURM_LOCALID=5", "trainer.devices=4")),  # uneven tasks per node
])
def test_settings_that_contradict_the_allocation_are_refused_naming_keys_and_variables(slurm_env, env, devices, nodes,
                                                                                          names):
    slurm_env(**env)
    with pytest.raises(ConfigError) as info:
        adopt_srun_task(devices, nodes)
    for name in names:
        assert name in str(info.value), str(info.value)
    assert "RANK" not in os.environ  # nothing adopted


def test_a_contradiction_stops_mega_run_with_one_line_and_status_2(tmp_path, corpus):
    exp = _exp(tmp_path, corpus, max_steps=2)
    env = {**_clean_env(tmp_path), **_task_env(0, 4, 0, nodelist="localhost")}
    proc = subprocess.run([sys.executable, "-m", "mega", "run", str(exp), "trainer.devices=2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "trainer.devices=2 x trainer.num_nodes=1 = 2 workers" in proc.stderr and "SLURM_NTASKS=4" in proc.stderr
    assert not (tmp_path / "results" / "tiny").exists()


# --- simulated srun steps on loopback -------------------------------------------------------

def _free_port_job_id() -> str:
    """A SLURM_JOB_ID whose derived port (15000 + its last four digits) is free here."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if 15000 <= port < 25000:
            return f"77{port - 15000:04d}"
    for port in range(15000, 25000, 97):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return f"77{port - 15000:04d}"
    raise RuntimeError("no free port in 15000-24999")


def _exp(tmp_path, corpus, **trainer) -> Path:
    raw = tiny_raw(tmp_path, corpus, trainer={"val_check_interval": 0, "accelerator": "cpu", "dist_timeout_s": 30,
                                              **trainer},
                   model={"hidden_dropout": 0.0, "attention_dropout": 0.0, "micro_batch_size": 4, "global_batch_size": 8})
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def _clean_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in TORCH_VARS}
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{ROOT}"
    return env


def _plugin(tmp_path, name, body) -> dict:
    import textwrap

    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return {"MEGA_PLUGIN_MODULES": name}


def _srun(tmp_path, exp, ntasks, *overrides, extra_env=None, timeout=240) -> list:
    """What `srun --ntasks=N mega run EXP ...` starts on one node: N tasks with srun's
    variables; returns [(task pid, status, stderr)] by rank."""
    job_id = _free_port_job_id()
    procs = []
    for rank in range(ntasks):
        env = {**_clean_env(tmp_path), **_task_env(rank, ntasks, rank, nodes=1, nodelist="localhost", job_id=job_id),
               **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, "-m", "mega", "run", str(exp), *overrides], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                try:
                    os.killpg(q.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _, err = p.communicate()
        out.append((p.pid, p.returncode, err))
    return out


def _losses(run_dir: Path) -> dict:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


@pytest.mark.slow
def test_srun_tasks_are_the_workers_and_a_sigusr1_run_resumes_like_one_process(tmp_path, corpus):
    """Two srun tasks on one node with trainer.devices=2: each task is one worker (its own
    PID trains, as rank SLURM_PROCID; without SLURM support each would launch 2 workers of
    its own). SIGUSR1 reaching one task at step 2 stops both there with a checkpoint, exit
    138; the requeued step resumes and ends with one process's losses."""
    exp = _exp(tmp_path, corpus, max_steps=5)
    one = subprocess.run([sys.executable, "-m", "mega", "run", str(exp), "exp_manager.name=one", "model.micro_batch_size=8"],
                         cwd=tmp_path, env=_clean_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr

    seen = tmp_path / "seen"
    seen.mkdir()
    env = _plugin(tmp_path, "usr1_rank1", f"""
        import os, signal, mega
        @mega.hookimpl
        def on_train_start(run):
            open(os.path.join({str(seen)!r}, f"{{os.getpid()}}"), "w").write(
                f"{{run.parallel.rank}} {{run.parallel.world_size}} {{os.environ.get('TORCHELASTIC_RUN_ID', '-')}}")
        @mega.hookimpl
        def on_step_end(run, step, metrics):
            if step == 2 and run.parallel.rank == 1 and run.resumed_from is None:
                os.kill(os.getpid(), signal.SIGUSR1)  # SLURM signals every task; one is enough to stop all
    """)
    first = _srun(tmp_path, exp, 2, "exp_manager.name=srun", "trainer.devices=2", "model.micro_batch_size=4",
                  extra_env=env)
    for pid, code, err in first:
        assert code == 138, err
    assert "SIGUSR1: checkpoint of step 2 saved at" in first[0][2] and "Traceback" not in first[0][2], first[0][2]
    workers = {int(f.name): f.read_text().split() for f in seen.iterdir()}
    assert workers == {first[0][0]: ["0", "2", "-"], first[1][0]: ["1", "2", "-"]}  # the tasks themselves, no launcher
    run_dir = tmp_path / "results" / "srun"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000002"

    again = _srun(tmp_path, exp, 2, "exp_manager.name=srun", "trainer.devices=2", "model.micro_batch_size=4",
                  extra_env=env)
    for _, code, err in again:
        assert code == 0, err
    assert "resumed from" in again[0][2]
    single, resumed = _losses(tmp_path / "results" / "one"), _losses(run_dir)
    assert sorted(resumed) == sorted(single) == [1, 2, 3, 4, 5]
    for step in single:
        assert resumed[step] == pytest.approx(single[step], rel=1e-5), step


@pytest.mark.slow
def test_sigusr1_to_one_process_saves_exits_138_and_the_rerun_equals_an_uninterrupted_run(tmp_path, corpus):
    exp = _exp(tmp_path, corpus, max_steps=4)
    env = {**_clean_env(tmp_path), **_plugin(tmp_path, "usr1_at_2", """
        import os, signal, mega
        @mega.hookimpl
        def on_step_end(run, step, metrics):
            if step == 2 and run.resumed_from is None:
                os.kill(os.getpid(), signal.SIGUSR1)
    """)}

    def mega_run(name, with_plugin=True):
        return subprocess.run([sys.executable, "-m", "mega", "run", str(exp), f"exp_manager.name={name}"], cwd=tmp_path,
                              env=env if with_plugin else _clean_env(tmp_path), capture_output=True, text=True,
                              timeout=180)

    first = mega_run("stopped")
    assert first.returncode == 138, first.stderr
    assert "SIGUSR1: checkpoint of step 2 saved at" in first.stderr and "scontrol requeue" in first.stderr
    assert "Traceback" not in first.stderr
    second = mega_run("stopped")
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr
    straight = mega_run("straight", with_plugin=False)
    assert straight.returncode == 0, straight.stderr
    assert _losses(tmp_path / "results" / "stopped") == _losses(tmp_path / "results" / "straight")


@pytest.mark.slow
def test_sigusr1_to_the_local_launcher_reaches_the_workers_and_exits_138(tmp_path, corpus):
    """`mega run ... trainer.devices=2` inside a one-task SLURM step: SLURM's SIGUSR1 to the
    launcher (torch's elastic agent does not handle it: it would die) is forwarded."""
    env = {**_clean_env(tmp_path), **_plugin(tmp_path, "usr1_launcher", """
        import os, signal, mega
        @mega.hookimpl
        def on_step_end(run, step, metrics):
            if step == 2 and os.environ["RANK"] == "0":
                os.kill(os.getppid(), signal.SIGUSR1)  # the launching process
    """)}
    exp = _exp(tmp_path, corpus, max_steps=8)
    proc = subprocess.run([sys.executable, "-m", "mega", "run", str(exp), "trainer.devices=2", "model.micro_batch_size=4"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 138, proc.stderr
    assert "SIGUSR1: the workers stopped" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    latest = (tmp_path / "results" / "tiny" / "checkpoints" / "latest").read_text().strip()
    assert "step_0000002" <= latest < "step_0000008", latest
