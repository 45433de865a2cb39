"""Document packing for GPT samples, against a plain-Python reference: every token of the
split once per epoch, windows of seq_length + 1 overlapping by one, end-of-document ids at
every boundary, padding only at the end of an epoch's stream, deterministic by (index, seed),
and the old one-document-per-sample behaviour behind `pack = false`."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

from mega.plugins.data.text_mmap import TextMemMapConfig, TextMemMapSource, lm_sample
from mega.plugins.tokenizers.bytes import ByteTokenizer
from mega.protocols import SampleObjective

S = 16
TOK = ByteTokenizer()


def _source(corpus, run_dir, **cfg):
    return TextMemMapSource(TextMemMapConfig(data_prefix=[1.0, str(corpus)], splits_string="80,10,10", **cfg), run_dir)


def _docs(corpus, split=0):
    lines = [ln for ln in corpus.read_text().split("\n") if ln]
    n = len(lines)
    bounds = [0, round(0.8 * n), round(0.8 * n) + round(0.1 * n), n]
    return lines[bounds[split]:bounds[split + 1]]


def _reference_stream(docs):
    """The epoch's token stream, written out: each document's bytes then end-of-document."""
    out = []
    for d in docs:
        out += list(d.encode("utf-8")) + [TOK.eos_id]
    return out


def test_unshuffled_windows_are_the_stream_cut_every_seq_length(tmp_path, corpus):
    ds = _source(corpus, tmp_path, shuffle=False).dataset("train", TOK, S, 10_000, seed=0)
    stream = _reference_stream(_docs(corpus))
    n = -(-(len(stream) - 1) // S)
    assert len(ds.sources[0]) == n
    for k in list(range(n)) + [n, n + 1, 2 * n - 1]:  # the second epoch repeats the first
        j = k % n
        want = stream[j * S: j * S + S + 1]
        s = ds[k]
        m = len(want) - 1
        assert s["tokens"][:m].tolist() == want[:-1] and s["labels"][:m].tolist() == want[1:]
        assert s["loss_mask"].tolist() == [1.0] * m + [0.0] * (S - m)
        if m < S:  # only the epoch's last window is short, padded out of the loss
            assert j == n - 1 and s["tokens"][m:].eq(TOK.pad_id).all()


def test_a_shuffled_epoch_uses_every_token_once_without_padding(tmp_path, corpus):
    ds = _source(corpus, tmp_path).dataset("train", TOK, S, 10_000, seed=3)
    docs = _docs(corpus)
    stream = _reference_stream(docs)
    n = len(ds.sources[0])
    for epoch in range(2):
        samples = [ds[epoch * n + j] for j in range(n)]
        masks = np.concatenate([s["loss_mask"].numpy() for s in samples])
        assert masks.sum() == len(stream) - 1 and (masks == 0).sum() == n * S - (len(stream) - 1)  # padding: one window
        labels = Counter(int(t) for s in samples for t, m in zip(s["labels"], s["loss_mask"]) if m)
        missing = Counter(stream) - labels
        assert sum(missing.values()) == 1 and not labels - Counter(stream)  # all but the stream's first token
        assert labels[TOK.eos_id] >= len(docs) - 1  # every document ends with its end-of-document id
    e0 = [ds[j]["tokens"].tolist() for j in range(n)]
    e1 = [ds[n + j]["tokens"].tolist() for j in range(n)]
    assert e0 != e1  # a new order each epoch


def test_windows_join_documents_at_end_of_document_ids(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"doc{i:02d}:" + "ab" * (i % 7 + 1) for i in range(40)) + "\n")
    ds = _source(corpus, tmp_path).dataset("train", TOK, S, 500, seed=1)
    text_docs = set(_docs(corpus))
    for k in range(len(ds.sources[0])):
        s = ds[k]
        ids = s["tokens"][s["loss_mask"] > 0].tolist() + [int(s["labels"][s["loss_mask"] > 0][-1])]
        parts = bytes(t if t < 256 else ord("|") for t in ids).decode().split("|")
        for inner in parts[1:-1]:  # whole documents between two boundaries
            assert inner in text_docs, (k, inner)


def test_samples_are_a_pure_function_of_index_and_seed(tmp_path, corpus):
    a = _source(corpus, tmp_path / "a").dataset("train", TOK, S, 300, seed=7)
    b = _source(corpus, tmp_path / "b").dataset("train", TOK, S, 300, seed=7)
    idx = [0, 5, 299, 137, 5]
    for k in idx:
        assert all(a[k][f].equal(b[k][f]) for f in ("tokens", "labels", "loss_mask"))
    c = _source(corpus, tmp_path / "a").dataset("train", TOK, S, 300, seed=8)  # the cache is reused
    assert any(not a[k]["tokens"].equal(c[k]["tokens"]) for k in idx)


def test_the_token_cache_is_built_once_and_keyed_by_file_and_tokenizer(tmp_path, corpus):
    _source(corpus, tmp_path).dataset("train", TOK, S, 10, seed=0)
    files = sorted((tmp_path / "data").glob("*.idx"))
    assert len(files) == 1
    mtime = os.stat(files[0]).st_mtime_ns
    _source(corpus, tmp_path).dataset("valid", TOK, S, 10, seed=0)
    assert os.stat(files[0]).st_mtime_ns == mtime

    class Other(ByteTokenizer):
        eos_id = 256
        pad_id = 257

    _source(corpus, tmp_path).dataset("train", Other(), S, 10, seed=0)
    assert len(list((tmp_path / "data").glob("*.idx"))) == 2


def test_pack_false_keeps_one_padded_sample_per_document(tmp_path, corpus):
    ds = _source(corpus, tmp_path, pack=False, shuffle=False).dataset("train", TOK, S, 50, seed=0)
    docs = _docs(corpus)
    for k in (0, 3):
        want = lm_sample(TOK.encode(docs[k]) + [TOK.eos_id], S, TOK.pad_id)
        assert all(ds[k][f].equal(want[f]) for f in want)


def test_the_default_objective_is_packed(tmp_path, corpus):
    ds = _source(corpus, tmp_path).dataset("train", TOK, S, 20, seed=0, objective=SampleObjective())
    assert ds[0]["loss_mask"].sum() == S  # a full window, no padding


def test_a_split_too_small_to_pack_is_a_config_error(tmp_path):
    from mega.errors import ConfigError

    corpus = tmp_path / "tiny.txt"
    corpus.write_text("a\n" * 10)
    with pytest.raises(ConfigError, match="has no documents"):
        TextMemMapSource(TextMemMapConfig(data_prefix=[1.0, str(corpus)], splits_string="100,0,0"),
                         tmp_path).dataset("valid", TOK, S, 4, seed=0)
