"""Fine-tuning runs: the head model a task trains, the `task` data source, and the encoder
weights loaded when a run starts.

* Model: `model.name = "question_answering"` (a task's name, a model because the task is
  registered) builds the task, whose `model()` is `task_model`: the head model the task
  names (`bert_question_answering`, ...) from the task config's `language_model` keys, with
  the task's head options (number of labels). Its parameters keep the head model's names,
  so the head's checkpoints, converters and resharding apply as they are. The built model
  holds the task and answers `mega evaluate` (`evaluate`: the task's metrics), each
  validation of the run (`validation_metrics`: the same metrics, logged as `val_<name>`),
  `mega predict` (`predict`) and the data source (`objective`: the task's samples); those
  methods are added to the head model's class (a subclass made once per head class, as
  torch's parametrizations do) rather than by wrapping it, which would rename every parameter.
* Data (`model.data.data_impl = "task"`, the default of every task config): each split's
  samples are those of the task the run's model holds (built once, shared with its
  validation metrics); training cycles through them in a new order each epoch, sample `i`
  a pure function of `i` and the seed.
* Encoder weights: `on_train_start` of a run at step 0 copies the encoder of
  `model.language_model.lm_checkpoint` into the model (a resumed run has them in its own
  checkpoint).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Sequence

import attrs
import torch

import mega
from mega.config import DataConfig, ModelConfig
from mega.errors import ConfigError
from mega.plugins.tasks.config import TaskConfig, TaskObjective, head_config
from mega.plugins.tasks.encoder import load_encoder

log = logging.getLogger("mega")

OUTPUT_KEYS = ("logits", "start_logits", "end_logits")


# --- the model -------------------------------------------------------------------------------


def run_head(model, samples: Sequence[Dict[str, torch.Tensor]], batch_size: int,
             parallel=None) -> List[Dict[str, torch.Tensor]]:
    """The head's outputs (`logits`, `start_logits`/`end_logits`) for each sample, on the CPU,
    the same list on every rank of `parallel` (default: this process's layout; a collective).

    Data-parallel ranks each run one contiguous share of `samples` and gather the others'
    outputs, so a larger data-parallel size costs less time, not more. Under pipeline
    parallelism the hidden states pass stage to stage (`stage_logits`) and the last stage's
    outputs are broadcast to the pipeline; tensor-parallel ranks compute the same outputs."""
    from mega.runtime.parallel import current

    st = parallel if parallel is not None else current()
    share = -(-len(samples) // st.dp_size)
    mine = list(samples[st.dp_rank * share:(st.dp_rank + 1) * share])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = _head_outputs(model, mine, batch_size, st)
    finally:
        model.train(was_training)
    if st.dp_size > 1:
        import torch.distributed as dist

        shares: List[Any] = [None] * st.dp_size
        dist.all_gather_object(shares, out, group=st.dp_group)
        out = [o for part in shares for o in part]
    return out


def _head_outputs(model, samples, batch_size: int, st) -> List[Dict[str, torch.Tensor]]:
    """This data-parallel rank's outputs (see run_head), micro-batch by micro-batch."""
    from mega.runtime.collate import collate

    device = next(model.parameters()).device
    out: List[Dict[str, torch.Tensor]] = []
    for i in range(0, len(samples), batch_size):
        batch = {k: v.to(device) for k, v in collate(samples[i:i + batch_size]).items()}
        res = model.logits(batch) if st.pp_size == 1 else _pipelined_logits(model, batch, st, device)
        if res is not None:
            keys = [k for k in OUTPUT_KEYS if k in res]
            for j in range(len(batch["tokens"])):
                out.append({k: res[k][j].float().cpu() for k in keys})
    if st.pp_size > 1:  # only the last stage has them
        import torch.distributed as dist

        box = [out if st.is_last_stage else None]
        dist.broadcast_object_list(box, src=st.pp_ranks[-1], group=st.pp_group)
        out = box[0]
    return out


def _pipelined_logits(model, batch, st, device):
    """One micro-batch through this pipeline stage: receive the previous stage's hidden
    states, run `stage_logits`, send the result on; the head outputs on the last stage,
    None elsewhere."""
    import torch.distributed as dist

    if not callable(getattr(model, "stage_logits", None)):
        raise ConfigError(f"model.pipeline_model_parallel_size={st.pp_size}: the head {type(model).__name__} has no "
                          "stage_logits(batch, hidden) to run its outputs stage by stage; evaluate it at "
                          "model.pipeline_model_parallel_size=1 (mega evaluate's default, the checkpoint reshards)")
    hidden = None
    if not st.is_first_stage:
        hidden = torch.empty(model.activation_shape(batch), device=device, dtype=torch.float32)
        dist.recv(hidden, st.pp_ranks[st.pp_rank - 1])
    res = model.stage_logits(batch, hidden)
    if st.is_last_stage:
        return res
    dist.send(res.float().contiguous(), st.pp_ranks[st.pp_rank + 1])
    return None


def predictions_dir(config, split: str) -> Path:
    base = config.model.predictions_dir or str(Path(config.exp_manager.exp_dir) / config.exp_manager.name / "predictions")
    return Path(base).expanduser() / split


class TaskModel:
    """What a fine-tuned head adds: `evaluate` (mega.protocols.Evaluates) and `predict`
    (mega.protocols.Predicts), both through its task."""

    downstream_task: Any  # (the head model may use `task` for its own head kind)

    def evaluate(self, source, split: str, tokenizer, config) -> Dict[str, float]:
        from mega.runtime.parallel import current

        samples = self.downstream_task.samples(split, tokenizer)
        outputs = run_head(self, samples, config.model.micro_batch_size)
        directory = predictions_dir(config, split) if current().is_main else None
        metrics = self.downstream_task.evaluate(split, outputs, directory)
        if directory is not None:
            log.info("%s predictions written to %s", split, directory)
        return metrics

    def validation_metrics(self, run) -> Dict[str, float]:
        """The task's metrics over the whole valid split (mega.protocols.ValidationMetrics),
        as `mega evaluate --split valid` reports them, without writing prediction files.
        The split is the task's (`model.validation_ds.num_samples` keeps its first N
        examples); `trainer.limit_val_batches` bounds only the loss pass, which cuts the
        split into global batches where a metric may need more (SQuAD scores a question
        from all of its windows)."""
        samples = self.downstream_task.samples("valid", run.tokenizer)
        outputs = run_head(self, samples, run.config.model.micro_batch_size, run.parallel)
        return dict(self.downstream_task.evaluate("valid", outputs, None))

    def predict(self, inputs: Dict[str, Any], tokenizer) -> Dict[str, Any]:
        return self.downstream_task.predict(inputs, tokenizer, lambda samples: run_head(self, samples, 8))

    def objective(self) -> TaskObjective:
        """The samples this model trains on: its task's (mega.protocols.DeclaresObjective)."""
        return TaskObjective(task=self.downstream_task)


_CLASSES: Dict[type, type] = {}


def _with_task(model: torch.nn.Module, task) -> torch.nn.Module:
    base = type(model)
    if base not in _CLASSES:
        _CLASSES[base] = type(f"{base.__name__}ForTask", (TaskModel, base), {"__module__": __name__})
    model.__class__ = _CLASSES[base]
    model.downstream_task = task
    return model


def task_model(task, tokenizer, plugins):
    """`task`'s model (`TaskBase.model`): its head on the configured encoder, holding `task`."""
    entry = plugins.models.get(task.head, f"the head of task {task.config.name}")
    head = entry.factory(head_config(task.config, task, entry), tokenizer, plugins)
    return _with_task(head, task)


# --- the data ------------------------------------------------------------------------------------


class EpochOrder:
    """`num_samples` samples drawn epoch by epoch from `samples`, each epoch in its own
    seeded permutation (sample i depends only on i and the seed)."""

    def __init__(self, samples: Sequence, num_samples: int, seed: int, shuffle: bool = True):
        if not samples:
            raise ConfigError("the task produced no samples for this split")
        self.samples, self.num_samples, self.seed, self.shuffle = samples, num_samples, seed, shuffle
        self._perms: Dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int):
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        n = len(self.samples)
        epoch, k = divmod(int(i), n)
        if not self.shuffle:
            return self.samples[k]
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perms[epoch] = torch.randperm(n, generator=g)
        return self.samples[int(self._perms[epoch][k])]


