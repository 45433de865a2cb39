"""The `wordpiece` tokenizer in other tools' files: BERT's `vocab.txt`.

* Hugging Face model directories: `vocab.txt` (or `--option vocab_file=PATH`), lower-cased
  as the directory's tokenizer_config.json says (`do_lower_case`, true when unsaid, as
  BertTokenizer defaults; `--option do_lower_case=` overrides). Written as `vocab.txt` and
  a `tokenizer_config.json` naming `BertTokenizer` with the five special tokens.
* Megatron-LM: `tokenizer_type = "BertWordPieceLowerCase"` or `"BertWordPieceCase"` with
  `vocab_file` (NGC's BERT releases: `--option vocab_file=` and, cased,
  `--option do_lower_case=false`).
* NeMo: the NLP task models' `tokenizer_name` (`megatron-bert-uncased`, `bert-large-cased`,
  ...) or the Megatron models' `type` (`BertWordPieceLowerCase`), with the `vocab_file`
  member; the name says the lower-casing, both ways.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Optional

import mega
from mega.plugins.tokenizers.interop import option_file, parse_bool

LIBRARY = "wordpiece"
FILE_NAMES = {"vocab_file": "vocab.txt"}
# model.tokenizer.tokenizer_name -> lower-case (and strip accents). Megatron-LM's --tokenizer-type names and
# the Hugging Face model names of the public BERT vocabularies are accepted as well.
TOKENIZER_NAMES = {
    "megatron-bert-uncased": True,
    "megatron-bert-cased": False,
    "BertWordPieceLowerCase": True,
    "BertWordPieceCase": False,
    "bert-base-uncased": True,
    "bert-large-uncased": True,
    "bert-base-cased": False,
    "bert-large-cased": False,
    "bert-base-multilingual-cased": False,
}
# Megatron-LM's tokenizer_type -> lower-cases
MEGATRON_TYPES = {kind: TOKENIZER_NAMES[kind] for kind in ("BertWordPieceLowerCase", "BertWordPieceCase")}


def lower_case_of(tokenizer_config) -> bool:
    """Whether a wordpiece tokenizer config (an attrs object or a dict) lower-cases:
    `do_lower_case`, else as its `tokenizer_name` says."""
    get = tokenizer_config.get if isinstance(tokenizer_config, dict) else lambda k: getattr(tokenizer_config, k, None)
    lower = get("do_lower_case")
    if lower is not None:
        return bool(lower)
    return TOKENIZER_NAMES.get(get("tokenizer_name"), True)


def _table(lower: bool, vocab: Path):
    return {"library": LIBRARY, "do_lower_case": lower}, {"vocab_file": vocab}


class WordPieceInterop:
    file_names = FILE_NAMES
    hf_options = ("vocab_file", "do_lower_case")
    hf_hint = "--option vocab_file=PATH (BERT's vocab.txt)"
    megatron_options = ("vocab_file", "do_lower_case")
    megatron_hint = ("--option vocab_file=PATH (BERT's vocab.txt, e.g. bert-large-uncased-vocab.txt for the uncased NGC"
                     " release) and, for a cased model, --option do_lower_case=false")

    # --- Hugging Face ------------------------------------------------------------------------
    def from_hf(self, source: Path, options: Mapping[str, str], hf_config: dict, only_options: bool):
        if options.get("vocab_file"):
            vocab = option_file(options, "vocab_file")
        elif not only_options and (source / FILE_NAMES["vocab_file"]).is_file():
            vocab = source / FILE_NAMES["vocab_file"]
        else:
            return None
        lower = True
        try:
            lower = bool(json.loads((source / "tokenizer_config.json").read_text()).get("do_lower_case", True))
        except (OSError, ValueError, AttributeError):
            pass
        if options.get("do_lower_case") is not None:
            lower = parse_bool(options["do_lower_case"], "do_lower_case")
        return _table(lower, vocab)

    def to_hf(self, tokenizer, tokenizer_config, destination: Path, model_max_length: int) -> None:
        """vocab.txt and tokenizer_config.json, what BertTokenizer(Fast).from_pretrained reads."""
        files = tokenizer.artifacts()
        (destination / FILE_NAMES["vocab_file"]).write_bytes(Path(files["vocab_file"]).read_bytes())
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": lower_case_of(tokenizer_config),
                  "strip_accents": None, "tokenize_chinese_chars": True, "unk_token": "[UNK]", "sep_token": "[SEP]",
                  "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]", "model_max_length": model_max_length}
        (destination / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # --- Megatron-LM -------------------------------------------------------------------------
    def megatron_files(self, table: dict) -> Dict[str, str]:
        return {"vocab_file": table["vocab_file"]} if table.get("vocab_file") else {}

    def megatron_fields(self, table: dict, vocab_size: Optional[int], files: Mapping[str, str]) -> dict:
        kind = "BertWordPieceLowerCase" if lower_case_of(table) else "BertWordPieceCase"
        return {"tokenizer_type": kind, "vocab_file": files.get("vocab_file")}

    def from_megatron(self, args, options: Mapping[str, str], locate, only_options: bool):
        kind = getattr(args, "tokenizer_type", None)
        lower = MEGATRON_TYPES.get(kind, True)
        if options.get("do_lower_case") is not None:
            lower = parse_bool(options["do_lower_case"], "do_lower_case")
        if options.get("vocab_file"):
            return _table(lower, option_file(options, "vocab_file"))
        if only_options or kind not in (None, *MEGATRON_TYPES):
            return None
        vocab = locate(getattr(args, "vocab_file", None))
        return _table(lower, vocab) if vocab is not None else None

    # --- NeMo --------------------------------------------------------------------------------
    nemo_hint = "BERT WordPiece (tokenizer_name megatron-bert-uncased, ... or type BertWordPieceLowerCase; vocab_file)"

    def from_nemo(self, tokenizer_config: dict) -> Optional[Dict[str, str]]:
        """NeMo's NLP models (`tokenizer_name` a BERT name, `vocab_file`) and its Megatron
        BERT (`library: megatron`, `type: BertWordPieceLowerCase` / `BertWordPieceCase`)."""
        cfg = tokenizer_config
        if not cfg.get("vocab_file"):
            return None
        if cfg.get("tokenizer_name") in TOKENIZER_NAMES or cfg.get("type") in MEGATRON_TYPES:
            return {"vocab_file": "vocab_file"}
        return None

    def nemo_table(self, tokenizer_config: dict) -> dict:
        """The lower-casing the section's name says (NeMo takes it from the name: NeMo 1.x
        maps `megatron-bert-uncased` to bert-large-uncased's tokenizer)."""
        name = tokenizer_config.get("tokenizer_name") or tokenizer_config.get("type")
        return {"do_lower_case": TOKENIZER_NAMES.get(name, True)}

    def to_nemo(self, tokenizer_table: dict, style: str):
        """`tokenizer_name: megatron-bert-uncased|cased` + `vocab_file` (NLP task models),
        or `library: megatron`, `type: BertWordPieceLowerCase|Case` + `vocab_file`."""
        lower = lower_case_of(tokenizer_table)
        if style == "nlp":
            return ({"tokenizer_name": "megatron-bert-uncased" if lower else "megatron-bert-cased",
                     "tokenizer_model": None, "special_tokens": None}, {"vocab_file": "vocab_file"})
        return ({"library": "megatron", "type": "BertWordPieceLowerCase" if lower else "BertWordPieceCase",
                 "model": None, "merge_file": None, "delimiter": None, "sentencepiece_legacy": False},
                {"vocab_file": "vocab_file"})


def tokenizer_table(source: Path, options: Mapping[str, str]):
    """(tokenizer table, files) of the WordPiece vocabulary of a Hugging Face BERT
    directory (or the one `options` name); a CheckpointError when there is none."""
    from mega.errors import CheckpointError

    found = WordPieceInterop().from_hf(Path(source), options, {}, only_options=False)
    if found is None:
        raise CheckpointError(f"{source}: no vocab.txt; name BERT's WordPiece vocabulary with --option vocab_file=PATH")
    return found


@mega.hookimpl
def register_tokenizer_converters(register):
    """Its vocab.txt in Hugging Face directories and Megatron-LM's args.
    Registered through `mega.plugins.tokenizers.wordpiece`, which imports this hook."""
    register("wordpiece", WordPieceInterop)
