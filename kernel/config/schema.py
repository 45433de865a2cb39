"""The configuration schema: attrs classes for every section of an experiment TOML.

Key names follow the NeMo/Megatron configs of the seeds (`trainer.max_steps`,
`model.micro_batch_size`, `model.data.data_prefix`, `exp_manager.exp_dir`, ...).

Components are chosen by name and their tables are structured with the config class their
plugin registered, which subclasses the base class here:

| table                 | chosen by       | base class        |
|-----------------------|-----------------|-------------------|
| `model`               | `name`          | `ModelConfig`     |
| `model.tokenizer`     | `library`       | `TokenizerConfig` |
| `model.data`          | `data_impl`     | `DataConfig`      |
| `model.optim`         | `name`          | `OptimConfig`     |
| `model.optim.sched`   | `name`          | `SchedConfig`     |

Components of which a model uses several, each under a name of the experiment's choosing,
are held in named tables (`NamedTables`): a table `{name = {cls_name = ..., ...}}` or an
array of such tables (order kept), each entry chosen by `cls_name`:

| entries of              | chosen by  | base class              |
|-------------------------|------------|-------------------------|
| `model.hiddens.transform` | `cls_name` | `HiddenTransformConfig` |
| `model.hiddens.loss`      | `cls_name` | `HiddenLossConfig`      |
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Literal, Optional, TypeVar, Union

import attrs
from attrs import define, field

from mega.protocols import SampleObjective


class Precision(str):
    """Training precision, normalised to "32", "16" or "bf16".

    Accepts what Lightning/NeMo configs use: 32, 16, "16-mixed", "bf16", "bf16-mixed"."""

    ALIASES = {
        "32": "32", "32-true": "32", "fp32": "32",
        "16": "16", "16-mixed": "16", "fp16": "16",
        "bf16": "bf16", "bf16-mixed": "bf16",
    }

    @classmethod
    def parse(cls, value) -> "Precision":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"expected 32, 16 or \"bf16\", got {value!r}")
        norm = cls.ALIASES.get(str(value).lower())
        if norm is None:
            raise ValueError(f"expected 32, 16 or \"bf16\" (or 16-mixed, bf16-mixed), got {value!r}")
        return cls(norm)


class Duration(str):
    """A length of time, normalised to Lightning's and NeMo's "DD:HH:MM:SS".

    Accepts that string (days may have more digits: "1:00:00:00"), or a table of
    `datetime.timedelta`'s fields as Lightning's Timer does ({hours = 3, minutes = 55}:
    weeks, days, hours, minutes, seconds)."""

    FIELDS = ("weeks", "days", "hours", "minutes", "seconds")

    @classmethod
    def parse(cls, value) -> "Duration":
        import datetime
        import re

        if isinstance(value, str):
            match = re.fullmatch(r"(\d+):(\d\d):(\d\d):(\d\d)", value.strip())
            if not match:
                raise ValueError(f"expected \"DD:HH:MM:SS\" (days:hours:minutes:seconds), got {value!r}")
            days, hours, minutes, seconds = (int(g) for g in match.groups())
            if hours > 23 or minutes > 59 or seconds > 59:
                raise ValueError(f"expected \"DD:HH:MM:SS\" with hours < 24, minutes and seconds < 60, got {value!r}")
            delta = datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
        elif isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.FIELDS))
            bad = [k for k, v in value.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0]
            if unknown or bad or not value:
                raise ValueError(f"expected a table of {', '.join(cls.FIELDS)} (non-negative numbers), got {value!r}")
            delta = datetime.timedelta(**value)
        else:
            raise ValueError(f"expected \"DD:HH:MM:SS\" or a table such as {{hours = 3, minutes = 55}}, got {value!r}")
        total = int(delta.total_seconds())
        if total <= 0:
            raise ValueError(f"must be longer than 0 seconds, got {value!r}")
        days, rest = divmod(total, 86400)
        return cls(f"{days:02d}:{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}")

    @property
    def seconds(self) -> int:
        days, hours, minutes, seconds = (int(x) for x in self.split(":"))
        return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


class InvalidValue(ValueError):
    """A value outside its key's range; the strict structuring reports it at `<table>.<key>`."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _at_least(bound, strict: bool = False):
    """An attrs validator: the value must be >= bound (> bound when `strict`); None passes
    (optional keys). NaN fails."""

    def check(_instance, attribute, value):
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return  # the type is the structuring's to check
        ok = value > bound if strict else value >= bound
        if not ok:
            raise InvalidValue(attribute.name, f"must be {'>' if strict else '>='} {bound}, got {value!r}")

    return check


