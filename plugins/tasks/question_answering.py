"""The `question_answering` task: SQuAD v1.1 / v2.0 on `bert_question_answering`.

Files: `model.train_ds.file`, `model.validation_ds.file`, `model.test_ds.file` (SQuAD
JSON). Options (`model.dataset.*`) are NeMo's, with its defaults. Evaluation writes
`predictions.json`, `nbest_predictions.json` and, for v2.0, `null_odds.json` (each
question's null score margin, BERT's file: the official script's `--na-prob-file`), and
reports the official script's numbers: v1.1 `exact_match` and `f1`; v2.0 `exact`, `f1` and
the `HasAns_*`/`NoAns_*` split of `predictions.json`, and `best_exact`/`best_f1` with their
thresholds as `--na-prob-file null_odds.json` gives them (in margin units: a threshold is a
`null_score_diff_threshold`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from attrs import define, field

import mega
from mega.config.schema import at_least_one
from mega.errors import ConfigError
from mega.plugins.tasks.base import TaskBase, need
from mega.plugins.tasks.config import TaskConfig
from mega.plugins.tasks.metrics import squad as squad_metrics
from mega.plugins.tasks.heads import QuestionAnsweringHead, mlp_options
from mega.plugins.tasks.nemo_keys import CACHE, LOADER, nemo_key
from mega.plugins.tasks.squad_data import convert_examples_to_features, load_squad_json, read_examples
from mega.plugins.tasks.squad_predictions import get_predictions, write_prediction_files


@define(kw_only=True)
class SquadDatasetConfig:
    """`model.dataset.*` of question answering."""

    version_2_with_negative: bool = False  # SQuAD v2.0: questions may have no answer
    max_seq_length: int = field(default=384, validator=at_least_one)  # [CLS] question [SEP] window [SEP], padded
    doc_stride: int = field(default=128, validator=at_least_one)  # how far apart a long context's windows start
    max_query_length: int = field(default=64, validator=at_least_one)  # question tokens kept (the first ones)
    max_answer_length: int = field(default=30, validator=at_least_one)  # longest answer predicted, in sub-tokens
    n_best_size: int = field(default=20, validator=at_least_one)  # candidates per question kept in nbest_predictions.json
    null_score_diff_threshold: float = 0.0  # v2.0: answer "" when the null score beats the best span by more
    do_lower_case: bool = True  # how answers are projected back to the context's text (match the tokenizer)
    use_cache: Optional[bool] = nemo_key(CACHE, same=False)  # NeMo's feature cache: accepted, not used (features are rebuilt, seconds)
    num_workers: Optional[int] = nemo_key(LOADER)  # NeMo's DataLoader option: accepted, not used
    pin_memory: Optional[bool] = nemo_key(LOADER, same=False)  # NeMo's DataLoader option: accepted, not used
    drop_last: Optional[bool] = nemo_key(LOADER, same=False)  # NeMo's DataLoader option: accepted, not used


@define(kw_only=True)
class QuestionAnsweringConfig(TaskConfig):
    name: str = "question_answering"
    dataset: SquadDatasetConfig = field(factory=SquadDatasetConfig)
    token_classifier: Optional[QuestionAnsweringHead] = None  # NeMo's head section: set, the head is NeMo's MLP (mega.plugins.tasks.heads); unset: mega's qa_head

    @classmethod
    def tiny_task_keys(cls, tasks):
        return {"train_ds": {"file": str(tasks / "squad_train.json")}, "validation_ds": {"file": str(tasks / "squad_dev.json")},
                "dataset": {"max_seq_length": 64, "doc_stride": 32, "max_query_length": 16}}


class QuestionAnsweringTask(TaskBase):
    head = "bert_question_answering"

    def head_options(self) -> Dict[str, Any]:
        return mlp_options(self.config.token_classifier, "model.token_classifier")

    def build_samples(self, split, tokenizer):
        d = self.config.dataset
        path = self.split_path(split)
        data = load_squad_json(path)
        examples = self.limit(split, read_examples(data, "train" if split == "train" else "eval", path))
        unanswerable = [e.qas_id for e in examples if e.is_impossible]
        if unanswerable and not d.version_2_with_negative:  # v1.1 scoring has no gold answer for them
            raise ConfigError(f"model.dataset.version_2_with_negative: {path} has {len(unanswerable)} question(s) without "
                              f"an answer (SQuAD v2.0; the first: {unanswerable[0]!r}); set "
                              "model.dataset.version_2_with_negative=true to train and score them")
        features = convert_examples_to_features(examples, self.subwords(tokenizer), d.max_seq_length, d.doc_stride,
                                                d.max_query_length, has_groundtruth=True)
        self.examples[split] = (data, examples, features)
        return [f.sample() for f in features]

    def _predict(self, examples, features, outputs):
        d = self.config.dataset
        logits = {f.unique_id: (o["start_logits"].tolist(), o["end_logits"].tolist()) for f, o in zip(features, outputs)}
        return get_predictions(examples, features, logits, d.n_best_size, d.max_answer_length,
                               d.version_2_with_negative, d.null_score_diff_threshold, d.do_lower_case)

    def evaluate(self, split, outputs, directory: Optional[Path]) -> Dict[str, float]:
        data, examples, features = self.examples[split]
        preds, nbest, null_odds = self._predict(examples, features, outputs)
        if directory is not None:
            write_prediction_files(directory, preds, nbest, null_odds)
        asked = {e.qas_id for e in examples}
        gold = [{**a, "paragraphs": [{**p, "qas": [q for q in p["qas"] if str(q["id"]) in asked]} for p in a["paragraphs"]]}
                for a in data["data"]]
        if self.config.dataset.version_2_with_negative:
            return {**squad_metrics.evaluate_v2(gold, preds), **squad_metrics.best_thresholds(gold, preds, null_odds)}
        return squad_metrics.evaluate_v1(gold, preds)

    def predict(self, inputs, tokenizer, infer) -> Dict[str, Any]:
        need(inputs, "question", "context")
        d = self.config.dataset
        data = {"data": [{"paragraphs": [{"context": inputs["context"],
                                          "qas": [{"id": "question", "question": inputs["question"]}]}]}]}
        examples = read_examples(data, "infer")
        features = convert_examples_to_features(examples, self.subwords(tokenizer), d.max_seq_length, d.doc_stride,
                                                d.max_query_length, has_groundtruth=False)
        preds, nbest, null_odds = self._predict(examples, features, infer([f.sample() for f in features]))
        out = {"answer": preds["question"], "nbest": nbest["question"][:5]}
        if "question" in null_odds:
            out["null_score_diff"] = null_odds["question"]
        return out



@mega.hookimpl
def register_tasks(register):
    register("question_answering", QuestionAnsweringTask, config=QuestionAnsweringConfig)
