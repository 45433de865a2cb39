"""The encoder under a task head: pretrained names, architecture keys, and its weights.

Architecture, in NeMo 1.x's order of precedence:

1. `model.language_model.config_file`: a JSON of Megatron-LM argument names
   (`"hidden-size"`, `"num-attention-heads"`, `"num-layers"`, `"max-seq-length"`, ...;
   dashes or underscores); `max-seq-length` is the position table's size, `vocab-size` is
   ignored (the tokenizer fixes it), keys that are not architecture are ignored;
2. else `model.language_model.config`: the head model's own keys (`hidden_size`,
   `num_layers`, `num_attention_heads`, `max_position_embeddings`, `ffn_hidden_size`, ...);
3. else the architecture a pretrained name fixes (`megatron-bert-345m-uncased`: 24 layers,
   hidden 1024, 16 heads, 512 positions).

`megatron-bert-uncased` / `megatron-bert-cased` (and unnamed encoders) take it from 1 or 2.
A pretrained name also fixes the tokenizer (lower-casing, which public vocab.txt); its files
are never downloaded: when they are not set, the error says which file to fetch and which
key to point at it.

With none of the three, an `lm_checkpoint` that describes itself gives the architecture
(recorded in the run's config): a mega run or checkpoint (its config.toml; its vocab.txt
becomes an unset `wordpiece` vocab_file), a `.mega` archive (its config.toml member), a
NeMo `.nemo` archive (its model_config.yaml), a Hugging Face MegatronBert directory (its config.json, vocab.txt and lower-casing). A
Megatron-LM checkpoint or NGC zip does not (its `args` are read only with its weights):
as in NeMo, one of the three must say it, and the error names the keys.

Weights (`model.language_model.lm_checkpoint`) are loaded once, when a fine-tuning run
starts from step 0: a mega run, checkpoint or `.mega` archive directly; anything `mega
import` recognises (a Megatron-LM `iter_XXXXXXX` directory with one `mp_rank_XX` per
tensor-parallel rank, an NGC zip or bare `.pt`, a Hugging Face MegatronBert directory, a
NeMo `.nemo`: a MegatronBertModel or a fine-tuned NeMo task's) through its importer, resharded to the run's tensor-parallel layout. Only the encoder
(`language_model.*`) is taken; the task head starts fresh. The configured encoder must be
the checkpoint's: each architecture key that differs is named in the error.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import attrs
import torch

from mega.errors import CheckpointError, ConfigError

log = logging.getLogger("mega")

NGC = "https://api.ngc.nvidia.com/v2/models/nvidia"
HF_VOCAB = "https://s3.amazonaws.com/models.huggingface.co/bert"
ARCH_345M = {"hidden_size": 1024, "num_attention_heads": 16, "num_layers": 24, "max_position_embeddings": 512}


@attrs.frozen
class Pretrained:
    arch: Optional[Dict[str, int]]  # None: the user supplies it (config_file / config)
    checkpoint_url: Optional[str]
    vocab_url: str
    do_lower_case: bool
    tokenizer_name: str


PRETRAINED = {
    "megatron-bert-345m-uncased": Pretrained(
        ARCH_345M, f"{NGC}/megatron_bert_345m/versions/v0.0/files/release/mp_rank_00/model_optim_rng.pt",
        f"{HF_VOCAB}/bert-large-uncased-vocab.txt", True, "bert-large-uncased"),
    "megatron-bert-345m-cased": Pretrained(
        ARCH_345M, f"{NGC}/megatron_bert_345m/versions/v0.1_cased/files/release/mp_rank_00/model_optim_rng.pt",
        f"{HF_VOCAB}/bert-large-cased-vocab.txt", False, "bert-large-cased"),
    "megatron-bert-uncased": Pretrained(None, None, f"{HF_VOCAB}/bert-large-uncased-vocab.txt", True, "bert-large-uncased"),
    "megatron-bert-cased": Pretrained(None, None, f"{HF_VOCAB}/bert-large-cased-vocab.txt", False, "bert-large-cased"),
    "biomegatron-bert-345m-uncased": Pretrained(
        ARCH_345M, f"{NGC}/biomegatron345muncased/versions/0/files/MegatronBERT.pt",
        f"{NGC}/biomegatron345muncased/versions/0/files/vocab.txt", True, "bert-large-uncased"),
    "biomegatron-bert-345m-cased": Pretrained(
        ARCH_345M, f"{NGC}/biomegatron345mcased/versions/0/files/MegatronBERT.pt",
        f"{NGC}/biomegatron345mcased/versions/0/files/vocab.txt", False, "bert-large-cased"),
}

# Megatron-LM argument (dashes as underscores) -> head model key
MEGATRON_ARGS = {
    "hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads", "num_layers": "num_layers",
    "max_seq_length": "max_position_embeddings", "max_position_embeddings": "max_position_embeddings",
    "ffn_hidden_size": "ffn_hidden_size", "hidden_dropout": "hidden_dropout", "attention_dropout": "attention_dropout",
    "init_method_std": "init_method_std", "layernorm_epsilon": "layernorm_epsilon",
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by", "num_tokentypes": "num_tokentypes",
}


def read_config_file(path) -> Dict[str, Any]:
    """Architecture keys of a Megatron-style JSON (`model.language_model.config_file`)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"model.language_model.config_file: {path} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"model.language_model.config_file: {path} is not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"model.language_model.config_file: {path} must hold a JSON object")
    out = {}
    for key, value in raw.items():
        name = MEGATRON_ARGS.get(key.replace("-", "_"))
        if name is not None:
            out[name] = value
    return out


