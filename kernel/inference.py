"""Loading a checkpoint for inference, and sampling text with a KV cache.

A model that supports generation is a `mega.protocols.Generator`: `forward(tokens,
cache=None) -> logits`, `new_kv_cache(batch, max_len)`, `vocab_size` (logits past it are
vocabulary padding) and `max_positions`.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path, PurePath
from typing import Any, Dict, List, Mapping, Optional, Tuple

import attrs
import torch

from mega.config import config_from_dict, load_raw
from mega.errors import CheckpointError
from mega.protocols import Unpacks
from mega.training.checkpointing import resolve_checkpoint, verify


def load_checkpoint_for_inference(path, plugins=None, device: str = "cpu") -> Tuple[torch.nn.Module, object, object]:
    """(model in eval mode, tokenizer, config) from a checkpoint directory, a checkpoints
    folder, a run directory (the latest checkpoint is used) or a checkpoint in one file (an
    archive, `mega export RUN model.mega`)."""
    if plugins is None:
        from mega.plugin_manager import get_plugins

        plugins = get_plugins()
    if Path(path).expanduser().is_file():
        return _load_file(Path(path).expanduser(), plugins, device)
    ckpt = resolve_checkpoint(path)
    manifest = verify(ckpt)
    config = config_from_dict(load_raw(ckpt / "config.toml"), plugins=plugins, source=str(ckpt / "config.toml"))
    tok_cfg = config.model.tokenizer
    files = checkpoint_tokenizer_files(ckpt, {a.name: getattr(tok_cfg, a.name) for a in attrs.fields(type(tok_cfg))})
    for key, file in files.items():  # tokenizer files were copied next to the config
        setattr(tok_cfg, key, str(file))
    tokenizer = plugins.tokenizers.get(tok_cfg.library, "model.tokenizer.library").factory(tok_cfg, [], None)
    model = plugins.models.get(config.model.name, "model.name").factory(config.model, tokenizer, plugins)
    fmt = plugins.checkpoint_formats.get(manifest.get("format", "native")).factory()
    from mega.runtime.parallel import current
    from mega.training.run import load_resharded

    model.load_state_dict(load_resharded(fmt, ckpt, manifest, current(), model)["model"])
    return model.to(device).eval(), tokenizer, config


def checkpoint_tokenizer_files(checkpoint: Path, tokenizer: Mapping[str, Any]) -> Dict[str, Path]:
    """The tokenizer files a checkpoint holds, by the tokenizer config key naming them:
    `tokenizer` is its config's `model.tokenizer` table, whose file keys name copies
    beside its config.toml by relative paths (see mega.training.run.checkpoint_files).

    String values that name no file there are not file keys (a token, the library's name).
    A checkpoint may come from elsewhere (an unpacked archive): a value naming a file by an
    absolute path, through a `..` part, or through a symbolic link out of `checkpoint` is
    refused, naming the key, so loading or importing it never reads a file of this machine."""
    checkpoint = Path(checkpoint)
    root = checkpoint.resolve()
    found: Dict[str, Path] = {}
    for key, value in tokenizer.items():
        if not isinstance(value, str) or not value:
            continue
        rel, path = PurePath(value), checkpoint / value
        try:
            if not path.is_file():
                continue  # not a file name (a token, the library's name)
        except OSError:  # e.g. a value too long to be a file name
            continue
        if rel.is_absolute() or ".." in rel.parts:
            raise CheckpointError(f"{checkpoint / 'config.toml'}: model.tokenizer.{key}={value!r}: a checkpoint's"
                                  " tokenizer files are relative paths inside it; refusing a path that leads outside")
        if not path.resolve().is_relative_to(root):
            raise CheckpointError(f"{checkpoint / 'config.toml'}: model.tokenizer.{key}={value!r} resolves outside"
                                  " the checkpoint (a symbolic link); refusing it")
        found[key] = path
    return found


def unpack_checkpoint_file(path: Path, plugins) -> Tuple[Path, Path]:
    """(checkpoint directory, scratch directory holding it) for a checkpoint in one file,
    through the checkpoint format that recognises it (see `mega import`): unpacked when the
    format can `unpack(file, directory)`, else imported into a scratch run directory. The
    scratch directory is removed when this process exits."""
    from mega.interop import find_importer

    fmt = find_importer(path, plugins, hint=f"give a run directory, a checkpoint directory or an archive (.mega, .nemo),"
                                            f" or convert it first with `mega import {path} RUN_DIR --from FORMAT`")
    scratch = Path(tempfile.mkdtemp(prefix="mega-checkpoint-"))
    atexit.register(shutil.rmtree, scratch, True)
    try:
        ckpt = (fmt.unpack(path, scratch / "checkpoint") if isinstance(fmt, Unpacks)
                else fmt.import_run(path, scratch / "run", {}, plugins))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return ckpt, scratch


def _load_file(path: Path, plugins, device: str):
    """A checkpoint in one file (`unpack_checkpoint_file`). Once the model is loaded only
    the tokenizer files stay in the scratch directory (the returned config names them),
    until this process exits."""
    ckpt, scratch = unpack_checkpoint_file(path, plugins)
    try:
        model, tokenizer, config = load_checkpoint_for_inference(ckpt, plugins, device)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    keep = {str(v) for v in attrs.asdict(config.model.tokenizer).values() if isinstance(v, str)}
    for f in [p for p in scratch.rglob("*") if p.is_file() and str(p) not in keep]:
        f.unlink()
    return model, tokenizer, config


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def check_sampling(max_new_tokens: int, *, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, names: Optional[Mapping[str, str]] = None) -> None:
    """Raise a ValueError naming the first setting out of range (`names` maps a parameter
    to how the caller spells it, e.g. "top_p" -> "--top-p"): top_p is a probability mass
    in (0, 1] (at 0 no token would be left to sample), top_k a count (0: all tokens),
    temperature positive unless greedy."""
    name = dict(names or {}).get
    if max_new_tokens < 0:
        raise ValueError(f"{name('max_new_tokens', 'max_new_tokens')}: must be >= 0, got {max_new_tokens}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{name('top_p', 'top_p')}: must be in (0, 1] (the probability mass sampled from; 1: all"
                         f" tokens), got {top_p:g}")
    if top_k < 0:
        raise ValueError(f"{name('top_k', 'top_k')}: must be >= 0 (0: all tokens), got {top_k}")
    if not greedy and not temperature > 0:
        raise ValueError(f"{name('temperature', 'temperature')}: must be positive (or use greedy), got {temperature:g}")


@torch.no_grad()
def generate(model, prompt: List[int], max_new_tokens: int, *, greedy: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None, seed: Optional[int] = None,
             use_cache: bool = True) -> List[int]:
    """Continue `prompt` (token ids) by up to `max_new_tokens` tokens; stops at `eos_id`.

    greedy picks the arg-max; otherwise sampling at `temperature`, restricted to the `top_k`
    most likely tokens (0: all) and to the smallest set whose probability reaches `top_p`.
    With `use_cache` each new token costs one position of attention (a KV cache); without,
    the whole sequence is recomputed each time (same result, used to test the cache).
    """
    if not prompt:
        raise ValueError("the prompt is empty")
    check_sampling(max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    device = next(model.parameters()).device
    total = min(len(prompt) + max_new_tokens, model.max_positions)
    if len(prompt) >= model.max_positions:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model holds {model.max_positions} positions")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0 if seed is None else seed)
    tokens = list(prompt)
    cache = model.new_kv_cache(1, total) if use_cache else None
    step_input = torch.tensor([tokens], device=device)
    while len(tokens) < total:
        logits = model(step_input if use_cache else torch.tensor([tokens], device=device), cache=cache)[0, -1].float()
        logits[model.vocab_size:] = float("-inf")  # vocabulary padding
        if greedy:
            nxt = int(torch.argmax(logits))
        else:
            probs = _filter_logits(logits / temperature, top_k, top_p).softmax(-1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        tokens.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
        step_input = torch.tensor([[nxt]], device=device)
    return tokens[len(prompt):]
