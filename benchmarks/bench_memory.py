"""Memory of a GPT training step per rank, with and without each memory feature
(recomputation, sequence parallelism, the distributed optimizer), and the step-time cost of
each: every row in one run, reported as ratios against the baseline row.

    python benchmarks/bench_memory.py                  # CPU: 4 gloo processes, DP=2 x TP=2
    python benchmarks/bench_memory.py --device cuda    # NCCL, one GPU per rank: DP=2 x TP=2 on 4 GPUs,
                                                       # TP=2 on 2, TP=1 on 1 (no sequence-parallel rows)
    python benchmarks/bench_memory.py --tiny           # the plumbing, in seconds
    python benchmarks/bench_memory.py --out results.json
    python benchmarks/bench_memory.py --layers 8 --hidden 512 --seq 128 --precision bf16 --megatron-amp-O2 \
        --only "distributed optimizer"                 # a state-dominated shape: the distributed optimizer's row

Each rank builds every row's run (mega's own `build_run`: DDP, the sequence-parallel
gradient sum, clipping, AdamW) on the same data, takes a warm-up step, then measures:

* `state`: the bytes the training state holds after a step (parameters, gradients, main
  weights and buffers, optimizer state), counted tensor by tensor
  (mega.plan.counted_state_bytes), next to `mega plan`'s figure: what the distributed
  optimizer shrinks;
* `kept`: the bytes of the tensors one training forward leaves for the backward (the
  activations), counted storage by storage (mega.runtime.tensor_bytes), next to
  `mega plan`'s activations for the same row;
* `peak`: the most bytes alive at once during one whole step (forward, backward, optimizer)
  beyond what existed before it: the tensor count on CPU, torch.cuda.max_memory_allocated
  on a GPU. The weights and optimizer state of a step before are not in it;
* `step`: seconds per training step, the median over repetitions; the rows are timed
  alternately, a block of steps each per repetition, so drift hits every row alike.

Ratios are against `baseline` (the same layout without any feature). Per-rank figures are
the largest over ranks (the TP ranks of a layout hold the same shapes; DP ranks the same).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

FULL = {"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "uniform",
        "activations_checkpoint_num_layers": 1}
SELECTIVE = {"activations_checkpoint_granularity": "selective"}
SELECTIVE_BOTH = {"activations_checkpoint_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]}
ROWS = {
    "baseline": {},
    "selective (core_attn)": SELECTIVE,
    "selective (core_attn, mlp)": SELECTIVE_BOTH,
    "full (uniform, 1)": FULL,
    "sequence parallel": {"sequence_parallel": True},
    "sequence parallel + selective": dict(SELECTIVE, sequence_parallel=True),
    "sequence parallel + full": dict(FULL, sequence_parallel=True),
    "distributed optimizer": {"optim": {"use_distributed_optimizer": True}},
    "dist. optimizer + SP + selective": dict(SELECTIVE, sequence_parallel=True, optim={"use_distributed_optimizer": True}),
}


def _config(args, work: Path, world: int, tp: int, keys: dict, name: str):
    from mega.config import config_from_dict

    shape = (dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, micro_batch_size=2)
             if args.tiny else dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                                    seq_length=args.seq, micro_batch_size=args.micro_batch))
    dp = world // tp
    return config_from_dict({
        "trainer": {"devices": world, "max_steps": 1000, "val_check_interval": 0, "accelerator": args.device,
                    "precision": args.precision, "log_every_n_steps": 1000},
        "exp_manager": {"exp_dir": str(work), "name": name, "loggers": [], "resume_if_exists": False},
        "model": {**shape, "global_batch_size": shape["micro_batch_size"] * dp * 2, "tensor_model_parallel_size": tp,
                  "hidden_dropout": 0.1, "attention_dropout": 0.1, "tokenizer": {"library": "bytes"},
                  "data": {"data_prefix": [str(work / "corpus.txt")]}, "megatron_amp_O2": args.megatron_amp_O2, **keys},
    })


def _kept(run) -> int:
    """Bytes one training forward of the run's first micro-batch leaves alive."""
    from mega.runtime.precision import autocast
    from mega.runtime.tensor_bytes import TensorBytes
    from mega.training.batches import load_micro_batches, micro_batch_positions

    cfg = run.config
    positions = micro_batch_positions(0, run.global_batch_size, cfg.model.micro_batch_size, run.parallel.dp_rank,
                                      run.parallel.dp_size)
    batch = load_micro_batches(run.train_data, positions, run.device)[0]
    with TensorBytes() as counted, autocast(cfg.trainer.precision, run.device):
        out = run.model.training_loss(batch)
        kept = counted.live
    del out
    return kept


def _peak(run) -> int:
    """The most bytes alive at once during one step, beyond what existed before it."""
    from mega.runtime.tensor_bytes import TensorBytes
    from mega.training.loop import train_step

    if run.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        train_step(run)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with TensorBytes() as counted:
        train_step(run)
    return counted.peak


