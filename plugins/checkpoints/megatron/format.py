"""The `megatron` checkpoint format: Megatron-LM's legacy ("torch") layout, so tools
built for Megatron-LM checkpoints read ours and we read theirs.

    <checkpoints>/latest_checkpointed_iteration.txt      the iteration, as text
    <checkpoints>/iter_0000100/mp_rank_00/model_optim_rng.pt        (TP rank 0)
    <checkpoints>/iter_0000100/mp_rank_01_002/model_optim_rng.pt    (TP 1, PP stage 2)

`model_optim_rng.pt` holds `args` (an argparse.Namespace), `checkpoint_version` (3.0),
`iteration`, `model` (`language_model` -> `embedding` / `encoder` with Megatron's key
names), `optimizer`, `opt_param_scheduler` and `rng_state`; mega's own resume state rides
along under `mega`. Reading converts the fused QKV rows of checkpoint versions 0 and 1.0
to the per-head [heads, 3, head_dim] order used since 2.0, reads the files Hugging Face's
converter writes, and refuses what the model's family cannot run (its converter's
`megatron_check`).

The package, each module importing only those listed before it:

    files.py    reading model_optim_rng.pt safely (weights_only, an allow-list, stand-ins)
    layout.py   rank folders, nested <-> flat names, older spellings and QKV orders
    args.py     the `args` mega writes (the family's and tokenizer's fields from their converters)
    family.py   which model family's converter reads a checkpoint
    source.py   reading a Megatron-LM checkpoint for import, merging its shards
    interop.py  `mega import` / `mega export --to megatron`
    distrib_optim.py  the distributed optimizer's `distrib_optim.pt` (needs none of the above)
    format.py   this format (training checkpoints) and its hooks

Under `model.optim.use_distributed_optimizer` the optimizer's state goes into Megatron's
`distrib_optim.pt` beside `model_optim_rng.pt` (distrib_optim.py).
"""
from __future__ import annotations

from pathlib import Path
import torch

import mega
from mega.checkpoint import atomic_write_text
from mega.errors import CheckpointError
from mega.protocols import ChecksMegatronResume, MegatronModelConverter
from mega.plugins.checkpoints.converters import model_converter
from mega.plugins.checkpoints.megatron.args import checkpoint_tokenizer_files, megatron_args
from mega.plugins.checkpoints.megatron.distrib_optim import FILE as DISTRIB_FILE, read_distrib_optim, save_distrib_optim
from mega.plugins.checkpoints.megatron.family import family_of
from mega.plugins.checkpoints.megatron.files import allowed_globals, load_file, safe_globals
from mega.plugins.checkpoints.megatron.layout import (
    CHECKPOINT_VERSION,
    FILE,
    TRACKER,
    find_rank_file,
    nest,
    rank_folder,
    state_from_raw,
)
from mega.plugins.checkpoints.megatron.interop import export_run, import_run
from mega.plugins.checkpoints.megatron.source import can_import