def architecture(lm, head_config_class=None) -> Dict[str, Any]:
    """The encoder keys for the head model, by NeMo's precedence (module docstring)."""
    name = lm.pretrained_model_name
    known = PRETRAINED.get(name) if name else None
    if name and known is None and not (lm.config_file or lm.config):
        raise ConfigError(f"model.language_model.pretrained_model_name: unknown name {name!r} (known: "
                          f"{', '.join(PRETRAINED)}); or describe the encoder with model.language_model.config_file / config")
    if lm.config_file:
        return read_config_file(lm.config_file)
    if lm.config:
        if head_config_class is not None:
            fields = {a.name for a in attrs.fields(head_config_class)}
            for key in lm.config:
                if key not in fields:
                    from mega.errors import did_you_mean
                    raise ConfigError(f"model.language_model.config.{key}: not a key of the encoder{did_you_mean(key, fields)}")
        return dict(lm.config)
    if known is not None and known.arch is None:
        raise ConfigError(f"model.language_model.pretrained_model_name={name!r} has no fixed architecture: set "
                          "model.language_model.config_file (Megatron-LM argument names) or model.language_model.config")
    return dict(known.arch) if known is not None else {}


ARCH_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "max_position_embeddings",
             "layernorm_epsilon", "activation", "init_method_std", "num_tokentypes", "make_vocab_size_divisible_by")


def require_encoder(name, config_class, source) -> None:
    """A CheckpointError unless `name` (a saved `model.name`, its config class when known)
    is a Megatron-BERT a task head can sit on: a `bert*` model or a fine-tuned task."""
    from mega.plugins.models.bert import BertEncoderConfig
    from mega.plugins.tasks.config import TaskConfig

    if config_class is not None and issubclass(config_class, (BertEncoderConfig, TaskConfig)):
        return
    if config_class is None and str(name).startswith("bert"):
        return
    raise CheckpointError(f"model.language_model.lm_checkpoint: {source} holds a {name!r} model (its config.toml's "
                          "model.name), not a BERT encoder; a task fine-tunes Megatron-BERT: point lm_checkpoint at a "
                          "bert / bert_masked_lm / ... run, a fine-tuned task, a Megatron-LM BERT or NGC checkpoint, or "
                          "a Hugging Face MegatronBert directory")


def _saved_model(model: Dict[str, Any], source, plugins) -> None:
    """require_encoder for a saved `model` table (the config class from `plugins` when the
    name is registered)."""
    name = model.get("name", "gpt")
    entry = plugins.models.get(name) if plugins is not None and name in plugins.models else None
    require_encoder(name, entry.config if entry is not None else None, source)


def from_mega_checkpoint(config, plugins=None) -> None:
    """`lm_checkpoint` with nothing else describing the encoder (no pretrained name with an
    architecture, no config_file, no config): a source that describes itself gives the
    architecture, recorded in this config's `model.language_model.config` --

    * a mega run or checkpoint: its config.toml, and its vocab.txt as the `wordpiece`
      tokenizer's `vocab_file` when that is unset;
    * a `.mega` archive: its config.toml member;
    * a NeMo `.nemo` archive: its model_config.yaml (and encoder config artifact);
    * a Hugging Face MegatronBert directory: its config.json (and vocab.txt, lower-casing
      from tokenizer_config.json, when the vocabulary is unset).

    A Megatron-LM checkpoint or NGC zip cannot be read before its weights are loaded, so
    it needs the architecture said, as NeMo needs it: a ConfigError names the keys."""
    lm, tok = config.language_model, config.tokenizer
    if not lm.lm_checkpoint or lm.config_file or lm.config or PRETRAINED.get(lm.pretrained_model_name or ""):
        return
    path = Path(lm.lm_checkpoint).expanduser()
    for describe in (_from_mega_run, _from_archive, _from_nemo, _from_huggingface):
        if describe(path, lm, tok, plugins):
            return
    raise ConfigError(f"model.language_model.config: {lm.lm_checkpoint} does not describe its encoder (a Megatron-LM "
                      "checkpoint or NGC zip); set model.language_model.config_file=<a JSON of its Megatron arguments: "
                      "hidden-size, num-layers, num-attention-heads, max-seq-length, ...> or model.language_model.config."
                      "{num_layers,hidden_size,num_attention_heads,ffn_hidden_size,max_position_embeddings}, or "
                      "model.language_model.pretrained_model_name (megatron-bert-345m-uncased, ...)")


