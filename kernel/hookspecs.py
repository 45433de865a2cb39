"""The hook specifications: everything a plugin can do.

A plugin is a module (or object) with functions decorated by `mega.hookimpl` whose names
match the specifications below. Plugins are found through the `mega.plugins` entry-point
group; first-party plugins use the same door.

Two families of hooks:

* Registration hooks are called once, each plugin separately, with a `register` callable::

      register(name, factory, config=AttrsClass)

  `name` is what an experiment writes in its TOML (e.g. `model.name = "gpt"`), `factory`
  builds the component, and `config` is the attrs class the kernel structures the
  component's TOML table into (unknown keys are rejected, types are checked). Registering a
  name another plugin already registered is an error naming both plugins.

  What the kernel then calls on the objects a factory returns is declared once, as
  protocols in `mega.protocols`; the docstrings below name the one that applies.

* Lifecycle hooks are called during a run with the `run` object (a `mega.training.Run`:
  its `config`, `run_dir`, `model`, `tokenizer` and `step`). Loggers and callbacks are
  plugins implementing them. Their return values are ignored.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("mega")


# --- registration hooks ------------------------------------------------------------------


@hookspec
def register_models(register):
    """Register model architectures.

    `factory(config, tokenizer, plugins) -> torch.nn.Module`. `config` is an instance of
    the attrs class passed as `config=`, which must subclass `mega.config.ModelConfig` (so
    it carries `micro_batch_size`, `seq_length`, `data`, `tokenizer`, `optim`, ...).
    `plugins` is the run's `mega.plugin_manager.Plugins`: build sub-components named in the
    config (e.g. hidden transforms and losses) from its `registries`, not from the
    process-wide plugins. Selected by `model.name`.

    The module is a `mega.protocols.LanguageModel` (`training_loss(batch) -> LossOutput`:
    the *sum* of the micro-batch's masked token losses, which the kernel divides by the
    global batch's token count, and/or `sample_loss_sum`, a sum of per-sample losses it
    divides by the global batch's sample count), and optionally a `PipelineStage`, `Generator`,
    `EncoderDecoder`, `StatefulModel` or `CountsFlops`. The samples it trains on are its
    config's `objective()` (a `mega.protocols.SampleObjective`, "lm" by default), or the
    built model's own `objective()` when it has one (`DeclaresObjective`: a task's model,
    whose samples come from the task it holds).
    """


@hookspec
def register_tokenizers(register):
    """Register tokenizers.

    `factory(config, corpus_files, run_dir) -> mega.protocols.Tokenizer` (`vocab_size`,
    `eos_id`, `pad_id`, `encode`, `decode`, `artifacts`; optionally `KnowsWordStarts`,
    `HasSpecialTokens`).
    `corpus_files` lets it train itself; `run_dir` is where to keep what it trains (None at
    inference). `config` subclasses `mega.config.TokenizerConfig`. Selected by
    `model.tokenizer.library`.
    """


@hookspec
def register_datasets(register):
    """Register dataset implementations.

    `factory(config, run_dir) -> mega.protocols.DataSource`: `files()` (text a tokenizer
    may train on) and `dataset(split, tokenizer, seq_length, num_samples, seed, objective)`,
    a sequence of `num_samples` sample dicts for the model's declared `objective`, sample
    `i` a pure function of `i` and `seed` (resume relies on it). `config` subclasses
    `mega.config.DataConfig`. Selected by `model.data.data_impl`.
    """


@hookspec
def register_optimizers(register):
    """Register optimizers.

    `factory(config, param_groups) -> torch.optim.Optimizer`. `param_groups` already
    separates weight-decayed from non-decayed parameters (biases and norms get none).
    `config` subclasses `mega.config.OptimConfig`. Selected by `model.optim.name`.
    """


@hookspec
def register_lr_schedulers(register):
    """Register learning-rate schedules.

    `factory(config, max_lr, max_steps) -> Callable[[int], float]` returning the learning
    rate for a step. Stateless, so resuming needs only the step. `config` subclasses
    `mega.config.SchedConfig`. Selected by `model.optim.sched.name`.
    """


@hookspec
def register_checkpoint_formats(register):
    """Register on-disk checkpoint formats.

    `factory() -> mega.protocols.CheckpointFormat`: `name`, `save(state, directory,
    parallel)` and `load(directory, parallel, parts) -> dict` for this model-parallel
    rank's part; optionally `NamesDirectories` and `CommitHook`. The kernel handles
    atomicity (temp dir then rename), checksums, the `latest` pointer and pruning; a format
    only reads and writes files. Selected by `exp_manager.checkpoint.format`.
    """


@hookspec
def register_loggers(register):
    """Register metric loggers.

    `factory(run) -> object` whose methods are lifecycle hook implementations
    (`on_step_end`, `on_validation_end`, ...). The kernel registers the object with the
    plugin manager for the duration of the run. Selected by `exp_manager.loggers` (and
    NeMo's `exp_manager.create_wandb_logger` / `create_mlflow_logger`, which add `wandb` /
    `mlflow`).

    A factory may have `check(config)`: called on every rank before the run directory is
    written, it raises a `mega.errors.ConfigError` for a logger that cannot run with this
    config (its optional package is not installed, its settings are wrong), so the run
    stops before any work instead of after the model is built.
    """


@hookspec
def register_hidden_transforms(register):
    """Register hiddens transforms for encoder-decoder models (`cls_name` in
    `model.hiddens.transform`): `register(cls_name, cls, config=AttrsClass)`.

    `cls` subclasses `mega.plugins.hiddens.HiddenTransform`. `config` subclasses
    `mega.config.HiddenTransformConfig` (which holds `cls_name` and `name`) and declares the
    constructor's keyword arguments, typed, with the constructor's defaults; each entry
    `model.hiddens.transform.<name>` is structured into it. The module is built with
    `cls(**fields, name=<name>)`, plus `model_parallel_cfg=` and `nemo_compat=` when the
    constructor takes them. Without `config`, only the base keys are accepted.
    """


@hookspec
def register_hidden_losses(register):
    """Register hiddens losses for encoder-decoder models (`cls_name` in
    `model.hiddens.loss`): `register(cls_name, cls, config=AttrsClass)`.

    As `register_hidden_transforms`, with `cls` subclassing
    `mega.plugins.hiddens.HiddenLoss` and `config` subclassing `mega.config.HiddenLossConfig`
    (which adds `loss_weight`); no `model_parallel_cfg` is passed.
    """


@hookspec
def register_tasks(register):
    """Register downstream tasks (fine-tuning and evaluation recipes):
    `register(name, factory, config=AttrsClass)`.

    `factory(config) -> mega.protocols.Task`; `config` is the run's `model` table, whose
    attrs class (passed as `config=`) subclasses `mega.config.ModelConfig` with the task's
    keys. This one call declares everything: the kernel also makes `name` a model (same
    config class, same plugin) whose factory builds the task and returns
    `task.model(tokenizer, plugins)`, so `model.name = "<task>"` trains, evaluates and
    predicts with it. Do not register the name with `register_models` as well (a
    PluginError names both plugins). Selected by `model.name`.
    """


@hookspec
def register_evaluation_harnesses(register):
    """Register evaluation harnesses that `mega evaluate RUN --harness TASKS` runs a
    checkpoint through (the first-party one: `lm_eval`, EleutherAI's lm-evaluation-harness):
    `register(name, run)`.

    `run(checkpoint, tasks, options, plugins) -> dict` scores the checkpoint (a path a user
    gave: run directory, checkpoint directory or archive; open it with
    `mega.checkpoint.restore`) on `tasks` (a list of the harness's task names) and returns
    the harness's results (JSON-serialisable; `results` maps each task to its metrics).
    `options`: include_path, num_fewshot, limit, batch_size, device, overrides (checkpoint
    config overrides), log_samples. Input errors raise a `mega.errors.ConfigError`.
    """


@hookspec
def register_model_converters(register):
    """Register how a model family's files map to other tools': `register(model_name,
    factory)`, once for each registered model name the converter handles.

    `factory() -> object` implementing any of `mega.protocols.HuggingFaceModelConverter`
    (config.json and the state dict of a transformers class), `MegatronModelConverter`
    (Megatron-LM's `args` and legacy checkpoints), `MegatronCoreNames` (megatron-core's
    keys: `torch_dist`, NeMo mcore) and `NemoModelConverter` (`.nemo` archives), and
    optionally `tokenizers`, the tokenizer libraries the family's files come with, in the
    order to try on import. The `huggingface`, `megatron`, `nemo` and `torch_dist`
    checkpoint formats keep the file I/O and dispatch through these: selected by the run's
    `model.name` on export, by what a file says (config.json's `model_type`, `args`,
    `model_config.yaml`) on import. No `config=`.
    """


@hookspec
def register_tokenizer_converters(register):
    """Register how a tokenizer's files map to other tools': `register(library, factory)`,
    `library` being its `model.tokenizer.library` name.

    `factory() -> object` implementing any of
    `mega.protocols.HuggingFaceTokenizerConverter` (files `AutoTokenizer` loads, and
    reading them back), `MegatronTokenizerConverter` (Megatron-LM's `tokenizer_type` and
    file fields) and `NemoTokenizerConverter` (NeMo's tokenizer section). Selected by the
    run's `model.tokenizer.library` on export; on import each candidate is asked in turn.
    No `config=`.
    """


# --- lifecycle hooks ---------------------------------------------------------------------


@hookspec
def on_train_start(run):
    """Called once, after the model, data and any resumed state are ready; `run.step` is
    the step training starts from (0, or the resumed step). Not called when the run is
    already at `trainer.max_steps` (nothing to train; `on_train_end` is not called either).

    Called on: every rank; loggers, attached on global rank 0 only, see it once.
    """


@hookspec
def on_step_end(run, step, metrics):
    """Called after every `trainer.log_every_n_steps`-th optimizer step (and the last).

    `metrics` is a dict of floats: `loss`, every loss term the model reported, `lr`,
    `grad_norm`, `tokens_per_sec` (every position of the batch), `loss_tokens_per_sec` (only
    tokens that carry loss: no padding), `data_wait_ms` (mean wait for data per step since
    the last log), `tflops`, `loss_scale` (fp16), `skipped` (fp16 overflow).
    `loss` and the terms are already reduced over ranks (the same on every rank); the
    timings (`tokens_per_sec`, `tflops`, `mfu`) are measured by each rank.

    Called on: every rank; loggers, attached on global rank 0 only, see it once.
    """


@hookspec
def on_validation_end(run, step, metrics):
    """Called after each validation pass with `val_loss` and the model's other `val_*`
    terms (reduced over ranks: the same on every rank).

    Called on: every rank; loggers, attached on global rank 0 only, see it once.
    """


@hookspec
def on_checkpoint_saved(run, step, path):
    """Called after a checkpoint is complete on disk and the `latest` pointer names it
    (periodic saves, the final save, and the save before a SIGTERM stop). Every rank gets
    the same `path`, after the collective save has finished on all of them.

    Called on: every rank; loggers, attached on global rank 0 only, see it once.
    """


@hookspec
def on_train_end(run):
    """Called once when training finishes normally.

    Called on: every rank; loggers, attached on global rank 0 only, see it once.
    """


@hookspec
def on_exception(run, exception):
    """Called when training stops with an exception (including KeyboardInterrupt), before
    it propagates. Use it to flush and close files. Errors while building the run (before
    `on_train_start`) do not reach it.

    A SIGTERM stop (`Preempted`) is raised on every rank at the same step; an error on one
    rank is raised there only (the launcher then ends the other workers).

    Called on: each rank whose loop raised; loggers, attached on global rank 0 only, see rank 0's.
    """
