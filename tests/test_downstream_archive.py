"""A fine-tuned task saved as NeMo saves a `.nemo`: one `.mega` archive holding the model
with its head, one weights file per model-parallel rank, the label names and the
tokenizer, restored at any tensor-parallel size.

One training run at TP=2 (two gloo workers); the archive then answers `mega predict` in
one process as the run directory does, `mega evaluate` reports the same metrics at TP=1
and TP=2, and `mega.restore_from` gives the logits of the run restored directly. A TP=1
archive of the same weights (`mega import` then `mega export`) evaluates the same at TP=2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import mega
from mega.cli import main
import tomllib
from mega.runtime.collate import collate
from tests.test_downstream_tasks import _files, _predict, _raw

ROOT = Path(__file__).resolve().parents[1]


def _cli(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    out = subprocess.run([sys.executable, "-m", "mega", *map(str, args)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _restored_logits(state, archive, batch):
    model, _, _ = mega.restore_from(archive)
    qkv = model.language_model.encoder.layers[0].self_attention.query_key_value.weight
    assert qkv.shape[0] == 3 * 32 // state.tp_size  # this rank's half of the heads
    return model.logits(batch)["logits"]


@pytest.mark.slow
def test_tp2_archive_restores_at_any_tensor_parallel_size(plugins, tmp_path, capsys):
    import tomli_w

    d = _files(tmp_path / "data")["dir"]
    raw = _raw(d, tmp_path, "tc", {"name": "text_classification", "train_ds": {"file_path": str(d / "sentiment.tsv")},
                                   "validation_ds": {"file_path": str(d / "sentiment.tsv")},
                                   "dataset": {"num_classes": 2, "max_seq_length": 16},
                                   "class_labels": {"class_labels_file": str(d / "labels.txt")}}, steps=20)
    raw["trainer"]["val_check_interval"] = 0
    raw["model"]["language_model"]["config"]["make_vocab_size_divisible_by"] = 1  # the same vocabulary at TP 1 and 2
    (tmp_path / "tc.toml").write_text(tomli_w.dumps(raw))
    _cli(tmp_path, "run", "tc.toml", "trainer.devices=2", "model.tensor_model_parallel_size=2")
    run_dir = tmp_path / "results" / "tc"
    archive = tmp_path / "x.mega"
    assert main(["export", str(run_dir), str(archive)]) == 0

    # what the archive holds: one weights file (and sharding record) per tensor-parallel rank,
    # the resolved config with the label names, the tokenizer's vocabulary
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        config = tomllib.loads(tar.extractfile("config.toml").read().decode())
        manifest = json.loads(tar.extractfile("manifest.json").read())
    print("archive members:", names)
    assert names[0] == "manifest.json"
    assert sorted(names) == sorted(["manifest.json", "config.toml", "tokenizer.vocab.txt",
                                    "mp_rank_00/sharding.json", "mp_rank_00/model_weights.ckpt",
                                    "mp_rank_01/sharding.json", "mp_rank_01/model_weights.ckpt"])
    assert manifest["tensor_model_parallel_size"] == 2
    assert config["model"]["class_labels"]["names"] == ["negative", "positive"]
    assert config["model"]["tokenizer"]["vocab_file"] == "tokenizer.vocab.txt"

    # mega predict in one process: the archive answers as the run directory does
    text = ["--text", "a very awful film"]
    from_run, from_archive = _predict(capsys, run_dir, *text), _predict(capsys, archive, *text)
    assert from_run["label"] == from_archive["label"] == "negative"
    for name, p in from_run["probabilities"].items():
        assert from_archive["probabilities"][name] == pytest.approx(p, abs=1e-6)

    # mega.restore_from: the same logits as the run restored directly
    model, tokenizer, cfg = mega.restore_from(archive, plugins)
    direct, _, _ = mega.restore_from(run_dir, plugins)
    samples = model.downstream_task.samples("valid", tokenizer)
    batch = collate(samples)
    a, b = model.logits(batch)["logits"], direct.logits(batch)["logits"]
    print(f"restore_from(x.mega) vs the run: max |logit diff| {float((a - b).abs().max()):.3g}")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert int((a.argmax(-1) == batch["label"]).sum()) == len(samples)  # it learned the toy task

    # mega.restore_from in a TP=2 process group: each rank holds half the encoder, the logits are the same
    from mega.testing import run_ranks

    ranks = run_ranks(_restored_logits, world=2, tp=2, args=(str(archive), batch), timeout=240)
    for r, logits in enumerate(ranks):
        print(f"restore_from(x.mega) at TP=2, rank {r}: max |logit diff| {float((logits - a).abs().max()):.3g}")
        torch.testing.assert_close(logits, a, atol=1e-5, rtol=0)

    # mega evaluate of the archive: the same metrics in one process and at TP=2
    assert main(["evaluate", str(archive), "--split", "valid"]) == 0
    one = json.loads((tmp_path / "x.eval_valid.json").read_text())
    _cli(tmp_path, "evaluate", archive, "--split", "valid", "trainer.devices=2", "model.tensor_model_parallel_size=2")
    two = json.loads((tmp_path / "x.eval_valid.json").read_text())
    assert one["accuracy"] == 100.0
    for key in ("accuracy", "micro_f1", "macro_f1"):
        assert two[key] == pytest.approx(one[key]), key

    # an archive written at TP=1 (the same weights, unpacked to one rank and exported again)
    # evaluates the same at TP=2
    assert main(["import", str(archive), str(tmp_path / "one")]) == 0
    assert main(["export", str(tmp_path / "one"), str(tmp_path / "y.mega")]) == 0
    with tarfile.open(tmp_path / "y.mega") as tar:
        assert "model_weights.ckpt" in tar.getnames() and not any(n.startswith("mp_rank_") for n in tar.getnames())
    _cli(tmp_path, "evaluate", tmp_path / "y.mega", "--split", "valid", "trainer.devices=2",
         "model.tensor_model_parallel_size=2")
    again = json.loads((tmp_path / "y.eval_valid.json").read_text())
    for key in ("accuracy", "micro_f1", "macro_f1"):
        assert again[key] == pytest.approx(one[key]), key
