"""`mega evaluate RUN --harness TASKS` reaches the harness a plugin registers
(`register_evaluation_harnesses`) with the checkpoint, the tasks and the options, and
writes what it returns; the kernel never imports the plugin. Runs without lm-eval."""
from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest

import mega
from mega.errors import PluginError
from mega.testing import TinyExperiment, write_corpus


class RecordingHarness:
    """A harness named `lm_eval` that records its call and returns fixed results."""

    calls: list = []

    @mega.hookimpl
    def register_evaluation_harnesses(self, register):
        def run(checkpoint, tasks, options, plugins):
            self.calls.append((checkpoint, tasks, dict(options)))
            return {"results": {t: {"acc,none": 0.5} for t in tasks}, "versions": {t: 1 for t in tasks}}

        register("lm_eval", run)


def _plugins(harness):
    from mega.plugin_manager import load_plugins

    ours = ",".join(sorted(ep.name for ep in entry_points(group="mega.plugins")
                           if ep.dist and ep.dist.name == "mega-lm" and ep.name != "lm_eval_harness"))
    return load_plugins(extra=[harness], only=ours)


def test_the_harness_gets_the_checkpoint_tasks_and_options_and_its_results_are_written(tmp_path, capsys):
    from mega.cli import _parser
    from mega.evaluation import evaluate_command

    harness = RecordingHarness()
    plugins = _plugins(harness)
    run = TinyExperiment(tmp_path, write_corpus(tmp_path / "c.txt", lines=60)).run(
        trainer={"max_steps": 1, "val_check_interval": 0}, plugins=plugins)
    args = _parser().parse_args(["evaluate", str(run.run_dir), "model.micro_batch_size=2", "--harness", "a,b c",
                                 "--include-path", "mine", "--num-fewshot", "2", "--limit", "3", "--batch-size", "4",
                                 "--device", "cpu"])
    assert evaluate_command(args, plugins)[0] == 0
    assert harness.calls == [(str(run.run_dir), ["a", "b", "c"], {
        "include_path": "mine", "num_fewshot": 2, "limit": 3.0, "batch_size": "4", "device": "cpu",
        "overrides": ["model.micro_batch_size=2"], "log_samples": False})]
    saved = json.loads((run.run_dir / "eval_harness.json").read_text())
    assert saved["results"] == {t: {"acc,none": 0.5} for t in "abc"} == json.loads(capsys.readouterr().out)
    assert saved["harness"] == "lm_eval" and saved["tasks"] == ["a", "b", "c"]


def test_two_plugins_registering_one_harness_name_is_an_error():
    with pytest.raises(PluginError, match="evaluation_harnesses 'lm_eval' is registered by two plugins"):
        from mega.plugin_manager import load_plugins

        load_plugins(extra=[RecordingHarness()])


def test_the_startup_hook_is_installed_and_imports_nothing():
    """mega-lm-eval.pth (what lets `lm_eval --model mega` find the model) puts its hook on
    sys.meta_path in every interpreter of the environment, importing neither mega nor torch."""
    import subprocess
    import sys

    probe = ("import sys; print(sum(bool(getattr(f, 'mega_lm_eval_hook', False)) for f in sys.meta_path),"
             " 'mega' in sys.modules, 'torch' in sys.modules, 'lm_eval' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd="/")
    assert r.stdout.split() == ["1", "False", "False", "False"], r.stderr
