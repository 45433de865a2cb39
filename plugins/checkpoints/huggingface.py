"""The `huggingface` checkpoint format: GPT-2 and Megatron-BERT model directories of
Hugging Face transformers, read by `mega import` and written by `mega export --to
huggingface` (or `--to hf`). Megatron-BERT (`model_type = "megatron-bert"`, mega's `bert*`
models, the eight MegatronBert* classes) has its mapping in huggingface_bert.py; the rest
of this docstring is GPT-2's.

A model directory is `config.json` (`model_type = "gpt2"`) with its weights in
`model.safetensors`, sharded safetensors with `model.safetensors.index.json`, or
`pytorch_model*.bin` (read with `torch.load(weights_only=True)`: no code runs), and its
tokenizer (`tokenizer.json`, or `vocab.json` + `merges.txt`).

GPT-2 is the same network as mega's `gpt` model, so the mapping is exact:

    transformer.wte / wpe                 language_model.embedding.word_embeddings / position_embeddings
    transformer.h.N.ln_1 / ln_2           language_model.encoder.layers.N.input_layernorm / post_attention_layernorm
    transformer.h.N.attn.c_attn           ...self_attention.query_key_value
    transformer.h.N.attn.c_proj           ...self_attention.dense
    transformer.h.N.mlp.c_fc / c_proj     ...mlp.dense_h_to_4h / dense_4h_to_h
    transformer.ln_f                      language_model.encoder.final_layernorm
    lm_head (tied to wte)                 the word embedding (mega's output layer is tied)

GPT-2's `Conv1D` weights are [in, out], the transpose of a Linear's; `c_attn` holds a Q
block, a K block and a V block, mega's fused QKV rows are per head ([heads, 3, head_dim]).
The word embedding is padded to mega's vocabulary rule with zero rows on import, and cut
back to the tokenizer's vocabulary on export. `attn.bias` / `attn.masked_bias` (causal
mask buffers old files carry) are dropped.

This format only converts; it does not hold training checkpoints (`save`/`load` refuse).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

import mega
from mega.checkpoint import atomic_directory, check_options
from mega.errors import CheckpointError, ConfigError
from mega.checkpoint.load_errors import describe
from mega.plugins.checkpoints import huggingface_bert as bert
from mega.runtime.sharding import fit

log = logging.getLogger("mega.checkpoints.huggingface")

# GPT-2's activation_function -> mega's model.activation
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
EXPORT_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
IMPORT_OPTIONS = ("tokenizer_file", "vocab_file", "merges_file", "eos_token", "make_vocab_size_divisible_by", "seq_length")
EXPORT_OPTIONS = ("dtype",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# HF name inside a block -> mega name inside a layer (Conv1D weights are transposed)
LAYER_KEYS = {
    "ln_1.weight": "input_layernorm.weight", "ln_1.bias": "input_layernorm.bias",
    "attn.c_attn.weight": "self_attention.query_key_value.weight", "attn.c_attn.bias": "self_attention.query_key_value.bias",
    "attn.c_proj.weight": "self_attention.dense.weight", "attn.c_proj.bias": "self_attention.dense.bias",
    "ln_2.weight": "post_attention_layernorm.weight", "ln_2.bias": "post_attention_layernorm.bias",
    "mlp.c_fc.weight": "mlp.dense_h_to_4h.weight", "mlp.c_fc.bias": "mlp.dense_h_to_4h.bias",
    "mlp.c_proj.weight": "mlp.dense_4h_to_h.weight", "mlp.c_proj.bias": "mlp.dense_4h_to_h.bias",
}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TOP_KEYS = {"wpe.weight": "language_model.embedding.position_embeddings.weight",
            "ln_f.weight": "language_model.encoder.final_layernorm.weight",
            "ln_f.bias": "language_model.encoder.final_layernorm.bias"}
WTE = "language_model.embedding.word_embeddings.weight"
LAYER = "language_model.encoder.layers"
BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")
# A tokenizer config key -> the file name transformers looks for
TOKENIZER_FILES = {"tokenizer_file": "tokenizer.json", "vocab_file": "vocab.json", "merges_file": "merges.txt"}


# --- the fused QKV: GPT-2's [Q | K | V] blocks <-> mega's per-head [heads, 3, head_dim] rows ------


def qkv_blocks_to_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (dim 0) ordered Q block, K block, V block -> per head (q, k, v): Megatron's
    checkpoint_version 0 layout, which GPT-2's c_attn has."""
    from mega.plugins.checkpoints.megatron import qkv_to_current

    return qkv_to_current(t, 0, heads)


