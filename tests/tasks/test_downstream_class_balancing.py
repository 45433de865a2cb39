"""NeMo's `class_balancing = "weighted_loss"` for text classification (and relation
extraction, the same task) and token classification: the weights are NeMo's, recorded in
the run's config, and the loss a run logs is torch's weighted cross entropy
(`F.cross_entropy(logits, labels, weight=w)`, NeMo's weighted mean) of the same logits,
however the global batch is cut into micro-batches or data-parallel ranks."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mega
from mega.config import config_from_dict, load_raw
from mega.testing import read_metrics
from mega.runtime.collate import collate
from tests.helpers.tasks import task_files as _files, task_raw as _raw


def nemo_weights(labels, num_classes):
    """A transcription of NeMo's get_freq_weights + fill_class_weights: total / (number of
    distinct labels x count), 0 for a class never seen."""
    freq = Counter(labels)
    total = sum(freq.values())
    weights = {label: total / (len(freq) * count) for label, count in freq.items()}
    return [weights.get(i, 0.0) for i in range(num_classes)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = _files(tmp_path_factory.mktemp("balancing"))["dir"]
    # imbalanced: 12 positive, 4 negative, nothing of class 2 (num_classes = 3)
    rows = [(f"{a} {b} {c}", 1) for a in ("the", "a") for b in ("movie", "film") for c in ("good", "great", "very")]
    rows += [(f"{a} {b} bad", 0) for a in ("the", "a") for b in ("movie", "film")]
    (d / "imbalanced.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows))
    return d


def _text_raw(d: Path, tmp: Path, name: str, mbs: int, **dataset):
    raw = _raw(d, tmp, name, {"name": "text_classification", "train_ds": {"file_path": str(d / "imbalanced.tsv")},
                              "micro_batch_size": mbs, "global_batch_size": 8,
                              "dataset": {"num_classes": 3, "max_seq_length": 16, **dataset}}, steps=1)
    raw["model"]["optim"]["lr"] = 1e-9  # the logged loss is the initial model's; the model barely moves
    raw["trainer"].update({"val_check_interval": 0, "log_every_n_steps": 1})
    return raw


def _first_loss(run):
    return read_metrics(run.run_dir)[0]["loss"]


def test_text_classification_weighted_loss_is_torchs_weighted_mean(plugins, data, tmp_path):
    d = data
    runs = {}
    for mbs in (8, 2):
        raw = _text_raw(d, tmp_path, f"mbs{mbs}", mbs, class_balancing="weighted_loss")
        cfg = config_from_dict(raw, [], plugins)
        runs[mbs] = (mega.run(cfg, plugins), cfg)
    run, cfg = runs[8]
    labels = [int(line.split("\t")[1]) for line in (d / "imbalanced.tsv").read_text().splitlines()[1:]]
    w = nemo_weights(labels, 3)
    assert w[2] == 0.0 and w[0] == pytest.approx(16 / (2 * 4))
    assert cfg.model.dataset.class_weights == pytest.approx(w)  # resolved into the config ...
    saved = load_raw(run.run_dir / "config.toml")["model"]["dataset"]
    assert saved["class_balancing"] == "weighted_loss" and saved["class_weights"] == pytest.approx(w)  # ... and carried

    batch = collate([run.train_data[i] for i in range(8)])  # step 1's global batch
    logits = run.model.logits(batch)["logits"]
    reference = F.cross_entropy(logits.double(), batch["label"], weight=torch.tensor(w, dtype=torch.float64))
    unweighted = F.cross_entropy(logits.double(), batch["label"])
    assert abs(float(reference) - float(unweighted)) > 1e-3  # the weights change the number
    for mbs, (r, _) in runs.items():
        print(f"text classification, micro-batch {mbs}: logged loss {_first_loss(r):.7f}, torch weighted CE "
              f"{float(reference):.7f} (unweighted {float(unweighted):.7f})")
        assert _first_loss(r) == pytest.approx(float(reference), rel=1e-5), mbs

    # without class_balancing: the plain mean, as before
    raw = _text_raw(d, tmp_path, "plain", 8)
    plain = mega.run(config_from_dict(raw, [], plugins), plugins)
    assert _first_loss(plain) == pytest.approx(float(unweighted), rel=1e-5)


def test_token_classification_weighted_loss_is_torchs_weighted_mean(plugins, data, tmp_path):
    d = data
    raw = _raw(d, tmp_path, "ner", {"name": "token_classification", "micro_batch_size": 2, "global_batch_size": 4,
                                    "dataset": {"data_dir": str(d / "ner"), "max_seq_length": 16,
                                                "class_balancing": "weighted_loss"}}, steps=1)
    raw["model"]["optim"]["lr"] = 1e-9
    raw["trainer"].update({"val_check_interval": 0, "log_every_n_steps": 1})
    cfg = config_from_dict(raw, [], plugins)
    run = mega.run(cfg, plugins)
    ids = {name: i for i, name in enumerate(cfg.model.dataset.label_ids)}
    words = [ids[label] for line in (d / "ner" / "labels_train.txt").read_text().splitlines() for label in line.split()]
    w = nemo_weights(words, len(ids))
    assert cfg.model.dataset.class_weights == pytest.approx(w)
    batch = collate([run.train_data[i] for i in range(4)])
    logits = run.model.logits(batch)["logits"]
    real = batch["padding_mask"].bool()  # [CLS], every sub-token and [SEP] carry a label by default
    reference = F.cross_entropy(logits[real].double(), batch["labels"][real], weight=torch.tensor(w, dtype=torch.float64))
    print(f"token classification: logged loss {_first_loss(run):.7f}, torch weighted CE {float(reference):.7f}")
    assert _first_loss(run) == pytest.approx(float(reference), rel=1e-5)


def test_relation_extraction_and_bad_values(plugins, data, tmp_path):
    d = data
    raw = _raw(d, tmp_path, "re", {"name": "relation_extraction", "train_ds": {"file_path": str(d / "chemprot.tsv")},
                                   "class_labels": {"class_labels_file": str(d / "label_mapping.tsv")},
                                   "dataset": {"max_seq_length": 16, "class_balancing": "weighted_loss"}}, steps=1)
    cfg = config_from_dict(raw, [], plugins)
    cfg.model.check(plugins)
    assert cfg.model.dataset.class_weights == pytest.approx(nemo_weights([0, 1, 2, 0, 1, 2], 3))
    raw["model"]["dataset"]["class_balancing"] = "oversample"
    with pytest.raises(mega.errors.ConfigError, match="model.dataset.class_balancing"):
        config_from_dict(raw, [], plugins).model.check(plugins)
    raw["model"]["dataset"].update({"class_balancing": "weighted_loss", "class_weights": [1.0, 2.0]})
    with pytest.raises(mega.errors.ConfigError, match="model.dataset.class_weights: 2 weights for 3 classes"):
        config_from_dict(raw, [], plugins).model.check(plugins)


@pytest.mark.slow
def test_data_parallel_weighted_loss_equals_one_process(data, tmp_path):
    """Two gloo workers (data parallel) log the loss one process logs for the same global batch."""
    import os
    import subprocess
    import sys

    import tomli_w

    raw = _text_raw(data, tmp_path, "dp1", 4, class_balancing="weighted_loss")
    exp = tmp_path / "tc.toml"
    exp.write_text(tomli_w.dumps(raw))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("RANK", None)
    for extra in ([], ["exp_manager.name=dp2", "trainer.devices=2"]):
        out = subprocess.run([sys.executable, "-m", "mega", "run", str(exp), *extra], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    one, two = (read_metrics(tmp_path / "results" / n)[0]["loss"] for n in ("dp1", "dp2"))
    print(f"weighted loss, one process {one:.7f}, two data-parallel workers {two:.7f}")
    assert two == pytest.approx(one, rel=1e-5)
