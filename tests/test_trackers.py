"""Experiment trackers as loggers (`wandb`, `mlflow`), switched on with NeMo's exp_manager
keys: what they logged is read back with the trackers' own code (W&B's offline run file
through its protobuf records, MLflow's file store through MlflowClient) and equals
metrics.jsonl step by step; the resolved config is the run's parameters; a resumed run
continues the same tracker run; a missing package or a wrong setting stops the run before
it starts, naming the extra or the key."""
from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from mega.config import to_dict
from mega.errors import ConfigError
from mega.testing import TinyExperiment, read_metrics, run_cli, write_corpus

TRAIN = {"max_steps": 4, "val_check_interval": 2, "limit_val_batches": 1, "log_every_n_steps": 1}


@pytest.fixture
def exp(tmp_path):
    return TinyExperiment(tmp_path, write_corpus(tmp_path / "corpus.txt", lines=120))


def _jsonl(run_dir: Path):
    lines = read_metrics(run_dir)
    train = {r["step"]: r for r in lines if "loss" in r}
    val = {r["step"]: r for r in lines if "val_loss" in r}
    return train, val


# --- switching them on, and what stops a run before it starts ----------------------------------


def test_nemo_switches_add_the_trackers_once(exp):
    em = exp.config(exp_manager={"loggers": ["jsonl", "mlflow"], "create_wandb_logger": True,
                                 "create_mlflow_logger": True}).exp_manager
    assert em.logger_names() == ["jsonl", "mlflow", "wandb"]
    assert exp.config().exp_manager.logger_names() == ["jsonl"]


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
@pytest.mark.parametrize("switch", ["create", "list"])
def test_a_missing_package_names_the_extra_before_anything_is_written(exp, monkeypatch, capsys, tracker, switch):
    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed: find_spec -> None, import fails
    em = {f"create_{tracker}_logger": True} if switch == "create" else {"loggers": ["jsonl", tracker]}
    assert run_cli(["run", exp.toml(trainer=TRAIN, exp_manager=em)]) == 2
    err = capsys.readouterr().err
    key = f"exp_manager.create_{tracker}_logger" if switch == "create" else "exp_manager.loggers"
    assert f"{key}: the {tracker} logger needs the `{tracker}` package" in err
    assert f"pip install 'mega-lm[{tracker}]'" in err
    assert not exp.run_dir().exists()


@pytest.mark.parametrize("kwargs,message", [
    ({"wandb_logger_kwargs": {"projct": "p"}}, "exp_manager.wandb_logger_kwargs.projct: unknown key, did you mean project?"),
    ({"wandb_logger_kwargs": {"offline": "yes"}}, "exp_manager.wandb_logger_kwargs.offline: expected a boolean"),
    ({"wandb_logger_kwargs": {"log_model": True}}, "exp_manager.wandb_logger_kwargs.log_model: uploading checkpoints"),
    ({"mlflow_logger_kwargs": {"experiment": "e"}}, "exp_manager.mlflow_logger_kwargs.experiment: unknown key"),
    ({"mlflow_logger_kwargs": {"log_model": True}}, "exp_manager.mlflow_logger_kwargs.log_model: uploading checkpoints"),
])
def test_wrong_settings_name_their_key_before_anything_is_written(exp, capsys, kwargs, message):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    em = {"create_wandb_logger": True, "create_mlflow_logger": True, **kwargs}
    assert run_cli(["run", exp.toml(trainer=TRAIN, exp_manager=em)]) == 2
    assert message in capsys.readouterr().err
    assert not exp.run_dir().exists()


