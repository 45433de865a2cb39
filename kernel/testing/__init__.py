"""Helpers for testing mega plugins: a tiny experiment, a corpus, and a plugin registered
for one test.

Plain functions, importable without pytest::

    from mega.testing import write_corpus, tiny_config, read_metrics, register_plugin

The same helpers come as pytest fixtures from `mega.testing.pytest_plugin`, which mega-lm
installs as a pytest plugin (entry point `pytest11`), so any project with mega-lm
installed can use them without a conftest:

* `mega_plugins` (session): every installed plugin, loaded once.
* `mega_corpus`: a small text file of random words under the test's `tmp_path`.
* `mega_experiment`: a `TinyExperiment` on `mega_corpus` under `tmp_path` — a 2-layer
  byte-level GPT that trains in about a second on a CPU.
* `mega_device`: "cpu", and "cuda" where torch sees a GPU (skipped elsewhere): a test
  taking it checks a plugin's tensors on the GPU too.
* `mega_plugin`: `mega_plugin(obj)` registers a plugin object for this test only and
  returns the `Plugins` it is in.

The tiny experiment is the one mega's own test suite uses (`tests/`), so its numbers are
stable across releases only as far as the kernel's are; assert on relations (the loss
falls, a plugin saw every step) rather than on exact losses.
"""
from __future__ import annotations

import contextlib
import copy
import json
import random
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

# Keep this module light: pytest imports it at start-up (through the pytest plugin) in
# every project where mega-lm is installed, so mega's heavier modules (torch, cattrs) are
# imported inside the functions that need them.

__all__ = [
    "WORDS",
    "TinyExperiment",
    "count_host_syncs",
    "deep_update",
    "full_grads",
    "read_metrics",
    "register_plugin",
    "run_cli",
    "run_ranks",
    "tiny_config",
    "tiny_model",
    "tiny_preset",
    "tiny_raw",
    "write_corpus",
    "write_documents",
    "write_vocab",
]

WORDS = ("the model reads a token and predicts the next one while the loss falls slowly "
         "data flows through layers of attention and feed forward blocks").split()


def write_corpus(path: Path, lines: int = 200, seed: int = 0) -> Path:
    """Write `lines` lines of 5-30 random words from `WORDS` to `path` (the same text for
    the same `seed`) and return `path`."""
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(lines))
    path = Path(path)
    path.write_text(text + "\n")
    return path


def write_documents(path: Path, documents: int = 40, seed: int = 0) -> Path:
    """Write `documents` documents of 1-7 sentences, one sentence per line and a blank line
    between documents (what BERT's sentence-pair samples are cut from), to `path`."""
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + " ."
                     for _ in range(rng.randint(1, 7))]
        docs.append("\n".join(sentences))
    path = Path(path)
    path.write_text("\n\n".join(docs) + "\n")
    return path


SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_vocab(path: Path, words: Sequence[str] = WORDS) -> Path:
    """A BERT-style `vocab.txt`: its special tokens, `.`, then `words` (each once, in order)."""
    seen = dict.fromkeys([*SPECIAL, ".", *words])
    path = Path(path)
    path.write_text("\n".join(seen) + "\n")
    return path


TINY_TRAINER = {"max_steps": 6, "val_check_interval": 3, "limit_val_batches": 2, "log_every_n_steps": 1,
                "enable_progress_bar": False, "accelerator": "cpu"}


def tiny_preset(name: str, directory: Path, plugins=None, **sections) -> dict:
    """The tiny experiment of the registered model `name` (its config class's
    `tiny_preset`, see `mega.config.ModelConfig`): a few quick steps under
    `directory / "results" / name`, the files it needs written under `directory`, then
    `sections` deep-merged (`trainer={"max_steps": 2}`). A ConfigError names a model
    without a preset."""
    from mega.errors import ConfigError

    if plugins is None:
        import mega

        plugins = mega.get_plugins()
    entry = plugins.models.get(name, "model.name")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    preset = entry.config.tiny_preset(directory) if entry.config is not None else None
    if preset is None:
        raise ConfigError(f"model {name!r} (plugin {entry.plugin!r}) has no tiny preset (ModelConfig.tiny_preset)")
    raw = {"trainer": dict(TINY_TRAINER),
           "exp_manager": {"exp_dir": str(directory / "results"), "name": name, "loggers": ["jsonl"],
                           "checkpoint": {"every_n_train_steps": 0}}}
    deep_update(raw, copy.deepcopy(preset))
    raw.setdefault("model", {})["name"] = name
    return deep_update(raw, copy.deepcopy(sections))


