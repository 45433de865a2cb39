"""`mega evaluate`: a trained model's loss over a whole split, or (`--harness TASKS`) its
scores on benchmark tasks through the evaluation harness a plugin registers (lm-eval's).

The model is rebuilt from a checkpoint (a run directory, a checkpoint directory or a
one-file archive) at this process's parallel layout, resharded as `mega run` resumes, and
the split is read in full: every sample once (`mega.protocols.WholeSplit`), cut into
micro-batches of `model.micro_batch_size` spread over the data-parallel ranks, the last
batch padded with samples whose loss mask is zero, so no sample is dropped and none is
counted twice. The loss is token-weighted (sum of token losses / loss tokens) over the
whole split; perplexity is its exponential. Per-sample losses (a BERT's sentence-order
head) are left out: BERT is scored by its masked-LM loss. A model that evaluates its own way
(`mega.protocols.Evaluates`, e.g. Transformer-XL's memory across segments) is asked
instead.

The layout is one process unless the command line says otherwise
(`trainer.devices=2 model.tensor_model_parallel_size=2`, or
`model.pipeline_model_parallel_size=2`): the training run's layout does not matter,
checkpoints reshard on load. Data keys can be overridden too (a checkpoint
from elsewhere names its training machine's files: `model.data.data_prefix=[...]`).
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from mega.checkpoint import Opened, open_checkpoint, restore
from mega.checkpoint.atomic import atomic_write_text
from mega.config import ExperimentConfig
from mega.errors import ConfigError
from mega.protocols import DataSource, Evaluates, WholeSplit
from mega.registry import built

log = logging.getLogger("mega")

SPLITS = ("train", "valid", "test")
# A checkpoint's config keeps the layout it was trained at; evaluation starts from one process.
ONE_PROCESS = ("trainer.devices=1", "trainer.num_nodes=1", "model.tensor_model_parallel_size=1",
               "model.pipeline_model_parallel_size=1")


def resolve_target(path, plugins) -> Opened:
    """A run directory, a checkpoints/ folder, a checkpoint directory or an archive file,
    opened and verified (`mega.checkpoint.open_checkpoint`)."""
    return open_checkpoint(path, plugins)


def evaluation_config(target: Opened, overrides: Sequence[str], plugins) -> ExperimentConfig:
    """The checkpoint's config with one process as the layout, then the overrides. What the
    evaluation writes (a task's prediction files) goes into the run directory given, or
    beside an archive (model.mega -> model/), not into the training machine's `exp_dir`."""
    return target.config(plugins, [*ONE_PROCESS, *_output_place(target), *overrides])


def _output_place(target: Opened) -> Tuple[str, ...]:
    if target.archive is not None:
        home = target.archive.with_name(target.archive.stem)
    elif target.run_dir is not None:
        home = target.run_dir
    else:
        return ()
    return (f"exp_manager.exp_dir={json.dumps(str(home.parent.resolve()))}", f"exp_manager.name={json.dumps(home.name)}")


def results_path(target: Opened, split: str) -> Path:
    """RUN/eval_<split>.json; beside an archive, model.mega -> model.eval_<split>.json;
    in a checkpoint directory outside a run, there."""
    if target.archive is not None:
        return target.archive.with_name(f"{target.archive.stem}.eval_{split}.json")
    return (target.run_dir or target.checkpoint) / f"eval_{split}.json"


def evaluate_checkpoint(target: Opened, config: ExperimentConfig, split: str, plugins,
                        torchscript: bool = False) -> Dict[str, float]:
    """Metrics of `split` on every rank: build, load, score. Joins and leaves the process
    group of a launched worker. `torchscript`: through the model's scripted inference module
    (a model whose `evaluate` takes that keyword, see mega.protocols.Evaluates)."""
    from mega.runtime.parallel import init_parallel, pick_device, shutdown_parallel

    tr, mc = config.trainer, config.model
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    data_entry = plugins.datasets.get(mc.data.data_impl, "model.data.data_impl")
    plugins.models.get(mc.name, "model.name")
    parallel = init_parallel(tr.devices, tr.num_nodes, tr.dist_timeout_s, mc.tensor_model_parallel_size,
                             mc.pipeline_model_parallel_size)
    scratch = None
    try:
        device = pick_device(tr.accelerator, parallel.local_rank)
        model, tokenizer, _ = restore(target, plugins, config=config, parallel=parallel, device=device)
        data_dir = target.run_dir
        if data_dir is None:  # a generated corpus (the quickstart's) needs somewhere to be written
            scratch = data_dir = Path(tempfile.mkdtemp(prefix="mega-eval-"))
        with parallel.main_rank_first():
            source = built(data_entry, DataSource, data_entry.factory(mc.data, data_dir))
        if torchscript and not (isinstance(model, Evaluates)
                                and "torchscript" in inspect.signature(model.evaluate).parameters):
            raise ConfigError(f"--torchscript: model {mc.name!r} cannot evaluate through TorchScript")
        with torch.no_grad():
            if torchscript:
                metrics = dict(model.evaluate(source, split, tokenizer, config, torchscript=True))
            elif isinstance(model, Evaluates):
                metrics = dict(model.evaluate(source, split, tokenizer, config))
            else:
                metrics = token_loss(model, source, split, tokenizer, config, parallel, device)
    finally:
        shutdown_parallel()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if "loss" in metrics and "perplexity" not in metrics:
        metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))
    return metrics


