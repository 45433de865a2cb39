"""`mega import` and `mega export` for Megatron-LM's legacy checkpoints (the `megatron`
format's Importer and Exporter halves).

Import reads a save directory (`latest_checkpointed_iteration.txt` naming an iteration or
`release`), an iteration directory, one `model_optim_rng.pt`, or an NGC-style `.zip`
holding `release/mp_rank_00/model_optim_rng.pt`. The tensor/pipeline layout and the rank
folders (`mp_rank_XX[_YYY]`) come from the file's `args`; the shards are merged into one
model under mega's names (a GPT, or a BERT when the file has BERT's heads or WordPiece
tokenizer: megatron_bert.py), the config is mapped from `args`, and the run directory is
written by `mega.checkpoint.write_imported_run`.

Export loads a mega checkpoint as one process's model and writes Megatron-LM's tree
(tracker + `iter_XXXXXXX/mp_rank_XX[_YYY]/model_optim_rng.pt`), split for the requested
tensor/pipeline sizes, with `args` describing it (see megatron_args.megatron_args).
"""
from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from mega.checkpoint import atomic_directory
from mega.errors import CheckpointError, ConfigError
from mega.plugins.checkpoints.megatron import (
    CHECKPOINT_VERSION,
    FILE,
    TRACKER,
    find_rank_file,
    nest,
    partition_dim,
    state_from_raw,
)
from mega.plugins.checkpoints import megatron_bert
from mega.plugins.checkpoints.megatron_args import (
    GPT2_BPE,
    HF_TOKENIZER,
    NULL_TOKENIZER,
    SENTENCEPIECE_TYPES,
    activation_of,
    load_file,
    megatron_args,
    pp_size,
    tp_size,
)
from mega.plugins.models.transformer import padded_vocab_size
from mega.runtime.sharding import fit, merge_shards, renumber, to_global

ZIP_MEMBER = "release/mp_rank_00/model_optim_rng.pt"
_RANK = re.compile(r"^mp_rank_\d{2}(_\d{3})*$")
IMPORT_OPTIONS = ("tokenizer", "tokenizer_model", "tokenizer_file", "vocab_file", "merges_file", "trust_pickle",
                  "do_lower_case", "num_attention_heads")
EXPORT_OPTIONS = ("tensor_parallel", "pipeline_parallel")


# --- finding the files ----------------------------------------------------------------------


def _has_ranks(directory: Path) -> bool:
    """An iteration directory: `mp_rank_*` folders holding Megatron's file (mega's native
    format names its rank folders the same, with other files inside)."""
    return directory.is_dir() and any(_RANK.match(p.name) and ((p / FILE).is_file() or (p / "model_rng.pt").is_file())
                                      for p in directory.iterdir())


def can_import(source: Path) -> bool:
    source = Path(source)
    if source.is_file():
        if source.suffix == ".zip":
            try:
                with zipfile.ZipFile(source) as z:
                    return ZIP_MEMBER in z.namelist()
            except zipfile.BadZipFile:
                return False
        return source.name in (FILE, "model_rng.pt")
    if (source / TRACKER).is_file():
        return True
    return _has_ranks(source)


def iteration_directory(source: Path) -> Tuple[Path, int]:
    """The iteration directory a save directory's tracker names (an int or `release`)."""
    text = (source / TRACKER).read_text().strip()
    if text == "release":
        return source / "release", 0
    try:
        step = int(text)
    except ValueError:
        raise CheckpointError(f"{source / TRACKER}: says {text!r}; Megatron-LM writes an iteration number or 'release'") from None
    return source / f"iter_{step:07d}", step


