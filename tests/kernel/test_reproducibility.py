"""A run is a pure function of its config: the same `mega run` command in two processes
gives the same vocabulary, bit for bit, and the same losses. Each tokenizer that trains on
the corpus is checked, in separate processes with different hash seeds (hash order is
what differs between processes: Python's set and dict of str, the Rust maps of
`tokenizers`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from mega.testing import tiny_raw, write_corpus

ROOT = Path(__file__).resolve().parents[2]

# tokenizer table -> the file it trains into the run directory
TRAINED = {
    "sentencepiece": ({"library": "sentencepiece", "vocab_size": 60}, "tokenizer.model"),
    "wordpiece": ({"library": "wordpiece", "vocab_size": 90, "min_frequency": 1}, "vocab.txt"),
    "word": ({"library": "word"}, "tokenizer.vocab"),
}


def _run_in(workdir: Path, experiment: Path, hash_seed: str) -> subprocess.CompletedProcess:
    workdir.mkdir()
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "mega", "run", str(experiment)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("library", sorted(TRAINED))
def test_the_same_command_twice_gives_the_same_vocabulary_and_losses(tmp_path, library):
    tokenizer, trained = TRAINED[library]
    corpus = write_corpus(tmp_path / "corpus.txt", lines=300, seed=11)
    raw = tiny_raw(tmp_path, corpus, trainer={"max_steps": 4, "val_check_interval": 2, "accelerator": "cpu"},
                   model={"tokenizer": tokenizer})
    raw["exp_manager"]["exp_dir"] = "results"  # relative: one config, two working directories
    experiment = tmp_path / "exp.toml"
    experiment.write_text(tomli_w.dumps(raw))
    runs = []
    for name, seed in (("first", "1"), ("second", "2")):
        proc = _run_in(tmp_path / name, experiment, seed)
        assert proc.returncode == 0, proc.stderr
        run_dir = tmp_path / name / "results" / "tiny"
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs.append(((run_dir / trained).read_bytes(),
                     [(m["step"], m.get("loss"), m.get("val_loss")) for m in metrics]))
    (vocab_a, losses_a), (vocab_b, losses_b) = runs
    assert vocab_a == vocab_b, f"{library}: the two runs trained different {trained} files"
    assert len(losses_a) >= 4 and losses_a == losses_b  # exactly: same ids, same weights, same losses
