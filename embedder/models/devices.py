"""Which device a run uses: 'auto' made explicit (and recorded), bad names refused with the valid ones."""

from __future__ import annotations

import torch

from embedder.errors import DeviceError


def resolve_device(device: str) -> torch.device:
    """'auto' means cuda when present; the choice is always explicit and recorded."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device} requested but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{device}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise DeviceError(f"unsupported device {device!r}; use auto, cpu or cuda[:N]")
    return dev