class MegatronFormat:
    name = "megatron"

    def directory_name(self, step: int) -> str:
        return f"iter_{step:07d}"

    def after_commit(self, root: Path, final: Path, step: int) -> None:
        atomic_write_text(root / TRACKER, f"{step}\n")

    def save(self, state: dict, directory: Path, parallel=None) -> None:
        folder = rank_folder(directory, parallel)
        folder.mkdir(parents=True, exist_ok=True)
        plugins = mega.get_plugins()  # the kernel hands a format none: the process's
        model = state["model"]
        config = state.get("config", {})
        tp, pp = (parallel.tp_size, parallel.pp_size) if parallel else (1, 1)
        vocab = state.get("vocab_size")
        padded = None
        if vocab is None:  # a caller that does not say the vocabulary size: the padded rows
            word = next((t for k, t in model.items() if k.endswith("word_embeddings.weight")), None)
            padded = word.shape[0] * tp if word is not None else None
        trainer = state.get("trainer", {})
        rng = trainer.get("rng", {})
        optimizer, ours = state.get("optimizer"), {"trainer": trainer, "sharding": state.get("sharding")}
        record = state.get("distributed_optimizer")
        if record is not None and optimizer is not None:  # Megatron's distrib_optim.pt beside this file
            optimizer = save_distrib_optim(folder, state, record)
            ours["distributed_optimizer"] = record
        torch.save({
            "args": megatron_args(config, tp, pp, vocab, padded=padded, files=checkpoint_tokenizer_files(config, directory, plugins),
                                  plugins=plugins),
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": trainer.get("step", 0),
            "model": nest(model, config.get("model", {}).get("normalization")),
            "optimizer": optimizer,
            "opt_param_scheduler": {"num_steps": trainer.get("consumed_samples", 0)},
            "rng_state": [{
                "random_rng_state": rng.get("python"), "np_rng_state": rng.get("numpy"),
                "torch_rng_state": rng.get("torch"), "cuda_rng_state": rng.get("cuda"),
                "rng_tracker_states": rng.get("rng_tracker_states"),
            }],
            "mega": ours,
        }, folder / FILE)

    def load(self, directory: Path, parallel=None, parts=("model", "optimizer", "trainer", "sharding")) -> dict:
        tp_rank, pp_rank, pp = (parallel.tp_rank, parallel.pp_rank, parallel.pp_size) if parallel else (0, 0, 1)
        path = find_rank_file(directory, tp_rank, pp_rank, pp)
        if path is None:
            raise CheckpointError(f"{rank_folder(directory, parallel) / FILE}: missing from the checkpoint")
        raw = load_file(path, str(path))
        state = state_from_raw(raw, str(path), pp_rank, parts)
        record = (raw.get("mega") or {}).get("distributed_optimizer")
        if record is not None and "optimizer" in parts:  # the shards' state lives in distrib_optim.pt
            state["optimizer"] = read_distrib_optim(path.parent / DISTRIB_FILE, record, raw.get("optimizer"))
        # what the model's family cannot run (an unknown family: the kernel's strict load decides)
        family = family_of(mega.get_plugins(), state["model"], raw.get("args"), str(path), required=False)
        if family is not None:
            family.megatron_check(state["model"], raw.get("args"), str(path))
        return state

    # --- mega import / mega export ---------------------------------------------------------
    def can_import(self, path: Path) -> bool:
        return can_import(path)

    def import_run(self, path: Path, run_dir: Path, options, plugins) -> Path:
        return import_run(path, run_dir, options, plugins)

    def export_run(self, checkpoint: Path, destination: Path, options, plugins) -> Path:
        return export_run(checkpoint, destination, options, plugins)


def _saved_args(checkpoint: Path):
    """`args` of a checkpoint's first rank file (memory-mapped: the tensors are not read)."""
    for folder in sorted(checkpoint.glob("mp_rank_*")):
        for name in (FILE, "model_rng.pt"):
            if (folder / name).is_file():
                with allowed_globals(safe_globals()):
                    return torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True).get("args")
    return None


@mega.hookimpl
def on_train_start(run):
    """A resumed `megatron` checkpoint must agree with the run's config where the weights
    cannot tell (an activation both GELUs load into): the family's converter checks
    (`ChecksMegatronResume`). The format's `load` never sees the run's config, so the
    check sits here, before the first step."""
    path = getattr(run, "resumed_from", None)
    if path is None or run.config.exp_manager.checkpoint.format != "megatron":
        return
    family = model_converter(run.plugins, run.config.model.name, MegatronModelConverter)
    if not isinstance(family, ChecksMegatronResume):
        return
    family.megatron_check_resume(_saved_args(Path(path)), run.config.model, str(path))


@mega.hookimpl
def register_checkpoint_formats(register):
    register("megatron", MegatronFormat)