class Source:
    """A Megatron-LM checkpoint's rank files: `read(tp_rank, pp_rank)` -> the loaded dict."""

    def __init__(self, source: Path, trust_pickle: bool = False, fallback_args=None):
        source = Path(source)
        self.trust = trust_pickle
        self.step: Optional[int] = None
        self.zip: Optional[Path] = None
        self.single: Optional[Path] = None
        self.directory: Optional[Path] = None
        if source.is_file() and source.suffix == ".zip":
            self.zip, self.step = source, 0
        elif source.is_file():
            if _RANK.match(source.parent.name) and _has_ranks(source.parent.parent):
                self.directory = source.parent.parent  # one rank's file: read the whole iteration
            else:
                self.single = source
        elif (source / TRACKER).is_file():
            self.directory, self.step = iteration_directory(source)
        else:
            self.directory = source
        if self.directory is not None and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such iteration directory (named by {source / TRACKER})")
        if self.step is None and self.directory is not None and self.directory.name == "release":
            self.step = 0
        self.first = self.read(0, 0, pp=1)
        self.args = self.first.get("args")
        if self.args is None and fallback_args is not None and (self.zip or self.single):
            self.args = self.first["args"] = fallback_args  # a file saved without args: one rank, TP=1
        if self.args is None:
            raise CheckpointError(f"{self.name(0, 0, 1)}: has no 'args'; mega needs them to know the model's shape"
                                  " (a BERT file without args imports with --option num_attention_heads=N)")
        self.tp, self.pp = tp_size(self.args), pp_size(self.args)
        if (self.zip or self.single) and (self.tp, self.pp) != (1, 1):
            raise CheckpointError(f"{source}: args say tensor/pipeline-parallel sizes ({self.tp}, {self.pp}) but only"
                                  " one rank's file is here; import the iteration directory")
        if self.step is None:
            self.step = int(self.first.get("iteration", 0) or 0)

    def near(self) -> List[Path]:
        """The directories a moved checkpoint's tokenizer files may sit in: the iteration
        directory and the save directory above it (or the file's own folders)."""
        if self.directory is not None:
            return [self.directory, self.directory.parent]
        start = self.zip or self.single
        return [start.parent, start.parent.parent, start.parent.parent.parent]

    def name(self, tp_rank: int, pp_rank: int, pp: int) -> str:
        if self.zip is not None:
            return f"{self.zip}:{ZIP_MEMBER}"
        if self.single is not None:
            return str(self.single)
        return str(self.directory / (f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")) / FILE)

    def read(self, tp_rank: int, pp_rank: int, pp: Optional[int] = None) -> dict:
        pp = self.pp if pp is None else pp
        if self.zip is not None:
            with zipfile.ZipFile(self.zip) as z, z.open(ZIP_MEMBER) as f:
                return load_file(f, self.name(0, 0, 1), self.trust)
        if self.single is not None:
            return load_file(self.single, str(self.single), self.trust)
        path = find_rank_file(self.directory, tp_rank, pp_rank, pp)
        if path is None:
            raise CheckpointError(f"{self.name(tp_rank, pp_rank, pp)}: missing (args say tensor/pipeline-parallel"
                                  f" sizes ({self.tp}, {self.pp}))")
        return load_file(path, str(path), self.trust)


# --- merging shards -------------------------------------------------------------------------


def merged_model(src: Source) -> Dict[str, torch.Tensor]:
    """Every rank's tensors merged into one model under mega's (global) names: the
    kernel's merge_shards along each tensor's split dimension, then to_global (layer
    numbers made global, the last stage's copy of the tied word embedding dropped)."""
    full: Dict[str, torch.Tensor] = {}
    for stage in range(src.pp):
        ranks = [state_from_raw(src.first if (r, stage) == (0, 0) else src.read(r, stage),
                                src.name(r, stage, src.pp), stage, parts=("model",))
                 for r in range(src.tp)]
        sharding = ranks[0]["sharding"]
        full.update(to_global(merge_shards([r["model"] for r in ranks], sharding), sharding))
    return full


# --- the config ------------------------------------------------------------------------------


# the names export gives the tokenizer files beside the tracker, by mega config key
EXPORT_NAMES = {"model": "tokenizer.model", "tokenizer_file": "tokenizer.json", "vocab_file": "vocab.json",
                "merges_file": "merges.txt"}


def _option_file(options: Mapping[str, str], key: str) -> Path:
    path = Path(options[key]).expanduser()
    if not path.is_file():
        raise ConfigError(f"--option {key}={path}: no such file")
    return path


def _locate(value, near: List[Path]) -> Optional[Path]:
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


def _tokenizer(args, options: Mapping[str, str], source: Path, near: List[Path]) -> Tuple[dict, Dict[str, Path]]:
    """The tokenizer table and files: from the options, else from `args` (its paths, or
    files of those names in the checkpoint's directories `near`)."""
    if options.get("tokenizer_model"):
        return {"library": "sentencepiece"}, {"model": _option_file(options, "tokenizer_model")}
    special = dict(getattr(args, "mega_tokenizer", None) or {})
    if options.get("tokenizer_file"):
        return {"library": "huggingface", **special}, {"tokenizer_file": _option_file(options, "tokenizer_file")}
    if options.get("vocab_file") or options.get("merges_file"):
        if not (options.get("vocab_file") and options.get("merges_file")):
            raise ConfigError("--option vocab_file=PATH and --option merges_file=PATH go together (GPT-2's vocab.json"
                              " and merges.txt)")
        return {"library": "huggingface", **special}, {"vocab_file": _option_file(options, "vocab_file"),
                                                        "merges_file": _option_file(options, "merges_file")}
    if options.get("tokenizer"):
        if options["tokenizer"] != "bytes":
            raise ConfigError(f"--option tokenizer={options['tokenizer']}: only 'bytes' is known here; for a"
                              " sentencepiece model give --option tokenizer_model=PATH")
        return {"library": "bytes"}, {}
    kind = getattr(args, "tokenizer_type", None)
    named = {key: getattr(args, key, None) for key in ("tokenizer_model", "vocab_file", "merge_file")}
    if kind in SENTENCEPIECE_TYPES and (model := _locate(named["tokenizer_model"], near)):
        return {"library": "sentencepiece"}, {"model": model}
    if kind == GPT2_BPE:
        vocab, merges = _locate(named["vocab_file"], near), _locate(named["merge_file"], near)
        if vocab and merges:
            return {"library": "huggingface", **special}, {"vocab_file": vocab, "merges_file": merges}
    if kind == HF_TOKENIZER and (file := _locate(named["tokenizer_model"], near)) and file.suffix == ".json":
        return {"library": "huggingface", **special}, {"tokenizer_file": file}
    if getattr(args, "mega_tokenizer_library", None) == "bytes" or (
            kind == NULL_TOKENIZER and getattr(args, "vocab_size", None) == 257):
        return {"library": "bytes"}, {}
    found = ", ".join([f"args.tokenizer_type={kind!r}"] + [f"args.{k}={v!r} (not found)" for k, v in named.items() if v])
    raise ConfigError(f"{source}: cannot tell which tokenizer this model uses ({found}); give --option"
                      " tokenizer_model=PATH (a sentencepiece .model file), --option vocab_file=PATH with --option"
                      " merges_file=PATH (GPT-2 BPE), --option tokenizer_file=PATH (a tokenizer.json) or --option tokenizer=bytes")


def _vocab_size(tokenizer_table: dict, files: Mapping[str, Path], plugins) -> int:
    from mega.config import config_from_dict

    mc = config_from_dict({"model": {"name": "gpt", "tokenizer": {**tokenizer_table, **{k: str(v) for k, v in files.items()}}}},
                          plugins=plugins).model
    return plugins.tokenizers.get(mc.tokenizer.library, "model.tokenizer.library").factory(mc.tokenizer, [], None).vocab_size


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


def _require(args, field: str, fallback=None):
    value = getattr(args, field, None)
    if value is None:
        value = fallback
    if value is None:
        raise CheckpointError(f"args.{field} is missing; mega needs it to build the model")
    return value


def import_run(source: Path, run_dir: Path, options: Mapping[str, str], plugins) -> Path:
    from mega.checkpoint import check_options, write_imported_run

    check_options(options, IMPORT_OPTIONS, "megatron")
    trust = str(options.get("trust_pickle", "false")).lower() in ("1", "true", "yes")
    src = Source(Path(source), trust, fallback_args=megatron_bert.fallback_args(options))
    args = src.args
    state = merged_model(src)
    if megatron_bert.is_bert(state, args):
        return _import_bert(src, state, Path(source), Path(run_dir), options, plugins)
    word = state.get("language_model.embedding.word_embeddings.weight")
    positions = state.get("language_model.embedding.position_embeddings.weight")
    qkv = state.get("language_model.encoder.layers.0.self_attention.query_key_value.weight")
    if word is None or positions is None or qkv is None:
        raise CheckpointError(f"{source}: holds no GPT language model (word/position embeddings and layers)")
    tok_table, files = _tokenizer(args, options, source, src.near())
    vocab = _vocab_size(tok_table, files, plugins)
    orig = getattr(args, "orig_vocab_size", None)
    if orig is not None and orig != vocab:
        raise CheckpointError(f"{source}: args.orig_vocab_size={orig} but the tokenizer has {vocab} tokens; give the"
                              " tokenizer the model was trained with")
    padded = int(getattr(args, "padded_vocab_size", None) or word.shape[0])
    if vocab > padded:
        raise CheckpointError(f"{source}: the tokenizer has {vocab} tokens but the checkpoint only {padded} embedding rows")
    divisible_by = _divisible_by(args, vocab, padded)
    ours = padded_vocab_size(vocab, divisible_by)
    # re-pad: keep the real rows, padding rows are zeros (never predicted)
    word = state["language_model.embedding.word_embeddings.weight"] = fit(word, [ours, word.shape[1]])
    hidden = _require(args, "hidden_size", word.shape[1])
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.search(r"\.layers\.(\d+)\.", k)))
    num_layers = _require(args, "num_layers", layers)
    if num_layers != layers:
        raise CheckpointError(f"{source}: args.num_layers={num_layers} but the files hold {layers} layers")
    ffn = state["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"].shape[0]
    max_pos = positions.shape[0]
    model = {
        "name": "gpt", "num_layers": num_layers, "hidden_size": hidden,
        "num_attention_heads": _require(args, "num_attention_heads"), "ffn_hidden_size": ffn,
        "max_position_embeddings": max_pos, "seq_length": min(getattr(args, "seq_length", None) or max_pos, max_pos),
        "make_vocab_size_divisible_by": divisible_by,
        "layernorm_epsilon": getattr(args, "layernorm_epsilon", None) or 1e-5,
        "activation": activation_of(args), "tokenizer": tok_table,
    }
    for key in ("hidden_dropout", "attention_dropout", "init_method_std"):
        if isinstance(getattr(args, key, None), float):
            model[key] = getattr(args, key)
    return write_imported_run(Path(run_dir), {"model": model}, state, plugins, files=files, step=src.step or 0)


