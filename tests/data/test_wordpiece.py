"""The wordpiece tokenizer against transformers' BertTokenizerFast and BertTokenizer on the
same vocab.txt: ids equal the fast one's on NFC-composed text, and the slow one's on text
without unassigned code points, cased and uncased, on awkward text."""
from __future__ import annotations

from pathlib import Path

import pytest

from mega.config import config_from_dict
from mega.errors import ConfigError
from mega.protocols import HasSpecialTokens, KnowsWordStarts, Tokenizer

CORPUS = """\
The quick brown fox jumps over the lazy dog. Résumé of a naïve café owner in Zürich.
Über-long sentences, with punctuation: semicolons; dashes -- and (parentheses)!
Ça va? Señor Muñoz élève l'École. Ελληνικά κείμενα και ΟΔΟΣ οδός.
東京は日本の首都です。北京欢迎你。 한국어 텍스트도 있습니다. ひらがなとカタカナ。
Numbers 12345 and 3.14159, e-mail someone@example.com, URLs http://x.y/z?q=1&r=2.
Tokenization of unbelievably unaffordable internationalization requirements.
Running runners ran; playing players played; the THE The tHe.
Emoji 😀 and symbols © ® ™ € £ ¥ § ¶ • … – — “quotes” ‘single’ «guillemets».
"""

AWKWARD = [
    "Hello, World! Résumé naïve CAFÉ Zürich.",
    "ÉCOLE élève Ça va? Señor Muñoz",
    "東京は日本の首都です。北京欢迎你",  # CJK ideographs are split one by one; kana are not
    "한국어 텍스트",
    "tab\tnew\nline\r\nand\u3000ideographic\u00a0nbsp  spaces",
    "control\x00chars\x07here\x1b[0m and \ufffd replacement",
    "zero\u200bwidth\u200cjoiners\u200d and\ufeffBOM",
    "emoji 😀😀 and © ® ™ € ¥",
    "a" * 101 + " short " + "b" * 99,  # > 100 chars: [UNK]; 99: greedy pieces
    "unbelievably unaffordable internationalization",
    "e\u0301cole decomposed accents",  # NFD input
    "ΟΔΟΣ οδός Ελληνικά",
    "“quotes” ‘single’ «guillemets» … – —",
    "someone@example.com http://x.y/z?q=1&r=2 3.14159",
    "",
    "   ",
    "[CLS] special [SEP] tokens [MASK] in text [PAD]",
]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory) -> Path:
    """A vocab.txt in the layout of Google's: [PAD]=0, [unused*], [UNK]=100, [CLS]=101,
    [SEP]=102, [MASK]=103, then pieces learnt from a mixed-script corpus (cased)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import WordPiece

    root = tmp_path_factory.mktemp("wp")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS * 3 + CORPUS.lower() * 3, encoding="utf-8")
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train([str(corpus)], trainers.WordPieceTrainer(vocab_size=600, min_frequency=1, show_progress=False))
    learnt = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if not t.startswith("[")]
    head = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    extra = list("abcdefghijklmnopqrstuvwxyzαβγδεζηθικλμνξοπρστυφχψωσς") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    tokens = list(dict.fromkeys(head + learnt + extra))  # no repeats: ids are line numbers
    path = root / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def wordpiece(plugins, **keys):
    cfg = config_from_dict({"model": {"tokenizer": {"library": "wordpiece", **keys}}}, plugins=plugins).model.tokenizer
    return plugins.tokenizers.get("wordpiece").factory(cfg, [], None)


@pytest.mark.parametrize("name,lower", [("megatron-bert-uncased", True), ("megatron-bert-cased", False)])
def test_ids_equal_transformers_bert_tokenizer(plugins, vocab_file, name, lower):
    from transformers import BertTokenizer

    ours = wordpiece(plugins, vocab_file=str(vocab_file), tokenizer_name=name)
    ref = BertTokenizer(str(vocab_file), do_lower_case=lower)
    assert ours.vocab_size == ref.vocab_size
    assert (ours.pad_id, ours.cls_id, ours.sep_id, ours.mask_id, ours.unk_id) == (0, 101, 102, 103, 100)
    assert (ours.pad_id, ours.cls_id, ours.sep_id, ours.mask_id) == (ref.pad_token_id, ref.cls_token_id,
                                                                      ref.sep_token_id, ref.mask_token_id)
    assert ours.eos_id == ours.sep_id
    assert isinstance(ours, Tokenizer) and isinstance(ours, HasSpecialTokens) and isinstance(ours, KnowsWordStarts)
    for text in AWKWARD + CORPUS.splitlines():
        expected = ref.encode(text, add_special_tokens=False)
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == ref.decode(expected), text


UNASSIGNED = "the\u0378 quick"  # U+0378 is an unassigned code point (category Cn)


@pytest.mark.parametrize("name,lower", [("megatron-bert-uncased", True), ("megatron-bert-cased", False)])
def test_ids_are_the_fast_tokenizers_on_nfc_text(plugins, vocab_file, name, lower):
    """What docs/bert-data.md says: mega's ids are transformers' BertTokenizerFast's after NFC
    composition. The slow BertTokenizer composes too, but deletes unassigned code points
    (mega and the fast one keep them, so the word is [UNK]); the fast one does not compose,
    so a decomposed accent in cased text gives other pieces than mega's."""
    import unicodedata

    from transformers import BertTokenizer, BertTokenizerFast

    ours = wordpiece(plugins, vocab_file=str(vocab_file), tokenizer_name=name)
    fast = BertTokenizerFast(str(vocab_file), do_lower_case=lower)
    slow = BertTokenizer(str(vocab_file), do_lower_case=lower)
    for text in AWKWARD + CORPUS.splitlines() + [UNASSIGNED]:
        assert ours.encode(text) == fast.encode(unicodedata.normalize("NFC", text), add_special_tokens=False), text
    # where the two references part, mega is on the side the docs say
    assert ours.encode(UNASSIGNED) == fast.encode(UNASSIGNED, add_special_tokens=False)
    assert ours.encode(UNASSIGNED) != slow.encode(UNASSIGNED, add_special_tokens=False)
    assert ours.encode(UNASSIGNED)[0] == ours.unk_id
    decomposed = "e\u0301cole"
    assert ours.encode(decomposed) == slow.encode(decomposed, add_special_tokens=False)
    if not lower:  # uncased text loses its accents anyway
        assert ours.encode(decomposed) != fast.encode(decomposed, add_special_tokens=False)


