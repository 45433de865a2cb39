"""`mega import` of `torch_dist` checkpoints: megatron-core's distributed checkpoints as
Megatron-LM writes them (`--ckpt-format torch_dist`, its default), and mega's own.

    <save>/latest_checkpointed_iteration.txt      (optional: the iteration to read)
    <save>/iter_0000100/metadata.json             {"sharded_backend": "torch_dist", ...}
    <save>/iter_0000100/.metadata, __*_*.distcp   DCP's index and data
    <save>/iter_0000100/common.pt                 Megatron-LM's `args`, iteration, ...

The whole model is read in this one process (what an import holds anyway), without the
optimizer: each tensor at its global shape, megatron-core's stacked layers
(`decoder.layers.X` [layers, ...], its default) cut into `decoder.layers.{i}.X`, the
per-layer keys (`non_homogeneous_layers`) as they are, a gated fc1 saved in halves
(`linear_fc1.weight_w` / `_v`, megatron-core's `singleton_local_shards`) joined, and
`_extra_state` objects left unread. The model family is the one `args.mega_model` names, else
the one surest it recognises the tensors (named by each family's megatron-core names,
`MegatronCoreNames`) and `args`; from there the import is the `megatron` format's: what
the family cannot run refused, its model table, the tokenizer from `args` or the options.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Dict, Mapping

import torch

from mega.errors import CheckpointError
from mega.protocols import MegatronCoreNames, MegatronModelConverter
from mega.plugins.checkpoints.converters import model_converter, model_converters, surest
from mega.plugins.checkpoints.megatron.files import load_file
from mega.plugins.checkpoints.megatron.interop import import_options, import_state
from mega.plugins.checkpoints.megatron.layout import TRACKER
from mega.plugins.checkpoints.megatron.source import iteration_directory

_STACK = re.compile(r"^(?P<stack>(?:encoder|decoder)\.layers)\.(?P<rest>(?!\d+\.).+)$")
_HALVES = re.compile(r"^(?P<name>.+\.linear_fc1\.(?:weight|bias))_(?P<half>[wv])$")


def iteration(source: Path):
    """(the iteration directory, its step) of a save directory or an iteration directory."""
    source = Path(source)
    if (source / TRACKER).is_file() and not (source / "metadata.json").is_file():
        return iteration_directory(source)
    return source, None


def is_torch_dist(directory: Path) -> bool:
    try:
        said = json.loads((Path(directory) / "metadata.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(said, dict) and said.get("sharded_backend") == "torch_dist" and (Path(directory) / ".metadata").is_file()


def can_import(source: Path) -> bool:
    try:
        return is_torch_dist(iteration(source)[0])
    except CheckpointError:
        return False


def read_model(directory: Path) -> Dict[str, torch.Tensor]:
    """Every model tensor of the checkpoint at its global shape, under megatron-core's
    per-layer keys (module docstring)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    except Exception as exc:
        raise CheckpointError(f"{directory}/.metadata: cannot be read ({type(exc).__name__}: {exc})") from None
    wanted = {key: torch.zeros(tuple(md.size), dtype=md.properties.dtype) for key, md in metadata.items()
              if isinstance(md, TensorStorageMetadata) and not key.startswith(("optimizer.", "rng_state"))}
    try:
        with warnings.catch_warnings():  # one process is the layout an import means
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(wanted, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=True)
    except Exception as exc:
        raise CheckpointError(f"{directory}: torch.distributed.checkpoint could not read it ({type(exc).__name__}: {exc})") from None
    state: Dict[str, torch.Tensor] = {}
    halves: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in wanted.items():
        m = _STACK.match(key)
        pieces = [(f"{m['stack']}.{i}.{m['rest']}", t[i]) for i in range(t.shape[0])] if m else [(key, t)]
        for name, piece in pieces:
            half = _HALVES.match(name)
            if half:
                halves.setdefault(half["name"], {})[half["half"]] = piece
            else:
                state[name] = piece.contiguous()
    for name, parts in halves.items():
        if set(parts) != {"w", "v"}:
            raise CheckpointError(f"{directory}: holds {name}_{''.join(parts)} without its other half")
        state[name] = torch.cat([parts["w"], parts["v"]])
    return state


def _family(plugins, keys: Dict[str, torch.Tensor], args, where: str):
    """(converter, state under mega's names) of the family the checkpoint holds."""
    named = getattr(args, "mega_model", None)
    both = [(names, conv) for names, conv in model_converters(plugins, MegatronModelConverter)
            if isinstance(conv, MegatronCoreNames)]
    if named:
        conv = model_converter(plugins, str(named), MegatronModelConverter)
        if not isinstance(conv, MegatronCoreNames):
            raise CheckpointError(f"{where}: args.mega_model={named!r}, a model no installed converter reads from"
                                  " megatron-core's files")
        return conv, {conv.mega_name(k): t for k, t in keys.items()}
    renamed = {id(conv): {conv.mega_name(k): t for k, t in keys.items()} for _, conv in both}
    found = surest(both, lambda conv: conv.megatron_recognises(renamed[id(conv)], args), where)
    if found is None:
        raise CheckpointError(f"{where}: no model converter recognises this megatron-core checkpoint (families that"
                              f" read them: {', '.join(names[0] for names, _ in both) or 'none'})")
    return found, renamed[id(found)]


def import_run(source: Path, run_dir: Path, options: Mapping[str, str], plugins) -> Path:
    from mega.checkpoint import check_options

    check_options(options, import_options(plugins), "torch_dist")
    directory, step = iteration(Path(source))
    if not is_torch_dist(directory):
        raise CheckpointError(f"{directory}: no metadata.json with sharded_backend \"torch_dist\" and .metadata; not a"
                              " megatron-core distributed checkpoint")
    trust = str(options.get("trust_pickle", "false")).lower() in ("1", "true", "yes")
    if not (directory / "common.pt").is_file():
        raise CheckpointError(f"{directory}: has no common.pt, where Megatron-LM keeps the args mega needs")
    common = load_file(directory / "common.pt", str(directory / "common.pt"), trust)
    args = common.get("args") if isinstance(common, dict) else None
    if args is None:
        raise CheckpointError(f"{directory / 'common.pt'}: has no 'args'; mega needs Megatron-LM's args to know the"
                              " model's shape")
    family, state = _family(plugins, read_model(directory), args, str(directory))
    step = step if step is not None else int(common.get("iteration", 0) or 0)
    return import_state(family, state, args, options, directory, [directory, directory.parent], step, Path(run_dir),
                        plugins)
