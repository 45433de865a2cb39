"""Training-step speed and memory of mega's GPT against Hugging Face transformers'
GPT2LMHeadModel of the same shape.

Speed: both models live in one process and are timed alternately (forward, backward,
AdamW step), several repetitions; the median tokens/s of each and their ratio are printed.
Memory: peak resident memory on CPU (peak allocated on CUDA) of each model's training,
each measured in a fresh subprocess so neither inherits the other's allocations, above a
baseline read after that side's library code is imported (`peak_memory`): the peak is the
model's and its steps', not the import of transformers' modelling code or of torch._dynamo.

    pip install transformers
    python benchmarks/bench_gpt_vs_hf.py                      # 6 layers, 384 hidden, seq 256, batch 8
    python benchmarks/bench_gpt_vs_hf.py --loss-chunk-size 512  # mega's chunked output layer + loss
    python benchmarks/bench_gpt_vs_hf.py --device cuda --dtype bf16 --layers 12 --hidden 768 --heads 12
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import time

import torch

# What each side's build() imports, imported by the memory subprocess before its baseline
# (config_from_dict's checks import mega.runtime.distrib_optimizer)
MEGA_CONFIG = ("mega.config", "mega.runtime.distrib_optimizer")
IMPORTS = {"mega": (*MEGA_CONFIG, "mega.plugins.models.gpt"), "hf": ("transformers.models.gpt2.modeling_gpt2",)}


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

        def loss_fn(tokens):
            mask = torch.ones_like(tokens[:, 1:], dtype=torch.float32)
            out = model.training_loss({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask})
            return out["loss_sum"] / mask.sum()
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=a.layers, n_embd=a.hidden, n_head=a.heads, n_positions=a.seq, vocab_size=a.vocab,
                         resid_pdrop=a.dropout, embd_pdrop=a.dropout, attn_pdrop=a.dropout)
        cfg._attn_implementation = "sdpa"  # the same attention kernel as ours
        model = GPT2LMHeadModel(cfg)

        def loss_fn(tokens):
            return model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
    return adamw_step(model, loss_fn, a)


def adamw_step(model, loss_fn, a):
    """(one training step: forward under autocast, backward, AdamW; parameter count), the
    same for both sides of every benchmark here."""
    model = model.to(a.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[a.dtype]

    def step(batch):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(a.device, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        return loss

    return step, sum(p.numel() for p in model.parameters())


def sync(a):
    if a.device == "cuda":
        torch.cuda.synchronize()


def make_tokens(a) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g).to(a.device)


def speed(a) -> dict:
    return alternate({w: build(w, a) for w in ("mega", "hf")}, make_tokens(a), a)


def alternate(steps: dict, batch, a) -> dict:
    """Each side's steps timed in turn, `a.reps` times; the medians of tokens per second
    and per CPU-second of this process (steadier on a shared machine)."""
    for step, _ in steps.values():  # warm up
        for _ in range(a.warmup):
            step(batch)
    sync(a)
    rates = {w: [] for w in steps}
    cpu_rates = {w: [] for w in steps}
    for _ in range(a.reps):
        for w, (step, _) in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(a.steps):
                step(batch)
            sync(a)
            rates[w].append(a.batch * a.seq * a.steps / (time.perf_counter() - t0))
            cpu_rates[w].append(a.batch * a.seq * a.steps / (time.process_time() - c0))
    return {w: {"tokens_per_sec": statistics.median(r), "all": r, "params": steps[w][1],
                "tokens_per_cpu_sec": statistics.median(cpu_rates[w])} for w, r in rates.items()}


def memory_child(which: str, a) -> dict:
    return peak_memory(lambda: build(which, a), make_tokens(a), a, side=which, imports=IMPORTS[which])


def peak_memory(build_step, batch, a, *, side: str, imports) -> dict:
    """Peak memory of building a model and taking 3 steps (this process: run it alone), above a
    baseline read once the code both sides run is loaded, so that the peak is the model's and
    its steps' and not a library's import. `imports` names the modules the side's build step
    imports: transformers imports lazily, and naming a model class loads its modelling code
    (about 220-240 MiB) inside the measurement otherwise. A throwaway AdamW is built first too:
    torch.optim imports torch._dynamo and sympy (about 45 MiB) when the first optimizer is built,
    which transformers' modelling code has already done and mega's has not. On mega's side the
    installed plugins are loaded as well (about 7 MiB): config_from_dict looks the model up in
    the registry, which imports every plugin, as `mega run` does before building anything.
    `imported_after_baseline` lists the modules loaded inside the measurement (the tests hold
    it free of either library)."""
    for name in imports:
        importlib.import_module(name)
    if side == "mega":
        from mega.plugin_manager import get_plugins

        get_plugins()
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    loaded = set(sys.modules)
    base = _status_kib("VmRSS")
    step, _ = build_step()
    for _ in range(3):
        step(batch)
    sync(a)
    late = sorted(set(sys.modules) - loaded)
    if a.device == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20, "imported_after_baseline": late}
    return {"peak_mib": (_status_kib("VmHWM") - base) / 1024, "imported_after_baseline": late}


def _status_kib(field: str) -> int:
    """From /proc/self/status. VmHWM (peak RSS) belongs to this process image; getrusage's
    ru_maxrss would start from the parent's peak after fork+exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dropout", type=float, default=0.1)
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
    print(f"shape: {a.layers} layers, hidden {a.hidden}, {a.heads} heads, seq {a.seq}, batch {a.batch}, "
          f"vocab {a.vocab}, {a.dtype} on {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"mega loss_chunk_size {a.loss_chunk_size}")
    s = speed(a)
    mem = {}
    for w in ("mega", "hf"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--memory-child", w], capture_output=True, text=True, check=True)
        mem[w] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    for w, name in (("mega", "mega GPT"), ("hf", "HF GPT2LMHeadModel")):
        print(f"{name:20s} params {s[w]['params'] / 1e6:6.2f}M  median {s[w]['tokens_per_sec']:9,.0f} tokens/s  "
              f"(runs: {', '.join(f'{r:,.0f}' for r in s[w]['all'])})  peak memory {mem[w]:,.0f} MiB")
    print(f"speed ratio mega/HF: {s['mega']['tokens_per_sec'] / s['hf']['tokens_per_sec']:.3f}   "
          f"(per CPU-second: {s['mega']['tokens_per_cpu_sec'] / s['hf']['tokens_per_cpu_sec']:.3f})   "
          f"memory ratio mega/HF: {mem['mega'] / mem['hf']:.3f}")


if __name__ == "__main__":
    main()
