"""Opening a checkpoint: the one way every command and plugin gets a trained model back.

`restore(path)` takes anything a user may point at — a run directory (its latest good
checkpoint), a `checkpoints/` folder, a checkpoint directory, or a checkpoint in one file
(a `.mega` archive, a `.nemo`, any file a format plugin can unpack or import) — verifies
it against its manifest, builds the tokenizer from the files beside its config and the
model from its config, checks the model against the protocol the caller will use it
through, and loads the weights resharded to this process's tensor/pipeline layout.
`mega generate`, `mega encode`, `mega predict`, `mega evaluate`, every exporter, the
task encoders (`lm_checkpoint`) and `mega.restore_from` go through it; resuming a
training run uses its lower half, `load_state`, on the model and optimizer the run built.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import random
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import attrs
import numpy as np
import torch

from mega.checkpoint.files import checkpoint_tokenizer
from mega.checkpoint.formats import find_importer, format_of
from mega.checkpoint.reshard import load_resharded
from mega.checkpoint.store import resolve_checkpoint, verify
from mega.config import ExperimentConfig, config_from_dict, load_raw
from mega.protocols import LanguageModel, PipelineStage, Tokenizer, Unpacks
from mega.registry import built
from mega.runtime.parallel import ParallelState

log = logging.getLogger("mega.checkpoint")


@attrs.define
class Opened:
    """A checkpoint a path named, resolved and verified."""

    checkpoint: Path  # the checkpoint directory (an archive's unpacked copy)
    manifest: dict
    run_dir: Optional[Path] = None  # the run directory, when the path was one (its data/ holds generated corpora)
    archive: Optional[Path] = None  # the one-file checkpoint given, if it was one
    scratch: Optional[Path] = None  # where that file was unpacked; removed when this process exits

    @property
    def config_path(self) -> Path:
        return self.checkpoint / "config.toml"

    def raw_config(self) -> dict:
        return load_raw(self.config_path)

    def config(self, plugins, overrides: Sequence[str] = ()) -> ExperimentConfig:
        """The experiment the checkpoint was trained with, `overrides` applied."""
        return config_from_dict(self.raw_config(), list(overrides), plugins, source=str(self.config_path))


@attrs.define
class Restored:
    """What `restore` returns; unpacks as `model, tokenizer, config`."""

    model: torch.nn.Module  # in eval mode, on the device asked for
    tokenizer: Tokenizer
    config: ExperimentConfig
    opened: Opened

    def __iter__(self) -> Iterator:
        return iter((self.model, self.tokenizer, self.config))


def _plugins(plugins):
    if plugins is None:
        from mega.plugin_manager import get_plugins

        plugins = get_plugins()
    return plugins


def unpack_checkpoint_file(path: Path, plugins) -> Tuple[Path, Path]:
    """(checkpoint directory, scratch directory holding it) for a checkpoint in one file,
    through the checkpoint format that recognises it (see `mega import`): unpacked when the
    format can `unpack(file, directory)`, else imported into a scratch run directory. The
    scratch directory is removed when this process exits."""
    fmt = find_importer(path, plugins, hint=f"give a run directory, a checkpoint directory or an archive (.mega, .nemo),"
                                            f" or convert it first with `mega import {path} RUN_DIR --from FORMAT`")
    scratch = Path(tempfile.mkdtemp(prefix="mega-checkpoint-"))
    atexit.register(shutil.rmtree, scratch, True)
    try:
        ckpt = (fmt.unpack(path, scratch / "checkpoint") if isinstance(fmt, Unpacks)
                else fmt.import_run(path, scratch / "run", {}, plugins))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return ckpt, scratch


def open_checkpoint(path: Union[str, Path, Opened], plugins=None) -> Opened:
    """Resolve and verify what `path` names: a run directory, a checkpoints/ folder, a
    checkpoint directory, or a checkpoint in one file (unpacked into a scratch directory)."""
    if isinstance(path, Opened):
        return path
    plugins = _plugins(plugins)
    given = Path(path).expanduser()
    if given.is_file():
        ckpt, scratch = unpack_checkpoint_file(given, plugins)
        return Opened(ckpt, verify(ckpt), archive=given, scratch=scratch)
    ckpt = resolve_checkpoint(given)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return Opened(ckpt, verify(ckpt), run_dir=run_dir)


def load_state(opened: Opened, parallel: ParallelState, model, plugins, optimizer=None) -> dict:
    """This rank's part of a verified checkpoint (model, and optimizer and trainer state
    where saved), resharded to `parallel` when it was saved at another layout."""
    fmt = format_of(opened.manifest, plugins, f"{opened.checkpoint / 'manifest.json'}")
    return load_resharded(fmt, opened.checkpoint, opened.manifest, parallel, model, optimizer)


@contextlib.contextmanager
def _own_rng(seed: int) -> Iterator[None]:
    """Build under `seed` without moving the caller's generators (torch, random, numpy):
    restoring a model in the middle of a script must not change what the script draws
    next."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        from mega.runtime.rng import seed_everything

        seed_everything(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def build_model(config: ExperimentConfig, tokenizer: Tokenizer, plugins, parallel: ParallelState, device="cpu"):
    """The model `config.model` describes, at `parallel`'s layout, checked against the
    protocol the kernel uses it through (a pipeline stage when there are several)."""
    from mega.runtime.tensor_parallel import get_rng_tracker

    mc = config.model
    entry = plugins.models.get(mc.name, "model.name")
    get_rng_tracker().reset(mc.seed, parallel.tp_rank, torch.device(device).type)
    with _own_rng(mc.seed):
        return built(entry, PipelineStage if parallel.pp_size > 1 else LanguageModel,
                     entry.factory(mc, tokenizer, plugins))


def restore(path: Union[str, Path, Opened], plugins=None, *, config: Optional[ExperimentConfig] = None,
            overrides: Sequence[str] = (), parallel: Optional[ParallelState] = None, device="cpu") -> Restored:
    """(model in eval mode, tokenizer, config) of a checkpoint, at `parallel`'s layout
    (default: this process's, `mega.runtime.parallel.current()`). `config` replaces the
    checkpoint's own (e.g. `mega evaluate`'s, with its layout and data overrides);
    `overrides` are applied to the checkpoint's own otherwise."""
    from mega.runtime.parallel import current

    plugins = _plugins(plugins)
    opened = open_checkpoint(path, plugins)
    parallel = parallel or current()
    config = config if config is not None else opened.config(plugins, overrides)
    tokenizer = checkpoint_tokenizer(config, opened.checkpoint, plugins)
    model = build_model(config, tokenizer, plugins, parallel, device)
    model.load_state_dict(load_state(opened, parallel, model, plugins)["model"])
    if opened.scratch is not None:  # once loaded, only the tokenizer files the config names stay
        keep = {str(v) for v in attrs.asdict(config.model.tokenizer).values() if isinstance(v, str)}
        for f in [p for p in opened.scratch.rglob("*") if p.is_file() and str(p) not in keep]:
            f.unlink()
    return Restored(model.to(device).eval(), tokenizer, config, opened)
