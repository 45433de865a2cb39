"""The hiddens module against specs/hiddens.md: each transform and loss equals its formula
(float64; references from torch.distributions), the masked per-sample reductions (an
all-padding row gives 0), the joint loss and its key names, every validation error, the
NeMo-compatible options, the registration API, and `model.hiddens` structured strictly
through the kernel's config door with the run's registries."""
from __future__ import annotations

import functools
import inspect
import json

import attrs
import pytest
import torch
from torch.distributions import Normal

import mega
from mega.config import config_from_dict
from mega.errors import ConfigError
from mega.plugins.hiddens import (
    AMIMLoss,
    GaussianTransform,
    HiddenLoss,
    HiddensModule,
    HiddenTransform,
    VAELoss,
    get_hiddens_module,
    get_registered_hiddens,
    register_hidden_loss,
    register_hidden_transform,
)

S, B, H = 5, 3, 4


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, :] = 0  # an all-padding row
    return {"hiddens": torch.randn(S, B, H, generator=g, dtype=torch.float64), "hiddens_mask": mask}


def _gaussian(**kw):
    t = GaussianTransform(hidden_size=H, name="q", **kw).double()
    with torch.no_grad():
        t.hiddens_to_mean_logvar.weight.copy_(torch.linspace(-1, 1, 2 * H * H, dtype=torch.float64).view(2 * H, H))
        t.hiddens_to_mean_logvar.bias.copy_(torch.linspace(-0.5, 0.5, 2 * H, dtype=torch.float64))
    return t


def _masked_sample_mean(per_pos, mask):
    m = mask.double()
    return (per_pos * m).sum(1) / m.sum(1).clamp(min=1)


def test_cond_gaussian_samples_and_scores_like_the_formula(inputs):
    t = _gaussian(min_logvar=-0.3).train()
    torch.manual_seed(7)
    out = t.transform(inputs)
    proj = inputs["hiddens"] @ t.hiddens_to_mean_logvar.weight.T + t.hiddens_to_mean_logvar.bias
    mean, logvar = proj[..., :H], proj[..., H:].clamp(min=-0.3)
    torch.manual_seed(7)
    eps = torch.randn(S, B, H, dtype=torch.float64)
    z = mean + (0.5 * logvar).exp() * eps
    torch.testing.assert_close(out["z"], z)
    torch.testing.assert_close(out["z_logvar"], logvar)
    torch.testing.assert_close(out["z_log_prob"], Normal(mean, (0.5 * logvar).exp()).log_prob(z).sum(-1))
    assert set(out) == {"z", "z_mean", "z_logvar", "z_log_prob"}


def test_cond_gaussian_eval_uses_the_mean_unless_nemo_compat(inputs):
    det = _gaussian().eval().transform(inputs)
    torch.testing.assert_close(det["z"], det["z_mean"])
    torch.manual_seed(1)
    a = _gaussian(nemo_compat=True).eval().transform(inputs)
    torch.manual_seed(2)
    b = _gaussian(nemo_compat=True).eval().transform(inputs)
    assert not torch.equal(a["z"], b["z"])  # NeMo samples at eval too


def test_cond_gaussian_uses_cached_values(inputs):
    t = _gaussian()
    cached = {**inputs, "z_mean": torch.zeros(S, B, H, dtype=torch.float64),
              "z_logvar": torch.full((S, B, H), -10.0, dtype=torch.float64), "z": torch.ones(S, B, H, dtype=torch.float64)}
    out = t.transform(cached)
    assert torch.equal(out["z"], cached["z"]) and out["z_logvar"].min() == -6.0  # min_logvar also clamps cached values
    torch.testing.assert_close(out["z_log_prob"], Normal(0.0, torch.tensor(-3.0).exp()).log_prob(torch.ones(S, B, H, dtype=torch.float64)).sum(-1))


