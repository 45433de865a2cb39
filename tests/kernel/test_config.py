"""Config loading: strict types, unknown keys at their dotted path, overrides in the Hydra
grammar of the seeds, every problem reported in one pass."""
from __future__ import annotations

import pytest

from mega.config import config_from_dict, dump_config, load_config, parse_value
from mega.errors import ConfigError
from mega.testing import tiny_raw


def _error(raw, plugins, overrides=()):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, overrides, plugins)
    return str(info.value)


def test_defaults_structure_into_the_plugin_config_class(plugins):
    cfg = config_from_dict({}, plugins=plugins)
    assert type(cfg.model).__name__ == "GPTConfig"
    assert type(cfg.model.tokenizer).__name__ == "SentencePieceConfig"
    assert cfg.model.optim.betas == [0.9, 0.95]
    assert cfg.trainer.precision == "32"


def test_unknown_key_is_named_with_its_dotted_path_and_a_suggestion(plugins):
    msg = _error({"model": {"hiden_size": 64}}, plugins)
    assert "model.hiden_size: unknown key, did you mean hidden_size?" in msg


def test_unknown_key_in_a_plugin_table(plugins):
    msg = _error({"model": {"tokenizer": {"library": "sentencepiece", "vocab_sise": 10}}}, plugins)
    assert "model.tokenizer.vocab_sise: unknown key, did you mean vocab_size?" in msg


@pytest.mark.parametrize("key,value,expected", [
    (("trainer", "max_steps"), 2.5, "an integer"),
    (("trainer", "max_steps"), "10", "an integer"),
    (("trainer", "max_steps"), True, "an integer"),
    (("exp_manager", "resume_if_exists"), "false", "a boolean"),
    (("model", "optim", "lr"), "1e-3", "a number"),
    (("exp_manager", "name"), 3, "a string"),
    (("trainer", "precision"), "fp8", "expected 32, 16"),
])
def test_wrong_types_are_rejected_not_coerced(plugins, key, value, expected):
    raw: dict = {}
    node = raw
    for part in key[:-1]:
        node = node.setdefault(part, {})
    node[key[-1]] = value
    msg = _error(raw, plugins)
    assert ".".join(key) in msg and expected in msg


def test_every_problem_is_reported_in_one_pass(plugins):
    msg = _error({"trainer": {"max_stepz": 1, "log_every_n_steps": "x"}, "model": {"num_layers": 1.5}}, plugins)
    assert "3 problems" in msg
    assert "trainer.max_stepz: unknown key, did you mean max_steps?" in msg
    assert "trainer.log_every_n_steps: expected an integer" in msg
    assert "model.num_layers: expected an integer" in msg


def test_unknown_component_name_lists_choices_and_closest(plugins):
    msg = _error({"model": {"name": "gtp"}}, plugins)
    assert "model.name: unknown model 'gtp', did you mean gpt?" in msg
    msg = _error({"model": {"optim": {"sched": {"name": "cosin"}}}}, plugins)
    assert "model.optim.sched.name" in msg and "did you mean cosine?" in msg and "constant" in msg


def test_table_expected(plugins):
    assert "trainer: expected a table" in _error({"trainer": 3}, plugins)


def test_data_prefix_forms(plugins):
    def prefix(value):
        return config_from_dict({"model": {"data": {"data_prefix": value}}}, plugins=plugins).model.data.data_prefix

    assert prefix(["a.txt", "b.txt"]) == [1.0, "a.txt", 1.0, "b.txt"]
    assert prefix([0.3, "a.txt", 1, "b.txt"]) == [0.3, "a.txt", 1.0, "b.txt"]
    with pytest.raises(ConfigError, match="model.data.data_prefix"):
        prefix([0.3, "a.txt", "b.txt"])
    with pytest.raises(ConfigError, match="model.data.data_prefix"):
        prefix([-1, "a.txt"])


# --- overrides ---------------------------------------------------------------------------


