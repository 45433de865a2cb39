"""Dense peak FLOP/s of known accelerators, so MFU (model FLOP/s / peak) is logged only
where it is honest. Figures are the vendors' dense (no sparsity) bf16/fp16 tensor-core
peaks; fp32 runs get no MFU (their peak depends on TF32 settings)."""
from __future__ import annotations

from typing import Optional

import torch

# substring of torch.cuda.get_device_name() -> dense bf16 peak FLOP/s
BF16_PEAKS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda" or str(precision) not in ("bf16", "16"):
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> Optional[float]:
    for key, peak in BF16_PEAKS.items():  # first match wins: specific names come first
        if key in name:
            return peak
    return None
