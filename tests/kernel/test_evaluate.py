"""`mega evaluate`: the loss over a whole split equals a direct computation over the same
documents (each once, none dropped, whatever the batch size), at one process, under data
and tensor parallelism, and from an archive; a model with its own evaluation is asked."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mega.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT (no dropout) trained 3 steps on a corpus whose valid split has 21
    documents, so batches of 4 and 2 x 3 leave a partial last batch. One padded sample per
    document (`pack = false`), so the direct computation below is per document; the packed
    layout has its own test."""
    from mega.testing import TinyExperiment, write_corpus

    tmp = tmp_path_factory.mktemp("evaluate")
    corpus = write_corpus(tmp / "corpus.txt", lines=210)
    exp = TinyExperiment(tmp, corpus)
    run = exp.run(trainer={"max_steps": 3, "val_check_interval": 0},
                  model={"hidden_dropout": 0.0, "attention_dropout": 0.0, "data": {"pack": False}})
    return run.run_dir, corpus


def direct_valid_loss(run_dir: Path, corpus: Path) -> tuple:
    """(token-mean loss, tokens): each valid document once, through the model's logits."""
    from mega.checkpoint import restore
    from mega.plugins.data.blending import parse_splits, split_ranges

    model, tokenizer, config = restore(run_dir)
    docs = [line for line in corpus.read_text().split("\n") if line]
    start, end = split_ranges(len(docs), parse_splits(config.model.data.splits_string))[1]
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs[start:end]:
            ids = (tokenizer.encode(doc) + [tokenizer.eos_id])[: config.model.seq_length + 1]
            logits = model(torch.tensor([ids[:-1]]))[0, :, : tokenizer.vocab_size].double()
            total += float(F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            count += len(ids) - 1
    return total / count, count, end - start


def _evaluate(capsys, *args) -> dict:
    assert main(["evaluate", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("batch", [4, 5])
@pytest.mark.slow
def test_the_loss_over_the_whole_split_is_the_direct_one(trained, capsys, batch):
    run_dir, corpus = trained
    loss, tokens, docs = direct_valid_loss(run_dir, corpus)
    assert docs == 21 and docs % batch
    out = _evaluate(capsys, run_dir, "--split", "valid", f"model.micro_batch_size={batch}")
    assert (out["split"], out["tokens"], out["samples"]) == ("valid", tokens, docs)
    assert out["loss"] == pytest.approx(loss, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    saved = json.loads((run_dir / "eval_valid.json").read_text())
    assert saved["loss"] == out["loss"] and saved["checkpoint"] == str(run_dir)


def test_packed_windows_cover_the_split_once(trained, capsys):
    """With packing the split is one stream (each document and its end-of-document id) cut
    into windows of seq_length + 1 sharing a token: the loss is every stream token's once
    (unshuffled here, so the stream is in document order)."""
    from mega.checkpoint import restore
    from mega.plugins.data.blending import parse_splits, split_ranges

    run_dir, corpus = trained
    model, tokenizer, config = restore(run_dir)
    docs = [line for line in corpus.read_text().split("\n") if line]
    start, end = split_ranges(len(docs), parse_splits(config.model.data.splits_string))[1]
    stream = [i for doc in docs[start:end] for i in tokenizer.encode(doc) + [tokenizer.eos_id]]
    s, total, windows = config.model.seq_length, 0.0, 0
    with torch.no_grad():
        for k in range(0, len(stream) - 1, s):
            window = stream[k:k + s + 1]
            logits = model(torch.tensor([window[:-1]]))[0, :, : tokenizer.vocab_size].double()
            total += float(F.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum"))
            windows += 1
    out = _evaluate(capsys, run_dir, "--split", "valid", "model.data.pack=true", "model.data.shuffle=false")
    assert (out["tokens"], out["samples"]) == (len(stream) - 1, windows)
    assert out["loss"] == pytest.approx(total / (len(stream) - 1), rel=1e-5)


def test_an_archive_evaluates_like_its_run(trained, capsys, tmp_path):
    run_dir, corpus = trained
    archive = tmp_path / "model.mega"
    assert main(["export", str(run_dir), str(archive)]) == 0
    capsys.readouterr()
    from_run = _evaluate(capsys, run_dir, "--split", "test")
    from_archive = _evaluate(capsys, archive, "--split", "test")
    assert from_archive["loss"] == pytest.approx(from_run["loss"], rel=1e-6)
    assert (tmp_path / "model.eval_test.json").is_file()


def test_a_model_that_evaluates_itself_is_asked(trained, capsys, monkeypatch):
    from mega.plugins.models.gpt import GPTModel

    seen = {}

    def evaluate(self, source, split, tokenizer, config):
        seen.update(split=split, files=source.files(), vocab=tokenizer.vocab_size)
        return {"loss": 1.0, "accuracy": 0.5}

    monkeypatch.setattr(GPTModel, "evaluate", evaluate, raising=False)
    run_dir, corpus = trained
    out = _evaluate(capsys, run_dir, "--split", "valid", "--output", run_dir / "mine.json")
    assert seen["split"] == "valid" and seen["files"] == [corpus]
    assert (out["loss"], out["accuracy"], out["perplexity"]) == (1.0, 0.5, pytest.approx(math.e))
    assert json.loads((run_dir / "mine.json").read_text())["accuracy"] == 0.5


def test_mistakes_are_one_line_errors(trained, capsys):
    run_dir, _ = trained
    assert main(["evaluate", str(run_dir), "model.micro_batch_sise=2"]) == 2
    assert "micro_batch_sise" in capsys.readouterr().err
    assert main(["evaluate", str(run_dir.parent / "nope")]) == 2


def _mega(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "mega", *map(str, args)], capture_output=True, text=True, timeout=240,
                          cwd=cwd, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["model.tensor_model_parallel_size=2"], ["model.micro_batch_size=5"],
                                    ["model.pipeline_model_parallel_size=2"]], ids=["tp2", "dp2", "pp2"])
def test_two_workers_give_the_one_process_loss(trained, tmp_path, layout):
    run_dir, corpus = trained
    loss, tokens, _ = direct_valid_loss(run_dir, corpus)
    out = tmp_path / "eval.json"
    r = _mega(["evaluate", run_dir, "--split", "valid", "trainer.devices=2", "trainer.accelerator=cpu", *layout,
               "--output", out], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["tokens"] == tokens and got["loss"] == pytest.approx(loss, rel=1e-5)
