"""The `huggingface` tokenizer in other tools' files: a `tokenizer.json`, or GPT-2's
`vocab.json` + `merges.txt`.

* Hugging Face model directories: read from the directory or `--option tokenizer_file=` /
  `vocab_file=` + `merges_file=`; the end-of-text token from `--option eos_token`, the
  directory's tokenizer_config.json / special_tokens_map.json, or config.json's
  `eos_token_id`. Written as the same files plus a `tokenizer_config.json` naming
  `GPT2Tokenizer` (byte-level BPE; `AutoTokenizer` loads the fast one).
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
from mega.plugins.tokenizers.interop import option_file

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


def special_tokens(path: Path) -> Dict[str, str]:
    """`eos_token` / `pad_token` named in a Hugging Face model directory's
    special_tokens_map.json or tokenizer_config.json (absent ones left out)."""
    found: Dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = Path(path) / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        for key in ("eos_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):  # an AddedToken written out
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return found


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
    hf_options = ("tokenizer_file", "vocab_file", "merges_file", "eos_token")
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
        eos = options.get("eos_token") or special_tokens(source).get("eos_token")
        vocab_ids = _vocabulary(files)
        if eos is None and isinstance(hf_config.get("eos_token_id"), int):
            eos = next((t for t, i in vocab_ids.items() if i == hf_config["eos_token_id"]), None)
        if eos is not None and eos in vocab_ids:
            table["eos_token"] = eos
        elif options.get("eos_token"):
            raise ConfigError(f"--option eos_token={eos}: not in the tokenizer's vocabulary")
        return table, files

    def to_hf(self, tokenizer, tokenizer_config, destination: Path, model_max_length: int) -> None:
        for key, path in tokenizer.artifacts().items():
            shutil.copyfile(path, destination / FILE_NAMES[key])
        tok = tokenizer.tokenizer
        eos, pad = tok.id_to_token(tokenizer.eos_id), tok.id_to_token(tokenizer.pad_id)
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eos, "eos_token": eos, "unk_token": eos,
                  "add_prefix_space": False, "model_max_length": model_max_length}
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
        special = {k: table[k] for k in ("eos_token", "pad_token") if table.get(k) is not None}
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


@mega.hookimpl
def register_tokenizer_converters(register):
    """Its files in Hugging Face directories, Megatron-LM's args and NeMo archives.
    Registered through `mega.plugins.tokenizers.huggingface`, which imports this hook."""
    register("huggingface", HuggingFaceTokenizerInterop)
