"""`mega plan`: what a training run will need before it needs it.

For the experiment's model and parallel layout: the parameter count, memory per rank
(weights, gradients, optimizer state, activations of the micro-batches in flight), FLOPs
per step and an estimated step time. `mega run` asks the same estimate whether the run fits
the device it is about to use and refuses one that cannot (exit 2, with the numbers),
instead of being killed by the kernel's OOM killer minutes later.

The kernel stays generic: a model plugin's config class implements
`mega.protocols.EstimatesMemory` (parameters and activations per pipeline stage, FLOPs per
token); this module adds what the kernel itself decides, per parameter by the precision
layout (`Layout`: fp32, bf16/fp16 autocast, or `model.megatron_amp_O2`):

* weights: the model's parameters (fp32; 16-bit under O2) and, under O2, the fp32 main
  weights the optimizer steps;
* 16-bit copies: autocast casts every matmul weight to 16 bits in the forward and keeps
  the copy for the backward (2 bytes per matmul parameter, while a step runs);
* gradients: fp32, one per parameter (O2: the flat main-gradient buffer, which lives
  through the forward too); DistributedDataParallel keeps a second copy in its buckets
  when data-parallel without pipelining (O2 reduces its buffer itself, without DDP);
* optimizer state: `state_bytes_per_param` of the optimizer's config when it has one,
  else AdamW's two fp32 moments (8 bytes);
* activations: one micro-batch's, times the micro-batches a stage holds at once under the
  1F1B schedule (stage p of P: min(P - p, micro-batches)). The model sizes them by the
  layout: the config it is asked carries `megatron_amp_O2`.

The state a step leaves behind (weights, gradients, optimizer) is exact: 16 bytes per
parameter with AdamW in fp32 and under autocast, 18 under O2; with the distributed
optimizer (`model.optim.use_distributed_optimizer`) about 8 + 8/d and 6 + 12/d over d
data-parallel ranks: the padded buffers and this rank's share, laid out as the runtime
lays them out (mega.runtime.param_layout). `counted_state_bytes` counts it tensor by
tensor on a built model, and tests/test_plan.py and tests/test_distributed_optimizer.py
hold the two equal.

The peak of a step is the larger of two moments: the end of the forward (weights, 16-bit
copies, optimizer state, activations, the logits around the loss; O2's gradient buffer)
and the end of the backward (weights, optimizer state, every gradient), and with activation
recomputation the start of the backward, when what the forward kept meets what the first
recomputed region rebuilds (the model's `recompute_transient`, also added to the end of
the backward). Gradients are freed before each forward (zero_grad(set_to_none=True)), so
outside O2 forward and gradients never add up.
The model sizes activations by its own keys (recomputation, sequence parallelism), and
`variants` lists the peak with each of them switched on.
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
    if optim_config.name in ("adamw", "distributed_fused_adam", "mcore_distributed_optim"):  # AdamW and NeMo's names for it
        return 8.0, f"{optim_config.name}: two fp32 moments"
    return 8.0, f"{optim_config.name}: assumed like AdamW (8 bytes per parameter)"


@attrs.frozen
class Layout:
    """Bytes per parameter of a precision layout, besides the optimizer's state."""

    name: str
    param: int  # the model's parameter
    main: int  # the fp32 main weight the optimizer steps (model.megatron_amp_O2), else 0
    grad: int  # the gradient the optimizer steps with
    cast: int  # autocast's 16-bit copy of a matmul parameter, alive while a step runs
    grads_kept: bool  # the gradients live through the forward (O2's buffer), else freed by zero_grad
    ddp: bool  # data parallelism through DDP, whose buckets hold a second copy of the gradients
    shard: bool = False  # the distributed optimizer: main weights and optimizer state of 1/d of the parameters


