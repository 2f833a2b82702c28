"""Phase offload: the actor's parameters, gradient buffers and optimizer states leave device memory while the
rollout engine runs, and come back before the next forward.

Megatron's objects reach their memory through many views: with the distributed optimizer every parameter
is a view into its DDP buffer's ``param_data``, ``param.main_grad`` and each bucket's ``grad_data`` are views
into ``grad_data``, and fp32 main params are views into the parameters again. Moving tensors (``p.data =
p.data.cpu()``, what megatron's ``offload_to_cpu`` does for optimizer state) would cut those views apart.
Offload therefore works on *storages*: each distinct storage is copied to a host store once and then
shrunk to zero bytes with ``untyped_storage().resize_(0)``; reload re-grows it and copies the bytes back.
Every tensor, parameter and view keeps its identity and sees its values again after the reload.

* GPU: the host store is pinned CPU memory; ``torch.cuda.empty_cache()`` returns the freed blocks.
* CPU: device memory *is* host memory, so a second in-memory copy would free nothing. The store is a file
  (``host_dir``, the system temp directory by default; put it on disk, not on a RAM-backed tmpfs), and the
  freed heap pages are handed back to the OS with glibc's ``malloc_trim``; resident memory drops by about
  the offloaded bytes.

Gradient buffers are freed without a copy and come back zeroed: the actor zeroes them before every backward
pass anyway (megatron's ``offload_grad_buffers`` does the same). Storages shared between groups (fp32 main
params of the distributed optimizer are the parameters' own bytes) follow the parameter setting.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch

PARAMS, GRADS, OPTIMIZER = "params", "grads", "optimizer"


def check_optimizer_offload(optimizer_cfg, device: torch.device | str) -> None:
    """``optimizer.optimizer_cpu_offload`` is megatron's HybridDeviceOptimizer: a GPU feature."""
    if optimizer_cfg.optimizer_cpu_offload and torch.device(device).type != "cuda":
        raise ValueError(
            "optimizer.optimizer_cpu_offload=true runs megatron-core's HybridDeviceOptimizer, which needs a CUDA "
            "device; on CPU the optimizer already lives in host memory. Use optimizer.offload_optimizer=true to "
            "free optimizer memory during rollouts instead"
        )


def rss_bytes() -> int:
    """This process's resident set size (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_freed_host_memory() -> None:
    """glibc keeps freed heap pages; malloc_trim returns them to the OS (a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))


def _host_memoryview(storage: torch.UntypedStorage) -> memoryview:
    """The bytes of a CPU storage as a writable memoryview. Not via ``Tensor.numpy()``: that marks the storage
    non-resizable for good, and offload has to resize it."""
    return memoryview((ctypes.c_char * storage.nbytes()).from_address(storage.data_ptr())).cast("B")


@dataclass
class _Entry:
    storage: torch.UntypedStorage
    nbytes: int
    group: str
    keep_values: bool
    host: Optional[torch.Tensor] = None  # pinned copy (GPU)
    offset: int = -1  # position in the host file (CPU)


@dataclass
class OffloadReport:
    """What one offload freed: bytes per group (params / grads / optimizer) and the number of storages."""

    bytes: dict[str, int] = field(default_factory=dict)
    storages: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def _sub_optimizers(optimizer) -> list:
    if optimizer is None:
        return []
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


