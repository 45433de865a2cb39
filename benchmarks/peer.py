"""The side-by-side harness the peer benchmarks (bench_*_vs_hf.py) share, so that every one
measures mega against its Hugging Face peer by one protocol and prints the same lines.

Speed: both models live in one process and are timed alternately (forward, backward, AdamW
step), several repetitions; the median tokens/s of each, and per CPU-second of the process
(steadier on a shared machine). Memory: peak resident memory on CPU (peak allocated on CUDA)
of each model's training, each measured in a fresh subprocess of the benchmark script
(`--memory-child mega|hf`) so neither inherits the other's allocations, above a baseline read
after that side's library code is imported (`peak_memory`).

A benchmark script holds only what differs: its model builders `build(which, a)` (which
return `adamw_step(...)`), its batch, the modules each builder imports (`IMPORTS`), its shape
options and the names it prints. Its main reads

    a = peer.parse_args(p)                      # after adding its shape options to p
    if a.memory_child:
        return peer.print_memory_child(a, build, make_batch(a), IMPORTS)
    print(f"shape: ...")
    s, mem = peer.measure(a, __file__, build, make_batch)
    peer.report(s, mem, {"mega": "mega GPT", "hf": "HF GPT2LMHeadModel"}, width=20)
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

SIDES = ("mega", "hf")
# What mega's config_from_dict imports (its checks import mega.runtime.distrib_optimizer): the
# memory subprocess imports it before its baseline, with the side's model module
MEGA_CONFIG = ("mega.config", "mega.runtime.distrib_optimizer")


def parse_args(p: argparse.ArgumentParser, *, loss_chunk_size: bool = False) -> argparse.Namespace:
    """`p`'s arguments (the benchmark's shape options) and the measuring options every peer
    benchmark takes; `loss_chunk_size` adds mega's model.loss_chunk_size (the GPT family)."""
    p.add_argument("--device", default="cpu")
    if loss_chunk_size:
        p.add_argument("--loss-chunk-size", type=int, default=0, help="mega's model.loss_chunk_size (0: unchunked)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--memory-child", choices=list(SIDES), help=argparse.SUPPRESS)
    return p.parse_args()


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
    """[batch, seq + 1] random token ids, the same every run: the language models' batch."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g).to(a.device)


def mega_lm_loss(model):
    """The loss of mega's GPT family on a `make_tokens` batch: next-token cross entropy, the
    mean over every position."""
    def loss_fn(tokens):
        mask = torch.ones_like(tokens[:, 1:], dtype=torch.float32)
        out = model.training_loss({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask})
        return out["loss_sum"] / mask.sum()

    return loss_fn


def hf_lm_loss(model):
    """The loss of a Hugging Face causal LM on the same batch, called as its users call it
    (`labels=input_ids`: it shifts them inside)."""
    def loss_fn(tokens):
        return model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss

    return loss_fn


def measure(a, script: str, build, make_batch) -> tuple[dict, dict]:
    """(speed of each side, `alternate`'s result; peak MiB of each side, each from a fresh
    subprocess of `script` run with this process's arguments and `--memory-child SIDE`)."""
    speed = alternate({w: build(w, a) for w in SIDES}, make_batch(a), a)
    mem = {}
    for w in SIDES:
        out = subprocess.run([sys.executable, script, *sys.argv[1:], "--memory-child", w], capture_output=True,
                             text=True, check=True)
        mem[w] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    return speed, mem


def report(speed: dict, mem: dict, names: dict, *, width: int) -> dict:
    """Print a line per side (its name padded to `width`) and the mega/HF ratios; return the
    ratios (speed, speed_per_cpu_second, memory)."""
    for w in SIDES:
        print(f"{names[w]:{width}s} params {speed[w]['params'] / 1e6:6.2f}M  median {speed[w]['tokens_per_sec']:9,.0f} "
              f"tokens/s  (runs: {', '.join(f'{r:,.0f}' for r in speed[w]['all'])})  peak memory {mem[w]:,.0f} MiB")
    ratios = {"speed": speed["mega"]["tokens_per_sec"] / speed["hf"]["tokens_per_sec"],
              "speed_per_cpu_second": speed["mega"]["tokens_per_cpu_sec"] / speed["hf"]["tokens_per_cpu_sec"],
              "memory": mem["mega"] / mem["hf"]}
    print(f"speed ratio mega/HF: {ratios['speed']:.3f}   (per CPU-second: {ratios['speed_per_cpu_second']:.3f})   "
          f"memory ratio mega/HF: {ratios['memory']:.3f}")
    return ratios


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


def print_memory_child(a, build, batch, imports: dict) -> None:
    """The `--memory-child SIDE` subprocess: print `peak_memory`'s result for that side as one
    JSON line (what `measure` reads back). `batch` is made before the baseline is read."""
    side = a.memory_child
    print(json.dumps(peak_memory(lambda: build(side, a), batch, a, side=side, imports=imports[side])))


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
