"""Training-step speed and memory of mega's GPT against Hugging Face transformers'
GPT2LMHeadModel of the same shape.

The protocol of peer.py, which every bench_*_vs_hf.py shares. Speed: both models live in one
process and are timed alternately (forward, backward, AdamW step), several repetitions; the
median tokens/s of each and their ratio are printed. Memory: peak resident memory on CPU (peak
allocated on CUDA) of each model's training, each measured in a fresh subprocess so neither
inherits the other's allocations, above a baseline read after that side's library code is
imported (`peer.peak_memory`): the peak is the model's and its steps', not the import of
transformers' modelling code or of torch._dynamo.

    pip install transformers
    python benchmarks/bench_gpt_vs_hf.py                      # 6 layers, 384 hidden, seq 256, batch 8
    python benchmarks/bench_gpt_vs_hf.py --loss-chunk-size 512  # mega's chunked output layer + loss
    python benchmarks/bench_gpt_vs_hf.py --device cuda --dtype bf16 --layers 12 --hidden 768 --heads 12
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer  # noqa: E402  (the side-by-side harness the peer benchmarks share)

# What each side's build() imports, imported by the memory subprocess before its baseline
IMPORTS = {"mega": (*peer.MEGA_CONFIG, "mega.plugins.models.gpt"), "hf": ("transformers.models.gpt2.modeling_gpt2",)}


def build(which: str, a):
    torch.manual_seed(0)
    if which == "mega":
        from mega.config import config_from_dict
        from mega.plugins.models.gpt import GPTModel

        cfg = config_from_dict({"model": {
            "num_layers": a.layers, "hidden_size": a.hidden, "num_attention_heads": a.heads, "seq_length": a.seq,
            "hidden_dropout": a.dropout, "attention_dropout": a.dropout, "make_vocab_size_divisible_by": 128,
            "loss_chunk_size": a.loss_chunk_size,
            "tokenizer": {"library": "bytes"}}}).model
        model = GPTModel(cfg, a.vocab)
        loss_fn = peer.mega_lm_loss(model)
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=a.layers, n_embd=a.hidden, n_head=a.heads, n_positions=a.seq, vocab_size=a.vocab,
                         resid_pdrop=a.dropout, embd_pdrop=a.dropout, attn_pdrop=a.dropout)
        cfg._attn_implementation = "sdpa"  # the same attention kernel as ours
        model = GPT2LMHeadModel(cfg)
        loss_fn = peer.hf_lm_loss(model)
    return peer.adamw_step(model, loss_fn, a)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dropout", type=float, default=0.1)
    a = peer.parse_args(p, loss_chunk_size=True)
    if a.memory_child:
        return peer.print_memory_child(a, build, peer.make_tokens(a), IMPORTS)
    print(f"shape: {a.layers} layers, hidden {a.hidden}, {a.heads} heads, seq {a.seq}, batch {a.batch}, "
          f"vocab {a.vocab}, {a.dtype} on {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"mega loss_chunk_size {a.loss_chunk_size}")
    s, mem = peer.measure(a, __file__, build, peer.make_tokens)
    peer.report(s, mem, {"mega": "mega GPT", "hf": "HF GPT2LMHeadModel"}, width=20)


if __name__ == "__main__":
    main()