def test_uncased_strips_accents_and_cased_keeps_them(plugins, vocab_file):
    uncased = wordpiece(plugins, vocab_file=str(vocab_file))
    cased = wordpiece(plugins, vocab_file=str(vocab_file), tokenizer_name="megatron-bert-cased")
    assert uncased.decode(uncased.encode("Résumé CAFÉ")) == "resume cafe"
    assert cased.decode(cased.encode("Résumé")) == "Résumé"
    assert wordpiece(plugins, vocab_file=str(vocab_file), tokenizer_name="megatron-bert-cased",
                     do_lower_case=True).encode("Résumé") == uncased.encode("Résumé")


def test_long_words_become_unk_at_the_configured_limit(plugins, vocab_file):
    from transformers import BertTokenizer

    for limit in (100, 200):  # transformers' default and Megatron-LM's
        ours = wordpiece(plugins, vocab_file=str(vocab_file), max_input_chars_per_word=limit)
        ref = BertTokenizer(str(vocab_file), do_lower_case=True)
        ref.wordpiece_tokenizer.max_input_chars_per_word = limit
        for n in (limit - 1, limit, limit + 1):
            text = "x" + "a" * (n - 1)
            assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
        assert ours.encode("a" * (limit + 1)) == [ours.unk_id]
        assert ours.encode("a" * limit) != [ours.unk_id]


