"""Megatron-LM's `args` for the `megatron` checkpoint format: what mega writes (the fields
Megatron-LM always saves and Hugging Face's converters read), reading `model_optim_rng.pt`
safely, and refusing a checkpoint whose architecture mega's GPT cannot run.

Every value written comes from the experiment's config (and the tokenizer's vocabulary
size), never from a local tensor, so every tensor-parallel rank and pipeline stage writes
the same `args`.
"""
from __future__ import annotations

import argparse
import io
import pathlib
import pickle
import types
from pathlib import Path
from typing import Any, List, Optional

import torch

from mega.errors import CheckpointError
from mega.checkpoint.load_errors import describe
from mega.plugins.models.transformer import padded_vocab_size

# Megatron-LM's tokenizer names for mega's tokenizer libraries. `bytes` maps to Megatron's
# NullTokenizer with `vocab_size=257`: it has 257 + 1 ids and its end-of-document id is 257,
# which is the byte tokenizer's eos (its text interface, space-separated ids, differs).
SENTENCEPIECE_TYPES = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer")
NULL_TOKENIZER = "NullTokenizer"


def _safe_globals() -> list:
    """What `args` and Megatron's RNG states may contain, allow-listed for weights_only
    loading (Megatron-LM's own list, less its enums): Namespace (Megatron-LM),
    SimpleNamespace (Hugging Face's converter), paths and numpy arrays."""
    allowed: List[Any] = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, pathlib.WindowsPath]
    try:
        import numpy as np

        allowed += [np.ndarray, np.dtype, np.dtypes.UInt32DType]
        try:
            from numpy.core.multiarray import _reconstruct  # noqa: PLC0415
        except ImportError:  # numpy >= 2 moved it (the old path still imports with a warning)
            from numpy._core.multiarray import _reconstruct
        allowed.append(_reconstruct)
    except (ImportError, AttributeError):
        pass
    return allowed


def load_file(source, name: str, trust_pickle: bool = False) -> dict:
    """torch.load of a `model_optim_rng.pt` (a path or a binary file object) with
    weights_only and the allow-list above. Any other global is refused with its name; only
    `trust_pickle` (an explicit opt-in) loads it with full unpickling."""
    if not isinstance(source, (str, Path)):
        source = io.BytesIO(source.read())  # a zip member: seekable, readable twice
    if trust_pickle:
        return torch.load(source, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if hasattr(source, "seek"):
            source.seek(0)
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
        except Exception:  # noqa: BLE001 - only for the message
            unsafe = []
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in _safe_globals()}
        unsafe = [g for g in unsafe if g not in allowed]
        if not unsafe:
            raise CheckpointError(f"{name}: cannot be read as a Megatron checkpoint: {describe(exc)}") from None
        if all(g.startswith(MEGATRON_MODULES) for g in unsafe):
            if hasattr(source, "seek"):
                source.seek(0)
            return _load_with_stubs(source, name, unsafe)
        raise CheckpointError(
            f"{name}: holds Python objects that are not plain data ({', '.join(unsafe)}); mega loads Megatron files"
            " with torch.load(weights_only=True) and allows only argparse.Namespace, types.SimpleNamespace, paths and"
            " numpy arrays. If you trust where the file came from, import it with --option trust_pickle=true") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{name}: cannot be read as a Megatron checkpoint: {describe(exc)}") from None


# Megatron-LM's own classes that `args` of its older files hold (enums such as
# megatron.model.enums.AttnMaskType, dataclasses): read as inert stand-ins, never imported
MEGATRON_MODULES = ("megatron.",)


class MegatronStandIn:
    """Stands for an object of a Megatron-LM class found in `args` (an enum member, a
    config dataclass): it keeps the pickled value or fields and runs no code of its own.
    mega reads only plain fields of `args`, so these are never consulted."""

    def __init__(self, *args, **kwargs):
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def __repr__(self) -> str:
        return f"<{self.__module__}.{type(self).__qualname__} stand-in {self.__dict__}>"


