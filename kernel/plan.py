"""`mega plan`: what a training run will need before it needs it.

For the experiment's model and parallel layout: the parameter count, memory per rank
(weights, gradients, optimizer state, activations of the micro-batches in flight), FLOPs
per step and an estimated step time. `mega run` asks the same estimate whether the run fits
the device it is about to use and refuses one that cannot (exit 2, with the numbers),
instead of being killed by the kernel's OOM killer minutes later.

The kernel stays generic: a model plugin's config class implements
`mega.protocols.EstimatesMemory` (parameters and activations per pipeline stage, FLOPs per
token); this module adds what the kernel itself decides:

* weights: fp32 parameters (mixed precision keeps fp32 masters; autocast also caches a
  16-bit copy of each weight for the backward);
* gradients: fp32, one per parameter; DistributedDataParallel keeps a second copy in its
  buckets when data-parallel without pipelining;
* optimizer state: `state_bytes_per_param` of the optimizer's config when it has one,
  else AdamW's two fp32 moments (8 bytes);
* activations: one micro-batch's, times the micro-batches a stage holds at once under the
  1F1B schedule (stage p of P: min(P - p, micro-batches)).

The peak of a step is the larger of two moments: the end of the forward (weights,
optimizer state, activations, the logits around the loss) and the end of the backward
(weights, optimizer state, every gradient). Gradients are freed before each forward
(zero_grad(set_to_none=True)), so the two never add up.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

import attrs

from mega.errors import ConfigError
from mega.protocols import EstimatesMemory

GiB = 1024 ** 3
DEFAULT_VOCAB = 50304  # when the tokenizer's size cannot be known from the config (GPT-2's, padded)


def vocab_size_of(config, given: Optional[int] = None) -> tuple:
    """(vocabulary size, where it came from): --vocab-size, the tokenizer config's
    `vocab_size` key, or a GPT-2-sized default (said so in the output)."""
    if given:
        return int(given), "--vocab-size"
    v = getattr(config.model.tokenizer, "vocab_size", None)
    if isinstance(v, int) and v > 0:
        return v, "model.tokenizer.vocab_size"
    return DEFAULT_VOCAB, f"assumed ({config.model.tokenizer.library} tokenizer has no vocab_size key; give --vocab-size)"


def optimizer_state_bytes(optim_config) -> tuple:
    v = getattr(optim_config, "state_bytes_per_param", None)
    if isinstance(v, (int, float)):
        return float(v), f"{optim_config.name}: {v:g} bytes per parameter"
    if optim_config.name == "adamw":
        return 8.0, "adamw: two fp32 moments"
    return 8.0, f"{optim_config.name}: assumed like AdamW (8 bytes per parameter)"


def estimate(config, vocab_size: int, *, tp: Optional[int] = None, pp: Optional[int] = None, dp: Optional[int] = None,
             device: str = "cpu", precision: Optional[str] = None, micro_batch: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """Memory per rank and FLOPs of one step, or None when the model plugin gives no estimate."""
    mc, tr = config.model, config.trainer
    if not isinstance(mc, EstimatesMemory):
        return None
    tp = tp or mc.tensor_model_parallel_size
    pp = pp or mc.pipeline_model_parallel_size
    dp = dp or max(1, (tr.devices * tr.num_nodes) // (tp * pp))
    precision = str(precision or tr.precision)
    b = micro_batch or mc.micro_batch_size
    model = mc.memory_per_rank(vocab_size, b, tp, pp, precision, device)
    from mega.training.batches import batch_geometry

    gbs = mc.global_batch_size if micro_batch is None else None
    gbs, n_micro = batch_geometry(b, gbs, tr.accumulate_grad_batches, dp)
    opt_bytes, opt_note = optimizer_state_bytes(mc.optim)
    mixed = precision != "32"
    stages = []
    for p, st in enumerate(model["stages"]):
        n = st["params"]
        in_flight = min(pp - p, n_micro)
        weights = 4 * n + (2 * n if mixed else 0)  # fp32 masters (+ autocast's 16-bit copies)
        grads = 4 * n * (2 if dp > 1 and pp == 1 else 1)  # + DDP's buckets
        optim = opt_bytes * n
        acts = in_flight * st["activations"]
        forward_end = weights + optim + acts + st["transient"]
        backward_end = 4 * n + optim + grads + st["grad_transient"]
        stages.append({"stage": p, "params": n, "weights": weights, "grads": grads, "optimizer": optim,
                       "activations": acts, "activations_per_micro_batch": st["activations"],
                       "micro_batches_in_flight": in_flight, "transient": st["transient"],
                       "peak": max(forward_end, backward_end),
                       "sum": weights + grads + optim + acts + st["transient"]})
    worst = max(stages, key=lambda s: s["peak"])
    tokens = gbs * mc.seq_length
    flops = model["flops_per_token"] * tokens
    return {"model": mc.name, "tp": tp, "pp": pp, "dp": dp, "precision": precision, "device": device,
            "micro_batch_size": b, "global_batch_size": gbs, "micro_batches": n_micro, "seq_length": mc.seq_length,
            "vocab_size": vocab_size, "params": model["params"], "optimizer": opt_note,
            "rank": worst, "stages": stages, "tokens_per_step": tokens, "flops_per_step": flops,
            "flops_per_rank": flops / (tp * pp * dp), "pipeline_bubble": (pp - 1) / (n_micro + pp - 1)}


def step_time(est: Dict[str, Any], flops_per_s: float) -> float:
    """Seconds per step at `flops_per_s` per device, with the 1F1B bubble and no
    communication: an optimistic bound."""
    return est["flops_per_rank"] / flops_per_s / (1.0 - est["pipeline_bubble"])


def measured_flops(device: str = "cpu", precision: str = "32", seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul on this machine's `device` (a rough speed for step time)."""
    import torch

    dtype = torch.float32 if precision == "32" or device == "cpu" else torch.bfloat16
    n = 1024 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a  # warm up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        count += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2.0 * n ** 3 * count / (time.perf_counter() - start)


