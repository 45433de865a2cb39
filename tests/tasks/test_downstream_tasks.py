"""Every task trains, evaluates, saves, restores and predicts from the command line, on
tiny hand-written files in its real format (a 2-layer BERT, hidden 32, a few dozen steps;
learnable enough that the metrics move far above chance).

The metrics themselves are tested against hand-computed cases in
test_downstream_metrics.py, the readers in test_downstream_data.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import mega
from mega.cli import main
from mega.config import config_from_dict
from tests.helpers.tasks import WORDS, CONTEXT, task_files as _files, task_raw as _raw, predict as _predict


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("downstream"))


def _train(plugins, d, tmp, name, model, steps=30):
    cfg = config_from_dict(_raw(d, tmp, name, model, steps), [], plugins)
    return mega.run(cfg, plugins), cfg


def _same_from_archive(capsys, run_dir: Path, tmp_path: Path, answer: dict, *args) -> None:
    """Saved into one `.mega` and restored from it, the fine-tuned model answers the same."""
    archive = tmp_path / f"{run_dir.name}.mega"
    assert main(["export", str(run_dir), str(archive)]) == 0
    again = _predict(capsys, archive, *args)
    assert again.keys() == answer.keys()
    for key, value in answer.items():
        if key == "probabilities":
            assert list(again[key]) == list(value)
            assert list(again[key].values() if isinstance(value, dict) else again[key]) == pytest.approx(
                list(value.values() if isinstance(value, dict) else value), abs=1e-6)
        else:
            assert again[key] == value, key


@pytest.mark.slow
def test_question_answering(plugins, data, tmp_path, capsys):
    d = data["dir"]
    run, cfg = _train(plugins, d, tmp_path, "qa", {
        "name": "question_answering", "train_ds": {"file": str(d / "squad.json")}, "validation_ds": str(d / "squad.json"),
        "dataset": {"max_seq_length": 32, "doc_stride": 8, "max_query_length": 8}})
    metrics = run.model.evaluate(None, "valid", run.tokenizer, cfg)
    assert set(metrics) == {"exact_match", "f1", "total"} and metrics["total"] == 2
    assert metrics["f1"] >= 50.0
    pred_dir = tmp_path / "results" / "qa" / "predictions" / "valid"
    preds = json.loads((pred_dir / "predictions.json").read_text())
    nbest = json.loads((pred_dir / "nbest_predictions.json").read_text())
    assert set(preds) == {"q1", "q2"} and set(nbest["q1"][0]) == {"text", "probability", "start_logit", "end_logit"}
    # restored from the run directory and from a one-file archive, the answers are the same
    out = _predict(capsys, run.run_dir, "--question", "who played in denver ?", "--context", CONTEXT)
    assert out["answer"] == preds["q2"] and len(out["nbest"]) <= 5
    assert main(["export", str(run.run_dir), str(tmp_path / "qa.mega")]) == 0
    again = _predict(capsys, tmp_path / "qa.mega", "--question", "who played in denver ?", "--context", CONTEXT)
    assert again["answer"] == out["answer"] and again["nbest"][0]["start_logit"] == pytest.approx(out["nbest"][0]["start_logit"])
    # evaluating the archive writes beside it, not into the training run's directory
    shutil.rmtree(pred_dir)
    assert main(["evaluate", str(tmp_path / "qa.mega"), "--split", "valid"]) == 0
    assert json.loads((tmp_path / "qa" / "predictions" / "valid" / "predictions.json").read_text()) == preds
    assert (tmp_path / "qa.eval_valid.json").is_file() and not pred_dir.exists()


@pytest.mark.slow
def test_text_classification_with_label_names(plugins, data, tmp_path, capsys):
    d = data["dir"]
    run, cfg = _train(plugins, d, tmp_path, "tc", {
        "name": "text_classification", "train_ds": {"file_path": str(d / "sentiment.tsv")},
        "validation_ds": {"file_path": str(d / "sentiment.tsv")},
        "dataset": {"num_classes": 2, "max_seq_length": 16}, "class_labels": {"class_labels_file": str(d / "labels.txt")}})
    assert cfg.model.class_labels.names == ["negative", "positive"]  # recorded: checkpoints carry them
    m = run.model.evaluate(None, "valid", run.tokenizer, cfg)
    assert m["accuracy"] == pytest.approx(100.0) and m["micro_f1"] == pytest.approx(100.0, abs=1e-3)
    report = (tmp_path / "results" / "tc" / "predictions" / "valid" / "report.txt").read_text()
    assert "positive (label_id: 1)" in report
    shutil.move(str(d / "labels.txt"), str(d / "labels.moved"))  # the run no longer needs the file
    try:
        out = _predict(capsys, run.run_dir, "--text", "a very awful film")
    finally:
        shutil.move(str(d / "labels.moved"), str(d / "labels.txt"))
    assert out["label"] == "negative" and set(out["probabilities"]) == {"negative", "positive"}


def test_token_classification(plugins, data, tmp_path, capsys):
    d = data["dir"]
    run, cfg = _train(plugins, d, tmp_path, "ner", {
        "name": "token_classification", "dataset": {"data_dir": str(d / "ner"), "max_seq_length": 16}})
    assert cfg.model.dataset.label_ids == ["O", "B-LOC", "B-ORG", "B-PER", "I-PER"]
    m = run.model.evaluate(None, "valid", run.tokenizer, cfg)
    assert m["f1"] == pytest.approx(100.0) and m["token_accuracy"] == pytest.approx(100.0)
    assert {"precision", "recall", "label_macro_f1"} <= set(m)
    out = _predict(capsys, run.run_dir, "--text", "john smith lives in paris")
    assert out["labels"] == ["B-PER", "I-PER", "O", "O", "B-LOC"]
    assert out["entities"] == [{"type": "PER", "text": "john smith"}, {"type": "LOC", "text": "paris"}]
    _same_from_archive(capsys, run.run_dir, tmp_path, out, "--text", "john smith lives in paris")


@pytest.mark.slow
def test_relation_extraction(plugins, data, tmp_path, capsys):
    d = data["dir"]
    run, cfg = _train(plugins, d, tmp_path, "re", {
        "name": "relation_extraction", "train_ds": {"file_path": str(d / "chemprot.tsv")},
        "validation_ds": {"file_path": str(d / "chemprot.tsv")}, "class_labels": {"class_labels_file": str(d / "label_mapping.tsv")},
        "dataset": {"max_seq_length": 16, "negative_label": "False"}})
    assert cfg.model.dataset.num_classes == 3 and cfg.model.class_labels.names == ["CPR:4", "CPR:3", "False"]
    m = run.model.evaluate(None, "valid", run.tokenizer, cfg)
    assert m["accuracy"] > 60.0  # chance: 33
    assert {"positive_precision", "positive_recall", "positive_f1", "micro_f1"} <= set(m)
    out = _predict(capsys, run.run_dir, "--text", "<@CHEMICAL$> inhibits <@GENE$> .")
    assert out["label"] in ("CPR:4", "CPR:3", "False") and set(out["probabilities"]) == {"CPR:4", "CPR:3", "False"}
    _same_from_archive(capsys, run.run_dir, tmp_path, out, "--text", "<@CHEMICAL$> inhibits <@GENE$> .")


@pytest.mark.slow
def test_multiple_choice(plugins, data, tmp_path, capsys):
    d = data["dir"]
    run, cfg = _train(plugins, d, tmp_path, "mc", {
        "name": "multiple_choice", "train_ds": str(d / "swag.csv"), "validation_ds": str(d / "swag.csv"),
        "dataset": {"max_seq_length": 12}})
    m = run.model.evaluate(None, "valid", run.tokenizer, cfg)
    assert set(m) == {"accuracy", "total"} and m["total"] == 3 and m["accuracy"] > 40.0  # chance: 25
    preds = (tmp_path / "results" / "mc" / "predictions" / "valid" / "predictions.tsv").read_text().splitlines()
    assert len(preds) == 3 and all(line.split("\t")[2] == str(gold) for line, gold in zip(preds, (0, 1, 2)))
    out = _predict(capsys, run.run_dir, "--question", "the dog", *sum((["--choice", c] for c in
                                                                       ("meowed", "barked", "built")), []))
    assert out["text"] in ("meowed", "barked", "built") and len(out["probabilities"]) == 3
    _same_from_archive(capsys, run.run_dir, tmp_path, out, "--question", "the dog",
                       *sum((["--choice", c] for c in ("meowed", "barked", "built")), []))


def test_encoder_weights_come_from_lm_checkpoint(plugins, data, tmp_path):
    d = data["dir"]
    qa, _ = _train(plugins, d, tmp_path, "qa", {
        "name": "question_answering", "train_ds": str(d / "squad.json"), "validation_ds": str(d / "squad.json"),
        "dataset": {"max_seq_length": 32}}, steps=2)
    raw = _raw(d, tmp_path, "tc", {"name": "text_classification", "train_ds": str(d / "sentiment.tsv"),
                                   "dataset": {"num_classes": 2, "max_seq_length": 16},
                                   "language_model": {**_raw(d, tmp_path, "", {})["model"]["language_model"],
                                                      "lm_checkpoint": str(qa.run_dir)}}, steps=1)
    raw["model"]["optim"]["lr"] = 1e-9  # one step that changes (almost) nothing
    raw["trainer"]["val_check_interval"] = 0
    run = mega.run(config_from_dict(raw, [], plugins), plugins)
    mine, theirs = run.model.state_dict(), qa.model.state_dict()
    encoder = [k for k in theirs if k.startswith("language_model.encoder.")]
    assert encoder
    for k in encoder:
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("override,message", [
    (["model.language_model.pretrained_model_name=megatron-bert-345m-uncased", "~vocab"],
     "https://s3.amazonaws.com/models.huggingface.co/bert/bert-large-uncased-vocab.txt"),
    (["model.language_model.pretrained_model_name=megatron-bert-345m-cased"],
     "https://api.ngc.nvidia.com/v2/models/nvidia/megatron_bert_345m/versions/v0.1_cased"),
    (["model.language_model.pretrained_model_name=biomegatron-bert-345m-uncased", "model.language_model.lm_checkpoint=nope.pt"],
     "nope.pt does not exist"),
    (["model.language_model.pretrained_model_name=megatron-bert-uncased", "~config"], "has no fixed architecture"),
    (["model.language_model.pretrained_model_name=bert-huge", "~config"], "unknown name 'bert-huge'"),
    (["model.language_model.config.hidden_sise=8"], "model.language_model.config.hidden_sise"),
    (["model.train_ds.file=null"], "model.train_ds.file"),
    (["model.dataset.max_seq_length=128"],
     "model.language_model.config.max_position_embeddings=64 is smaller than model.dataset.max_seq_length=128"),
])
def test_config_errors_name_the_key_and_the_file_to_fetch(plugins, data, tmp_path, override, message):
    d = data["dir"]
    raw = _raw(d, tmp_path, "x", {"name": "question_answering", "train_ds": str(d / "squad.json"),
                                  "dataset": {"max_seq_length": 32}})
    if "~vocab" in override:
        del raw["model"]["tokenizer"]["vocab_file"]
    if "~config" in override:
        raw["model"]["language_model"]["config"] = {}
    overrides = [o for o in override if not o.startswith("~") and not o.endswith("=null")]
    if "model.train_ds.file=null" in override:
        del raw["model"]["train_ds"]
    cfg = config_from_dict(raw, overrides, plugins)
    with pytest.raises(Exception, match=message.replace(".", r"\.").replace("?", r"\?")) as info:
        mega.run(cfg, plugins)
    assert isinstance(info.value, mega.errors.MegaError)


def test_megatron_config_file_sets_the_architecture(plugins, data, tmp_path):
    d = data["dir"]
    (tmp_path / "megatron.json").write_text(json.dumps({"hidden-size": 16, "num-attention-heads": 2, "num-layers": 1,
                                                        "max-seq-length": 40, "vocab-size": 99, "tokenizer-type": "x"}))
    raw = _raw(d, tmp_path, "cf", {"name": "question_answering", "train_ds": str(d / "squad.json"),
                                   "dataset": {"max_seq_length": 32},
                                   "language_model": {"pretrained_model_name": "megatron-bert-uncased",
                                                      "config_file": str(tmp_path / "megatron.json")}}, steps=1)
    raw["trainer"]["val_check_interval"] = 0
    run = mega.run(config_from_dict(raw, [], plugins), plugins)
    c = run.model.config
    assert (c.hidden_size, c.num_attention_heads, c.num_layers, c.max_position_embeddings) == (16, 2, 1, 40)


def test_encoder_weights_from_a_megatron_checkpoint(plugins, data, tmp_path):
    """A BERT in Megatron-LM's layout (`mega export --to megatron` of a `bert` model) as
    `lm_checkpoint`: the fine-tuning run starts from its encoder."""
    from mega.checkpoint import save_model_checkpoint

    d = data["dir"]
    raw = _raw(d, tmp_path, "pre", {"name": "bert", "seq_length": 32, "num_layers": 2, "hidden_size": 32,
                                    "num_attention_heads": 4, "max_position_embeddings": 64})
    del raw["model"]["language_model"]  # a plain BERT's table has no encoder section
    cfg = config_from_dict(raw, [], plugins)
    tokenizer = plugins.tokenizers.get("wordpiece").factory(cfg.model.tokenizer, [], None)
    bert = plugins.models.get("bert").factory(cfg.model, tokenizer, plugins)
    save_model_checkpoint(tmp_path / "pre", cfg, bert, tokenizer, plugins)
    assert main(["export", str(tmp_path / "pre"), str(tmp_path / "megatron"), "--to", "megatron"]) == 0
    raw = _raw(d, tmp_path, "ft", {"name": "text_classification", "train_ds": str(d / "sentiment.tsv"),
                                   "dataset": {"num_classes": 2, "max_seq_length": 16},
                                   "language_model": {**_raw(d, tmp_path, "", {})["model"]["language_model"],
                                                      "lm_checkpoint": str(tmp_path / "megatron")}}, steps=1)
    raw["model"]["optim"]["lr"] = 1e-9
    raw["trainer"]["val_check_interval"] = 0
    run = mega.run(config_from_dict(raw, [], plugins), plugins)
    mine, theirs = run.model.state_dict(), bert.state_dict()
    encoder = [k for k in theirs if k.startswith("language_model.encoder.") or k.startswith("language_model.embedding.")]
    assert encoder
    for k in encoder:
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-6, rtol=0)


def test_a_squad_v2_file_without_version_2_with_negative_stops_naming_the_key(plugins, data, tmp_path, capsys):
    """Unanswerable questions under the default `version_2_with_negative = false` stop the
    run when the file is read (exit 2, the key named), not at the first validation."""
    d = data["dir"]
    squad = json.loads((d / "squad.json").read_text())
    squad["data"][0]["paragraphs"][0]["qas"].append(
        {"id": "q3", "question": "who won ?", "answers": [], "is_impossible": True})
    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps(squad))
    raw = _raw(d, tmp_path, "v2", {"name": "question_answering", "train_ds": str(v2), "validation_ds": str(v2),
                                   "dataset": {"max_seq_length": 32}}, steps=2)
    with pytest.raises(mega.errors.ConfigError, match=r"model\.dataset\.version_2_with_negative: .*v2\.json has 1 "
                                                      r"question\(s\) without an answer .*'q3'"):
        mega.run(config_from_dict(raw, [], plugins), plugins)
    raw["model"]["dataset"]["version_2_with_negative"] = True
    mega.run(config_from_dict(raw, [], plugins), plugins)  # trains and validates
    # mega evaluate of a v1.1 run on the v2.0 file
    run, _ = _train(plugins, d, tmp_path, "v1", {"name": "question_answering", "train_ds": str(d / "squad.json"),
                                                "validation_ds": str(d / "squad.json"),
                                                "dataset": {"max_seq_length": 32}}, steps=1)
    capsys.readouterr()
    assert main(["evaluate", str(run.run_dir), "--split", "valid", f"model.validation_ds.file={v2}"]) == 2
    assert "model.dataset.version_2_with_negative" in capsys.readouterr().err
