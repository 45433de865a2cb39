"""The data users already have: the text source (`text_mmap`) and `mega preprocess` read
JSONL, gzip- and zstd-compressed text and JSONL, Parquet and directories
`datasets.Dataset.save_to_disk` wrote, and give the same samples (and the same indexed
files) as the equivalent raw text; a record that cannot be read is a DataError naming the
file and the line or row. The Parquet and saved datasets are written by pyarrow's and
datasets' own code."""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

from mega.documents import iter_documents
from mega.errors import DataError
from mega.plugins.data.document_file import document_file
from mega.plugins.data.indexed import IndexedDataset
from mega.plugins.data.text_mmap import TextMemMapConfig, TextMemMapSource
from mega.plugins.tokenizers.bytes import ByteTokenizer


def _lines(corpus: Path) -> list:
    return [ln for ln in corpus.read_text().split("\n") if ln]


def _write_jsonl(path: Path, rows, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def _zstd(src: Path, dst: Path) -> Path:
    import zstandard

    dst.write_bytes(zstandard.ZstdCompressor().compress(src.read_bytes()))
    return dst


def _equivalents(tmp_path: Path, corpus: Path) -> dict:
    """The corpus (one document per line) in every form the text source reads."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = _lines(corpus)
    rows = [{"id": i, "text": line} for i, line in enumerate(lines)]
    out = {"txt": corpus}
    out["jsonl"] = _write_jsonl(tmp_path / "c.jsonl", rows)
    out["jsonl.gz"] = _write_jsonl(tmp_path / "c.jsonl.gz", rows, gzip.open)
    out["jsonl.zst"] = _zstd(out["jsonl"], tmp_path / "c.jsonl.zst")
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(corpus.read_bytes()))
    out["txt.gz"] = tmp_path / "c.txt.gz"
    out["txt.zst"] = _zstd(corpus, tmp_path / "c.txt.zst")
    pq.write_table(pa.table({"id": list(range(len(lines))), "text": lines}), tmp_path / "c.parquet")
    out["parquet"] = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"text": lines, "id": list(range(len(lines)))}).save_to_disk(str(tmp_path / "c_dataset"))
    out["saved dataset"] = tmp_path / "c_dataset"
    return out


def _samples(source, split, n=120, seq=16):
    ds = source.dataset(split, ByteTokenizer(), seq, n, seed=5)
    return [{k: v.tolist() for k, v in ds[i].items()} for i in range(n)]


@pytest.mark.parametrize("pack", [True, False])
def test_every_form_of_the_same_documents_gives_the_same_samples(tmp_path, corpus, pack):
    forms = _equivalents(tmp_path, corpus)
    sources = {name: TextMemMapSource(TextMemMapConfig(data_prefix=[1.0, str(p)], splits_string="80,10,10", pack=pack),
                                      tmp_path / "runs" / name.replace(" ", "_"))
               for name, p in forms.items()}
    reference = sources["txt"]
    for name, source in sources.items():
        assert len(source.indexes[0]) == len(_lines(corpus)), name
        assert source.files()[0].read_text() == corpus.read_text() or name == "txt", name  # what a tokenizer trains on
        for split in ("train", "valid"):
            assert _samples(source, split) == _samples(reference, split), (name, split)


def test_a_record_with_newlines_is_one_document_and_json_key_picks_the_field(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", [{"content": "first line\nsecond line", "text": "x"},
                                              {"content": "", "text": "y"},  # empty: skipped, as an empty line
                                              {"content": "  ", "text": "z"}])
    docs = document_file(src, "content", tmp_path / "cache")
    assert [docs[i] for i in range(len(docs))] == ["first line\nsecond line", "  "]
    assert docs.path.read_text() == "first line\nsecond line\n  \n"
    source = TextMemMapSource(TextMemMapConfig(data_prefix=[1.0, str(src)], json_key="content", splits_string="1,0,0"),
                              tmp_path / "run")
    assert len(source.indexes[0]) == 2 and source.indexes[0][0] == "first line\nsecond line"


def test_the_converted_file_is_reused_until_the_input_changes(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl.gz", [{"text": "a"}, {"text": "b"}], gzip.open)
    first = document_file(src, "text", tmp_path / "cache")
    written = first.path.stat().st_mtime_ns
    again = document_file(src, "text", tmp_path / "cache")
    assert again.path == first.path and again.path.stat().st_mtime_ns == written
    _write_jsonl(src, [{"text": "a"}, {"text": "b"}, {"text": "c"}], gzip.open)
    changed = document_file(src, "text", tmp_path / "cache")
    assert changed.path != first.path and [changed[i] for i in range(3)] == ["a", "b", "c"]


BAD_JSONL = [
    ('{"text": "ok"}\n{"text": "broken"\n', "bad.jsonl:2: not a JSON object"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', "bad.jsonl:3: no key 'text' (model.data.json_key); the object has 'body'"),
    ('{"text": 5}\n', "bad.jsonl:1: 'text' is a number, expected a string"),
    ('{"text": null}\n', "bad.jsonl:1: 'text' is null, expected a string"),
    ('{"text": ["a", "b"]}\n', "bad.jsonl:1: 'text' is a list, expected a string"),
    ('["text"]\n', "bad.jsonl:1: not a JSON object but a list"),
    ('{"text": ""}\n', "bad.jsonl: no documents"),
]


@pytest.mark.parametrize("content, message", BAD_JSONL)
def test_a_record_that_cannot_be_read_names_the_file_and_line(tmp_path, content, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    with pytest.raises(DataError) as info:
        TextMemMapSource(TextMemMapConfig(data_prefix=[1.0, str(src)]), tmp_path / "run")
    assert message in str(info.value), str(info.value)
    assert not list((tmp_path / "run" / "data" / "documents").glob("bad.jsonl.*.txt"))  # nothing half-written is kept


def test_bad_bytes_and_broken_streams_are_named(tmp_path):
    src = tmp_path / "latin.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not UTF-8"):
        list(iter_documents(src))
    whole = gzip.compress(b'{"text": "ok"}\n' * 2000)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: cannot read it as gzip"):
        list(iter_documents(tmp_path / "cut.jsonl.gz"))
    (tmp_path / "junk.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(DataError, match=r"junk\.jsonl\.zst: cannot read it as zstd"):
        list(iter_documents(tmp_path / "junk.jsonl.zst"))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable Parquet file"):
        list(iter_documents(tmp_path / "junk.parquet"))


def test_columnar_inputs_name_the_column_and_the_row(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "nokey.parquet")
    with pytest.raises(DataError, match=r"nokey\.parquet: no column 'text' \(model\.data\.json_key\); its columns: body"):
        list(iter_documents(tmp_path / "nokey.parquet"))
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null\.parquet: row 2: 'text' is null"):
        list(iter_documents(tmp_path / "null.parquet"))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints\.parquet: row 1: 'text' is a number"):
        list(iter_documents(tmp_path / "ints.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                          "test": datasets.Dataset.from_dict({"text": ["b"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: a DatasetDict \(test, train\); give one split's directory"):
        list(iter_documents(tmp_path / "dd"))
    assert list(iter_documents(tmp_path / "dd" / "train")) == ["a"]
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match="not one Dataset.save_to_disk wrote"):
        list(iter_documents(tmp_path / "plain_dir"))


def test_a_missing_package_is_named_with_its_extra(tmp_path, monkeypatch):
    (tmp_path / "c.zst").write_bytes(b"x")
    (tmp_path / "c.parquet").write_bytes(b"x")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    for name in ("zstandard", "compression", "pyarrow", "pyarrow.parquet", "datasets"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(DataError, match=r"c\.zst: reading \.zst needs the zstandard package: pip install 'mega-lm\[zstd\]'"):
        list(iter_documents(tmp_path / "c.zst"))
    with pytest.raises(DataError, match=r"c\.parquet: reading Parquet needs pyarrow: pip install 'mega-lm\[datasets\]'"):
        list(iter_documents(tmp_path / "c.parquet"))
    with pytest.raises(DataError, match=r"ds: reading a Hugging Face dataset needs the datasets package"):
        list(iter_documents(tmp_path / "ds"))


# --- mega preprocess ------------------------------------------------------------------------

def _preprocess(*args):
    from mega.cli import main

    return main(["preprocess", "--quiet", "--tokenizer", "library=bytes", *map(str, args)])


def test_preprocess_writes_the_same_indexed_files_from_every_form(tmp_path, corpus):
    forms = _equivalents(tmp_path, corpus)
    written = {}
    for name, path in forms.items():
        prefix = tmp_path / "out" / name.replace(" ", "_").replace(".", "_")
        assert _preprocess("--input", path, "--output-prefix", prefix, "--append-eod") == 0, name
        written[name] = tuple((Path(f"{prefix}_text_document.{ext}")).read_bytes() for ext in ("bin", "idx"))
    assert len(set(written.values())) == 1, [n for n in written if written[n] != written["txt"]]
    docs = IndexedDataset(tmp_path / "out" / "parquet_text_document")
    assert len(docs) == len(_lines(corpus))


def test_preprocess_reads_several_columns_of_a_saved_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["hello", "x"], "title": ["a", ""]}).save_to_disk(str(tmp_path / "ds"))
    assert _preprocess("--input", tmp_path / "ds", "--output-prefix", tmp_path / "j", "--json-keys", "text", "title") == 0
    text, title = IndexedDataset(tmp_path / "j_text_document"), IndexedDataset(tmp_path / "j_title_document")
    assert [text[i].tolist() for i in range(len(text))] == [list(b"hello"), [120]]
    assert title.document_indices.tolist() == [0, 1, 1]  # an empty title is an empty document, as from JSONL


@pytest.mark.parametrize("value, kind", [(5, "a number"), (None, "null"), ({"a": 1}, "an object"),
                                         (["a", 1], "a list holding other things than strings")])
def test_preprocess_refuses_a_value_that_is_not_text_naming_the_line(tmp_path, capsys, value, kind):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": "ok"}, {"text": value}])
    assert _preprocess("--input", src, "--output-prefix", tmp_path / "b") == 2
    assert f"in.jsonl:2: 'text' is {kind}, expected a string or a list of strings" in capsys.readouterr().err
    assert not list(tmp_path.glob("b_*"))


# --- a whole run -----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_on_compressed_jsonl_trains_the_vocabulary_and_losses_of_the_raw_text(tmp_path, corpus, plugins):
    """The sentencepiece tokenizer trains on the converted text; the same vocabulary, the
    same losses."""
    from mega.testing import read_metrics, tiny_config
    from mega.training.run import run

    rows = [{"text": line} for line in _lines(corpus)]
    jz = _write_jsonl(tmp_path / "c.jsonl.gz", rows, gzip.open)
    outcomes = {}
    for name, path in (("txt", corpus), ("jsonl_gz", jz)):
        config = tiny_config(tmp_path, corpus, plugins, trainer={"max_steps": 3, "val_check_interval": 3},
                             exp_manager={"name": name},
                             model={"tokenizer": {"library": "sentencepiece", "vocab_size": 60},
                                    "data": {"data_prefix": [str(path)]}})
        r = run(config, plugins)
        # the pieces and scores (the .model also records the paths it was trained from)
        outcomes[name] = ((r.run_dir / "tokenizer.vocab").read_text(), read_metrics(r.run_dir))
    (vocab_a, metrics_a), (vocab_b, metrics_b) = outcomes["txt"], outcomes["jsonl_gz"]
    assert vocab_a == vocab_b
    assert [(m["step"], m.get("loss"), m.get("val_loss")) for m in metrics_a] == \
        [(m["step"], m.get("loss"), m.get("val_loss")) for m in metrics_b]
