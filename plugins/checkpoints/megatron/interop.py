"""`mega import` and `mega export` for Megatron-LM's legacy checkpoints (the `megatron`
format's Importer and Exporter halves), whatever the model family.

Import reads the checkpoint (source.py), merges its shards under mega's names, and asks
the family's converter (family.py) what the family cannot run and for the model table;
the tokenizer is the first of the family's tokenizers whose converter recognises the
files the options name, else `args`; the vocabulary-sized tensors the family lists are
re-padded to mega's rule; the run directory is written by
`mega.checkpoint.write_imported_run`.

Export loads a mega checkpoint as one process's model and writes Megatron-LM's tree
(tracker + `iter_XXXXXXX/mp_rank_XX[_YYY]/model_optim_rng.pt`), split for the requested
tensor/pipeline sizes along each tensor's own split dimension (the model's sharding),
with `args` describing it (args.py) and the tokenizer's files beside the tracker.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from mega.checkpoint import atomic_directory
from mega.errors import CheckpointError, ConfigError
from mega.protocols import MegatronModelConverter, MegatronTokenizerConverter
from mega.plugins.checkpoints import converters
from mega.plugins.checkpoints.megatron.args import megatron_args
from mega.plugins.checkpoints.megatron.family import family_of
from mega.plugins.checkpoints.megatron.layout import CHECKPOINT_VERSION, FILE, TRACKER, nest, tp_size
from mega.plugins.checkpoints.megatron.source import Source, fallback_args, merged_model
from mega.plugins.models.transformer import padded_vocab_size
from mega.runtime.sharding import chunks_of, fit, renumber, split_for_rank

FORMAT_OPTIONS = ("trust_pickle", "num_attention_heads")
EXPORT_OPTIONS = ("tensor_parallel", "pipeline_parallel")
# the `args` fields naming a tokenizer's files, listed when none is found
FILE_FIELDS = ("tokenizer_model", "vocab_file", "merge_file")


# --- the tokenizer -----------------------------------------------------------------------------


def locate(value, near: List[Path]) -> Optional[Path]:
    """A tokenizer file named in `args`: the path itself when it exists, else a file of
    that name (or the kernel's `tokenizer.<name>` copy) in the checkpoint's own
    directories, for a checkpoint moved since it was written."""
    if not value:
        return None
    path = Path(str(value)).expanduser()
    if path.is_file():
        return path
    if path.is_dir() and (path / "tokenizer.json").is_file():  # a Hugging Face tokenizer directory
        return path / "tokenizer.json"
    for directory in near:
        for name in (path.name, f"tokenizer.{path.name}"):
            if (directory / name).is_file():
                return directory / name
    return None


def _tokenizer(tokenizers, args, options: Mapping[str, str], source: Path, near: List[Path]):
    """The tokenizer table and files: the first converter recognising the options' files,
    else `args` (their paths, or files of those names in the checkpoint's directories)."""
    found = converters.first_answer(
        tokenizers, lambda conv, only: conv.from_megatron(args, options, lambda value: locate(value, near), only))
    if found is not None:
        return found
    said = [f"args.tokenizer_type={getattr(args, 'tokenizer_type', None)!r}"] + [
        f"args.{k}={getattr(args, k)!r} (not found)" for k in FILE_FIELDS if getattr(args, k, None)]
    hints = [conv.megatron_hint for _, conv in tokenizers]
    give = ", ".join(hints[:-1]) + (" or " if len(hints) > 1 else "") + hints[-1] if hints else "none"
    raise ConfigError(f"{source}: cannot tell which tokenizer this model uses ({', '.join(said)}); give {give}")


def _divisible_by(args, vocab: int, padded: int) -> int:
    """mega's make_vocab_size_divisible_by that pads `vocab` to the checkpoint's `padded`
    rows at TP=1: Megatron's own multiple (divisible_by x the checkpoint's TP) does when
    args have it; else the largest power of two that does."""
    given = getattr(args, "make_vocab_size_divisible_by", None)
    tp = tp_size(args)
    if given and padded_vocab_size(vocab, given * tp) == padded:
        return given * tp
    d = 1
    while padded % (d * 2) == 0 and padded_vocab_size(vocab, d * 2) == padded:
        d *= 2
    return d if padded_vocab_size(vocab, d) == padded else 128


# --- import ------------------------------------------------------------------------------------




def import_run(source: Path, run_dir: Path, options: Mapping[str, str], plugins) -> Path:
    from mega.checkpoint import check_options

    check_options(options, import_options(plugins), "megatron")
    trust = str(options.get("trust_pickle", "false")).lower() in ("1", "true", "yes")
    src = Source(Path(source), trust, fallback_args=fallback_args(options))
    state = merged_model(src)
    family = family_of(plugins, state, src.args, str(source))
    return import_state(family, state, src.args, options, Path(source), src.near(), src.step or 0, Path(run_dir), plugins)


def import_options(plugins) -> tuple:
    """The `--option` keys an import of Megatron-LM's files reads (the tokenizers' too)."""
    every = [(n, c) for n, c in converters.tokenizer_converters(plugins, MegatronTokenizerConverter)]
    return FORMAT_OPTIONS + converters.options_of(every, "megatron_options")


def import_state(family, state: Dict[str, torch.Tensor], args, options: Mapping[str, str], source: Path,
                 near: List[Path], step: int, run_dir: Path, plugins) -> Path:
    """A run directory for a Megatron-LM model (`state`: its tensors merged under mega's
    global names; `args`: Megatron's) of `family`'s converter: what the family cannot run
    refused, its model table, the tokenizer from the options or `args` (files found where
    `args` say, or in the `near` directories), the vocabulary-sized tensors re-padded to
    mega's rule. Shared by the `megatron` and `torch_dist` imports."""
    from mega.checkpoint import write_imported_run

    family.megatron_check(state, args, str(source))
    model = family.megatron_model_table(state, args, str(source))
    tokenizers = converters.tokenizer_converters(plugins, MegatronTokenizerConverter, getattr(family, "tokenizers", ()))
    model["tokenizer"], files = _tokenizer(tokenizers, args, options, source, near)
    vocab = converters.vocab_size_of(model, files, plugins)
    orig = getattr(args, "orig_vocab_size", None)
    if orig is not None and orig != vocab:
        raise CheckpointError(f"{source}: args.orig_vocab_size={orig} but the tokenizer has {vocab} tokens; give the"
                              " tokenizer the model was trained with")
    word = state[family.vocab_tensors[0]]
    padded = int(getattr(args, "padded_vocab_size", None) or word.shape[0])
    if vocab > padded:
        raise CheckpointError(f"{source}: the tokenizer has {vocab} tokens but the checkpoint only {padded} embedding"
                              " rows; is the tokenizer the model's?")
    model["make_vocab_size_divisible_by"] = _divisible_by(args, vocab, padded)
    ours = padded_vocab_size(vocab, model["make_vocab_size_divisible_by"])
    for name in family.vocab_tensors:  # re-pad: keep the real rows, padding rows are zeros (never predicted)
        if name in state:
            state[name] = fit(state[name], [ours, *state[name].shape[1:]])
    return write_imported_run(Path(run_dir), {"model": model}, state, plugins, files=files, step=step)


# --- export ----------------------------------------------------------------------------------


def _int_option(options: Mapping[str, str], key: str) -> int:
    try:
        value = int(options.get(key, 1))
    except ValueError:
        raise ConfigError(f"--option {key}={options[key]}: expected a whole number") from None
    if value < 1:
        raise ConfigError(f"--option {key}={value}: must be at least 1")
    return value


def export_run(checkpoint: Path, destination: Path, options: Mapping[str, str], plugins) -> Path:
    from mega.checkpoint import check_options, restore, verify
    from mega.config import to_dict

    check_options(options, EXPORT_OPTIONS, "megatron")
    tp, pp = _int_option(options, "tensor_parallel"), _int_option(options, "pipeline_parallel")
    model, tokenizer, config = restore(checkpoint, plugins)
    mc = config.model
    family = converters.model_converter(plugins, mc.name, MegatronModelConverter)
    if family is None:
        writers = ", ".join(names[0] for names, _ in converters.model_converters(plugins, MegatronModelConverter)) or "none"
        raise ConfigError(f"{checkpoint}: model {mc.name!r}; no model converter writes it as Megatron-LM files"
                          f" (families that do: {writers})")
    ffn = getattr(mc, "ffn_hidden_size", None) or 4 * getattr(mc, "hidden_size", 0)
    groups = getattr(mc, "num_query_groups", None) or getattr(mc, "num_attention_heads", tp)
    for what, value, by in (("num_attention_heads", getattr(mc, "num_attention_heads", tp), tp),
                            ("num_query_groups", groups, tp),
                            ("ffn_hidden_size", ffn, tp), ("num_layers", getattr(mc, "num_layers", pp), pp)):
        if value % by:
            raise ConfigError(f"model.{what}={value} is not divisible by --option "
                              f"{'tensor_parallel' if by == tp else 'pipeline_parallel'}={by}")
    step = int(verify(checkpoint).get("step", 0))
    destination = Path(destination).expanduser().absolute()
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise CheckpointError(f"{destination}: already exists; export into a new directory")
    # Written beside DEST and renamed into place: a failed export leaves nothing behind.
    with atomic_directory(destination) as tmp:
        _write_export(tmp, destination, model, tokenizer, to_dict(config), tp, pp, step, family, plugins)
    return destination


def _write_export(tmp: Path, destination: Path, model, tokenizer, raw: dict, tp: int, pp: int, step: int, family,
                  plugins) -> None:
    """Megatron-LM's tree in `tmp`; `args` name the tokenizer files at `destination`, the
    place `tmp` is renamed to."""
    from mega.runtime.parallel import ParallelState
    from mega.runtime.sharding import sharding_of

    files = {}
    library = raw["model"].get("tokenizer", {}).get("library")
    converter = converters.tokenizer_converter(plugins, library, MegatronTokenizerConverter) if library else None
    names = getattr(converter, "file_names", {})  # the names an export gives its files
    for key, path in tokenizer.artifacts().items():
        name = names.get(key, Path(path).name)
        shutil.copyfile(path, tmp / name)
        files[key] = str(destination / name)
    args = megatron_args(raw, tp, pp, tokenizer.vocab_size, files=files, plugins=plugins)
    sharding = sharding_of(model, ParallelState())
    dims = sharding["partition_dims"]
    full = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for name in family.vocab_tensors:  # the vocabulary padding at the exported tensor-parallel size
        if name in full:
            full[name] = fit(full[name], [args.padded_vocab_size, *full[name].shape[1:]])
    per_stage = raw["model"]["num_layers"] // pp
    tied = getattr(model, "share_embeddings_and_output_weights", True)
    for stage in range(pp):
        stage_state = _stage(full, stage, per_stage, pp, family.vocab_tensors[0], tied)
        for rank in range(tp):  # each tensor split along the model's own tensor-parallel dimension (and blocks)
            shard = {k: split_for_rank(t, dims.get(g), tp, rank, chunks_of(sharding, g)).clone()
                     for k, (g, t) in stage_state.items()}
            folder = tmp / f"iter_{step:07d}" / (f"mp_rank_{rank:02d}" + (f"_{stage:03d}" if pp > 1 else ""))
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": step,
                        "model": nest(shard, raw["model"].get("normalization"))}, folder / FILE)
    (tmp / TRACKER).write_text(f"{step}\n")


def _stage(full: Dict[str, torch.Tensor], stage: int, per_stage: int, pp: int,
           word: str, tied: bool = True) -> Dict[str, Tuple[str, torch.Tensor]]:
    """One pipeline stage's tensors, {name under Megatron's stage-local layer numbers: (the
    model's name, tensor)}: the embedding on the first stage; the final LayerNorm, the
    heads and, with PP > 1 and a `tied` output layer, the tied head's copy
    `word_embeddings_for_head` (of the word embedding `word`) on the last; in the model's
    order."""
    out: Dict[str, Tuple[str, torch.Tensor]] = {}
    first, last = stage == 0, stage == pp - 1
    for name, t in full.items():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m:
            if stage * per_stage <= int(m.group(1)) < (stage + 1) * per_stage:
                out[renumber(name, -stage * per_stage)] = (name, t)
        elif name.startswith("language_model.embedding."):
            if first:
                out[name] = (name, t)
        elif last:
            out[name] = (name, t)
    if last and pp > 1 and tied:
        out["word_embeddings_for_head.weight"] = (word, full[word])
    return out