def test_cond_gaussian_refuses_a_mismatched_ffn_size():
    with pytest.raises(ValueError, match="ffn_hidden_size=6 must be 2 x hidden_size"):
        GaussianTransform(hidden_size=4, ffn_hidden_size=6)


def _z_inputs(inputs):
    g = torch.Generator().manual_seed(3)
    return {**inputs, "z": torch.randn(S, B, H, generator=g, dtype=torch.float64),
            "z_log_prob": torch.randn(S, B, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("agg", ["sum", "mean"])
def test_a_mim_equals_the_formula(inputs, agg):
    x = _z_inputs(inputs)
    out = AMIMLoss(loss_weight=0.7, hidden_aggregation_method=agg).loss(x)
    log_p = getattr(Normal(0.0, 1.0).log_prob(x["z"]), agg)(-1)
    per_pos = (-0.5 * (log_p + x["z_log_prob"])).T
    per_sample = _masked_sample_mean(per_pos, x["hiddens_mask"])
    torch.testing.assert_close(out["loss"], per_sample)
    assert out["loss"][2] == 0.0  # the all-padding row
    torch.testing.assert_close(out["weighted_loss"], 0.7 * per_sample.mean())  # mean over the batch
    nemo = AMIMLoss(loss_weight=0.7, hidden_aggregation_method=agg, nemo_compat=True).loss(x)
    torch.testing.assert_close(nemo["weighted_loss"], 0.7 * per_sample.sum())  # NeMo sums
    torch.testing.assert_close(out["log_prob_P_z"], log_p.T)
    assert list(out) == ["loss", "log_prob_P_z", "log_prob_q_z_given_x", "weighted_loss", "weight_loss"]


def test_vae_minimises_kl_by_default_and_reproduces_nemo_on_request(inputs):
    x = _z_inputs(inputs)
    kl = (x["z_log_prob"] - Normal(0.0, 1.0).log_prob(x["z"]).sum(-1)).T
    fixed = VAELoss().loss(x)
    torch.testing.assert_close(fixed["loss"], _masked_sample_mean(kl, x["hiddens_mask"]))
    nemo = VAELoss(min_kl_value=100.0, nemo_compat=True).loss(x)  # NeMo: -kl, min_kl_value unused
    torch.testing.assert_close(nemo["loss"], _masked_sample_mean(-kl, x["hiddens_mask"]))
    floor = VAELoss(min_kl_value=0.5).loss(x)  # free bits
    torch.testing.assert_close(floor["loss"], _masked_sample_mean(kl.clamp(min=0.5), x["hiddens_mask"]))
    torch.testing.assert_close(fixed["kl_div"], kl)


def test_joint_loss_keys_order_and_value(inputs):
    module = get_hiddens_module({
        "enc_output_name": "z", "tokens_loss_weight": 3.0,
        "transform": {"q_z_given_x": {"cls_name": "cond_gaussian", "hidden_size": H}},
        "loss": {"mim": {"cls_name": "a_mim", "loss_weight": 1.0}, "vae": {"cls_name": "vae", "loss_weight": 0.01}},
    }).double()
    out = module.apply_hidden_transforms({k: v for k, v in inputs.items()})
    assert torch.equal(out["enc_output"], out["z"])
    d = module.apply_loss_transforms(out)
    assert list(d) == ["hiddens_mim_loss", "hiddens_mim_log_prob_P_z", "hiddens_mim_log_prob_q_z_given_x",
                       "hiddens_mim_weight_loss", "hiddens_vae_loss", "hiddens_vae_kl_div", "hiddens_vae_log_prob_p_z",
                       "hiddens_vae_log_prob_q_z_given_x", "hiddens_vae_weight_loss", "hiddens_loss", "tokens_loss_weight"]
    expected = 1.0 * d["hiddens_mim_loss"].mean() + 0.01 * d["hiddens_vae_loss"].mean()
    torch.testing.assert_close(d["hiddens_loss"], expected)
    assert float(d["tokens_loss_weight"]) == 3.0  # honoured (NeMo ignores it)
    torch.testing.assert_close(module.joint_loss(d, torch.tensor(2.0, dtype=torch.float64)), expected + 6.0)
    nemo = get_hiddens_module({"nemo_compat": True, "tokens_loss_weight": 3.0,
                               "transform": {"q": {"cls_name": "cond_gaussian", "hidden_size": H}},
                               "loss": {"mim": {"cls_name": "a_mim"}}})
    assert float(nemo.apply_loss_transforms(nemo.double().apply_hidden_transforms(inputs))["tokens_loss_weight"]) == 1.0


def test_list_form_keeps_order_and_several_keys_per_entry():
    module = get_hiddens_module({"transform": [{"q": {"cls_name": "cond_gaussian", "hidden_size": H}},
                                               {"c1": {"cls_name": "guided_cls", "hidden_size": H, "attr_name": "logP",
                                                       "input_name": "z"},
                                                "c2": {"cls_name": "guided_cls", "hidden_size": H, "attr_name": "QED"}}]})
    assert [t.name for t in module.hidden_transforms] == ["q", "c1", "c2"]


def test_guided_classifier_pair_equals_cross_entropy(inputs):
    module = get_hiddens_module({
        "transform": {"c": {"cls_name": "guided_cls", "hidden_size": H, "attr_name": "logP", "num_classes": 3}},
        "loss": {"logP_cls": {"cls_name": "guided_cls_loss", "input_name": "logP", "loss_weight": 0.1}},
    }).double()
    labels = torch.tensor([0, 2, 1])
    out = module.apply_hidden_transforms(inputs)
    d = module.apply_loss_transforms(out, batch_data={"logP": labels})
    ce = -out["logP"].log_softmax(-1).gather(-1, labels.view(1, B, 1).expand(S, B, 1)).squeeze(-1).T
    torch.testing.assert_close(d["hiddens_logP_cls_loss"], _masked_sample_mean(ce, inputs["hiddens_mask"]))


# --- validation, with NeMo's texts -----------------------------------------------------------

def test_duplicate_outputs():
    with pytest.raises(ValueError, match=r"Hidden transforms have duplicate outputs \{name: \[duplicate outputs\]\} = \{'b': \["):
        get_hiddens_module({"transform": [{"a": {"cls_name": "cond_gaussian", "hidden_size": H}},
                                          {"b": {"cls_name": "cond_gaussian", "hidden_size": H}}]})


def test_loss_asking_for_an_undefined_output():
    with pytest.raises(ValueError, match=r"Loss transforms inputs = \{.*'z.*\} are not supported by hidden transforms"):
        get_hiddens_module({"loss": {"mim": {"cls_name": "a_mim"}}})


def test_transform_needing_an_unavailable_input():
    with pytest.raises(ValueError, match=r"Hidden transform c requires inputs \{'z'\} that are not available"):
        get_hiddens_module({"transform": {"c": {"cls_name": "guided_cls", "hidden_size": H, "attr_name": "p", "input_name": "z"}}})


def test_a_failing_constructor_is_logged_and_its_error_reraised(caplog):
    with pytest.raises(ValueError, match="ffn_hidden_size=3 must be 2 x hidden_size"):
        get_hiddens_module({"transform": {"q": {"cls_name": "cond_gaussian", "hidden_size": H, "ffn_hidden_size": 3}}})
    assert "Failed to build hidden transform q with cfg=" in caplog.text


def test_the_python_api_structures_a_raw_table_strictly():
    """NeMo's texts (KeyError "Unknown hidden loss amim, available: dict_keys([...])") gave
    no key path; the table goes through the same structuring as the TOML."""
    with pytest.raises(ConfigError, match=r"^model.hiddens.transform.q.cls_name: required key missing \(available: .*cond_gaussian"):
        get_hiddens_module({"transform": {"q": {"hidden_size": H}}})
    with pytest.raises(ConfigError, match=r"^model.hiddens.loss.m.cls_name: unknown hidden loss 'amim', did you mean a_mim\? \(available: a_mim,"):
        get_hiddens_module({"loss": {"m": {"cls_name": "amim"}}})
    with pytest.raises(ConfigError, match=r"^model.hiddens.loss.mim.foo: unknown key$"):
        get_hiddens_module({"loss": {"mim": {"cls_name": "a_mim", "foo": 1}}})


def test_duplicate_loss_keys_at_run_time(inputs):
    module = get_hiddens_module({"transform": {"q": {"cls_name": "cond_gaussian", "hidden_size": H}},
                                 "loss": [{"m": {"cls_name": "a_mim"}}, {"m": {"cls_name": "vae"}}]}).double()
    with pytest.raises(ValueError, match=r"Loss transform \(1\) .*\(name=m\) is trying to override the following loss keys"):
        module.apply_loss_transforms(module.apply_hidden_transforms(inputs))


def test_input_validation_and_missing_loss_key(inputs):
    with pytest.raises(ValueError, match="Inputs should contain"):
        AMIMLoss().loss(inputs)

    class NoLoss(HiddenLoss):
        def _loss(self, inputs, batch_data=None):
            return {"x": inputs["hiddens_mask"]}

    with pytest.raises(KeyError, match="Loss dict must contain 'loss' key"):
        NoLoss().loss(inputs)
    with pytest.raises(TypeError, match="hidden_loss_transforms should be a list of MegatronBaseHiddenLoss"):
        HiddensModule([], [object()])


# --- registration API -----------------------------------------------------------------------

class Doubling(HiddenTransform):
    @property
    def input_names(self):
        return ["hiddens"]

    @property
    def output_names(self):
        return ["twice"]

    def _transform(self, inputs, batch_data=None):
        return {"twice": 2 * inputs["hiddens"]}


@pytest.fixture
def global_plugins(monkeypatch):
    """A fresh process-wide plugin manager for one test, so what the Python API registers
    into it is gone afterwards; returns the real one, which must stay untouched."""
    from mega import plugin_manager

    real, fresh = plugin_manager.get_plugins(), plugin_manager.load_plugins()
    monkeypatch.setattr(plugin_manager, "_cached_default", functools.lru_cache(maxsize=None)(lambda: fresh))
    return real


class Scaling(HiddenTransform):
    """A Python-registered transform without a config class: its keys come from here."""

    def __init__(self, factor: float, input_name="hiddens", name: str = "", model_parallel_cfg=None):
        super().__init__(name=name, model_parallel_cfg=model_parallel_cfg)
        self.factor, self.input_name = factor, input_name

    @property
    def input_names(self):
        return [self.input_name]

    @property
    def output_names(self):
        return ["scaled"]

    def _transform(self, inputs, batch_data=None):
        return {"scaled": self.factor * inputs[self.input_name]}


def test_python_registration_api(inputs, global_plugins):
    names = get_registered_hiddens()
    assert {"a_mim", "vae"} <= set(names["loss"]) and "cond_gaussian" in names["transform"]
    register_hidden_transform("doubling_test", Doubling)
    register_hidden_loss("amim_by_path_test", "mega.plugins.hiddens.losses.AMIMLoss")
    with pytest.raises(ValueError, match=r"Cannot register duplicate hidden transform \(cond_gaussian\)"):
        register_hidden_transform("cond_gaussian", Doubling)
    assert "doubling_test" in get_registered_hiddens()["transform"]
    assert "doubling_test" not in global_plugins.hidden_transforms  # the fixture restores the real registries
    module = get_hiddens_module({"enc_output_name": "twice", "transform": {"d": {"cls_name": "doubling_test"}}})
    torch.testing.assert_close(module.apply_hidden_transforms(inputs)["enc_output"], 2 * inputs["hiddens"])
    module = get_hiddens_module({"transform": {"q": {"cls_name": "cond_gaussian", "hidden_size": H}},
                                 "loss": {"m": {"cls_name": "amim_by_path_test", "hidden_aggregation_method": "mean"}}})
    assert isinstance(module.hidden_loss_transforms[0], AMIMLoss)
    assert module.hidden_loss_transforms[0].hidden_aggregation_method == "mean"


def test_python_registered_keys_come_from_the_constructor(inputs, global_plugins):
    register_hidden_transform("scaling_test", Scaling)
    module = get_hiddens_module({"enc_output_name": "scaled", "transform": {"s": {"cls_name": "scaling_test", "factor": 3}}})
    torch.testing.assert_close(module.apply_hidden_transforms(inputs)["enc_output"], 3 * inputs["hiddens"])
    with pytest.raises(ConfigError, match=r"transform.s.factor: expected a number, got a boolean"):
        get_hiddens_module({"transform": {"s": {"cls_name": "scaling_test", "factor": True}}})
    with pytest.raises(ConfigError, match=r"transform.s.facter: unknown key, did you mean factor\?"):
        get_hiddens_module({"transform": {"s": {"cls_name": "scaling_test", "factor": 1.0, "facter": 2}}})
    with pytest.raises(ConfigError, match=r"transform.s.factor: required key missing"):
        get_hiddens_module({"transform": {"s": {"cls_name": "scaling_test"}}})
    raw = {"model": {"name": "bart", "hiddens": {"transform": {"s": {"cls_name": "scaling_test", "factor": 2.0}}}}}
    assert config_from_dict(raw).model.hiddens.transform["s"].factor == 2.0  # `mega run` in this process sees it


def test_every_config_class_matches_its_constructor(plugins):
    """Defaults of each registered component's config class equal its constructor's, and
    every key is a constructor parameter (so a table structures into a valid call)."""
    for registry in (plugins.hidden_transforms, plugins.hidden_losses):
        for entry in registry.entries():
            assert entry.config is not None, f"{registry.noun} {entry.name} registers no config class"
            params = inspect.signature(entry.factory).parameters
            for a in attrs.fields(entry.config):
                if a.name == "cls_name":
                    continue
                assert a.name in params, f"{entry.name}.{a.name} is not a constructor parameter"
                if a.name == "name":
                    continue
                expected = attrs.NOTHING if params[a.name].default is inspect.Parameter.empty else params[a.name].default
                assert a.default == expected, f"{entry.name}.{a.name}: config default {a.default!r} != {expected!r}"


# --- model.hiddens through the kernel's config door -----------------------------------------

def _bart_raw(tmp_path, corpus, hiddens, **trainer):
    stack = {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2}
    return {
        "trainer": {"max_steps": 1, "val_check_interval": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
                    **trainer},
        "exp_manager": {"exp_dir": str(tmp_path / "results"), "name": "hid", "loggers": ["jsonl"]},
        "model": {"name": "bart", "micro_batch_size": 2, "seq_length": 24, "seq_length_dec": 16,
                  "make_vocab_size_divisible_by": 8, "encoder": dict(stack), "decoder": dict(stack),
                  "tokenizer": {"library": "bytes"}, "data": {"data_prefix": [str(corpus)], "splits_string": "80,20,0"},
                  "hiddens": hiddens},
    }


MIM = {"enc_output_name": "z", "transform": {"q": {"cls_name": "cond_gaussian", "hidden_size": 16}},
       "loss": {"mim": {"cls_name": "a_mim", "loss_weight": 1.0}}}


@pytest.mark.parametrize("change, message", [
    ({"loss": {"mim": {"cls_name": "a_mim", "loss_weigth": 1.0}}},
     r"model.hiddens.loss.mim.loss_weigth: unknown key, did you mean loss_weight\?"),
    ({"loss": {"mim": {"cls_name": "a_mim", "loss_weight": True}}},
     r"model.hiddens.loss.mim.loss_weight: expected a number, got a boolean \(True\)"),
    ({"loss": {"mim": {"cls_name": "amim"}}},
     r"model.hiddens.loss.mim.cls_name: unknown hidden loss 'amim', did you mean a_mim\? \(available: a_mim, "),
    ({"transform": [{"q": {"cls_name": "cond_gaussian", "hidden_size": "16"}}]},
     r"model.hiddens.transform\[0\].q.hidden_size: expected an integer, got a string"),
    ({"loss": {"mim": {"cls_name": "a_mim", "hidden_aggregation_method": "max"}}},
     r"model.hiddens.loss.mim.hidden_aggregation_method: expected one of 'sum', 'mean', got a string \('max'\)"),
    ({"tokens_loss_weight": "1"}, r"model.hiddens.tokens_loss_weight: expected a number, got a string"),
    ({"nemo_compat": 1}, r"model.hiddens.nemo_compat: expected a boolean \(true/false\), got an integer"),
    ({"enc_output_nme": "z"}, r"model.hiddens.enc_output_nme: unknown key, did you mean enc_output_name\?"),
])
def test_bad_hiddens_are_config_errors_at_their_key(tmp_path, corpus, plugins, change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_bart_raw(tmp_path, corpus, {**MIM, **change}), plugins=plugins)


def test_every_problem_in_one_pass(tmp_path, corpus, plugins):
    bad = {"transform": [{"q": {"cls_name": "cond_gaussian"}}, {"c": {"cls_name": "guided_clss", "hidden_size": 16}}],
           "loss": {"mim": {"loss_weight": 1.0}}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(_bart_raw(tmp_path, corpus, bad), plugins=plugins)
    lines = str(info.value).splitlines()
    assert lines[0] == "3 problems:"
    assert lines[1:] == ["  model.hiddens.transform[0].q.hidden_size: required key missing",
                         "  model.hiddens.transform[1].c.cls_name: unknown hidden transform 'guided_clss', did you mean"
                         " guided_cls? (available: " + ", ".join(plugins.hidden_transforms.names()) + ")",
                         "  model.hiddens.loss.mim.cls_name: required key missing (available: "
                         + ", ".join(plugins.hidden_losses.names()) + ")"]


def test_structured_hiddens_keep_order_and_round_trip(tmp_path, corpus, plugins):
    from mega.config import dump_config, load_config

    hiddens = {"enc_output_name": "z", "tokens_loss_weight": 2,
               "transform": [{"q": {"cls_name": "cond_gaussian", "hidden_size": 16}},
                             {"c2": {"cls_name": "guided_cls", "hidden_size": 16, "attr_name": "b", "input_name": "z"},
                              "c1": {"cls_name": "guided_cls", "hidden_size": 16, "attr_name": "a"}}],
               "loss": {"vae": {"cls_name": "vae", "loss_weight": 0.01}}}
    cfg = config_from_dict(_bart_raw(tmp_path, corpus, hiddens), plugins=plugins)
    h = cfg.model.hiddens
    assert [list(t) for t in h.transform] == [["q"], ["c2", "c1"]] and h.tokens_loss_weight == 2.0
    assert type(h.loss["vae"]).__name__ == "VAELossConfig" and h.loss["vae"].min_kl_value is None
    path = tmp_path / "resolved.toml"
    path.write_text(dump_config(cfg))
    assert load_config(path, plugins=plugins) == cfg
    assert load_config(path, ["model.hiddens.loss.vae.min_kl_value=0.5"], plugins).model.hiddens.loss["vae"].min_kl_value == 0.5
    with pytest.raises(ConfigError, match=r"model.hiddens.loss.kl.cls_name: no such key to override; use \+model"):
        load_config(path, ["model.hiddens.loss.kl.cls_name=vae"], plugins)  # a new entry needs + or ++


@pytest.mark.parametrize("command", ["run", "config"])
def test_a_bad_hiddens_table_fails_before_the_run_directory_exists(tmp_path, corpus, command, capsys):
    import tomli_w

    from mega.cli import main

    exp = tmp_path / "exp.toml"
    exp.write_text(tomli_w.dumps(_bart_raw(tmp_path, corpus, {**MIM, "loss": {"mim": {"cls_name": "a_mim", "loss_weight": True}}})))
    assert main([command, str(exp)]) == 2
    assert "model.hiddens.loss.mim.loss_weight: expected a number, got a boolean" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


class ZeroLoss(HiddenLoss):
    def _input_names(self):
        return ["hiddens"]

    def _loss(self, inputs, batch_data=None):
        return {"loss": inputs["hiddens"].sum(-1).T * 0}


class ThirdParty:
    @mega.hookimpl
    def register_hidden_losses(self, register):
        register("zero_loss", ZeroLoss)

    @mega.hookimpl
    def register_hidden_transforms(self, register):
        register("doubling", Doubling)


def test_a_plugin_ships_a_loss_through_register_hidden_losses(inputs):
    from mega.plugin_manager import load_plugins

    plugins = load_plugins(extra=[ThirdParty()])
    assert plugins.hidden_losses.get("zero_loss").plugin == "ThirdParty"
    assert plugins.hidden_losses.get("a_mim").plugin == "hiddens"
    module = get_hiddens_module({"transform": {"d": {"cls_name": "doubling"}}, "loss": {"z": {"cls_name": "zero_loss"}}},
                                plugins=plugins)
    assert float(module.apply_loss_transforms(module.apply_hidden_transforms(inputs))["hiddens_loss"]) == 0.0
    with pytest.raises(ConfigError, match=r"loss.z.loss_weigth: unknown key, did you mean loss_weight\?"):
        get_hiddens_module({"loss": {"z": {"cls_name": "zero_loss", "loss_weigth": 1}}}, plugins=plugins)


def test_a_run_uses_the_hidden_losses_of_its_own_plugins(tmp_path, corpus):
    """A loss registered through load_plugins(extra=...) reaches the model of a run made
    with that manager (the model factory gets the run's plugins), and stays invisible to
    the process-wide plugins."""
    from mega.plugin_manager import get_plugins, load_plugins

    plugins = load_plugins(extra=[ThirdParty()])
    raw = _bart_raw(tmp_path, corpus, {"loss": {"zero": {"cls_name": "zero_loss", "loss_weight": 0.5}}})
    run = mega.run(config_from_dict(raw, plugins=plugins), plugins)
    loss = run.model.hiddens_module.hidden_loss_transforms[0]
    assert isinstance(loss, ZeroLoss) and loss.name == "zero" and loss.loss_weight == 0.5
    metrics = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("hiddens_zero_loss") == 0.0 for m in metrics)
    assert "zero_loss" not in get_plugins().hidden_losses
    with pytest.raises(ConfigError, match="model.hiddens.loss.zero.cls_name: unknown hidden loss 'zero_loss'"):
        config_from_dict(_bart_raw(tmp_path, corpus, {"loss": {"zero": {"cls_name": "zero_loss"}}}))


def test_miswired_hiddens_fail_before_the_run_directory_exists(tmp_path, corpus, capsys):
    """A loss that needs an output no transform produces is NeMo's module check; `mega run`
    makes it through ModelConfig.check before anything is written."""
    import tomli_w

    from mega.cli import main

    exp = tmp_path / "exp.toml"
    exp.write_text(tomli_w.dumps(_bart_raw(tmp_path, corpus, {"loss": {"mim": {"cls_name": "a_mim"}}})))
    assert main(["run", str(exp)]) == 2
    err = capsys.readouterr().err
    assert "model.hiddens: Loss transforms inputs = " in err and "are not supported by hidden transforms" in err
    assert not (tmp_path / "results").exists()
