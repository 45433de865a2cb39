"""`trainer.compile` and `model.attention_backend`: the GPT training step traces into one
graph (no graph breaks), a compiled run trains like an eager one within a tolerance, a
failed compilation falls back to eager with one line; the SDPA backend switch maps onto
torch's backends ("math" == "auto" on CPU, the CUDA-only kernels refused on CPU)."""
from __future__ import annotations

import logging

import pytest
import torch

from mega.config import config_from_dict
from mega.errors import ConfigError
from mega.testing import read_metrics


def _gpt(**keys):
    from mega.plugins.models.gpt import GPTModel

    model = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
             "make_vocab_size_divisible_by": 16, "hidden_dropout": 0.0, "attention_dropout": 0.0, **keys}
    torch.manual_seed(0)
    return GPTModel(config_from_dict({"model": model}).model, 50)


def _batch():
    g = torch.Generator().manual_seed(1)
    return {"tokens": torch.randint(0, 50, (2, 16), generator=g), "labels": torch.randint(0, 50, (2, 16), generator=g),
            "loss_mask": torch.ones(2, 16)}


@pytest.mark.parametrize("keys", [{}, {"loss_chunk_size": 8}, {"hidden_dropout": 0.1, "attention_dropout": 0.1},
                                  {"attention_backend": "math"}])
@pytest.mark.slow
def test_gpt_training_loss_has_no_graph_breaks(keys):
    import torch._dynamo

    torch._dynamo.reset()
    model = _gpt(**keys).train()
    explanation = torch._dynamo.explain(lambda b: model.training_loss(b)["loss_sum"])(_batch())
    assert explanation.graph_break_count == 0, [str(r) for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_attention_math_equals_auto_on_cpu():
    batch = _batch()
    out = {}
    for backend in ("auto", "math"):
        model = _gpt(attention_backend=backend)
        loss = model.training_loss(batch)["loss_sum"]
        loss.backward()
        out[backend] = (loss.detach(), model(batch["tokens"]).detach(),
                        {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(out["math"][0], out["auto"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["math"][1], out["auto"][1], rtol=1e-5, atol=1e-6)
    for name, grad in out["auto"][2].items():
        torch.testing.assert_close(out["math"][2][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient"])
def test_cuda_attention_backends_are_refused_on_cpu(backend):
    model = _gpt(attention_backend=backend)
    with pytest.raises(ConfigError, match=f"model.attention_backend='{backend}' needs a CUDA device"):
        model.training_loss(_batch())


def test_attention_backend_and_compile_keys_are_checked():
    with pytest.raises(ConfigError, match="attention_backend"):
        config_from_dict({"model": {"attention_backend": "sdpa"}})
    with pytest.raises(ConfigError, match="trainer.compile"):
        config_from_dict({"trainer": {"compile": "yes"}})
    for value in (True, False, "auto"):
        assert config_from_dict({"trainer": {"compile": value}}).trainer.compile == value


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["flash", "efficient", "math"])
def test_cuda_attention_backends_equal_auto(backend):
    batch = {k: v.cuda() for k, v in _batch().items()}
    ref = _gpt().cuda()
    got = _gpt(attention_backend=backend).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = ref.training_loss(batch)["loss_sum"], got.training_loss(batch)["loss_sum"]
    assert float(b) == pytest.approx(float(a), rel=1e-2)


def test_compile_auto_is_off_on_cpu():
    from mega.runtime.compile import compile_wanted

    assert not compile_wanted("auto", torch.device("cpu")) and compile_wanted("auto", torch.device("cuda", 0))
    assert compile_wanted(True, torch.device("cpu")) and not compile_wanted(False, torch.device("cuda", 0))


@pytest.mark.slow
def test_a_failed_compilation_falls_back_to_eager_with_one_line(mega_experiment, monkeypatch, caplog):
    """torch.compile raising a compiler-stack error at the first step: the run says so once
    and trains eagerly, to the eager run's losses exactly."""
    import torch._dynamo.exc

    def broken_compile(module, **_):
        def call(*a, **k):
            raise torch._dynamo.exc.InternalTorchDynamoError("no C++ compiler")
        return call

    eager = mega_experiment.run("exp_manager.name=eager", "trainer.compile=false", trainer={"max_steps": 3})
    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="mega"):
        run = mega_experiment.run("exp_manager.name=fallback", "trainer.compile=true", trainer={"max_steps": 3})
    lines = [r.getMessage() for r in caplog.records if "trainer.compile" in r.getMessage()]
    assert len(lines) == 1 and "continuing without compilation" in lines[0], lines
    losses = lambda r: [m["loss"] for m in read_metrics(r.run_dir) if "loss" in m]
    assert losses(run) == losses(eager)


@pytest.mark.slow
def test_compiled_run_trains_like_eager(mega_experiment, caplog):
    """trainer.compile=true on CPU (inductor, C++): per-step losses within 1e-4 relative of
    the eager run's (fused kernels reorder float sums), or, where this machine cannot
    compile, the one-line fallback and identical losses."""
    kw = dict(trainer={"max_steps": 3, "val_check_interval": 0}, model={"hidden_dropout": 0.0, "attention_dropout": 0.0})
    eager = mega_experiment.run("exp_manager.name=eager", "trainer.compile=false", **kw)
    with caplog.at_level(logging.WARNING, logger="mega"):
        compiled = mega_experiment.run("exp_manager.name=compiled", "trainer.compile=true", **kw)
    a = [m["loss"] for m in read_metrics(eager.run_dir) if "loss" in m]
    b = [m["loss"] for m in read_metrics(compiled.run_dir) if "loss" in m]
    assert b == pytest.approx(a, rel=1e-4)
    assert compiled.loss_module.fallen_back == any("trainer.compile" in r.getMessage() for r in caplog.records)