def token_loss(model, source, split: str, tokenizer, config: ExperimentConfig, parallel, device) -> Dict[str, float]:
    """Token-weighted loss (and the model's extra terms) over every sample of `split`."""
    from mega.runtime.pipeline import forward_backward_pipelining
    from mega.runtime.precision import autocast
    from mega.runtime.collate import collate
    from mega.training.batches import micro_batch_positions
    from mega.training.run import objective_of

    mc = config.model
    if not isinstance(source, WholeSplit):
        raise ConfigError(f"model.data.data_impl={mc.data.data_impl!r}: this data source cannot list a whole split"
                          " (mega.protocols.WholeSplit), so mega evaluate cannot score it")
    samples = source.whole_split(split, tokenizer, mc.seq_length, mc.seed, objective_of(model, mc))
    n = len(samples)
    if n == 0:
        raise ConfigError(f"the {split} split has no samples")
    mbs, dp = mc.micro_batch_size, parallel.dp_size
    per_batch = mbs * dp
    padding = None
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    term_sums: Dict[str, torch.Tensor] = {}
    precision = config.trainer.precision

    def forward_step(batch, hidden):
        with autocast(precision, device):
            out = model.stage_forward(batch, hidden) if parallel.pp_size > 1 else model.training_loss(batch)
        if isinstance(out, dict):  # the token loss is scored; per-sample losses (BERT's binary head) are left out
            if "loss_sum" not in out:
                raise ConfigError(f"model.name={mc.name!r} has no token loss (only per-sample losses) for mega evaluate to score")
            out = {k: v for k, v in out.items() if k not in ("sample_loss_sum", "sample_terms")}
        return out

    for b in range(math.ceil(n / per_batch)):
        (positions,) = micro_batch_positions(b, per_batch, mbs, parallel.dp_rank, dp)
        picked = []
        for i in positions:
            if i < n:
                picked.append(samples[i])
            else:  # past the end: a sample that counts for nothing keeps every batch the same shape
                if padding is None:
                    padding = dict(samples[0])
                    padding["loss_mask"] = torch.zeros_like(padding["loss_mask"])
                picked.append(padding)
        batch = {k: v.to(device) for k, v in collate(picked).items()}
        if parallel.pp_size > 1:
            one = torch.ones((), device=device)
            loss, terms = forward_backward_pipelining(forward_step, [batch], one, parallel=parallel, device=device,
                                                      tensor_shape=model.activation_shape(batch), forward_only=True)
        else:
            out = forward_step(batch, None)
            loss, terms = out["loss_sum"], out.get("terms", {})
        loss_sum += loss.detach().double()
        for k, v in terms.items():
            term_sums[k] = term_sums.get(k, 0.0) + v.detach().double()
        tokens += batch["loss_mask"].double().sum()
    totals = torch.stack([loss_sum, tokens, *term_sums.values()])
    totals = parallel.all_reduce_sum(totals)
    count = float(totals[1])
    if count == 0:
        raise ConfigError(f"the {split} split has no tokens to score")
    metrics = {"loss": float(totals[0]) / count, "tokens": int(count), "samples": n}
    metrics.update({k: float(v) / count for k, v in zip(term_sums, totals[2:])})
    return metrics


