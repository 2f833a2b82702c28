"""Which torch device a part of the run uses: one rule for the trainer, the actor and the bridge.

Pure torch; at the bottom of the package so that the bridge (which builds the model on it) and the actor (which
installs the CPU compatibility for it) read the same answer without importing each other.
"""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` -> cuda when available, else cpu; otherwise the given cpu / cuda device."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: not a device; use 'auto', 'cpu' or 'cuda'") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: the actor runs on 'cpu' or 'cuda', not {resolved.type!r}")
    return resolved
