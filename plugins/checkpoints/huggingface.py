"""The `huggingface` checkpoint format: Hugging Face transformers model directories, read
by `mega import` and written by `mega export --to huggingface` (or `--to hf`).

A model directory is `config.json` with its weights in `model.safetensors`, sharded
safetensors with `model.safetensors.index.json`, or `pytorch_model*.bin` (read with
`torch.load(weights_only=True)`: no code runs), and its tokenizer's files. This module
keeps the files: reading and writing weights, config.json, the atomic destination. What
the tensors and config.json fields of a model family are called in transformers is the
family's own converter (`register_model_converters`, `mega.protocols.
HuggingFaceModelConverter`), picked by config.json's `model_type` on import and by the
run's `model.name` on export; the tokenizer's files are its library's converter
(`register_tokenizer_converters`, `HuggingFaceTokenizerConverter`), tried in the order
the family lists (`tokenizers`), command-line files first.

Import options: `make_vocab_size_divisible_by` and `seq_length` (set in the imported
model table), and the tokenizer converters' own (`tokenizer_file`, `vocab_file`,
`tokenizer_model`, ...). Export option: `dtype` (float32, float16, bfloat16).

This format only converts; it does not hold training checkpoints (`save`/`load` refuse).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

import mega
from mega.checkpoint import atomic_directory, check_options
from mega.errors import CheckpointError, ConfigError
from mega.checkpoint.load_errors import describe
from mega.protocols import HuggingFaceModelConverter, HuggingFaceTokenizerConverter
from mega.plugins.checkpoints import converters, hf_shards

log = logging.getLogger("mega.checkpoints.huggingface")

MODEL_OPTIONS = ("make_vocab_size_divisible_by", "seq_length")
EXPORT_OPTIONS = ("dtype", "max_shard_size")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# --- reading a Hugging Face model directory --------------------------------------------------


def _weight_files(source: Path) -> Optional[Tuple[str, list]]:
    """("safetensors" | "bin", files) of a model directory, None when it has none."""
    for kind, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                                ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (source / single).is_file():
            return kind, [source / single]
        if (source / index).is_file():
            try:
                weight_map = json.loads((source / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{source / index}: not a weight index ({type(exc).__name__}: {exc})") from None
            files = [source / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{source / index}: names shards that are missing: {', '.join(missing)}")
            return kind, files
    return None


def read_weights(source: Path) -> Dict[str, torch.Tensor]:
    found = _weight_files(source)
    if found is None:
        raise CheckpointError(f"{source}: no model.safetensors, sharded safetensors with an index, or pytorch_model*.bin")
    kind, files = found
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if kind == "safetensors":
                from safetensors.torch import load_file

                part = load_file(str(f), device="cpu")
            else:
                part = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{f}: cannot be read: {describe(exc)}") from None
        state.update(part)
    return state


def read_config(source: Path) -> dict:
    try:
        return json.loads((source / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source / 'config.json'}: cannot be read ({type(exc).__name__}: {exc})") from None


def _model_types(plugins) -> Dict[str, object]:
    """config.json `model_type` -> the model converter that reads it."""
    readers = converters.model_converters(plugins, HuggingFaceModelConverter)
    return {model_type: conv for _, conv in readers for model_type in conv.hf_model_types}


def _tokenizers(family, plugins):
    return converters.tokenizer_converters(plugins, HuggingFaceTokenizerConverter, getattr(family, "tokenizers", ()))


def _tokenizer(source: Path, options: Mapping[str, str], hf: dict, tokenizers) -> tuple:
    """The tokenizer table and files of a model directory, from the first tokenizer
    converter that recognises the options' files, else the directory's."""
    found = converters.first_answer(tokenizers, lambda conv, only_options: conv.from_hf(source, options, hf, only_options))
    if found is None:
        hints = " or ".join(conv.hf_hint for _, conv in tokenizers)
        raise CheckpointError(f"{source}: has no tokenizer files mega reads ({', '.join(n for n, _ in tokenizers)});"
                              f" name the tokenizer with {hints}")
    return found


class HuggingFaceFormat:
    """Hugging Face transformers' model directories; an Importer and an Exporter."""

    name = "huggingface"

    def save(self, state: dict, directory: Path, parallel=None) -> None:
        raise CheckpointError("the huggingface format does not hold training checkpoints; train with"
                              " exp_manager.checkpoint's native or megatron format and use `mega export RUN DEST --to huggingface`")

    def load(self, directory: Path, parallel=None, parts=("model", "optimizer", "trainer", "sharding")) -> dict:
        raise CheckpointError(f"{directory}: a Hugging Face model directory is not a mega checkpoint;"
                              " use `mega import SOURCE RUN_DIR` first")

    # --- import ----------------------------------------------------------------------------
    def can_import(self, source: Path) -> bool:
        """A config.json whose `model_type` a family's converter reads (the process's
        plugins: `can_import` is not handed the command's), with weights beside it."""
        source = Path(source)
        if not (source / "config.json").is_file():
            return False
        try:
            model_type = json.loads((source / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return False
        if model_type not in _model_types(mega.get_plugins()):
            return False
        return any((source / n).is_file() for n in WEIGHT_FILES)

    def import_run(self, source: Path, run_dir: Path, options: Mapping[str, str], plugins) -> Path:
        from mega.checkpoint import write_imported_run

        source = Path(source).expanduser()
        where = str(source / "config.json")
        hf = read_config(source)
        readers = _model_types(plugins)
        family = readers.get(hf.get("model_type"))
        if family is None:
            raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r}; the huggingface format imports"
                                  f" {', '.join(readers) or 'none'} (the model types mega's model converters read)")
        tokenizers = _tokenizers(family, plugins)
        check_options(options, MODEL_OPTIONS + converters.options_of(tokenizers, "hf_options"), self.name)
        model = family.hf_model_table(hf, where)
        if options.get("seq_length"):
            model["seq_length"] = int(options["seq_length"])
        if options.get("make_vocab_size_divisible_by"):
            model["make_vocab_size_divisible_by"] = int(options["make_vocab_size_divisible_by"])
        model["tokenizer"], files = _tokenizer(source, options, hf, tokenizers)
        vocab = converters.vocab_size_of(model, files, plugins)
        state = family.from_hf(read_weights(source), model, vocab, str(source))
        return write_imported_run(Path(run_dir), {"model": model}, state, plugins, files=files)

    # --- export ----------------------------------------------------------------------------
    def export_run(self, checkpoint: Path, destination: Path, options: Mapping[str, str], plugins) -> Path:
        from mega.checkpoint import restore

        check_options(options, EXPORT_OPTIONS, self.name)
        dtype_name = options.get("dtype", "float32")
        if dtype_name not in DTYPES:
            raise ConfigError(f"--option dtype={dtype_name}: expected one of {', '.join(DTYPES)}")
        shard_limit = hf_shards.parse_size(options["max_shard_size"]) if "max_shard_size" in options else None
        destination = Path(destination).expanduser().absolute()
        if destination.exists() and not (destination.is_dir() and not any(destination.iterdir())):
            raise CheckpointError(f"{destination}: already exists; export into a new directory")
        model, tokenizer, config = restore(checkpoint, plugins)
        mc = config.model
        family = converters.model_converter(plugins, mc.name, HuggingFaceModelConverter)
        if family is None:
            classes = sorted({a for _, conv in converters.model_converters(plugins, HuggingFaceModelConverter)
                              for a in conv.hf_architectures})
            raise CheckpointError(f"{checkpoint}: model {mc.name!r} cannot be written as {', '.join(classes) or 'any'}"
                                  " transformers class (no model converter of it writes Hugging Face directories)")
        try:
            state = family.to_hf(model.state_dict(), mc, tokenizer.vocab_size)
            hf_config = family.hf_config(mc, tokenizer, dtype_name)
        except CheckpointError as exc:
            raise CheckpointError(f"{checkpoint}: {exc}") from None
        files = converters.tokenizer_converter(plugins, mc.tokenizer.library, HuggingFaceTokenizerConverter)
        if files is None:
            log.warning("model.tokenizer.library=%r: no converter writes it for transformers; %s holds the model"
                        " without tokenizer files", mc.tokenizer.library, destination)
        max_length = getattr(mc, "max_position_embeddings", None) or mc.seq_length
        write_tokenizer = None if files is None else (
            lambda tmp: self._write_tokenizer(files, tokenizer, mc.tokenizer, tmp, max_length))
        return _write_model_directory(destination, state, hf_config, dtype_name, write_tokenizer, shard_limit)

    @staticmethod
    def _write_tokenizer(files, tokenizer, tokenizer_config, destination: Path, model_max_length: int) -> None:
        files.to_hf(tokenizer, tokenizer_config, destination, model_max_length)


def _write_model_directory(destination: Path, state: Dict[str, torch.Tensor], config: dict, dtype_name: str,
                           write_tokenizer, shard_limit: Optional[int] = None) -> Path:
    """model.safetensors (or shards of at most `shard_limit` bytes and their index) +
    config.json (+ the tokenizer's files), written beside `destination` and renamed into
    place: a failed export leaves nothing behind."""
    state = {k: v.to(DTYPES[dtype_name]).contiguous() for k, v in state.items()}
    with atomic_directory(destination) as tmp:
        if shard_limit is None:
            from safetensors.torch import save_file

            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            hf_shards.save_sharded(state, tmp, shard_limit)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if write_tokenizer is not None:
            write_tokenizer(tmp)
    return destination


@mega.hookimpl
def register_checkpoint_formats(register):
    register("huggingface", HuggingFaceFormat)
    register("hf", HuggingFaceFormat)  # the short name: `mega export RUN DEST --to hf`
