"""The kernel's half of `mega import` / `mega export`: picking a format that can, and
writing an imported model as a run directory that loads like a trained one."""
from __future__ import annotations

import pytest
import torch

import mega
from mega.errors import CheckpointError, ConfigError
from mega.checkpoint import restore
from mega.checkpoint import find_exporter, find_importer, write_imported_run
from mega.plugin_manager import load_plugins

MODEL = {"name": "gpt", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
         "make_vocab_size_divisible_by": 8, "tokenizer": {"library": "bytes"}}


def _converted_state(plugins):
    """A model's tensors as a converter would hand them over (here: a fresh GPT's)."""
    from mega.config import config_from_dict

    mc = config_from_dict({"model": dict(MODEL)}, plugins=plugins).model
    torch.manual_seed(3)
    tok = plugins.tokenizers.get("bytes").factory(mc.tokenizer, [], None)
    model = plugins.models.get("gpt").factory(mc, tok, plugins)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_an_imported_model_loads_like_a_trained_one(tmp_path, plugins):
    model, state = _converted_state(plugins)
    ckpt = write_imported_run(tmp_path / "imported", {"model": dict(MODEL)}, state, plugins)
    assert (tmp_path / "imported" / "config.toml").is_file() and ckpt.parent.name == "checkpoints"
    loaded, tokenizer, config = restore(tmp_path / "imported", plugins)
    tokens = torch.randint(0, 256, (2, 16))
    model.eval()
    assert torch.equal(loaded(tokens), model(tokens))
    assert config.exp_manager.name == "imported"


def test_weights_that_do_not_fit_are_refused_by_name(tmp_path, plugins):
    _, state = _converted_state(plugins)
    state["language_model.encoder.layers.9.mlp.dense_h_to_4h.weight"] = torch.zeros(1)
    del state["language_model.encoder.final_layernorm.weight"]
    with pytest.raises(CheckpointError, match=r"missing: language_model.encoder.final_layernorm.weight; unexpected:"
                                              r" language_model.encoder.layers.9"):
        write_imported_run(tmp_path / "bad", {"model": dict(MODEL)}, state, plugins)
    assert list(tmp_path.iterdir()) == []  # a failed import leaves nothing behind
    _, state = _converted_state(plugins)
    state["language_model.encoder.final_layernorm.weight"] = torch.ones(7)
    with pytest.raises(CheckpointError, match="do not fit model 'gpt': .*final_layernorm.weight"):
        write_imported_run(tmp_path / "bad", {"model": dict(MODEL)}, state, plugins)
    _, state = _converted_state(plugins)
    write_imported_run(tmp_path / "once", {"model": dict(MODEL)}, state, plugins)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "once").rglob("*"))
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        write_imported_run(tmp_path / "once", {"model": dict(MODEL)}, state, plugins)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "once").rglob("*")) == before


class Toy:
    """A format that imports `*.toy` files and exports them."""

    name = "toy"

    def save(self, state, directory, parallel=None): ...

    def load(self, directory, parallel=None, parts=()): ...

    def can_import(self, source):
        return source.suffix == ".toy"

    def import_run(self, source, run_dir, options, plugins):
        return run_dir

    def export_run(self, checkpoint, destination, options, plugins):
        return destination


class ToyPlugin:
    @mega.hookimpl
    def register_checkpoint_formats(self, register):
        register("toy", Toy)


def test_a_format_is_found_by_its_files_or_by_name(tmp_path):
    plugins = load_plugins(extra=[ToyPlugin()])
    assert isinstance(find_importer(tmp_path / "m.toy", plugins), Toy)
    assert isinstance(find_importer(tmp_path / "m.bin", plugins, "toy"), Toy)
    assert isinstance(find_exporter("toy", plugins), Toy)
    with pytest.raises(CheckpointError, match=r"m.bin: no checkpoint format recognises it \(formats that import: .*toy"):
        find_importer(tmp_path / "m.bin", plugins)
    with pytest.raises(ConfigError, match=r"--to native: this checkpoint format cannot export \(formats that can: .*toy"):
        find_exporter("native", plugins)


def test_an_imported_run_resumes_training_with_mega_run(tmp_path, plugins):
    """`mega run RUN_DIR/config.toml` continues from the imported weights (fine-tuning)."""
    from mega.config import load_config
    from mega.testing import write_corpus
    from mega.training.loop import train
    from mega.training.run import build_run

    model, state = _converted_state(plugins)
    corpus = write_corpus(tmp_path / "corpus.txt")
    raw = {"model": {**MODEL, "micro_batch_size": 2, "data": {"data_prefix": [str(corpus)]}},
           "trainer": {"max_steps": 2, "val_check_interval": 0}, "exp_manager": {"loggers": []}}
    write_imported_run(tmp_path / "imported", raw, state, plugins)
    run = build_run(load_config(tmp_path / "imported" / "config.toml", ["trainer.max_steps=2"], plugins), plugins)
    assert run.resumed_from is not None and run.step == 0
    assert all(torch.equal(run.model.state_dict()[k], v) for k, v in model.state_dict().items())
    train(run)
    assert run.step == 2 and (tmp_path / "imported" / "checkpoints" / "step_0000002").is_dir()