def write_results(path: Path, record: dict) -> None:
    """JSON, written to a temporary name and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def evaluate_command(args, plugins=None) -> Tuple[int, Optional[dict]]:
    """`mega evaluate`: launch workers when the layout has several processes, else
    evaluate here; rank 0 prints the metrics and writes them. Returns (status, record)."""
    from mega.runtime.launch import launch_local_workers, launched

    if plugins is None:
        from mega.plugin_manager import get_plugins

        plugins = get_plugins()
    if getattr(args, "harness", None) is not None:
        return harness_command(args, plugins)
    target = resolve_target(args.checkpoint, plugins)
    config = evaluation_config(target, args.overrides, plugins)
    tr, mc = config.trainer, config.model
    from mega.runtime.slurm import adopt_srun_task

    adopt_srun_task(tr.devices, tr.num_nodes)  # under srun each task is one worker
    if tr.devices * tr.num_nodes > 1 and not launched():
        from mega.runtime.parallel import layout

        layout(tr.devices * tr.num_nodes, mc.tensor_model_parallel_size, mc.pipeline_model_parallel_size)
        if tr.num_nodes > 1:
            raise ConfigError(f"trainer.num_nodes={tr.num_nodes}: start one launcher per machine (torchrun ... -m mega evaluate ...)")
        launch_local_workers(tr.devices, args.argv)
        return 0, None
    metrics = evaluate_checkpoint(target, config, args.split, plugins, getattr(args, "torchscript", False))
    record = {"split": args.split, **metrics, "checkpoint": str(args.checkpoint)}
    if os.environ.get("RANK", "0") == "0":
        out = Path(args.output).expanduser() if args.output else results_path(target, args.split)
        write_results(out, record)
        print(json.dumps({k: v for k, v in record.items() if k != "checkpoint"}))
        log.info("wrote %s", out)
    return 0, record


# --- `mega evaluate RUN --harness TASKS`: a benchmark harness of a plugin --------------------

HARNESS = "lm_eval"  # the harness `--harness` runs (plugin registry `evaluation_harnesses`)


def harness_results_path(target: Opened) -> Path:
    """RUN/eval_harness.json; beside an archive, model.mega -> model.eval_harness.json."""
    return results_path(target, "harness")


def harness_command(args, plugins=None) -> Tuple[int, Optional[dict]]:
    """Score a checkpoint on benchmark tasks with the registered `lm_eval` harness, in this
    one process (a checkpoint of any tensor/pipeline layout is gathered into the whole
    model); print its table and write the results. Returns (status, results)."""
    if plugins is None:
        from mega.plugin_manager import get_plugins

        plugins = get_plugins()
    run = plugins.evaluation_harnesses.get(HARNESS, "--harness").factory
    tasks = [t for t in args.harness.replace(",", " ").split() if t]
    if not tasks:
        raise ConfigError("--harness: name at least one task (e.g. --harness hellaswag,arc_easy)")
    target = resolve_target(args.checkpoint, plugins)
    config = target.config(plugins, args.overrides)  # the overrides are checked here, before any model is built
    if config.trainer.devices * config.trainer.num_nodes > 1:
        raise ConfigError("--harness runs in one process (the checkpoint is gathered whatever its layout); drop"
                          " trainer.devices / trainer.num_nodes")
    options = {"include_path": args.include_path, "num_fewshot": args.num_fewshot, "limit": args.limit,
               "batch_size": args.batch_size, "device": args.device, "overrides": list(args.overrides),
               "log_samples": False}
    results = run(str(args.checkpoint), tasks, options, plugins)
    record = {"harness": HARNESS, "tasks": tasks, "checkpoint": str(args.checkpoint),
              "results": results.get("results", {}), "n-shot": results.get("n-shot", {}),
              "versions": results.get("versions", {}), "config": results.get("config", {})}
    out = Path(args.output).expanduser() if args.output else harness_results_path(target)
    write_results(out, json.loads(json.dumps(record, default=str)))
    print(json.dumps(record["results"], indent=2, default=str))
    log.info("wrote %s", out)
    return 0, results
