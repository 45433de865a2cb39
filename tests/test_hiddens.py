"""The hiddens module against specs/hiddens.md: each transform and loss equals its formula
(float64; references from torch.distributions), the masked per-sample reductions (an
all-padding row gives 0), the joint loss and its key names, every validation error, the
NeMo-compatible options, and the registration API."""
from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

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


def test_constructor_mismatch_reraises_the_original_error(caplog):
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        get_hiddens_module({"loss": {"mim": {"cls_name": "a_mim", "foo": 1}}})
    assert "Failed to build hidden loss mim with cfg=" in caplog.text


def test_missing_and_unknown_cls_name():
    with pytest.raises(KeyError, match="Missing 'cls_name' in hidden transform q"):
        get_hiddens_module({"transform": {"q": {"hidden_size": H}}})
    with pytest.raises(KeyError, match=r"Unknown hidden loss amim, available: dict_keys\(\['a_mim'"):
        get_hiddens_module({"loss": {"m": {"cls_name": "amim"}}})


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


def test_python_registration_api(inputs):
    names = get_registered_hiddens()
    assert {"a_mim", "vae"} <= set(names["loss"]) and "cond_gaussian" in names["transform"]
    register_hidden_transform("doubling_test", Doubling)
    register_hidden_loss("amim_by_path_test", "mega.plugins.hiddens.losses.AMIMLoss")
    with pytest.raises(ValueError, match="duplicate"):
        register_hidden_transform("cond_gaussian", Doubling)
    assert "doubling_test" in get_registered_hiddens()["transform"]
    module = get_hiddens_module({"enc_output_name": "twice", "transform": {"d": {"cls_name": "doubling_test"}}})
    torch.testing.assert_close(module.apply_hidden_transforms(inputs)["enc_output"], 2 * inputs["hiddens"])
    assert isinstance(get_hiddens_module({"transform": {"q": {"cls_name": "cond_gaussian", "hidden_size": H}},
                                          "loss": {"m": {"cls_name": "amim_by_path_test"}}}).hidden_loss_transforms[0], AMIMLoss)


def test_a_plugin_ships_a_loss_through_register_hidden_losses(inputs):
    import mega
    from mega.plugin_manager import load_plugins

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

    plugins = load_plugins(extra=[ThirdParty()])
    assert plugins.hidden_losses.get("zero_loss").plugin == "ThirdParty"
    assert plugins.hidden_losses.get("a_mim").plugin == "hiddens"
    module = get_hiddens_module({"transform": {"d": {"cls_name": "doubling"}}, "loss": {"z": {"cls_name": "zero_loss"}}},
                                plugins=plugins)
    assert float(module.apply_loss_transforms(module.apply_hidden_transforms(inputs))["hiddens_loss"]) == 0.0