class TaskData:
    """The `task` data source: a task's own files, read through the task."""

    def __init__(self, config: DataConfig, run_dir):
        self.config = config

    def files(self) -> List[Path]:
        return []  # a task trains no tokenizer: set model.tokenizer.vocab_file (the encoder's vocabulary)

    def _task(self, objective):
        if not isinstance(objective, TaskObjective) or objective.task is None:
            raise ConfigError(f"model.data.data_impl='task' serves fine-tuning tasks (model.name = question_answering, "
                              f"text_classification, ...); this model needs {getattr(objective, 'name', objective)!r} samples")
        return objective.task

    def dataset(self, split, tokenizer, seq_length, num_samples, seed, objective=None):
        task = self._task(objective)
        shuffle = task.config.split_files(split).shuffle  # NeMo's `<split>_ds.shuffle`
        return EpochOrder(task.samples(split, tokenizer), num_samples, seed,
                          shuffle=(split == "train") if shuffle is None else shuffle)

    def whole_split(self, split, tokenizer, seq_length, seed, objective=None):
        return self._task(objective).samples(split, tokenizer)


@mega.hookimpl
def register_datasets(register):
    register("task", TaskData, config=DataConfig)


@mega.hookimpl
def on_train_start(run):
    """A fine-tuning run from step 0 starts from the pretrained encoder."""
    mc = run.config.model
    if isinstance(mc, TaskConfig) and run.step == 0 and mc.language_model.lm_checkpoint:
        load_encoder(run.model, mc.language_model.lm_checkpoint, run.plugins, getattr(mc.tokenizer, "vocab_file", None))
