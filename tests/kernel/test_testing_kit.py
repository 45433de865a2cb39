"""What `mega.testing` gives plugin authors works for every model mega ships: each
registered model has a tiny preset (torchtitan's `debugmodel`) that builds it, and trains
a step where the model trains on its own; the multi-rank helper runs ranks and gathers
tensor-parallel gradients as one process holds them."""
from __future__ import annotations

import math

import pytest
import torch

import mega
from mega.errors import ConfigError
from mega.testing import full_grads, read_metrics, run_ranks, tiny_model, tiny_preset

# models trained through a task (mega.plugins.tasks), not on a corpus of their own
TASK_HEADS = {"bert_sequence_classification", "bert_multiple_choice", "bert_token_classification",
              "bert_question_answering"}


def _first_party(plugins):
    return [e.name for e in plugins.models.entries() if e.plugin in _first_party_plugins(plugins)]


def _first_party_plugins(plugins):
    return {name for name, info in plugins.info.items() if (info.module or "").startswith("mega.plugins")}


def test_every_first_party_model_has_a_tiny_preset(plugins):
    names = _first_party(plugins)
    assert {"gpt", "bert", "t5", "bart", "transformer_xl", "question_answering"} <= set(names)
    for name in names:
        entry = plugins.models.get(name)
        assert entry.config is not None and entry.config.tiny_preset.__func__ is not mega.config.ModelConfig.tiny_preset.__func__, name


def test_a_model_without_a_preset_is_named(tmp_path, mega_plugin):
    import attrs

    from mega.config import ModelConfig

    @attrs.define(kw_only=True)
    class BareConfig(ModelConfig):
        name: str = "bare"

    class Bare:
        @mega.hookimpl
        def register_models(self, register):
            register("bare", lambda config, tokenizer, plugins: None, config=BareConfig)

    plugins = mega_plugin(Bare())
    with pytest.raises(ConfigError, match="model 'bare' .* has no tiny preset"):
        tiny_preset("bare", tmp_path, plugins)


@pytest.mark.parametrize("name", ["gpt", "llama", "bert", "bert_question_answering", "t5", "transformer_xl",
                                  "text_classification"])
def test_a_preset_builds_a_small_model_the_same_twice(tmp_path, plugins, name):
    a, _, config = tiny_model(name, tmp_path / "a", plugins)
    b, _, _ = tiny_model(name, tmp_path / "b", plugins)
    assert config.model.name == name
    count = sum(p.numel() for p in a.parameters())
    assert 1_000 < count < 100_000, count  # a debug model: seconds on a CPU
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


@pytest.mark.slow
def test_every_preset_trains_or_is_a_task_head(tmp_path, plugins):
    """Two steps of each first-party model from its preset: a finite loss logged at each
    step. The Hugging Face head models train through a task, and say so."""
    from mega.config import config_from_dict

    for name in _first_party(plugins):
        raw = tiny_preset(name, tmp_path / name, plugins,
                          trainer={"max_steps": 2, "val_check_interval": 0, "limit_val_batches": 0})
        config = config_from_dict(raw, [], plugins)
        if name in TASK_HEADS:
            with pytest.raises(ConfigError, match="no samples for the objective"):
                mega.run(config, plugins)
            continue
        run = mega.run(config, plugins)
        losses = [m["loss"] for m in read_metrics(run.run_dir) if "loss" in m]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (name, losses)


def _tp_grads(parallel, directory, weights=None):
    """One backward of the tiny GPT at this rank's tensor-parallel layout, from the one-process
    `weights` (cut for this rank); its gradients as one process holds them."""
    from mega.runtime.sharding import shard_for

    model, tokenizer, config = tiny_model("gpt", directory, tensor_model_parallel_size=parallel.tp_size,
                                          hidden_dropout=0.0, attention_dropout=0.0)
    if weights is not None:
        model.load_state_dict(shard_for(model, weights, parallel))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 17), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 16)}
    model.train()
    model.training_loss(batch)["loss_sum"].backward()
    return full_grads(model, parallel), model.state_dict()


@pytest.mark.slow
def test_the_shipped_multi_rank_helper_shows_tp2_equals_one_process(tmp_path):
    """What docs/plugins.md shows a plugin author: one process, then the same weights cut
    for two tensor-parallel ranks; every gradient gathered back equals one process's."""
    from mega.runtime.parallel import ParallelState

    one, weights = _tp_grads(ParallelState(), tmp_path / "one")
    two = run_ranks(_tp_grads, world=2, tp=2, args=(tmp_path / "two", weights))
    for name, grad in one.items():
        for rank in (0, 1):
            # the padded vocabulary rows differ in number (8 x TP), so compare the real ones
            got = two[rank][0][name][: grad.shape[0]] if "word_embeddings" in name else two[rank][0][name]
            torch.testing.assert_close(got, grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_plugins_tests_may_mark_slow_cases_without_declaring_the_marker(tmp_path):
    """mega-lm's pytest plugin declares `slow`: a plugin's suite outside this repository (no
    pyproject of ours) runs under --strict-markers and `-m "not slow"` deselects the case."""
    import subprocess
    import sys

    (tmp_path / "test_mine.py").write_text(
        "import pytest\n\n@pytest.mark.slow\ndef test_long():\n    pass\n\ndef test_quick():\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "--strict-markers", "-m", "not slow", "-p",
                          "no:cacheprovider", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed, 1 deselected" in out.stdout
