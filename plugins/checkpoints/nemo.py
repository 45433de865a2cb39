"""The `nemo` checkpoint format: `mega import model.nemo RUN_DIR` reads a NeMo 1.x archive
into a mega run directory; `mega export RUN model.nemo --to nemo` writes one
(`nemo_export.py`).

A `.nemo` file is a tar (gzipped before NeMo 1.7) holding `model_config.yaml` and the
weights: `model_weights.ckpt` for one rank, `mp_rank_XX/model_weights.ckpt` per
tensor-parallel rank, `tp_rank_XX_pp_rank_YYY/model_weights.ckpt` with pipeline
parallelism; each a flat state dict whose names start with `model.` (`model.module.` with
`megatron_amp_O2`). Tokenizer files sit at the archive's root, named in the yaml as
`nemo:<uuid>_<name>`, as are other artifacts (NeMo 1.0-1.4 NLP task models: the encoder's
config JSON, `megatron_checkpoint_version.json`). NLP models without the yaml's parallel
sizes are counted by their `mp_rank_XX` members, as NeMo does.

This module keeps the archive: its members (no links, no names outside it, no member
claiming more bytes than it can hold), the rank files, merging tensor-parallel shards
along the split dimension of mega's own parameters (the kernel's `merge_shards`; the
family may say where NeMo splits otherwise, `NemoSplitDims`), the fused QKV rows of a
Megatron checkpoint_version before 2.0 brought to the current order per rank,
renumbering pipeline stages to global layer indices, re-cutting the vocabulary padding
(the family's `vocab_tensors`) for one process, and the tokenizer's members. The model
family is the converter that recognises `model_config.yaml`
(`mega.protocols.NemoModelConverter`: the model table -- from other members too,
`NemoArchiveReader` -- refusing what the family cannot run by the yaml key, and the
weights' names); names are first brought to Megatron-LM's current legacy spelling
(`transformer` -> `encoder`, `attention.` -> `self_attention.`, `*_norm` ->
`*_layernorm`). The tokenizer is the first tokenizer converter that reads the yaml's
`tokenizer` section (`NemoTokenizerConverter`, and `NemoTokenizerTable` for what it says
besides the files), or the one `--option tokenizer.library=` names.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch

import mega
from mega.errors import CheckpointError, ConfigError
from mega.checkpoint.load_errors import describe
from mega.protocols import (NemoArchiveReader, NemoModelConverter, NemoSplitDims, NemoTokenizerConverter,
                            NemoTokenizerTable)
from mega.plugins.checkpoints.archive import safe_members
from mega.plugins.checkpoints.converters import model_converters, surest, tokenizer_converter, tokenizer_converters
from mega.plugins.checkpoints.megatron.layout import current_name

SUFFIX = ".nemo"
CONFIG = "model_config.yaml"
WEIGHTS = "model_weights.ckpt"
# NeMo 1.x NLP models with a Megatron-LM encoder record the QKV layout their weights were
# trained in (Megatron-LM's checkpoint_version; before 2.0 its attention reordered the rows
# at run time): `megatron_checkpoint_version.json`, {"checkpoint_version": <float>}
CHECKPOINT_VERSION = "megatron_checkpoint_version.json"
# the most bytes a member other than the weights may claim (yaml, JSON artifacts) and a
# tokenizer file; the weights may claim twice the model's fp32 size and some pickling
SMALL_MEMBER, TOKENIZER_MEMBER, PICKLE_SLACK = 16 << 20, 1 << 30, 64 << 20


class NemoFormat:
    name = "nemo"

    def save(self, state: dict, directory: Path, parallel=None) -> None:
        raise CheckpointError("the nemo format imports and exports archives (`mega import model.nemo RUN_DIR`,"
                              " `mega export RUN model.nemo --to nemo`); train with 'native'")

    def load(self, directory: Path, parallel=None, parts=()) -> dict:
        raise CheckpointError(f"{directory}: the nemo format is not a training checkpoint format; `mega import"
                              " model.nemo RUN_DIR` first")

    def export_run(self, checkpoint: Path, destination: Path, options: Mapping[str, str], plugins) -> Path:
        """`options`: `tensor_parallel=N` (one `mp_rank_XX/` per rank; default the run's
        size), `gzip=true|false` (default: as the NeMo release of the model's class writes)."""
        from mega.plugins.checkpoints.nemo_export import export_run

        return export_run(checkpoint, destination, options, plugins)

    def can_import(self, source: Path) -> bool:
        return Path(source).suffix == SUFFIX and Path(source).is_file()

    def import_run(self, source: Path, run_dir: Path, options: Mapping[str, str], plugins) -> Path:
        """`options`: `tokenizer.KEY=VALUE` replaces the mapped tokenizer table's keys (e.g.
        `tokenizer.library=sentencepiece tokenizer.model=/path/spm.model` for a tokenizer
        mega cannot map)."""
        source = Path(source)
        with _open(source) as tar, tempfile.TemporaryDirectory(prefix="mega-nemo-") as tmp:
            members = _members(source, tar)
            cfg = _yaml(source, tar, members)
            family = _family(source, cfg, plugins)
            model_table = _table(source, tar, members, cfg, family)
            tok, files = _tokenizer(source, tar, members, cfg, Path(tmp), options, plugins)
            model_table["tokenizer"] = tok
            state = _weights(source, tar, members, cfg, model_table, files, plugins, family)
            from mega.checkpoint import write_imported_run

            return write_imported_run(run_dir, {"model": model_table}, state, plugins, files=files)


def model_table_of(source: Path, plugins) -> dict:
    """mega's `model` table (tokenizer aside) of a `.nemo` archive, from its yaml and
    artifacts alone (the weights are not read): what a task's `lm_checkpoint = "X.nemo"`
    learns its encoder's architecture from."""
    source = Path(source)
    with _open(source) as tar:
        members = _members(source, tar)
        cfg = _yaml(source, tar, members)
        return _table(source, tar, members, cfg, _family(source, cfg, plugins))


def _table(source: Path, tar, members, cfg: dict, family) -> dict:
    """The family's model table, from the archive's other members too when it reads them."""
    if isinstance(family, NemoArchiveReader):
        return family.nemo_model_table_from(cfg, lambda key: _artifact(source, tar, members, cfg, key), str(source))
    return family.nemo_model_table(cfg, str(source))


def _open(source: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(source, "r:*")  # uncompressed since NeMo 1.7, gzipped before
    except (tarfile.TarError, OSError) as exc:
        raise CheckpointError(f"{source}: not a .nemo archive (a tar file): {exc}") from None


def _members(source: Path, tar: tarfile.TarFile) -> Dict[str, tarfile.TarInfo]:
    """File members by name, with the archive format's checks (no links, no names outside)."""
    return safe_members(tar, source)


def _read(source: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, limit: int = SMALL_MEMBER) -> bytes:
    """A member's bytes; one claiming more than `limit` bytes is refused before it is read."""
    if member.size > limit:
        raise CheckpointError(f"{source}: member {name} claims {member.size} bytes, more than the {limit} such a member"
                              " can hold; refusing the archive")
    try:
        return tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CheckpointError(f"{source}: member {name} cannot be read ({exc})") from None


def _yaml(source: Path, tar, members) -> dict:
    import yaml

    if CONFIG not in members:
        raise CheckpointError(f"{source}: has no {CONFIG}; not a NeMo model archive")
    try:
        cfg = yaml.safe_load(_read(source, tar, members[CONFIG], CONFIG))
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{source}: {CONFIG} is not valid YAML ({exc})") from None
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]  # a whole training config rather than the model's (NeMo's restore_from does the same)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: {CONFIG} is not a mapping of model keys; not a NeMo model archive")
    return cfg


def _family(source: Path, cfg: dict, plugins):
    """The converter of the model family `model_config.yaml` describes."""
    families = model_converters(plugins, NemoModelConverter)
    found = surest(families, lambda conv: conv.nemo_recognises(cfg), f"{source}: {CONFIG}")
    if found is None:
        raise CheckpointError(f"{source}: {CONFIG}: target={cfg.get('target')!r}: no model converter reads it (families"
                              f" that read .nemo archives: {', '.join(n[0] for n, _ in families) or 'none'})")
    return found


def _nemo_path(value) -> str:
    return str(value)[len("nemo:"):] if str(value).startswith("nemo:") else str(value)


TOKENIZER_OPTIONS = ("tokenizer.library", "tokenizer.model", "tokenizer.tokenizer_file", "tokenizer.vocab_file",
                     "tokenizer.merges_file")


def _named_member(members, value) -> Optional[tarfile.TarInfo]:
    """The member a yaml value names: `nemo:<uuid>_<name>` (NeMo's artifact paths), or a
    path whose file name is a member's (older archives kept the path the model was saved with)."""
    name = _nemo_path(value or "")
    if not name:
        return None
    base = Path(name).name
    return (members.get(name) or members.get(base)
            or next((m for n, m in members.items() if n.endswith("_" + base) or n.endswith("/" + base)), None))


def _member(source: Path, tar, members, tmp: Path, key: str, value) -> Path:
    """The archive member a yaml `nemo:<uuid>_<name>` value names, extracted into `tmp`."""
    member = _named_member(members, value)
    if member is None:
        raise CheckpointError(f"{source}: {CONFIG}: tokenizer.{key}={value!r} is not in the archive")
    target = tmp / Path(member.name).name
    target.write_bytes(_read(source, tar, member, member.name, TOKENIZER_MEMBER))
    return target


def _artifact(source: Path, tar, members, cfg: dict, key: str) -> Optional[bytes]:
    """The content of the member the dotted yaml `key` names; None when the key is unset."""
    value = cfg
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value in (None, ""):
        return None
    member = _named_member(members, value)
    if member is None:
        raise CheckpointError(f"{source}: {CONFIG}: {key}={value!r} is not in the archive")
    return _read(source, tar, member, member.name)


def _tokenizer(source: Path, tar, members, cfg: dict, tmp: Path, options: Mapping[str, str], plugins):
    """mega's tokenizer table and files: the library `--option tokenizer.library=` names or
    the first tokenizer converter that reads the yaml's section; its files the members the
    yaml names (`nemo:<uuid>_<name>`), or those `--option tokenizer.KEY=PATH` names."""
    from mega.checkpoint import check_options

    check_options(options, TOKENIZER_OPTIONS, "nemo")
    tok_cfg = cfg.get("tokenizer") or {}
    overrides = {key[len("tokenizer."):]: value for key, value in options.items()}
    library = overrides.pop("library", None)
    if library is not None:
        converter = tokenizer_converter(plugins, library, NemoTokenizerConverter)
        keys = converter.from_nemo({**tok_cfg, "library": library}) if converter is not None else None
    else:
        readers = tokenizer_converters(plugins, NemoTokenizerConverter)
        library, keys, converter = next(((name, found, conv) for name, conv in readers
                                         if (found := conv.from_nemo(tok_cfg)) is not None), (None, None, None))
        if library is None:
            raise CheckpointError(f"{source}: {CONFIG}: tokenizer.library={tok_cfg.get('library')!r}: mega maps"
                                  f" {' and '.join(conv.nemo_hint for _, conv in readers)} tokenizers; name one with"
                                  " --option tokenizer.library=NAME (and tokenizer.KEY=PATH for its files)")
    files: Dict[str, Path] = {}
    for key, value in overrides.items():
        files[key] = Path(value).expanduser()
        if not files[key].is_file():
            raise ConfigError(f"--option tokenizer.{key}={value}: no such file")
    if not files:  # the archive's own
        for key, yaml_key in (keys or {}).items():
            files[key] = _member(source, tar, members, tmp, yaml_key, tok_cfg.get(yaml_key))
    table = {"library": library}
    if keys is not None and isinstance(converter, NemoTokenizerTable):  # what the section says besides the files
        table.update(converter.nemo_table(tok_cfg))
    return table, files


RANK_MEMBER = re.compile(r"(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))/" + re.escape(WEIGHTS))


def _rank_members(source: Path, members, cfg: dict) -> List[List[str]]:
    """Weight member names, [stage][tp rank]. The sizes are the yaml's
    (`tensor_model_parallel_size`, `pipeline_model_parallel_size`); NeMo 1.0-1.4 NLP models
    do not write them, and NeMo counts the `mp_rank_XX` members instead, as here."""
    ranked = [m for n in members if (m := RANK_MEMBER.fullmatch(n))]
    if WEIGHTS in members and not ranked:
        return [[WEIGHTS]]
    if any(n.endswith("/.metadata") or n.startswith("model_weights/") for n in members):
        raise CheckpointError(f"{source}: holds a distributed (torch_dist) model_weights/ directory; mega reads"
                              f" .nemo files with {WEIGHTS} (save the model with dist-ckpt disabled)")
    said = "tensor_model_parallel_size" in cfg or "pipeline_model_parallel_size" in cfg
    if said:
        tp, pp = int(cfg.get("tensor_model_parallel_size") or 1), int(cfg.get("pipeline_model_parallel_size") or 1)
        why = f"tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp} in {CONFIG}"
    elif ranked:
        tp = 1 + max(int(m.group(1) or m.group(2)) for m in ranked)
        pp = 1 + max(int(m.group(3) or 0) for m in ranked)
        why = f"the archive holds {', '.join(sorted(m.group(0).split('/')[0] for m in ranked))}"
    else:
        raise CheckpointError(f"{source}: member {WEIGHTS} is missing (no {WEIGHTS} and no mp_rank_XX/{WEIGHTS})")
    if tp == 1 and pp == 1 and WEIGHTS in members:
        return [[WEIGHTS]]
    if pp == 1:
        names = [[f"mp_rank_{t:02d}/{WEIGHTS}" for t in range(tp)]]
    else:
        names = [[f"tp_rank_{t:02d}_pp_rank_{p:03d}/{WEIGHTS}" for t in range(tp)] for p in range(pp)]
    for stage in names:
        for n in stage:
            if n not in members:
                raise CheckpointError(f"{source}: member {n} is missing ({why})")
    return names


def _checkpoint_version(source: Path, tar, members) -> Optional[float]:
    """The Megatron-LM checkpoint_version the archive's weights are laid out in (NeMo finds
    the member by a name containing CHECKPOINT_VERSION); None when it has none."""
    found = [m for n, m in members.items() if n.endswith(CHECKPOINT_VERSION)]
    if not found:
        return None
    name = found[0].name
    try:
        version = json.loads(_read(source, tar, found[0], name)).get("checkpoint_version")
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{source}: member {name} is not a JSON object with checkpoint_version ({exc})") from None
    return None if version is None else float(version)


def _fused_qkv_to_current(source: Path, state: Dict[str, torch.Tensor], model, version: Optional[float], tp: int,
                          origin: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """One rank's fused QKV rows (mega names `...query_key_value.*`) of a checkpoint_version
    before 2.0 in the current [heads, 3, head_dim] order; the heads of a rank are its
    attention module's (`num_heads`, the whole model's in mega's one-process model) / TP."""
    if version is None or version >= 2.0:
        return state
    from mega.plugins.checkpoints.megatron.layout import qkv_to_current

    out = {}
    for name, t in state.items():
        if ".query_key_value." in f".{name}":
            owner = name.rsplit(".", 2)[0]
            try:
                heads = model.get_submodule(owner).num_heads // tp
            except AttributeError:
                raise CheckpointError(f"{source}: {origin[name]}: checkpoint_version {version} needs the heads of"
                                      f" {owner}, which mega's model does not say") from None
            t = qkv_to_current(t, version, heads)
        out[name] = t
    return out


def _weights(source: Path, tar, members, cfg: dict, model_table: dict, files, plugins,
             family) -> Dict[str, torch.Tensor]:
    from mega.config import config_from_dict
    from mega.runtime.parallel import ParallelState, one_process
    from mega.runtime.sharding import fit, merge_shards, renumber, sharding_of

    # mega's model at one process: its names, shapes and tensor-parallel split dimensions
    raw = {"model": {**model_table, "tokenizer": {**model_table["tokenizer"], **{k: str(v) for k, v in files.items()}}}}
    mc = config_from_dict(raw, plugins=plugins, source=f"{source} ({CONFIG})").model
    mc.check(plugins)
    tokenizer = plugins.tokenizers.get(mc.tokenizer.library, "tokenizer.library").factory(mc.tokenizer, [], None)
    with torch.random.fork_rng(devices=[]), one_process():
        model = plugins.models.get(mc.name, "model.name").factory(mc, tokenizer, plugins)
    record = sharding_of(model, ParallelState())
    dims = dict(record["partition_dims"])
    if isinstance(family, NemoSplitDims):  # where NeMo splits a tensor mega keeps whole
        dims.update(family.nemo_split_dims(mc))
    expected = model.state_dict()
    names = _rank_members(source, members, cfg)
    version = _checkpoint_version(source, tar, members)
    fp32_bytes = 4 * sum(t.numel() for t in expected.values())
    limit = 2 * fp32_bytes + PICKLE_SLACK  # a rank's file holds at most the model's tensors, in up to fp32
    per_stage = (cfg.get("num_layers") or 0) // len(names)
    full: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    for stage, stage_names in enumerate(names):
        ranks = []
        for name in stage_names:
            data = _read(source, tar, members[name], name, limit)
            try:
                raw_state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"{source}: member {name} cannot be read as plain tensors: {describe(exc)}") from None
            del data
            if not isinstance(raw_state, dict):
                raise CheckpointError(f"{source}: member {name} holds a {type(raw_state).__name__}, not a state dict")
            state = {}
            for key, tensor in raw_state.items():
                short = key.removeprefix("model.module.").removeprefix("model.")
                ours = None if short.endswith("._extra_state") else family.nemo_mega_name(current_name(short))
                if ours is None:  # Transformer Engine's state, or not a weight of its own
                    continue
                mapped = renumber(ours, stage * per_stage) if per_stage else ours
                if mapped in state:  # two NeMo keys of one mega tensor (a module NeMo registers twice)
                    continue
                state[mapped] = tensor
                origin.setdefault(mapped, f"{name}: {key}")
            ranks.append(_fused_qkv_to_current(source, state, model, version, len(stage_names), origin))
        unexpected = sorted(set(ranks[0]) - set(expected))
        if unexpected:
            raise CheckpointError(f"{source}: weights mega's {mc.name} has no place for:"
                                  f" {', '.join(origin[u] for u in unexpected[:5])}")
        for r, state in enumerate(ranks[1:], 1):
            if set(state) != set(ranks[0]):
                odd = sorted(set(state) ^ set(ranks[0]))[0]
                raise CheckpointError(f"{source}: member {stage_names[r]} and {stage_names[0]} hold different tensors"
                                      f" ({origin.get(odd, odd)} is in one only)")
        present = {k: d for k, d in dims.items() if k in ranks[0]}
        full.update(merge_shards(ranks, {"partition_dims": present, "partition_chunks": record.get("partition_chunks")}))
    missing = sorted(set(expected) - set(full))
    if missing:
        raise CheckpointError(f"{source}: weights missing from the archive (mega names): {', '.join(missing[:5])}")
    vocab_tensors = [n for n in getattr(family, "vocab_tensors", ()) if n in full]
    if vocab_tensors:
        rows = full[vocab_tensors[0]].shape[0]
        if rows < tokenizer.vocab_size:
            raise CheckpointError(f"{source}: {origin[vocab_tensors[0]]} has {rows} rows, fewer than the tokenizer's"
                                  f" {tokenizer.vocab_size} tokens (a different tokenizer?)")
    for name, tensor in full.items():
        want = list(expected[name].shape)
        have = list(tensor.shape)
        if name in vocab_tensors:  # the vocabulary padding depends on the tensor-parallel size: re-cut it
            have, want = have[1:], want[1:]
        if have != want:
            raise CheckpointError(f"{source}: {origin[name]} has shape {list(tensor.shape)}, mega's {mc.name} expects"
                                  f" {list(expected[name].shape)} from {CONFIG}")
    for name in vocab_tensors:
        full[name] = fit(full[name], list(expected[name].shape)).clone()
    return full


@mega.hookimpl
def register_checkpoint_formats(register):
    register("nemo", NemoFormat)