def _from_mega_run(path: Path, lm, tok, plugins=None) -> bool:
    from mega.config import load_raw
    from mega.checkpoint import resolve_checkpoint

    if not path.is_dir():
        return False
    try:
        ckpt = resolve_checkpoint(path)
    except CheckpointError:
        return False  # another tool's layout
    model = load_raw(ckpt / "config.toml").get("model", {})
    _saved_model(model, lm.lm_checkpoint, plugins)
    lm.config = _arch_of(model)
    saved_tok = model.get("tokenizer", {})
    if getattr(tok, "library", None) == saved_tok.get("library") == "wordpiece" and not getattr(tok, "vocab_file", None):
        vocab = ckpt / str(saved_tok.get("vocab_file", ""))
        if saved_tok.get("vocab_file") and vocab.is_file():
            tok.vocab_file = str(vocab)
            if getattr(tok, "do_lower_case", 0) is None and saved_tok.get("do_lower_case") is not None:
                tok.do_lower_case = saved_tok["do_lower_case"]
            if "tokenizer_name" in saved_tok:
                tok.tokenizer_name = saved_tok["tokenizer_name"]
    return True


def _arch_of(model: Dict[str, Any]) -> Dict[str, Any]:
    """The encoder keys of a saved `model` table: a pretrained BERT's own keys, or a
    fine-tuned task's `language_model` (its config_file when still there, else its
    config, else its pretrained name's)."""
    lm = model.get("language_model")
    if isinstance(lm, dict):
        if lm.get("config_file") and Path(lm["config_file"]).expanduser().is_file():
            return {k: v for k, v in read_config_file(Path(lm["config_file"]).expanduser()).items() if k in ARCH_KEYS}
        arch = {k: v for k, v in (lm.get("config") or {}).items() if k in ARCH_KEYS}
        known = PRETRAINED.get(lm.get("pretrained_model_name") or "")
        return arch or (dict(known.arch) if known is not None and known.arch else {})
    return {k: model[k] for k in ARCH_KEYS if k in model}