def qkv_heads_to_blocks(t: torch.Tensor, heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


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


def _read_weights(source: Path) -> Dict[str, torch.Tensor]:
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


def _read_config(source: Path) -> dict:
    try:
        return json.loads((source / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source / 'config.json'}: cannot be read ({type(exc).__name__}: {exc})") from None


def mega_model_config(hf: dict, where: str) -> dict:
    """`model.*` of mega's gpt for a GPT2Config (as config.json holds it); refuses what
    mega's GPT cannot compute the same way, by the config.json field."""
    arch = hf.get("architectures") or ["GPT2LMHeadModel"]
    if not set(arch) & set(ARCHITECTURES):
        raise CheckpointError(f"{where}: architectures {arch}: only GPT2LMHeadModel (or GPT2Model) imports into mega's gpt")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{where}: activation_function {act!r} has no mega equivalent"
                              f" (supported: {', '.join(ACTIVATIONS)})")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                    ("tie_word_embeddings", True)):
        if hf.get(key, ok) != ok:
            raise CheckpointError(f"{where}: {key}={hf[key]} is not supported (mega's gpt needs {str(ok).lower()})")
    try:
        n_embd, n_layer, n_head, n_positions = (int(hf[k]) for k in ("n_embd", "n_layer", "n_head", "n_positions"))
    except KeyError as exc:
        raise CheckpointError(f"{where}: has no {exc.args[0]}") from None
    return {
        "name": "gpt",
        "num_layers": n_layer,
        "hidden_size": n_embd,
        "num_attention_heads": n_head,
        "ffn_hidden_size": int(hf.get("n_inner") or 4 * n_embd),
        "max_position_embeddings": n_positions,
        "seq_length": n_positions,
        "layernorm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
        "activation": ACTIVATIONS[act],
        "hidden_dropout": float(hf.get("resid_pdrop", 0.1)),
        "attention_dropout": float(hf.get("attn_pdrop", 0.1)),
        "init_method_std": float(hf.get("initializer_range", 0.02)),
    }


def hf_to_mega(hf_state: Dict[str, torch.Tensor], num_layers: int, heads: int, padded_vocab: int, vocab: int,
               where: str) -> Dict[str, torch.Tensor]:
    """GPT-2 tensors (with or without the `transformer.` prefix) -> mega's names, Conv1D
    transposed, QKV per head, the word embedding padded to `padded_vocab` rows."""
    state = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in hf_state.items()}
    head = state.pop("lm_head.weight", None)
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for name, t in state.items():
        if BUFFERS.search(name):
            continue
        m = re.fullmatch(r"h\.(\d+)\.(.+)", name)
        if m and m.group(2) in LAYER_KEYS and int(m.group(1)) < num_layers:
            sub = m.group(2)
            t = t.t() if sub in CONV1D else t
            if sub.startswith("attn.c_attn."):
                t = qkv_blocks_to_heads(t, heads)
            out[f"{LAYER}.{m.group(1)}.{LAYER_KEYS[sub]}"] = t.contiguous()
        elif name in TOP_KEYS:
            out[TOP_KEYS[name]] = t
        elif name != "wte.weight":
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"{where}: tensors GPT-2 does not have: {', '.join(sorted(unknown)[:8])}")
    if "wte.weight" not in state:
        raise CheckpointError(f"{where}: no word embedding (transformer.wte.weight)")
    wte = state["wte.weight"]
    if head is not None and not torch.equal(head, wte):
        raise CheckpointError(f"{where}: lm_head.weight differs from transformer.wte.weight; mega's gpt ties them")
    rows = wte.shape[0]
    if rows < vocab:
        raise CheckpointError(f"{where}: the word embedding has {rows} rows, the tokenizer {vocab} tokens")
    # rows past the tokenizer's vocabulary are padding either way: cut or zero-filled
    out[WTE] = fit(wte, [padded_vocab, wte.shape[1]])
    return out


def expected_keys(num_layers: int) -> list:
    """mega's gpt tensor names that GPT-2 holds."""
    return [WTE, *TOP_KEYS.values(), *(f"{LAYER}.{i}.{n}" for i in range(num_layers) for n in LAYER_KEYS.values())]


