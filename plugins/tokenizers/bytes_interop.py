"""The `bytes` tokenizer in Megatron-LM's `args`: its `NullTokenizer` with `vocab_size =
257` has 257 + 1 ids and its end-of-document id is 257, the byte tokenizer's eos (its text
interface, space-separated ids, differs). There are no files; on import,
`--option tokenizer=bytes` names it, or `args` do (`mega_tokenizer_library`, or a
NullTokenizer of 257)."""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import mega
from mega.errors import ConfigError

LIBRARY = "bytes"
NULL_TOKENIZER = "NullTokenizer"


class BytesInterop:
    file_names: Dict[str, str] = {}
    megatron_options = ("tokenizer",)
    megatron_hint = "--option tokenizer=bytes"

    def megatron_files(self, table: dict) -> Dict[str, str]:
        return {}

    def megatron_fields(self, table: dict, vocab_size: Optional[int], files: Mapping[str, str]) -> dict:
        return {"tokenizer_type": NULL_TOKENIZER, "vocab_size": (vocab_size - 1) if vocab_size else None}

    def from_megatron(self, args, options: Mapping[str, str], locate, only_options: bool):
        if options.get("tokenizer"):
            if options["tokenizer"] != LIBRARY:
                raise ConfigError(f"--option tokenizer={options['tokenizer']}: only 'bytes' is known here (a tokenizer"
                                  " without files); name another tokenizer by its files")
            return {"library": LIBRARY}, {}
        if only_options:
            return None
        if getattr(args, "mega_tokenizer_library", None) == LIBRARY or (
                getattr(args, "tokenizer_type", None) == NULL_TOKENIZER and getattr(args, "vocab_size", None) == 257):
            return {"library": LIBRARY}, {}
        return None


@mega.hookimpl
def register_tokenizer_converters(register):
    """Megatron-LM's NullTokenizer in args.
    Registered through `mega.plugins.tokenizers.bytes`, which imports this hook."""
    register("bytes", BytesInterop)