def _only(*allowed):
    """An attrs validator: the value must be one of `allowed` (keys accepted for
    compatibility with NeMo configs, where mega offers a single behaviour)."""

    def check(_instance, attribute, value):
        if value not in allowed:
            raise InvalidValue(attribute.name, f"only {' or '.join(repr(a) for a in allowed)} is supported, got {value!r}")

    return check


positive = _at_least(0, strict=True)  # > 0
non_negative = _at_least(0)  # >= 0
at_least_one = _at_least(1)  # >= 1 (counts and sizes)


@define(kw_only=True)
class TrainerConfig:
    """`trainer.*`: how long and how to train, when to validate and log."""

    devices: int = field(default=1, validator=at_least_one)  # worker processes on this machine
    num_nodes: int = field(default=1, validator=at_least_one)  # machines (torchrun --nnodes)
    accelerator: str = "auto"  # "cpu", "gpu" or "auto"
    precision: Precision = Precision("32")  # 32, 16 (fp16 + dynamic loss scaling) or "bf16"
    compile: Literal[True, False, "auto"] = "auto"  # torch.compile the training step; "auto": with CUDA only (failures fall back to eager)
    max_steps: int = field(default=1000, validator=non_negative)  # optimizer steps
    val_check_interval: int = field(default=100, validator=non_negative)  # validate every N steps (and at the end); 0 disables
    limit_val_batches: int = field(default=10, validator=non_negative)  # global batches per validation
    log_every_n_steps: int = field(default=10, validator=at_least_one)  # metrics to every logger each N steps (and at the last)
    accumulate_grad_batches: int = field(default=1, validator=at_least_one)  # micro-batches per step (derived from global_batch_size if set)
    gradient_clip_val: float = field(default=1.0, validator=non_negative)  # max global grad norm; 0 disables clipping
    dist_timeout_s: int = field(default=600, validator=positive)  # a collective that waits longer (a hung or dead worker) fails the run
    max_time: Optional[Duration] = None  # stop with a checkpoint once training (summed over resumes) has run this long
    enable_progress_bar: Optional[bool] = None  # None: only on a terminal, never under CI/SLURM


@define(kw_only=True)
class CheckpointConfig:
    """`exp_manager.checkpoint.*`: when and how checkpoints are written."""

    format: str = "native"  # a registered checkpoint format
    every_n_train_steps: int = field(default=0, validator=non_negative)  # 0: only at the end of training
    keep_last_k: int = field(default=3, validator=non_negative)  # older checkpoints are deleted; 0 keeps all
    save_last: bool = True  # save when training ends


@define(kw_only=True)
class ExpManagerConfig:
    """`exp_manager.*`: where the run directory goes and what is written into it."""

    exp_dir: str = "results"
    name: str = "default"  # the run directory is exp_dir/name
    resume_if_exists: bool = True  # resume from the latest good checkpoint in the run directory
    resume_ignore_config_changes: bool = False  # resume even if keys that cannot resume safely changed (model shape, data, tokenizer)
    loggers: List[str] = field(factory=lambda: ["console", "jsonl", "tensorboard"])
    # NeMo's experiment-tracker switches: each adds its logger to `loggers` (docs/ecosystem.md)
    create_wandb_logger: bool = False  # add the `wandb` logger (Weights & Biases; pip install 'mega-lm[wandb]')
    wandb_logger_kwargs: Dict[str, Any] = field(factory=dict)  # its settings, NeMo's/Lightning's names: name, project, id, save_dir, offline, tags, ...
    create_mlflow_logger: bool = False  # add the `mlflow` logger (pip install 'mega-lm[mlflow]')
    mlflow_logger_kwargs: Dict[str, Any] = field(factory=dict)  # its settings, NeMo's names: experiment_name, run_name, tracking_uri, tags, run_id, ...
    checkpoint: CheckpointConfig = field(factory=CheckpointConfig)
    max_time_per_run: Optional[Duration] = None  # stop with a checkpoint once this start of the run has trained this long (under a job time limit)

    def logger_names(self) -> List[str]:
        """The loggers a run attaches: `loggers`, then `wandb` / `mlflow` when NeMo's
        `create_wandb_logger` / `create_mlflow_logger` ask for them (once each)."""
        names = list(self.loggers)
        for name, wanted in (("wandb", self.create_wandb_logger), ("mlflow", self.create_mlflow_logger)):
            if wanted and name not in names:
                names.append(name)
        return names


