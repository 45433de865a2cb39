"""The `model` table of a fine-tuning run, in NeMo 1.x's key names.

A task's config *is* the run's model config (`model.name = "question_answering"`, ...): it
subclasses `mega.config.ModelConfig` (so batch sizes, parallel sizes, tokenizer and optimizer
keys are the usual ones) and adds

* `model.language_model.*`: which encoder (a pretrained name, a Megatron-style config file,
  or architecture keys) and where its weights are (`lm_checkpoint`);
* `model.train_ds`, `model.validation_ds`, `model.test_ds`: the task's files;
* `model.dataset.*`: the task's options (`max_seq_length`, `doc_stride`, `num_classes`, ...).

A task's registration (`register_tasks`: name, Task class, config class) is all there is:
the kernel makes the name a model too, whose factory builds the task and asks it for its
model (`TaskBase.model`); that model holds the task, and the `task` data source serves the
samples of the task the run's model holds (`TaskObjective`).
"""
from __future__ import annotations

from pathlib import Path

from typing import Any, ClassVar, Dict, Optional

import attrs
from attrs import define, field

from mega.config import DataConfig, ModelConfig
from mega.config.schema import at_least_one
from mega.errors import ConfigError
from mega.plugins.tasks.nemo_keys import BATCH, LOADER, nemo_key, note_unused
from mega.protocols import SampleObjective

PREDICTIONS = "mega writes predictions.json and nbest_predictions.json into model.predictions_dir"


@define(kw_only=True)
class LanguageModelConfig:
    """`model.language_model.*`: the encoder the task head sits on."""

    pretrained_model_name: Optional[str] = None  # e.g. megatron-bert-345m-uncased: fixes the architecture and tokenizer
    lm_checkpoint: Optional[str] = None  # encoder weights: a mega run/checkpoint/archive, Megatron iter_ dir, NGC zip, HF dir
    config_file: Optional[str] = None  # JSON with Megatron argument names (hidden-size, num-layers, ...); wins over `config`
    config: Dict[str, Any] = field(factory=dict)  # architecture keys of the head model (hidden_size, num_layers, ...)


@define(kw_only=True)
class DatasetFiles:
    """`model.{train,validation,test}_ds.*`: one split's files (a bare path is shorthand for
    the task's file key)."""

    __mega_shorthand__: ClassVar[str] = "file"

    file: Optional[str] = None  # SQuAD JSON; for classification tasks the same as file_path
    file_path: Optional[str] = None  # text classification / relation extraction TSV (`text<TAB>label`)
    text_file: Optional[str] = None  # token classification: one sentence per line (relative to dataset.data_dir)
    labels_file: Optional[str] = None  # token classification: one label per word (relative to dataset.data_dir)
    num_samples: int = -1  # use the first N examples; -1: all
    shuffle: Optional[bool] = None  # a new order of the split's samples each epoch; unset: the training split only (NeMo's defaults)
    batch_size: Optional[int] = nemo_key(BATCH)  # NeMo's per-GPU batch: accepted, not used (model.micro_batch_size)
    num_workers: Optional[int] = nemo_key(LOADER)  # NeMo's DataLoader option: accepted, not used
    pin_memory: Optional[bool] = nemo_key(LOADER, same=False)  # NeMo's DataLoader option: accepted, not used
    drop_last: Optional[bool] = nemo_key(LOADER, same=False)  # NeMo's DataLoader option: accepted, not used
    output_prediction_file: Optional[str] = nemo_key(PREDICTIONS)  # NeMo's: accepted, not used (predictions.json in model.predictions_dir)
    output_nbest_file: Optional[str] = nemo_key(PREDICTIONS)  # NeMo's: accepted, not used (nbest_predictions.json beside it)

    def path(self) -> Optional[str]:
        return self.file or self.file_path


_COMMON = {a.name for a in attrs.fields(ModelConfig)}


def _task_keys(message: str, has_dataset: bool) -> str:
    """`model.hidden_size` -> `model.language_model.config.hidden_size` (architecture keys
    live there in a task's table); `model.seq_length` -> `model.dataset.max_seq_length`."""
    import re

    def key(m):
        name = m.group(1)
        if name == "seq_length" and has_dataset:
            return "model.dataset.max_seq_length"
        return m.group(0) if name in _COMMON else f"model.language_model.config.{name}"
    return re.sub(r"\bmodel\.([a-z_]+)\b(?!\.)", key, message)


