"""The `huggingface` tokenizer in other tools' files: a `tokenizer.json`, or GPT-2's
`vocab.json` + `merges.txt`.

* Hugging Face model directories: read from the directory or `--option tokenizer_file=` /
  `vocab_file=` + `merges_file=`; the end-of-text token from `--option eos_token`, the
  directory's tokenizer_config.json / special_tokens_map.json, or config.json's
  `eos_token_id`; the beginning-of-text token likewise (`bos_token`, `bos_token_id`), put
  first (`add_bos`) when `--option add_bos`, tokenizer_config.json's `add_bos_token` or
  the tokenizer.json's post-processor (Llama 3's `<|begin_of_text|> $A`) says so. Written
  as the same files plus a `tokenizer_config.json` naming `GPT2Tokenizer` (byte-level BPE;
  `AutoTokenizer` loads the fast one); with `add_bos`, a tokenizer.json whose
  post-processor puts the token first and a `PreTrainedTokenizerFast` config.
* Megatron-LM: `tokenizer_type = "HuggingFaceTokenizer"` with `tokenizer_model` naming the
  tokenizer.json, or `GPT2BPETokenizer` with `vocab_file` and `merge_file` (Megatron's
  own name, singular); mega's special-token names travel as `args.mega_tokenizer`.
* NeMo: `GPT2BPETokenizer` (library `megatron` or `huggingface`) with `vocab_file` and
  `merge_file` members.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Mapping, Optional

import mega
from mega.errors import ConfigError
from mega.plugins.tokenizers.interop import option_file, parse_bool

LIBRARY = "huggingface"
GPT2_BPE = "GPT2BPETokenizer"
HF_TOKENIZER = "HuggingFaceTokenizer"
# a tokenizer config key -> the file name transformers looks for
FILE_NAMES = {"tokenizer_file": "tokenizer.json", "vocab_file": "vocab.json", "merges_file": "merges.txt"}


def _named(options: Mapping[str, str]) -> Optional[Dict[str, Path]]:
    """The files the options name: a tokenizer.json, or vocab.json and merges.txt together."""
    if options.get("tokenizer_file"):
        return {"tokenizer_file": option_file(options, "tokenizer_file")}
    if options.get("vocab_file") or options.get("merges_file"):
        if not (options.get("vocab_file") and options.get("merges_file")):
            raise ConfigError("--option vocab_file=PATH and --option merges_file=PATH go together (GPT-2's vocab.json"
                              " and merges.txt)")
        return {"vocab_file": option_file(options, "vocab_file"), "merges_file": option_file(options, "merges_file")}
    return None


def special_tokens(path: Path) -> Dict[str, object]:
    """`eos_token` / `pad_token` / `bos_token` named in a Hugging Face model directory's
    special_tokens_map.json or tokenizer_config.json (absent ones left out), and
    tokenizer_config.json's `add_bos_token` when it says."""
    found: Dict[str, object] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = Path(path) / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        for key in ("eos_token", "pad_token", "bos_token"):
            value = data.get(key)
            if isinstance(value, dict):  # an AddedToken written out
                value = value.get("content")
            if isinstance(value, str) and key not in found:
                found[key] = value
        if isinstance(data.get("add_bos_token"), bool) and "add_bos_token" not in found:
            found["add_bos_token"] = data["add_bos_token"]
    return found


def post_processor_bos(tokenizer_file: Path) -> Optional[str]:
    """The special token a tokenizer.json's post-processor puts before a single text
    (`TemplateProcessing` "X $A", alone or in a `Sequence`), else None."""
    try:
        processor = json.loads(Path(tokenizer_file).read_text(encoding="utf-8")).get("post_processor") or {}
    except (OSError, ValueError, AttributeError):
        return None
    steps = processor.get("processors", []) if processor.get("type") == "Sequence" else [processor]
    for step in steps:
        single = step.get("single") if step.get("type") == "TemplateProcessing" else None
        if single and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"]["id"]
    return None


def _token_of_id(vocab_ids: Mapping[str, int], value) -> Optional[str]:
    return next((t for t, i in vocab_ids.items() if i == value), None) if isinstance(value, int) else None