@define(kw_only=True)
class TokenizerConfig:
    """`model.tokenizer.*` base; `library` picks the tokenizer plugin."""

    library: str = "sentencepiece"  # a registered tokenizer
    model: Optional[str] = None  # a tokenizer model file; None lets a library train one


@define(kw_only=True)
class DataConfig:
    """`model.data.*` base; `data_impl` picks the dataset plugin."""

    data_impl: str = "text_mmap"  # a registered dataset implementation
    # [weight, path, weight, path, ...] (Megatron/NeMo style), or a list of paths (equal
    # weights), or one path. Empty: the quickstart corpus (Python's pydoc topics).
    data_prefix: List[Any] = field(factory=list)
    splits_string: str = "900,50,50"  # train,valid,test proportions of each file's documents
    prefetch: int = field(default=1, validator=non_negative)  # global batches read ahead in a background thread; 0: when needed


@define(kw_only=True)
class SchedConfig:
    """`model.optim.sched.*` base; `name` picks the learning-rate schedule."""

    name: str = "cosine"  # a registered learning-rate schedule
    warmup_steps: int = field(default=0, validator=non_negative)  # linear warmup from lr/warmup_steps to lr
    min_lr: float = field(default=0.0, validator=non_negative)  # the floor decaying schedules reach


@define(kw_only=True)
class OptimConfig:
    """`model.optim.*` base; `name` picks the optimizer plugin."""

    # How the distributed optimizer may shard this optimizer over data-parallel ranks, as its
    # plugin declares it: "elementwise" (each element's update depends on that element
    # only: AdamW, SGD), "per_tensor_norms" (it needs whole-tensor norms: LAMB's trust
    # ratio, summed over the shards), None (it cannot be sharded).
    sharding: ClassVar[Optional[str]] = None

    name: str = "adamw"  # a registered optimizer
    lr: float = field(default=3e-4, validator=positive)  # peak learning rate
    weight_decay: float = field(default=0.01, validator=non_negative)  # not applied to biases and norm weights
    use_distributed_optimizer: bool = False  # shard the fp32 main weights and optimizer state over data-parallel ranks (Megatron's --use-distributed-optimizer, ZeRO-1); the optimizer must declare it can be sharded
    overlap_grad_sync: bool = True  # with the distributed optimizer: reduce-scatter each bucket of model.grad_reduce_bucket_size elements while the last backward goes on (--overlap-grad-reduce); false: one bucket after the backward
    overlap_param_sync: bool = False  # with the distributed optimizer: all-gather each bucket's updated parameters when the next forward reaches it (--overlap-param-gather; needs overlap_grad_sync)
    grad_sync_dtype: str = field(default="fp32", validator=_only("fp32"))  # NeMo's key: gradients are always accumulated and reduced in fp32
    contiguous_grad_buffer: bool = field(default=True, validator=_only(True))  # NeMo's key: the gradient buffer is always contiguous
    sched: SchedConfig = field(factory=SchedConfig)


