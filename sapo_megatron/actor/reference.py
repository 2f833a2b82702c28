"""The reference policy of the KL term: the run's initial weights, frozen, kept in host memory and swapped
into the actor's own model chunks for its forward pass.

Design: one set of model chunks, not two. A second set would keep another copy of this rank's weight shards
in device memory for the whole run to serve one forward pass per step: for Qwen3-30B-A3B in the recipe's
layout, 5.16 B parameters per GPU, 10.3 GB (9.6 GiB) in bf16, which would take the train phase from 47.7 to
57.3 GiB per GPU (docs/sapo.md has the arithmetic). Here the reference shards live in host memory (pinned on
GPU, so the copies run at full PCIe speed) and, for the pass, *exchange* contents with the actor's
parameters piece by piece (:data:`SWAP_PIECE_BYTES` at a time): the model then holds the reference weights
and the host store the trained ones; the same exchange after the pass puts everything back. Hence:

* host memory: one copy of this rank's shards (not two: no separate stash of the trained weights);
* device memory: one piece (64 MiB) in flight, whatever the model size;
* time: each exchange moves the shard once each way over the host link, two exchanges per pass (on paper
  4 x 10.3 GB at ~25 GB/s: ~1.7 s per step at 30B, next to a forward pass over the rollout batch);
* exactness: only copies, so the trained weights come back bit for bit, and the reference pass is the
  initial model's pass bit for bit (same kernels, same layout).

The reference pass is the actor's own :meth:`MegatronPolicy.compute_logprobs`, so it works for every
parallel layout the actor supports; each rank keeps and swaps only its own shards (no gather, no collective
beyond those of the forward pass itself). What is swapped is the chunks' state: every parameter and every
persistent buffer (e.g. the expert bias of aux-loss-free routers, which training updates), not the
non-persistent counters.

Resume: the reference is saved with every checkpoint (``reference/`` beside ``dist/``, see
:mod:`sapo_megatron.actor.checkpoint`) and loaded from it, resharded to the current layout like the model.
It is not rebuilt from the HF weights because the run's initial policy need not be the HF model: the
supervised warm-up (``trainer.sft_warmup_steps``) runs before RL, and the reference is the policy RL starts
from. The price is one more copy of the weights per checkpoint (the optimizer states are ~6x that).

Not thread-safe, and not re-entrant: while swapped, the actor's model is the reference.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# Bytes exchanged per copy: bounds the device memory the exchange needs on top of the model.
SWAP_PIECE_BYTES = 64 << 20
# Offsets into the host store are aligned so that every typed view of it is aligned too.
_ALIGN = 64


def _model_state(chunks: list) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and persistent buffer of ``chunks`` once, detached (same storage), in a fixed order."""
    found: list[tuple[str, torch.Tensor]] = []
    seen: set[tuple[int, int, torch.dtype]] = set()
    for index, chunk in enumerate(chunks):
        tensors = list(chunk.named_parameters())
        for module_name, module in chunk.named_modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and name not in module._non_persistent_buffers_set:
                    tensors.append((f"{module_name}.{name}" if module_name else name, buffer))
        for name, tensor in tensors:
            key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
            if tensor.numel() == 0 or key in seen:
                continue  # tied weights appear once
            seen.add(key)
            assert tensor.is_contiguous(), f"{name}: the reference swap needs contiguous tensors"
            found.append((f"chunk{index}.{name}", tensor.detach()))
    return found