def _worker(rank: int, world: int, tp: int, port: int, args, work: str, rows: dict, out: str):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import torch.distributed as dist

    from mega.plan import counted_state_bytes, estimate
    from mega.training.loop import train_step
    from mega.training.run import build_run
    from mega.training.run_dir import unlock_run_dir

    runs, result = {}, {}
    for name, keys in rows.items():
        cfg = _config(args, Path(work), world, tp, keys, name.replace(" ", "_").replace(",", "").replace("(", "")
                      .replace(")", "").replace("+", "and"))
        run = build_run(cfg)
        train_step(run)  # warm-up: optimizer state, kernels, allocator
        run.step += 1
        planned = estimate(cfg, run.tokenizer.vocab_size, device=run.device.type)["rank"]
        result[name] = {"kept": _kept(run), "peak": _peak(run), "planned_kept": planned["activations_per_micro_batch"],
                        "planned_peak": planned["peak"], "times": [],
                        "state": counted_state_bytes(run.model, run.optimizer, run.main_params)["total"],
                        "planned_state": planned["state"]}
        run.step += 1
        runs[name] = run
    for _ in range(args.reps):
        for name, run in runs.items():
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.block):
                train_step(run)
                run.step += 1
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            result[name]["times"].append((time.perf_counter() - t0) / args.block)
    for run in runs.values():
        unlock_run_dir(run.run_dir)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", default=None, help="trainer.precision (default: 32 on CPU, bf16 on a GPU)")
    p.add_argument("--megatron-amp-O2", dest="megatron_amp_O2", action="store_true",
                   help="model.megatron_amp_O2 (with --precision bf16 or 16): 18 bytes of state per parameter, 6 + 12/d sharded")
    p.add_argument("--only", action="append", default=[], help="measure only these rows (and the baseline); repeat")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="repetitions of the alternating timed blocks")
    p.add_argument("--block", type=int, default=2, help="timed steps per row per repetition")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model, 1 repetition of 1 step: the plumbing only")
    p.add_argument("--out", help="write the table as JSON here")
    args = p.parse_args(argv)
    args.precision = args.precision or ("32" if args.device == "cpu" else "bf16")
    if args.tiny:
        args.reps, args.block = 1, 1
    world = 4 if args.device == "cpu" else min(4, torch.cuda.device_count())
    if world < 1:
        raise SystemExit("--device cuda: torch sees no GPU")
    tp = 2 if world >= 2 else 1
    rows = {k: v for k, v in ROWS.items() if (tp > 1 or not v.get("sequence_parallel"))
            and (not args.only or k == "baseline" or k in args.only)}
    from mega.testing import write_corpus

    with tempfile.TemporaryDirectory() as work:
        write_corpus(Path(work) / "corpus.txt", lines=2000)
        out = Path(work) / "result.json"
        mp.spawn(_worker, args=(world, tp, _free_port(), args, work, rows, str(out)), nprocs=world, join=True)
        ranks = json.loads(out.read_text())
    table = {}
    for name in rows:
        per = [r[name] for r in ranks]
        table[name] = {"state": max(x["state"] for x in per), "planned_state": max(x["planned_state"] for x in per),
                       "kept": max(x["kept"] for x in per), "planned_kept": max(x["planned_kept"] for x in per),
                       "peak": max(x["peak"] for x in per), "planned_peak": max(x["planned_peak"] for x in per),
                       "step_s": statistics.median(t for x in per for t in x["times"])}
    base = table["baseline"]
    for row in table.values():
        row["state_ratio"] = row["state"] / base["state"]
        row["kept_ratio"] = row["kept"] / base["kept"]
        row["peak_ratio"] = row["peak"] / base["peak"]
        row["step_ratio"] = row["step_s"] / base["step_s"]
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    dp = world // tp
    print(f"GPT {2 if args.tiny else args.layers} layers, DP={dp} x TP={tp} on {device}, precision {args.precision}"
          f"{' megatron_amp_O2' if args.megatron_amp_O2 else ''};"
          f" per-rank bytes (largest rank), ratios against the baseline")
    print(f"{'row':<32} {'state MiB':>9} {'plan MiB':>9} {'x base':>7} {'kept MiB':>9} {'plan MiB':>9} {'x base':>7}"
          f" {'peak MiB':>9} {'x base':>7} {'step s':>8} {'x base':>7}")
    mib = 2 ** 20
    for name, r in table.items():
        print(f"{name:<32} {r['state'] / mib:>9.1f} {r['planned_state'] / mib:>9.1f} {r['state_ratio']:>7.2f}"
              f" {r['kept'] / mib:>9.1f} {r['planned_kept'] / mib:>9.1f} {r['kept_ratio']:>7.2f}"
              f" {r['peak'] / mib:>9.1f} {r['peak_ratio']:>7.2f} {r['step_s']:>8.3f} {r['step_ratio']:>7.2f}")
    doc = {"layout": {"dp": dp, "tp": tp}, "device": device, "precision": args.precision, "rows": table}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
