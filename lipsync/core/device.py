"""Device selection from a flag: ``auto`` picks cuda, then mps, then cpu."""
from __future__ import annotations

import torch

from lipsync.core.errors import Wav2LipError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


class DeviceError(Wav2LipError, ValueError):
    """A --device that this machine does not have."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; a named device must exist (:class:`DeviceError`)."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but no CUDA GPU is available (use --device cpu or auto)")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError("--device mps was asked for, but MPS is not available (use --device cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; choose one of {DEVICE_CHOICES}") from None