@define(kw_only=True)
class ModelConfig:
    """`model.*` base: what every model has; `name` picks the model plugin, whose config
    class subclasses this one and adds its architecture keys."""

    name: str = "gpt"  # a registered model
    micro_batch_size: int = field(default=4, validator=at_least_one)  # samples per forward/backward on each data-parallel rank
    global_batch_size: Optional[int] = field(default=None, validator=at_least_one)  # None: micro_batch_size x data-parallel x accumulate
    seq_length: int = field(default=512, validator=at_least_one)  # tokens per sample
    seed: int = 1234  # seeds initialisation, dropout and data order
    tensor_model_parallel_size: int = field(default=1, validator=at_least_one)  # ranks that split each layer (TP)
    pipeline_model_parallel_size: int = field(default=1, validator=at_least_one)  # stages the layers are split into (PP)
    # fp16 dynamic loss scaling (trainer.precision=16), NeMo's names
    native_amp_init_scale: float = field(default=4294967296.0, validator=positive)  # initial fp16 loss scale (2**32)
    native_amp_growth_interval: int = field(default=1000, validator=at_least_one)  # clean steps before the scale doubles
    hysteresis: int = field(default=2, validator=at_least_one)  # overflowing steps before the scale halves
    # Megatron's mixed-precision layout under NeMo's name for it (docs/performance.md)
    megatron_amp_O2: bool = False  # with trainer.precision="bf16" (or 16): parameters in that dtype without autocast, fp32 main weights stepped by the optimizer, gradients accumulated and all-reduced in fp32
    grad_reduce_bucket_size: int = field(default=40_000_000, validator=non_negative)  # with megatron_amp_O2 and data parallelism: fp32 gradient elements per all-reduce bucket, each started while the last micro-batch's backward goes on; 0: one all-reduce after the backward
    tokenizer: TokenizerConfig = field(factory=TokenizerConfig)
    data: DataConfig = field(factory=DataConfig)
    optim: OptimConfig = field(factory=OptimConfig)

    def check(self, plugins) -> None:
        """Raise a ConfigError, naming the keys, for a model that cannot be built (shapes
        that do not divide, components that do not fit together). The kernel calls it before
        anything touches the disk or workers are launched; `plugins` holds the run's
        registries. Nothing to check by default."""

    def objective(self) -> SampleObjective:
        """The samples this model trains on, handed to the data source (next-token by
        default; a model plugin overrides this to declare another need)."""
        return SampleObjective()

    @classmethod
    def tiny_preset(cls, directory) -> Optional[dict]:
        """A tiny instance of this model, as torchtitan's `debugmodel` or litgpt's
        `Config.from_name`: the experiment tables (at least `model`, with the tokenizer and
        data it needs) that build it and train a step in about a second on a CPU, writing
        whatever files it needs (a corpus, a vocabulary, task files) under `directory`.
        `mega.testing.tiny_preset(name, directory)` and its fixtures build tests on it; None:
        this model has no preset (a test of the registry lists it)."""
        return None


@define(kw_only=True)
class ExperimentConfig:
    """The whole experiment."""

    trainer: TrainerConfig = field(factory=TrainerConfig)
    model: ModelConfig = field(factory=ModelConfig)
    exp_manager: ExpManagerConfig = field(factory=ExpManagerConfig)


@define(kw_only=True)
class HiddenTransformConfig:
    """Base of one entry of `model.hiddens.transform`; `cls_name` picks the hidden transform."""

    cls_name: str  # a registered hidden transform
    name: Optional[str] = None  # unset: the entry's key


@define(kw_only=True)
class HiddenLossConfig:
    """Base of one entry of `model.hiddens.loss`; `cls_name` picks the hidden loss."""

    cls_name: str  # a registered hidden loss
    name: Optional[str] = None  # unset: the entry's key
    loss_weight: float = 1.0  # weight of this loss in the joint loss


T = TypeVar("T")
# A table of named component tables, or an array of such tables (order kept).
NamedTables = Union[Dict[str, T], List[Dict[str, T]]]


@attrs.frozen
class Slot:
    """A table whose config class is chosen by a name in it."""

    base: type
    kind: str  # the registry
    key: str  # the field holding the name


SLOTS = [
    Slot(ModelConfig, "models", "name"),
    Slot(TokenizerConfig, "tokenizers", "library"),
    Slot(DataConfig, "datasets", "data_impl"),
    Slot(OptimConfig, "optimizers", "name"),
    Slot(SchedConfig, "lr_schedulers", "name"),
    Slot(HiddenTransformConfig, "hidden_transforms", "cls_name"),
    Slot(HiddenLossConfig, "hidden_losses", "cls_name"),
]
