"""NeMo 1.x's own task configs load: their DataLoader keys, caches, `.nemo` path, label
map keys and head sections are accepted; those with a meaning in mega have it (`shuffle`,
`model.label_ids`, a token classification's `class_labels.class_labels_file`, the head
sections: NeMo's MLP heads, tests/test_nemo_task_archives.py), the others
are named in one log line, the same way for every task (mega.plugins.tasks.nemo_keys).

The `model` tables below carry the keys of NeMo's example configs
(`examples/nlp/{question_answering,text_classification,token_classification}/conf/*.yaml`)
with their default values."""
from __future__ import annotations

import pytest
import torch

from mega.config import config_from_dict
from mega.errors import ConfigError
from mega.plugins.tasks.config import TaskObjective
from tests.test_downstream_tasks import _files, _raw

LOADER = {"batch_size": 64, "shuffle": True, "num_samples": -1, "num_workers": 3, "drop_last": False, "pin_memory": False}


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("nemo-keys"))["dir"]


def _nemo(d, name):
    tables = {
        "question_answering": {
            "nemo_path": None,
            "dataset": {"version_2_with_negative": False, "doc_stride": 8, "max_query_length": 8, "max_seq_length": 32,
                        "max_answer_length": 30, "null_score_diff_threshold": 0.0, "n_best_size": 20, "use_cache": True,
                        "do_lower_case": True, "num_workers": 2, "pin_memory": False, "drop_last": False},
            "train_ds": {"file": str(d / "squad.json"), "batch_size": 24, "shuffle": True, "num_samples": -1},
            "validation_ds": {"file": str(d / "squad.json"), "batch_size": 24, "shuffle": False, "num_samples": -1},
            "test_ds": {"file": str(d / "squad.json"), "batch_size": 24, "shuffle": False, "num_samples": -1,
                        "output_prediction_file": "test_prediction.json", "output_nbest_file": "test_nbest.json"},
            "token_classifier": {"num_layers": 1, "dropout": 0.0, "num_classes": 2, "activation": "relu",
                                 "log_softmax": False, "use_transformer_init": True}},
        "text_classification": {
            "nemo_path": "text_classification_model.nemo",
            "classifier_head": {"num_output_layers": 2, "fc_dropout": 0.1},
            "class_labels": {"class_labels_file": str(d / "labels.txt")},
            "dataset": {"num_classes": 2, "do_lower_case": False, "max_seq_length": 16, "class_balancing": None,
                        "use_cache": False},
            "train_ds": {"file_path": str(d / "sentiment.tsv"), **LOADER},
            "validation_ds": {"file_path": str(d / "sentiment.tsv"), **LOADER, "shuffle": False},
            "infer_samples": ["a very good film"]},
        "token_classification": {
            "nemo_path": None, "label_ids": None, "class_labels": {"class_labels_file": "label_ids.csv"},
            "dataset": {"data_dir": str(d / "ner"), "class_balancing": None, "max_seq_length": 16, "pad_label": "O",
                        "ignore_extra_tokens": False, "ignore_start_end": False, "use_cache": True, "num_workers": 2,
                        "pin_memory": False, "drop_last": False},
            "train_ds": {"text_file": "text_train.txt", "labels_file": "labels_train.txt", "shuffle": True,
                         "num_samples": -1, "batch_size": 64},
            "validation_ds": {"text_file": "text_dev.txt", "labels_file": "labels_dev.txt", "shuffle": False,
                              "num_samples": -1, "batch_size": 64},
            "head": {"num_fc_layers": 2, "fc_dropout": 0.5, "activation": "relu", "use_transformer_init": True}},
    }
    return {"name": name, **tables[name]}


NOTED = {
    "question_answering": ["model.train_ds.batch_size", "model.validation_ds.batch_size", "model.test_ds.batch_size",
                           "model.test_ds.output_prediction_file", "model.test_ds.output_nbest_file",
                           "model.dataset.use_cache", "model.dataset.num_workers"],
    "text_classification": ["model.train_ds.batch_size", "model.train_ds.num_workers", "model.validation_ds.batch_size",
                            "model.validation_ds.num_workers", "model.dataset.do_lower_case",
                            "model.infer_samples", "model.nemo_path"],
    "token_classification": ["model.train_ds.batch_size", "model.validation_ds.batch_size", "model.dataset.use_cache",
                             "model.dataset.num_workers"],
}