@pytest.mark.parametrize("text,value", [
    ("3", 3), ("1e-4", 1e-4), ("true", True), ("False", False), ("null", None),
    ('"800,100,100"', "800,100,100"), ("'\"800,100,100\"'", "800,100,100"),
    ("[1.0,/data/wiki.txt]", [1.0, "/data/wiki.txt"]), ("cond_gaussian", "cond_gaussian"),
    ("[1, 2]", [1, 2]), ("[]", []),
])
def test_override_values_parse_like_the_seeds(text, value):
    assert parse_value(text) == value


def test_override_existing_key_from_defaults(plugins):
    cfg = config_from_dict({}, ["trainer.max_steps=7", "model.num_layers=3", "model.tokenizer.vocab_size=100"], plugins)
    assert (cfg.trainer.max_steps, cfg.model.num_layers, cfg.model.tokenizer.vocab_size) == (7, 3, 100)


@pytest.mark.parametrize("override,suggestion", [
    ("model.hiden_size=64", "model.hidden_size"),  # a key of the chosen model's config class
    ("model.optim.sched.warmup_step=3", "model.optim.sched.warmup_steps"),
    ("model.tokenizer.vocab_sise=100", "model.tokenizer.vocab_size"),  # exists for sentencepiece only
    ("trainer.max_step=3", "trainer.max_steps"),
])
def test_a_mistyped_override_suggests_the_key(plugins, override, suggestion):
    with pytest.raises(ConfigError, match=rf"no such key to override, did you mean {suggestion}\?; use \+"):
        config_from_dict({}, [override], plugins)


def test_override_of_a_missing_key_needs_plus(plugins):
    with pytest.raises(ConfigError, match=r"model.foo: no such key to override; use \+model.foo"):
        config_from_dict({}, ["model.foo=1"], plugins)
    # + adds the key to the raw config; the schema then rejects it by name
    with pytest.raises(ConfigError, match="model.foo: unknown key"):
        config_from_dict({}, ["+model.foo=1"], plugins)


def test_plus_refuses_an_existing_key_and_plusplus_replaces(plugins):
    with pytest.raises(ConfigError, match="already set"):
        config_from_dict({"trainer": {"max_steps": 3}}, ["+trainer.max_steps=4"], plugins)
    cfg = config_from_dict({"trainer": {"max_steps": 3}}, ["++trainer.max_steps=4"], plugins)
    assert cfg.trainer.max_steps == 4


def test_override_uses_the_plugin_schema_of_the_chosen_component(plugins):
    # vocab_size exists for sentencepiece but not for bytes
    with pytest.raises(ConfigError, match="model.tokenizer.vocab_size: no such key"):
        config_from_dict({"model": {"tokenizer": {"library": "bytes"}}}, ["model.tokenizer.vocab_size=10"], plugins)


def test_seed_command_line_translates(plugins, tmp_path):
    seed_args = [
        "trainer.log_every_n_steps=1", "trainer.val_check_interval=10", "trainer.limit_val_batches=2",
        "trainer.accumulate_grad_batches=1", "trainer.max_steps=10", "trainer.precision=16",
        "trainer.gradient_clip_val=1.0", f"exp_manager.exp_dir={tmp_path}/megatron_mim",
        "model.micro_batch_size=2", "model.global_batch_size=4", "model.seq_length=128",
        "model.data.data_impl=text_mmap", "model.data.data_prefix=[1.0,/data/wiki.txt]",
        "model.data.splits_string='\"800,100,100\"'", "model.tokenizer.library=sentencepiece",
        "model.tokenizer.model=/data/spm_64k_all_langs_plus_en.model",
    ]
    cfg = config_from_dict({}, seed_args, plugins)
    assert cfg.trainer.precision == "16"
    assert cfg.model.data.data_prefix == [1.0, "/data/wiki.txt"]
    assert cfg.model.data.splits_string == "800,100,100"
    assert cfg.exp_manager.exp_dir == f"{tmp_path}/megatron_mim"


def test_bad_override_syntax(plugins):
    with pytest.raises(ConfigError, match="expected key=value"):
        config_from_dict({}, ["max_steps"], plugins)