class ActorOffloader:
    """Offloads and reloads one actor's memory (``actor`` from :func:`sapo_megatron.actor.factory.build_actor`).

    ``offload(params=, grads=, optimizer=)`` frees the selected groups; ``reload()`` restores exactly what
    was offloaded; ``offloaded(...)`` is the same pair as a context manager. Every rank calls them; no
    collective is involved.
    """

    def __init__(self, actor, *, host_dir: str | os.PathLike | None = None):
        self.actor = actor
        self.host_dir = str(host_dir) if host_dir is not None else tempfile.gettempdir()
        self._entries: list[_Entry] = []
        self._file = None
        # GPU: pinned host buffers are slow to allocate; the n-th storage of an offload reuses the n-th buffer.
        self._pinned: list[torch.Tensor] = []

    @property
    def is_offloaded(self) -> bool:
        return bool(self._entries)

    # -- which storages ----------------------------------------------------------------------------------------
    def _params(self) -> Iterator[torch.Tensor]:
        for chunk in self.actor.ddp_chunks:
            yield from chunk.parameters()
            for buffer in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
                if buffer.param_data is not None:
                    yield buffer.param_data

    def _grads(self) -> Iterator[torch.Tensor]:
        for chunk in self.actor.ddp_chunks:
            for buffer in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
                yield buffer.grad_data
            for param in chunk.parameters():
                if param.grad is not None:
                    yield param.grad
        for sub in _sub_optimizers(self.actor.optimizer):
            for group in sub.optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        yield param.grad

    def _optimizer_states(self) -> Iterator[torch.Tensor]:
        for sub in _sub_optimizers(self.actor.optimizer):
            inner = getattr(sub, "optimizer", None)
            if inner is None:
                continue
            for group in inner.param_groups:
                yield from group["params"]
            for state in inner.state.values():
                yield from (value for value in state.values() if isinstance(value, torch.Tensor))

    def _device(self) -> torch.device:
        return self.actor.model.device

    def _collect(self, params: bool, grads: bool, optimizer: bool) -> list[_Entry]:
        device = self._device()
        seen: dict[int, str] = {}
        entries: list[_Entry] = []
        # Parameters first: a storage the optimizer shares with a parameter (fp32 main params) belongs to them.
        groups = [(PARAMS, self._params, True), (GRADS, self._grads, False), (OPTIMIZER, self._optimizer_states, True)]
        wanted = {PARAMS: params, GRADS: grads, OPTIMIZER: optimizer}
        for group, tensors, keep_values in groups:
            for tensor in tensors():
                if tensor.device.type != device.type:
                    continue  # already on the host (e.g. Adam's step counter on GPU)
                storage = tensor.untyped_storage()
                if storage.nbytes() == 0:
                    continue
                key = storage.data_ptr()
                if key in seen:
                    continue
                seen[key] = group
                if wanted[group]:
                    if not storage.resizable():
                        # torch marks a storage non-resizable for good once Tensor.numpy() has shared it.
                        raise RuntimeError(
                            f"a {group} storage of {storage.nbytes()} bytes is not resizable (something called "
                            ".numpy() on a tensor that shares it), so it cannot be offloaded in place"
                        )
                    entries.append(_Entry(storage, storage.nbytes(), group, keep_values))
        return entries

    # -- offload / reload --------------------------------------------------------------------------------------
    def offload(self, *, params: bool = True, grads: bool = True, optimizer: bool = True) -> OffloadReport:
        if self.is_offloaded:
            raise RuntimeError("ActorOffloader.offload: already offloaded; reload() first")
        entries = self._collect(params, grads, optimizer)
        device = self._device()
        if device.type == "cuda":
            for index, entry in enumerate(entries):
                if entry.keep_values:
                    entry.host = self._pinned_buffer(index, entry.nbytes)
                    entry.host.copy_(_byte_view(entry.storage), non_blocking=True)
            torch.cuda.synchronize(device)
        else:
            self._write_to_file(entries)
        report = OffloadReport()
        for entry in entries:
            entry.storage.resize_(0)
            report.bytes[entry.group] = report.bytes.get(entry.group, 0) + entry.nbytes
        report.storages = len(entries)
        self._entries = entries
        if device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            _release_freed_host_memory()
        return report

    def reload(self) -> None:
        if not self.is_offloaded:
            return
        device = self._device()
        for entry in self._entries:
            entry.storage.resize_(entry.nbytes)
            target = _byte_view(entry.storage)
            if not entry.keep_values:
                target.zero_()
            elif entry.host is not None:
                target.copy_(entry.host, non_blocking=True)
            else:
                self._file.seek(entry.offset)
                read = self._file.readinto(_host_memoryview(entry.storage))
                assert read == entry.nbytes, f"short read from the offload file: {read} of {entry.nbytes} bytes"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self._entries = []
        if self._file is not None:
            self._file.close()
            self._file = None

    @contextlib.contextmanager
    def offloaded(self, *, params: bool = True, grads: bool = True, optimizer: bool = True):
        report = self.offload(params=params, grads=grads, optimizer=optimizer)
        try:
            yield report
        finally:
            self.reload()

    def offloaded_for(self, optimizer_cfg):
        """``offloaded`` with the groups the config's ``optimizer.offload_{params,grads,optimizer}`` select."""
        return self.offloaded(
            params=optimizer_cfg.offload_params,
            grads=optimizer_cfg.offload_grads,
            optimizer=optimizer_cfg.offload_optimizer,
        )

    def _pinned_buffer(self, index: int, nbytes: int) -> torch.Tensor:
        while len(self._pinned) <= index:
            self._pinned.append(torch.empty(0, dtype=torch.uint8))
        if self._pinned[index].numel() != nbytes:
            self._pinned[index] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return self._pinned[index]

    def _write_to_file(self, entries: Iterable[_Entry]) -> None:
        # An anonymous file: removed from the directory at once, its blocks freed when it is closed.
        self._file = tempfile.TemporaryFile(dir=self.host_dir)
        offset = 0
        for entry in entries:
            if not entry.keep_values:
                continue
            entry.offset = offset
            self._file.write(_host_memoryview(entry.storage))
            offset += entry.nbytes
        self._file.flush()


def offload_actor(
    actor, *, params: bool = True, grads: bool = True, optimizer: bool = True, host_dir=None
) -> ActorOffloader:
    """Offloads the selected groups of ``actor`` and returns the handle that :func:`reload_actor` takes."""
    offloader = ActorOffloader(actor, host_dir=host_dir)
    offloader.offload(params=params, grads=grads, optimizer=optimizer)
    return offloader


def reload_actor(offloader: ActorOffloader) -> None:
    offloader.reload()