@attrs.frozen
class TaskObjective(SampleObjective):
    """A fine-tuning model's declared need (mega.protocols.DeclaresObjective): the samples
    of the task it holds, which the `task` data source serves."""

    name: str = "task"
    task: Any = attrs.field(default=None, eq=False, repr=False)


@define(kw_only=True)
class TaskConfig(ModelConfig):
    """Base of every task's `model` table."""

    name: str = "task"
    seq_length: int = field(default=128, validator=at_least_one)  # the padded length of every sample
    language_model: LanguageModelConfig = field(factory=LanguageModelConfig)
    train_ds: DatasetFiles = field(factory=DatasetFiles)
    validation_ds: DatasetFiles = field(factory=DatasetFiles)
    test_ds: DatasetFiles = field(factory=DatasetFiles)
    data: DataConfig = field(factory=lambda: DataConfig(data_impl="task"))  # the task's own files, not a corpus
    predictions_dir: Optional[str] = None  # where evaluation writes predictions; None: the run's predictions/<split> (beside an archive: <stem>/predictions/<split>)
    nemo_path: Optional[str] = nemo_key("mega export RUN PATH writes mega's archive")  # NeMo's .nemo written after training: accepted, not used (mega export RUN PATH)

    def __attrs_post_init__(self):
        # NeMo's key for the padded length is model.dataset.max_seq_length; model.seq_length follows it
        length = getattr(getattr(self, "dataset", None), "max_seq_length", None)
        if length is not None:
            self.seq_length = length

    @classmethod
    def tiny_preset(cls, directory) -> Optional[dict]:
        """A 2-layer, width-32 encoder trained from scratch on small toy files of this task in
        its real format (`mega.plugins.tasks.toy_tasks`), with a WordPiece vocabulary of
        their words. A task says which files with `tiny_task_keys`."""
        import re

        from mega.plugins.tasks.toy_tasks import write_tasks
        from mega.testing import write_vocab

        tasks = Path(directory) / "tasks"
        keys = cls.tiny_task_keys(tasks)
        if keys is None:
            return None
        write_tasks(tasks, train=48, dev=16)
        words = sorted({w for f in sorted(tasks.rglob("*")) if f.is_file()
                        for w in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", f.read_text().lower())})
        arch = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64,
                "max_position_embeddings": 128}
        return {"model": {"micro_batch_size": 4, "seed": 1, "language_model": {"config": arch},
                          "tokenizer": {"library": "wordpiece", "vocab_file": str(write_vocab(tasks / "vocab.txt", words))},
                          "optim": {"lr": 1e-3, "sched": {"name": "constant"}}, **keys}}

    @classmethod
    def tiny_task_keys(cls, tasks: Path) -> Optional[dict]:
        """This task's `model` keys naming the toy files `write_tasks(tasks)` writes; None:
        no tiny preset."""
        return None

    def split_files(self, split: str) -> DatasetFiles:
        return {"train": self.train_ds, "valid": self.validation_ds, "validation": self.validation_ds,
                "test": self.test_ds}[split]

    def split_key(self, split: str) -> str:
        return {"train": "model.train_ds", "valid": "model.validation_ds", "validation": "model.validation_ds",
                "test": "model.test_ds"}[split]

    def check(self, plugins) -> None:
        """Key errors, before anything runs; also resolves what the data decides (a label
        map read from the training files) into this config, so config.toml, checkpoints
        and archives carry it."""
        from mega.plugins.tasks.encoder import check_language_model, from_mega_checkpoint, tokenizer_defaults
        check_language_model(self, plugins)
        from_mega_checkpoint(self, plugins)
        tokenizer_defaults(self)
        from mega.plugins.tasks.finetune import head_config
        task = plugins.tasks.get(self.name, "model.name").factory(self)
        task.check()
        note_unused(self)
        entry = plugins.models.get(task.head, f"the head of task {self.name}")
        cfg = head_config(self, task, entry)
        try:
            cfg.check(plugins)
        except ConfigError as e:  # the head names its own keys: say where they are in a task's table
            raise ConfigError(_task_keys(str(e), getattr(self, "dataset", None) is not None)) from None
