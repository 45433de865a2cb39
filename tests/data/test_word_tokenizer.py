"""The `word` tokenizer against a transcription of the Transformer-XL reference's
vocabulary rules (written here from their description: tokenize = strip, lower-case,
split; count the training lines without <eos>; specials first, then most_common, stopping
at the first count under min_freq; every line, empty ones too, encoded as words + <eos>)."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mega.errors import ConfigError, DataError


class ReferenceVocab:
    """The reference's rules, line by line, deliberately naive."""

    def __init__(self, special=(), min_freq=0, max_size=None, lower_case=False, delimiter=None):
        self.special, self.min_freq, self.max_size = list(special), min_freq, max_size
        self.lower_case, self.delimiter = lower_case, delimiter
        self.counter = Counter()

    def tokenize(self, line, add_eos=False):
        line = line.strip()
        if self.lower_case:
            line = line.lower()
        symbols = list(line) if self.delimiter == "" else line.split(self.delimiter)
        return symbols + ["<eos>"] if add_eos else symbols

    def count_file(self, path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                self.counter.update(self.tokenize(line))

    def build(self):
        self.idx2sym, self.sym2idx = [], {}
        for s in self.special:
            self._add(s)
        for sym, cnt in self.counter.most_common(self.max_size):
            if cnt < self.min_freq:
                break
            self._add(sym)

    def _add(self, sym):
        if sym not in self.sym2idx:
            self.idx2sym.append(sym)
            self.sym2idx[sym] = len(self.idx2sym) - 1

    def encode_file(self, path):
        out = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                out += [self.sym2idx[s] for s in self.tokenize(line, add_eos=True)]
        return out


def write_text(path: Path, lines: int = 300, seed: int = 0, words: int = 60) -> Path:
    """Zipf-ish words with many ties, mixed case, empty lines, tabs and CRLF line ends."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(words)] + ["The", "the", "THE", "<unk>", "@-@", "é"]
    out = []
    for n in range(lines):
        if n % 17 == 0:
            out.append("\r\n" if n % 2 else "\n")
            continue
        k = rng.randint(1, 12)
        line = " ".join(vocab[min(int(rng.paretovariate(1.2)) - 1, len(vocab) - 1)] if rng.random() < 0.8
                        else rng.choice(vocab) for _ in range(k))
        out.append((" " if n % 5 == 0 else "") + line.replace(" ", "\t", 1) + ("\r\n" if n % 7 == 0 else "\n"))
    path.write_text("".join(out), encoding="utf-8", newline="")
    return path


def _word(tmp_path, files, run_dir="run", **options):
    from mega.plugins.tokenizers.word import WordConfig, build

    return build(WordConfig(**options), [Path(f) for f in files], None if run_dir is None else tmp_path / run_dir)


@pytest.mark.parametrize("options", [
    {},
    {"lower_case": True},
    {"min_freq": 3},
    {"max_size": 10},
    {"special": ["<eos>", "<unk>"], "min_freq": 2},
    {"delimiter": "\t"},
])
def test_symbols_and_encoding_follow_the_reference(tmp_path, options):
    train = write_text(tmp_path / "train.txt")
    test = write_text(tmp_path / "test.txt", lines=80, seed=1)
    ref = ReferenceVocab(special=options.get("special", ["<eos>"]), min_freq=options.get("min_freq", 0),
                         max_size=options.get("max_size"), lower_case=options.get("lower_case", False),
                         delimiter=options.get("delimiter"))
    ref.count_file(train)
    ref.build()
    tok = _word(tmp_path, [train], **options)
    assert tok.symbols == ref.idx2sym
    assert tok.eos_id == ref.sym2idx["<eos>"] == 0 and tok.pad_id == tok.eos_id
    assert tok.vocab_size == len(ref.idx2sym)
    if options.get("min_freq") or options.get("max_size"):
        return  # out-of-vocabulary words: the reference has no fallback for them
    assert tok.encode_file(train).tolist() == ref.encode_file(train)
    # a line through the Tokenizer protocol, plus the eos a data source appends
    for line in train.read_text(encoding="utf-8").splitlines()[:40]:
        assert tok.encode(line) + [tok.eos_id] == [ref.sym2idx[s] for s in ref.tokenize(line, add_eos=True)]
    del test


def test_multi_line_text_is_lines_joined_by_eos_and_decodes_back(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("a b c\nc b\n\nb\n")
    tok = _word(tmp_path, [train])
    a, b, c, eos = (tok.ids[s] for s in "a b c <eos>".split())
    assert tok.symbols == ["<eos>", "b", "c", "a"]  # b:3, c:2, a:1
    assert tok.encode("a b\n\nc") == [a, b, eos, eos, c]
    assert tok.decode(tok.encode("a b\n\nc")) == "a b\n\nc"
    assert tok.encode_file(train).tolist() == [a, b, c, eos, c, b, eos, eos, b, eos]


def test_unknown_words_map_to_unk_only_when_the_vocabulary_has_it(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("x y <unk> y\n")
    tok = _word(tmp_path, [train])
    assert tok.encode("y zzz") == [tok.ids["y"], tok.ids["<unk>"]]
    train.write_text("x y y\n")
    tok = _word(tmp_path, [train], run_dir="run2")
    with pytest.raises(DataError, match="'zzz' is not in the vocabulary"):
        tok.encode("y zzz")


def test_a_vocab_file_with_upper_case_unk_maps_unknown_words_to_it_as_the_reference(tmp_path):
    """One Billion Word's vocabulary file holds <UNK>; the reference's vocab_file loading
    maps every unknown word to it (line by line and whole files, with <S> or <eos> ends)."""
    vocab = tmp_path / "1b_word_vocab.txt"
    vocab.write_text("<S>\n<UNK>\nthe\nof\n")
    data = tmp_path / "valid.txt"
    data.write_text("the zebra of\nquokka\n")
    tok = _word(tmp_path, [], run_dir=None, vocab_file=str(vocab), special=[], add_eos=False, add_double_eos=True)
    s, unk, the, of = 0, 1, 2, 3
    assert tok.unk_id == unk
    assert tok.encode_file(data).tolist() == [s, the, unk, of, s, s, unk, s]
    assert tok.encode("the zebra") == [s, the, unk]  # a line without its final end symbol
    vocab.write_text("<eos>\n<unk>\n<UNK>\nthe\nof\n")  # both spellings: <UNK>, as the reference's vocab_file
    tok = _word(tmp_path, [], run_dir=None, vocab_file=str(vocab))
    assert tok.unk_id == 2 and tok.encode_file(data).tolist() == [3, 2, 4, 0, 2, 0]


def test_the_vocabulary_is_counted_once_and_recounted_when_files_or_options_change(tmp_path, monkeypatch):
    from mega.plugins.tokenizers import word

    train = write_text(tmp_path / "train.txt")
    first = _word(tmp_path, [train])
    assert first.artifacts() == {"vocab_file": tmp_path / "run" / "tokenizer.vocab"}
    calls = []
    real = word.count_words
    monkeypatch.setattr(word, "count_words", lambda *a: calls.append(1) or real(*a))
    again = _word(tmp_path, [train])
    assert calls == [] and again.symbols == first.symbols
    _word(tmp_path, [train], lower_case=True)
    assert calls == [1]
    with open(train, "a") as f:
        f.write("brand new words\n")
    changed = _word(tmp_path, [train], lower_case=True)
    assert calls == [1, 1] and "brand" in changed.ids


def test_vocab_file_loads_our_format_and_the_references(tmp_path):
    train = write_text(tmp_path / "train.txt")
    built = _word(tmp_path, [train])
    loaded = _word(tmp_path, [], run_dir="elsewhere", vocab_file=str(built.vocab_file))
    assert loaded.symbols == built.symbols
    ref_style = tmp_path / "ref.vocab"
    ref_style.write_text("<eos> 0\nthe 12\nof 3\nthe 1\n<unk> 0\n")
    tok = _word(tmp_path, [], run_dir=None, vocab_file=str(ref_style))
    assert tok.symbols == ["<eos>", "the", "of", "<unk>"]  # a repeated symbol keeps its first id
    ref_style.write_text("the\nof\n")
    with pytest.raises(ConfigError, match="no <eos> symbol"):
        _word(tmp_path, [], vocab_file=str(ref_style))
    with pytest.raises(ConfigError, match="vocab_file: no such file"):
        _word(tmp_path, [], vocab_file=str(tmp_path / "missing"))


def test_symbols_with_spaces_and_tabs_survive_the_vocabulary_file(tmp_path):
    train = tmp_path / "chars.txt"
    train.write_text("ab\tc d\n")
    tok = _word(tmp_path, [train], delimiter="")
    again = _word(tmp_path, [], run_dir="x", delimiter="", vocab_file=str(tok.vocab_file))
    assert again.symbols == tok.symbols and "\t" in tok.ids and " " in tok.ids


def test_double_eos_wraps_each_line(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("a b\n")
    tok = _word(tmp_path, [train], special=["<S>"], add_eos=False, add_double_eos=True)
    s, a, b = tok.ids["<S>"], tok.ids["a"], tok.ids["b"]
    assert tok.eos_id == s and tok.encode_file(train).tolist() == [s, a, b, s]
    with pytest.raises(ConfigError, match="add_double_eos"):
        _word(tmp_path, [train], add_double_eos=True)


def test_enwik8_style_characters_without_end_symbols(tmp_path):
    """enwik8/text8: no specials, no <eos>; the symbols are the file's space-separated ids."""
    train = tmp_path / "train.txt"
    train.write_text("104 101 108 108 111\n32 119 111\n")
    ref = ReferenceVocab(special=[])
    ref.count_file(train)
    ref.build()
    tok = _word(tmp_path, [train], special=[], add_eos=False)
    assert tok.symbols == ref.idx2sym and tok.eos_id == 0
    assert tok.encode_file(train).tolist() == [ref.sym2idx[s] for s in "104 101 108 108 111 32 119 111".split()]


def test_enwik8_style_vocabulary_is_counted_over_train_valid_and_test_with_vocab_splits(tmp_path):
    """The reference counts enwik8's, text8's (and PTB's, WT2's) vocabulary over train,
    valid and test, in that order; `model.data.vocab_splits` says so (the default is
    WT103's train file only), and the ids and streams then equal the reference's."""
    from mega.plugins.data.lm_ordered import LMOrderedConfig, LMOrderedSource

    root = tmp_path / "enwik8"
    root.mkdir()
    texts = {"train": "1 2 2 3\n", "valid": "4 3 3\n4\n", "test": "5 4\n"}
    for split, text in texts.items():
        (root / f"{split}.txt").write_text(text)
    ref = ReferenceVocab(special=[])
    for split in ("train", "valid", "test"):
        ref.count_file(root / f"{split}.txt")
    ref.build()
    src = LMOrderedSource(LMOrderedConfig(data_dir=str(root), vocab_splits=["train", "valid", "test"]), tmp_path / "run")
    tok = _word(tmp_path, src.files(), special=[], add_eos=False)
    assert tok.symbols == ref.idx2sym == ["3", "4", "2", "1", "5"]
    for split, text in texts.items():
        assert src.token_stream(split, tok).tolist() == [ref.sym2idx[w] for w in text.split()]
    default = LMOrderedSource(LMOrderedConfig(data_dir=str(root)), tmp_path / "run2")
    assert default.files() == [root / "train.txt"]
    train_only = _word(tmp_path, default.files(), run_dir="run2", special=[], add_eos=False)
    assert train_only.symbols == ["2", "1", "3"]
    with pytest.raises(DataError, match="'4' is not in the vocabulary"):
        default.token_stream("valid", train_only)
    with pytest.raises(ConfigError, match="vocab_splits"):
        LMOrderedSource(LMOrderedConfig(data_dir=str(root), vocab_splits=["train", "dev"]), tmp_path / "run3")
    with pytest.raises(ConfigError, match="vocab_splits"):
        LMOrderedSource(LMOrderedConfig(data_prefix=[str(root / "train.txt")], vocab_splits=["train"]), tmp_path / "r4")


def test_a_tiny_gpt_trains_on_words_and_its_checkpoint_carries_the_vocabulary(mega_experiment):
    from mega.checkpoint import restore

    run = mega_experiment.run(model={"tokenizer": {"library": "word"}},
                              trainer={"max_steps": 2, "val_check_interval": 0})
    assert (run.run_dir / "tokenizer.vocab").is_file()
    model, tokenizer, config = restore(run.run_dir)
    assert tokenizer.symbols == run.tokenizer.symbols
    assert Path(config.model.tokenizer.vocab_file).name == "tokenizer.tokenizer.vocab"
    line = mega_experiment.corpus.read_text().splitlines()[0]
    assert tokenizer.encode(line) == run.tokenizer.encode(line)
    assert np.all(np.asarray(tokenizer.encode(line)) > 0)
