"""Why `torch.load(..., weights_only=True)` refused a file, in words fit for mega's errors.

mega reads every checkpoint, weight and `args` file with `weights_only=True`: no code from
the file runs. When a file holds other Python objects, torch's error explains how to load
it anyway ("Re-running `torch.load` with `weights_only` set to `False` will likely
succeed", allow-listing the class): advice about torch.load, which a mega user does not
call and mega does not follow. `describe` keeps what is wrong with the file (the objects
it holds, or that it is not a file torch.save wrote) and drops the advice.
"""
from __future__ import annotations

import pickle
import re

_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_REASON = re.compile(r"WeightsUnpickler error: (.*)")


def describe(exc: BaseException) -> str:
    """The reason `exc` (raised by torch.load) gives, without torch's advice."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = _GLOBAL.search(text)
        if found:
            return (f"it holds Python objects that are not plain tensors and numbers ({found.group(1)}); mega loads"
                    " files with torch.load(weights_only=True), which runs no code from the file, and refuses them")
        reason = _REASON.search(text)
        detail = reason.group(1).strip() if reason else "not a pickle torch can read"
        return f"not a file torch.save wrote, or a damaged one ({detail})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"
