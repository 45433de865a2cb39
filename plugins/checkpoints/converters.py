"""Finding the converters the interop formats dispatch through.

A model family declares how its files map to Hugging Face, Megatron-LM and NeMo
(`register_model_converters`, by mega model name) and a tokenizer how its files do
(`register_tokenizer_converters`, by library); the protocols are in `mega.protocols`.
The `huggingface`, `megatron`, `nemo` and `torch_dist` formats keep the file I/O and ask
here, so they name no family and no tokenizer: a new family adds its own converter and
nothing in this package changes.

One converter object may be registered under several model names (a family with one
model per head): `model_converters` yields it once, with every name it is registered
under.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from mega.errors import CheckpointError
from mega.protocols import Match


def _registered(registry, name: str, ability: type):
    converter = registry.get(name).factory() if name in registry else None
    return converter if isinstance(converter, ability) else None


def model_converter(plugins, model_name: str, ability: type):
    """The converter registered for `model_name` if it has `ability`, else None."""
    return _registered(plugins.model_converters, model_name, ability)


def model_converters(plugins, ability: type) -> List[Tuple[List[str], object]]:
    """(model names, converter) of every model converter with `ability`, one per factory."""
    seen: Dict[object, Tuple[List[str], object]] = {}
    for entry in plugins.model_converters.entries():
        if entry.factory in seen:
            seen[entry.factory][0].append(entry.name)
            continue
        converter = entry.factory()
        if isinstance(converter, ability):
            seen[entry.factory] = ([entry.name], converter)
    return list(seen.values())


def surest(candidates: Sequence[Tuple[List[str], object]], judge: Callable[[object], Match], what: str):
    """The converter `judge` is surest of (a `Match` above NO); a tie is refused naming
    the families, since picking one would load the weights into the wrong model."""
    scored = [(Match(judge(conv)), names, conv) for names, conv in candidates]
    best = max((s for s, _, _ in scored), default=Match.NO)
    if best == Match.NO:
        return None
    top = [(names, conv) for s, names, conv in scored if s == best]
    if len(top) > 1:
        raise CheckpointError(f"{what}: the converters of {' and '.join(names[0] for names, _ in top)} both recognise it;"
                              " it cannot be told which model it holds")
    return top[0][1]


def tokenizer_converters(plugins, ability: type, order: Sequence[str] = ()) -> List[Tuple[str, object]]:
    """(library, converter) of every tokenizer converter with `ability`: the libraries in
    `order` (a family's `tokenizers`) and only those when it is given, else all by name."""
    registry = plugins.tokenizer_converters
    names = [n for n in order if n in registry] if order else registry.names()
    found = [(name, _registered(registry, name, ability)) for name in names]
    return [(name, converter) for name, converter in found if converter is not None]


def tokenizer_converter(plugins, library: str, ability: type):
    """The converter of the tokenizer library `library` if it has `ability`, else None."""
    return _registered(plugins.tokenizer_converters, library, ability)


def options_of(converters: Sequence[Tuple[str, object]], attribute: str) -> Tuple[str, ...]:
    """The `--option` keys the converters read (`attribute`: "hf_options", ...), in order."""
    out: List[str] = []
    for _, converter in converters:
        out += [k for k in getattr(converter, attribute, ()) if k not in out]
    return tuple(out)


def first_answer(converters: Sequence[Tuple[str, object]], ask: Callable[[object, bool], Optional[tuple]]):
    """What the first converter answers to `ask(converter, only_options)`: every converter
    from the command line's options alone first, then from the files themselves; None when
    none answers (the format says how to name the files)."""
    for only_options in (True, False):
        for _, converter in converters:
            found = ask(converter, only_options)
            if found is not None:
                return found
    return None


def vocab_size_of(model_table: dict, files: Mapping[str, Path], plugins) -> int:
    """The vocabulary size of the tokenizer a model table names, built from its files."""
    from mega.config import config_from_dict

    raw = {"model": {"name": model_table["name"],
                     "tokenizer": {**model_table["tokenizer"], **{k: str(v) for k, v in files.items()}}}}
    mc = config_from_dict(raw, plugins=plugins).model
    entry = plugins.tokenizers.get(mc.tokenizer.library, "model.tokenizer.library")
    return entry.factory(mc.tokenizer, [], None).vocab_size
