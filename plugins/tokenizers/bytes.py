"""The `bytes` tokenizer: UTF-8 bytes 0-255 plus padding (256) and end-of-document (257).

Needs no training and no files; useful for tests and for corpora in any script.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from attrs import define

import mega
from mega.config import TokenizerConfig
from mega.plugins.tokenizers.bytes_interop import register_tokenizer_converters  # noqa: F401 (its converters)


@define(kw_only=True)
class BytesConfig(TokenizerConfig):
    library: str = "bytes"


class ByteTokenizer:
    vocab_size = 258
    pad_id = 256
    eos_id = 257

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: List[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def word_starts(self, ids: List[int]) -> List[bool]:
        """A word starts at a non-space byte after a space (or at the start)."""
        return [i == 0 or (ids[i - 1] == 32 and ids[i] != 32) for i in range(len(ids))]

    def artifacts(self) -> Dict[str, Path]:
        return {}


@mega.hookimpl
def register_tokenizers(register):
    register("bytes", lambda config, corpus_files, run_dir: ByteTokenizer(), config=BytesConfig)
