"""Training throughput of mega's Transformer-XL: tokens/s of full training steps (forward
over segment + memory, adaptive softmax loss, backward, gradient clipping at 0.25, the
reference's LAMB step), the memory carried from step to step as in training.

The WikiText-103 base shape (16 layers, d_model 512, 8 x 64 heads, d_inner 2048, tgt = mem
= 192, adaptive softmax over 267,735 words with cutoffs 19997/39997/199997) is the
default on a GPU; on a CPU the defaults shrink it (4 layers, tgt = mem = 64, batch 4,
vocabulary 32,000 with cutoffs 4000/8000/16000) so a measurement takes a minute. The
reference's own figures (NVIDIA's README, base, one A100-40GB, batch 32): 41,527 tok/s
TF32, 59,961 tok/s AMP.

    python benchmarks/bench_txl.py                                   # reduced base on CPU
    python benchmarks/bench_txl.py --device cuda --full --batch 32 --dtype bf16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--full", action="store_true", help="the WT103 base shape (default on cuda)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--tgt", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    full = a.full or a.device.startswith("cuda")
    layers = a.layers or (16 if full else 4)
    tgt = a.tgt or (192 if full else 64)
    batch = a.batch or (16 if full else 4)
    vocab = a.vocab or (267_735 if full else 32_000)
    cutoffs = [19997, 39997, 199997] if vocab > 200_000 else [vocab // 8, vocab // 4, vocab // 2]

    from mega.plugins.models.transformer_xl import TransformerXLConfig, TransformerXLModel
    from mega.plugins.optim.lamb import Lamb

    torch.manual_seed(0)
    cfg = TransformerXLConfig(n_layer=layers, d_model=512, n_head=8, d_head=64, d_inner=2048, dropout=0.1, dropatt=0.0,
                              tgt_len=tgt, mem_len=tgt, cutoffs=cutoffs, div_val=1, global_batch_size=batch)
    device = torch.device(a.device)
    model = TransformerXLModel(cfg, vocab).to(device).train()
    opt = Lamb(model.parameters(), lr=0.01)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    # A Zipf-like stream, so the adaptive buckets see the frequencies they are built for.
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    stream = torch.multinomial(probs / probs.sum(), batch * (tgt * (a.steps + a.warmup) + 1), replacement=True)
    rows = stream.view(batch, -1)

    def step(s: int) -> None:
        seg = rows[:, s * tgt: s * tgt + tgt + 1].to(device)
        b = {"tokens": seg[:, :-1], "labels": seg[:, 1:], "loss_mask": torch.ones(batch, tgt, device=device),
             "stream": torch.zeros(batch, dtype=torch.long, device=device)}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model.training_loss(b)["loss_sum"] / (batch * tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()

    times = []
    for s in range(a.warmup + a.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(s)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if s >= a.warmup:
            times.append(time.perf_counter() - t0)
    tok_s = batch * tgt / statistics.median(times)
    print(json.dumps({"device": a.device, "dtype": a.dtype, "layers": layers, "tgt_len": tgt, "mem_len": tgt,
                      "batch": batch, "vocab": vocab, "params": sum(p.numel() for p in model.parameters()),
                      "threads": torch.get_num_threads(), "median_step_s": round(statistics.median(times), 4),
                      "tokens_per_s": round(tok_s, 1)}))


if __name__ == "__main__":
    main()
