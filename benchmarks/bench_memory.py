"""Per-rank memory of a GPT training step with and without each memory-scaling feature,
as ratios against the same run without it, in one launch (docs/parallelism.md).

One launch of TP x DP workers (gloo on CPU, NCCL on GPUs) trains the same GPT once per
variant, one after the other, and each rank reports for each:

* `state`: the bytes the training state holds after a step (parameters, gradients, main
  weights and buffers, optimizer state), counted tensor by tensor (`mega.plan.
  counted_state_bytes`), and `mega plan`'s figure for the same layout;
* `peak`: the high-water mark of the step on the device: CUDA's max_memory_allocated, or on
  CPU the process's peak resident memory (Linux's VmHWM, reset before each variant;
  a fixed mmap threshold returns freed tensors to the OS so one variant does not hide
  the next), above the memory held before the run was built.

Rows are the fullest rank's figures and their ratios to the baseline (`model.megatron_amp_O2`
bf16, or fp32 with `--precision 32`, plain optimizer). Variants (`VARIANTS`) add config
overrides one feature at a time.

    python benchmarks/bench_memory.py                         # GPT 8 x 512, TP=2 x DP=2 on CPU (4 processes)
    python benchmarks/bench_memory.py --device cuda --tp 1 --dp 8 --layers 24 --hidden 2048   # one node of GPUs
    python benchmarks/bench_memory.py --tiny --tp 1 --dp 2   # the plumbing, in seconds (what the tests run)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> config overrides, each measured against "baseline"
VARIANTS = {
    "baseline": [],
    "distributed optimizer": ["model.optim.use_distributed_optimizer=true"],
}


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak(device: str) -> int:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _vm("VmRSS")


def _peak(device: str, base: int) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return _vm("VmHWM") - base


def experiment(args, name: str, overrides, world: int) -> "object":
    from mega.config import config_from_dict
    from mega.testing import tiny_raw

    raw = tiny_raw(Path(args.dir), Path(args.dir) / "corpus.txt", trainer={
        "devices": world, "accelerator": "gpu" if args.device == "cuda" else "cpu", "precision": args.precision,
        "max_steps": args.steps + 1, "val_check_interval": 0, "log_every_n_steps": 1000, "dist_timeout_s": 600},
        exp_manager={"name": name.replace(" ", "_"), "loggers": [], "checkpoint": {"save_last": False}},
        model={"num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": args.heads,
               "seq_length": args.seq, "micro_batch_size": args.micro_batch, "global_batch_size": args.micro_batch * args.dp,
               "hidden_dropout": 0.0, "attention_dropout": 0.0, "make_vocab_size_divisible_by": 128,
               "megatron_amp_O2": args.precision != "32", "tensor_model_parallel_size": args.tp,
               "tokenizer": {"library": "bytes"}})
    return config_from_dict(raw, list(overrides))


def _worker(args, world):
    import torch

    from mega.plan import counted_state_bytes, estimate
    from mega.plugin_manager import load_plugins
    from mega.training.loop import train_step
    from mega.training.run import build_run

    plugins = load_plugins()
    out = {}
    # a first, unmeasured pass: what a process allocates once (kernels' code pages, caches,
    # the data index) is not any variant's memory
    for name, overrides in [("warm-up", [])] + list(VARIANTS.items()):
        cfg = experiment(args, name, overrides, world)
        base = _reset_peak(args.device)
        run = build_run(cfg, plugins)
        for _ in range(args.steps):
            train_step(run)
            run.step += 1
        if args.device == "cuda":
            torch.cuda.synchronize()
        est = estimate(cfg, run.model.vocab_size, device=args.device)
        if name == "warm-up":
            del run
            gc.collect()
            continue
        out[name] = {"state": counted_state_bytes(run.model, run.optimizer, run.main_params)["total"],
                     "plan_state": est["rank"]["state"], "plan_peak": est["rank"]["peak"],
                     "peak": _peak(args.device, base), "params": sum(p.numel() for p in run.model.parameters())}
        del run
        gc.collect()
    return out


def _spawned(rank, world, init_file, out_dir, args):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    import pickle

    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, args.threads))
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    result = _worker(args, world)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    dist.destroy_process_group()


def run(args) -> dict:
    import pickle

    import torch.multiprocessing as mp

    from mega.testing import write_corpus

    world = args.tp * args.dp
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < world:
            raise SystemExit(f"--tp {args.tp} x --dp {args.dp} needs {world} GPUs, this machine has"
                             f" {torch.cuda.device_count()}: lower them (e.g. --tp 1 --dp {torch.cuda.device_count()})")
    write_corpus(Path(args.dir) / "corpus.txt", lines=400)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed tensors go back to the OS: per-variant peaks
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "rendezvous")
        mp.start_processes(_spawned, args=(world, init, tmp, args), nprocs=world, join=True, start_method="spawn")
        ranks = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as f:
                ranks.append(pickle.load(f))
    rows = {}
    for name in VARIANTS:
        fullest = max(range(world), key=lambda r: ranks[r][name]["state"])
        rows[name] = {"state": max(r[name]["state"] for r in ranks), "plan_state": ranks[fullest][name]["plan_state"],
                      "peak": max(r[name]["peak"] for r in ranks), "plan_peak": ranks[fullest][name]["plan_peak"],
                      "params_per_rank": ranks[0][name]["params"]}
    base = rows["baseline"]
    for row in rows.values():
        row["state_ratio"] = row["state"] / base["state"]
        row["peak_ratio"] = row["peak"] / base["peak"]
    return rows


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:9.1f} MiB"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--precision", default="bf16", help="bf16 (model.megatron_amp_O2) or 32")
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU worker")
    p.add_argument("--tiny", action="store_true", help="a 2 x 64 model: the plumbing, in seconds")
    p.add_argument("--json", action="store_true")
    p.add_argument("--dir", default=None, help="where the runs write (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.hidden, args.heads, args.seq = 2, 64, 4, 32
    with tempfile.TemporaryDirectory() as tmp:
        args.dir = args.dir or tmp
        rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"GPT {args.layers} x {args.hidden}, seq {args.seq}, micro-batch {args.micro_batch}, TP={args.tp} x DP={args.dp},"
              f" {args.device}, {'model.megatron_amp_O2 bf16' if args.precision != '32' else 'fp32'}; per rank (the fullest):")
        print(f"  {'variant':<24} {'state':>13} {'plan':>13} {'ratio':>6}   {'peak':>13} {'plan':>13} {'ratio':>6}")
        for name, r in rows.items():
            print(f"  {name:<24} {_mib(r['state'])} {_mib(r['plan_state'])} {r['state_ratio']:6.3f}   {_mib(r['peak'])}"
                  f" {_mib(r['plan_peak'])} {r['peak_ratio']:6.3f}")
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