def tiny_model(name: str, directory: Path, plugins=None, **model):
    """(model, tokenizer, config) of the registered model `name` built from its tiny preset
    (`model` keys deep-merged into its table), on the CPU, in eval mode, without training.
    The model is seeded by its config's `model.seed`, so two calls build the same weights."""
    from mega.checkpoint import build_model
    from mega.config import config_from_dict
    from mega.runtime.parallel import ParallelState

    if plugins is None:
        import mega

        plugins = mega.get_plugins()
    raw = tiny_preset(name, directory, plugins, model=model)
    config = config_from_dict(raw, [], plugins, source=f"tiny preset of {name}")
    mc = config.model
    mc.check(plugins)
    source = plugins.datasets.get(mc.data.data_impl, "model.data.data_impl").factory(mc.data, Path(directory))
    tokenizer = plugins.tokenizers.get(mc.tokenizer.library, "model.tokenizer.library").factory(
        mc.tokenizer, source.files(), Path(directory))
    return build_model(config, tokenizer, plugins, ParallelState()).eval(), tokenizer, config


def run_ranks(fn, world: int, tp: int = 1, pp: int = 1, args=(), timeout: float = 120):
    """`fn(parallel_state, *args)` on `world` local ranks (gloo, CPU, spawned processes) with
    `tp` x `pp` model parallelism; returns each rank's result, by rank. `fn` must be defined
    at module level (each rank imports it). See `mega.testing.multiproc`."""
    from mega.testing.multiproc import run_ranks as _run

    return _run(fn, world, tp, pp, args, timeout)


def full_grads(model, parallel) -> dict:
    """Each parameter's gradient as one process holds it: tensor-parallel shards gathered
    along their partition dimension (call on every rank of the group)."""
    from mega.testing.multiproc import full_grads as _grads

    return _grads(model, parallel)


def count_host_syncs(device=None):
    """A context manager recording every host synchronisation (`.item()`, `float(t)`, a
    Python `if` on a tensor, `.tolist()`, `.cpu()`, `nonzero`, ...) in its block; yields a
    `HostSyncs` with `count` and `summary()`. See `mega.testing.host_syncs`."""
    from mega.testing.host_syncs import count_host_syncs as _count

    return _count(device)


def run_cli(argv: Sequence[str]) -> int:
    """`mega ARGV...` in this process (e.g. `run_cli(["run", "exp.toml"])`); returns its
    exit status (errors print one line on stderr and return 2, as the command does)."""
    from mega.cli import main

    return main([str(a) for a in argv])


def deep_update(dst: dict, src: dict) -> dict:
    """Merge `src` into `dst` in place: nested dicts merge key by key, anything else
    replaces. Returns `dst`."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def tiny_raw(tmp_path: Path, corpus: Path, **sections) -> dict:
    """A raw experiment dict (what a TOML file parses to) for a 2-layer byte-level GPT
    training 6 steps on `corpus`, writing under `tmp_path / "results" / "tiny"`.

    Each keyword is a top-level table deep-merged into the defaults, e.g.
    `tiny_raw(tmp, corpus, trainer={"max_steps": 3}, model={"optim": {"lr": 3e-3}})`.
    """
    raw = {
        "trainer": {"max_steps": 6, "val_check_interval": 3, "limit_val_batches": 2, "log_every_n_steps": 1,
                    "enable_progress_bar": False},
        "exp_manager": {"exp_dir": str(Path(tmp_path) / "results"), "name": "tiny", "loggers": ["jsonl"],
                        "checkpoint": {"every_n_train_steps": 0}},
        "model": {"name": "gpt", "micro_batch_size": 4, "seq_length": 32, "num_layers": 2, "hidden_size": 32,
                  "num_attention_heads": 4, "make_vocab_size_divisible_by": 8, "hidden_dropout": 0.1,
                  "attention_dropout": 0.1,
                  "tokenizer": {"library": "bytes"},
                  "data": {"data_prefix": [str(corpus)], "splits_string": "80,10,10"},
                  "optim": {"lr": 1e-3, "sched": {"name": "cosine", "warmup_steps": 2}}},
    }
    deep_update(raw, copy.deepcopy(sections))
    return raw


def tiny_config(tmp_path: Path, corpus: Path, plugins=None, overrides: Sequence[str] = (), **sections):
    """`tiny_raw(...)` validated into an `ExperimentConfig` by `plugins` (default: the
    installed plugins), after command-line style `overrides` such as
    `["model.optim.lr=3e-3", "+model.my_key=1"]`."""
    from mega.config import config_from_dict

    return config_from_dict(tiny_raw(tmp_path, corpus, **sections), list(overrides), plugins)


def read_metrics(run_dir: Path) -> List[dict]:
    """The lines of `run_dir/metrics.jsonl` (written by the `jsonl` logger), in order:
    training lines carry `step`, `loss`, `lr`, ...; validation lines `step`, `val_loss`, ..."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


