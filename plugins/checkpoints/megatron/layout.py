"""Megatron-LM's legacy checkpoint layout, whatever the model: where each rank's file is,
how its nested `model` dict reads under mega's flat (Megatron-LM legacy) names, and the
older spellings and QKV orders of earlier checkpoint versions.

    <checkpoints>/latest_checkpointed_iteration.txt      the iteration, as text
    <checkpoints>/iter_0000100/mp_rank_00/model_optim_rng.pt        (TP rank 0)
    <checkpoints>/iter_0000100/mp_rank_01_002/model_optim_rng.pt    (TP 1, PP stage 2)
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional

import torch

from mega.errors import CheckpointError

CHECKPOINT_VERSION = 3.0
FILE = "model_optim_rng.pt"
TRACKER = "latest_checkpointed_iteration.txt"
# Tensor-parallel split of Megatron's parameters (Megatron-LM's legacy layout)
COLUMN = ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
          "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "word_embeddings.weight",
          "word_embeddings_for_head.weight", "lm_head.bias",  # Megatron's LM-head bias is vocabulary-parallel
          "output_layer.weight")  # an untied output layer
# a gated MLP's fc1 (args.swiglu) holds [gate_r; up_r] on rank r: split per half
GATED_FC1 = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")
ROW = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")


def partition_dim(name: str) -> Optional[int]:
    if name.endswith(COLUMN):
        return 0
    if name.endswith(ROW):
        return 1
    return None


def rank_folder(directory: Path, parallel) -> Path:
    tp_rank, pp_rank, pp = (parallel.tp_rank, parallel.pp_rank, parallel.pp_size) if parallel else (0, 0, 1)
    return directory / (f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else ""))


def nest(flat: Dict[str, torch.Tensor], normalization: Optional[str] = None) -> dict:
    """mega's flat names -> Megatron's nested `model` dict. With `normalization = "RMSNorm"`
    the norms are spelled as Megatron-LM's legacy model has spelled them since it has had
    RMSNorm (`input_norm`, `post_attention_norm`, `final_norm`; read back by current_name)."""
    if normalization == "RMSNorm":
        flat = {re.sub(r"(^|\.)(input|post_attention|final)_layernorm\.", r"\1\2_norm.", k): v for k, v in flat.items()}
    out: dict = {}
    for name, t in flat.items():
        parts = name.split(".")
        if parts[0] == "language_model" and parts[1] == "embedding":
            out.setdefault("language_model", {}).setdefault("embedding", {}).setdefault(parts[2], {})[".".join(parts[3:])] = t
        elif parts[0] == "language_model":
            out.setdefault("language_model", {}).setdefault(parts[1], {})[".".join(parts[2:])] = t
        else:  # e.g. word_embeddings_for_head.weight on the last pipeline stage
            out.setdefault(parts[0], {})[".".join(parts[1:])] = t
    encoder = out.get("language_model", {}).get("encoder")
    if encoder:  # the layers first, in order: Hugging Face's converters stop at the first other key
        def layer(key):
            m = re.match(r"layers\.(\d+)\.", key)
            return (0, int(m.group(1))) if m else (1, 0)
        out["language_model"]["encoder"] = dict(sorted(encoder.items(), key=lambda kv: layer(kv[0])))
    return out


def current_name(name: str) -> str:
    """A legacy Megatron name (flat, or an encoder key) in the pre-2023 spelling mega (and
    HF's tools) use: `language_model.transformer.` -> `language_model.encoder.` (before
    2021), `attention.` -> `self_attention.` (before 2021), `input_norm` -> `input_layernorm`
    (Megatron-LM since Sep 2023). Shared with the nemo importer, whose legacy names are these."""
    name = re.sub(r"^language_model\.transformer\.", "language_model.encoder.", name)
    name = re.sub(r"(^|\.)(input|post_attention|post_inter_attention|final)_norm\.", r"\1\2_layernorm.", name)
    return re.sub(r"(^|\.)attention\.", r"\1self_attention.", name)


def flatten(model: dict) -> Dict[str, torch.Tensor]:
    """Megatron's nested `model` dict -> mega's flat names (older checkpoints call the
    encoder `transformer` and self-attention `attention`; those since Sep 2023 say `norm`
    for `layernorm`)."""
    flat = {}
    lm = model.get("language_model", {})
    for module, params in lm.get("embedding", {}).items():
        for key, t in params.items():
            flat[f"language_model.embedding.{module}.{key}"] = t
    encoder = lm.get("encoder", lm.get("transformer", {}))
    for key, t in encoder.items():
        flat[current_name(f"language_model.encoder.{key}")] = t
    for module, params in lm.items():
        if module not in ("embedding", "encoder", "transformer") and isinstance(params, dict):
            for key, t in params.items():  # e.g. output_layer of an untied model: refused by name later
                flat[f"language_model.{module}.{key}"] = t
    for key, value in model.items():
        if key != "language_model" and isinstance(value, dict):
            for sub, t in value.items():
                if key == "lm_head":  # an LM head says `norm` since Sep 2023 too
                    sub = re.sub(r"^norm\.", "layernorm.", sub)
                flat[f"{key}.{sub}"] = t
    return flat


def qkv_to_current(t: torch.Tensor, version: float, heads: int) -> torch.Tensor:
    """Reorder fused QKV rows of an older checkpoint_version to [heads, 3, head_dim]."""
    if version >= 2.0:
        return t
    rest = t.shape[1:]
    head_dim = t.shape[0] // (3 * heads)
    if version == 0:
        t = t.view(3, heads, head_dim, *rest).transpose(0, 1)
    else:  # 1.0: [heads, head_dim, 3]
        t = t.view(heads, head_dim, 3, *rest).transpose(1, 2)
    return t.reshape(3 * heads * head_dim, *rest).contiguous()


def final_directory(directory: Path) -> Path:
    """Where the checkpoint being written will live (the kernel writes into `.tmp-<name>`
    and renames it into place)."""
    return directory.with_name(directory.name[len(".tmp-"):]) if directory.name.startswith(".tmp-") else directory


def find_rank_file(directory: Path, tp_rank: int, pp_rank: int, pp: int) -> Optional[Path]:
    """A rank's file under Megatron-LM's names: `mp_rank_XX` (PP=1) or `mp_rank_XX_YYY`,
    probing both as Megatron does; `model_optim_rng.pt`, or `model_rng.pt` when the
    optimizer state was saved apart."""
    folders = [f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"] + ([f"mp_rank_{tp_rank:02d}"] if pp == 1 else [])
    if pp == 1:
        folders.reverse()
    for folder in folders:
        for name in (FILE, "model_rng.pt"):
            if (directory / folder / name).is_file():
                return directory / folder / name
    return None


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


def state_from_raw(raw: dict, name: str, pp_rank: int = 0, parts=("model", "optimizer", "trainer", "sharding")) -> dict:
    """One rank's file as the kernel's checkpoint state: the model under mega's names
    (QKV rows of checkpoint versions < 2.0 reordered), the trainer step, and a sharding
    record built from `args` when mega did not write one. What a model family cannot run
    is its converter's to refuse (`family.family_of`), not this layout's."""
    if not isinstance(raw, dict) or "model" not in raw:
        if isinstance(raw, dict) and any(k.startswith("model") and k[5:].isdigit() for k in raw):
            raise CheckpointError(f"{name}: holds virtual-pipeline chunks (model0, model1, ...); mega cannot load them")
        raise CheckpointError(f"{name}: has no 'model' entry; not a Megatron-LM checkpoint")
    args = raw.get("args")
    version = float(raw.get("checkpoint_version", 0))
    model = flatten(raw["model"])
    tp = tp_size(args) if args is not None else 1
    pp = pp_size(args) if args is not None else 1
    if version < 2.0:
        if args is None:
            raise CheckpointError(f"{name}: checkpoint_version {version} needs args.num_attention_heads to reorder QKV")
        heads = args.num_attention_heads // tp
        model = {k: qkv_to_current(t, version, heads) if "query_key_value" in k else t for k, t in model.items()}
    if pp == 1:  # Hugging Face's converter writes the tied head's copy even without pipeline stages
        model.pop("word_embeddings_for_head.weight", None)
    ours = raw.get("mega") or {}
    state = {"model": model}
    if "optimizer" in parts and raw.get("optimizer") is not None and ours:
        state["optimizer"] = raw["optimizer"]
    state["trainer"] = ours.get("trainer") or {"step": int(raw.get("iteration", 0))}
    # Megatron numbers layers per stage; its stages hold equal shares of num_layers.
    offset = pp_rank * (args.num_layers // pp) if args is not None and getattr(args, "num_layers", None) else 0
    state["sharding"] = ours.get("sharding") or {
        "tp_size": tp, "pp_size": pp, "layer_offset": offset,
        "aliases": {"word_embeddings_for_head.weight": "language_model.embedding.word_embeddings.weight"},
        "partition_dims": {k: partition_dim(k) for k in model}, "global_shapes": {},
        "partition_chunks": {k: 2 for k in model if k.endswith(GATED_FC1)} if getattr(args, "swiglu", False) else {},
    }
    return state
