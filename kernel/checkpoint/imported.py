"""A run directory written from weights converted elsewhere (`mega import`, a format
plugin's `import_run`), so every imported run looks like a trained one: `config.toml`,
the tokenizer files, and a verified native checkpoint with a sharding record (so it
loads, and reshards, at any tensor/pipeline size)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, Mapping

import attrs
import torch

from mega.checkpoint.atomic import atomic_directory
from mega.checkpoint.files import checkpoint_files
from mega.checkpoint.store import LATEST, CheckpointManager
from mega.config import ExperimentConfig, config_from_dict, dump_config
from mega.errors import CheckpointError
from mega.protocols import CheckpointFormat, LanguageModel, Tokenizer
from mega.registry import built
from mega.runtime.parallel import ParallelState
from mega.runtime.sharding import sharding_of


def write_imported_run(run_dir: Path, raw_config: dict, model_state: Dict[str, torch.Tensor], plugins,
                       files: Mapping[str, Path] = (), step: int = 0) -> Path:
    """Write a run directory from a converted model; returns its checkpoint.

    `raw_config` is an experiment as a dict (at least its `model` table, with the tokenizer;
    `exp_manager` is set here); `model_state` holds the whole model's tensors under mega's
    names at one process (vocabulary padded as the config pads it); `files` are tokenizer
    files to copy in, by the tokenizer config key that names them. The model is built from
    the config and loaded strictly, so a mapping mistake fails here, not at generation.

    Everything is written into a temporary directory beside `run_dir`, renamed into place
    at the end: a failed import leaves nothing behind, and never touches an existing run."""
    from mega.runtime.parallel import one_process

    run_dir = Path(run_dir).expanduser().absolute()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"{run_dir}: exists and is not empty; import into a new directory")
    with atomic_directory(run_dir) as tmp, one_process():  # the whole model, also inside a parallel run
        _write_run(tmp, run_dir, raw_config, model_state, plugins, files, step)
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / LATEST).read_text().strip()


def _write_run(tmp: Path, run_dir: Path, raw_config: dict, model_state, plugins, files, step: int) -> None:
    """The run directory's content, written in `tmp`; the config names `run_dir` (its final place)."""
    tok = raw_config.setdefault("model", {}).setdefault("tokenizer", {})
    for key, path in dict(files).items():
        shutil.copyfile(path, tmp / Path(path).name)
        tok[key] = str(run_dir / Path(path).name)
    raw_config["exp_manager"] = {**raw_config.get("exp_manager", {}), "exp_dir": str(run_dir.parent), "name": run_dir.name}
    config: ExperimentConfig = config_from_dict(raw_config, plugins=plugins, source=f"{run_dir} (imported)")
    mc = config.model
    mc.check(plugins)
    tok_cfg = attrs.evolve(mc.tokenizer, **{k: str(tmp / Path(p).name) for k, p in dict(files).items()})
    tok_entry = plugins.tokenizers.get(mc.tokenizer.library, "model.tokenizer.library")
    tokenizer = built(tok_entry, Tokenizer, tok_entry.factory(tok_cfg, [], tmp))
    model_entry = plugins.models.get(mc.name, "model.name")
    with torch.random.fork_rng(devices=[]):
        model = built(model_entry, LanguageModel, model_entry.factory(mc, tokenizer, plugins))
    try:
        missing, unexpected = model.load_state_dict(model_state, strict=False)
    except RuntimeError as exc:  # shapes that do not match the mapped config
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:])  # "size mismatch for ...", one line
        raise CheckpointError(f"{run_dir}: the converted weights do not fit model {mc.name!r}: {detail}") from None
    if missing or unexpected:
        raise CheckpointError(f"{run_dir}: the converted weights do not fit model {mc.name!r}"
                              f" (missing: {', '.join(missing) or '-'}; unexpected: {', '.join(unexpected) or '-'})")
    (tmp / "config.toml").write_text(dump_config(config))
    save_model_checkpoint(tmp, config, model, tokenizer, plugins, step)


def save_model_checkpoint(run_dir: Path, config: ExperimentConfig, model: torch.nn.Module, tokenizer, plugins,
                          step: int = 0) -> Path:
    """A native checkpoint of `model` alone (no optimizer: a resumed run starts its moments
    afresh) under `run_dir/checkpoints`, with the config and tokenizer files beside it, as
    the training loop writes them."""
    single = ParallelState()
    extra = checkpoint_files(config, tokenizer)
    entry = plugins.checkpoint_formats.get("native")
    fmt = built(entry, CheckpointFormat, entry.factory())
    state = {"model": model.state_dict(), "trainer": {"step": step, "consumed_samples": 0},
             "sharding": sharding_of(model, single)}
    meta = {"consumed_samples": 0, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}
    return CheckpointManager(run_dir / "checkpoints", fmt, keep_last_k=0).save(step, state, extra, meta=meta, parallel=single)
