"""The `sentencepiece` tokenizer in other tools' files: its `.model` file.

* Hugging Face model directories: `tokenizer.model` (or `--option tokenizer_model=PATH`)
  on import, with `add_bos` from `--option add_bos` or tokenizer_config.json's
  `add_bos_token` (Llama 2's tokenizer puts `<s>` first). On export, the same file plus a `tokenizer.json` that gives the
  sentencepiece model's ids, so `AutoTokenizer.from_pretrained(DIR)` works without
  sentencepiece installed, and a `tokenizer_config.json` naming `PreTrainedTokenizerFast`
  and the control pieces (`<s>`, `</s>`, `<unk>`, `<pad>`) as its special tokens.
  `mega import` of that directory reads `tokenizer.model` back: the very same tokenizer.
* Megatron-LM: `tokenizer_type = "GPTSentencePieceTokenizer"` (`SentencePieceTokenizer`
  read too) with `tokenizer_model`; `Llama2Tokenizer` (the same file, `<s>` first) when
  `add_bos`.
* NeMo: `tokenizer.library: sentencepiece` with its `model` member.

The `tokenizer.json` is built from the model's own proto, step for step as sentencepiece
encodes: its precompiled normalization table (`nmt_nfkc` by default), the removal of
leading, trailing and repeated spaces, the dummy prefix `▁`, whitespace as `▁`, words cut
before each `▁` (before each run of them with `allow_whitespace_only_pieces`, as Llama 2's
model has, so `▁▁` pieces still form), then the BPE merges in score order (or the unigram pieces and scores), unknown characters fused
into one `<unk>`, byte fallback where the model has it. Two differences are
transformers' way, not ours to change: the control pieces are special tokens there, so
a literal `</s>` in the text is the end-of-text id for `AutoTokenizer` and three ordinary
pieces for sentencepiece; and for a unigram model, a text with two equally scored
segmentations may be cut the other way (BPE models, mega's default, are exact).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Mapping, Optional

import mega
from mega.errors import ConfigError
from mega.plugins.tokenizers.interop import option_file, parse_bool

LIBRARY = "sentencepiece"
MEGATRON_TYPES = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer")
WITH_BOS = "Llama2Tokenizer"  # Megatron-LM's sentencepiece tokenizer that puts <s> first
FILE_NAMES = {"model": "tokenizer.model"}
# sentencepiece's ModelProto enums
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
NEVER = -1e10  # the score of a piece sentencepiece never cuts text into


def _model_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:  # protobuf missing (tensorboard, a dependency, brings it)
        raise ConfigError(f"model.tokenizer.model: reading {path} for transformers needs the protobuf package"
                          f" ({exc})") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def fast_tokenizer(path: Path):
    """A `tokenizers.Tokenizer` giving the ids of the sentencepiece model at `path` (see
    the module's docstring for what it does and the two differences)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE as BPEModel
    from tokenizers.models import Unigram

    proto = _model_proto(path)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if trainer.model_type not in (UNIGRAM, BPE):
        raise ConfigError(f"model.tokenizer.model: {path} is a sentencepiece {'word' if trainer.model_type == 3 else 'char'}"
                          " model; only BPE and unigram models are written for transformers")
    if trainer.treat_whitespace_as_suffix or not norm.escape_whitespaces:
        raise ConfigError(f"model.tokenizer.model: {path} treats whitespace its own way (treat_whitespace_as_suffix or"
                          " no escape_whitespaces), which transformers' Metaspace cannot follow")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    unk = next(i for i, (_, _, kind) in enumerate(pieces) if kind == UNKNOWN)
    if trainer.model_type == UNIGRAM:
        scored = [(piece, score if kind in (NORMAL, USER_DEFINED, UNKNOWN, BYTE) else NEVER) for piece, score, kind in pieces]
        model = Unigram(scored, unk, trainer.byte_fallback)
    else:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        mergeable = {piece for piece, _, kind in pieces if kind in (NORMAL, USER_DEFINED)}
        merges = []
        # sentencepiece merges the pair whose joined piece scores highest: the merges of
        # each piece in score order, its splits in the order of their ids
        for piece, _, _ in sorted((p for p in pieces if p[0] in mergeable), key=lambda p: -p[1]):
            splits = [(vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:]) for k in range(1, len(piece))
                      if piece[:k] in vocab and piece[k:] in vocab]
            merges += [(left, right) for _, _, left, right in sorted(splits)]
        model = BPEModel(vocab, merges, unk_token=pieces[unk][0], fuse_unk=True, byte_fallback=trainer.byte_fallback)
    tok = Tokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip(left=True, right=True)]
    if norm.add_dummy_prefix:  # always, as sentencepiece does: Metaspace's own prefix skips a text that starts with a space
        steps.append(normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    whitespace_runs = trainer.split_by_whitespace and trainer.allow_whitespace_only_pieces
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never",
                                                 split=trainer.split_by_whitespace and not whitespace_runs)
    if whitespace_runs:  # Llama 2's: a run of spaces starts one word ("▁▁▁the"), its pieces "▁▁" and "▁the"
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            tok.pre_tokenizer, pre_tokenizers.Split(Regex("\u2581*[^\u2581]+|\u2581+"), behavior="isolated")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))
    tok.add_special_tokens([AddedToken(piece, special=True, normalized=False)
                            for piece, _, kind in pieces if kind in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(piece, special=False, normalized=False) for piece, _, kind in pieces if kind == USER_DEFINED])
    return tok