def _import_bert(src: Source, state: Dict[str, torch.Tensor], source: Path, run_dir: Path,
                 options: Mapping[str, str], plugins) -> Path:
    """A Megatron-BERT checkpoint (or one of its fine-tuning heads) into a mega BERT run:
    the vocabulary-sized tensors (word embedding, LM-head bias) keep the file's padded
    rows, re-padded with zeros to mega's rule when that differs."""
    from mega.checkpoint import write_imported_run

    args = src.args
    word = state.get("language_model.embedding.word_embeddings.weight")
    if word is None or not any(k.startswith("language_model.encoder.layers.") for k in state):
        raise CheckpointError(f"{source}: holds no BERT language model (word embeddings and layers)")
    model = megatron_bert.model_table(state, args, str(source))
    model["tokenizer"], files = megatron_bert.tokenizer(args, options, source, src.near())
    vocab = _vocab_size(model["tokenizer"], files, plugins)
    orig = getattr(args, "orig_vocab_size", None)
    if orig is not None and orig != vocab:
        raise CheckpointError(f"{source}: args.orig_vocab_size={orig} but the vocabulary has {vocab} tokens; give the"
                              " vocab.txt the model was trained with (--option vocab_file=PATH)")
    padded = int(getattr(args, "padded_vocab_size", None) or word.shape[0])
    if vocab > padded:
        raise CheckpointError(f"{source}: the tokenizer has {vocab} tokens but the checkpoint only {padded} embedding"
                              " rows; is --option vocab_file the model's vocabulary?")
    model["make_vocab_size_divisible_by"] = _divisible_by(args, vocab, padded)
    ours = padded_vocab_size(vocab, model["make_vocab_size_divisible_by"])
    state["language_model.embedding.word_embeddings.weight"] = fit(word, [ours, word.shape[1]])
    if "lm_head.bias" in state:
        state["lm_head.bias"] = fit(state["lm_head.bias"], [ours])
    return write_imported_run(run_dir, {"model": model}, state, plugins, files=files, step=src.step or 0)


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
    from mega.config import to_dict
    from mega.checkpoint import check_options, restore, verify

    check_options(options, EXPORT_OPTIONS, "megatron")
    tp, pp = _int_option(options, "tensor_parallel"), _int_option(options, "pipeline_parallel")
    model, tokenizer, config = restore(checkpoint, plugins)
    mc = config.model
    if mc.name != "gpt" and not mc.name.startswith("bert"):
        raise ConfigError(f"{checkpoint}: model {mc.name!r}; the megatron exporter writes GPT and BERT models")
    ffn = mc.ffn_hidden_size or 4 * mc.hidden_size
    for what, value, by in (("num_attention_heads", mc.num_attention_heads, tp), ("ffn_hidden_size", ffn, tp),
                            ("num_layers", mc.num_layers, pp)):
        if value % by:
            raise ConfigError(f"model.{what}={value} is not divisible by --option "
                              f"{'tensor_parallel' if by == tp else 'pipeline_parallel'}={by}")
    step = int(verify(checkpoint).get("step", 0))
    destination = Path(destination).expanduser().absolute()
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise CheckpointError(f"{destination}: already exists; export into a new directory")
    # Written beside DEST and renamed into place: a failed export leaves nothing behind.
    with atomic_directory(destination) as tmp:
        _write_export(tmp, destination, model, tokenizer, to_dict(config), tp, pp, step)
    return destination


