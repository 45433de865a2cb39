"""Sharded safetensors as transformers writes them (`save_pretrained(max_shard_size=...)`):
`model-00001-of-0000N.safetensors` files and `model.safetensors.index.json` mapping each
tensor to its file, so a 7B+ export is not one 15 GB file and `from_pretrained` reads it.

The split follows transformers' rule: tensors in order, a new shard when the next one would
take the current shard past the limit; a tensor larger than the limit sits alone.
Sizes read as transformers reads them: `5GB` is 5·10⁹ bytes, `5GiB` 5·2³⁰, a bare number
is bytes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List

import torch

from mega.errors import ConfigError

UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
         "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text: str, key: str = "max_shard_size") -> int:
    """Bytes of `5GB`, `500MB`, `2GiB` or `1000000`; a ConfigError naming `key` otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--option {key}={text}: expected a positive size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * UNITS[unit])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def split(state: Dict[str, torch.Tensor], limit: int) -> List[Dict[str, torch.Tensor]]:
    """The tensors of `state`, in order, cut into shards of at most `limit` bytes each
    (a tensor over the limit alone in its shard)."""
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        n = _nbytes(tensor)
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += n
    return shards


def save_sharded(state: Dict[str, torch.Tensor], directory: Path, limit: int) -> List[str]:
    """Writes `state` into `directory` as transformers does: one `model.safetensors` when
    it fits the limit, else numbered shards and their index. Returns the files written."""
    from safetensors.torch import save_file

    shards = split(state, limit)
    if len(shards) == 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        save_file(shard, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update({tensor: file_name for tensor in shard})
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in state.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]