def _says_add_bos(source: Path) -> bool:
    """tokenizer_config.json's `add_bos_token` (Llama's tokenizers: true), false when absent."""
    try:
        return json.loads((source / "tokenizer_config.json").read_text()).get("add_bos_token") is True
    except (OSError, ValueError, AttributeError):
        return False


class SentencePieceInterop:
    file_names = FILE_NAMES
    hf_options = ("tokenizer_model", "add_bos")
    hf_hint = "--option tokenizer_model=PATH (a sentencepiece .model file)"
    megatron_options = ("tokenizer_model",)
    megatron_hint = hf_hint
    nemo_hint = "sentencepiece"

    # --- Hugging Face ------------------------------------------------------------------------
    def from_hf(self, source: Path, options: Mapping[str, str], hf_config: dict, only_options: bool):
        if options.get("tokenizer_model"):
            files = {"model": option_file(options, "tokenizer_model")}
        elif not only_options and (source / FILE_NAMES["model"]).is_file():
            files = {"model": source / FILE_NAMES["model"]}
        else:
            return None
        table = {"library": LIBRARY}
        if parse_bool(options["add_bos"], "add_bos") if "add_bos" in options else _says_add_bos(source):
            table["add_bos"] = True
        return table, files

    def to_hf(self, tokenizer, tokenizer_config, destination: Path, model_max_length: int) -> None:
        model = Path(tokenizer.artifacts()["model"])
        fast_tokenizer(model).save(str(destination / "tokenizer.json"))
        shutil.copyfile(model, destination / FILE_NAMES["model"])
        sp = tokenizer.sp
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                  "clean_up_tokenization_spaces": False}
        if getattr(tokenizer, "add_bos", False):  # the tokenizer.json puts <s> first, as mega's encode does
            from tokenizers import processors

            fast = fast_tokenizer(model)
            bos = sp.id_to_piece(sp.bos_id())
            fast.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                                special_tokens=[(bos, sp.bos_id())])
            fast.save(str(destination / "tokenizer.json"))
            config["add_bos_token"] = True
        for key, index in (("bos_token", sp.bos_id()), ("eos_token", tokenizer.eos_id), ("unk_token", sp.unk_id()),
                           ("pad_token", tokenizer.pad_id)):
            if index >= 0:
                config[key] = sp.id_to_piece(index)
        (destination / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # --- Megatron-LM -------------------------------------------------------------------------
    def megatron_files(self, table: dict) -> Dict[str, str]:
        # a model trained into the run directory is its `tokenizer.model`
        return {"model": table.get("model") or FILE_NAMES["model"]}

    def megatron_fields(self, table: dict, vocab_size: Optional[int], files: Mapping[str, str]) -> dict:
        return {"tokenizer_type": WITH_BOS if table.get("add_bos") else MEGATRON_TYPES[0],
                "tokenizer_model": files.get("model")}

    def from_megatron(self, args, options: Mapping[str, str], locate, only_options: bool):
        kind = getattr(args, "tokenizer_type", None)
        table = {"library": LIBRARY, **({"add_bos": True} if kind == WITH_BOS else {})}
        if options.get("tokenizer_model"):
            return table, {"model": option_file(options, "tokenizer_model")}
        if only_options or kind not in MEGATRON_TYPES:
            return None
        model = locate(getattr(args, "tokenizer_model", None))
        return (table, {"model": model}) if model is not None else None

    # --- NeMo --------------------------------------------------------------------------------
    def from_nemo(self, tokenizer_config: dict) -> Optional[Dict[str, str]]:
        cfg = tokenizer_config
        if cfg.get("library") == LIBRARY:  # NeMo's Megatron models
            return {"model": "model"}
        if cfg.get("tokenizer_name") == LIBRARY and cfg.get("tokenizer_model"):  # NeMo's NLP models
            return {"model": "tokenizer_model"}
        return None

    def to_nemo(self, tokenizer_table: dict, style: str):
        """NeMo's `library: sentencepiece` with the `.model` (Megatron models), or the NLP
        models' `tokenizer_name: sentencepiece` with `tokenizer_model`."""
        if style == "nlp":
            return {"tokenizer_name": LIBRARY, "vocab_file": None, "special_tokens": None}, {"tokenizer_model": "model"}
        return ({"library": LIBRARY, "type": None, "vocab_file": None, "merge_file": None, "delimiter": None,
                 "sentencepiece_legacy": False}, {"model": "model"})


@mega.hookimpl
def register_tokenizer_converters(register):
    """Its .model file in Hugging Face directories, Megatron-LM's args and NeMo archives.
    Registered through `mega.plugins.tokenizers.sentencepiece`, which imports this hook."""
    register("sentencepiece", SentencePieceInterop)
