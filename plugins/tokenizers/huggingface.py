"""The `huggingface` tokenizer: a Hugging Face tokenizer read from local files.

Either `model.tokenizer.tokenizer_file` (a `tokenizer.json`) or `vocab_file` +
`merges_file` (GPT-2's byte-level BPE: `vocab.json`, `merges.txt`), loaded with the
`tokenizers` library; nothing is ever downloaded. Ids, encoding and decoding are those of
transformers' `GPT2TokenizerFast` on the same files: the end-of-text token (and the
padding token, when named) is a special token, matched whole in text and kept by decode.

Special ids, in this order:

* `eos_id`: the token `model.tokenizer.eos_token` names; unset, the first of
  `<|endoftext|>`, `</s>`, `<eos>`, `<|eos|>` the vocabulary holds; failing that, the
  file's only special token. Otherwise it is a config error asking for `eos_token`.
* `pad_id`: the token `model.tokenizer.pad_token` names; unset, `eos_id` (GPT-2 has no
  padding token; mega masks padding out of the loss, so any id will do).
* `bos_id`: the token `model.tokenizer.bos_token` names, else none; with `add_bos` it
  starts every encoded text (Llama 3's `<|begin_of_text|>`, which its tokenizer.json's
  post-processor adds: mega encodes without the file's special tokens and adds it itself,
  one rule for every file).
* `vocab_size`: the largest id (added tokens included) plus one.

The files travel with every checkpoint (`artifacts()`), so a checkpoint or an imported
run stands on its own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from attrs import define

import mega
from mega.config import key, TokenizerConfig
from mega.errors import ConfigError
from mega.plugins.tokenizers.huggingface_interop import register_tokenizer_converters  # noqa: F401 (its converters)

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")


@define(kw_only=True)
class HuggingFaceConfig(TokenizerConfig):
    """`model.tokenizer.*` of the huggingface library: a tokenizer.json, or GPT-2's
    vocab.json + merges.txt (local files; nothing is downloaded)."""

    library: str = "huggingface"
    tokenizer_file: Optional[str] = key(None, help="a tokenizer.json (takes precedence over vocab_file/merges_file)")
    vocab_file: Optional[str] = key(None, help="GPT-2 BPE vocab.json (with merges_file)")
    merges_file: Optional[str] = key(None, help="GPT-2 BPE merges.txt (with vocab_file)")
    eos_token: Optional[str] = key(None,
            help="end-of-text token; unset: GPT-2's, </s> or <eos>, whichever the vocabulary holds")
    pad_token: Optional[str] = key(None, help="padding token; unset: the eos token")
    bos_token: Optional[str] = key(None, help="beginning-of-text token (Llama 3: <|begin_of_text|>); unset: none")
    add_bos: bool = key(False, help="put bos_token before every encoded text (Llama 3: true; Qwen2: false)")


def _file(key: str, value: Optional[str]) -> Optional[Path]:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.tokenizer.{key}: no such file {path}")
    return path


class HuggingFaceTokenizer:
    def __init__(self, config: HuggingFaceConfig):
        from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
        from tokenizers.models import BPE

        if config.model:
            raise ConfigError("model.tokenizer.model: not used by the huggingface tokenizer; set model.tokenizer.tokenizer_file"
                              " (a tokenizer.json) or vocab_file and merges_file")
        self.files: Dict[str, Path] = {}
        tokenizer_file = _file("tokenizer_file", config.tokenizer_file)
        if tokenizer_file is not None:
            try:
                tok = Tokenizer.from_file(str(tokenizer_file))
            except Exception as exc:  # the library raises a bare Exception on malformed files
                raise ConfigError(f"model.tokenizer.tokenizer_file: cannot load {tokenizer_file}: {exc}") from None
            self.files["tokenizer_file"] = tokenizer_file
        elif config.vocab_file is not None and config.merges_file is not None:
            vocab, merges = _file("vocab_file", config.vocab_file), _file("merges_file", config.merges_file)
            try:
                # GPT-2's byte-level BPE, as transformers builds GPT2TokenizerFast from these files
                tok = Tokenizer(BPE.from_file(str(vocab), str(merges), continuing_subword_prefix="",
                                              end_of_word_suffix="", fuse_unk=False))
            except Exception as exc:
                raise ConfigError(f"model.tokenizer.vocab_file/merges_file: cannot load {vocab}, {merges}: {exc}") from None
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
            self.files.update(vocab_file=vocab, merges_file=merges)
        else:
            raise ConfigError("model.tokenizer: the huggingface tokenizer needs tokenizer_file (a tokenizer.json),"
                              " or vocab_file and merges_file (GPT-2's vocab.json and merges.txt)")
        vocab_ids = tok.get_vocab(with_added_tokens=True)
        if not vocab_ids:
            raise ConfigError(f"model.tokenizer: {', '.join(map(str, self.files.values()))} hold an empty vocabulary")
        self.vocab_size = max(vocab_ids.values()) + 1
        self.eos_id = self._special(tok, vocab_ids, "eos_token", config.eos_token)
        self.pad_id = self.eos_id if config.pad_token is None else self._special(tok, vocab_ids, "pad_token", config.pad_token)
        self.bos_id: Optional[int] = None
        if config.bos_token is not None:
            self.bos_id = self._special(tok, vocab_ids, "bos_token", config.bos_token)
        elif config.add_bos:
            raise ConfigError("model.tokenizer.add_bos = true needs model.tokenizer.bos_token (the token to put first)")
        self.add_bos = config.add_bos
        # transformers' GPT-2 tokenizers treat their special tokens as added tokens: never
        # split, matched whole in the text.
        names = {tok.id_to_token(i) for i in (self.eos_id, self.pad_id, self.bos_id) if i is not None}
        tok.add_special_tokens([AddedToken(n, special=True) for n in sorted(names)])
        self.tokenizer = tok

    @staticmethod
    def _special(tok, vocab_ids: Dict[str, int], key: str, name: Optional[str]) -> int:
        if name is not None:
            if name not in vocab_ids:
                raise ConfigError(f"model.tokenizer.{key}={name!r}: not in the tokenizer's vocabulary")
            return vocab_ids[name]
        for candidate in EOS_CANDIDATES:
            if candidate in vocab_ids:
                return vocab_ids[candidate]
        specials = [t for t in tok.get_added_tokens_decoder().values() if t.special]
        if len(specials) == 1:
            return vocab_ids[specials[0].content]
        raise ConfigError(f"model.tokenizer.eos_token: the vocabulary holds none of {', '.join(EOS_CANDIDATES)};"
                          " name its end-of-text token")

    def encode(self, text: str) -> List[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if self.add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=False)

    def artifacts(self) -> Dict[str, Path]:
        return dict(self.files)


def build(config: HuggingFaceConfig, corpus_files, run_dir) -> HuggingFaceTokenizer:
    return HuggingFaceTokenizer(config)


@mega.hookimpl
def register_tokenizers(register):
    register("huggingface", build, config=HuggingFaceConfig)
