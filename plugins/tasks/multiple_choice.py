"""The `multiple_choice` task: RACE- or SWAG-style questions on `bert_multiple_choice`.

Files (`model.train_ds.file`, ...): a RACE directory or file (one JSON object per line:
`article`, `questions`, `options`, `answers` "A".."D") or a SWAG CSV (`sent1`, `sent2`,
`ending0..3`, `label`); `model.dataset.format` says which (`auto`: `.csv` is SWAG). Every
question of a file must have the same number of options. Metric: accuracy of the argmax
over the options; predictions are written to `predictions.tsv` (question index, predicted
option, gold option).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from attrs import define, field

import mega
from mega.config.schema import at_least_one
from mega.errors import ConfigError, DataError
from mega.plugins.tasks.base import TaskBase, need, softmax
from mega.plugins.tasks.config import TaskConfig
from mega.plugins.tasks.multiple_choice_data import clean_text, multiple_choice_sample, read_race, read_swag
from mega.plugins.tasks.text_classification import write_text


@define(kw_only=True)
class MultipleChoiceDatasetConfig:
    """`model.dataset.*` of multiple choice."""

    format: str = "auto"  # "race" (JSON lines), "swag" (CSV) or "auto" (by the file's extension)
    max_seq_length: int = field(default=512, validator=at_least_one)  # each option's [CLS] qa [SEP] context [SEP]
    max_qa_length: int = field(default=128, validator=at_least_one)  # tokens of the question + option kept (RACE's)


@define(kw_only=True)
class MultipleChoiceConfig(TaskConfig):
    name: str = "multiple_choice"
    dataset: MultipleChoiceDatasetConfig = field(factory=MultipleChoiceDatasetConfig)

    @classmethod
    def tiny_task_keys(cls, tasks):
        return {"train_ds": {"file": str(tasks / "swag_train.csv")}, "validation_ds": {"file": str(tasks / "swag_dev.csv")},
                "dataset": {"format": "swag", "max_seq_length": 40}}


class MultipleChoiceTask(TaskBase):
    head = "bert_multiple_choice"

    def check(self) -> None:
        if self.config.dataset.format not in ("auto", "race", "swag"):
            raise ConfigError(f"model.dataset.format: expected 'auto', 'race' or 'swag', got {self.config.dataset.format!r}")

    def read(self, path: Path):
        fmt = self.config.dataset.format
        if fmt == "swag" or (fmt == "auto" and path.suffix == ".csv"):
            return read_swag(path)
        return read_race(path)

    def build_samples(self, split, tokenizer):
        path = self.split_path(split)
        qs = self.limit(split, self.read(path))
        if len({len(q[0]) for q in qs}) > 1:
            raise DataError(f"{path}: questions have different numbers of options ({sorted({len(q[0]) for q in qs})}); "
                            "a batch needs one number")
        self.examples[split] = qs
        sw = self.subwords(tokenizer)
        return [multiple_choice_sample(f, s, label, sw, self.max_seq_length, self.config.dataset.max_qa_length)
                for f, s, label in qs]

    def evaluate(self, split, outputs, directory: Optional[Path]) -> Dict[str, float]:
        preds = [int(o["logits"].argmax()) for o in outputs]
        gold = [q[2] for q in self.examples[split]]
        if directory is not None:
            write_text(Path(directory) / "predictions.tsv", "".join(f"{i}\t{p}\t{g}\n" for i, (p, g) in enumerate(zip(preds, gold))))
        right = sum(p == g for p, g in zip(preds, gold))
        return {"accuracy": 100.0 * right / len(gold), "total": len(gold)}

    def predict(self, inputs, tokenizer, infer) -> Dict[str, Any]:
        need(inputs, "question", "choices")
        q, options, context = inputs["question"], inputs["choices"], clean_text(inputs.get("context") or "")
        firsts = [clean_text(q.replace("_", o) if "_" in q else f"{q} {o}") for o in options]
        sample = multiple_choice_sample(firsts, context, 0, self.subwords(tokenizer), self.max_seq_length,
                                        self.config.dataset.max_qa_length)
        probs = softmax(infer([sample])[0]["logits"])
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"choice": best, "text": options[best], "probabilities": probs}



@mega.hookimpl
def register_tasks(register):
    register("multiple_choice", MultipleChoiceTask, config=MultipleChoiceConfig)

