"""Training-step speed and memory of mega's `llama` (GPT with rotary positions, RMSNorm,
SwiGLU, grouped-query attention, no biases, an untied output layer) against Hugging Face
transformers' LlamaForCausalLM of the same shape, the way bench_gpt_vs_hf.py measures GPT-2.

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
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpt_vs_hf import MEGA_CONFIG, adamw_step, alternate, make_tokens, peak_memory  # noqa: E402


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

        def loss_fn(tokens):
            mask = torch.ones_like(tokens[:, 1:], dtype=torch.float32)
            out = model.training_loss({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask})
            return out["loss_sum"] / mask.sum()
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(num_hidden_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
                          num_key_value_heads=a.groups, intermediate_size=a.ffn, max_position_embeddings=a.seq,
                          vocab_size=a.vocab, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
        cfg._attn_implementation = "sdpa"  # the same attention kernel as ours
        model = LlamaForCausalLM(cfg)

        def loss_fn(tokens):
            return model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
    return adamw_step(model, loss_fn, a)


# What each side's build() imports, imported by the memory subprocess before its baseline
IMPORTS = {"mega": (*MEGA_CONFIG, "mega.plugins.models.gpt"), "hf": ("transformers.models.llama.modeling_llama",)}


def memory_child(which: str, a) -> dict:
    return peak_memory(lambda: build(which, a), make_tokens(a), a, side=which, imports=IMPORTS[which])


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
    p.add_argument("--device", default="cpu")
    p.add_argument("--loss-chunk-size", type=int, default=0, help="mega's model.loss_chunk_size (0: unchunked)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--memory-child", choices=["mega", "hf"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_child:
        print(json.dumps(memory_child(a.memory_child, a)))
        return
    print(f"shape: {a.layers} layers, hidden {a.hidden}, {a.heads} heads in {a.groups} groups, ffn {a.ffn}, seq {a.seq},"
          f" batch {a.batch}, vocab {a.vocab}, {a.dtype} on {a.device}, torch {torch.__version__},"
          f" {torch.get_num_threads()} threads, mega loss_chunk_size {a.loss_chunk_size}")
    s = alternate({w: build(w, a) for w in ("mega", "hf")}, make_tokens(a), a)
    mem = {}
    for w in ("mega", "hf"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--memory-child", w], capture_output=True,
                             text=True, check=True)
        mem[w] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    for w, name in (("mega", "mega llama"), ("hf", "HF LlamaForCausalLM")):
        print(f"{name:20s} params {s[w]['params'] / 1e6:6.2f}M  median {s[w]['tokens_per_sec']:9,.0f} tokens/s  "
              f"(runs: {', '.join(f'{r:,.0f}' for r in s[w]['all'])})  peak memory {mem[w]:,.0f} MiB")
    print(f"speed ratio mega/HF: {s['mega']['tokens_per_sec'] / s['hf']['tokens_per_sec']:.3f}   "
          f"(per CPU-second: {s['mega']['tokens_per_cpu_sec'] / s['hf']['tokens_per_cpu_sec']:.3f})   "
          f"memory ratio mega/HF: {mem['mega'] / mem['hf']:.3f}")


if __name__ == "__main__":
    main()