class ReferencePolicy:
    """Frozen copy of the actor's weights that computes reference log-probs through the actor's own model.

    ``ReferencePolicy.capture(policy)`` at the start of RL (after the weights RL starts from are in the
    model); ``reference.compute_logprobs(batch, **kwargs)`` returns what ``policy.compute_logprobs(batch,
    **kwargs)`` would return under the captured weights. Every rank of the job calls it together (it runs
    the forward schedule).
    """

    def __init__(self, policy, tensors: list[tuple[str, torch.Tensor]], store: torch.Tensor, views: list[torch.Tensor]):
        # Use capture(): this only binds already-built pieces.
        self.policy = policy
        self._tensors = tensors
        self._store = store
        self._views = views
        self._swapped = False

    @classmethod
    def capture(cls, policy) -> "ReferencePolicy":
        """The reference is ``policy``'s weights now (this rank's shards, copied to host memory)."""
        tensors = _model_state(policy.model)
        offsets, total = [], 0
        for _, tensor in tensors:
            offsets.append(total)
            total += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
        on_gpu = any(tensor.device.type == "cuda" for _, tensor in tensors)
        # Pinned on GPU: pageable host memory would stage every copy through a bounce buffer.
        store = torch.empty(total, dtype=torch.uint8, pin_memory=on_gpu)
        views = [
            store[offset : offset + tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
            for offset, (_, tensor) in zip(offsets, tensors)
        ]
        reference = cls(policy, tensors, store, views)
        reference.recapture()
        return reference

    @property
    def nbytes(self) -> int:
        """Host bytes this rank's reference occupies."""
        return self._store.numel()

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._tensors]

    @torch.no_grad()
    def recapture(self) -> None:
        """The reference becomes the policy's current weights (e.g. after a supervised warm-up)."""
        if self._swapped:
            raise RuntimeError("ReferencePolicy.recapture inside swapped(): the model holds the reference")
        self._check_resident()
        for (_, tensor), host in zip(self._tensors, self._views):
            host.copy_(tensor, non_blocking=True)
        self._synchronize()

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside, the actor's model holds the reference weights (and the host store the actor's); on exit,
        whatever the model holds then goes back to the store and the actor's weights to the model.

        Loading weights into the model inside makes them the reference (how a checkpoint restores it)."""
        if self._swapped:
            raise RuntimeError("ReferencePolicy.swapped is not re-entrant")
        self._check_resident()
        self._exchange()
        self._swapped = True
        try:
            yield
        finally:
            self._exchange()
            self._swapped = False

    def compute_logprobs(self, batch, **kwargs):
        """``policy.compute_logprobs(batch, **kwargs)`` under the reference weights (same return value)."""
        with self.swapped():
            return self.policy.compute_logprobs(batch, **kwargs)

    # -- internals -----------------------------------------------------------------------------------------
    def _check_resident(self) -> None:
        for name, tensor in self._tensors:
            if tensor.untyped_storage().nbytes() == 0:
                raise RuntimeError(
                    f"{name} is offloaded (its storage is empty): reload the actor's parameters before "
                    "using the reference policy"
                )

    @torch.no_grad()
    def _exchange(self) -> None:
        """Swaps the contents of the model's tensors and the host store, one piece at a time. An exchange is
        its own inverse; when one fails part-way, the pieces already exchanged are exchanged back."""
        done: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            for (_, tensor), host in zip(self._tensors, self._views):
                flat, flat_host = tensor.view(-1), host.view(-1)
                step = max(1, SWAP_PIECE_BYTES // tensor.element_size())
                for start in range(0, flat.numel(), step):
                    pair = (flat[start : start + step], flat_host[start : start + step])
                    _exchange_piece(*pair)
                    done.append(pair)
        except BaseException:
            for pair in reversed(done):
                _exchange_piece(*pair)
            self._synchronize()
            raise
        self._synchronize()

    def _synchronize(self) -> None:
        # Host-side readers (a checkpoint save, the next exchange's pinned copies) need the copies done.
        if self._tensors and self._tensors[0][1].device.type == "cuda":
            torch.cuda.synchronize(self._tensors[0][1].device)


def _exchange_piece(device_piece: torch.Tensor, host_piece: torch.Tensor) -> None:
    # Same stream throughout: the host->device copy has read host_piece before the device->host copy
    # overwrites it, and the temporary is only reused by later work on that stream.
    held = device_piece.clone()
    device_piece.copy_(host_piece, non_blocking=True)
    host_piece.copy_(held, non_blocking=True)