def mega_to_hf(state: Dict[str, torch.Tensor], num_layers: int, heads: int, vocab: int) -> Dict[str, torch.Tensor]:
    """mega's gpt tensors (one process) -> GPT2LMHeadModel's, the word embedding cut to
    the tokenizer's `vocab` rows (lm_head is tied to it, so not written)."""
    back = {v: k for k, v in LAYER_KEYS.items()}
    out: Dict[str, torch.Tensor] = {"transformer.wte.weight": state[WTE][:vocab]}
    for hf_name, name in TOP_KEYS.items():
        out[f"transformer.{hf_name}"] = state[name]
    for i in range(num_layers):
        for name, sub in back.items():
            t = state[f"{LAYER}.{i}.{name}"]
            if sub.startswith("attn.c_attn."):
                t = qkv_heads_to_blocks(t, heads)
            out[f"transformer.h.{i}.{sub}"] = t.t() if sub in CONV1D else t
    return {k: v.detach().contiguous() for k, v in out.items()}


def _tokenizer_files(source: Path, options: Mapping[str, str]) -> Dict[str, Path]:
    named = {k: Path(options[k]).expanduser() for k in TOKENIZER_FILES if options.get(k)}
    for key, path in named.items():
        if not path.is_file():
            raise ConfigError(f"--option {key}={path}: no such file")
    if "tokenizer_file" in named:
        return {"tokenizer_file": named["tokenizer_file"]}
    if named:
        if set(named) != {"vocab_file", "merges_file"}:
            raise ConfigError("--option vocab_file and --option merges_file go together")
        return named
    if (source / "tokenizer.json").is_file():
        return {"tokenizer_file": source / "tokenizer.json"}
    if (source / "vocab.json").is_file() and (source / "merges.txt").is_file():
        return {"vocab_file": source / "vocab.json", "merges_file": source / "merges.txt"}
    raise CheckpointError(f"{source}: no tokenizer.json, nor vocab.json with merges.txt; name the tokenizer with"
                          " --option tokenizer_file=PATH (a tokenizer.json), or --option vocab_file=PATH"
                          " --option merges_file=PATH (GPT-2 BPE)")