def test_word_starts_follow_the_continuation_prefix(plugins, vocab_file):
    tok = wordpiece(plugins, vocab_file=str(vocab_file))
    ids = tok.encode("foxes jumped quickly over lazier dogs")
    pieces = tok.tokens(ids)
    assert any(p.startswith("##") for p in pieces)
    assert tok.word_starts(ids) == [not p.startswith("##") for p in pieces]


def test_decode_round_trips_plain_text(plugins, vocab_file):
    tok = wordpiece(plugins, vocab_file=str(vocab_file))
    text = "the quick brown fox jumps over the lazy dog. running runners ran!"
    assert tok.decode(tok.encode(text)) == text


def test_missing_or_empty_vocab_file_is_a_config_error_naming_the_key(plugins, tmp_path):
    with pytest.raises(ConfigError, match="model.tokenizer.vocab_file: no such file"):
        wordpiece(plugins, vocab_file=str(tmp_path / "none.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match="model.tokenizer.vocab_file: .*empty"):
        wordpiece(plugins, vocab_file=str(tmp_path / "empty.txt"))
    with pytest.raises(ConfigError, match="model.tokenizer.vocab_file: empty"):
        wordpiece(plugins, vocab_file="")
    (tmp_path / "nospecial.txt").write_text("[PAD]\nhello\n")
    with pytest.raises(ConfigError, match=r"model.tokenizer.vocab_file: .*lacks \[UNK\], \[CLS\], \[SEP\], \[MASK\]"):
        wordpiece(plugins, vocab_file=str(tmp_path / "nospecial.txt"))
    with pytest.raises(ConfigError, match="model.tokenizer.tokenizer_name='nope'"):
        wordpiece(plugins, vocab_file=str(tmp_path / "nospecial.txt"), tokenizer_name="nope")


def test_trains_a_vocab_once_into_the_run_dir(plugins, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS * 5)
    cfg = config_from_dict({"model": {"tokenizer": {"library": "wordpiece", "vocab_size": 300}}},
                           plugins=plugins).model.tokenizer
    build = plugins.tokenizers.get("wordpiece").factory
    run = tmp_path / "run"
    tok = build(cfg, [corpus], run)
    vocab = (run / "vocab.txt").read_text().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) <= 300
    assert tok.artifacts() == {"vocab_file": run / "vocab.txt"} and tok.vocab_size == len(vocab)
    assert all(t == t.lower() for t in vocab[5:])  # uncased by default
    mtime = (run / "vocab.txt").stat().st_mtime_ns
    again = build(cfg, [corpus], run)  # reused, not retrained
    assert (run / "vocab.txt").stat().st_mtime_ns == mtime and again.encode("The fox") == tok.encode("The fox")


def test_a_run_trains_its_vocab_and_checkpoints_carry_it(tmp_path, plugins, corpus):
    """A tiny GPT with a trained WordPiece vocabulary: the checkpoint holds the vocab.txt and
    its config points at that copy, so inference rebuilds the same tokenizer from it alone."""
    import shutil

    from mega.checkpoint import restore
    from mega.testing import TinyExperiment

    run = TinyExperiment(tmp_path, corpus, plugins).run(
        trainer={"max_steps": 2, "val_check_interval": 0},
        exp_manager={"checkpoint": {"every_n_train_steps": 2}},
        model={"tokenizer": {"library": "wordpiece", "vocab_size": 200}})
    vocab = run.run_dir / "vocab.txt"
    assert vocab.is_file() and run.tokenizer.vocab_size == len(vocab.read_text().splitlines())
    checkpoint = sorted(p for p in (run.run_dir / "checkpoints").iterdir() if p.is_dir())[-1]
    assert (checkpoint / "tokenizer.vocab.txt").read_text() == vocab.read_text()
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved)
    vocab.unlink()  # the checkpoint stands on its own
    _, tokenizer, config = restore(moved, plugins)
    assert config.model.tokenizer.vocab_file == str(moved / "tokenizer.vocab.txt")
    text = "the model of the run"
    assert tokenizer.encode(text) == run.tokenizer.encode(text) and tokenizer.cls_id == run.tokenizer.cls_id