def _vocabulary(files: Mapping[str, Path]) -> Dict[str, int]:
    """token -> id of the tokenizer files (added tokens included), as the tokenizer reads them."""
    try:
        if "tokenizer_file" in files:
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(files["tokenizer_file"])).get_vocab(with_added_tokens=True)
        vocab = json.loads(Path(files["vocab_file"]).read_text(encoding="utf-8"))
    except Exception as exc:  # the library raises a bare Exception on malformed files
        raise ConfigError(f"{', '.join(map(str, files.values()))}: not a Hugging Face tokenizer"
                          f" ({type(exc).__name__}: {exc})") from None
    if not isinstance(vocab, dict):
        raise ConfigError(f"{files['vocab_file']}: not GPT-2's vocab.json (a token -> id object)")
    return vocab


class HuggingFaceTokenizerInterop:
    file_names = FILE_NAMES
    hf_options = ("tokenizer_file", "vocab_file", "merges_file", "eos_token", "bos_token", "add_bos")
    hf_hint = ("--option tokenizer_file=PATH (a tokenizer.json), or --option vocab_file=PATH --option merges_file=PATH"
               " (GPT-2 BPE)")
    megatron_options = ("tokenizer_file", "vocab_file", "merges_file")
    megatron_hint = ("--option vocab_file=PATH with --option merges_file=PATH (GPT-2 BPE), --option tokenizer_file=PATH"
                     " (a tokenizer.json)")
    nemo_hint = "GPT-2 BPE (vocab_file + merge_file)"

    # --- Hugging Face ------------------------------------------------------------------------
    def from_hf(self, source: Path, options: Mapping[str, str], hf_config: dict, only_options: bool):
        files = _named(options)
        if files is None and not only_options:
            if (source / "tokenizer.json").is_file():
                files = {"tokenizer_file": source / "tokenizer.json"}
            elif (source / "vocab.json").is_file() and (source / "merges.txt").is_file():
                files = {"vocab_file": source / "vocab.json", "merges_file": source / "merges.txt"}
        if files is None:
            return None
        table = {"library": LIBRARY}
        said = special_tokens(source)
        vocab_ids = _vocabulary(files)
        from_file = post_processor_bos(files["tokenizer_file"]) if "tokenizer_file" in files else None
        found = {}
        for key in ("eos_token", "bos_token"):
            token = options.get(key) or said.get(key) or _token_of_id(vocab_ids, hf_config.get(f"{key}_id"))
            if key == "bos_token" and from_file is not None and not options.get(key):
                token = from_file
            if token is not None and token in vocab_ids:
                found[key] = token
            elif options.get(key):
                raise ConfigError(f"--option {key}={token}: not in the tokenizer's vocabulary")
        if "eos_token" in found:
            table["eos_token"] = found["eos_token"]
        if "add_bos" in options:
            add_bos = parse_bool(options["add_bos"], "add_bos")
        else:
            add_bos = bool(said.get("add_bos_token", from_file is not None))
        if add_bos:  # the token is recorded only where it is used
            if "bos_token" not in found:
                raise ConfigError(f"{source}: the tokenizer puts a beginning-of-text token first but none is named;"
                                  " give --option bos_token=TOKEN")
            table.update(bos_token=found["bos_token"], add_bos=True)
        return table, files

    def to_hf(self, tokenizer, tokenizer_config, destination: Path, model_max_length: int) -> None:
        for key, path in tokenizer.artifacts().items():
            shutil.copyfile(path, destination / FILE_NAMES[key])
        tok = tokenizer.tokenizer
        eos, pad = tok.id_to_token(tokenizer.eos_id), tok.id_to_token(tokenizer.pad_id)
        bos_id = getattr(tokenizer, "bos_id", None)
        bos = tok.id_to_token(bos_id) if bos_id is not None else eos
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": bos, "eos_token": eos, "unk_token": eos,
                  "add_prefix_space": False, "model_max_length": model_max_length}
        if getattr(tokenizer, "add_bos", False):  # the file's post-processor puts it first, as mega's encode does
            _write_with_bos(tok, bos, bos_id, destination / FILE_NAMES["tokenizer_file"])
            for key in ("vocab_file", "merges_file"):
                (destination / FILE_NAMES[key]).unlink(missing_ok=True)
            config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True)
            del config["add_prefix_space"]
        if tokenizer.pad_id != tokenizer.eos_id:
            config["pad_token"] = pad
        (destination / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # --- Megatron-LM -------------------------------------------------------------------------
    def megatron_files(self, table: dict) -> Dict[str, str]:
        if table.get("tokenizer_file"):
            return {"tokenizer_file": table["tokenizer_file"]}
        if table.get("vocab_file") and table.get("merges_file"):
            return {"vocab_file": table["vocab_file"], "merges_file": table["merges_file"]}
        return {}

    def megatron_fields(self, table: dict, vocab_size: Optional[int], files: Mapping[str, str]) -> dict:
        if files.get("tokenizer_file") or (not files.get("vocab_file") and table.get("tokenizer_file")):
            fields = {"tokenizer_type": HF_TOKENIZER, "tokenizer_model": files.get("tokenizer_file")}
        else:  # GPT-2's vocab.json + merges.txt: Megatron's GPT2BPETokenizer reads the same two files
            fields = {"tokenizer_type": GPT2_BPE, "vocab_file": files.get("vocab_file"),
                      "merge_file": files.get("merges_file")}
        special = {k: table[k] for k in ("eos_token", "pad_token", "bos_token", "add_bos") if table.get(k) is not None}
        if special:
            fields["mega_tokenizer"] = special
        return fields

    def from_megatron(self, args, options: Mapping[str, str], locate, only_options: bool):
        table = {"library": LIBRARY, **dict(getattr(args, "mega_tokenizer", None) or {})}
        files = _named(options)
        if files is not None:
            return table, files
        if only_options:
            return None
        kind = getattr(args, "tokenizer_type", None)
        if kind == GPT2_BPE:
            vocab, merges = locate(getattr(args, "vocab_file", None)), locate(getattr(args, "merge_file", None))
            if vocab and merges:
                return table, {"vocab_file": vocab, "merges_file": merges}
        if kind == HF_TOKENIZER:
            file = locate(getattr(args, "tokenizer_model", None))
            if file is not None and file.suffix == ".json":
                return table, {"tokenizer_file": file}
        return None

    # --- NeMo --------------------------------------------------------------------------------
    def from_nemo(self, tokenizer_config: dict) -> Optional[Dict[str, str]]:
        cfg = tokenizer_config
        if cfg.get("vocab_file") and cfg.get("merge_file") and (
                cfg.get("type") == GPT2_BPE or cfg.get("library") in ("megatron", LIBRARY)):
            return {"vocab_file": "vocab_file", "merges_file": "merge_file"}
        return None

    def to_nemo(self, tokenizer_table: dict, style: str):
        """GPT-2's vocab.json + merges.txt as NeMo's Megatron `GPT2BPETokenizer` (a
        tokenizer.json alone has no NeMo section that reads it: None)."""
        if style != "megatron" or not (tokenizer_table.get("vocab_file") and tokenizer_table.get("merges_file")):
            return None
        return ({"library": "megatron", "type": GPT2_BPE, "model": None, "delimiter": None, "sentencepiece_legacy": False},
                {"vocab_file": "vocab_file", "merge_file": "merges_file"})


def _write_with_bos(tok, bos: str, bos_id: int, path: Path) -> None:
    """`tok` (a tokenizers.Tokenizer) saved to `path` with a post-processor that puts `bos`
    before a text (and each of a pair), once: a template the file had is replaced, its
    other steps (byte-level offsets) kept. transformers' `encode` then gives mega's ids."""
    template = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    data = json.loads(tok.to_str())
    current = data.get("post_processor")
    steps = current.get("processors", []) if current and current.get("type") == "Sequence" else [current] if current else []
    steps = [step for step in steps if step.get("type") != "TemplateProcessing"] + [template]
    data["post_processor"] = steps[0] if len(steps) == 1 else {"type": "Sequence", "processors": steps}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


@mega.hookimpl
def register_tokenizer_converters(register):
    """Its files in Hugging Face directories, Megatron-LM's args and NeMo archives.
    Registered through `mega.plugins.tokenizers.huggingface`, which imports this hook."""
    register("huggingface", HuggingFaceTokenizerInterop)
