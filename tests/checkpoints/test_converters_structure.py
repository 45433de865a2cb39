"""The interop formats know no model family and no tokenizer by name: each family declares
its own converters (`register_model_converters`), each tokenizer its own
(`register_tokenizer_converters`), and `mega.plugins.checkpoints` keeps only file I/O.
These tests hold that shape:

* no import cycle among the modules of `plugins/` (imports inside functions count: a lazy
  import is still a dependency);
* no file of `plugins/` imports another file's private (`_name`) helper;
* no registered model or tokenizer name appears in the code of `plugins/checkpoints/`
  (string literals, `startswith`, `library == ...`, identifiers such as `is_bert`);
* a new decoder family defined in a module outside the repository, with its own tokenizer,
  goes through `mega export --to huggingface` / `--to megatron` and `mega import` back with
  equal logits, its own files being all it brings.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest
import torch

from tests.helpers.imports import ROOT, module_name

PLUGINS = ROOT / "plugins"
CHECKPOINTS = PLUGINS / "checkpoints"




def _modules() -> Dict[str, Path]:
    return {module_name(p): p for p in PLUGINS.rglob("*.py")}


def _imported(node: ast.AST, modules: Dict[str, Path]) -> Iterator[Tuple[str, List[str]]]:
    """(module imported, names taken from it) for an import node, when the module is one
    of `plugins/`. `from P import sub` where `sub` is a module is an import of `P.sub`
    (Python initialises P first, as for any submodule: a parent is not a dependency)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in modules:
                yield alias.name, []
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        plain = []
        for alias in node.names:
            sub = f"{node.module}.{alias.name}"
            if sub in modules:
                yield sub, []
            else:
                plain.append(alias.name)
        if plain and node.module in modules:
            yield node.module, plain


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    edges: Dict[str, Set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target, _ in _imported(node, modules):
                if target != name:
                    edges[name].add(target)
    return edges


def _cycles(edges: Dict[str, Set[str]]) -> List[Set[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    groups: List[Set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def test_plugins_import_each_other_without_cycles():
    cycles = [sorted(c) for c in _cycles(_graph())]
    assert not cycles, f"import cycles among plugins/ modules: {cycles}"


def test_the_cycle_finder_finds_a_cycle():
    """The checker itself (so the rule above cannot pass by accident), lazy imports included."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    source = "def f():\n    from mega.plugins.checkpoints.megatron.layout import nest\n"
    modules = {"mega.plugins.checkpoints.megatron.layout": Path("x")}
    found = [t for node in ast.walk(ast.parse(source)) for t, _ in _imported(node, modules)]
    assert found == ["mega.plugins.checkpoints.megatron.layout"]


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _private_uses(path: Path, here: str, modules: Dict[str, Path]) -> Iterator[str]:
    tree = ast.parse(path.read_text(), str(path))
    aliases: Dict[str, str] = {}  # local name -> a plugins module bound to it
    for node in ast.walk(tree):
        for target, names in _imported(node, modules):
            if target == here:
                continue
            for name in names:
                if name.startswith("_"):
                    yield f"{_where(path)}:{node.lineno} imports {target}.{name}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == target:
                        aliases[alias.asname or alias.name.split(".")[0]] = target
            elif not names:  # from P import sub [as s]: a module bound to a name
                for alias in node.names:
                    if f"{node.module}.{alias.name}" == target:
                        aliases[alias.asname or alias.name] = target
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            yield f"{_where(path)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}"


def test_no_plugin_file_reaches_into_another_files_private_helpers():
    modules = _modules()
    found = [use for name, path in modules.items() for use in _private_uses(path, name, modules)]
    assert not found, "\n".join(found)


def test_the_private_helper_checker_sees_both_spellings(tmp_path):
    modules = {"mega.plugins.a": tmp_path / "a.py", "mega.plugins.b": tmp_path / "b.py"}
    (tmp_path / "b.py").write_text("from mega.plugins.a import _secret, public\nfrom mega.plugins import a\n"
                                   "x = a._other + a.fine\n")
    assert list(_private_uses(tmp_path / "b.py", "mega.plugins.b", modules)) == [
        "b.py:1 imports mega.plugins.a._secret", "b.py:3 uses mega.plugins.a._other"]


# --- no family or tokenizer names in the formats -------------------------------------------------


def _words(text: str) -> List[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _contains(words: List[str], name: List[str]) -> bool:
    return any(words[i:i + len(name)] == name for i in range(len(words) - len(name) + 1))


def _docstrings(tree: ast.AST) -> Set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def names_in_code(path: Path, names: Set[str], common_words: Set[str]) -> List[str]:
    """Where a name appears in a file's code (docstrings and comments aside): a string
    literal equal to it, or holding it as a word ("megatron-bert", "is_bert"), and an
    identifier holding it as a word. Names that are common English words ("word",
    "bytes") count only as a whole literal."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        texts = []
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            texts.append(("literal", node.value))
        elif isinstance(node, ast.Name):
            texts.append(("identifier", node.id))
        elif isinstance(node, ast.Attribute):
            texts.append(("identifier", node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            texts.append(("identifier", node.name))
        elif isinstance(node, ast.arg):
            texts.append(("identifier", node.arg))
        for kind, text in texts:
            for name in names:
                whole = kind == "literal" and text.strip().lower() == name
                as_word = name not in common_words and _contains(_words(text), _words(name))
                if whole or as_word:
                    found.append(f"{_where(path)}:{getattr(node, 'lineno', '?')}: {kind} {text!r} names {name!r}")
    return found


def _family_and_tokenizer_names(plugins) -> Set[str]:
    formats = set(plugins.checkpoint_formats.names())  # "huggingface" is a format too
    return {n for n in plugins.models.names() + plugins.tokenizers.names() + plugins.tasks.names() if n not in formats}


def test_the_checkpoint_formats_name_no_model_or_tokenizer(plugins):
    names = _family_and_tokenizer_names(plugins)
    assert {"gpt", "bert", "bert_masked_lm", "t5", "wordpiece", "sentencepiece", "bytes"} <= names
    found = [hit for path in sorted(CHECKPOINTS.rglob("*.py")) for hit in names_in_code(path, names, {"word", "bytes"})]
    assert not found, "\n".join(found)


def test_the_name_checker_finds_the_switches_it_is_for(tmp_path, plugins):
    names = _family_and_tokenizer_names(plugins)
    bad = tmp_path / "bad.py"
    bad.write_text('"""A gpt docstring is prose."""\n'
                   'def is_bert(name):\n    return name.startswith("bert")\n'
                   'def f(tok, hf):\n'
                   '    if tok["library"] == "wordpiece" or hf["model_type"] == "megatron-bert":\n'
                   '        return {"name": "gpt", "library": "bytes"}\n'
                   '    return "64 bytes of a word"\n')
    said = "\n".join(names_in_code(bad, names, {"word", "bytes"}))
    for expected in ("identifier 'is_bert'", "literal 'bert'", "literal 'wordpiece'", "literal 'megatron-bert'",
                     "literal 'gpt'", "literal 'bytes'"):
        assert expected in said, said
    assert "64 bytes" not in said and "docstring" not in said


# --- a new family brings its own interop -----------------------------------------------------------

TOY_FAMILY = '''
"""A toy decoder family outside mega: a model, its tokenizer, and their converters."""
import shutil
from pathlib import Path
from typing import Optional

import torch
from attrs import define
from torch import nn

import mega
from mega.config import ModelConfig, TokenizerConfig
from mega.errors import CheckpointError
from mega.protocols import Match


@define(kw_only=True)
class ToyConfig(ModelConfig):
    name: str = "toy"
    num_layers: int = 2
    hidden_size: int = 16
    make_vocab_size_divisible_by: int = 8


def padded(vocab, multiple):
    return -(-vocab // multiple) * multiple


class ToyLM(nn.Module):
    """Embeddings, residual tanh blocks, a LayerNorm, the output tied to the embedding."""

    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.vocab_size, self.max_positions = vocab_size, cfg.seq_length
        self.embed = nn.Embedding(padded(vocab_size, cfg.make_vocab_size_divisible_by), cfg.hidden_size)
        self.blocks = nn.ModuleList(nn.Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.norm(h) @ self.embed.weight.t()

    def training_loss(self, batch):
        logits = self(batch["tokens"])
        losses = nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        return {"loss_sum": (losses * batch["loss_mask"].flatten()).sum()}


@define(kw_only=True)
class ToyCharsConfig(TokenizerConfig):
    library: str = "toychars"


class ToyChars:
    """One character per line of `model` (line 0 the end of text, line 1 unknown)."""

    def __init__(self, path):
        self.path = Path(path)
        chars = self.path.read_text(encoding="utf-8").split("\\n")
        self.ids = {c: i for i, c in enumerate(chars) if i > 1}
        self.vocab_size, self.eos_id, self.pad_id = len(chars), 0, 0

    def encode(self, text):
        return [self.ids.get(c, 1) for c in text]

    def decode(self, ids):
        back = {i: c for c, i in self.ids.items()}
        return "".join(back.get(i, "?") for i in ids)

    def artifacts(self):
        return {"model": self.path}


# --- the family's converters: Hugging Face and Megatron-LM names --------------------------------

def to_hf_name(name):
    name = name.replace("embed.", "toy.embed_tokens.").replace("norm.", "toy.final_norm.")
    return name.replace("blocks.", "toy.layers.")


def to_mega_name(name):
    name = name.replace("toy.embed_tokens.", "embed.").replace("toy.final_norm.", "norm.")
    return name.replace("toy.layers.", "blocks.")


class ToyInterop:
    tokenizers = ("toychars",)
    hf_model_types, hf_architectures = ("toy",), ("ToyForCausalLM",)
    vocab_tensors = ("embed.weight",)

    def hf_model_table(self, hf, where):
        if hf.get("architectures") != ["ToyForCausalLM"]:
            raise CheckpointError(f"{where}: not a ToyForCausalLM")
        return {"name": "toy", "num_layers": hf["num_layers"], "hidden_size": hf["hidden_size"],
                "seq_length": hf["max_length"]}

    def from_hf(self, state, model, vocab_size, where):
        out = {to_mega_name(k): v for k, v in state.items()}
        rows = padded(vocab_size, model.get("make_vocab_size_divisible_by", 8))
        word = out["embed.weight"]
        out["embed.weight"] = torch.cat([word, word.new_zeros(rows - word.shape[0], word.shape[1])])
        return out

    def hf_config(self, mc, tokenizer, dtype):
        return {"model_type": "toy", "architectures": ["ToyForCausalLM"], "vocab_size": tokenizer.vocab_size,
                "num_layers": mc.num_layers, "hidden_size": mc.hidden_size, "max_length": mc.seq_length,
                "torch_dtype": dtype}

    def to_hf(self, state, mc, vocab_size):
        out = {to_hf_name(k): v for k, v in state.items()}
        out["toy.embed_tokens.weight"] = out["toy.embed_tokens.weight"][:vocab_size]
        return out

    def megatron_recognises(self, state, args):
        return Match.MARKED if "embed.weight" in state else Match.NO

    def megatron_check(self, state, args, where):
        if getattr(args, "swiglu", False):
            raise CheckpointError(f"{where}: args.swiglu=True; the toy has tanh blocks")

    def megatron_model_table(self, state, args, where):
        return {"name": "toy", "num_layers": args.num_layers, "hidden_size": args.hidden_size,
                "seq_length": args.seq_length}

    def megatron_args(self, model):
        return {"num_layers": model["num_layers"], "hidden_size": model["hidden_size"], "seq_length": model["seq_length"]}


class ToyCharsInterop:
    file_names = {"model": "chars.txt"}
    hf_options = megatron_options = ("chars_file",)
    hf_hint = megatron_hint = "--option chars_file=PATH"

    def from_hf(self, source, options, hf_config, only_options):
        if options.get("chars_file"):
            return {"library": "toychars"}, {"model": Path(options["chars_file"])}
        if not only_options and (source / "chars.txt").is_file():
            return {"library": "toychars"}, {"model": source / "chars.txt"}
        return None

    def to_hf(self, tokenizer, tokenizer_config, destination, model_max_length):
        shutil.copyfile(tokenizer.artifacts()["model"], destination / "chars.txt")

    def megatron_files(self, table):
        return {"model": table["model"]} if table.get("model") else {}

    def megatron_fields(self, table, vocab_size, files):
        return {"tokenizer_type": "ToyChars", "vocab_file": files.get("model")}

    def from_megatron(self, args, options, locate, only_options):
        if options.get("chars_file"):
            return {"library": "toychars"}, {"model": Path(options["chars_file"])}
        if only_options or getattr(args, "tokenizer_type", None) != "ToyChars":
            return None
        found = locate(getattr(args, "vocab_file", None))
        return ({"library": "toychars"}, {"model": found}) if found else None


@mega.hookimpl
def register_models(register):
    register("toy", lambda config, tokenizer, plugins: ToyLM(config, tokenizer.vocab_size), config=ToyConfig)


@mega.hookimpl
def register_tokenizers(register):
    register("toychars", lambda config, corpus_files, run_dir: ToyChars(config.model), config=ToyCharsConfig)


@mega.hookimpl
def register_model_converters(register):
    register("toy", ToyInterop)


@mega.hookimpl
def register_tokenizer_converters(register):
    register("toychars", ToyCharsInterop)
'''


@pytest.fixture
def toy_plugins(tmp_path_factory, monkeypatch):
    """The process's plugins with the toy family module loaded from outside the repository
    (as MEGA_PLUGIN_MODULES loads a project-local plugin), restored afterwards."""
    from mega.plugin_manager import get_plugins

    where = tmp_path_factory.mktemp("toy_site")
    (where / "toy_family.py").write_text(TOY_FAMILY)
    monkeypatch.syspath_prepend(str(where))
    monkeypatch.setenv("MEGA_PLUGIN_MODULES", "toy_family")
    try:
        yield get_plugins(fresh=True)
    finally:
        monkeypatch.undo()
        sys.modules.pop("toy_family", None)
        get_plugins(fresh=True)


def _toy_run(tmp_path: Path, plugins) -> Tuple[Path, object]:
    from mega.checkpoint import write_imported_run
    from mega.config import config_from_dict

    chars = tmp_path / "chars.txt"
    chars.write_text("\n".join(["<eot>", "<unk>", *"abcdefghijklmnopqrstuvwxyz .,"]), encoding="utf-8")
    raw = {"model": {"name": "toy", "num_layers": 2, "hidden_size": 16, "seq_length": 8,
                     "tokenizer": {"library": "toychars", "model": str(chars)}}}
    mc = config_from_dict(raw, plugins=plugins).model
    tokenizer = plugins.tokenizers.get("toychars").factory(mc.tokenizer, [], None)
    torch.manual_seed(0)
    model = plugins.models.get("toy").factory(mc, tokenizer, plugins)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # LayerNorm away from 1 / 0, so a mapping slip shows
    write_imported_run(tmp_path / "run", raw, {k: v.clone() for k, v in model.state_dict().items()}, plugins)
    return tmp_path / "run", model.eval()


def _logits(model, text: str, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokenizer.encode(text)]))[..., :tokenizer.vocab_size]


def test_a_new_family_brings_its_own_interop(tmp_path, toy_plugins):
    """A decoder family and its tokenizer from a module outside the repository, with their
    converters: `mega export --to huggingface` and `--to megatron` write its files, `mega
    import` reads each back (found by config.json's model_type, args.mega_model, and with
    those gone by its tensors), with the very logits. Nothing in mega.plugins.checkpoints
    knows it."""
    from mega.checkpoint import restore
    from mega.cli import main

    assert "toy" in toy_plugins.model_converters and "toychars" in toy_plugins.tokenizer_converters
    run, model = _toy_run(tmp_path, toy_plugins)
    text = "the toy reads, a line."
    tokenizer = restore(run, toy_plugins).tokenizer
    ours = _logits(model, text, tokenizer)

    assert main(["export", str(run), str(tmp_path / "hf"), "--to", "huggingface"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "toy" and config["vocab_size"] == tokenizer.vocab_size
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "hf" / "model.safetensors")) == sorted(
        ["toy.embed_tokens.weight", "toy.final_norm.bias", "toy.final_norm.weight", "toy.layers.0.bias",
         "toy.layers.0.weight", "toy.layers.1.bias", "toy.layers.1.weight"])
    assert (tmp_path / "hf" / "chars.txt").read_text() == (tmp_path / "chars.txt").read_text()
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "from-hf")]) == 0
    back, tok, cfg = restore(tmp_path / "from-hf", toy_plugins)
    assert (cfg.model.name, cfg.model.tokenizer.library) == ("toy", "toychars")
    assert torch.equal(_logits(back, text, tok), ours)

    assert main(["export", str(run), str(tmp_path / "meg"), "--to", "megatron"]) == 0
    rank_file = tmp_path / "meg" / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        saved = torch.load(rank_file, weights_only=True)
    args = saved["args"]
    assert (args.mega_model, args.tokenizer_type, args.num_layers, args.hidden_size) == ("toy", "ToyChars", 2, 16)
    assert args.vocab_file == str(tmp_path / "meg" / "chars.txt") and (tmp_path / "meg" / "chars.txt").is_file()
    assert main(["import", str(tmp_path / "meg"), str(tmp_path / "from-meg")]) == 0
    back, tok, _ = restore(tmp_path / "from-meg", toy_plugins)
    assert torch.equal(_logits(back, text, tok), ours)

    del args.mega_model  # a file that does not say its family: its converter recognises the tensors
    torch.save(saved, rank_file)
    assert main(["import", str(tmp_path / "meg"), str(tmp_path / "recognised")]) == 0
    back, tok, _ = restore(tmp_path / "recognised", toy_plugins)
    assert torch.equal(_logits(back, text, tok), ours)


def test_a_family_without_converters_is_refused_naming_those_that_have(tmp_path, plugins):
    """bart has no Hugging Face or Megatron-LM converter: both exports say so, listing the
    families that have one."""
    from mega.checkpoint import save_model_checkpoint
    from mega.config import config_from_dict
    from mega.errors import CheckpointError, ConfigError

    stack = {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 4}
    config = config_from_dict({"model": {"name": "bart", "seq_length": 8, "seq_length_dec": 8, "encoder": dict(stack),
                                         "decoder": dict(stack), "tokenizer": {"library": "bytes"}},
                               "exp_manager": {"exp_dir": str(tmp_path), "name": "bart"}}, plugins=plugins)
    tokenizer = plugins.tokenizers.get("bytes").factory(config.model.tokenizer, [], None)
    model = plugins.models.get("bart").factory(config.model, tokenizer, plugins)
    save_model_checkpoint(tmp_path / "bart", config, model, tokenizer, plugins)
    with pytest.raises(ConfigError, match=r"model 'bart'; no model converter writes it as Megatron-LM files"
                                          r" \(families that do: bert, gpt, llama\)"):
        plugins.checkpoint_formats.get("megatron").factory().export_run(tmp_path / "bart", tmp_path / "m", {}, plugins)
    with pytest.raises(CheckpointError, match=r"cannot be written as GPT2LMHeadModel, LlamaForCausalLM, MegatronBertForCausalLM"):
        plugins.checkpoint_formats.get("huggingface").factory().export_run(tmp_path / "bart", tmp_path / "h", {}, plugins)
    assert not (tmp_path / "m").exists() and not (tmp_path / "h").exists()


def test_two_families_sure_of_one_file_is_a_refusal_not_a_guess():
    from mega.errors import CheckpointError
    from mega.plugins.checkpoints.converters import surest
    from mega.protocols import Match

    fits, marked, marked_too = object(), object(), object()
    judge = {id(fits): Match.FITS, id(marked): Match.MARKED, id(marked_too): Match.MARKED}
    pick = lambda candidates: surest(candidates, lambda conv: judge[id(conv)], "ckpt")  # noqa: E731
    assert pick([(["gpt"], fits), (["bert"], marked)]) is marked  # the family the file marks wins over one it fits
    assert pick([(["gpt"], fits)]) is fits and pick([]) is None
    with pytest.raises(CheckpointError, match="ckpt: the converters of bert and llama both recognise it"):
        pick([(["gpt"], fits), (["bert"], marked), (["llama"], marked_too)])
