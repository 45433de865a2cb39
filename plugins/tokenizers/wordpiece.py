"""The `wordpiece` tokenizer: BERT's WordPiece from a `vocab.txt`, or trained on the corpus.

Built from the `tokenizers` library's parts, assembled to give the ids of transformers'
`BertTokenizerFast` on NFC-composed text (and of the slow `BertTokenizer`, except on
unassigned code points, which the slow one deletes) on the same vocab.txt:

* normalizer: drop NUL, U+FFFD and control/format characters (zero-width spaces too), map
  whitespace to a space, put spaces around CJK ideographs; then Unicode NFC (as
  transformers does); then, for uncased vocabularies, lower-case and strip accents;
* pre-tokenizer: split on whitespace and around every punctuation character;
* model: greedy longest-match-first WordPiece with `##` continuations; a word longer than
  `max_input_chars_per_word` characters, or one no vocabulary entry can start, is a single
  `[UNK]`.

`[PAD] [UNK] [CLS] [SEP] [MASK]` are special tokens: matched whole in the text (as
transformers does) and never lower-cased or split. The vocabulary has no end-of-text token,
so `eos_id` is `[SEP]`, the token that closes every BERT segment: a document that ends
with it ends the way BERT's inputs do.

With no `vocab_file`, a vocabulary of up to `vocab_size` entries is trained on the corpus
with the library's WordPieceTrainer (same normalizer and pre-tokenizer, the five special
tokens first) into `<run dir>/vocab.txt`, once; a resumed run reuses it, and checkpoints
carry it (`artifacts()`), so token ids never change under a checkpoint. A vocab.txt
trained from other files or options is trained again unless checkpoints depend on it
(`mega.checkpoint.trained_files`).

Training is deterministic: the same corpus and options give the same vocab.txt in every
process. The library alone does not: it numbers the `##` continuation characters in the
order its hash map of words yields them (random per process), and breaks ties between
equally frequent merges by those numbers, so both the pieces and their order vary. A
first pass (no merges) finds the continuation characters; the second pass trains with
them declared right after the special tokens, sorted, which fixes every number.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from attrs import define

import mega
from mega.checkpoint import trained_files
from mega.config import key, TokenizerConfig
from mega.config.schema import at_least_one
from mega.errors import ConfigError, DataError
from mega.plugins.tokenizers.wordpiece_interop import TOKENIZER_NAMES
from mega.plugins.tokenizers.wordpiece_interop import register_tokenizer_converters  # noqa: F401 (its converters)
from mega.checkpoint.atomic import atomic_write_text

log = logging.getLogger("mega.tokenizer")

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
           (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))

@define(kw_only=True)
class WordPieceConfig(TokenizerConfig):
    """`model.tokenizer.*` of the wordpiece library: a BERT vocab.txt, or a vocabulary
    trained on the corpus (when `vocab_file` is not given)."""

    library: str = "wordpiece"
    vocab_file: Optional[str] = key(None,
            help="a BERT vocab.txt (one token per line, id = line number); unset: train one")
    tokenizer_name: str = key("megatron-bert-uncased",
            help='"megatron-bert-uncased" lower-cases and strips accents, "megatron-bert-cased" keeps text as is (also bert-base-uncased, BertWordPieceCase, ...)')
    do_lower_case: Optional[bool] = key(None, help="unset: as tokenizer_name says; true/false overrides it")
    max_input_chars_per_word: int = key(default=100, validator=at_least_one,
            help="longer words become [UNK] (transformers: 100, Megatron-LM/Google: 200)")
    vocab_size: int = key(default=30522, validator=at_least_one,
            help="training only: the most entries of the trained vocab.txt (specials included)")
    min_frequency: int = key(default=2, validator=at_least_one,
            help="training only: merges seen fewer times are not learnt")


def lower_case(config: WordPieceConfig) -> bool:
    if config.do_lower_case is not None:
        return bool(config.do_lower_case)
    if config.tokenizer_name not in TOKENIZER_NAMES:
        raise ConfigError(f"model.tokenizer.tokenizer_name={config.tokenizer_name!r}: unknown; one of"
                          f" {', '.join(TOKENIZER_NAMES)} (or set model.tokenizer.do_lower_case)")
    return TOKENIZER_NAMES[config.tokenizer_name]


def read_vocab(path: Path) -> Dict[str, int]:
    """token -> id of a BERT vocab.txt: the id is the line number (a repeated token keeps
    its last line, as transformers reads it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"model.tokenizer.vocab_file: {path} is not UTF-8 text ({exc})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab = {line.rstrip("\r"): i for i, line in enumerate(lines)}
    if not vocab or all(not t.strip() for t in vocab):
        raise ConfigError(f"model.tokenizer.vocab_file: {path} is empty; a BERT vocab.txt has one token per line")
    return vocab


def _pipeline(lower: bool):
    """(normalizer, pre-tokenizer) of BERT's basic tokenization."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.Sequence([
        normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False),
        normalizers.NFC(),  # transformers' BertTokenizer composes after cleaning, before splitting
        normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=False, strip_accents=lower, lowercase=lower),
    ])
    return normalizer, pre_tokenizers.BertPreTokenizer()


class WordPieceTokenizer:
    """BERT WordPiece over a vocab.txt; `HasSpecialTokens` and `KnowsWordStarts`."""

    def __init__(self, vocab_file: Path, lower: bool, max_input_chars_per_word: int = 100):
        from tokenizers import AddedToken, Tokenizer
        from tokenizers.models import WordPiece

        self.vocab_file = Path(vocab_file)
        self.do_lower_case = lower
        vocab = read_vocab(self.vocab_file)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ConfigError(f"model.tokenizer.vocab_file: {self.vocab_file} lacks {', '.join(missing)}"
                              f" (a BERT vocabulary holds {' '.join(SPECIAL_TOKENS)})")
        tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                  max_input_chars_per_word=max_input_chars_per_word))
        tok.normalizer, tok.pre_tokenizer = _pipeline(lower)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        self.tokenizer = tok
        self.vocab_size = max(vocab.values()) + 1
        self.pad_id, self.unk_id = vocab["[PAD]"], vocab["[UNK]"]
        self.cls_id, self.sep_id, self.mask_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]
        self.eos_id = self.sep_id  # no end-of-text token in BERT vocabularies; [SEP] ends every segment
        self.id_to_token = [""] * self.vocab_size
        for token, i in vocab.items():
            self.id_to_token[i] = token
        # ids that continue a word (`##` pieces): whole-word masking keeps them with their word
        self.continues_word = np.array([t.startswith("##") for t in self.id_to_token], dtype=bool)
        if lower:
            cased = sum(1 for t in vocab if t != t.lower() and not (t.startswith("[") and t.endswith("]")))
            if cased > 0.01 * len(vocab):
                log.warning("%s: %d entries have upper-case letters, but text is lower-cased (tokenizer_name/"
                            "do_lower_case): is this a cased vocabulary?", self.vocab_file, cased)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Pieces joined by spaces, `##` continuations glued on, and the spaces before
        punctuation and English contractions removed (transformers' decode)."""
        text = " ".join(self.id_to_token[int(i)] for i in ids if 0 <= int(i) < self.vocab_size)
        text = text.replace(" ##", "").strip()
        for before, after in CLEANUP:
            text = text.replace(before, after)
        return text

    def tokens(self, ids: Sequence[int]) -> List[str]:
        return [self.id_to_token[int(i)] for i in ids]

    def word_starts(self, ids: Sequence[int]) -> List[bool]:
        """An id starts a word unless its vocabulary entry is a `##` continuation."""
        return [not self.continues_word[int(i)] for i in ids]

    def artifacts(self) -> Dict[str, Path]:
        return {"vocab_file": self.vocab_file}


def _train(files: List[Path], config: WordPieceConfig, lower: bool, first: Sequence[str], vocab_size: int) -> Dict[str, int]:
    """token -> id of one run of the library's WordPieceTrainer with `first` as its
    leading (special) tokens."""
    from tokenizers import Tokenizer, trainers
    from tokenizers.models import WordPiece

    tok = Tokenizer(WordPiece(unk_token="[UNK]", continuing_subword_prefix="##",
                              max_input_chars_per_word=config.max_input_chars_per_word))
    tok.normalizer, tok.pre_tokenizer = _pipeline(lower)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=config.min_frequency,
                                        special_tokens=list(first), continuing_subword_prefix="##",
                                        show_progress=False)
    tok.train([str(f) for f in files], trainer)
    return tok.get_vocab(with_added_tokens=True)


