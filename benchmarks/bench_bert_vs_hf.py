"""Training-step speed and memory of mega's Megatron-BERT (`bert`: masked LM + sentence-order
head) against Hugging Face transformers' MegatronBertForPreTraining of the same shape.

The protocol of peer.py, which every bench_*_vs_hf.py shares: both models in one process,
timed alternately (forward, backward, AdamW step) over several repetitions, median tokens/s
of each and their ratio (also per CPU-second of the process, steadier when other jobs share
the machine); peak memory of each in a fresh subprocess, above a baseline read after that
side's library code is imported. Both train on the same batch:
15% of the positions predicted, some samples padded, a binary label per sample; Hugging
Face gets labels of -100 where nothing is predicted. (MegatronBert in transformers has
only its eager attention; mega's uses torch's scaled_dot_product_attention, and runs the
LM head only at the predicted positions, which Megatron-LM's loss multiplies by zero
anyway.)

    pip install transformers
    python benchmarks/bench_bert_vs_hf.py                     # 6 layers, 384 hidden, seq 128, batch 16
    python benchmarks/bench_bert_vs_hf.py --layers 12 --hidden 768 --heads 12 --seq 512 --batch 4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer  # noqa: E402  (the side-by-side harness the peer benchmarks share)


def make_batch(a) -> dict:
    g = torch.Generator().manual_seed(0)
    b, s = a.batch, a.seq
    lengths = torch.randint(s * 3 // 4, s + 1, (b,), generator=g)
    lengths[0] = s
    padding = (torch.arange(s) < lengths[:, None]).long()
    tokens = torch.randint(0, a.vocab, (b, s), generator=g) * padding
    types = (torch.arange(s) >= (lengths[:, None] // 2)).long() * padding
    loss_mask = (torch.rand(b, s, generator=g) < 0.15).long() * padding
    labels = torch.where(loss_mask.bool(), torch.randint(0, a.vocab, (b, s), generator=g), -1)
    batch = {"tokens": tokens, "tokentype_ids": types, "padding_mask": padding, "labels": labels,
             "loss_mask": loss_mask, "is_random": torch.randint(0, 2, (b,), generator=g)}
    return {k: v.to(a.device) for k, v in batch.items()}


def build(which: str, a):
    torch.manual_seed(0)
    if which == "mega":
        from mega.config import config_from_dict
        from mega.plugins.models.bert import BertModel

        cfg = config_from_dict({"model": {
            "name": "bert", "num_layers": a.layers, "hidden_size": a.hidden, "num_attention_heads": a.heads,
            "seq_length": a.seq, "max_position_embeddings": max(512, a.seq), "hidden_dropout": a.dropout,
            "attention_dropout": a.dropout, "make_vocab_size_divisible_by": 128, "tokenizer": {"library": "bytes"}}}).model
        model = BertModel(cfg, a.vocab)

        def loss_fn(batch):
            out = model.training_loss(batch)
            return out["loss_sum"] / batch["loss_mask"].sum() + out["sample_loss_sum"] / a.batch
    else:
        from transformers import MegatronBertConfig, MegatronBertForPreTraining

        cfg = MegatronBertConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                                 num_attention_heads=a.heads, intermediate_size=4 * a.hidden,
                                 max_position_embeddings=max(512, a.seq), hidden_dropout_prob=a.dropout,
                                 attention_probs_dropout_prob=a.dropout, layer_norm_eps=1e-5, hidden_act="gelu")
        model = MegatronBertForPreTraining(cfg)

        def loss_fn(batch):
            return model(input_ids=batch["tokens"], attention_mask=batch["padding_mask"],
                         token_type_ids=batch["tokentype_ids"],
                         labels=torch.where(batch["loss_mask"].bool(), batch["labels"], -100),
                         next_sentence_label=batch["is_random"]).loss
    return peer.adamw_step(model, loss_fn, a)


# What each side's build() imports, imported by the memory subprocess before its baseline
IMPORTS = {"mega": (*peer.MEGA_CONFIG, "mega.plugins.models.bert"),
           "hf": ("transformers.models.megatron_bert.modeling_megatron_bert",)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)  # a multiple of 128: no padding on either side
    p.add_argument("--dropout", type=float, default=0.1)
    a = peer.parse_args(p)
    if a.memory_child:
        return peer.print_memory_child(a, build, make_batch(a), IMPORTS)
    print(f"shape: {a.layers} layers, hidden {a.hidden}, {a.heads} heads, seq {a.seq}, batch {a.batch}, "
          f"vocab {a.vocab}, {a.dtype} on {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    s, mem = peer.measure(a, __file__, build, make_batch)
    peer.report(s, mem, {"mega": "mega bert", "hf": "HF MegatronBertForPreTraining"}, width=30)


if __name__ == "__main__":
    main()
