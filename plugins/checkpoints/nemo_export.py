"""`mega export RUN model.nemo --to nemo`: a mega checkpoint as the `.nemo` archive NeMo 1.x
restores (`<NeMo class>.restore_from("model.nemo", trainer=...)`).

The archive is laid out as NeMo's own save code lays it out
(`SaveRestoreConnector._make_nemo_file_from_folder`: `tar.add(folder, arcname=".")`, so
every member is `./<name>`, directories included, in sorted order; `NLPModel.save_to` with
model parallelism moves each rank's weights into `mp_rank_XX/`):

    ./model_config.yaml                  the family's yaml (`NemoModelExporter.nemo_config`)
    ./<hash>_<file name>                 the tokenizer's files and the family's artifacts; the
                                         yaml names each `nemo:<hash>_<file name>` (NeMo uses
                                         a uuid4 hex: any 32 hex digits do; a content hash
                                         makes the same export twice the same bytes)
    ./model_weights.ckpt                 torch.save(state dict) at tensor-parallel size 1, or
    ./mp_rank_XX/model_weights.ckpt      one per tensor-parallel rank

The weights are the restored model at one process, split for `--option tensor_parallel=N`
(default: the run's size) along each tensor's own split dimension (mega's, or NeMo's where
the family says it differs: `NemoSplitDims`), the vocabulary-sized tensors padded to the
rows NeMo's class builds at that size, and named as the family says. The tar is plain
(NeMo >= 1.7) unless the family's class comes from a NeMo that reads gzipped archives only
(`nemo_gzip`; `--option gzip=true|false` overrides). It is written beside the destination
and renamed into place: a failed export leaves whatever was there.

This module names no family and no tokenizer: both come from the converters.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path
from typing import Callable, Dict, List, Mapping

import torch

from mega.errors import CheckpointError, ConfigError
from mega.protocols import NemoModelExporter, NemoSplitDims, NemoTokenizerExporter
from mega.plugins.checkpoints.converters import model_converter, model_converters, tokenizer_converter

CONFIG = "model_config.yaml"
WEIGHTS = "model_weights.ckpt"
EXPORT_OPTIONS = ("tensor_parallel", "gzip")


def export_run(checkpoint: Path, destination: Path, options: Mapping[str, str], plugins) -> Path:
    from mega.checkpoint import atomic_path, check_options, restore

    check_options(options, EXPORT_OPTIONS, "nemo")
    model, tokenizer, config = restore(checkpoint, plugins)
    mc = config.model
    family = model_converter(plugins, mc.name, NemoModelExporter)
    if family is None:
        writers = ", ".join(names[0] for names, _ in model_converters(plugins, NemoModelExporter)) or "none"
        raise ConfigError(f"{checkpoint}: model {mc.name!r}; no model converter writes it as a NeMo archive"
                          f" (models that do: {writers})")
    tp = _int_option(options, "tensor_parallel", int(getattr(mc, "tensor_model_parallel_size", 1) or 1))
    compress = _bool_option(options, "gzip", bool(family.nemo_gzip))
    destination = Path(destination).expanduser()
    if destination.is_dir():
        raise ConfigError(f"{destination}: is a directory; give the archive's file name (e.g. model.nemo)")

    files: Dict[str, bytes] = {}  # member name -> content, besides the yaml and the weights
    section = _tokenizer_section(config, tokenizer, family.nemo_tokenizer_style, files, plugins)
    nemo_config = family.nemo_config(mc, section, tp)
    for key, (file_name, data) in family.nemo_artifacts(mc, tp).items():
        _set(nemo_config, key, "nemo:" + _store(files, file_name, data))
    rows = family.nemo_vocab_rows(mc, tokenizer, tp)
    shards = _shards(model, mc, family, tp, rows)
    import yaml

    text = yaml.safe_dump(nemo_config, sort_keys=False, default_flow_style=False).encode()
    destination.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(destination) as tmp:  # whatever was at `destination` stays until the archive is whole
        write_archive(tmp, {**files, CONFIG: text}, tp, shards, compress)
    return destination


def _int_option(options: Mapping[str, str], key: str, default: int) -> int:
    try:
        value = int(options.get(key, default))
    except ValueError:
        raise ConfigError(f"--option {key}={options[key]}: expected a whole number") from None
    if value < 1:
        raise ConfigError(f"--option {key}={value}: must be at least 1")
    return value


def _bool_option(options: Mapping[str, str], key: str, default: bool) -> bool:
    if key not in options:
        return default
    text = str(options[key]).strip().lower()
    if text not in ("1", "true", "yes", "0", "false", "no"):
        raise ConfigError(f"--option {key}={options[key]}: expected true or false")
    return text in ("1", "true", "yes")


def _store(files: Dict[str, bytes], file_name: str, data: bytes) -> str:
    """Add an artifact under NeMo's `<32 hex>_<file name>`; return the member name."""
    name = f"{hashlib.sha256(data).hexdigest()[:32]}_{Path(file_name).name}"
    files[name] = data
    return name


