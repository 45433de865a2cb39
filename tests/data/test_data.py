"""text_mmap: line index against Python's own line splitting, its cache, blending by
weight, splits, sample construction, and clear errors for bad files."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

from mega.errors import ConfigError, DataError
from mega.plugins.data.blending import BlendedDataset, blend_order, parse_splits, split_ranges
from mega.plugins.data.text_index import TextMemMapIndex
from mega.plugins.data.text_mmap import lm_sample
from mega.plugins.data.quickstart_corpus import write_pydoc_corpus


def test_index_matches_python_lines(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("first line\n\nthird — ünïcode\r\nno newline at end")
    idx = TextMemMapIndex(f)
    expected = [ln.rstrip("\r") for ln in f.read_text().split("\n") if ln]
    assert [idx[i] for i in range(len(idx))] == expected


def test_index_spans_chunks(tmp_path, monkeypatch):
    import mega.plugins.data.text_index as ti

    monkeypatch.setattr(ti, "CHUNK", 7)  # force many chunks
    f = tmp_path / "t.txt"
    lines = [f"line {i} " + "x" * (i % 5) for i in range(50)]
    f.write_text("\n".join(lines) + "\n")
    idx = TextMemMapIndex(f)
    assert [idx[i] for i in range(len(idx))] == lines


def test_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a\nb\n")
    TextMemMapIndex(f)
    assert (tmp_path / "t.txt.mega-index.npy").is_file()
    mtime = os.stat(tmp_path / "t.txt.mega-index.npy").st_mtime_ns
    assert len(TextMemMapIndex(f)) == 2
    assert os.stat(tmp_path / "t.txt.mega-index.npy").st_mtime_ns == mtime  # reused
    f.write_text("a\nb\nc\n")
    assert len(TextMemMapIndex(f)) == 3


def test_bad_files_are_named(tmp_path):
    with pytest.raises(DataError, match="nope.txt: no such data file"):
        TextMemMapIndex(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt: data file is empty"):
        TextMemMapIndex(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n\n")
    with pytest.raises(DataError, match="blank.txt: data file has no non-empty lines"):
        TextMemMapIndex(blank)


def test_splits():
    assert parse_splits("800,100,100") == pytest.approx([0.8, 0.1, 0.1])
    assert parse_splits('"98,2"') == pytest.approx([0.98, 0.02, 0.0])
    with pytest.raises(ConfigError, match="splits_string"):
        parse_splits("a,b")
    assert split_ranges(10, [0.8, 0.1, 0.1]) == [(0, 8), (8, 9), (9, 10)]
    assert split_ranges(3, [1.0, 0.0, 0.0]) == [(0, 3), (3, 3), (3, 3)]


def test_blending_follows_weights_in_every_prefix():
    ids, ks = blend_order([0.7, 0.2, 0.1], 1000)
    for n in (10, 100, 1000):
        counts = Counter(ids[:n].tolist())
        for d, w in enumerate([0.7, 0.2, 0.1]):
            assert abs(counts[d] - w * n) <= 1.0
    for d in range(3):  # each dataset's samples come in order, none skipped
        assert ks[ids == d].tolist() == list(range((ids == d).sum()))


def test_blended_dataset_is_deterministic_and_epochs_cover_everything():
    a, b = list(range(10)), list(range(100, 105))
    ds = BlendedDataset([a, b], [2.0, 1.0], 30, seed=3)
    again = BlendedDataset([a, b], [2.0, 1.0], 30, seed=3)
    items = [ds[i] for i in range(30)]
    assert items == [again[i] for i in range(30)]
    from_a = [x for x in items if x < 100]
    assert sorted(from_a[:10]) == a and sorted(from_a[10:]) == a  # each epoch a permutation
    with pytest.raises(IndexError):
        ds[30]


def test_lm_sample_shifts_pads_and_masks():
    s = lm_sample([5, 6, 7, 9], seq_length=6, pad_id=0)
    assert s["tokens"].tolist() == [5, 6, 7, 0, 0, 0]
    assert s["labels"].tolist() == [6, 7, 9, 0, 0, 0]
    assert s["loss_mask"].tolist() == [1, 1, 1, 0, 0, 0]
    long = lm_sample(list(range(1, 20)), seq_length=4, pad_id=0)
    assert long["tokens"].tolist() == [1, 2, 3, 4] and long["labels"].tolist() == [2, 3, 4, 5]


def test_quickstart_corpus_is_python_docs(tmp_path):
    path = write_pydoc_corpus(tmp_path / "c.txt")
    idx = TextMemMapIndex(path)
    assert len(idx) > 300
    text = " ".join(idx[i] for i in range(len(idx)))
    assert "def" in text and "lambda" in text


def test_missing_data_file_named_at_run_build(tmp_path, plugins):
    from mega.config import config_from_dict
    from mega.training.run import build_run

    cfg = config_from_dict({"model": {"data": {"data_prefix": [str(tmp_path / "missing.txt")]},
                                      "tokenizer": {"library": "bytes"}},
                            "exp_manager": {"exp_dir": str(tmp_path)}}, plugins=plugins)
    with pytest.raises(DataError, match="missing.txt: no such data file"):
        build_run(cfg, plugins)


def test_an_empty_split_is_a_config_error(tmp_path, corpus, plugins):
    from mega.training.run import build_run
    from mega.testing import tiny_config

    cfg = tiny_config(tmp_path, corpus, plugins, model={"data": {"data_prefix": [str(corpus)], "splits_string": "100,0,0"}})
    with pytest.raises(ConfigError, match="the valid split .* has no documents"):
        build_run(cfg, plugins)