def _load_with_stubs(source, name: str, unsafe: List[str]) -> dict:
    """weights_only loading with each Megatron-LM class allowed as a stand-in subclass of
    MegatronStandIn (torch.serialization's `(class, "module.Name")` allow-list entries)."""
    stubs = []
    for full in unsafe:
        module, _, qualname = full.rpartition(".")
        stubs.append((type(qualname, (MegatronStandIn,), {"__module__": module}), full))
    try:
        with torch.serialization.safe_globals(_safe_globals() + stubs):
            return torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, OSError, RuntimeError, EOFError, TypeError) as exc:
        raise CheckpointError(f"{name}: holds Megatron-LM objects ({', '.join(unsafe)}) that cannot be read as plain"
                              f" data ({describe(exc)}); if you trust where the file came from, import it"
                              " with --option trust_pickle=true in an environment where megatron is importable") from None


# mega tokenizer keys naming files, and the Megatron-LM `args` field each travels in
FILE_KEYS = ("model", "tokenizer_file", "vocab_file", "merges_file")
GPT2_BPE = "GPT2BPETokenizer"
HF_TOKENIZER = "HuggingFaceTokenizer"


def tokenizer_files(tokenizer_config: dict) -> dict:
    """The tokenizer files a config's tokenizer travels with, by config key, as the
    tokenizer's `artifacts()` name them: the sentencepiece `model`; for `huggingface` its
    `tokenizer_file` (which takes precedence) or `vocab_file` + `merges_file`."""
    tok = tokenizer_config or {}
    library = tok.get("library")
    if library == "sentencepiece":
        return {"model": tok["model"]} if tok.get("model") else {}
    if library == "wordpiece":
        return {"vocab_file": tok["vocab_file"]} if tok.get("vocab_file") else {}
    if library == "huggingface":
        if tok.get("tokenizer_file"):
            return {"tokenizer_file": tok["tokenizer_file"]}
        if tok.get("vocab_file") and tok.get("merges_file"):
            return {"vocab_file": tok["vocab_file"], "merges_file": tok["merges_file"]}
    return {}


def tokenizer_fields(tokenizer_config: dict, vocab_size: Optional[int], files: Optional[dict] = None) -> dict:
    """`tokenizer_type` in Megatron-LM's names with the file fields Megatron's tokenizer
    reads (`files`: where the tokenizer's files are, by mega config key), and mega's own
    library name (`mega_tokenizer_library`; `mega_tokenizer` keeps the huggingface
    tokenizer's special-token names)."""
    library = tokenizer_config.get("library")
    files = {k: (str(v) if v is not None else None) for k, v in (files or {}).items()}
    fields: dict = {"mega_tokenizer_library": library}
    if library == "sentencepiece":
        fields.update(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=files.get("model"))
    elif library == "wordpiece":  # BERT's vocab.txt, Megatron-LM's BertWordPiece tokenizers
        from mega.plugins.tokenizers.wordpiece import TOKENIZER_NAMES

        lower = tokenizer_config.get("do_lower_case")
        lower = TOKENIZER_NAMES.get(tokenizer_config.get("tokenizer_name"), True) if lower is None else lower
        fields.update(tokenizer_type="BertWordPieceLowerCase" if lower else "BertWordPieceCase",
                      vocab_file=files.get("vocab_file"))
    elif library == "bytes":
        fields.update(tokenizer_type=NULL_TOKENIZER, vocab_size=(vocab_size - 1) if vocab_size else None)
    elif library == "huggingface":
        if files.get("tokenizer_file") or (not files.get("vocab_file") and tokenizer_config.get("tokenizer_file")):
            fields.update(tokenizer_type=HF_TOKENIZER, tokenizer_model=files.get("tokenizer_file"))
        else:  # GPT-2's vocab.json + merges.txt: Megatron's GPT2BPETokenizer reads the same two files
            fields.update(tokenizer_type=GPT2_BPE, vocab_file=files.get("vocab_file"), merge_file=files.get("merges_file"))
        special = {k: tokenizer_config[k] for k in ("eos_token", "pad_token") if tokenizer_config.get(k) is not None}
        if special:
            fields["mega_tokenizer"] = special
    else:
        fields.update(tokenizer_type=library)
    return fields


