"""A task is one registration, built one way.

`register_tasks` declares a task (name, Task class, config class); the kernel makes the
name a model too, whose factory builds the task and asks it for its model. The run's data,
its validation metrics, `mega evaluate` and `mega predict` then all read that one task
object: each split's samples are built once per run."""
from __future__ import annotations

from collections import Counter

import pytest
from attrs import define

import mega
from mega.config import config_from_dict
from mega.errors import PluginError
from mega.plugin_manager import load_plugins
from mega.plugins.tasks.text_classification import TextClassificationConfig, TextClassificationTask
from mega.testing import read_metrics
from tests.helpers.tasks import task_files as _files, task_raw as _raw

FIRST_PARTY = ("question_answering", "text_classification", "token_classification", "relation_extraction",
               "multiple_choice")


@define(kw_only=True)
class CountingConfig(TextClassificationConfig):
    name: str = "counting_sentiment"


BUILT = Counter()


class CountingTask(TextClassificationTask):
    """A third-party task: text classification that counts what it builds."""

    def __init__(self, config):
        super().__init__(config)
        BUILT["tasks"] += 1

    def build_samples(self, split, tokenizer):
        BUILT[split] += 1
        return super().build_samples(split, tokenizer)


class CountingPlugin:
    @mega.hookimpl
    def register_tasks(self, register):
        register("counting_sentiment", CountingTask, config=CountingConfig)


def test_first_party_tasks_are_one_registration_each(plugins):
    from mega.registry import TaskModelFactory

    for name in FIRST_PARTY:
        task, model = plugins.tasks.get(name), plugins.models.get(name)
        assert isinstance(model.factory, TaskModelFactory) and model.factory.task is task.factory
        assert model.config is task.config and model.plugin == task.plugin == name
        assert plugins.info[name].hooks == ["register_tasks"] and plugins.info[name].components == {"tasks": [name]}


@pytest.mark.slow
def test_a_third_party_task_trains_from_its_one_registration(tmp_path):
    d = _files(tmp_path / "data")["dir"]
    p = load_plugins(extra=[CountingPlugin()])
    assert p.models.get("counting_sentiment").config is CountingConfig
    raw = _raw(d, tmp_path, "counting", {"name": "counting_sentiment", "train_ds": str(d / "sentiment.tsv"),
                                         "validation_ds": str(d / "sentiment.tsv"),
                                         "dataset": {"num_classes": 2, "max_seq_length": 16}}, steps=4)
    raw["trainer"].update({"val_check_interval": 2, "log_every_n_steps": 2})
    BUILT.clear()
    run = mega.run(config_from_dict(raw, [], p), p)
    assert isinstance(run.model.downstream_task, CountingTask)
    # one task for config.check, one for the model; the model's serves the data, the loss
    # pass and the metrics of both validations: each split's samples are built once
    assert BUILT == {"tasks": 2, "train": 1, "valid": 1}
    validations = [m for m in read_metrics(run.run_dir) if "val_loss" in m]
    assert [m["step"] for m in validations] == [2, 4] and all("val_accuracy" in m for m in validations)


def test_a_task_registered_as_a_model_too_is_refused():
    class Twice(CountingPlugin):
        @mega.hookimpl
        def register_models(self, register):
            register("counting_sentiment", lambda config, tokenizer, plugins: None, config=CountingConfig)

    with pytest.raises(PluginError, match="task 'counting_sentiment' .* also registered as a model"):
        load_plugins(extra=[Twice()])
