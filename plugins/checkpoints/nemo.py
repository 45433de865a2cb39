"""The `nemo` checkpoint format: `mega import model.nemo RUN_DIR` reads a NeMo 1.x Megatron
archive into a mega run directory (import only).

A `.nemo` file is a tar (gzipped before NeMo 1.7) holding `model_config.yaml` and the
weights: `model_weights.ckpt` for one rank, `mp_rank_XX/model_weights.ckpt` per
tensor-parallel rank, `tp_rank_XX_pp_rank_YYY/model_weights.ckpt` with pipeline
parallelism; each a flat state dict whose names start with `model.` (`model.module.` with
`megatron_amp_O2`). Tokenizer files sit at the archive's root, named in the yaml as
`nemo:<uuid>_<name>`.

This module keeps the archive: its members, the rank files, merging tensor-parallel
shards along the split dimension of mega's own parameters (the kernel's `merge_shards`),
renumbering pipeline stages to global layer indices, re-cutting the vocabulary padding
for one process, and the tokenizer's members. The model family is the converter that
recognises `model_config.yaml` (`mega.protocols.NemoModelConverter`: the model table,
refusing what the family cannot run by the yaml key, and the weights' names, legacy or
megatron-core); names are first brought to Megatron-LM's current legacy spelling
(`transformer` -> `encoder`, `attention.` -> `self_attention.`, `*_norm` ->
`*_layernorm`). The tokenizer is the first tokenizer converter that reads the yaml's
`tokenizer` section (`NemoTokenizerConverter`), or the one `--option tokenizer.library=`
names.
"""
from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping

import torch

import mega
from mega.errors import CheckpointError, ConfigError
from mega.checkpoint.load_errors import describe
from mega.protocols import NemoModelConverter, NemoTokenizerConverter
from mega.plugins.checkpoints.archive import safe_members
from mega.plugins.checkpoints.converters import model_converters, surest, tokenizer_converter, tokenizer_converters
from mega.plugins.checkpoints.megatron.layout import current_name

SUFFIX = ".nemo"
CONFIG = "model_config.yaml"
WEIGHTS = "model_weights.ckpt"
class NemoFormat:
    name = "nemo"

    def save(self, state: dict, directory: Path, parallel=None) -> None:
        raise CheckpointError("the nemo format only imports (`mega import model.nemo RUN_DIR`); train with 'native'")

    def load(self, directory: Path, parallel=None, parts=()) -> dict:
        raise CheckpointError(f"{directory}: the nemo format only imports; `mega import model.nemo RUN_DIR` first")

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
            model_table = family.nemo_model_table(cfg, str(source))
            tok, files = _tokenizer(source, tar, members, cfg, Path(tmp), options, plugins)
            model_table["tokenizer"] = tok
            state = _weights(source, tar, members, cfg, model_table, files, plugins, family)
            from mega.checkpoint import write_imported_run

            return write_imported_run(run_dir, {"model": model_table}, state, plugins, files=files)