def megatron_args(config: dict, tp: int, pp: int, vocab_size: Optional[int], model_file: Optional[str] = None,
                  padded: Optional[int] = None, files: Optional[dict] = None) -> argparse.Namespace:
    """Megatron-LM's `args` for a mega GPT experiment (`config` as a plain dict) saved at
    tensor/pipeline-parallel sizes (tp, pp). `vocab_size` is the tokenizer's (written as
    `orig_vocab_size`, so exporters can cut the padding); `padded` is used only when the
    vocabulary size is unknown. `files`: where the tokenizer's files will be, by mega config
    key (`model_file` is the sentencepiece model's)."""
    files = dict(files or {})
    if model_file is not None:
        files["model"] = model_file
    model = config.get("model", {})
    hidden, heads = model.get("hidden_size"), model.get("num_attention_heads")
    divisible_by = model.get("make_vocab_size_divisible_by", 128)
    activation = model.get("activation", "gelu")
    if vocab_size is not None:
        padded = padded_vocab_size(vocab_size, divisible_by, tp)
    trainer = config.get("trainer", {})
    precision = str(trainer.get("precision", "32"))
    training = _training_fields(config)
    args = argparse.Namespace(
        # architecture (what `--use-checkpoint-args` copies and check_checkpoint_args compares)
        num_layers=model.get("num_layers"), hidden_size=hidden,
        ffn_hidden_size=model.get("ffn_hidden_size") or (4 * hidden if hidden else None),
        num_attention_heads=heads, kv_channels=hidden // heads if hidden and heads else None,
        group_query_attention=False, num_query_groups=heads,
        max_position_embeddings=model.get("max_position_embeddings") or model.get("seq_length"),
        seq_length=model.get("seq_length"),
        position_embedding_type="learned_absolute", add_position_embedding=True,
        untie_embeddings_and_output_weights=False, add_bias_linear=True, add_qkv_bias=False,
        swiglu=False, squared_relu=False, normalization="LayerNorm", apply_layernorm_1p=False,
        apply_residual_connection_post_layernorm=False, layernorm_epsilon=model.get("layernorm_epsilon", 1e-5),
        # activation: mega's "gelu_tanh" is Megatron's openai_gelu (HF: gelu_new); "gelu" is erf
        bias_gelu_fusion=False, openai_gelu=activation == "gelu_tanh",
        hidden_dropout=model.get("hidden_dropout"), attention_dropout=model.get("attention_dropout"),
        init_method_std=model.get("init_method_std"),
        # vocabulary
        padded_vocab_size=padded, orig_vocab_size=vocab_size, make_vocab_size_divisible_by=divisible_by,
        **tokenizer_fields(model.get("tokenizer", {}), vocab_size, files),
        # parallel layout and training
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        micro_batch_size=model.get("micro_batch_size"), global_batch_size=model.get("global_batch_size"),
        seed=model.get("seed"), fp16=precision.startswith("16"), bf16=precision.startswith("bf16"),
        params_dtype=_DTYPES.get(precision, torch.float32),
        **training,
    )
    if str(model.get("name", "")).startswith("bert"):  # Megatron-BERT's own fields (and its GeLU flags)
        from mega.plugins.checkpoints.megatron_bert import bert_args

        vars(args).update(bert_args(model))
    return args


# trainer.precision -> Megatron's params_dtype (a torch.dtype, which weights_only loading allows)
_DTYPES = {"32": torch.float32, "16": torch.float16, "bf16": torch.bfloat16}


