"""The training loop: gradient accumulation, mixed precision, clipping, LR schedule,
validation, logging and checkpoints.

The loss of a step is the mean over every loss-bearing token of the global batch
(`mega.runtime.token_loss`), so micro-batch and data-parallel sizes change speed, never the
numbers. A step hands its micro-batches to a schedule of `mega.runtime.pipeline` with a
forward step that applies the run's precision; the loop keeps what a schedule does not
know: DDP, the loss scaler, clipping and the optimizer.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from typing import Dict

import torch

from mega.protocols import CountsFlops, ValidationMetrics
from mega.runtime import watchdog
from mega.runtime.compile import CompiledStep
from mega.runtime.device_peaks import peak_flops
from mega.runtime.grad_norm import clip_grad_norm
from mega.runtime.pipeline import forward_backward_no_pipelining, forward_backward_pipelining, sum_pipeline_grads
from mega.runtime.precision import autocast
from mega.runtime.tensor_parallel import sum_sequence_parallel_grads
from mega.runtime.unreached import KeepUnreached, drop_gradients, reached_on_any_rank, unreached_parameters
from mega.training import time_limits
from mega.training.batches import BatchLoader, load_micro_batches, micro_batch_positions

log = logging.getLogger("mega")


def _forward_step(run):
    """One micro-batch through this rank's part of the model under the run's autocast:
    `stage_forward` when pipelined, else `training_loss`; when training, through the loss
    module (DDP's wrapper, or model.megatron_amp_O2's, which leaves autocast)."""
    def forward_step(batch, hidden):
        training = torch.is_grad_enabled()
        with autocast(run.config.trainer.precision, run.device):
            if run.parallel.pp_size > 1:
                if training and run.main_params is not None:
                    return run.loss_module.stage_forward(batch, hidden)
                return run.model.stage_forward(batch, hidden)
            return run.loss_module(batch) if training else run.model.training_loss(batch)
    return forward_step


def _losses(run, micro_batches, num_tokens, num_samples=None):
    """Forward (and backward when training) of one global batch on this rank, through the
    schedule for its pipeline size; the batch's (loss, terms) summed over data-parallel ranks.

    Without pipelining, DDP averages gradients over ranks, so the loss is multiplied by the
    data-parallel size to make them the gradient of the global token mean; pipelines sum
    their gradients themselves (`sum_pipeline_grads`). Under model.megatron_amp_O2 the
    fp32 main gradients are averaged by `MainParams.reduce_grads`, pipelined or not, and
    the hidden states between stages travel in the parameters' dtype.
    """
    st, training = run.parallel, torch.is_grad_enabled()
    main = run.main_params
    scale = run.scaler.scale if run.scaler is not None else 1.0
    if st.pp_size == 1:
        loss, terms = forward_backward_no_pipelining(
            _forward_step(run), micro_batches, num_tokens, loss_scale=st.dp_size * scale, forward_only=not training,
            no_sync=run.loss_module.no_sync if training and st.dp_size > 1 else None, num_samples=num_samples)
    else:
        low = training and main is not None
        loss, terms = forward_backward_pipelining(
            _forward_step(run), micro_batches, num_tokens, parallel=st, device=run.device,
            tensor_shape=run.model.activation_shape(micro_batches[0]), loss_scale=(st.dp_size if low else 1) * scale,
            forward_only=not training, num_samples=num_samples,
            dtype=main.dtype if main is not None and main.converted else torch.float32,
            no_sync=main.no_sync if low and st.dp_size > 1 else None)
        if training and main is None:
            sum_pipeline_grads(run.model, st)
    return st.all_reduce_sum(loss), {k: st.all_reduce_sum(v) for k, v in terms.items()}


def _num_tokens(run, micro_batches) -> torch.Tensor:
    """Loss-bearing tokens of the global batch (at least 1: a batch without `loss_mask`,
    e.g. a classifier's, has none and its models return only per-sample losses)."""
    n = sum((mb["loss_mask"].sum() if "loss_mask" in mb else torch.zeros((), device=run.device))
            for mb in micro_batches)
    return run.parallel.all_reduce_sum(torch.as_tensor(n, dtype=torch.float32, device=run.device)).clamp(min=1.0)


def _num_samples(run, micro_batches) -> torch.Tensor:
    """Samples of the global batch: the divisor of per-sample losses (`sample_loss_sum`)."""
    n = sum(len(next(iter(mb.values()))) for mb in micro_batches)
    return run.parallel.all_reduce_sum(torch.tensor(float(n), device=run.device))


def train_step(run, loader: BatchLoader | None = None) -> Dict[str, object]:
    """One optimizer step on the global batch of `run.step`, read by `loader` (prefetched)
    or, without one, here. Besides the metrics, `data_wait_ms` (how long the step waited
    for its batch) and `loss_tokens` (the global batch's loss-bearing token count)."""
    cfg = run.config
    lr = run.lr_at(run.step)
    main = run.main_params  # model.megatron_amp_O2 or the distributed optimizer: fp32 main weights and gradients
    if main is not None:
        main.prepare()  # first step: the bf16 model / the shards the optimizer steps, built now
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    t0 = time.perf_counter()
    if loader is not None:
        micro_batches, wait = loader.get(run.step)
    else:
        positions = micro_batch_positions(run.step, run.global_batch_size, cfg.model.micro_batch_size,
                                          run.parallel.dp_rank, run.parallel.dp_size)
        micro_batches = load_micro_batches(run.train_data, positions, run.device)
        wait = time.perf_counter() - t0
    run.optimizer.zero_grad(set_to_none=True)
    num_tokens = _num_tokens(run, micro_batches)
    loss, terms = _losses(run, micro_batches, num_tokens, _num_samples(run, micro_batches))

    # zero gradients of adaptive buckets no rank reached: no step may apply them. Decided on the
    # device (weights and state put back after the step), or, for the distributed optimizer's
    # shards, on the host (their gradients dropped)
    keep = contextlib.nullcontext()
    if main is not None and main.sharded:
        unreached = unreached_parameters(run.model, run.parallel, run.device)
        params = drop_gradients(main.reduce_grads(), main.mains_of(unreached))
    else:
        sparse, reached = reached_on_any_rank(run.model, run.parallel, run.device)
        if main is not None:
            params = main.reduce_grads()  # the fp32 main weights, their gradients all-reduced in fp32
        else:
            params = [p for p in run.model.parameters() if p.grad is not None]
        if sparse:
            keep = KeepUnreached(main.mains_of(sparse) if main is not None else sparse, reached, run.optimizer)
    sum_sequence_parallel_grads(params, run.parallel)  # model.sequence_parallel: LayerNorms saw this rank's tokens
    skipped = False
    if run.scaler is not None:
        skipped = run.parallel.any(run.scaler.unscale_and_check(params))  # every stage skips together
        run.scaler.update(skipped)
    if skipped:
        grad_norm = float("nan")
        log.warning("step %d: fp16 gradients overflowed; step skipped, loss scale now %g", run.step + 1, run.scaler.scale)
    else:
        clip = cfg.trainer.gradient_clip_val
        grad_norm = clip_grad_norm(params, clip if clip > 0 else float("inf"), run.parallel,
                                   sharded=main is not None and main.sharded)
        with keep:
            run.optimizer.step()
        if main is not None:
            main.copy_to_model()
    # Device values stay tensors, read once per log interval (`read_metrics`); what the host
    # already knows stays a Python number, so reading it never waits for the device.
    metrics = {"loss": loss, "lr": float(lr), "grad_norm": grad_norm, **terms,
               "data_wait_ms": wait * 1e3, "loss_tokens": num_tokens.detach()}
    if run.scaler is not None:
        metrics["loss_scale"] = float(run.scaler.scale)
        metrics["skipped"] = float(skipped)
    return metrics


def read_metrics(metrics: Dict[str, object]) -> Dict[str, float]:
    """`metrics` as Python floats, with one device-to-host copy per device: the only point
    of a log interval where the host waits for the device. Python numbers pass through."""
    out, on_device = {}, {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            on_device.setdefault(v.device, []).append(k)
        else:
            out[k] = float(v)
    for device, keys in on_device.items():
        stacked = torch.stack([metrics[k].detach().reshape(()).to(torch.float64) for k in keys])
        out.update(zip(keys, stacked.tolist()))
    return {k: out[k] for k in metrics}


@torch.no_grad()
def validate(run) -> Dict[str, float]:
    """Mean token loss over the first `limit_val_batches` global batches of the valid split
    (the same batches every time, so values are comparable across steps), then what a
    `ValidationMetrics` model reports, each as `val_<name>`."""
    cfg = run.config
    if run.main_params is not None:
        run.main_params.sync_params()  # the distributed optimizer's parameters a forward has not gathered yet
    run.model.eval()
    loss_sum, token_sum, term_sums = 0.0, 0.0, {}
    try:
        for b in range(cfg.trainer.limit_val_batches):
            positions = micro_batch_positions(b, run.global_batch_size, cfg.model.micro_batch_size,
                                              run.parallel.dp_rank, run.parallel.dp_size)
            mbs = load_micro_batches(run.valid_data, positions, run.device)
            n = _num_tokens(run, mbs)
            loss, terms = _losses(run, mbs, n, _num_samples(run, mbs))
            loss_sum += float(loss) * float(n)
            token_sum += float(n)
            for k, v in terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + float(v) * float(n)
        metrics = {"val_loss": loss_sum / token_sum}
        metrics.update({f"val_{k}": v / token_sum for k, v in term_sums.items()})
        if isinstance(run.model, ValidationMetrics):
            extra = run.model.validation_metrics(run)
            metrics.update({f"val_{k}": float(v) for k, v in extra.items() if f"val_{k}" not in metrics})
    finally:
        run.model.train()
    return metrics


def _flops_per_token(run) -> float | None:
    """The model's own FLOP count (CountsFlops), so MFU says which count it uses."""
    return run.model.flops_per_token(run.config.model.seq_length) if isinstance(run.model, CountsFlops) else None


@contextlib.contextmanager
def attached_loggers(run):
    """Instantiate the loggers the run asks for (`exp_manager.loggers`, and the trackers
    NeMo's `create_wandb_logger` / `create_mlflow_logger` add) and register them with the
    plugin manager for the duration of training, so lifecycle hooks reach them."""
    names = []
    try:
        for name in run.config.exp_manager.logger_names() if run.parallel.is_main else []:
            entry = run.plugins.loggers.get(name, "exp_manager.loggers")
            names.append(f"logger:{name}")
            run.plugins.pm.register(entry.factory(run), name=names[-1])
        yield
    finally:
        for n in names:
            if run.plugins.pm.get_plugin(n) is not None:
                run.plugins.pm.unregister(name=n)


# The signals that stop a run after the current step with a checkpoint: a scheduler
# preempting the job (SIGTERM), Ctrl-C (SIGINT), and SLURM's warning before the time limit
# (`#SBATCH --signal=USR1@90`), after which the job is requeued and resumes.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class Preempted(SystemExit):
    """SIGTERM (a scheduler preempting the job), SIGINT (Ctrl-C) or SIGUSR1 (SLURM's warning
    before the time limit) arrived: a checkpoint of the last finished step was saved;
    re-running the same command resumes from it. Exit status 128 + the signal: 143 for
    SIGTERM, 130 for SIGINT, 138 for SIGUSR1."""

    def __init__(self, step: int, path, signum: int = signal.SIGTERM):
        super().__init__(128 + signum)
        self.step, self.path, self.signum = step, path, signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        again = "re-run the same command"
        if self.signum == getattr(signal, "SIGUSR1", None):
            again += " (or requeue the job: scontrol requeue $SLURM_JOB_ID)"
        return f"{name}: checkpoint of step {self.step} saved at {self.path}; {again} to resume"


class StopFlag:
    """Set by SIGTERM, SIGINT or SIGUSR1; remembers the first signal (the exit status follows it)."""

    def __init__(self):
        self._event = threading.Event()
        self.signum = None

    def set(self, signum: int = signal.SIGTERM) -> None:
        if self.signum is None:
            self.signum = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


# A launched worker can see one Ctrl-C twice: from the terminal (its process group) and
# forwarded by the launcher a moment later. A second SIGINT within this many seconds is the
# same keypress; a later one aborts.
_DUPLICATE_SIGINT_S = 1.0


@contextlib.contextmanager
def stop_flag():
    """Turn SIGTERM, SIGINT and SIGUSR1 into a flag the loop checks between steps (main
    thread only): the loop finishes the step, saves a checkpoint and exits 143 (SIGTERM),
    130 (SIGINT) or 138 (SIGUSR1). A second SIGINT raises KeyboardInterrupt at once."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    from mega.runtime.launch import launched

    first_sigint = []

    def on_sigint(signum, frame):
        now = time.monotonic()
        if first_sigint:
            if launched() and now - first_sigint[0] < _DUPLICATE_SIGINT_S:
                return
            raise KeyboardInterrupt
        first_sigint.append(now)
        log.warning("SIGINT: stopping after this step and saving a checkpoint (Ctrl-C again to abort at once)")
        flag.set(signal.SIGINT)

    def on_usr1(signum, frame):
        if flag.signum is None:
            log.warning("SIGUSR1: stopping after this step and saving a checkpoint (the job's time limit is near)")
        flag.set(signum)

    handlers = {signal.SIGTERM: lambda signum, frame: flag.set(signal.SIGTERM), signal.SIGINT: on_sigint}
    if hasattr(signal, "SIGUSR1"):
        handlers[signal.SIGUSR1] = on_usr1
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


sigterm_flag = stop_flag  # the former name


def train(run) -> None:
    """Train `run` to `trainer.max_steps` with its loggers attached. A run already there
    has nothing to do: no logger is attached, so its files (metrics, event files) stay as
    they are."""
    if run.step >= run.config.trainer.max_steps:
        log.info("nothing to do: the run is already at step %d of trainer.max_steps=%d", run.step,
                 run.config.trainer.max_steps)
        return
    spent = time_limits.budget_spent(run)
    if spent:
        log.info("nothing to do: %s", spent)
        return
    with attached_loggers(run), stop_flag() as stop:
        _train(run, stop)


def _train(run, stop: StopFlag) -> None:
    cfg, tr = run.config, run.config.trainer
    hook = run.plugins.hook
    every_ckpt = cfg.exp_manager.checkpoint.every_n_train_steps
    flops_per_token = _flops_per_token(run)
    tokens_per_step = run.global_batch_size * cfg.model.seq_length
    peak = peak_flops(run.device, tr.precision)
    run.model.train()
    loader = BatchLoader(run.train_data, run.global_batch_size, cfg.model.micro_batch_size, run.parallel.dp_rank,
                         run.parallel.dp_size, run.device, prefetch=cfg.model.data.prefetch, end_step=tr.max_steps)
    hook.on_train_start(run=run)
    run.started_at = time.monotonic()  # trainer.max_time / exp_manager.max_time_per_run count from here
    try:
        busy, steps_since = 0.0, 0  # time spent in training steps since the last log
        waited, loss_tokens = 0.0, 0.0  # data wait (ms) and loss-bearing tokens since the last log
        while run.step < tr.max_steps:
            watchdog.beat(run.step + 1)  # a rank that stops beating while others wait is named by theirs
            t0 = time.perf_counter()
            metrics = train_step(run, loader)
            busy += time.perf_counter() - t0
            waited += metrics.pop("data_wait_ms")  # a host number: no wait
            loss_tokens = loss_tokens + metrics.pop("loss_tokens")  # stays on the device until logged
            run.step += 1
            run.consumed_samples += run.global_batch_size
            steps_since += 1
            last = run.step == tr.max_steps
            if isinstance(run.loss_module, CompiledStep):  # graphs, graph breaks, recompilations: one line
                run.loss_module.after_step(run.step, last)
            if run.step % max(1, tr.log_every_n_steps) == 0 or last:
                t0 = time.perf_counter()
                values = read_metrics({**metrics, "loss_tokens": loss_tokens})  # waits for the device, once
                busy += time.perf_counter() - t0
                values["tokens_per_sec"] = tokens_per_step * steps_since / busy
                values["loss_tokens_per_sec"] = values.pop("loss_tokens") / busy  # without padding
                values["data_wait_ms"] = waited / steps_since  # per step: ~0 when prefetching keeps up
                if flops_per_token:
                    values["tflops"] = values["tokens_per_sec"] * flops_per_token / 1e12
                    if peak:  # model FLOP/s per device over the device's peak
                        values["mfu"] = values["tflops"] * 1e12 / (peak * run.parallel.world_size)
                if not math.isfinite(values["loss"]):
                    log.warning("step %d: loss is %s", run.step, values["loss"])
                run.last_metrics = values
                hook.on_step_end(run=run, step=run.step, metrics=values)
                busy, steps_since, waited, loss_tokens = 0.0, 0, 0.0, 0.0
            if run.valid_data is not None and (run.step % tr.val_check_interval == 0 or last):
                hook.on_validation_end(run=run, step=run.step, metrics=validate(run))
            run.mark_step_time()  # what a checkpoint of this step records, and trainer.max_time is checked against
            saved = None
            if (every_ckpt and run.step % every_ckpt == 0) or (last and cfg.exp_manager.checkpoint.save_last):
                saved = run.save_checkpoint()
            # Every rank stops at the same step: for one signal, or when any rank's clock is past a time limit.
            timed_out = time_limits.limit_reached(run)
            signum, time_up = run.parallel.max_ints(stop.signum or 0, timed_out is not None)
            if signum and not last:
                raise Preempted(run.step, saved or run.save_checkpoint(), signum)
            if time_up and not last:
                log.info("%s", time_limits.stopped_message(run, timed_out, saved or run.save_checkpoint()))
                break
    except BaseException as exc:
        loader.close()
        hook.on_exception(run=run, exception=exc)
        raise
    loader.close()
    if run.main_params is not None:
        run.main_params.sync_params()  # the trained model whole on every rank
    hook.on_train_end(run=run)
