"""Which torch device a part of the run uses: one rule for the trainer, the actor and the bridge.

Pure torch; at the bottom of the package so that the bridge (which builds the model on it) and the actor (which
installs the CPU compatibility for it) read the same answer without importing each other.
"""

from __future__ import annotations

import torch


def resolve_device(
    device: str | torch.device | None, *, name: str = "device", must_exist: bool = False
) -> torch.device:
    """``None`` or ``"auto"`` -> cuda when available, else cpu; otherwise the given cpu / cuda device.

    ``must_exist``: a cuda device must be present on this machine (a run about to start on it); a check or a plan
    for another machine leaves it off. ``name`` is the setting the errors name (``trainer.device``).
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}={device!r}: not a device; use 'auto', 'cpu' or 'cuda'") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}={device!r}: the actor runs on 'cpu' or 'cuda', not {resolved.type!r}")
    if must_exist and resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={device} but no CUDA device is available; use {name}=cpu")
    return resolved
