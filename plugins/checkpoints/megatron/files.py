"""Reading Megatron-LM's `model_optim_rng.pt` safely: `torch.load(weights_only=True)` with
an allow-list of what `args` and Megatron's RNG states hold, Megatron-LM's own classes read
as inert stand-ins, and full unpickling only on an explicit `--option trust_pickle=true`.

The allow-list is added for the length of one load and the caller's own list is put back
as it was afterwards: torch's `safe_globals` context manager removes on exit every global
it added, even one the caller had allowed before (a script that allowed
`argparse.Namespace` and then had mega read a Megatron file would find its own
`torch.load` refused next).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import pickle
import types
from pathlib import Path
from typing import Any, Iterator, List

import torch

from mega.checkpoint.load_errors import describe
from mega.errors import CheckpointError


@contextlib.contextmanager
def allowed_globals(extra: List[Any]) -> Iterator[None]:
    """`extra` allowed for weights_only loading inside the block; afterwards only what this
    block added is taken away again: what the caller had allowed stays allowed, and so does
    what anything else allowed meanwhile (a torch module registering its types on import)."""
    added = [g for g in extra if g not in torch.serialization.get_safe_globals()]
    torch.serialization.add_safe_globals(added)
    try:
        yield
    finally:
        keep = [g for g in torch.serialization.get_safe_globals() if g not in added]
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(keep)


def safe_globals() -> list:
    """What `args` and Megatron's RNG states may contain, allow-listed for weights_only
    loading (Megatron-LM's own list, less its enums): Namespace (Megatron-LM),
    SimpleNamespace (Hugging Face's converter), paths and numpy arrays."""
    allowed: List[Any] = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, pathlib.WindowsPath]
    try:
        import numpy as np

        allowed += [np.ndarray, np.dtype, np.dtypes.UInt32DType]
        try:
            from numpy.core.multiarray import _reconstruct  # noqa: PLC0415
        except ImportError:  # numpy >= 2 moved it (the old path still imports with a warning)
            from numpy._core.multiarray import _reconstruct
        allowed.append(_reconstruct)
    except (ImportError, AttributeError):
        pass
    return allowed


def load_file(source, name: str, trust_pickle: bool = False) -> dict:
    """torch.load of a `model_optim_rng.pt` (a path or a binary file object) with
    weights_only and the allow-list above. Any other global is refused with its name; only
    `trust_pickle` (an explicit opt-in) loads it with full unpickling."""
    if not isinstance(source, (str, Path)):
        source = io.BytesIO(source.read())  # a zip member: seekable, readable twice
    if trust_pickle:
        return torch.load(source, map_location="cpu", weights_only=False)
    try:
        with allowed_globals(safe_globals()):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if hasattr(source, "seek"):
            source.seek(0)
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
        except Exception:  # noqa: BLE001 - only for the message
            unsafe = []
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in safe_globals()}
        unsafe = [g for g in unsafe if g not in allowed]
        if not unsafe:
            raise CheckpointError(f"{name}: cannot be read as a Megatron checkpoint: {describe(exc)}") from None
        if all(g.startswith(MEGATRON_MODULES) for g in unsafe):
            if hasattr(source, "seek"):
                source.seek(0)
            return _load_with_stubs(source, name, unsafe)
        raise CheckpointError(
            f"{name}: holds Python objects that are not plain data ({', '.join(unsafe)}); mega loads Megatron files"
            " with torch.load(weights_only=True) and allows only argparse.Namespace, types.SimpleNamespace, paths and"
            " numpy arrays. If you trust where the file came from, import it with --option trust_pickle=true") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{name}: cannot be read as a Megatron checkpoint: {describe(exc)}") from None


# Megatron-LM's own classes that `args` of its older files hold (enums such as
# megatron.model.enums.AttnMaskType, dataclasses): read as inert stand-ins, never imported
MEGATRON_MODULES = ("megatron.",)


class MegatronStandIn:
    """Stands for an object of a Megatron-LM class found in `args` (an enum member, a
    config dataclass): it keeps the pickled value or fields and runs no code of its own.
    mega reads only plain fields of `args`, so these are never consulted."""

    def __init__(self, *args, **kwargs):
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def __repr__(self) -> str:
        return f"<{self.__module__}.{type(self).__qualname__} stand-in {self.__dict__}>"


def _load_with_stubs(source, name: str, unsafe: List[str]) -> dict:
    """weights_only loading with each Megatron-LM class allowed as a stand-in subclass of
    MegatronStandIn (torch.serialization's `(class, "module.Name")` allow-list entries)."""
    stubs = []
    for full in unsafe:
        module, _, qualname = full.rpartition(".")
        stubs.append((type(qualname, (MegatronStandIn,), {"__module__": module}), full))
    try:
        with allowed_globals(safe_globals() + stubs):
            return torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, OSError, RuntimeError, EOFError, TypeError) as exc:
        raise CheckpointError(f"{name}: holds Megatron-LM objects ({', '.join(unsafe)}) that cannot be read as plain"
                              f" data ({describe(exc)}); if you trust where the file came from, import it"
                              " with --option trust_pickle=true in an environment where megatron is importable") from None
