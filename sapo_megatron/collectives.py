"""Every torch.distributed collective of the package, on the device its group's backend needs.

Why: Megatron's process groups are NCCL on GPU, and NCCL only moves CUDA tensors; code written and tested over
gloo on CPU passes CPU tensors (log-probs gathered after ``.cpu()``, counters built on the host) and would fail at
the first GPU step with PP or DP > 1. Each function here moves its tensor to the group's device (the current
CUDA device for NCCL, the CPU otherwise), runs the collective, and returns results on the caller's device, so
call sites never think about it. ``tests/unit/test_collectives.py`` fails on a direct ``torch.distributed``
collective anywhere else in the package.

No Megatron import: this module sits at the bottom of the package with ``algorithms``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a distributed job)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The job's size (1 without a distributed job)."""
    return dist.get_world_size() if is_initialized() else 1


def device_for(group: Any = None) -> torch.device:
    """The device a collective over ``group`` (default: the whole job) must use."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor if tensor.device == device else tensor.to(device)


def _in_place(collective, tensor: torch.Tensor, group: Any, **kwargs) -> torch.Tensor:
    """``collective(tensor)`` on the group's device, the result written back into ``tensor``."""
    work = _on(tensor, device_for(group))
    collective(work, group=group, **kwargs)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce(tensor: torch.Tensor, op=ReduceOp.SUM, group: Any = None) -> torch.Tensor:
    """In place, as ``dist.all_reduce``; returns ``tensor``."""
    return _in_place(dist.all_reduce, tensor, group, op=op)


def broadcast(tensor: torch.Tensor, src: int, group: Any = None) -> torch.Tensor:
    """In place from global rank ``src``, as ``dist.broadcast``; returns ``tensor``."""
    return _in_place(dist.broadcast, tensor, group, src=src)


def all_gather(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in group-rank order, on ``tensor``'s device."""
    device = device_for(group)
    work = _on(tensor.contiguous(), device)
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, work, group=group)
    return [_on(p, tensor.device) for p in parts]


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's picklable ``obj``, in group-rank order (``[obj]`` without a distributed job)."""
    if not is_initialized():
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


def broadcast_object(obj: Any, src: int, group: Any = None) -> Any:
    """Global rank ``src``'s picklable ``obj`` on every rank of ``group`` (others pass anything); ``obj`` itself
    without a distributed job or in a group of one."""
    if not is_initialized() or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group: Any = None) -> None:
    if "nccl" in str(dist.get_backend(group)).lower():
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


__all__ = [
    "ReduceOp",
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "barrier",
    "broadcast",
    "broadcast_object",
    "device_for",
    "is_initialized",
    "rank",
    "world_size",
]