class TinyExperiment:
    """A tiny experiment on `corpus`, written under `directory`; each method takes
    top-level tables as keywords, deep-merged into `tiny_raw`'s defaults.

    `plugins` is the default `Plugins` for `config` and `run` (None: the installed ones).
    """

    def __init__(self, directory: Path, corpus: Path, plugins=None):
        self.directory = Path(directory)
        self.corpus = Path(corpus)
        self.plugins = plugins

    def run_dir(self, name: str = "tiny") -> Path:
        """Where a run named `name` (`exp_manager.name`) writes its metrics and checkpoints."""
        return self.directory / "results" / name

    def raw(self, **sections) -> dict:
        return tiny_raw(self.directory, self.corpus, **sections)

    def config(self, *overrides: str, plugins=None, **sections):
        """A validated `ExperimentConfig`; `overrides` are `key=value` strings."""
        return tiny_config(self.directory, self.corpus, plugins or self.plugins, overrides, **sections)

    def toml(self, name: str = "experiment.toml", **sections) -> Path:
        """Write the experiment as a TOML file for `mega run` and return its path."""
        import tomli_w

        path = self.directory / name
        path.write_text(tomli_w.dumps(self.raw(**sections)))
        return path

    def run(self, *overrides: str, plugins=None, **sections):
        """Train the experiment in this process and return the finished `Run`
        (`run.run_dir` holds `metrics.jsonl`, `read_metrics(run.run_dir)` reads it)."""
        import mega

        plugins = plugins or self.plugins
        return mega.run(self.config(*overrides, plugins=plugins, **sections), plugins)


def _plugin_name(plugin: object) -> str:
    return getattr(plugin, "__name__", None) or type(plugin).__name__


@contextlib.contextmanager
def register_plugin(plugin: object, plugins=None, name: Optional[str] = None) -> Iterator[Any]:
    """Register `plugin` — an object or module with `@mega.hookimpl` methods — for the
    length of a `with` block, and yield the `mega.plugin_manager.Plugins` it is in.

    * `plugins=None`: a fresh manager with every installed plugin plus `plugin`. Its
      registration hooks run, so the components it registers are usable by name in an
      experiment built with the yielded plugins; its lifecycle hooks fire in runs built
      with them. Nothing global changes.
    * `plugins` given (e.g. the session-wide `mega_plugins`): `plugin` joins that manager
      for lifecycle hooks (`on_step_end`, ...) and leaves it when the block ends, even on
      error. Registration hooks run only when plugins are loaded, so a plugin
      implementing one is refused here; use `plugins=None` for it.

    `name` is the plugin's name in an existing manager (default: its `__name__` or class
    name, which is also the name in a fresh one). A method named like no hook (say
    `on_step_ends`) is an error, as in `load_plugins`.
    """
    from mega.errors import PluginError
    from mega.plugin_manager import load_plugins
    from mega.registry import KINDS

    name = name or _plugin_name(plugin)
    if plugins is None:
        plugins = load_plugins(extra=[plugin])
        try:
            yield plugins
        finally:
            if plugins.pm.is_registered(plugin):
                plugins.pm.unregister(plugin)
        return
    pm = plugins.pm
    pm.register(plugin, name=name)
    try:
        callers = pm.get_hookcallers(plugin) or []
        hooks = {h.name for h in callers}
        unknown = sorted(h.name for h in callers if not h.has_spec())
        if unknown:
            raise PluginError(f"plugin {name!r} implements an unknown hook: {', '.join(unknown)}")
        registration = sorted(hooks & set(KINDS.values()))
        if registration:
            raise PluginError(
                f"plugin {name!r} implements {', '.join(registration)}, which run only when plugins are loaded:"
                " register it with plugins=None (a fresh manager) instead")
        yield plugins
    finally:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