def _from_archive(path: Path, lm, tok, plugins=None) -> bool:
    """A `.mega` archive's config.toml member (read without unpacking the weights); its
    vocabulary is a member too, so the tokenizer's vocab_file must be set (the error of an
    unset one names the key)."""
    import tarfile
    import tomllib

    if not path.is_file():
        return False
    try:
        with tarfile.open(path, "r:") as tar:
            member = tar.extractfile("config.toml")
            raw = tomllib.loads(member.read().decode("utf-8")) if member is not None else None
    except (tarfile.TarError, OSError, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    if raw is None:
        return False
    _saved_model(raw.get("model", {}), lm.lm_checkpoint, plugins)
    lm.config = _arch_of(raw.get("model", {}))
    return True


def _from_nemo(path: Path, lm, tok, plugins=None) -> bool:
    """A NeMo `.nemo` archive: the model table its yaml (and encoder config artifact) gives,
    read without the weights."""
    if not (path.is_file() and path.suffix == ".nemo") or plugins is None:
        return False
    from mega.plugins.checkpoints.nemo import model_table_of

    model = model_table_of(path, plugins)
    _saved_model(model, lm.lm_checkpoint, plugins)
    lm.config = _arch_of(model)
    return True


def _from_huggingface(path: Path, lm, tok, plugins=None) -> bool:
    from mega.plugins.models.bert_interop.huggingface import MODEL_TYPE, architecture_of, mega_model_config
    from mega.plugins.tokenizers.wordpiece_interop import tokenizer_table

    hf = _hf_config(path)
    if hf is None or hf.get("model_type") != MODEL_TYPE:
        return False
    where = str(path / "config.json")
    model = mega_model_config(hf, architecture_of(hf, where), where)
    lm.config = {k: model[k] for k in ARCH_KEYS if k in model}
    if getattr(tok, "library", None) == "wordpiece" and not getattr(tok, "vocab_file", None) and (path / "vocab.txt").is_file():
        table, files = tokenizer_table(path, {})
        tok.vocab_file = str(files["vocab_file"])
        if getattr(tok, "do_lower_case", 0) is None:
            tok.do_lower_case = table["do_lower_case"]
    return True


def _hf_config(path: Path) -> Optional[dict]:
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8")) if path.is_dir() else None
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def check_language_model(config, plugins) -> None:
    """Errors a user can fix before anything runs: a pretrained name's missing files, each
    naming what to fetch and which key to set."""
    lm, tok = config.language_model, config.tokenizer
    known = PRETRAINED.get(lm.pretrained_model_name or "")
    if known is not None and getattr(tok, "library", None) == "wordpiece" and not getattr(tok, "vocab_file", None):
        raise ConfigError(f"model.tokenizer.vocab_file: {lm.pretrained_model_name} uses the vocabulary at {known.vocab_url}; "
                          "download it (nothing is downloaded for you) and set model.tokenizer.vocab_file=<path to it>")
    if known is not None and known.checkpoint_url and not lm.lm_checkpoint:
        raise ConfigError(f"model.language_model.lm_checkpoint: {lm.pretrained_model_name}'s weights are at "
                          f"{known.checkpoint_url}; download them and set model.language_model.lm_checkpoint=<the file, "
                          "or its iter_XXXXXXX / release directory>")
    if lm.lm_checkpoint and not Path(lm.lm_checkpoint).expanduser().exists():
        hint = f" (the weights of {lm.pretrained_model_name} are at {known.checkpoint_url})" if known and known.checkpoint_url else ""
        raise ConfigError(f"model.language_model.lm_checkpoint: {lm.lm_checkpoint} does not exist{hint}")


def tokenizer_defaults(config) -> None:
    """A pretrained name's lower-casing for a wordpiece tokenizer left at its defaults."""
    known = PRETRAINED.get(config.language_model.pretrained_model_name or "")
    tok = config.tokenizer
    if known is not None and getattr(tok, "library", None) == "wordpiece" and getattr(tok, "do_lower_case", 0) is None:
        tok.do_lower_case = known.do_lower_case


# --- weights ------------------------------------------------------------------------------------


def _megatron_file(path: Path) -> Optional[Path]:
    """A bare Megatron `model_optim_rng.pt` (or NGC `MegatronBERT.pt`) wrapped into the
    `release/mp_rank_00/` layout Megatron importers read."""
    if path.is_file() and path.suffix == ".pt":
        return path
    return None


def encoder_state(source, plugins, vocab_file: Optional[str] = None, num_attention_heads: Optional[int] = None):
    """(the `language_model.*` tensors of `source` at this process's tensor-parallel
    layout, the `model` config they were loaded with). A Megatron-LM / NGC file saved
    without `args` (NVIDIA's released 345M zips) takes the run's `num_attention_heads`, the
    one shape its tensors do not tell, as `mega import --option num_attention_heads=N` does."""
    from mega.checkpoint import restore
    from mega.checkpoint import find_importer

    source = Path(source).expanduser()
    scratch = None
    try:
        try:
            model, _, config = restore(source, plugins)
        except (CheckpointError, ConfigError, FileNotFoundError) as first:
            # not a mega checkpoint: through the importer that recognises it
            scratch = Path(tempfile.mkdtemp(prefix="mega-lm-checkpoint-"))
            target = source
            bare = _megatron_file(source)
            if bare is not None:  # release/mp_rank_00/model_optim_rng.pt, as Megatron-LM writes it
                target = scratch / "megatron" / "release"
                (target / "mp_rank_00").mkdir(parents=True)
                (target / "mp_rank_00" / "model_optim_rng.pt").symlink_to(bare.resolve())
                (scratch / "megatron" / "latest_checkpointed_iteration.txt").write_text("release")
                target = scratch / "megatron"
            try:
                fmt = find_importer(target, plugins)
            except Exception:  # noqa: BLE001 - say what was tried
                raise CheckpointError(f"model.language_model.lm_checkpoint: {source} is neither a mega run, checkpoint or "
                                      f"archive ({first}) nor a format `mega import` recognises") from None
            # a Megatron-LM / NGC checkpoint names its vocabulary by a path of the machine it was
            # written on: the run's own vocab.txt stands in for it
            options = {}
            if getattr(fmt, "name", "") == "megatron":
                options = {k: str(v) for k, v in (("vocab_file", vocab_file), ("num_attention_heads", num_attention_heads)) if v}
            ckpt = fmt.import_run(target, scratch / "run", options, plugins)
            model, _, config = restore(ckpt, plugins)
        require_encoder(model.config.name, type(model.config), source)
        state = {k: v for k, v in model.state_dict().items() if k.startswith("language_model.")}
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if not state:
        raise CheckpointError(f"model.language_model.lm_checkpoint: {source} holds no language_model.* weights "
                              "(is it a BERT checkpoint?)")
    return state, model.config


# the encoder keys that must agree with the checkpoint's (shapes, and what changes the outputs)
MATCHING_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "max_position_embeddings",
                 "num_tokentypes", "layernorm_epsilon", "activation")


