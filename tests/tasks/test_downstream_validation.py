"""A fine-tuning run logs its task's published metrics at each validation (`val_accuracy`,
`val_f1`, ...) beside `val_loss`, over the whole valid split, equal to what `mega evaluate
--split valid` reports for the checkpoint of the same step; no prediction files are written
while training. The kernel side is a general contract (mega.protocols.ValidationMetrics):
any model may report metrics at validation, and a model without them logs what it did.
Multi-process layouts (TP, DP, PP) are in test_downstream_parallel.py."""
from __future__ import annotations

import json

import pytest
import torch

import mega
from mega import protocols as P
from mega.cli import main
from mega.config import config_from_dict
from mega.plugins.models.gpt import GPTConfig, GPTModel
from mega.testing import read_metrics, register_plugin
from tests.helpers.tasks import task_files as _files, task_raw as _raw


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("validation"))["dir"]


def test_task_metrics_are_logged_at_validation_and_equal_mega_evaluate(plugins, data, tmp_path, capsys):
    raw = _raw(data, tmp_path, "qa", {
        "name": "question_answering", "train_ds": str(data / "squad.json"), "validation_ds": str(data / "squad.json"),
        "dataset": {"max_seq_length": 32, "doc_stride": 8, "max_query_length": 8}}, steps=10)
    raw["trainer"].update({"val_check_interval": 5, "limit_val_batches": 1})
    run = mega.run(config_from_dict(raw, [], plugins), plugins)
    assert isinstance(run.model, P.ValidationMetrics)
    lines = [m for m in read_metrics(run.run_dir) if "val_loss" in m]
    assert [m["step"] for m in lines] == [5, 10]
    for m in lines:
        assert {"val_exact_match", "val_f1", "val_total"} <= set(m) and m["val_total"] == 2
    assert not (run.run_dir / "predictions").exists()  # training writes no prediction files
    capsys.readouterr()
    assert main(["evaluate", str(run.run_dir), "--split", "valid"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert 0.0 < evaluated["f1"]  # a model that has learnt something: the numbers say which samples were scored
    for name in ("exact_match", "f1"):
        assert lines[-1][f"val_{name}"] == pytest.approx(evaluated[name], rel=1e-9), name


def test_text_classification_reports_accuracy_and_macro_f1(plugins, data, tmp_path):
    raw = _raw(data, tmp_path, "tc", {
        "name": "text_classification", "train_ds": {"file_path": str(data / "sentiment.tsv")},
        "validation_ds": {"file_path": str(data / "sentiment.tsv")}, "dataset": {"num_classes": 2, "max_seq_length": 16}},
        steps=1)
    raw["trainer"]["val_check_interval"] = 1
    run = mega.run(config_from_dict(raw, [], plugins), plugins)
    (line,) = [m for m in read_metrics(run.run_dir) if "val_loss" in m]
    expected = run.model.evaluate(None, "valid", run.tokenizer, run.config)  # the task's own report
    assert {f"val_{k}": v for k, v in expected.items()} == {k: pytest.approx(line[k]) for k in line if k.startswith("val_")
                                                           and k[4:] in expected}
    assert {"val_accuracy", "val_macro_f1", "val_micro_f1", "val_weighted_f1"} <= set(line)


class ScoredGPT(GPTModel):
    """A GPT that reports a metric of its own at validation, and what it saw when asked."""

    calls = 0
    seen = []

    def validation_metrics(self, run):
        type(self).calls += 1
        type(self).seen.append((self.training, torch.is_grad_enabled()))
        return {"calls": type(self).calls, "loss": -1.0}  # "loss" must not replace the kernel's val_loss


class ScoredGPTPlugin:
    @mega.hookimpl
    def register_models(self, register):
        register("scored_gpt", lambda config, tokenizer, plugins: ScoredGPT(config, tokenizer.vocab_size), config=GPTConfig)


def test_any_model_may_report_metrics_at_validation_and_others_log_only_their_loss(mega_experiment):
    plain = mega_experiment.run(exp_manager={"name": "plain"})
    assert not isinstance(plain.model, P.ValidationMetrics)
    val = [m for m in read_metrics(plain.run_dir) if "val_loss" in m]
    assert val and all(set(m) == {"step", "val_loss"} for m in val)
    with register_plugin(ScoredGPTPlugin()) as plugins:
        scored = mega_experiment.run(exp_manager={"name": "scored"}, model={"name": "scored_gpt"}, plugins=plugins)
    val = [m for m in read_metrics(scored.run_dir) if "val_loss" in m]
    assert [m["val_calls"] for m in val] == [1.0, 2.0]
    assert all(m["val_loss"] > 0 for m in val) and ScoredGPT.seen == [(False, False)] * 2