def layout_of(precision: str, o2: bool, shard: bool = False) -> Layout:
    """The layout `mega run` trains in with `trainer.precision`, `model.megatron_amp_O2` and
    `model.optim.use_distributed_optimizer` (mega.runtime.precision, mega.runtime.main_params,
    mega.runtime.distrib_optimizer). The distributed optimizer keeps parameters and fp32
    gradients in padded flat buffers that live through the forward, and main weights (O2)
    and optimizer state only for the parameters this rank owns."""
    precision = str(precision)
    if shard:
        suffix = " + distributed optimizer"
        if o2:
            return Layout(f"{precision} megatron_amp_O2{suffix}", param=2, main=4, grad=4, cast=0, grads_kept=True,
                          ddp=False, shard=True)
        if precision == "32":
            return Layout(f"fp32{suffix}", param=4, main=0, grad=4, cast=0, grads_kept=True, ddp=False, shard=True)
        return Layout(f"{precision} autocast{suffix}", param=4, main=0, grad=4, cast=2, grads_kept=True, ddp=False,
                      shard=True)
    if o2:
        return Layout(f"{precision} megatron_amp_O2",
                      param=2, main=4, grad=4, cast=0, grads_kept=True, ddp=False)
    if precision == "32":
        return Layout("fp32", param=4, main=0, grad=4, cast=0, grads_kept=False, ddp=True)
    return Layout(f"{precision} autocast", param=4, main=0, grad=4, cast=2, grads_kept=False, ddp=True)


