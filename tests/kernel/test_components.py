"""Small components against their formulas: LR schedules, the fp16 loss scaler (Megatron's
rules), parameter groups, tokenizers."""
from __future__ import annotations

import math

import pytest
import torch

from mega.config import config_from_dict
from mega.runtime.precision import DynamicLossScaler
from mega.training.run import param_groups


def _sched(plugins, name, **kw):
    cfg = config_from_dict({"model": {"optim": {"sched": {"name": name, **kw}}}}, plugins=plugins).model.optim.sched
    return plugins.lr_schedulers.get(name).factory(cfg, 1.0, 110)


def test_cosine_with_warmup(plugins):
    lr = _sched(plugins, "cosine", warmup_steps=10, min_lr=0.1)
    assert [lr(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)


def test_linear_and_constant(plugins):
    lin = _sched(plugins, "linear", warmup_steps=0, min_lr=0.0)
    assert lin(55) == pytest.approx(0.5)
    const = _sched(plugins, "constant", warmup_steps=4)
    assert [const(s) for s in (0, 3, 4, 100)] == pytest.approx([0.25, 1.0, 1.0, 1.0])


def test_loss_scaler_follows_megatron_rules():
    s = DynamicLossScaler(initial_scale=1024, growth_interval=3, hysteresis=2)
    s.update(found_inf=True)
    assert s.scale == 1024  # hysteresis: the first overflow only counts
    s.update(found_inf=True)
    assert s.scale == 512
    for _ in range(3):
        s.update(found_inf=False)
    assert s.scale == 1024  # grown after growth_interval clean steps
    state = s.state_dict()
    t = DynamicLossScaler()
    t.load_state_dict(state)
    assert t.state_dict() == state


def test_loss_scaler_unscales_and_detects_inf():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([8.0, 16.0, 32.0])
    s = DynamicLossScaler(initial_scale=8)
    assert s.unscale_and_check([p]) is False and p.grad.tolist() == [1.0, 2.0, 4.0]
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert s.unscale_and_check([p]) is True


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 4)]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_byte_tokenizer_round_trips(plugins):
    tok = plugins.tokenizers.get("bytes").factory(None, [], None)
    ids = tok.encode("héllo")
    assert tok.decode(ids + [tok.eos_id]) == "héllo"


def test_sentencepiece_trains_once_into_the_run_dir_and_reloads(tmp_path, corpus, plugins):
    cfg = config_from_dict({"model": {"tokenizer": {"vocab_size": 60}}}, plugins=plugins).model.tokenizer
    build = plugins.tokenizers.get("sentencepiece").factory
    tok = build(cfg, [corpus], tmp_path)
    assert (tmp_path / "tokenizer.model").is_file() and tok.vocab_size == 60
    ids = tok.encode("the model reads a token")
    assert tok.decode(ids) == "the model reads a token"
    mtime = (tmp_path / "tokenizer.model").stat().st_mtime_ns
    again = build(cfg, [corpus], tmp_path)
    assert (tmp_path / "tokenizer.model").stat().st_mtime_ns == mtime and again.encode("the model") == tok.encode("the model")
    cfg.model = str(tmp_path / "tokenizer.model")
    assert build(cfg, [], None).encode("reads") == tok.encode("reads")


def test_sentencepiece_bad_model_file_is_named(tmp_path, plugins):
    from mega.errors import ConfigError

    cfg = config_from_dict({"model": {"tokenizer": {"model": str(tmp_path / "none.model")}}}, plugins=plugins).model.tokenizer
    with pytest.raises(ConfigError, match="model.tokenizer.model: no such file"):
        plugins.tokenizers.get("sentencepiece").factory(cfg, [], None)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    cfg.model = str(junk)
    with pytest.raises(ConfigError, match="cannot load sentencepiece model"):
        plugins.tokenizers.get("sentencepiece").factory(cfg, [], None)