def _write_export(tmp: Path, destination: Path, model, tokenizer, raw: dict, tp: int, pp: int, step: int) -> None:
    """Megatron-LM's tree in `tmp`; `args` name the tokenizer files at `destination`, the
    place `tmp` is renamed to."""
    files = {}
    for key, path in tokenizer.artifacts().items():
        name = "vocab.txt" if raw["model"].get("tokenizer", {}).get("library") == "wordpiece" else \
            EXPORT_NAMES.get(key, Path(path).name)
        shutil.copyfile(path, tmp / name)
        files[key] = str(destination / name)
    args = megatron_args(raw, tp, pp, tokenizer.vocab_size, files=files)
    full = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    word_name = "language_model.embedding.word_embeddings.weight"
    full[word_name] = fit(full[word_name], [args.padded_vocab_size, full[word_name].shape[1]])
    if "lm_head.bias" in full:  # BERT's LM-head bias spans the vocabulary too
        full["lm_head.bias"] = fit(full["lm_head.bias"], [args.padded_vocab_size])
    per_stage = raw["model"]["num_layers"] // pp
    for stage in range(pp):
        stage_state = _stage(full, stage, per_stage, pp)
        for rank in range(tp):
            shard = {k: (t if partition_dim(k) is None else t.chunk(tp, dim=partition_dim(k))[rank]).clone()
                     for k, t in stage_state.items()}
            folder = tmp / f"iter_{step:07d}" / (f"mp_rank_{rank:02d}" + (f"_{stage:03d}" if pp > 1 else ""))
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": step,
                        "model": nest(shard)}, folder / FILE)
    (tmp / TRACKER).write_text(f"{step}\n")


def _stage(full: Dict[str, torch.Tensor], stage: int, per_stage: int, pp: int) -> Dict[str, torch.Tensor]:
    """One pipeline stage's tensors under Megatron's stage-local layer numbers (the
    embedding on the first stage; the final LayerNorm and, with PP > 1, the tied head's
    copy `word_embeddings_for_head` on the last), in the model's order."""
    out: Dict[str, torch.Tensor] = {}
    first, last = stage == 0, stage == pp - 1
    for name, t in full.items():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m:
            if stage * per_stage <= int(m.group(1)) < (stage + 1) * per_stage:
                out[renumber(name, -stage * per_stage)] = t
        elif name.startswith("language_model.embedding."):
            if first:
                out[name] = t
        elif last:
            out[name] = t
    if last and pp > 1:
        out["word_embeddings_for_head.weight"] = full["language_model.embedding.word_embeddings.weight"]
    return out
