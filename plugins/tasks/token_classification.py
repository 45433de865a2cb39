"""The `token_classification` task (NER): NeMo's `text_*.txt` + `labels_*.txt` on
`bert_token_classification`.

Files: `model.dataset.data_dir` with `text_train.txt`/`labels_train.txt` (training) and
`text_dev.txt`/`labels_dev.txt` (validation and test), or other names in
`model.{train,validation,test}_ds.text_file`/`labels_file` (relative to `data_dir`, or
absolute). The label map (`pad_label` = 0, then the training labels sorted) is computed from
the training labels when the run starts and recorded in `model.dataset.label_ids`, so
checkpoints and archives carry it (NeMo's `model.label_ids`, {label: id}, sets it too);
`label_ids.csv` (one label per line, in id order; NeMo's `model.class_labels.class_labels_file`
names it) is written beside the predictions.

Evaluation reads one prediction per word (the first sub-token's) and reports entity-level
precision, recall and F1 (seqeval's default, conlleval-compatible rules: `precision`,
`recall`, `f1`, micro over entity types, as fractions x 100), token accuracy
(`token_accuracy`), and NeMo's token-level ClassificationReport (macro, `label_*`).

`model.dataset.class_balancing = "weighted_loss"` trains with NeMo's class-weighted cross
entropy: each labelled position's `loss_mask` is its label's weight
(`model.dataset.class_weights`, computed from the training labels when the run starts and
recorded there), and the kernel divides the loss by the global batch's sum of `loss_mask`:
sum(w * loss) / sum(w), NeMo's weighted mean, at any micro-batching. The logged `tok_acc`
is weighted the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from attrs import define, field

import mega
from mega.config.schema import at_least_one
from mega.errors import ConfigError
from mega.plugins.tasks.base import TaskBase, need
from mega.plugins.tasks.config import TaskConfig
from mega.plugins.tasks.metrics import seqeval
from mega.plugins.tasks.metrics.classification_report import ClassificationReport
from mega.plugins.tasks.heads import TokenClassifierHead, mlp_options
from mega.plugins.tasks.nemo_keys import CACHE, LOADER, LOWER_CASE, nemo_key
from mega.plugins.tasks.text_classification import write_text
from mega.plugins.tasks.text_classification_data import resolve_class_weights
from mega.plugins.tasks.token_classification_data import (
    build_label_ids,
    read_token_classification,
    token_classification_sample,
)

def nemo_label_ids(label_ids: Dict[str, int]) -> List[str]:
    """NeMo's `model.label_ids` ({label: id}) as mega's list of labels by id."""
    if sorted(label_ids.values()) != list(range(len(label_ids))):
        raise ConfigError(f"model.label_ids: the ids {sorted(label_ids.values())} must be 0..{len(label_ids) - 1}, each once")
    return [label for label, _ in sorted(label_ids.items(), key=lambda kv: kv[1])]


DEFAULT_FILES = {"train": ("text_train.txt", "labels_train.txt"), "valid": ("text_dev.txt", "labels_dev.txt"),
                 "test": ("text_dev.txt", "labels_dev.txt")}


@define(kw_only=True)
class TokenDatasetConfig:
    """`model.dataset.*` of token classification."""

    data_dir: Optional[str] = None  # where the text_*.txt / labels_*.txt files are
    max_seq_length: int = field(default=128, validator=at_least_one)  # longer sentences keep [CLS] and their tail
    pad_label: str = "O"  # label id 0: [CLS], [SEP] and padding
    ignore_extra_tokens: bool = False  # true: a word's 2nd, 3rd... sub-tokens carry no loss
    ignore_start_end: bool = False  # true: [CLS] and [SEP] carry no loss
    label_ids: List[str] = field(factory=list)  # labels by id; empty: pad_label, then the training labels sorted
    class_balancing: Optional[str] = None  # "weighted_loss": cross entropy weighted by class_weights (NeMo's); null: unweighted
    class_weights: List[float] = field(factory=list)  # by label id; empty: NeMo's total / (labels present x count) over the training words
    use_cache: Optional[bool] = nemo_key(CACHE, same=False)  # NeMo's feature cache: accepted, not used
    do_lower_case: Optional[bool] = nemo_key(LOWER_CASE)  # NeMo's: accepted, not used (model.tokenizer.do_lower_case decides)
    num_workers: Optional[int] = nemo_key(LOADER)  # NeMo's DataLoader option: accepted, not used
    pin_memory: Optional[bool] = nemo_key(LOADER, same=False)  # NeMo's DataLoader option: accepted, not used
    drop_last: Optional[bool] = nemo_key(LOADER, same=False)  # NeMo's DataLoader option: accepted, not used


@define(kw_only=True)
class TokenLabelsConfig:
    """`model.class_labels.*` of token classification (NeMo's)."""

    class_labels_file: str = "label_ids.csv"  # the label map (one label per line, in id order) written beside the predictions under this name


@define(kw_only=True)
class TokenClassificationConfig(TaskConfig):
    name: str = "token_classification"
    dataset: TokenDatasetConfig = field(factory=TokenDatasetConfig)
    label_ids: Optional[Dict[str, int]] = None  # NeMo's label -> id map (model.label_ids); given, it is model.dataset.label_ids
    class_labels: TokenLabelsConfig = field(factory=TokenLabelsConfig)
    head: Optional[TokenClassifierHead] = None  # NeMo's head section: set, the head is NeMo's MLP (mega.plugins.tasks.heads); unset: mega's

    @classmethod
    def tiny_task_keys(cls, tasks):
        return {"dataset": {"data_dir": str(tasks / "ner"), "max_seq_length": 48, "pad_label": "O"}}


class TokenClassificationTask(TaskBase):
    head = "bert_token_classification"

    def files(self, split: str):
        ds = self.config.split_files(split)
        default_text, default_labels = DEFAULT_FILES["train" if split == "train" else "valid"]
        base = Path(self.config.dataset.data_dir or ".").expanduser()
        text = ds.text_file or ds.file or default_text
        labels = ds.labels_file or default_labels
        return base / text, base / labels

    def check(self) -> None:
        d = self.config.dataset
        if self.config.label_ids:
            given = nemo_label_ids(self.config.label_ids)
            if d.label_ids and list(d.label_ids) != given:
                raise ConfigError(f"model.label_ids {self.config.label_ids} and model.dataset.label_ids {d.label_ids} "
                                  "differ; set one of them")
            d.label_ids = given
        if not d.label_ids:
            text, labels = self.files("train")
            if not labels.is_file():
                raise ConfigError(f"model.dataset.data_dir / model.train_ds.labels_file: {labels} not found "
                                  "(the label map is read from the training labels)")
            sentences = read_token_classification(text, labels)
            d.label_ids = list(build_label_ids([l for _, l in sentences], d.pad_label))
        if d.label_ids[0] != d.pad_label:
            raise ConfigError(f"model.dataset.label_ids: the first label (id 0) must be pad_label {d.pad_label!r}")
        self.class_weights()

    def class_weights(self) -> Optional[List[float]]:
        """`model.dataset.class_weights` when `class_balancing = "weighted_loss"`: NeMo's
        weights from the label of every word of the training labels file (pad_label's
        words included), computed once and recorded; else None."""
        def training_labels():
            ids = self.label_map
            return [ids[label] for _, labels in read_token_classification(*self.files("train")) for label in labels
                    if label in ids]
        return resolve_class_weights(self.config.dataset, len(self.config.dataset.label_ids), training_labels)

    @property
    def label_map(self) -> Dict[str, int]:
        return {name: i for i, name in enumerate(self.config.dataset.label_ids)}

    def head_options(self) -> Dict[str, Any]:
        return {"num_labels": len(self.config.dataset.label_ids), **mlp_options(self.config.head, "model.head")}

    def _sample(self, words, labels, tokenizer, where=""):
        d = self.config.dataset
        sample = token_classification_sample(words, labels, self.subwords(tokenizer), self.label_map, self.max_seq_length,
                                             d.pad_label, d.ignore_extra_tokens, d.ignore_start_end, where)
        weights = self.class_weights() if labels is not None else None
        if weights is not None:  # each labelled position weighs its label's weight (see the module docstring)
            sample["loss_mask"] = sample["loss_mask"] * torch.tensor(weights, dtype=torch.float)[sample["labels"]]
        return sample

    def build_samples(self, split, tokenizer):
        text, labels = self.files(split)
        self.examples[split] = self.limit(split, read_token_classification(text, labels))
        return [self._sample(w, l, tokenizer, str(labels)) for w, l in self.examples[split]]

    def word_predictions(self, sample, output) -> List[int]:
        first = sample["subtokens_mask"].bool()
        return output["logits"][first].argmax(-1).tolist()

    def evaluate(self, split, outputs, directory: Optional[Path]) -> Dict[str, float]:
        names = self.config.dataset.label_ids
        samples = self._cache[split]  # built by samples() before the outputs were computed
        report = ClassificationReport(len(names), self.label_map, mode="macro")
        y_true, y_pred = [], []
        for sample, output in zip(samples, outputs):
            first = sample["subtokens_mask"].bool()
            pred = self.word_predictions(sample, output)
            gold = sample["labels"][first].tolist()
            report.update(pred, gold)
            y_true.append([names[i] for i in gold])
            y_pred.append([names[i] for i in pred])
        p, r, f = seqeval.precision_recall_f1(y_true, y_pred, zero_division=0)
        metrics = {"precision": 100 * p, "recall": 100 * r, "f1": 100 * f,
                   "token_accuracy": 100 * seqeval.accuracy_score(y_true, y_pred)}
        lp, lr, lf = report.compute("macro")
        metrics.update({"label_macro_precision": lp, "label_macro_recall": lr, "label_macro_f1": lf})
        if directory is not None:
            write_text(Path(directory) / "predictions.txt", "".join(" ".join(s) + "\n" for s in y_pred))
            write_text(Path(directory) / Path(self.config.class_labels.class_labels_file).name,
                       "".join(f"{n}\n" for n in names))
            write_text(Path(directory) / "report.txt", report.report() + "\n")
        return metrics

    def predict(self, inputs, tokenizer, infer) -> Dict[str, Any]:
        need(inputs, "text")
        words = inputs["text"].split()
        sample = self._sample(words, None, tokenizer)
        pred = self.word_predictions(sample, infer([sample])[0])
        names = self.config.dataset.label_ids
        labels = [names[i] for i in pred]
        kept = words[len(words) - len(labels):]  # a sentence longer than max_seq_length keeps its tail
        entities = [{"type": t, "text": " ".join(kept[s:e + 1])} for t, s, e in seqeval.get_entities(labels)]
        return {"words": kept, "labels": labels, "entities": entities}



@mega.hookimpl
def register_tasks(register):
    register("token_classification", TokenClassificationTask, config=TokenClassificationConfig)
