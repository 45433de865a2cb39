"""The `megatron` checkpoint format: Megatron-LM's legacy ("torch") layout, so tools
built for Megatron-LM checkpoints read ours and we read theirs.

    <checkpoints>/latest_checkpointed_iteration.txt      the iteration, as text
    <checkpoints>/iter_0000100/mp_rank_00/model_optim_rng.pt        (TP rank 0)
    <checkpoints>/iter_0000100/mp_rank_01_002/model_optim_rng.pt    (TP 1, PP stage 2)

`model_optim_rng.pt` holds `args` (an argparse.Namespace), `checkpoint_version` (3.0),
`iteration`, `model` (`language_model` -> `embedding` / `encoder` with Megatron's key
names), `optimizer`, `opt_param_scheduler` and `rng_state`; mega's own resume state rides
along under `mega`. Reading converts the fused QKV rows of checkpoint versions 0 and 1.0
to the per-head [heads, 3, head_dim] order used since 2.0.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict, Optional

import torch

import mega
from mega.errors import CheckpointError

CHECKPOINT_VERSION = 3.0
FILE = "model_optim_rng.pt"
TRACKER = "latest_checkpointed_iteration.txt"
# Tensor-parallel split of Megatron's parameters (Megatron-LM's legacy layout)
COLUMN = ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
          "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "word_embeddings.weight",
          "word_embeddings_for_head.weight")
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


def nest(flat: Dict[str, torch.Tensor]) -> dict:
    """mega's flat names -> Megatron's nested `model` dict."""
    out: dict = {}
    for name, t in flat.items():
        parts = name.split(".")
        if parts[0] == "language_model" and parts[1] == "embedding":
            out.setdefault("language_model", {}).setdefault("embedding", {}).setdefault(parts[2], {})[".".join(parts[3:])] = t
        elif parts[0] == "language_model":
            out.setdefault("language_model", {}).setdefault(parts[1], {})[".".join(parts[2:])] = t
        else:  # e.g. word_embeddings_for_head.weight on the last pipeline stage
            out.setdefault(parts[0], {})[".".join(parts[1:])] = t
    return out


def flatten(model: dict) -> Dict[str, torch.Tensor]:
    """Megatron's nested `model` dict -> mega's flat names (older checkpoints call the
    encoder `transformer`)."""
    flat = {}
    lm = model.get("language_model", {})
    for module, params in lm.get("embedding", {}).items():
        for key, t in params.items():
            flat[f"language_model.embedding.{module}.{key}"] = t
    encoder = lm.get("encoder", lm.get("transformer", {}))
    for key, t in encoder.items():
        flat[f"language_model.encoder.{key}"] = t
    for key, value in model.items():
        if key != "language_model" and isinstance(value, dict):
            for sub, t in value.items():
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


def _args(config: dict, parallel, padded_vocab: int) -> argparse.Namespace:
    model = config.get("model", {})
    return argparse.Namespace(
        num_layers=model.get("num_layers"), hidden_size=model.get("hidden_size"),
        ffn_hidden_size=model.get("ffn_hidden_size") or 4 * (model.get("hidden_size") or 0),
        num_attention_heads=model.get("num_attention_heads"),
        max_position_embeddings=model.get("max_position_embeddings") or model.get("seq_length"),
        seq_length=model.get("seq_length"), padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=model.get("make_vocab_size_divisible_by"),
        tokenizer_type=model.get("tokenizer", {}).get("library"),
        tensor_model_parallel_size=parallel.tp_size if parallel else 1,
        pipeline_model_parallel_size=parallel.pp_size if parallel else 1,
        micro_batch_size=model.get("micro_batch_size"), global_batch_size=model.get("global_batch_size"),
        seed=model.get("seed"), untie_embeddings_and_output_weights=False, position_embedding_type="learned_absolute",
    )


class MegatronFormat:
    name = "megatron"

    def directory_name(self, step: int) -> str:
        return f"iter_{step:07d}"

    def after_commit(self, root: Path, final: Path, step: int) -> None:
        tmp = root / f".{TRACKER}.tmp{os.getpid()}"
        tmp.write_text(f"{step}\n")
        os.replace(tmp, root / TRACKER)

    def save(self, state: dict, directory: Path, parallel=None) -> None:
        folder = rank_folder(directory, parallel)
        folder.mkdir(parents=True, exist_ok=True)
        model = state["model"]
        word = next((t for k, t in model.items() if k.endswith("word_embeddings.weight")), None)
        padded = word.shape[0] * (parallel.tp_size if parallel else 1) if word is not None else None
        trainer = state.get("trainer", {})
        rng = trainer.get("rng", {})
        torch.save({
            "args": _args(state.get("config", {}), parallel, padded),
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": trainer.get("step", 0),
            "model": nest(model),
            "optimizer": state.get("optimizer"),
            "opt_param_scheduler": {"num_steps": trainer.get("consumed_samples", 0)},
            "rng_state": [{
                "random_rng_state": rng.get("python"), "np_rng_state": rng.get("numpy"),
                "torch_rng_state": rng.get("torch"), "cuda_rng_state": rng.get("cuda"),
                "rng_tracker_states": rng.get("rng_tracker_states"),
            }],
            "mega": {"trainer": trainer, "sharding": state.get("sharding")},
        }, folder / FILE)

    def load(self, directory: Path, parallel=None, parts=("model", "optimizer", "trainer", "sharding")) -> dict:
        path = rank_folder(directory, parallel) / FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        torch.serialization.add_safe_globals([argparse.Namespace])
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot be read as a Megatron checkpoint ({type(exc).__name__}: {exc})") from None
        if "model" not in raw:
            raise CheckpointError(f"{path}: has no 'model' entry; not a Megatron-LM checkpoint")
        args = raw.get("args")
        version = float(raw.get("checkpoint_version", 0))
        model = flatten(raw["model"])
        if version < 2.0:
            if args is None:
                raise CheckpointError(f"{path}: checkpoint_version {version} needs args.num_attention_heads to reorder QKV")
            heads = args.num_attention_heads // getattr(args, "tensor_model_parallel_size", 1)
            model = {k: qkv_to_current(t, version, heads) if "query_key_value" in k else t for k, t in model.items()}
        ours = raw.get("mega") or {}
        state = {"model": model}
        if "optimizer" in parts and raw.get("optimizer") is not None and ours:
            state["optimizer"] = raw["optimizer"]
        state["trainer"] = ours.get("trainer") or {"step": int(raw.get("iteration", 0))}
        tp = getattr(args, "tensor_model_parallel_size", 1) if args is not None else 1
        pp = getattr(args, "pipeline_model_parallel_size", 1) if args is not None else 1
        pp_rank = parallel.pp_rank if parallel is not None else 0
        # Megatron numbers layers per stage; its stages hold equal shares of num_layers.
        offset = pp_rank * (args.num_layers // pp) if args is not None and getattr(args, "num_layers", None) else 0
        state["sharding"] = ours.get("sharding") or {
            "tp_size": tp, "pp_size": pp, "layer_offset": offset,
            "aliases": {"word_embeddings_for_head.weight": "language_model.embedding.word_embeddings.weight"},
            "partition_dims": {k: partition_dim(k) for k in model}, "global_shapes": {},
        }
        return state


@mega.hookimpl
def register_checkpoint_formats(register):
    register("megatron", MegatronFormat)