# --- files and round trip --------------------------------------------------------------------


def test_missing_file_and_bad_toml_name_the_file(tmp_path, plugins):
    with pytest.raises(ConfigError, match="no such experiment file"):
        load_config(tmp_path / "nope.toml", plugins=plugins)
    bad = tmp_path / "bad.toml"
    bad.write_text("[trainer]\nmax_steps = = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML: .*line 2"):
        load_config(bad, plugins=plugins)


def test_errors_from_a_file_name_the_file(tmp_path, plugins):
    f = tmp_path / "exp.toml"
    f.write_text("[model]\nnum_layerz = 2\n")
    with pytest.raises(ConfigError, match=r"exp.toml: model.num_layerz: unknown key, did you mean num_layers\?"):
        load_config(f, plugins=plugins)


def test_dump_round_trips(tmp_path, corpus, plugins):
    cfg = config_from_dict(tiny_raw(tmp_path, corpus), ["trainer.precision=bf16"], plugins)
    f = tmp_path / "resolved.toml"
    f.write_text(dump_config(cfg))
    assert load_config(f, plugins=plugins) == cfg


def _config_classes(plugins):
    """Every config class of `plugins`: ExperimentConfig, each registered component's
    config class, the tables nested in them (also entries of named tables), and any other
    attrs class of mega that declares a key with `mega.config.key` (the trackers' settings
    tables, read from exp_manager.*_logger_kwargs)."""
    import sys
    import typing

    import attrs

    from mega.config import ExperimentConfig
    from mega.config.reference import nested_table
    from mega.config.structure import named_base

    todo = [ExperimentConfig]
    todo += [e.config for r in plugins.registries.values() for e in r.entries() if getattr(e, "config", None)]
    for module in [m for name, m in sys.modules.items() if name.startswith("mega.") and m is not None]:
        for value in list(vars(module).values()):
            if (isinstance(value, type) and attrs.has(value) and value.__module__ == module.__name__
                    and any("help" in a.metadata for a in attrs.fields(value))):
                todo.append(value)
    seen = []
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for t in typing.get_type_hints(cls).values():
            todo += [c for c in (nested_table(t), named_base(t)) if c is not None]
    return seen


def test_every_config_key_has_a_help():
    """Issue 19: a key's meaning lives in its field (`mega.config.key(default, help=...)`)
    and docs/configuration.md prints it: a key declared without one is an empty cell of
    the reference. Walks every config class of the kernel and of mega-lm's plugins."""
    import typing
    from importlib.metadata import entry_points

    import attrs

    from mega.config.reference import help_of, nested_table
    from mega.plugin_manager import load_plugins

    ours = ",".join(sorted(ep.name for ep in entry_points(group="mega.plugins") if ep.dist and ep.dist.name == "mega-lm"))
    classes = _config_classes(load_plugins(only=ours))
    assert len(classes) > 50  # the walk reached the plugins' classes, not only the kernel's
    missing = [f"{cls.__module__}.{cls.__qualname__}.{a.name}"
               for cls in classes for a in attrs.fields(cls)
               if nested_table(typing.get_type_hints(cls).get(a.name)) is None and not help_of(cls, a.name)]
    assert not missing, "config keys without a help (declare them with mega.config.key(default, help=...)): " \
        + ", ".join(missing)


def test_a_key_redeclared_for_its_default_keeps_the_base_help():
    """A plugin class that only changes a base key's default (`name: str = "bert"`) keeps
    the base's meaning; a key no class explains has none."""
    from attrs import define

    from mega.config import key
    from mega.config.reference import help_of

    @define(kw_only=True)
    class Base:
        name: str = key("a", help="a registered thing")
        size: int = 1

    @define(kw_only=True)
    class Plugin(Base):
        name: str = "b"
        width: int = key(2, help="its own key")

    assert help_of(Plugin, "name") == "a registered thing"
    assert help_of(Plugin, "width") == "its own key"
    assert help_of(Plugin, "size") == ""
    assert Plugin().name == "b"