def sharded_numels(st: Dict[str, Any], dp: int, bucket_size: Optional[int], first: bool, last: bool,
                   pp: int) -> tuple:
    """(N_buf, N_own, exact) of a stage under the distributed optimizer: the padded buffer
    and the most parameter elements one data-parallel rank owns. Exact from the model's
    `param_numels` (its tensors in registration order, laid out by Megatron's rule, the
    tied embedding of a pipeline in a bucket of its own: the first tensor of the first
    stage, the last of the last); otherwise an upper bound (64-element alignment of each
    tensor not counted, every bucket padded by lcm(d, 128) - 1)."""
    from mega.runtime.param_layout import bucket_end_divisor, compute_layout

    numels = st.get("param_numels")
    if numels:
        shared = set()
        if pp > 1 and first:
            shared.add(0)
        if pp > 1 and last:
            shared.add(len(numels) - 1)
        layout = compute_layout(numels, bucket_size, dp, shared)
        return layout.numel, layout.max_owned_numel(), True
    n = st["params"]
    buckets = (-(-n // bucket_size) if bucket_size else 1) + (1 if pp > 1 else 0)
    n_buf = n + buckets * (bucket_end_divisor(dp) - 1)
    return n_buf, -(-n_buf // dp), False


def estimate(config, vocab_size: int, *, tp: Optional[int] = None, pp: Optional[int] = None, dp: Optional[int] = None,
             device: str = "cpu", precision: Optional[str] = None, micro_batch: Optional[int] = None,
             o2: Optional[bool] = None, shard: Optional[bool] = None) -> Optional[Dict[str, Any]]:
    """Memory per rank and FLOPs of one step, or None when the model plugin gives no
    estimate. `precision`, `o2` (model.megatron_amp_O2) and `shard`
    (model.optim.use_distributed_optimizer) override the config's; a layout `mega run`
    refuses raises its ConfigError."""
    from mega.runtime.main_params import check_main_params

    mc, tr = config.model, config.trainer
    if not isinstance(mc, EstimatesMemory):
        return None
    tp = tp or mc.tensor_model_parallel_size
    pp = pp or mc.pipeline_model_parallel_size
    dp = dp or max(1, (tr.devices * tr.num_nodes) // (tp * pp))
    precision = str(precision or tr.precision)
    o2 = bool(getattr(mc, "megatron_amp_O2", False)) if o2 is None else o2
    if o2 or getattr(mc, "megatron_amp_O2", False):  # the model sizes its activations by its config's key
        mc = attrs.evolve(mc, megatron_amp_O2=o2, pipeline_model_parallel_size=pp)
        check_main_params(attrs.evolve(config, model=mc, trainer=attrs.evolve(tr, precision=precision)))
    shard = bool(getattr(mc.optim, "use_distributed_optimizer", False)) if shard is None else shard
    layout = layout_of(precision, o2, shard)
    bucket_size = (mc.grad_reduce_bucket_size or None) if getattr(mc.optim, "overlap_grad_sync", True) else None
    b = micro_batch or mc.micro_batch_size
    model = mc.memory_per_rank(vocab_size, b, tp, pp, precision, device)
    from mega.training.batches import batch_geometry

    gbs = mc.global_batch_size if micro_batch is None else None
    gbs, n_micro = batch_geometry(b, gbs, tr.accumulate_grad_batches, dp)
    opt_bytes, opt_note = optimizer_state_bytes(mc.optim)
    stages = [stage_memory(p, st, layout, opt_bytes, pp, dp, n_micro, bucket_size, device)
              for p, st in enumerate(model["stages"])]
    worst = max(stages, key=lambda s: s["peak"])
    per_param = layout.param + layout.main + layout.grad + opt_bytes
    if shard:  # padded buffers, and main weights and state of the owned elements: ~ param + grad + (main + state) / d
        per_param = worst["state"] / worst["params"]
    tokens = gbs * mc.seq_length
    flops = model["flops_per_token"] * tokens
    return {"model": mc.name, "tp": tp, "pp": pp, "dp": dp, "precision": precision, "megatron_amp_O2": o2,
            "layout": layout.name, "device": device,
            "micro_batch_size": b, "global_batch_size": gbs, "micro_batches": n_micro, "seq_length": mc.seq_length,
            "vocab_size": vocab_size, "params": model["params"], "optimizer": opt_note,
            "distributed_optimizer": shard, "state_bytes_per_param": per_param,
            "rank": worst, "stages": stages, "tokens_per_step": tokens, "flops_per_step": flops,
            "flops_per_rank": flops / (tp * pp * dp), "pipeline_bubble": (pp - 1) / (n_micro + pp - 1)}


def stage_memory(p: int, st: Dict[str, Any], layout: Layout, opt_bytes: float, pp: int, dp: int,
                 n_micro: int, bucket_size: Optional[int] = None, device: str = "cpu") -> Dict[str, Any]:
    """Bytes of pipeline stage `p` (the model's dict `st`) in `layout`: what a step leaves
    behind (`state`) and the larger of the end of the forward and of the backward (`peak`).
    Under the distributed optimizer (`layout.shard`) the buffers hold N_buf padded elements
    and this rank N_own of them (`sharded_numels`; `bucket_size`: its buckets, None for one);
    on the CPU, gloo's reduce-scatter copies the bucket it reduces and keeps the copy until
    the collective is waited for, after the backward: one fp32 copy of the whole buffer at
    the end of the backward, whatever the bucket size (measured; NCCL reduces in place)."""
    n = st["params"]
    in_flight = min(pp - p, n_micro)
    n_buf = n_own = n
    exact, comm = True, 0
    if layout.shard:
        n_buf, n_own, exact = sharded_numels(st, dp, bucket_size, p == 0, p == pp - 1, pp)
        if dp > 1 and device == "cpu":
            comm = 4 * n_buf
    weights = layout.param * n_buf + layout.main * n_own
    casts = layout.cast * st.get("matmul_params", n)
    grads = layout.grad * n_buf
    buckets = grads if layout.ddp and dp > 1 and pp == 1 else 0  # DDP's copy
    optim = opt_bytes * n_own
    acts = in_flight * st["activations"]
    forward_end = weights + casts + optim + acts + st["transient"] + (grads + buckets if layout.grads_kept else 0)
    rebuilt = st.get("recompute_transient", 0)
    backward_end = weights + optim + grads + buckets + st["grad_transient"] + rebuilt + comm
    # activation recomputation: its first region (the last layers) is rebuilt while every
    # activation the forward kept is still there
    recompute_start = weights + casts + optim + acts + rebuilt + st["grad_transient"] \
        + (grads + buckets if layout.grads_kept else 0) if rebuilt else 0
    return {"stage": p, "params": n, "weights": weights, "casts": casts, "grads": grads + buckets, "ddp_buckets": buckets,
            "optimizer": optim, "buffer_numel": n_buf, "owned_numel": n_own, "exact": exact, "collective_copy": comm,
            "activations": acts, "activations_per_micro_batch": st["activations"],
            "micro_batches_in_flight": in_flight, "transient": st["transient"],
            "recompute_transient": st.get("recompute_transient", 0),
            "state": weights + grads + optim, "peak": max(forward_end, backward_end, recompute_start),
            "sum": weights + casts + grads + buckets + optim + acts + st["transient"]}


def counted_state_bytes(model, optimizer, main_params=None) -> Dict[str, int]:
    """The training state a step left behind, counted tensor by tensor (each storage
    once): the model's parameters and their gradients, the fp32 main weights and gradient
    buffer of model.megatron_amp_O2 (`main_params`, a MainParams) and the optimizer's
    state tensors (not its scalar step counts). What `estimate`'s `state` predicts, and
    what benchmarks/bench_gpu.py reports per row."""
    import torch

    seen = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None:
                continue
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    out = {"params": size(model.parameters()), "grads": size(p.grad for p in model.parameters())}
    if main_params is not None:
        out["main params"] = size(main_params.main)
        out["main grads"] = size([main_params.grad_buffer])
    out["optimizer"] = size(t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    out["total"] = sum(out.values())
    return out


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
    shard = bool(getattr(mc.optim, "use_distributed_optimizer", False))
    dp = max(1, (tr.devices * tr.num_nodes) // (mc.tensor_model_parallel_size * mc.pipeline_model_parallel_size))
    if shard:
        add("model.optim.use_distributed_optimizer=false", config, shard=False)
    elif dp > 1:
        add("model.optim.use_distributed_optimizer=true", config, shard=True)
    precision, o2 = str(tr.precision), bool(getattr(mc, "megatron_amp_O2", False))
    if precision == "32":
        add("trainer.precision=bf16", config, precision="bf16")
        add("  + model.megatron_amp_O2=true", config, precision="bf16", o2=True)
    elif o2:
        add("model.megatron_amp_O2=false", config, o2=False)
        add("  + trainer.precision=32", config, precision="32", o2=False)
    else:
        add("trainer.precision=32", config, precision="32")
        add("model.megatron_amp_O2=true", config, o2=True)
    if mc.micro_batch_size > 1:
        add("model.micro_batch_size=1", config, micro_batch=1)
    for key in ("attention_dropout", "hidden_dropout"):
        if getattr(mc, key, 0):
            add(f"model.{key}=0", attrs.evolve(config, model=attrs.evolve(mc, **{key: 0.0})))
    for label, keys in _memory_options(mc):
        option = attrs.evolve(config, model=attrs.evolve(mc, **keys))
        try:
            option.model.check(None)  # a combination this model refuses is not an option
        except ConfigError:
            continue
        add(label, option)
    return rows


def _memory_options(mc) -> List[tuple]:
    """(label, model keys) of the activation-memory options this model has and does not
    use yet: selective and full recomputation, and sequence parallelism under TP (keys of
    mega.plugins.models.scaling, found by name so any model that declares them is covered)."""
    out = []
    if getattr(mc, "activations_checkpoint_granularity", "unset") is None:
        out.append(("model.activations_checkpoint_granularity=selective",
                    {"activations_checkpoint_granularity": "selective", "activations_checkpoint_method": None,
                     "activations_checkpoint_num_layers": None}))
        out.append(("  or full (uniform, 1 layer)", {"activations_checkpoint_granularity": "full",
                                                 "activations_checkpoint_method": "uniform",
                                                 "activations_checkpoint_num_layers": 1}))
    if getattr(mc, "sequence_parallel", None) is False and mc.tensor_model_parallel_size > 1:
        out.append(("model.sequence_parallel=true", {"sequence_parallel": True}))
    return out


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
            f" free: weights {_gib(r['weights'] + r['casts'])}, gradients {_gib(r['grads'])}, optimizer {_gib(r['optimizer'])},"
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


def _weights_note(est: Dict[str, Any]) -> str:
    if est.get("distributed_optimizer"):
        r = est["rank"]
        owned = f"{r['owned_numel'] / max(1, r['params']):.3g} of the parameters"
        if est["megatron_amp_O2"]:
            return f"{est['precision']} parameters 2 B + fp32 main weights 4 B for this rank's {owned}"
        return "fp32, 4 B per parameter (the main weights are views)"
    if est["megatron_amp_O2"]:
        return f"{est['precision']} parameters 2 B + fp32 main weights 4 B per parameter"
    return "fp32, 4 B per parameter"


def _grads_note(est: Dict[str, Any]) -> str:
    if est.get("distributed_optimizer"):
        return "fp32 buffer, kept through the forward, reduce-scattered"
    if est["megatron_amp_O2"]:
        return "fp32 main gradients, kept through the forward"
    return "fp32" + (", twice: DistributedDataParallel's buckets" if est["rank"]["ddp_buckets"] else "")


def _optimizer_note(est: Dict[str, Any]) -> str:
    if est.get("distributed_optimizer"):
        r = est["rank"]
        bound = "" if r["exact"] else ", an upper bound"
        return f"{est['optimizer']}, sharded: {r['owned_numel']} of {r['params']} elements on this rank{bound}"
    return est["optimizer"]


def format_plan(est: Dict[str, Any], vocab_note: str, speed: Optional[float], speed_note: str,
                rows: List[Dict[str, Any]], table: Optional[List[Dict[str, Any]]], capacity: Optional[int]) -> str:
    r = est["rank"]
    out = [f"model {est['model']}: {_count(est['params'])} parameters (vocabulary {est['vocab_size']}, {vocab_note})",
           f"layout TP={est['tp']} PP={est['pp']} DP={est['dp']}, precision {est['layout']}, device {est['device']},"
           f" micro-batch {est['micro_batch_size']} x {est['seq_length']} tokens, {est['micro_batches']} per step",
           "",
           f"memory per rank (pipeline stage {r['stage']}, the fullest):",
           f"  parameters        {_count(r['params']):>12}",
           f"  weights           {_gib(r['weights']):>12}   ({_weights_note(est)})"]
    if r["casts"]:
        out.append(f"  16-bit copies     {_gib(r['casts']):>12}   (autocast's cast of each matmul weight, during a step)")
    out += [f"  gradients         {_gib(r['grads']):>12}   ({_grads_note(est)})",
           f"  optimizer state   {_gib(r['optimizer']):>12}   ({_optimizer_note(est)})",
           f"  activations       {_gib(r['activations']):>12}   ({r['micro_batches_in_flight']} micro-batch(es) x"
           f" {_gib(r['activations_per_micro_batch'])})",
           f"  logits (transient){_gib(r['transient']):>12}",
           f"  state after step  {_gib(r['state']):>12}   ({est['state_bytes_per_param']:.4g} bytes per parameter)",
           f"  peak              {_gib(r['peak']):>12}   (all at once: {_gib(r['sum'])})"]
    if capacity is not None:
        out.append(f"  {est['device']} free now   {_gib(capacity):>12}   -> {'fits' if r['peak'] <= capacity else 'DOES NOT FIT'}")
    out += ["", "peak per rank with the options that change it:"]
    width = max([32] + [len(row["option"]) + 1 for row in rows])
    out += [f"  {row['option']:<{width}} {_gib(row['peak']):>12}" for row in rows]
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
