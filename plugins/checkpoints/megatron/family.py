"""Which model family a Megatron-LM checkpoint holds: the converter `args.mega_model` names
(files mega writes say it), else the one surest it recognises the tensors and `args`
(`MegatronModelConverter.megatron_recognises`). The format then asks that converter what
the family cannot run, and for its model table."""
from __future__ import annotations

from typing import Mapping, Optional

from mega.errors import CheckpointError
from mega.protocols import MegatronModelConverter
from mega.plugins.checkpoints.converters import model_converter, model_converters, surest


def family_of(plugins, state: Mapping, args, where: str, required: bool = True) -> Optional[object]:
    """The converter of the family the checkpoint at `where` holds. With `required`, none
    is a CheckpointError naming the families that read Megatron-LM files; else None."""
    named = getattr(args, "mega_model", None)
    if named:
        found = model_converter(plugins, str(named), MegatronModelConverter)
        if found is None and required:
            raise CheckpointError(f"{where}: args.mega_model={named!r}, a model no installed converter reads from"
                                  " Megatron-LM files")
        return found
    candidates = model_converters(plugins, MegatronModelConverter)
    found = surest(candidates, lambda conv: conv.megatron_recognises(state, args), where)
    if found is None and required:
        readers = ", ".join(names[0] for names, _ in candidates) or "none"
        raise CheckpointError(f"{where}: no model converter recognises this Megatron-LM checkpoint (families that"
                              f" read them: {readers})")
    return found