def _set(cfg: dict, key: str, value) -> None:
    """Set a dotted key as OmegaConf.update does (NeMo's artifact registration): missing
    levels are created."""
    *path, last = key.split(".")
    for part in path:
        if not isinstance(cfg.get(part), dict):
            cfg[part] = {}
        cfg = cfg[part]
    cfg[last] = value


def _tokenizer_section(config, tokenizer, style: str, files: Dict[str, bytes], plugins) -> dict:
    """The tokenizer's yaml section in `style`, its files stored as members."""
    from mega.config import to_dict

    table = to_dict(config)["model"]["tokenizer"]
    library = table.get("library")
    converter = tokenizer_converter(plugins, library, NemoTokenizerExporter) if library else None
    found = converter.to_nemo(table, style) if converter is not None else None
    if found is None:
        raise ConfigError(f"model.tokenizer.library={library!r}: NeMo's {style} models cannot read this tokenizer;"
                          " export a model trained with a tokenizer NeMo has (docs/checkpoints.md)")
    section, file_keys = found
    artifacts = tokenizer.artifacts()
    names = getattr(converter, "file_names", {})  # the name a file of that key has elsewhere (tokenizer.model, vocab.txt)
    for yaml_key, config_key in file_keys.items():
        path = artifacts.get(config_key)
        if path is None or not Path(path).is_file():
            raise CheckpointError(f"model.tokenizer.{config_key}: the tokenizer's file is not in the checkpoint")
        name = names.get(config_key, Path(path).name)
        section[yaml_key] = "nemo:" + _store(files, name, Path(path).read_bytes())
    return section


def _shards(model, mc, family, tp: int, rows: int) -> Callable[[int], Dict[str, torch.Tensor]]:
    """rank -> that rank's NeMo state dict (built when asked: one rank in memory at a time)."""
    from mega.runtime.parallel import ParallelState
    from mega.runtime.sharding import fit, sharding_of

    dims = dict(sharding_of(model, ParallelState())["partition_dims"])
    if isinstance(family, NemoSplitDims):
        dims.update(family.nemo_split_dims(mc))
    full = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name in getattr(family, "vocab_tensors", ()):  # NeMo's own vocabulary padding at this size
        if name in full:
            full[name] = fit(full[name], [rows, *full[name].shape[1:]])
    for name, t in full.items():
        d = dims.get(name)
        if d is not None and t.shape[d] % tp:
            raise ConfigError(f"--option tensor_parallel={tp}: {name} has {t.shape[d]} along its split dimension,"
                              f" not divisible by {tp}")
    names = {name: list(family.nemo_names(name, mc)) for name in full}

    def shard(rank: int) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        for name, t in full.items():
            d = dims.get(name)
            part = t if d is None or tp == 1 else t.chunk(tp, dim=d)[rank]
            for key in names[name]:
                out[key] = part.clone()
        return out

    return shard


def _members(files: Mapping[str, bytes], tp: int) -> List[str]:
    """The member names in the order `tar.add(folder, arcname=".")` gives (sorted, directories before their files)."""
    names = list(files) + ([WEIGHTS] if tp == 1 else [f"mp_rank_{r:02d}/{WEIGHTS}" for r in range(tp)])
    out: List[str] = []
    for name in sorted(names):
        if "/" in name and name.split("/")[0] + "/" not in out:
            out.append(name.split("/")[0] + "/")
        out.append(name)
    return out


def _info(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo("./" + name.rstrip("/") if name != "." else ".")
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size, info.mtime = size, 0
    return info


def write_archive(path: Path, files: Mapping[str, bytes], tp: int, shard: Callable[[int], Dict[str, torch.Tensor]],
                  compress: bool) -> None:
    """The tar at `path`: `files` and one weights member per rank (`shard(rank)`), gzipped
    with `compress` (a fixed gzip timestamp: the same export twice is the same file)."""
    with path.open("wb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if compress else raw
        try:
            with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_info(".", directory=True))
                for name in _members(files, tp):
                    if name.endswith("/"):
                        tar.addfile(_info(name, directory=True))
                        continue
                    if name in files:
                        data = files[name]
                    else:
                        buf = io.BytesIO()
                        torch.save(shard(int(name.split("/")[0][len("mp_rank_"):]) if "/" in name else 0), buf)
                        data = buf.getvalue()
                    tar.addfile(_info(name, len(data)), io.BytesIO(data))
        finally:
            if compress:
                stream.close()