def train_vocab(files: List[Path], destination: Path, config: WordPieceConfig, lower: bool) -> Path:
    """A WordPiece vocabulary trained on `files`, written atomically to `destination`: the
    same file for the same corpus and options in every process (module docstring)."""
    files = [Path(f) for f in files]
    if not files or sum(os.path.getsize(f) for f in files) == 0:
        raise DataError(f"cannot train a WordPiece vocabulary: the corpus files are empty ({', '.join(map(str, files))})")
    log.info("training a WordPiece vocabulary (up to %d entries) on %.1f MB of text", config.vocab_size,
             sum(os.path.getsize(f) for f in files) / 1e6)
    # pass 1, no merges (vocab_size 1): the alphabet and every character's `##` continuation
    alphabet = _train(files, config, lower, SPECIAL_TOKENS, 1)
    continuations = sorted(t for t in alphabet if t.startswith("##") and t not in SPECIAL_TOKENS)
    vocab = _train(files, config, lower, SPECIAL_TOKENS + tuple(continuations), config.vocab_size)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    destination.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(destination, "".join(t + "\n" for t in tokens))
    return destination


def build(config: WordPieceConfig, corpus_files, run_dir: Optional[Path]) -> WordPieceTokenizer:
    if config.model:
        raise ConfigError("model.tokenizer.model: not used by the wordpiece tokenizer; set model.tokenizer.vocab_file"
                          " (a BERT vocab.txt), or leave it unset to train one")
    lower = lower_case(config)
    if config.vocab_file is not None:
        if not str(config.vocab_file).strip():
            raise ConfigError("model.tokenizer.vocab_file: empty; name a BERT vocab.txt, or leave it unset to train one")
        path = Path(config.vocab_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.tokenizer.vocab_file: no such file {path}")
        return WordPieceTokenizer(path, lower, config.max_input_chars_per_word)
    if run_dir is None:
        raise ConfigError("model.tokenizer.vocab_file: not set, and there is no run directory to train a vocabulary into")
    trained = Path(run_dir) / "vocab.txt"
    files = [Path(f) for f in corpus_files]
    stamp = trained_files.stamp(files, {"lower_case": lower, "vocab_size": config.vocab_size,
                                        "min_frequency": config.min_frequency})
    if not trained_files.reusable(trained, stamp, "the WordPiece vocabulary"):
        train_vocab(files, trained, config, lower)
        trained_files.write_stamp(trained, stamp)
    return WordPieceTokenizer(trained, lower, config.max_input_chars_per_word)


@mega.hookimpl
def register_tokenizers(register):
    register("wordpiece", build, config=WordPieceConfig)
