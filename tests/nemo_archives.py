"""`.nemo` archives built the way NeMo's own save code builds them, for tests; written from
NeMo's code at the releases mega's converters cite, independently of mega's exporter.

* The folder and the tar: `SaveRestoreConnector.save_to` fills a temporary folder with
  `model_config.yaml`, `model_weights.ckpt` and each registered artifact copied as
  `<uuid4().hex>_<file name>` (`_handle_artifacts`), rewrites the yaml's artifact keys to
  `nemo:<that name>` with OmegaConf.update (a dotted key makes nested sections), then
  `_make_nemo_file_from_folder`: `tarfile.open(path, "w:gz")` (NeMo <= 1.6) or `"w:"`
  (>= 1.7) and `tar.add(folder, arcname=".")`. `NLPModel._default_save_to` with model
  parallelism (NeMo 1.4) moves each rank's weights into `mp_rank_XX/`.
* The weights: `torch.save(model.state_dict())` of NeMo's module tree: NeMo 1.4's NLP task
  models put Megatron-LM's `language_model` under `bert_model.` (no pooler) and the head's
  MultiLayerPerceptron at `classifier.mlp.layer{0,2,..}`; NeMo 1.23's MegatronBertModel
  under `model.`; its encoder-decoders under `enc_dec_model.` (shared embedding twice,
  `enc_dec_model.{encoder,decoder}.model.*`, `tokens_head.bias`).
* Tensor parallelism as Megatron splits (column-parallel rows, row-parallel columns, the
  vocabulary padded to divisible_by x TP and split by rows); Megatron-LM checkpoint_version
  0 lays the fused QKV rows out as [3, heads, head_dim] per rank.
"""
from __future__ import annotations

import io
import math
import re
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import torch
import yaml

COLUMN = ("query_key_value.weight", "query_key_value.bias", "dense_h_to_4h.weight", "dense_h_to_4h.bias",
          "word_embeddings.weight", "inter_attention.query.weight", "inter_attention.query.bias",
          "key_value.weight", "key_value.bias", "tokens_head.bias")
ROW = ("self_attention.dense.weight", "attention.dense.weight", "inter_attention.dense.weight", "dense_4h_to_h.weight")


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Megatron's padded vocabulary: zero rows (or entries) past the tokenizer's."""
    if t.shape[0] >= rows:
        return t[:rows].clone()
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def padded(vocab: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return math.ceil(vocab / multiple) * multiple


def split(state: Dict[str, torch.Tensor], tp: int, column=COLUMN, row=ROW, extra_column=()) -> List[Dict[str, torch.Tensor]]:
    """Megatron's tensor-parallel shards of a whole state dict."""
    shards: List[Dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for name, t in state.items():
        if name.endswith(tuple(column) + tuple(extra_column)):
            parts = t.chunk(tp, 0)
        elif name.endswith(tuple(row)):
            parts = t.chunk(tp, 1)
        else:
            parts = [t] * tp
        for r in range(tp):
            shards[r][name] = parts[r].clone()
    return shards


def qkv_to_version0(t: torch.Tensor, heads: int) -> torch.Tensor:
    """One rank's fused QKV rows from [heads, 3, head_dim] to checkpoint_version 0's [3, heads, head_dim]."""
    rest = t.shape[1:]
    hd = t.shape[0] // (3 * heads)
    return t.view(heads, 3, hd, *rest).transpose(0, 1).reshape(t.shape).contiguous()


def old_megatron_names(name: str) -> str:
    """Megatron-LM before 2021-01-13 (its v2.0 tag): `transformer` and `attention`."""
    name = name.replace("language_model.encoder.", "language_model.transformer.")
    return re.sub(r"\.self_attention\.", ".attention.", name)


def set_dotted(cfg: dict, key: str, value) -> None:
    """OmegaConf.update(cfg, key, value): missing levels created."""
    *path, last = key.split(".")
    for part in path:
        if not isinstance(cfg.get(part), dict):
            cfg[part] = {}
        cfg = cfg[part]
    cfg[last] = value


def write_nemo(path: Path, cfg: dict, shards: List[Dict[str, torch.Tensor]], artifacts: Dict[str, tuple] = (),
               gz: bool = False, model_parallel: Optional[bool] = None) -> Path:
    """The archive NeMo's save_to writes: `artifacts` {dotted yaml key: (file name, bytes)}
    copied as `<uuid4 hex>_<file name>` with the key set to `nemo:` it; one weights file,
    or `mp_rank_XX/model_weights.ckpt` per shard (model_parallel, default: several shards)."""
    import copy

    cfg = copy.deepcopy(cfg)
    model_parallel = len(shards) > 1 if model_parallel is None else model_parallel
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "nemo"
        folder.mkdir()
        for key, (file_name, data) in dict(artifacts).items():
            name = f"{uuid.uuid4().hex}_{file_name}"
            (folder / name).write_bytes(data)
            set_dotted(cfg, key, "nemo:" + name)
        (folder / "model_config.yaml").write_text(yaml.safe_dump(cfg))
        if model_parallel:
            for r, shard in enumerate(shards):
                (folder / f"mp_rank_{r:02d}").mkdir()
                torch.save(shard, folder / f"mp_rank_{r:02d}" / "model_weights.ckpt")
        else:
            torch.save(shards[0], folder / "model_weights.ckpt")
        with tarfile.open(path, "w:gz" if gz else "w:") as tar:
            tar.add(folder, arcname=".")
    return path


def rewrite(archive: Path, target: Path, change) -> Path:
    """Copy `archive` to `target` (same compression), passing each (TarInfo, bytes or None)
    through `change`, which yields the members to write."""
    gz = archive.read_bytes()[:2] == b"\x1f\x8b"
    with tarfile.open(archive, "r:*") as src, tarfile.open(target, "w:gz" if gz else "w:") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            for info, content in change(m, data):
                if content is not None:
                    info.size = len(content)
                    dst.addfile(info, io.BytesIO(content))
                else:
                    dst.addfile(info)
    return target
