"""Assembles a run from a config: plugins -> checks -> run dir -> data -> tokenizer ->
model -> optimizer -> resume, then hands it to the loop.

Everything that can be checked without writing is checked first, in this order: component
names, the model's shapes, the batch geometry, the config against the run already in the
run directory (if any); then rank 0 checks the directory (and its checkpoints/) is
writable, creates and locks it, and opens the data files and builds the tokenizer (which
may train into it); then the model, the optimizer, the train and validation data (an
empty split fails here) and the resumed checkpoint. config.toml and run.json are written
only after all of that succeeded, and not at all by a run that is already finished (it
has nothing to do, and its files stay as they are). A start that fails leaves no
config.toml behind, and removes a run directory it created.

The order matters for reproducibility: every generator is seeded from `model.seed` right
before the model is built, and a resumed run then overwrites model, optimizer, loss scaler,
RNG and data position with the checkpoint's, so it continues bit for bit.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import attrs
import torch

from mega.checkpoint import CheckpointManager, checkpoint_files, load_state, open_checkpoint, optimizer_param_names
from mega.checkpoint.reshard import decay_groups
from mega.config import ExperimentConfig, to_dict
from mega.errors import CheckpointError, ConfigError
from mega.protocols import (
    Batch,
    CheckpointFormat,
    DataSource,
    DeclaresObjective,
    LanguageModel,
    PipelineStage,
    SampleObjective,
    SavesOptimizerShards,
    StatefulModel,
    Tokenizer,
)
from mega.registry import built
from mega.runtime.parallel import ParallelState, check_devices, init_parallel, pick_device, shutdown_parallel
from mega.runtime.sharding import sharding_of
from mega.runtime.compile import CompiledStep, compile_wanted
from mega.runtime.bucket_space import BucketSpace
from mega.runtime.distrib_optimizer import DistributedMainParams, DistributedOptimizer
from mega.runtime.main_params import DTYPES as MAIN_PARAMS_DTYPES, MainParams, check_main_params
from mega.runtime.precision import DynamicLossScaler
from mega.runtime.rng import rng_state, seed_everything, set_rng_state
from mega.runtime.tensor_parallel import get_rng_tracker
from mega.training.batches import batch_geometry
from mega.training.run_dir import (
    check_config_unchanged,
    check_writable,
    lock_run_dir,
    prepare_run_dir,
    run_dir_of,
    unlock_run_dir,
)

log = logging.getLogger("mega")


@attrs.define(eq=False)
class Run:
    """Everything a training run holds; lifecycle hooks receive it as `run`."""

    config: ExperimentConfig
    plugins: Any
    run_dir: Path
    device: torch.device
    parallel: ParallelState
    tokenizer: Tokenizer
    model: LanguageModel  # a torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_at: Callable[[int], float]
    scaler: Optional[DynamicLossScaler]
    train_data: Sequence[Batch]  # DataSource.dataset(...)
    valid_data: Optional[Sequence[Batch]]
    checkpoints: CheckpointManager
    global_batch_size: int
    loss_module: torch.nn.Module  # model.training_loss as a module; DDP-wrapped when data-parallel
    step: int = 0
    consumed_samples: int = 0
    resumed_from: Optional[Path] = None
    last_metrics: Dict[str, float] = attrs.field(factory=dict)
    main_params: Optional[MainParams] = None  # model.megatron_amp_O2 (MainParams) or the distributed optimizer's buffers (DistributedMainParams)
    time_before_s: float = 0.0  # training time of the starts this one resumed (trainer.max_time counts it)
    time_elapsed_s: float = 0.0  # training time up to the end of the last finished step, over every start (checkpoints hold it)
    started_at: Optional[float] = None  # time.monotonic() when this start began training

    def mark_step_time(self) -> float:
        """Record the training time at the end of a step (Lightning's Timer: summed over every
        start of the run); what checkpoints save and trainer.max_time is checked against."""
        self.time_elapsed_s = self.time_before_s + self.time_this_start()
        return self.time_elapsed_s

    def time_this_start(self) -> float:
        """Seconds this start has trained (exp_manager.max_time_per_run counts these)."""
        import time

        return time.monotonic() - self.started_at if self.started_at is not None else 0.0

    def model_state_dict(self) -> dict:
        """The model's weights as checkpoints hold them: fp32 (the main weights under
        model.megatron_amp_O2, whose model holds bf16 copies)."""
        return self.main_params.state_dict() if self.main_params is not None else self.model.state_dict()

    # --- checkpoint state -------------------------------------------------------------------
    def state(self) -> dict:
        trainer = {"step": self.step, "consumed_samples": self.consumed_samples, "rng": rng_state(),
                   "time_elapsed_s": self.time_elapsed_s}
        if self.scaler is not None:
            trainer["loss_scaler"] = self.scaler.state_dict()
        if isinstance(self.model, StatefulModel):
            trainer["carried_state"] = self._gather_carried_state()
        state = {"model": self.model_state_dict(), "optimizer": self._optimizer_state(), "trainer": trainer,
                 "sharding": sharding_of(self.model, self.parallel), "config": to_dict(self.config),
                 "vocab_size": self.tokenizer.vocab_size,  # the real vocabulary (formats write it: orig_vocab_size)
                 "param_names": optimizer_param_names(self.model)}  # what the optimizer's integer ids refer to
        if self._sharded():  # the distributed optimizer's buffer layout (formats that store bucket space keep it)
            state["distributed_optimizer"] = self.main_params.layout_record()
        return state

    def _sharded(self) -> bool:
        return isinstance(self.main_params, DistributedMainParams) and self.main_params.converted

    def _optimizer_state(self):
        """Model space (the distributed optimizer's gathered to data-parallel rank 0), or this
        rank's shards for a format that saves them without a gather (torch_dist)."""
        if self._sharded() and isinstance(self.checkpoints.fmt, SavesOptimizerShards):
            return self.optimizer.shards()
        return self.optimizer.state_dict()

    def load_state(self, state: dict) -> None:
        if self.main_params is not None:
            self.main_params.load_state_dict(state["model"])
        else:
            self.model.load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            opt = state["optimizer"]
            if isinstance(opt, BucketSpace) and not isinstance(self.optimizer, DistributedOptimizer):
                opt = opt.to_model_space(optimizer_param_names(self.model), self.optimizer.state_dict()["param_groups"])
            self.optimizer.load_state_dict(opt)
        trainer = state.get("trainer", {})
        self.step = int(trainer.get("step", 0))
        self.consumed_samples = int(trainer.get("consumed_samples", self.step * self.global_batch_size))
        self.time_before_s = self.time_elapsed_s = float(trainer.get("time_elapsed_s", 0.0))
        if self.scaler is not None and "loss_scaler" in trainer:
            self.scaler.load_state_dict(trainer["loss_scaler"])
        if "rng" in trainer:
            set_rng_state(trainer["rng"])
        if isinstance(self.model, StatefulModel):
            self._load_carried_state(trainer.get("carried_state"))

    def _gather_carried_state(self) -> list:
        """Every data-parallel replica's carried state (a collective): only the first
        replica writes checkpoints, and each replica carries state of its own data."""
        state = self.model.carried_state()
        if self.parallel.dp_size == 1:
            return [state]
        gathered = [None] * self.parallel.dp_size
        torch.distributed.all_gather_object(gathered, {k: v.cpu() for k, v in state.items()}, group=self.parallel.dp_group)
        return gathered

    def _load_carried_state(self, saved: Optional[list]) -> None:
        if saved is None:
            return
        if len(saved) != self.parallel.dp_size:
            log.warning("carried model state was saved by %d data-parallel replicas, this run has %d: it starts afresh",
                        len(saved), self.parallel.dp_size)
            return
        self.model.load_carried_state({k: v.to(self.device) for k, v in saved[self.parallel.dp_rank].items()})

    def save_checkpoint(self) -> Path:
        """A collective: each model-parallel rank of the first data-parallel replica writes
        its part, rank 0 seals the checkpoint; every rank returns its path."""
        path = self._save_checkpoint()
        self.plugins.hook.on_checkpoint_saved(run=self, step=self.step, path=path)
        return path

    def _save_checkpoint(self) -> Path:
        if self.main_params is not None:
            self.main_params.sync_params()  # parameters whose all-gather a forward has not needed yet
        extra = checkpoint_files(self.config, self.tokenizer)
        meta = {"consumed_samples": self.consumed_samples, "tensor_model_parallel_size": self.parallel.tp_size,
                "pipeline_model_parallel_size": self.parallel.pp_size}
        return self.checkpoints.save(self.step, self.state(), extra, meta=meta, parallel=self.parallel)


class LossModule(torch.nn.Module):
    """`model.training_loss` as a forward, so DistributedDataParallel's hooks see it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.training_loss(batch)

    def no_sync(self):
        """Without DDP there is nothing to hold back between micro-batches."""
        return contextlib.nullcontext()

    def stage_forward(self, batch, hidden):
        """This pipeline stage's part of a training micro-batch (`PipelineStage`)."""
        return self.model.stage_forward(batch, hidden)


class BufferedLossModule(LossModule):
    """`model.training_loss` of a model whose gradients `main_params` accumulates and reduces
    in its fp32 buffer (the distributed optimizer; O2 below): its `no_sync` holds the
    reduction back until the last micro-batch, as DDP's does."""

    def __init__(self, model: torch.nn.Module, main_params: Optional[MainParams] = None):
        super().__init__(model)
        self.main_params = main_params

    def no_sync(self):
        return self.main_params.no_sync() if self.main_params is not None else contextlib.nullcontext()


class LowPrecisionLossModule(BufferedLossModule):
    """`model.training_loss` (or a pipeline stage's `stage_forward`) of a model that holds
    bf16 or fp16 parameters (model.megatron_amp_O2): outside autocast, so no weight or
    activation is cast. `main_params` reduces the fp32 gradients: its `no_sync` holds the
    all-reduce back until the last micro-batch, as DDP's does."""

    def forward(self, batch):
        return self._low_precision(self.model.training_loss, batch)

    def stage_forward(self, batch, hidden):
        return self._low_precision(self.model.stage_forward, batch, hidden)

    def _low_precision(self, fn, *args):
        with torch.autocast(next(self.model.parameters()).device.type, enabled=False):
            try:
                return fn(*args)
            except RuntimeError as exc:  # e.g. an fp32 buffer meets a bf16 weight in a matmul
                if "dtype" not in str(exc) and "Half" not in str(exc) and "BFloat16" not in str(exc):
                    raise
                raise ConfigError(f"model.megatron_amp_O2 = true: this model ({type(self.model).__name__}) does not run"
                                  f" with 16-bit parameters outside autocast ({exc}); train it without"
                                  " model.megatron_amp_O2 (trainer.precision alone)") from exc


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    params = dict(model.named_parameters())
    decay, no_decay = decay_groups(model)
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


def objective_of(model, config) -> SampleObjective:
    """The samples `model` trains on: its own declaration (mega.protocols.DeclaresObjective)
    when it has one, else its config's `objective()`."""
    if isinstance(model, DeclaresObjective):
        return model.objective()
    return config.objective()


def check_loggers(config: ExperimentConfig, plugins) -> None:
    """Every logger the run attaches exists, and can run with this config: a logger whose
    factory has `check(config)` (a missing optional package, bad settings) raises its
    ConfigError here, before the run directory is written."""
    for name in config.exp_manager.logger_names():
        key = "exp_manager.loggers" if name in config.exp_manager.loggers else f"exp_manager.create_{name}_logger"
        check = getattr(plugins.loggers.get(name, key).factory, "check", None)
        if check is not None:
            check(config)


def build_run(config: ExperimentConfig, plugins=None) -> Run:
    if plugins is None:
        from mega.plugin_manager import get_plugins

        plugins = get_plugins()
    created: list = []  # [run_dir] once _build_run made the run directory
    try:
        return _build_run(config, plugins, created)
    except BaseException:
        for run_dir in created:  # a run directory this call made holds nothing worth keeping
            unlock_run_dir(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _build_run(config: ExperimentConfig, plugins, created: list) -> Run:
    tr, mc = config.trainer, config.model
    check_devices(tr.accelerator, tr.devices)  # before joining a group on GPUs that are not there
    parallel = init_parallel(tr.devices, tr.num_nodes, tr.dist_timeout_s,
                             mc.tensor_model_parallel_size, mc.pipeline_model_parallel_size, tr.accelerator)
    device = pick_device(tr.accelerator, parallel.local_rank)
    gbs, _ = batch_geometry(mc.micro_batch_size, mc.global_batch_size, tr.accumulate_grad_batches, parallel.dp_size)
    # Resolve every component name before touching the disk, so a typo costs nothing.
    data_entry = plugins.datasets.get(mc.data.data_impl, "model.data.data_impl")
    tok_entry = plugins.tokenizers.get(mc.tokenizer.library, "model.tokenizer.library")
    model_entry = plugins.models.get(mc.name, "model.name")
    optim_entry = plugins.optimizers.get(mc.optim.name, "model.optim.name")
    sched_entry = plugins.lr_schedulers.get(mc.optim.sched.name, "model.optim.sched.name")
    fmt_entry = plugins.checkpoint_formats.get(config.exp_manager.checkpoint.format, "exp_manager.checkpoint.format")
    check_loggers(config, plugins)
    mc.check(plugins)  # shapes and wiring, before the run directory is written
    check_main_params(config)
    # A run directory a run already wrote: the config must still describe that run (read only).
    run_dir = run_dir_of(config)
    check_config_unchanged(config, run_dir)

    # A shared filesystem across nodes is assumed. Rank 0 checks the directory (and its
    # checkpoints/) can be written, creates and locks it, finds the data files and builds
    # the tokenizer; config.toml and run.json are written last, once the model, the data
    # and the resumed checkpoint are in place.
    with parallel.main_rank_first():
        if parallel.is_main:
            check_writable(run_dir)
            if not run_dir.exists():
                created.append(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            lock_run_dir(run_dir)
        source = built(data_entry, DataSource, data_entry.factory(mc.data, run_dir))
        tokenizer = built(tok_entry, Tokenizer, tok_entry.factory(mc.tokenizer, source.files(), run_dir))

    seed_everything(mc.seed)  # the same on every tensor- and data-parallel rank (Megatron's rule)
    get_rng_tracker().reset(mc.seed, parallel.tp_rank, device.type)
    model = built(model_entry, PipelineStage if parallel.pp_size > 1 else LanguageModel,
                  model_entry.factory(mc, tokenizer, plugins)).to(device)
    if parallel.pp_size > 1:  # after an identical init, each stage draws its own dropout masks (Megatron)
        torch.manual_seed(mc.seed + 100 * parallel.pp_rank)
    optimizer = optim_entry.factory(mc.optim, param_groups(model, mc.optim.weight_decay))
    lr_at = sched_entry.factory(mc.optim.sched, mc.optim.lr, tr.max_steps)
    scaler = None
    if str(tr.precision) == "16":
        scaler = DynamicLossScaler(mc.native_amp_init_scale, mc.native_amp_growth_interval, mc.hysteresis)

    objective = objective_of(model, mc)  # the model's declared need: next-token samples, span corruption, a task's ...
    train_data = source.dataset("train", tokenizer, mc.seq_length, tr.max_steps * gbs, mc.seed, objective)
    valid_data = None
    if tr.val_check_interval > 0 and tr.limit_val_batches > 0:
        valid_data = source.dataset("valid", tokenizer, mc.seq_length, tr.limit_val_batches * gbs, mc.seed, objective)

    main_params = None
    loss_module = LossModule(model)
    if mc.optim.use_distributed_optimizer:  # built at the first step, after resuming and on_train_start hooks
        decay, no_decay = decay_groups(model)
        dtype = MAIN_PARAMS_DTYPES[str(tr.precision)] if mc.megatron_amp_O2 else torch.float32
        main_params = DistributedMainParams(model, dtype, parallel, lambda groups: optim_entry.factory(mc.optim, groups),
                                            optimizer, decay, no_decay, mc.grad_reduce_bucket_size,
                                            mc.optim.overlap_grad_sync, mc.optim.overlap_param_sync)
        optimizer = DistributedOptimizer(main_params)
        loss_module = (LowPrecisionLossModule if mc.megatron_amp_O2 else BufferedLossModule)(model, main_params)
        if parallel.dp_size == 1:
            log.info("model.optim.use_distributed_optimizer: one data-parallel rank, so each shard is the whole state")
    elif mc.megatron_amp_O2:  # converted at the first step, after resuming and on_train_start hooks
        main_params = MainParams(model, MAIN_PARAMS_DTYPES[str(tr.precision)], parallel.dp_group, parallel.dp_size,
                                 mc.grad_reduce_bucket_size, parallel.embedding_group)
        loss_module = LowPrecisionLossModule(model, main_params)
    elif parallel.dp_size > 1 and parallel.pp_size == 1:  # pipelines all-reduce their own gradients
        from torch.nn.parallel import DistributedDataParallel

        loss_module = DistributedDataParallel(loss_module, device_ids=[device.index] if device.type == "cuda" else None,
                                              process_group=parallel.dp_group)
    if compile_wanted(tr.compile, device):
        if parallel.pp_size > 1:  # the pipeline schedule calls stage_forward, one stage at a time
            log.info("trainer.compile: not applied under pipeline parallelism; the stages run eagerly")
        elif getattr(model, "eager_reason", None):  # what the model does that torch.compile is not tested with
            log.info("trainer.compile: not applied with %s; the step runs eagerly", model.eager_reason)
        else:
            loss_module = CompiledStep(loss_module)
    run = Run(
        config=config, plugins=plugins, run_dir=run_dir, device=device, parallel=parallel, tokenizer=tokenizer,
        model=model, optimizer=optimizer, lr_at=lr_at, scaler=scaler, train_data=train_data, valid_data=valid_data,
        checkpoints=CheckpointManager(run_dir / "checkpoints", built(fmt_entry, CheckpointFormat, fmt_entry.factory()),
                                      config.exp_manager.checkpoint.keep_last_k),
        global_batch_size=gbs, loss_module=loss_module, main_params=main_params,
    )
    if config.exp_manager.resume_if_exists:
        resume(run, plugins)
    if run.resumed_from is None or run.step < tr.max_steps:  # a finished run has nothing to do: its files stay
        prepare_run_dir(config, plugins, write=parallel.is_main)
    return run


def resume(run: Run, plugins) -> None:
    """Continue from the run directory's latest checkpoint that verifies (nothing when it
    has none), through the checkpoint floor's one loading path."""
    path = run.checkpoints.latest_good()
    if path is None:
        if run.checkpoints.checkpoints():
            raise CheckpointError(f"{run.checkpoints.root}: checkpoints exist but none verifies; move them aside to start afresh")
        return
    opened = open_checkpoint(path, plugins)
    run.load_state(load_state(opened, run.parallel, run.model, plugins, run.optimizer))
    run.resumed_from = path
    log.info("resumed from %s (step %d, %d samples consumed)", path, run.step, run.consumed_samples)


def run(config: ExperimentConfig, plugins=None) -> Run:
    from mega.training.loop import train

    try:
        r = build_run(config, plugins)
        train(r)
    finally:
        unlock_run_dir(run_dir_of(config))
        shutdown_parallel()
    return r
