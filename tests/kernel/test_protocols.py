"""The contracts of mega.protocols: every first-party component satisfies the ones the
kernel uses it through, and the kernel honours the optional ones (a StatefulModel's
carried state survives a resume bit for bit)."""
from __future__ import annotations

import pytest
import torch

import mega
from mega import protocols as P
from mega.errors import ConfigError
from mega.plugin_manager import load_plugins
from mega.plugins.checkpoints.megatron import MegatronFormat
from mega.plugins.checkpoints.native import NativeFormat
from mega.plugins.models.encoder_decoder import EncoderDecoderConfig, EncoderDecoderModel, StackConfig
from mega.plugins.models.gpt import GPTConfig, GPTModel
from mega.plugins.tokenizers.bytes import ByteTokenizer
from mega.training.run import build_run
from mega.training.loop import train
from mega.testing import read_metrics, tiny_config
from tests.helpers.counting import CountingGPT


def _gpt():
    return GPTModel(GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16), 100)


def _encoder_decoder(**encoder):
    stack = dict(num_layers=1, hidden_size=32, num_attention_heads=4)
    return EncoderDecoderModel(EncoderDecoderConfig(encoder=StackConfig(**{**stack, **encoder}),
                                                    decoder=StackConfig(**stack), seq_length=16, extra_ids=4), 100)


def test_models_satisfy_the_protocols_the_kernel_uses_them_through():
    gpt, t5 = _gpt(), _encoder_decoder()
    for proto in (P.LanguageModel, P.PipelineStage, P.Generator, P.CountsFlops):
        assert isinstance(gpt, proto), proto
    assert not isinstance(gpt, P.EncoderDecoder) and not isinstance(gpt, P.StatefulModel)
    for proto in (P.LanguageModel, P.EncoderDecoder, P.CountsFlops):
        assert isinstance(t5, proto), proto
    assert not isinstance(t5, P.Generator)  # no KV cache: `mega generate` decodes it greedily


def test_components_satisfy_their_protocols(tmp_path):
    tok = ByteTokenizer()
    assert isinstance(tok, P.Tokenizer) and isinstance(tok, P.KnowsWordStarts)
    for fmt in (NativeFormat(), MegatronFormat()):
        assert isinstance(fmt, P.CheckpointFormat)
    assert isinstance(MegatronFormat(), P.NamesDirectories) and isinstance(MegatronFormat(), P.CommitHook)
    assert not isinstance(NativeFormat(), P.NamesDirectories)


def test_the_data_source_serves_the_objective_the_model_declares(tmp_path, corpus, plugins):
    cfg = tiny_config(tmp_path, corpus, plugins)
    source = plugins.datasets.get("text_mmap").factory(cfg.model.data, tmp_path)
    assert isinstance(source, P.DataSource)
    assert cfg.model.objective() == P.SampleObjective("lm")
    lm = source.dataset("train", ByteTokenizer(), 32, 4, 0, cfg.model.objective())
    assert set(lm[0]) == {"tokens", "labels", "loss_mask"}
    t5 = _encoder_decoder().config.objective()
    assert (t5.name, t5.extra_ids) == ("t5", 4)
    assert "text_enc" in source.dataset("train", ByteTokenizer(), 32, 4, 0, t5)[0]
    with pytest.raises(ConfigError, match="no samples for the objective 'mystery'"):
        source.dataset("train", ByteTokenizer(), 32, 4, 0, P.SampleObjective("mystery"))


def test_block_shape_errors_name_the_section_keys():
    with pytest.raises(ConfigError, match=r"model\.encoder\.hidden_size=32 is not divisible by model\.encoder\.num_attention_heads=5"):
        _encoder_decoder(num_attention_heads=5)
    with pytest.raises(ConfigError, match=r"model\.num_layers=3 is not divisible by model\.pipeline_model_parallel_size=2"):
        GPTModel(GPTConfig(num_layers=3, hidden_size=32, num_attention_heads=4, seq_length=16,
                           pipeline_model_parallel_size=2), 100)


class CountingPlugin:
    @mega.hookimpl
    def register_models(self, register):
        register("counting_gpt", lambda config, tokenizer, *rest: CountingGPT(config, tokenizer.vocab_size), config=GPTConfig)


@pytest.mark.slow
def test_a_stateful_models_carried_state_survives_resume(tmp_path, corpus):
    plugins = load_plugins(extra=[CountingPlugin()])
    sections = dict(model={"name": "counting_gpt"}, trainer={"max_steps": 4, "val_check_interval": 0},
                    exp_manager={"checkpoint": {"every_n_train_steps": 2}})
    straight = build_run(tiny_config(tmp_path, corpus, plugins, ["exp_manager.name=straight"], **sections), plugins)
    assert isinstance(straight.model, P.StatefulModel)
    train(straight)
    first = build_run(tiny_config(tmp_path, corpus, plugins, ["exp_manager.name=resumed", "trainer.max_steps=2"],
                                  **sections), plugins)
    train(first)
    resumed = build_run(tiny_config(tmp_path, corpus, plugins, ["exp_manager.name=resumed"], **sections), plugins)
    assert resumed.step == 2 and torch.equal(resumed.model.memory, first.model.memory)
    assert float(resumed.model.memory) != 0.0
    train(resumed)
    assert torch.equal(resumed.model.memory, straight.model.memory)
    assert [m["loss"] for m in read_metrics(resumed.run_dir)] == [m["loss"] for m in read_metrics(straight.run_dir)]


def test_model_shape_errors_come_before_the_run_directory(tmp_path, corpus, capsys):
    """ModelConfig.check runs before anything is written (and before workers launch)."""
    import tomli_w

    from mega.cli import main
    from mega.testing import tiny_raw

    exp = tmp_path / "exp.toml"
    exp.write_text(tomli_w.dumps(tiny_raw(tmp_path, corpus, model={"num_attention_heads": 5})))
    assert main(["run", str(exp)]) == 2
    assert "model.hidden_size=32 is not divisible by model.num_attention_heads=5" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


class NotAModelPlugin:
    @mega.hookimpl
    def register_models(self, register):
        register("linear", lambda config, tokenizer, plugins: torch.nn.Linear(2, 2), config=GPTConfig)


def test_a_factory_whose_object_misses_its_protocol_is_named_before_training(tmp_path, corpus):
    from mega.errors import PluginError

    plugins = load_plugins(extra=[NotAModelPlugin()])
    cfg = tiny_config(tmp_path, corpus, plugins, model={"name": "linear"})
    with pytest.raises(PluginError, match=r"'linear' built a Linear, which is not a mega.protocols.LanguageModel"
                                          r" \(missing: training_loss\)"):
        build_run(cfg, plugins)
