"""A training step's time against the time of its own matrix multiplications (the floor
on a CPU, where GEMMs are most of the step), for GPT, Megatron-BERT and Transformer-XL.

Each model is the family's tiny preset (`mega.testing.tiny_preset`) widened to the shape
below, built by `mega run`'s own `build_run`, and stepped by the loop's `train_step`
(batch, forward, backward, clipping, optimizer). The step time is timed without the
profiler, then torch.profiler times the same number of steps again; the GEMM share is,
within those profiled steps, the self time of `mm`, `addmm`, `bmm`, `baddbmm` (what `linear`, `matmul` and the
CPU's SDPA math path end in). `gemm_share` near 1 means the step is at its floor; the rest
is elementwise work, softmaxes, norms, the optimizer and Python.

    python benchmarks/bench_gemm_floor.py                    # all three, CPU
    python benchmarks/bench_gemm_floor.py --models gpt --steps 5
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")

SHAPES = {
    "gpt": {"micro_batch_size": 8, "seq_length": 128, "num_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
            "hidden_dropout": 0.0, "attention_dropout": 0.0},
    "bert": {"micro_batch_size": 8, "seq_length": 128, "max_position_embeddings": 128, "num_layers": 4,
             "hidden_size": 256, "num_attention_heads": 4, "ffn_hidden_size": 1024},
    "transformer_xl": {"micro_batch_size": 4, "global_batch_size": 4, "tgt_len": 64, "mem_len": 64, "n_layer": 4,
                       "d_model": 256, "n_head": 4, "d_head": 64, "d_inner": 1024},
}


def measure(name: str, steps: int, warmup: int) -> dict:
    import mega
    from mega.config import config_from_dict
    from mega.testing import tiny_preset
    from mega.training.batches import BatchLoader
    from mega.training.loop import read_metrics, train_step
    from mega.training.run import build_run

    with tempfile.TemporaryDirectory() as tmp:
        raw = tiny_preset(name, Path(tmp), trainer={"max_steps": 2 * steps + warmup, "val_check_interval": 0,
                                                      "gradient_clip_val": 1.0}, model=dict(SHAPES[name]))
        run = build_run(config_from_dict(raw, [], mega.get_plugins()))
        run.model.train()
        cfg = run.config.model
        # batches read ahead by a thread, as `mega run` does: the step is the model's work
        loader = BatchLoader(run.train_data, run.global_batch_size, cfg.micro_batch_size, 0, 1, run.device,
                             prefetch=1, end_step=2 * steps + warmup)

        def steps_of(n):
            for _ in range(n):
                read_metrics(train_step(run, loader))
                run.step += 1

        try:
            steps_of(warmup)
            t0 = time.perf_counter()  # the step time, without the profiler's overhead
            steps_of(steps)
            wall = time.perf_counter() - t0
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                steps_of(steps)
                profiled = time.perf_counter() - t0
        finally:
            loader.close()
        gemm_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMMS)
        params = sum(p.numel() for p in run.model.parameters())
        tokens = run.global_batch_size * cfg.seq_length
    step_ms, gemm_ms, profiled_ms = wall * 1e3 / steps, gemm_us / 1e3 / steps, profiled * 1e3 / steps
    # the share within the profiled steps themselves (the profiler slows the rest a little)
    return {"model": name, "params": params, "tokens_per_step": tokens, "step_ms": round(step_ms, 1),
            "profiled_step_ms": round(profiled_ms, 1), "gemm_ms": round(gemm_ms, 1),
            "gemm_share": round(gemm_ms / profiled_ms, 3), "tokens_per_s": round(tokens / (step_ms / 1e3))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [measure(m, a.steps, a.warmup) for m in a.models]
    print("| model | params | tokens/step | step ms | profiled step ms | GEMM ms | GEMM share | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['tokens_per_step']} | {r['step_ms']} | {r['profiled_step_ms']} |"
              f" {r['gemm_ms']} | {r['gemm_share']:.0%} | {r['tokens_per_s']:,} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
