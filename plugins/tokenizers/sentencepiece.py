"""The `sentencepiece` tokenizer: load `model.tokenizer.model`, or train one.

With no `model` given, a tokenizer is trained on the training corpus into the run
directory (`tokenizer.model`) once; a resumed run reuses it, so token ids never change
under a checkpoint. One trained from other files or options is trained again unless
checkpoints depend on it (`mega.checkpoint.trained_files`).

`add_bos` puts the model's `<s>` (its `bos_id`, whatever the model numbers it: Llama's is
1, mega's trained models' 2) before every text it encodes, as Llama 2's tokenizer does
(`LlamaTokenizer.add_bos_token`, Megatron-LM's `Llama2Tokenizer`); documents of a corpus
then each start with it.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional

from attrs import define

import mega
from mega.checkpoint import trained_files
from mega.checkpoint.atomic import atomic_write_bytes, atomic_write_text
from mega.config import key, TokenizerConfig
from mega.config.schema import at_least_one, non_negative, positive
from mega.errors import ConfigError, DataError
from mega.plugins.tokenizers.sentencepiece_interop import register_tokenizer_converters  # noqa: F401 (its converters)

log = logging.getLogger("mega.tokenizer")


@define(kw_only=True)
class SentencePieceConfig(TokenizerConfig):
    """`model.tokenizer.*` of the sentencepiece library. The training keys apply only when
    `model` is not given."""

    library: str = "sentencepiece"
    vocab_size: int = key(default=4000, validator=at_least_one, help="pieces of the tokenizer trained when `model` is unset")
    model_type: str = key("bpe", help='"bpe" or "unigram"')
    character_coverage: float = key(default=1.0, validator=positive,
            help="share of the corpus's characters the trained pieces cover; rarer ones become unknown (sentencepiece's)")
    input_sentence_size: int = key(default=1_000_000, validator=non_negative,
            help="lines sampled for training; 0 uses all")
    seed: int = key(1234, help="seeds sentencepiece's trainer: the same corpus gives the same tokenizer")
    add_bos: bool = key(False, help="put the model's <s> before every encoded text (Llama 2: true)")


class SentencePieceTokenizer:
    def __init__(self, model_file: Path, add_bos: bool = False):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"model.tokenizer.model: cannot load sentencepiece model {model_file}: {exc}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else self.sp.unk_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.bos_id: Optional[int] = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        if add_bos and self.bos_id is None:
            raise ConfigError(f"model.tokenizer.add_bos: the sentencepiece model {model_file} has no <s> piece (bos_id -1)")
        self.add_bos = add_bos

    def encode(self, text: str) -> List[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] + ids if self.add_bos else ids

    def decode(self, ids: List[int]) -> str:
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])

    def word_starts(self, ids: List[int]) -> List[bool]:
        """A word starts at a piece that begins with sentencepiece's space mark."""
        return [i == 0 or self.sp.id_to_piece(t).startswith("\u2581") for i, t in enumerate(ids)]

    def artifacts(self) -> Dict[str, Path]:
        return {"model": self.model_file}


# sentencepiece skips longer lines when training (a line is one document here); a corpus
# whose every line is longer fails inside sentencepiece with no word of which file or why.
MAX_LINE_BYTES = 1 << 16


def check_line_lengths(files: List[Path], limit: int = MAX_LINE_BYTES) -> None:
    """Raise a DataError naming the files when no line of the corpus is short enough to
    train on; warn, naming the file, about lines that will be skipped."""
    from mega.plugins.data.text_index import TextMemMapIndex

    usable, report = 0, []
    for f in files:
        if os.path.getsize(f) == 0:
            continue
        index = TextMemMapIndex(f)
        too_long, longest = index.lines_longer_than(limit)
        usable += len(index) - too_long
        if too_long:
            report.append(f"{f}: {too_long} of {len(index)} lines longer than {limit} bytes (longest {longest:,} bytes)")
    if usable == 0:
        raise DataError(
            "cannot train a sentencepiece tokenizer: every line (document) of the corpus is longer than its limit of"
            f" {limit} bytes, and longer lines are skipped: {'; '.join(report)}. Split the text into lines (one document"
            " per line), or set model.tokenizer.model to a trained tokenizer")
    for line in report:
        log.warning("tokenizer training skips too-long lines: %s", line)


# Sentencepiece's unigram trainer splits its work by thread, and the split is part of the
# result: a fixed count gives the same tokenizer on every machine, whatever its cores.
TRAINER_THREADS = 4


def train_sentencepiece(files: List[Path], prefix: Path, cfg: SentencePieceConfig) -> Path:
    """Train a model on `files` to `prefix`.model (and its pieces and scores to
    `prefix`.vocab), atomically (temp name, then rename). The same files and options give
    the same bytes in every process: the model comes back in memory, so no temporary path
    is recorded in it, and the thread count is fixed (TRAINER_THREADS)."""
    import sentencepiece as spm

    total = sum(os.path.getsize(f) for f in files)
    if total == 0:
        raise DataError(f"cannot train a tokenizer: the corpus files are empty ({', '.join(map(str, files))})")
    check_line_lengths([Path(f) for f in files])
    log.info("training a sentencepiece %s tokenizer (vocab %d) on %.1f MB of text", cfg.model_type, cfg.vocab_size, total / 1e6)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(cfg.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(str(f) for f in files),
            model_writer=model,
            vocab_size=cfg.vocab_size,
            model_type=cfg.model_type,
            character_coverage=cfg.character_coverage,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=MAX_LINE_BYTES,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            num_threads=TRAINER_THREADS,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise ConfigError(f"model.tokenizer: sentencepiece training failed: {exc}") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    atomic_write_text(prefix.with_suffix(".vocab"), pieces)
    return atomic_write_bytes(prefix.with_suffix(".model"), model.getvalue())


def build(config: SentencePieceConfig, corpus_files: List[Path], run_dir: Optional[Path]) -> SentencePieceTokenizer:
    if config.model:
        path = Path(config.model).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.tokenizer.model: no such file {path}")
        return SentencePieceTokenizer(path, config.add_bos)
    if run_dir is None:
        raise ConfigError("model.tokenizer.model: not set, and there is no run directory to train a tokenizer into")
    trained = Path(run_dir) / "tokenizer.model"
    files = [Path(f) for f in corpus_files]
    options = {k: getattr(config, k) for k in ("vocab_size", "model_type", "character_coverage", "input_sentence_size", "seed")}
    stamp = trained_files.stamp(files, options)
    if not trained_files.reusable(trained, stamp, "the sentencepiece tokenizer"):
        train_sentencepiece(files, trained.with_suffix(""), config)
        trained_files.write_stamp(trained, stamp)
    return SentencePieceTokenizer(trained, config.add_bos)


@mega.hookimpl
def register_tokenizers(register):
    register("sentencepiece", build, config=SentencePieceConfig)