@pytest.mark.parametrize("name", sorted(NOTED))
def test_nemo_task_configs_load_and_name_the_keys_mega_does_not_use(plugins, d, tmp_path, caplog, name):
    cfg = config_from_dict(_raw(d, tmp_path, name, _nemo(d, name)), [], plugins)
    with caplog.at_level("WARNING", logger="mega"):
        cfg.model.check(plugins)
    (line,) = [r.getMessage() for r in caplog.records if "NeMo keys" in r.getMessage()]
    noted = [key for group in line.split(": ", 1)[1].split("; ") for key in group.split(" (")[0].split(", ")]
    assert sorted(noted) == sorted(NOTED[name])
    assert "pin_memory" not in line and "drop_last" not in line  # false: what mega does anyway


def _order(plugins, cfg, split, tokenizer):
    task = plugins.tasks.get(cfg.model.name).factory(cfg.model)
    source = plugins.datasets.get("task").factory(cfg.model.data, None)
    samples = task.samples(split, tokenizer)
    data = source.dataset(split, tokenizer, cfg.model.seq_length, len(samples), 3, TaskObjective(task=task))
    return [next(i for i, s in enumerate(samples) if s is data[k]) for k in range(len(samples))]


def test_shuffle_is_the_splits_epoch_order(plugins, d, tmp_path):
    raw = _raw(d, tmp_path, "tc", _nemo(d, "text_classification"))
    cfg = config_from_dict(raw, [], plugins)
    tokenizer = plugins.tokenizers.get("wordpiece").factory(cfg.model.tokenizer, [], None)
    in_order = list(range(16))  # the 16 examples of sentiment.tsv
    assert _order(plugins, cfg, "train", tokenizer) != in_order  # NeMo's train_ds.shuffle = true
    assert _order(plugins, cfg, "valid", tokenizer) == in_order
    raw["model"]["train_ds"]["shuffle"], raw["model"]["validation_ds"]["shuffle"] = False, True
    cfg = config_from_dict(raw, [], plugins)
    assert _order(plugins, cfg, "train", tokenizer) == in_order
    assert sorted(_order(plugins, cfg, "valid", tokenizer)) == in_order != _order(plugins, cfg, "valid", tokenizer)


def test_token_classification_label_ids_and_class_labels_file(plugins, d, tmp_path):
    raw = _raw(d, tmp_path, "ner", _nemo(d, "token_classification"))
    raw["model"]["label_ids"] = {"O": 0, "B-PER": 1, "I-PER": 2, "B-LOC": 3, "B-ORG": 4}  # NeMo's {label: id}
    raw["model"]["class_labels"]["class_labels_file"] = "ner_labels.csv"
    cfg = config_from_dict(raw, [], plugins)
    cfg.model.check(plugins)
    assert cfg.model.dataset.label_ids == ["O", "B-PER", "I-PER", "B-LOC", "B-ORG"]  # not the sorted training labels
    task = plugins.tasks.get("token_classification").factory(cfg.model)
    tokenizer = plugins.tokenizers.get("wordpiece").factory(cfg.model.tokenizer, [], None)
    samples = task.samples("valid", tokenizer)
    outputs = [{"logits": torch.zeros(16, 5)} for _ in samples]
    task.evaluate("valid", outputs, tmp_path / "out")
    assert (tmp_path / "out" / "ner_labels.csv").read_text().split() == ["O", "B-PER", "I-PER", "B-LOC", "B-ORG"]
    raw["model"]["dataset"]["label_ids"] = ["O", "B-LOC", "B-ORG", "B-PER", "I-PER"]
    with pytest.raises(ConfigError, match=r"model\.label_ids .* and model\.dataset\.label_ids .* differ"):
        config_from_dict(raw, [], plugins).model.check(plugins)
    raw["model"]["dataset"]["label_ids"] = []
    raw["model"]["label_ids"] = {"O": 0, "B-PER": 2}
    with pytest.raises(ConfigError, match=r"model\.label_ids: the ids \[0, 2\] must be 0\.\.1"):
        config_from_dict(raw, [], plugins).model.check(plugins)