def _value(cfg, key):
    value = getattr(cfg, key, None)
    if key == "ffn_hidden_size" and value is None:
        return 4 * cfg.hidden_size
    return value


def check_architecture(mine, theirs, source) -> None:
    """A CheckpointError naming each `model.language_model.config` key whose value differs
    from the checkpoint's."""
    wrong = [(k, _value(mine, k), _value(theirs, k)) for k in MATCHING_KEYS
             if hasattr(theirs, k) and _value(theirs, k) is not None and _value(mine, k) != _value(theirs, k)]
    if wrong:
        said = "; ".join(f"model.language_model.config.{k}={a!r} but the checkpoint has {b!r}" for k, a, b in wrong)
        raise CheckpointError(f"model.language_model.lm_checkpoint: {source} is another encoder: {said} (set those keys, "
                              "or model.language_model.config_file, to the checkpoint's values)")


WORD_EMBEDDINGS = "language_model.embedding.word_embeddings.weight"


def _fit_vocabulary_padding(model, own, state) -> None:
    """Megatron-LM pads the vocabulary to a multiple of make_vocab_size_divisible_by x its
    tensor-parallel size, so a checkpoint saved at TP=2 has more padding rows than a TP=1
    fine-tuning run's table (256 against 128 rows for a small vocabulary). The rows past the
    tokenizer's vocabulary are never looked up: in one process the checkpoint's rows are
    taken as far as both tables go (the real ones among them), the rest made zeros.
    Sharded across ranks the rows of each rank differ, so there the shapes must agree
    (the error says which key sets the padding)."""
    from mega.runtime.parallel import current

    mine, theirs = own.get(WORD_EMBEDDINGS), state.get(WORD_EMBEDDINGS)
    if mine is None or theirs is None or mine.shape == theirs.shape or mine.shape[1:] != theirs.shape[1:]:
        return
    vocab = getattr(model, "vocab_size", None)
    if current().tp_size != 1 or vocab is None or min(mine.shape[0], theirs.shape[0]) < vocab:
        return
    rows = min(mine.shape[0], theirs.shape[0])
    fitted = torch.zeros_like(mine)
    fitted[:rows] = theirs[:rows]
    state[WORD_EMBEDDINGS] = fitted
    log.info("%s: the checkpoint's %d rows (vocabulary %d plus padding) fitted to this run's %d",
             WORD_EMBEDDINGS, theirs.shape[0], vocab, mine.shape[0])


def load_encoder(model: torch.nn.Module, source, plugins, vocab_file: Optional[str] = None) -> None:
    """Copy the encoder weights of `source` into `model` (the architecture must be the
    checkpoint's, and every language_model.* tensor of the model must be there with its
    shape; the pooler may be absent)."""
    state, source_config = encoder_state(source, plugins, vocab_file, getattr(model.config, "num_attention_heads", None))
    check_architecture(model.config, source_config, source)
    own = {k: v for k, v in model.state_dict().items() if k.startswith("language_model.")}
    _fit_vocabulary_padding(model, own, state)
    missing = [k for k in own if k not in state and ".pooler." not in k]
    if missing:
        raise CheckpointError(f"model.language_model.lm_checkpoint: {source} lacks {', '.join(missing[:4])}"
                              f"{' ...' if len(missing) > 4 else ''}")
    wrong = [f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        hint = (" (the word embedding's rows follow the vocabulary: is model.tokenizer.vocab_file the checkpoint's? its "
                "padding is model.language_model.config.make_vocab_size_divisible_by="
                f"{getattr(source_config, 'make_vocab_size_divisible_by', '?')} x the tensor-parallel size)"
                if any("word_embeddings" in w for w in wrong) else " (does model.language_model describe the same encoder?)")
        raise CheckpointError(f"model.language_model.lm_checkpoint: {source} has other shapes: {'; '.join(wrong[:3])}{hint}")
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                v.copy_(state[k].to(v.dtype))
    log.info("encoder weights loaded from %s (%d tensors)", source, sum(1 for k in own if k in state))