def variants(config, vocab_size: int, device: str) -> List[Dict[str, Any]]:
    """The peak per rank with each option that changes it, one at a time."""
    mc, tr = config.model, config.trainer
    rows = []

    def add(label, cfg, **kw):
        try:
            est = estimate(cfg, vocab_size, device=device, **kw)
        except ConfigError:
            return
        if est is not None:
            rows.append({"option": label, "peak": est["rank"]["peak"]})

    add("as configured", config)
    other = "bf16" if str(tr.precision) == "32" else "32"
    add(f"trainer.precision={other}", config, precision=other)
    if mc.micro_batch_size > 1:
        add("model.micro_batch_size=1", config, micro_batch=1)
    for key in ("attention_dropout", "hidden_dropout"):
        if getattr(mc, key, 0):
            add(f"model.{key}=0", attrs.evolve(config, model=attrs.evolve(mc, **{key: 0.0})))
    return rows


def layouts(config, devices: int, vocab_size: int, device: str) -> List[Dict[str, Any]]:
    """Every (TP, PP, DP) of `devices` ranks the model and batch accept, with its estimate."""
    mc = config.model
    rows = []
    for tp in range(1, devices + 1):
        for pp in range(1, devices // tp + 1):
            if devices % (tp * pp):
                continue
            dp = devices // (tp * pp)
            cfg = attrs.evolve(config, model=attrs.evolve(mc, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
            try:
                cfg.model.check(None)
                est = estimate(cfg, vocab_size, tp=tp, pp=pp, dp=dp, device=device)
            except ConfigError as exc:
                rows.append({"tp": tp, "pp": pp, "dp": dp, "error": str(exc)})
                continue
            if est is not None:
                rows.append({"tp": tp, "pp": pp, "dp": dp, "estimate": est})
    return rows


# --- the check of `mega run` ------------------------------------------------------------------


def available_memory(device: str) -> Optional[int]:
    """Free bytes on the device a run is about to use: CUDA's free memory, or the RAM
    Linux says is available (MemAvailable) for CPU runs; None when unknown."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", 0)))
        return int(free)
    try:
        import psutil  # type: ignore

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_device(config) -> str:
    acc = config.trainer.accelerator
    if acc == "cpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_fits(config) -> Optional[Dict[str, Any]]:
    """Raise a ConfigError (exit 2) with the numbers when the run's estimated peak per rank
    cannot fit the device it is on; on CPU every local worker shares the machine's RAM.
    Nothing is built or allocated. Returns the estimate (None when the model has none)."""
    device = run_device(config)
    vocab, _ = vocab_size_of(config)
    est = estimate(config, vocab, device=device)
    if est is None:
        return None
    free = available_memory(device)
    workers = config.trainer.devices if device == "cpu" else 1
    need = est["rank"]["peak"] * workers
    if free is not None and need > free:
        r = est["rank"]
        raise ConfigError(
            f"the run needs about {_gib(need)} per {'machine' if workers > 1 else 'device'} and {device} has {_gib(free)}"
            f" free: weights {_gib(r['weights'])}, gradients {_gib(r['grads'])}, optimizer {_gib(r['optimizer'])},"
            f" activations {_gib(r['activations'])} (model.micro_batch_size={est['micro_batch_size']},"
            f" model.seq_length={est['seq_length']}){f' x {workers} workers' if workers > 1 else ''}."
            f" Lower model.seq_length or model.micro_batch_size, or split the model over more devices"
            f" (`mega plan EXPERIMENT --devices N` lists the layouts)")
    return est


# --- output -------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 1024 ** 2:.1f} MiB"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _seconds(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def format_plan(est: Dict[str, Any], vocab_note: str, speed: Optional[float], speed_note: str,
                rows: List[Dict[str, Any]], table: Optional[List[Dict[str, Any]]], capacity: Optional[int]) -> str:
    r = est["rank"]
    out = [f"model {est['model']}: {_count(est['params'])} parameters (vocabulary {est['vocab_size']}, {vocab_note})",
           f"layout TP={est['tp']} PP={est['pp']} DP={est['dp']}, precision {est['precision']}, device {est['device']},"
           f" micro-batch {est['micro_batch_size']} x {est['seq_length']} tokens, {est['micro_batches']} per step",
           "",
           f"memory per rank (pipeline stage {r['stage']}, the fullest):",
           f"  parameters        {_count(r['params']):>12}",
           f"  weights           {_gib(r['weights']):>12}",
           f"  gradients         {_gib(r['grads']):>12}",
           f"  optimizer state   {_gib(r['optimizer']):>12}   ({est['optimizer']})",
           f"  activations       {_gib(r['activations']):>12}   ({r['micro_batches_in_flight']} micro-batch(es) x"
           f" {_gib(r['activations_per_micro_batch'])})",
           f"  logits (transient){_gib(r['transient']):>12}",
           f"  peak              {_gib(r['peak']):>12}   (all at once: {_gib(r['sum'])})"]
    if capacity is not None:
        out.append(f"  {est['device']} free now   {_gib(capacity):>12}   -> {'fits' if r['peak'] <= capacity else 'DOES NOT FIT'}")
    out += ["", "peak per rank with the options that change it:"]
    out += [f"  {row['option']:<32} {_gib(row['peak']):>12}" for row in rows]
    out += ["", f"FLOPs per step    {est['flops_per_step']:.3e}  ({est['tokens_per_step']} tokens)"]
    if speed:
        out.append(f"step time         {_seconds(step_time(est, speed)):>12}   at {speed / 1e12:.3g} TFLOP/s per device"
                   f" ({speed_note})")
    if table is not None:
        out += ["", f"{'TP':>3} {'PP':>3} {'DP':>3}  {'peak/rank':>12}  {'weights':>10}  {'activations':>11}"
                    + ("  step time" if speed else "")]
        for row in table:
            if "error" in row:
                out.append(f"{row['tp']:>3} {row['pp']:>3} {row['dp']:>3}  -- {row['error']}")
                continue
            e = row["estimate"]
            line = (f"{row['tp']:>3} {row['pp']:>3} {row['dp']:>3}  {_gib(e['rank']['peak']):>12}"
                    f"  {_gib(e['rank']['weights']):>10}  {_gib(e['rank']['activations']):>11}")
            if speed:
                line += f"  {_seconds(step_time(e, speed)):>9}"
            out.append(line)
    return "\n".join(out) + "\n"


def plan_command(args) -> int:
    """`mega plan EXPERIMENT [overrides] [--devices N] [--tflops X] [--device cpu|cuda] [--json]`."""
    from mega.config import load_config
    from mega.plugin_manager import get_plugins

    plugins = get_plugins()
    config = load_config(args.experiment, args.overrides, plugins)
    config.model.check(plugins)
    device = args.device or run_device(config)
    vocab, vocab_note = vocab_size_of(config, args.vocab_size)
    est = estimate(config, vocab, device=device)
    if est is None:
        raise ConfigError(f"model {config.model.name!r} gives no estimate (its config class does not implement"
                          " mega.protocols.EstimatesMemory)")
    if args.tflops:
        speed, speed_note = args.tflops * 1e12, "--tflops"
    elif args.device and args.device != run_device(config):
        speed, speed_note = None, ""
    else:
        speed, speed_note = measured_flops(device, est["precision"]), f"a matmul measured on this {device}"
    table = layouts(config, args.devices, vocab, device) if args.devices else None
    capacity = available_memory(device) if device == run_device(config) else None
    rows = variants(config, vocab, device)
    if args.json:
        doc = {"estimate": est, "vocab_size_source": vocab_note, "flops_per_s": speed, "options": rows,
               "available_bytes": capacity}
        if speed:
            doc["step_time_s"] = step_time(est, speed)
        if table is not None:
            doc["layouts"] = [dict(row, step_time_s=step_time(row["estimate"], speed)) if speed and "estimate" in row
                              else row for row in table]
        print(json.dumps(doc, indent=2, default=float))
        return 0
    print(format_plan(est, vocab_note, speed, speed_note, rows, table, capacity), end="")
    return 0
