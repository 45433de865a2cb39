"""Reading a Megatron-LM checkpoint for `mega import`, whatever the model: a save directory
(`latest_checkpointed_iteration.txt` naming an iteration or `release`), an iteration
directory, one `model_optim_rng.pt`, or an NGC-style `.zip` holding
`release/mp_rank_00/model_optim_rng.pt`. The tensor/pipeline layout and the rank folders
(`mp_rank_XX[_YYY]`) come from the file's `args`; `merged_model` merges the shards into
one model under mega's global names.
"""
from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from mega.errors import CheckpointError, ConfigError
from mega.plugins.checkpoints.megatron.files import load_file
from mega.plugins.checkpoints.megatron.layout import FILE, TRACKER, find_rank_file, pp_size, state_from_raw, tp_size
from mega.runtime.sharding import merge_shards, to_global

ZIP_MEMBER = "release/mp_rank_00/model_optim_rng.pt"
_RANK = re.compile(r"^mp_rank_\d{2}(_\d{3})*$")


# --- finding the files ----------------------------------------------------------------------


def _has_ranks(directory: Path) -> bool:
    """An iteration directory: `mp_rank_*` folders holding Megatron's file (mega's native
    format names its rank folders the same, with other files inside)."""
    return directory.is_dir() and any(_RANK.match(p.name) and ((p / FILE).is_file() or (p / "model_rng.pt").is_file())
                                      for p in directory.iterdir())


def can_import(source: Path) -> bool:
    source = Path(source)
    if source.is_file():
        if source.suffix == ".zip":
            try:
                with zipfile.ZipFile(source) as z:
                    return ZIP_MEMBER in z.namelist()
            except zipfile.BadZipFile:
                return False
        return source.name in (FILE, "model_rng.pt")
    if (source / TRACKER).is_file():  # a save directory: Megatron's rank files (not a torch_dist iteration)
        try:
            iteration = iteration_directory(source)[0]
        except CheckpointError:
            return True  # let the import say what is wrong with the tracker
        return not (iteration / "metadata.json").is_file()
    return _has_ranks(source)


def iteration_directory(source: Path) -> Tuple[Path, int]:
    """The iteration directory a save directory's tracker names (an int or `release`)."""
    text = (source / TRACKER).read_text().strip()
    if text == "release":
        return source / "release", 0
    try:
        step = int(text)
    except ValueError:
        raise CheckpointError(f"{source / TRACKER}: says {text!r}; Megatron-LM writes an iteration number or 'release'") from None
    return source / f"iter_{step:07d}", step


class Source:
    """A Megatron-LM checkpoint's rank files: `read(tp_rank, pp_rank)` -> the loaded dict."""

    def __init__(self, source: Path, trust_pickle: bool = False, fallback_args=None):
        source = Path(source)
        self.trust = trust_pickle
        self.step: Optional[int] = None
        self.zip: Optional[Path] = None
        self.single: Optional[Path] = None
        self.directory: Optional[Path] = None
        if source.is_file() and source.suffix == ".zip":
            self.zip, self.step = source, 0
        elif source.is_file():
            if _RANK.match(source.parent.name) and _has_ranks(source.parent.parent):
                self.directory = source.parent.parent  # one rank's file: read the whole iteration
            else:
                self.single = source
        elif (source / TRACKER).is_file():
            self.directory, self.step = iteration_directory(source)
        else:
            self.directory = source
        if self.directory is not None and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such iteration directory (named by {source / TRACKER})")
        if self.step is None and self.directory is not None and self.directory.name == "release":
            self.step = 0
        self.first = self.read(0, 0, pp=1)
        self.args = self.first.get("args")
        if self.args is None and fallback_args is not None and (self.zip or self.single):
            self.args = self.first["args"] = fallback_args  # a file saved without args: one rank, TP=1
        if self.args is None:
            raise CheckpointError(f"{self.name(0, 0, 1)}: has no 'args'; mega needs them to know the model's shape"
                                  " (a file saved without args, as NGC's releases, imports with --option"
                                  " num_attention_heads=N)")
        self.tp, self.pp = tp_size(self.args), pp_size(self.args)
        if (self.zip or self.single) and (self.tp, self.pp) != (1, 1):
            raise CheckpointError(f"{source}: args say tensor/pipeline-parallel sizes ({self.tp}, {self.pp}) but only"
                                  " one rank's file is here; import the iteration directory")
        if self.step is None:
            self.step = int(self.first.get("iteration", 0) or 0)

    def near(self) -> List[Path]:
        """The directories a moved checkpoint's tokenizer files may sit in: the iteration
        directory and the save directory above it (or the file's own folders)."""
        if self.directory is not None:
            return [self.directory, self.directory.parent]
        start = self.zip or self.single
        return [start.parent, start.parent.parent, start.parent.parent.parent]

    def name(self, tp_rank: int, pp_rank: int, pp: int) -> str:
        if self.zip is not None:
            return f"{self.zip}:{ZIP_MEMBER}"
        if self.single is not None:
            return str(self.single)
        return str(self.directory / (f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")) / FILE)

    def read(self, tp_rank: int, pp_rank: int, pp: Optional[int] = None) -> dict:
        pp = self.pp if pp is None else pp
        if self.zip is not None:
            with zipfile.ZipFile(self.zip) as z, z.open(ZIP_MEMBER) as f:
                return load_file(f, self.name(0, 0, 1), self.trust)
        if self.single is not None:
            return load_file(self.single, str(self.single), self.trust)
        path = find_rank_file(self.directory, tp_rank, pp_rank, pp)
        if path is None:
            raise CheckpointError(f"{self.name(tp_rank, pp_rank, pp)}: missing (args say tensor/pipeline-parallel"
                                  f" sizes ({self.tp}, {self.pp}))")
        return load_file(path, str(path), self.trust)


# --- merging shards -------------------------------------------------------------------------


def merged_model(src: Source) -> Dict[str, torch.Tensor]:
    """Every rank's tensors merged into one model under mega's (global) names: the
    kernel's merge_shards along each tensor's split dimension, then to_global (layer
    numbers made global, the last stage's copy of the tied word embedding dropped)."""
    full: Dict[str, torch.Tensor] = {}
    for stage in range(src.pp):
        ranks = [state_from_raw(src.first if (r, stage) == (0, 0) else src.read(r, stage),
                                src.name(r, stage, src.pp), stage, parts=("model",))
                 for r in range(src.tp)]
        sharding = ranks[0]["sharding"]
        full.update(to_global(merge_shards([r["model"] for r in ranks], sharding), sharding))
    return full


def fallback_args(options: Mapping[str, str]) -> Optional[argparse.Namespace]:
    """Stand-in `args` for a file saved without them (early Megatron-LM, NGC's BERT
    releases): only the head count, which no tensor shape tells (`--option
    num_attention_heads=N`)."""
    if not options.get("num_attention_heads"):
        return None
    try:
        heads = int(options["num_attention_heads"])
    except ValueError:
        raise ConfigError(f"--option num_attention_heads={options['num_attention_heads']}: expected a whole number") from None
    return argparse.Namespace(num_attention_heads=heads)
