"""Training-step speed and memory of mega's `llama` (GPT with rotary positions, RMSNorm,
SwiGLU, grouped-query attention, no biases, an untied output layer) against Hugging Face
transformers' LlamaForCausalLM of the same shape, the way bench_gpt_vs_hf.py measures GPT-2
(the protocol of peer.py, which every bench_*_vs_hf.py shares).

Speed: both models in one process, timed alternately (forward, backward, AdamW), several
repetitions; median tokens/s of each and their ratio. Memory: peak resident memory on CPU
(peak allocated on CUDA) of each model's training, each in a fresh subprocess, above a
baseline read after that side's library code is imported.

    pip install transformers
    python benchmarks/bench_llama_vs_hf.py                   # 6 layers, 384 hidden, 6 heads in 2 groups, seq 256
    python benchmarks/bench_llama_vs_hf.py --loss-chunk-size 512
    python benchmarks/bench_llama_vs_hf.py --device cuda --dtype bf16 --layers 16 --hidden 2048 --heads 32 --groups 8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer  # noqa: E402  (the side-by-side harness the peer benchmarks share)


def build(which: str, a):
    torch.manual_seed(0)
    if which == "mega":
        from mega.config import config_from_dict
        from mega.plugins.models.gpt import GPTModel

        cfg = config_from_dict({"model": {
            "name": "llama", "num_layers": a.layers, "hidden_size": a.hidden, "num_attention_heads": a.heads,
            "num_query_groups": a.groups, "ffn_hidden_size": a.ffn, "seq_length": a.seq, "rotary_base": 500000.0,
            "make_vocab_size_divisible_by": 128, "loss_chunk_size": a.loss_chunk_size,
            "tokenizer": {"library": "bytes"}}}).model
        model = GPTModel(cfg, a.vocab)
        loss_fn = peer.mega_lm_loss(model)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(num_hidden_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
                          num_key_value_heads=a.groups, intermediate_size=a.ffn, max_position_embeddings=a.seq,
                          vocab_size=a.vocab, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
        cfg._attn_implementation = "sdpa"  # the same attention kernel as ours
        model = LlamaForCausalLM(cfg)
        loss_fn = peer.hf_lm_loss(model)
    return peer.adamw_step(model, loss_fn, a)


# What each side's build() imports, imported by the memory subprocess before its baseline
IMPORTS = {"mega": (*peer.MEGA_CONFIG, "mega.plugins.models.gpt"), "hf": ("transformers.models.llama.modeling_llama",)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--groups", type=int, default=2, help="key/value heads (num_query_groups)")
    p.add_argument("--ffn", type=int, default=1024, help="MLP width per branch (intermediate_size)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    a = peer.parse_args(p, loss_chunk_size=True)
    if a.memory_child:
        return peer.print_memory_child(a, build, peer.make_tokens(a), IMPORTS)
    print(f"shape: {a.layers} layers, hidden {a.hidden}, {a.heads} heads in {a.groups} groups, ffn {a.ffn}, seq {a.seq},"
          f" batch {a.batch}, vocab {a.vocab}, {a.dtype} on {a.device}, torch {torch.__version__},"
          f" {torch.get_num_threads()} threads, mega loss_chunk_size {a.loss_chunk_size}")
    s, mem = peer.measure(a, __file__, build, peer.make_tokens)
    peer.report(s, mem, {"mega": "mega llama", "hf": "HF LlamaForCausalLM"}, width=20)


if __name__ == "__main__":
    main()