class HuggingFaceFormat:
    """Hugging Face transformers' GPT-2 directories; an Importer and an Exporter."""

    name = "huggingface"

    def save(self, state: dict, directory: Path, parallel=None) -> None:
        raise CheckpointError("the huggingface format does not hold training checkpoints; train with"
                              " exp_manager.checkpoint's native or megatron format and use `mega export RUN DEST --to huggingface`")

    def load(self, directory: Path, parallel=None, parts=("model", "optimizer", "trainer", "sharding")) -> dict:
        raise CheckpointError(f"{directory}: a Hugging Face model directory is not a mega checkpoint;"
                              " use `mega import SOURCE RUN_DIR` first")

    # --- import ----------------------------------------------------------------------------
    def can_import(self, source: Path) -> bool:
        source = Path(source)
        if not (source / "config.json").is_file():
            return False
        try:
            model_type = json.loads((source / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return False
        if model_type not in ("gpt2", "megatron-bert"):
            return False
        return any((source / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json",
                                                   "pytorch_model.bin", "pytorch_model.bin.index.json"))

    def import_run(self, source: Path, run_dir: Path, options: Mapping[str, str], plugins) -> Path:
        from mega.checkpoint import write_imported_run
        from mega.plugins.models.transformer import padded_vocab_size
        from mega.plugins.tokenizers.huggingface import HuggingFaceConfig, HuggingFaceTokenizer, special_tokens

        check_options(options, IMPORT_OPTIONS, self.name)
        source = Path(source).expanduser()
        where = str(source / "config.json")
        hf = _read_config(source)
        if hf.get("model_type") == "megatron-bert":
            return self._import_bert(source, run_dir, options, plugins, hf)
        if hf.get("model_type") != "gpt2":
            raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r}; the huggingface format imports gpt2"
                                  " and megatron-bert models")
        model = mega_model_config(hf, where)
        if options.get("seq_length"):
            model["seq_length"] = int(options["seq_length"])
        model["make_vocab_size_divisible_by"] = int(options.get("make_vocab_size_divisible_by", 128))

        files = _tokenizer_files(source, options)
        tok = {"library": "huggingface"}
        eos = options.get("eos_token") or special_tokens(source).get("eos_token")
        probe = HuggingFaceTokenizer(HuggingFaceConfig(**{k: str(v) for k, v in files.items()}))
        vocab_ids = probe.tokenizer.get_vocab(with_added_tokens=True)
        if eos is None and isinstance(hf.get("eos_token_id"), int):
            eos = probe.tokenizer.id_to_token(hf["eos_token_id"])
        if eos is not None and eos in vocab_ids:
            tok["eos_token"] = eos
        elif options.get("eos_token"):
            raise ConfigError(f"--option eos_token={eos}: not in the tokenizer's vocabulary")
        model["tokenizer"] = tok

        padded = padded_vocab_size(probe.vocab_size, model["make_vocab_size_divisible_by"])
        state = hf_to_mega(_read_weights(source), model["num_layers"], model["num_attention_heads"], padded,
                           probe.vocab_size, str(source))
        return write_imported_run(Path(run_dir), {"model": model}, state, plugins, files=files)

    # --- export ----------------------------------------------------------------------------
    def export_run(self, checkpoint: Path, destination: Path, options: Mapping[str, str], plugins) -> Path:
        from mega.checkpoint import restore
        from mega.plugins.models.gpt import GPTModel

        check_options(options, EXPORT_OPTIONS, self.name)
        dtype_name = options.get("dtype", "float32")
        if dtype_name not in DTYPES:
            raise ConfigError(f"--option dtype={dtype_name}: expected one of {', '.join(DTYPES)}")
        destination = Path(destination).expanduser().absolute()
        if destination.exists() and not (destination.is_dir() and not any(destination.iterdir())):
            raise CheckpointError(f"{destination}: already exists; export into a new directory")
        model, tokenizer, config = restore(checkpoint, plugins)
        mc = config.model
        if bert.is_bert(mc.name):
            return self._export_bert(model, tokenizer, mc, destination, dtype_name, checkpoint)
        if not isinstance(model, GPTModel):
            raise CheckpointError(f"{checkpoint}: model {mc.name!r} cannot be written as GPT2LMHeadModel"
                                  " (only mega's gpt model maps onto GPT-2)")
        extra = sorted(set(model.state_dict()) - set(expected_keys(mc.num_layers)))
        if extra:
            raise CheckpointError(f"{checkpoint}: model {mc.name!r} has tensors GPT2LMHeadModel cannot hold:"
                                  f" {', '.join(extra[:8])}")
        if mc.activation not in EXPORT_ACTIVATIONS:
            raise CheckpointError(f"{checkpoint}: model.activation={mc.activation!r} has no GPT-2 activation_function")
        state = mega_to_hf(model.state_dict(), mc.num_layers, mc.num_attention_heads, tokenizer.vocab_size)
        if mc.tokenizer.library == "huggingface":
            write_tokenizer = lambda tmp: self._write_tokenizer(tokenizer, mc, tmp)  # noqa: E731
        else:
            write_tokenizer = None
            log.warning("model.tokenizer.library=%r: transformers cannot read this tokenizer; %s holds the model"
                        " without tokenizer files", mc.tokenizer.library, destination)
        return _write_model_directory(destination, state, gpt2_config(mc, tokenizer, dtype_name), dtype_name,
                                      write_tokenizer)

    # --- Megatron-BERT (huggingface_bert.py holds the mapping) ------------------------------
    def _import_bert(self, source: Path, run_dir: Path, options: Mapping[str, str], plugins, hf: dict) -> Path:
        from mega.checkpoint import write_imported_run
        from mega.plugins.models.transformer import padded_vocab_size

        check_options(options, bert.IMPORT_OPTIONS, self.name)
        where = str(source / "config.json")
        arch = bert.architecture_of(hf, where)
        model = bert.mega_model_config(hf, arch, where)
        if options.get("seq_length"):
            model["seq_length"] = int(options["seq_length"])
        model["make_vocab_size_divisible_by"] = int(options.get("make_vocab_size_divisible_by", 128))
        model["tokenizer"], files = bert.tokenizer_table(source, options)
        vocab = _vocab_size(model, files, plugins)
        padded = padded_vocab_size(vocab, model["make_vocab_size_divisible_by"])
        state = bert.hf_to_mega(_read_weights(source), model["name"], model["num_layers"],
                                model["num_attention_heads"], padded, vocab, str(source))
        return write_imported_run(Path(run_dir), {"model": model}, state, plugins, files=files)

    def _export_bert(self, model, tokenizer, mc, destination: Path, dtype_name: str, checkpoint: Path) -> Path:
        state = bert.mega_to_hf(model.state_dict(), mc.name, mc.num_layers, mc.num_attention_heads, tokenizer.vocab_size)
        if "bert.embeddings.token_type_embeddings.weight" not in state:  # num_tokentypes = 0: HF always adds one
            state["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(1, mc.hidden_size)
        config = bert.hf_config(mc, tokenizer, dtype_name)
        write_tokenizer = None
        if "vocab_file" in tokenizer.artifacts():
            write_tokenizer = lambda tmp: bert.write_tokenizer(tokenizer, mc, tmp)  # noqa: E731
        else:
            log.warning("model.tokenizer.library=%r: not a WordPiece vocabulary; %s holds the model without"
                        " tokenizer files", mc.tokenizer.library, destination)
        return _write_model_directory(destination, state, config, dtype_name, write_tokenizer)

    @staticmethod
    def _write_tokenizer(tokenizer, mc, destination: Path) -> None:
        for key, path in tokenizer.artifacts().items():
            shutil.copyfile(path, destination / TOKENIZER_FILES[key])
        tok = tokenizer.tokenizer
        eos, pad = tok.id_to_token(tokenizer.eos_id), tok.id_to_token(tokenizer.pad_id)
        tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eos, "eos_token": eos, "unk_token": eos,
                            "add_prefix_space": False, "model_max_length": mc.max_position_embeddings or mc.seq_length}
        if tokenizer.pad_id != tokenizer.eos_id:
            tokenizer_config["pad_token"] = pad
        (destination / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _vocab_size(model: dict, files: Mapping[str, Path], plugins) -> int:
    """The vocabulary size of the tokenizer a model table names, built from its files."""
    from mega.config import config_from_dict

    mc = config_from_dict({"model": {"name": model["name"], "tokenizer": {
        **model["tokenizer"], **{k: str(v) for k, v in files.items()}}}}, plugins=plugins).model
    return plugins.tokenizers.get(mc.tokenizer.library, "model.tokenizer.library").factory(mc.tokenizer, [], None).vocab_size


def _write_model_directory(destination: Path, state: Dict[str, torch.Tensor], config: dict, dtype_name: str,
                           write_tokenizer) -> Path:
    """model.safetensors + config.json (+ the tokenizer's files), written beside
    `destination` and renamed into place: a failed export leaves nothing behind."""
    state = {k: v.to(DTYPES[dtype_name]) for k, v in state.items()}
    with atomic_directory(destination) as tmp:
        from safetensors.torch import save_file

        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if write_tokenizer is not None:
            write_tokenizer(tmp)
    return destination


def gpt2_config(mc, tokenizer, dtype_name: str = "float32") -> dict:
    """config.json (GPT2Config's fields) for mega's gpt config `mc`; the vocabulary is the
    tokenizer's (mega's padding rows are not written)."""
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": tokenizer.vocab_size,
        "n_positions": mc.max_position_embeddings or mc.seq_length,
        "n_embd": mc.hidden_size,
        "n_layer": mc.num_layers,
        "n_head": mc.num_attention_heads,
        "n_inner": mc.ffn_hidden_size or 4 * mc.hidden_size,
        "activation_function": EXPORT_ACTIVATIONS[mc.activation],
        "layer_norm_epsilon": mc.layernorm_epsilon,
        "resid_pdrop": mc.hidden_dropout,
        "embd_pdrop": mc.hidden_dropout,
        "attn_pdrop": mc.attention_dropout,
        "initializer_range": mc.init_method_std,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.eos_id,
        "eos_token_id": tokenizer.eos_id,
        "torch_dtype": dtype_name,
    }
    if tokenizer.pad_id != tokenizer.eos_id:
        config["pad_token_id"] = tokenizer.pad_id
    return config


@mega.hookimpl
def register_checkpoint_formats(register):
    register("huggingface", HuggingFaceFormat)
    register("hf", HuggingFaceFormat)  # the short name: `mega export RUN DEST --to hf`
