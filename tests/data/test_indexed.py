"""Megatron-LM's indexed dataset: files we write read back by a transcription of
Megatron-LM's reader (the header layout, with struct and numpy), files laid out by a
transcription of its writer read by ours; its dtype rule; the `mmap` data source, whose
packed samples equal text_mmap's over the same documents; and `mega preprocess`."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from mega.errors import DataError
from mega.plugins.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype
from mega.plugins.data.mmap import MMapConfig, MMapSource
from mega.plugins.data.text_mmap import TextMemMapConfig, TextMemMapSource
from mega.plugins.tokenizers.bytes import ByteTokenizer

CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def megatron_read(prefix):
    """Megatron-LM's _IndexReader / _MMapBinReader logic, transcribed: (dtype, lengths,
    pointers, document indices, sequences)."""
    with open(f"{prefix}.idx", "rb") as f:
        assert f.read(9) == b"MMIDIDX\x00\x00"
        assert struct.unpack("<Q", f.read(8))[0] == 1
        dtype = CODES[struct.unpack("<B", f.read(1))[0]]
        n_seq = struct.unpack("<Q", f.read(8))[0]
        n_doc = struct.unpack("<Q", f.read(8))[0]
        offset = f.tell()
    buf = np.memmap(f"{prefix}.idx", mode="r", order="C")
    lengths = np.frombuffer(buf, dtype=np.int32, count=n_seq, offset=offset)
    pointers = np.frombuffer(buf, dtype=np.int64, count=n_seq, offset=offset + lengths.nbytes)
    docs = np.frombuffer(buf, dtype=np.int64, count=n_doc, offset=offset + lengths.nbytes + pointers.nbytes)
    data = np.memmap(f"{prefix}.bin", mode="r", order="C")
    seqs = [np.frombuffer(data, dtype=dtype, count=int(n), offset=int(p)) for n, p in zip(lengths, pointers)]
    return dtype, lengths, pointers, docs, seqs


def megatron_write(prefix, dtype, documents):
    """Megatron-LM's IndexedDatasetBuilder + _IndexWriter layout, transcribed; each
    document is a list of sequences."""
    lengths, doc_idx = [], [0]
    with open(f"{prefix}.bin", "wb") as f:
        for doc in documents:
            for seq in doc:
                f.write(np.array(seq, dtype=dtype).tobytes(order="C"))
                lengths.append(len(seq))
            doc_idx.append(len(lengths))
    pointers, ptr = [], 0
    for n in lengths:
        pointers.append(ptr)
        ptr += n * np.dtype(dtype).itemsize
    code = {v: k for k, v in CODES.items()}[dtype]
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_idx)))
        f.write(np.array(lengths, dtype=np.int32).tobytes())
        f.write(np.array(pointers, dtype=np.int64).tobytes())
        f.write(np.array(doc_idx, dtype=np.int64).tobytes())


DOCS = [[[5, 6, 7]], [[1], [2, 3]], [], [[40000, 9, 9, 9]]]  # sentences; an empty document


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_what_we_write_megatron_reads(tmp_path, dtype):
    prefix = tmp_path / "d"
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in DOCS:
            w.add_document([t for s in doc for t in s], [len(s) for s in doc])
        w.finalize()
    got_dtype, lengths, pointers, docs, seqs = megatron_read(prefix)
    assert got_dtype == dtype
    assert lengths.tolist() == [3, 1, 2, 4] and docs.tolist() == [0, 1, 3, 3, 4]
    assert pointers.tolist() == [n * np.dtype(dtype).itemsize for n in (0, 3, 4, 6)]
    assert [s.tolist() for s in seqs] == [s for doc in DOCS for s in doc]
    assert not list(tmp_path.glob("*.tmp*"))


def test_what_megatron_writes_we_read(tmp_path):
    prefix = tmp_path / "m"
    megatron_write(prefix, np.int32, DOCS)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int32 and len(ds) == 4 and ds.num_documents == 4
    assert [ds[i].tolist() for i in range(4)] == [s for doc in DOCS for s in doc]
    assert ds.document_indices.tolist() == [0, 1, 3, 3, 4]
    assert ds.get(3, offset=1, length=2).tolist() == [9, 9]


def test_dtype_follows_megatron_rule():
    assert optimal_dtype(258) == np.uint16 and optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32 and optimal_dtype(None) == np.int32


def test_bad_files_are_named(tmp_path):
    with pytest.raises(DataError, match="nope.idx: no such file"):
        IndexedDataset(tmp_path / "nope")
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX" + bytes(40))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(DataError, match="x.idx: not a Megatron indexed dataset"):
        IndexedDataset(tmp_path / "x")
    with pytest.raises(DataError, match="does not fit"):
        with IndexedDatasetWriter(tmp_path / "y", np.uint16) as w:
            w.add_document([70000])
    assert not list(tmp_path.glob("y*"))  # the aborted writer left nothing


def _preprocess(*args):
    from mega.cli import main

    return main(["preprocess", "--quiet", *map(str, args)])


def test_preprocess_is_the_tokenizer_and_workers_change_nothing(tmp_path, corpus):
    assert _preprocess("--input", corpus, "--output-prefix", tmp_path / "one", "--tokenizer", "library=bytes",
                       "--append-eod") == 0
    assert _preprocess("--input", corpus, "--output-prefix", tmp_path / "two", "--tokenizer", "library=bytes",
                       "--append-eod", "--workers", "2") == 0
    for ext in ("bin", "idx"):
        assert (tmp_path / f"one_text_document.{ext}").read_bytes() == (tmp_path / f"two_text_document.{ext}").read_bytes()
    _, _, _, docs, seqs = megatron_read(tmp_path / "one_text_document")
    lines = [ln for ln in corpus.read_text().split("\n") if ln]
    tok = ByteTokenizer()
    assert [s.tolist() for s in seqs] == [tok.encode(ln) + [tok.eos_id] for ln in lines]
    assert docs.tolist() == list(range(len(lines) + 1))


def test_preprocess_jsonl_keys_and_sentences(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"text": "hello", "title": "a"}, {"text": ["two ", "sentences"], "title": ""}, {"text": "x", "title": "t"}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert _preprocess("--input", src, "--output-prefix", tmp_path / "j", "--json-keys", "text", "title",
                       "--tokenizer", "library=bytes") == 0
    text, title = IndexedDataset(tmp_path / "j_text_document"), IndexedDataset(tmp_path / "j_title_document")
    assert [text[i].tolist() for i in range(len(text))] == [list(b"hello"), list(b"two "), list(b"sentences"), [120]]
    assert text.document_indices.tolist() == [0, 1, 3, 4]
    assert title.document_indices.tolist() == [0, 1, 1, 2]  # an empty title is an empty document, as Megatron


def test_preprocess_errors_name_the_line(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n{"nope": 1}\n')
    assert _preprocess("--input", src, "--output-prefix", tmp_path / "b", "--tokenizer", "library=bytes") == 2
    assert "bad.jsonl:2: no key 'text'" in capsys.readouterr().err
    assert not list(tmp_path.glob("b_*"))
    assert _preprocess("--input", src, "--output-prefix", tmp_path / "b") == 2
    assert "say which tokenizer" in capsys.readouterr().err


def test_mmap_samples_equal_text_mmap_samples_of_the_same_documents(tmp_path, corpus):
    assert _preprocess("--input", corpus, "--output-prefix", tmp_path / "c", "--tokenizer", "library=bytes",
                       "--append-eod") == 0
    tok = ByteTokenizer()
    mm = MMapSource(MMapConfig(data_prefix=[1.0, str(tmp_path / "c_text_document")], splits_string="80,10,10"), None)
    tm = TextMemMapSource(TextMemMapConfig(data_prefix=[1.0, str(corpus)], splits_string="80,10,10"), tmp_path)
    for split in ("train", "valid"):
        a, b = mm.dataset(split, tok, 16, 200, seed=5), tm.dataset(split, tok, 16, 200, seed=5)
        for k in range(0, 200, 7):
            assert all(a[k][f].equal(b[k][f]) for f in ("tokens", "labels", "loss_mask")), (split, k)


def test_a_run_trains_on_mmap_data(tmp_path, corpus, plugins):
    from mega.testing import read_metrics, tiny_config
    from mega.training.run import run

    assert _preprocess("--input", corpus, "--output-prefix", tmp_path / "c", "--tokenizer", "library=bytes",
                       "--append-eod") == 0
    blend = [0.7, str(tmp_path / "c_text_document"), 0.3, str(tmp_path / "c_text_document")]
    cfg = tiny_config(tmp_path, corpus, plugins, trainer={"max_steps": 3},
                      model={"data": {"data_impl": "mmap", "data_prefix": blend}})
    r = run(cfg, plugins)
    lines = read_metrics(r.run_dir)
    assert lines[-1]["step"] == 3 and any("val_loss" in m for m in lines)
    train = [m for m in lines if "loss" in m]
    # packed: padding only in the one short window an epoch ends with
    assert all(0.9 * m["tokens_per_sec"] < m["loss_tokens_per_sec"] <= m["tokens_per_sec"] for m in train)


def test_mmap_pack_false_is_one_padded_sample_per_document(tmp_path):
    prefix = tmp_path / "p"
    docs = [[1, 2, 3, 9], [4, 9], [9], list(range(10, 40)) + [9]]
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)
        w.finalize()
    src = MMapSource(MMapConfig(data_prefix=[1.0, str(prefix)], splits_string="100,0,0", pack=False, shuffle=False), None)
    ds = src.dataset("train", ByteTokenizer(), 8, 3, seed=0)
    want = [d[:9] for d in docs if len(d) >= 2]  # a one-token document makes no sample
    for k, ids in enumerate(want):
        n = len(ids) - 1
        assert ds[k]["tokens"][:n].tolist() == ids[:-1] and ds[k]["labels"][:n].tolist() == ids[1:]
        assert ds[k]["loss_mask"].sum() == n


def test_preprocess_takes_the_tokenizer_of_an_experiment(tmp_path, corpus):
    from mega.testing import TinyExperiment

    toml = TinyExperiment(tmp_path, corpus).toml()  # model.tokenizer.library = "bytes"
    assert _preprocess("--input", corpus, "--output-prefix", tmp_path / "e", "--config", toml) == 0
    assert _preprocess("--input", corpus, "--output-prefix", tmp_path / "k", "--tokenizer", "library=bytes") == 0
    for ext in ("bin", "idx"):
        assert (tmp_path / f"e_text_document.{ext}").read_bytes() == (tmp_path / f"k_text_document.{ext}").read_bytes()


def test_preprocess_takes_the_tokenizer_an_experiment_trained(tmp_path, corpus, caplog):
    """`--config` of a run that trained its tokenizer uses that tokenizer as it is, with or
    without checkpoints in the run directory (it names no corpus, so there is nothing to
    compare the tokenizer's stamp with, and nothing to train it again from)."""
    from mega.testing import TinyExperiment

    exp = TinyExperiment(tmp_path, corpus)
    sections = dict(trainer={"max_steps": 1, "val_check_interval": 0}, exp_manager={"checkpoint": {"save_last": False}},
                    model={"tokenizer": {"library": "sentencepiece", "vocab_size": 60}})
    run = exp.run(**sections)  # no checkpoint saved
    toml = exp.toml(**sections)
    model = run.run_dir / "tokenizer.model"
    before = model.read_bytes()
    with caplog.at_level("WARNING", logger="mega"):
        assert _preprocess("--input", corpus, "--output-prefix", tmp_path / "e", "--config", toml) == 0
    assert "trained from other inputs" not in caplog.text and model.read_bytes() == before
    assert _preprocess("--input", corpus, "--output-prefix", tmp_path / "k", "--tokenizer", "library=sentencepiece",
                       "--tokenizer", f"model={model}") == 0
    for ext in ("bin", "idx"):
        assert (tmp_path / f"e_text_document.{ext}").read_bytes() == (tmp_path / f"k_text_document.{ext}").read_bytes()
