"""Megatron-LM's `args` for the `megatron` (and `torch_dist`) checkpoint formats: what mega
writes, the fields Megatron-LM always saves and Hugging Face's converters read.

Every value comes from the experiment's config (and the tokenizer's vocabulary size),
never from a local tensor, so every tensor-parallel rank and pipeline stage writes the
same `args`. This module writes what is the format's: the vocabulary padding, the
parallel layout, precision, the training values, and `mega_model` /
`mega_tokenizer_library` (so mega reads its own files back without guessing). The
architecture fields are the model family's converter's (`MegatronModelConverter.
megatron_args`) and the tokenizer fields its library's (`MegatronTokenizerConverter`).
The kernel hands a format no plugins when it saves a training checkpoint, so they are
the process's (`mega.get_plugins()`) unless given.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Optional

import torch

import mega
from mega.protocols import MegatronModelConverter, MegatronTokenizerConverter
from mega.plugins.checkpoints.converters import model_converter, tokenizer_converter
from mega.plugins.checkpoints.megatron.layout import final_directory
from mega.plugins.models.transformer import padded_vocab_size


def checkpoint_tokenizer_files(config: dict, directory: Path, plugins) -> Dict[str, str]:
    """Where Megatron-LM should find the tokenizer's files of a checkpoint being written to
    `directory`: the copies the kernel puts into it (`tokenizer.<file name>`), by mega config
    key (the `megatron` and `torch_dist` formats' `args`)."""
    tok = config.get("model", {}).get("tokenizer", {})
    converter = tokenizer_converter(plugins, tok.get("library"), MegatronTokenizerConverter) if tok.get("library") else None
    found = converter.megatron_files(tok) if converter is not None else {}
    final = final_directory(directory)
    return {key: str((final / f"tokenizer.{Path(value).name}").absolute()) for key, value in found.items()}


def tokenizer_fields(plugins, tokenizer_table: dict, vocab_size: Optional[int], files: Optional[dict] = None) -> dict:
    """`tokenizer_type` in Megatron-LM's names with the file fields Megatron's tokenizer
    reads (`files`: where the tokenizer's files are, by mega config key), from the
    tokenizer's converter, and mega's own library name (`mega_tokenizer_library`)."""
    library = tokenizer_table.get("library")
    files = {k: (str(v) if v is not None else None) for k, v in (files or {}).items()}
    converter = tokenizer_converter(plugins, library, MegatronTokenizerConverter) if library else None
    fields = {"mega_tokenizer_library": library}
    if converter is None:  # a tokenizer Megatron-LM has no name for: its mega name
        fields["tokenizer_type"] = library
    else:
        fields.update(converter.megatron_fields(tokenizer_table, vocab_size, files))
    return fields


def megatron_args(config: dict, tp: int, pp: int, vocab_size: Optional[int], model_file: Optional[str] = None,
                  padded: Optional[int] = None, files: Optional[dict] = None, plugins=None) -> argparse.Namespace:
    """Megatron-LM's `args` for a mega experiment (`config` as a plain dict) saved at
    tensor/pipeline-parallel sizes (tp, pp). `vocab_size` is the tokenizer's (written as
    `orig_vocab_size`, so exporters can cut the padding); `padded` is used only when the
    vocabulary size is unknown. `files`: where the tokenizer's files will be, by mega config
    key (`model_file` is the sentencepiece model's)."""
    plugins = plugins if plugins is not None else mega.get_plugins()
    files = dict(files or {})
    if model_file is not None:
        files["model"] = model_file
    model = config.get("model", {})
    divisible_by = model.get("make_vocab_size_divisible_by", 128)
    if vocab_size is not None:
        padded = padded_vocab_size(vocab_size, divisible_by, tp)
    family = model_converter(plugins, model["name"], MegatronModelConverter) if model.get("name") else None
    precision = str(config.get("trainer", {}).get("precision", "32"))
    # architecture: the family's (what `--use-checkpoint-args` copies and check_checkpoint_args compares)
    fields = dict(family.megatron_args(model)) if family is not None else {}
    fields.update(  # vocabulary
        padded_vocab_size=padded, orig_vocab_size=vocab_size, make_vocab_size_divisible_by=divisible_by,
        **tokenizer_fields(plugins, model.get("tokenizer", {}), vocab_size, files))
    fields.update(  # parallel layout and training
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        micro_batch_size=model.get("micro_batch_size"), global_batch_size=model.get("global_batch_size"),
        seed=model.get("seed"), fp16=precision.startswith("16"), bf16=precision.startswith("bf16"),
        params_dtype=DTYPES.get(precision, torch.float32), mega_model=model.get("name"), **training_fields(config))
    return argparse.Namespace(**fields)


# trainer.precision -> Megatron's params_dtype (a torch.dtype, which weights_only loading allows)
DTYPES = {"32": torch.float32, "16": torch.float16, "bf16": torch.bfloat16}


def training_fields(config: dict) -> dict:
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
