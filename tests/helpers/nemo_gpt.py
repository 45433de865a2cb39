"""NeMo 1.x Megatron GPT `.nemo` archives built in the tests from NeMo's layouts (independently of mega's importer)."""
from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import torch
import yaml


def nemo_yaml(**changes) -> dict:
    cfg = {"mcore_gpt": False, "encoder_seq_length": 16, "max_position_embeddings": 16, "num_layers": 2,
           "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4, "make_vocab_size_divisible_by": 8,
           "layernorm_epsilon": 1e-5, "activation": "fast-gelu", "normalization": "layernorm", "bias": True,
           "position_embedding_type": "learned_absolute", "share_embeddings_and_output_weights": True,
           "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "precision": 32,
           "tokenizer": {"library": "sentencepiece", "type": None, "model": "nemo:0123456789abcdef0123456789abcdef_tokenizer.model",
                         "vocab_file": None, "merge_file": None},
           "target": "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"}
    cfg.update(changes)
    return cfg


COLUMN = ("query_key_value.weight", "query_key_value.bias", "dense_h_to_4h.weight", "dense_h_to_4h.bias",
           "word_embeddings.weight")


ROW = ("self_attention.dense.weight", "dense_4h_to_h.weight")


MCORE = [("language_model.embedding.", "embedding."), ("language_model.encoder.final_layernorm", "decoder.final_layernorm"),
          ("language_model.encoder.layers", "decoder.layers"), ("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
          ("query_key_value", "linear_qkv"), ("self_attention.dense", "self_attention.linear_proj"),
          ("post_attention_layernorm.", "mlp.linear_fc1.layer_norm_"), ("dense_h_to_4h", "linear_fc1"),
          ("dense_4h_to_h", "linear_fc2")]


def nemo_shards(model, tp: int, mcore: bool = False) -> list:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    word = "language_model.embedding.word_embeddings.weight"
    vocab, multiple = 60, 8 * tp  # NeMo pads the vocabulary to a multiple of divisible_by x TP
    padded = math.ceil(vocab / multiple) * multiple
    state[word] = torch.cat([state[word][:vocab], torch.zeros(padded - vocab, 32)])
    shards = [{} for _ in range(tp)]
    for name, t in state.items():
        parts = (t.chunk(tp, 0) if name.endswith(COLUMN) else t.chunk(tp, 1) if name.endswith(ROW) else [t] * tp)
        if mcore:
            for old, new in MCORE:
                name = name.replace(old, new)
        for r in range(tp):
            shards[r]["model." + name] = parts[r].clone()
            if mcore and name.endswith("linear_proj.weight"):
                shards[r]["model." + name.replace(".weight", "._extra_state")] = torch.zeros(0, dtype=torch.uint8)
    return shards


def write_nemo(path: Path, cfg: dict, shards: list, spm_model: Path, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        def add(name, data):
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("model_config.yaml", yaml.safe_dump(cfg).encode())
        add(cfg["tokenizer"]["model"][len("nemo:"):], spm_model.read_bytes())
        for r, shard in enumerate(shards):
            buf = io.BytesIO()
            torch.save(shard, buf)
            add("model_weights.ckpt" if len(shards) == 1 else f"mp_rank_{r:02d}/model_weights.ckpt", buf.getvalue())
    return path