# --- W&B: the offline run file, read back -------------------------------------------------------


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (`run-<id>.wandb`): a 7-byte header, then
    LevelDB-log chunks (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB
    blocks, each record one `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # the zero padding at a block's end
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a run file once W&B has written all of it. `run.finish()` hands the
    run's end to W&B's service process, which writes the file on its own time (at exit,
    the W&B library waits for it); the `exit` record is its last."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(wandb_records(path))
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
        except Exception:  # a record still being written
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: W&B did not finish writing the run within {timeout:.0f} s")
        time.sleep(0.2)


def wandb_run(path: Path) -> dict:
    """What one offline run file holds: its id, name, project, config and history rows."""
    out = {"history": [], "config": {}}
    for rec in finished_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, name=rec.run.display_name, project=rec.run.project)
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update if i.key})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return out


def wandb_runs(save_dir: Path) -> list:
    return [wandb_run(f) for f in sorted((save_dir / "wandb").glob("offline-run-*/run-*.wandb"))]


@pytest.fixture
def offline_wandb(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network whatever the settings say
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)


def _wandb_rows(history: list, split: str) -> dict:
    return {int(row["trainer/global_step"]): row for row in history if any(k.startswith(f"{split}/") for k in row)}


def test_wandb_gets_every_metric_and_the_config_and_a_resumed_run_continues_it(exp, offline_wandb):
    em = {"create_wandb_logger": True, "wandb_logger_kwargs": {"name": "tiny-gpt", "project": "mega-tests", "offline": True},
          "checkpoint": {"every_n_train_steps": 2}}
    first = exp.run(trainer={**TRAIN, "max_steps": 2}, exp_manager=em)
    run_dir = first.run_dir
    (one,) = wandb_runs(run_dir)
    assert (one["name"], one["project"]) == ("tiny-gpt", "mega-tests")
    assert one["config"]["model"] == to_dict(first.config)["model"]
    assert one["config"]["trainer"]["max_steps"] == 2
    stored = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    assert stored["id"] == one["id"]

    resumed = exp.run(trainer=TRAIN, exp_manager=em)  # 2 more steps: resumes from the step-2 checkpoint
    assert resumed.resumed_from is not None
    runs = wandb_runs(run_dir)
    assert [r["id"] for r in runs] == [one["id"]] * 2  # the same W&B run, continued
    assert runs[1]["config"]["trainer"]["max_steps"] == 4  # the resolved config of the resumed run
    history = [row for r in runs for row in r["history"]]
    train, val = _jsonl(run_dir)
    logged = _wandb_rows(history, "train")
    assert sorted(logged) == sorted(train) == [1, 2, 3, 4]
    for step, line in train.items():
        for name, value in line.items():
            if name != "step":
                assert logged[step][f"train/{name}"] == pytest.approx(value, rel=1e-12), (step, name)
    logged_val = _wandb_rows(history, "val")
    assert sorted(logged_val) == sorted(val) == [2, 4]
    assert all(logged_val[s]["val/val_loss"] == pytest.approx(val[s]["val_loss"], rel=1e-12) for s in val)


def test_a_run_from_step_zero_opens_a_new_wandb_run_and_an_id_pins_one(exp, offline_wandb):
    em = {"create_wandb_logger": True, "wandb_logger_kwargs": {"offline": True}, "resume_if_exists": False}
    exp.run(trainer={**TRAIN, "max_steps": 1}, exp_manager={**em, "name": "a"})
    exp.run(trainer={**TRAIN, "max_steps": 1}, exp_manager={**em, "name": "a"})  # not resumed: starts from step 0
    first, second = wandb_runs(exp.run_dir("a"))
    assert first["id"] != second["id"] and first["name"] == "a"  # exp_manager.name is the default display name
    pinned = {**em, "name": "b", "wandb_logger_kwargs": {"offline": True, "version": "nemo-version-1", "prefix": "gpt"}}
    exp.run(trainer={**TRAIN, "max_steps": 1}, exp_manager=pinned)
    (run,) = wandb_runs(exp.run_dir("b"))
    assert run["id"] == "nemo-version-1"  # Lightning's `version` is the run id, as NeMo passes it
    assert any("gpt-train/loss" in row for row in run["history"])


# --- MLflow: the file store, read back ----------------------------------------------------------


@pytest.fixture
def file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its file store without it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return (tmp_path / "mlruns").as_uri()


def test_mlflow_gets_every_metric_and_the_config_and_a_resumed_run_continues_it(exp, file_store):
    from mlflow.tracking import MlflowClient

    from mega.plugins.loggers.trackers import flat_params

    em = {"create_mlflow_logger": True, "checkpoint": {"every_n_train_steps": 2},
          "mlflow_logger_kwargs": {"experiment_name": "mega-tests", "tracking_uri": file_store, "tags": {"team": "lm"}}}
    first = exp.run(trainer={**TRAIN, "max_steps": 2}, exp_manager=em)
    client = MlflowClient(tracking_uri=file_store)
    run_id = json.loads((first.run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny" and run.data.tags["team"] == "lm"
    assert client.get_experiment(run.info.experiment_id).name == "mega-tests"
    assert run.data.params == flat_params(first.config, 6000)
    assert run.data.params["model.hidden_size"] == "32" and run.data.params["trainer.max_steps"] == "2"

    resumed = exp.run(trainer=TRAIN, exp_manager=em)
    assert resumed.resumed_from is not None
    assert json.loads((first.run_dir / "trackers.json").read_text())["mlflow"]["run_id"] == run_id
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]  # no second run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.max_steps"] == "2"  # MLflow keeps a parameter; the change is a tag
    assert run.data.tags["config_change.trainer.max_steps"] == "2 -> 4 at step 2"
    train, val = _jsonl(first.run_dir)
    for name in train[1]:
        if name == "step":
            continue
        history = {m.step: m.value for m in client.get_metric_history(run_id, f"train/{name}")}
        assert sorted(history) == [1, 2, 3, 4], name
        assert all(history[s] == pytest.approx(train[s][name], rel=1e-12) for s in train), name
    history = {m.step: m.value for m in client.get_metric_history(run_id, "val/val_loss")}
    assert history == pytest.approx({s: v["val_loss"] for s, v in val.items()}, rel=1e-12)


def test_nemo_defaults_name_the_experiment_and_a_run_id_reopens_a_run(exp, file_store, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # NeMo's default store is ./mlruns
    exp.run(trainer={**TRAIN, "max_steps": 1}, exp_manager={"create_mlflow_logger": True, "name": "nemo"})
    client = MlflowClient(tracking_uri=file_store)
    experiment = client.get_experiment_by_name("nemo")  # experiment_name defaults to exp_manager.name
    (run,) = client.search_runs([experiment.experiment_id])
    em = {"create_mlflow_logger": True, "name": "other", "mlflow_logger_kwargs": {"run_id": run.info.run_id, "prefix": "p"}}
    exp.run(trainer={**TRAIN, "max_steps": 1}, exp_manager=em)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "p-train/loss")] == [1]


def test_a_store_mlflow_cannot_open_stops_the_run_before_its_first_step(exp, file_store, capsys):
    em = {"create_mlflow_logger": True, "mlflow_logger_kwargs": {"tracking_uri": "nosuchscheme://store"}}
    assert run_cli(["run", exp.toml(trainer=TRAIN, exp_manager=em)]) == 2
    assert "exp_manager.mlflow_logger_kwargs: MLflow cannot log to nosuchscheme://store" in capsys.readouterr().err
    assert not list(exp.run_dir().glob("checkpoints/*"))


def test_the_settings_are_structured_strictly():
    pytest.importorskip("mlflow")
    from mega.plugins.loggers.mlflow_logger import MlflowSettings
    from mega.plugins.loggers.trackers import read_settings

    class Em:
        mlflow_logger_kwargs = {"tags": {"a": 1}, "save_dir": 3}

    class Config:
        exp_manager = Em()

    with pytest.raises(ConfigError, match=r"exp_manager.mlflow_logger_kwargs.save_dir: expected a string"):
        read_settings(Config(), "mlflow", MlflowSettings)


def test_a_tracker_can_be_added_when_a_run_resumes(exp, file_store):
    """Switching a tracker on is a change a resumed run takes (exp_manager's logging keys
    are resume-safe): the run goes on from its checkpoint and logs from there."""
    from mlflow.tracking import MlflowClient

    exp.run(trainer={**TRAIN, "max_steps": 2})
    em = {"create_mlflow_logger": True, "mlflow_logger_kwargs": {"tracking_uri": file_store}}
    resumed = exp.run(trainer=TRAIN, exp_manager=em)
    assert resumed.resumed_from is not None
    run_id = json.loads((resumed.run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    assert [m.step for m in MlflowClient(tracking_uri=file_store).get_metric_history(run_id, "train/loss")] == [3, 4]
