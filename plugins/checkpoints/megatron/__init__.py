"""The `megatron` checkpoint format (Megatron-LM's legacy layout): training checkpoints,
`mega import` of Megatron-LM checkpoints and `mega export --to megatron`. format.py says
what each module of the package does; they import one way only (files, layout, args,
family, source, interop, format), and this package's face is format.py's."""
from __future__ import annotations

from mega.plugins.checkpoints.megatron.format import MegatronFormat, on_train_start, register_checkpoint_formats
from mega.plugins.checkpoints.megatron.layout import nest, qkv_to_current, rank_folder

__all__ = ["MegatronFormat", "nest", "on_train_start", "qkv_to_current", "rank_folder", "register_checkpoint_formats"]