def _open(source: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(source, "r:*")  # uncompressed since NeMo 1.7, gzipped before
    except (tarfile.TarError, OSError) as exc:
        raise CheckpointError(f"{source}: not a .nemo archive (a tar file): {exc}") from None


def _members(source: Path, tar: tarfile.TarFile) -> Dict[str, tarfile.TarInfo]:
    """File members by name, with the archive format's checks (no links, no names outside)."""
    return safe_members(tar, source)


def _read(source: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> bytes:
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
    if isinstance(cfg, dict) and "num_layers" not in cfg and isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]  # a whole training config rather than the model's
    if not isinstance(cfg, dict) or "num_layers" not in cfg:
        raise CheckpointError(f"{source}: {CONFIG} has no num_layers; not a NeMo Megatron model")
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


def _member(source: Path, tar, members, tmp: Path, key: str, value) -> Path:
    """The archive member a yaml `nemo:<uuid>_<name>` value names, extracted into `tmp`."""
    name = _nemo_path(value or "")
    member = members.get(name) or next((m for n, m in members.items() if name and n.endswith(Path(name).name)), None)
    if member is None:
        raise CheckpointError(f"{source}: {CONFIG}: tokenizer.{key}={value!r} is not in the archive")
    target = tmp / Path(member.name).name
    target.write_bytes(_read(source, tar, member, member.name))
    return target


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
        library, keys = next(((name, found) for name, conv in readers if (found := conv.from_nemo(tok_cfg)) is not None),
                             (None, None))
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
    return {"library": library}, files


def _rank_members(source: Path, members, cfg: dict) -> List[List[str]]:
    """Weight member names, [stage][tp rank]."""
    if WEIGHTS in members:
        return [[WEIGHTS]]
    if any(n.endswith("/.metadata") or n.startswith("model_weights/") for n in members):
        raise CheckpointError(f"{source}: holds a distributed (torch_dist) model_weights/ directory; mega reads"
                              f" .nemo files with {WEIGHTS} (save the model with dist-ckpt disabled)")
    tp, pp = int(cfg.get("tensor_model_parallel_size", 1)), int(cfg.get("pipeline_model_parallel_size", 1))
    if pp == 1:
        names = [[f"mp_rank_{t:02d}/{WEIGHTS}" for t in range(tp)]]
    else:
        names = [[f"tp_rank_{t:02d}_pp_rank_{p:03d}/{WEIGHTS}" for t in range(tp)] for p in range(pp)]
    for stage in names:
        for n in stage:
            if n not in members:
                raise CheckpointError(f"{source}: member {n} is missing (tensor_model_parallel_size={tp},"
                                      f" pipeline_model_parallel_size={pp} in {CONFIG})")
    return names


def _weights(source: Path, tar, members, cfg: dict, model_table: dict, files, plugins,
             family) -> Dict[str, torch.Tensor]:
    from mega.config import config_from_dict
    from mega.runtime.parallel import ParallelState
    from mega.runtime.sharding import fit, merge_shards, renumber, sharding_of

    # mega's model at one process: its names, shapes and tensor-parallel split dimensions
    raw = {"model": {**model_table, "tokenizer": {**model_table["tokenizer"], **{k: str(v) for k, v in files.items()}}}}
    mc = config_from_dict(raw, plugins=plugins, source=f"{source} ({CONFIG})").model
    mc.check(plugins)
    tokenizer = plugins.tokenizers.get(mc.tokenizer.library, "tokenizer.library").factory(mc.tokenizer, [], None)
    with torch.random.fork_rng(devices=[]):
        model = plugins.models.get(mc.name, "model.name").factory(mc, tokenizer, plugins)
    sharding = sharding_of(model, ParallelState())
    expected = model.state_dict()
    names = _rank_members(source, members, cfg)
    per_stage = cfg["num_layers"] // len(names)
    full: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    for stage, stage_names in enumerate(names):
        ranks = []
        for name in stage_names:
            try:
                raw_state = torch.load(io.BytesIO(_read(source, tar, members[name], name)), map_location="cpu", weights_only=True)
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"{source}: member {name} cannot be read as plain tensors: {describe(exc)}") from None
            state = {}
            for key, tensor in raw_state.items():
                short = key.removeprefix("model.module.").removeprefix("model.")
                ours = None if short.endswith("._extra_state") else family.nemo_mega_name(current_name(short))
                if ours is None:  # Transformer Engine's state, or not a weight of its own
                    continue
                mapped = renumber(ours, stage * per_stage)
                state[mapped] = tensor
                origin.setdefault(mapped, f"{name}: {key}")
            ranks.append(state)
        unexpected = sorted(set(ranks[0]) - set(expected))
        if unexpected:
            raise CheckpointError(f"{source}: weights mega's {mc.name} has no place for:"
                                  f" {', '.join(origin[u] for u in unexpected[:5])}")
        present = {k: d for k, d in sharding["partition_dims"].items() if k in ranks[0]}
        full.update(merge_shards(ranks, {"partition_dims": present, "partition_chunks": sharding.get("partition_chunks")}))
    missing = sorted(set(expected) - set(full))
    if missing:
        raise CheckpointError(f"{source}: weights missing from the archive (mega names): {', '.join(missing[:5])}")
    word = "language_model.embedding.word_embeddings.weight"
    # the vocabulary-sized tensors (the family's, when it lists them: an untied output layer too)
    vocab_sized = tuple(getattr(family, "vocab_tensors", None) or (word,))
    rows = full[word].shape[0]
    if rows < tokenizer.vocab_size:
        raise CheckpointError(f"{source}: the word embedding has {rows} rows, fewer than the tokenizer's"
                              f" {tokenizer.vocab_size} tokens (a different tokenizer?)")
    for name, tensor in full.items():
        want = list(expected[name].shape)
        have = list(tensor.shape)
        if name in vocab_sized:  # the vocabulary padding depends on the tensor-parallel size: re-cut it
            have, want = have[1:], want[1:]
        if have != want:
            raise CheckpointError(f"{source}: {origin[name]} has shape {list(tensor.shape)}, mega's {mc.name} expects"
                                  f" {list(expected[name].shape)} from {CONFIG}")
    for name in vocab_sized:
        if name in full:
            full[name] = fit(full[name], list(expected[name].shape)).clone()
    return full


@mega.hookimpl
def register_checkpoint_formats(register):
    register("nemo", NemoFormat)