def _training_fields(config: dict) -> dict:
    """The optimizer, schedule, loss-scaling and data values Megatron-LM keeps in `args`,
    under its names, from whatever of them the config holds (a key the config lacks is
    left out rather than guessed)."""
    trainer, model = config.get("trainer", {}), config.get("model", {})
    optim = model.get("optim", {}) or {}
    sched = optim.get("sched", {}) or {}
    data = model.get("data", {}) or {}
    fields = {
        "train_iters": trainer.get("max_steps"), "clip_grad": trainer.get("gradient_clip_val"),
        "lr": optim.get("lr"), "weight_decay": optim.get("weight_decay"),
        "min_lr": sched.get("min_lr"), "lr_warmup_iters": sched.get("warmup_steps"),
        "lr_decay_style": sched.get("name"), "lr_decay_iters": sched.get("decay_steps"),
        "initial_loss_scale": model.get("native_amp_init_scale"),
        "loss_scale_window": model.get("native_amp_growth_interval"), "hysteresis": model.get("hysteresis"),
        "split": data.get("splits_string"), "data_path": list(data["data_prefix"]) if data.get("data_prefix") else None,
    }
    if optim.get("name") == "adamw":  # Megatron's `adam` is AdamW (decoupled weight decay)
        betas = optim.get("betas") or []
        fields.update(optimizer="adam", adam_eps=optim.get("eps"),
                      adam_beta1=betas[0] if len(betas) == 2 else None, adam_beta2=betas[1] if len(betas) == 2 else None)
    return {k: v for k, v in fields.items() if v is not None}


# args fields whose values mega's GPT cannot honour: field -> (acceptable values, what it means)
_UNSUPPORTED = (
    ("swiglu", (None, False), "SwiGLU MLP"),
    ("squared_relu", (None, False), "squared-ReLU MLP"),
    ("position_embedding_type", (None, "learned_absolute"), "position embeddings other than learned absolute"),
    ("add_position_embedding", (None, True), "no position embeddings"),
    ("use_rotary_position_embeddings", (None, False), "rotary position embeddings"),
    ("normalization", (None, "LayerNorm"), "a normalization other than LayerNorm"),
    ("apply_layernorm_1p", (None, False), "LayerNorm with 1 + weight"),
    ("untie_embeddings_and_output_weights", (None, False), "an output layer untied from the word embeddings"),
    ("group_query_attention", (None, False), "group-query attention"),
    ("add_bias_linear", (None, True), "linear layers without biases"),
    ("apply_residual_connection_post_layernorm", (None, False), "residual connections after the LayerNorm"),
    ("num_experts", (None, 0, 1), "mixture of experts"),
    ("num_layers_per_virtual_pipeline_stage", (None,), "virtual pipeline stages (model0, model1, ...)"),
    ("virtual_pipeline_model_parallel_size", (None, 1), "virtual pipeline stages (model0, model1, ...)"),
    ("expert_model_parallel_size", (None, 1), "expert parallelism"),
)


def check_supported(args, name: str) -> None:
    """Refuse, naming the field, an `args` whose architecture mega's GPT would run wrong."""
    if args is None:
        return
    for field, ok, what in _UNSUPPORTED:
        value = getattr(args, field, None)
        if value not in ok:
            raise CheckpointError(f"{name}: args.{field}={value!r} ({what}); mega's GPT cannot run this architecture")
    hidden, heads = getattr(args, "hidden_size", None), getattr(args, "num_attention_heads", None)
    groups = getattr(args, "num_query_groups", None)
    if groups not in (None, heads) and getattr(args, "group_query_attention", False):
        raise CheckpointError(f"{name}: args.num_query_groups={groups} (group-query attention); mega's GPT cannot run it")
    kv = getattr(args, "kv_channels", None)
    if kv is not None and hidden and heads and kv != hidden // heads:
        raise CheckpointError(f"{name}: args.kv_channels={kv} differs from hidden_size / num_attention_heads ="
                              f" {hidden // heads}; mega's GPT cannot run it")


def tp_size(args) -> int:
    """The tensor-parallel size an `args` was saved at: `tensor_model_parallel_size`, or
    `model_parallel_size` in files older than checkpoint_version 3.0 (Megatron-LM before
    pipeline parallelism named it so), else 1."""
    for field in ("tensor_model_parallel_size", "model_parallel_size"):
        value = getattr(args, field, None)
        if value:
            return int(value)
    return 1


def pp_size(args) -> int:
    return int(getattr(args, "pipeline_model_parallel_size", None) or 1)


def activation_of(args) -> str:
    """mega's `activation` for Megatron's flags: its fused bias-GELU and openai_gelu are the
    tanh approximation, else exact GELU."""
    return "gelu_tanh" if getattr(args, "openai_gelu", False) or getattr(args, "bias_gelu_fusion", False) else "gelu"
