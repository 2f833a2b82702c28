"""Which part of a step's data each trainer rank holds, and the reductions that combine the parts.

A step's rollout is never held whole on one rank (at the Qwen3-30B-A3B recipe's size it is 2,048 sequences of
up to ~9k tokens with their log-probs and routing). Each data-parallel rank holds its *share*: the prompt groups
it trains on, with their samples, rewards, log-probs, routing records and diagnostics inputs. The ranks that
hold the same share (the tensor-, pipeline- and context-parallel peers of a data-parallel rank) are its
*peers*; the first of them is the share's *leader* (it scores the rewards and, with remote servers, requests
the share's samples, and shares them with the others).

Which prompts: mini-batch ``k`` of ``K`` is the ``k``-th contiguous block of the step's prompts, and data-parallel
rank ``d`` of ``D`` holds the ``d``-th of ``D`` equal blocks of every mini-batch (:meth:`DataShare.prompt_indices`).
That is exactly the rows the actor gave rank ``d`` when every rank held the whole batch and the actor sliced
it, so the step, and every logged number, is the one the whole batch gives (``tests/distributed`` checks it).
With more than one data-parallel rank it needs ``data.prompts_per_step`` divisible by
``algorithm.num_mini_batches x`` the data-parallel size, so that no prompt group is split between ranks (its
advantages need all its rewards); ``Config.validate`` checks it before the run starts.

Numbers logged for the step combine the shares with exact reductions: sums and counts add, maxima take the
maximum (:meth:`DataShare.sum`, :meth:`DataShare.max`); quantiles and histograms have their own exact
combinations in :mod:`sapo_megatron.diagnostics`.

No Megatron import: the trainer builds a :class:`DataShare` from megatron's data-parallel group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sapo_megatron import collectives


@dataclass(frozen=True)
class DataShare:
    """This rank's share of the step's data (see the module docstring).

    ``rank``/``size``: the data-parallel rank and size; ``group``: the data-parallel group (one rank per share;
    ``None`` = the whole job, or no job); ``peers``: the group of the ranks that hold this share (``None`` when
    this rank holds it alone); ``leader``: the global rank of the first of them.
    """

    rank: int = 0
    size: int = 1
    group: Any = None
    peers: Any = None
    leader: int = 0

    @classmethod
    def build(cls, rank: int, size: int, group: Any = None) -> "DataShare":
        """The share of data-parallel rank ``rank`` of ``size`` (``group``: the data-parallel group). A collective
        over the whole job: every rank calls it once, after the parallel layout is set up."""
        if not 0 <= rank < size:
            raise ValueError(f"DataShare.build(rank={rank}, size={size}): rank must be in [0, size)")
        if not collectives.is_initialized() or collectives.world_size() == 1:
            return cls(rank=rank, size=size, group=group)
        owners = collectives.all_gather_object(rank)
        peers_of = {d: [r for r, owner in enumerate(owners) if owner == d] for d in sorted(set(owners))}
        mine = peers_of[rank]
        peers = None
        for d, ranks in peers_of.items():
            # Every rank takes part in creating every group (torch.distributed's rule), in the same order.
            created = dist.new_group(ranks) if len(ranks) > 1 else None
            if d == rank:
                peers = created
        return cls(rank=rank, size=size, group=group if size > 1 else None, peers=peers, leader=mine[0])

    # -- which rows --------------------------------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return collectives.rank() == self.leader

    def prompt_indices(self, num_prompts: int, num_mini_batches: int) -> list[int]:
        """The step's prompts this share trains on: its block of every mini-batch, in mini-batch order."""
        if self.size == 1:
            return list(range(num_prompts))
        if num_prompts % (num_mini_batches * self.size):
            raise ValueError(
                f"data.prompts_per_step={num_prompts} is not divisible by algorithm.num_mini_batches="
                f"{num_mini_batches} x the data-parallel size {self.size}: each mini-batch's prompts are split "
                f"evenly over the data-parallel ranks; pick a multiple of {num_mini_batches * self.size}"
            )
        per_mini_batch = num_prompts // num_mini_batches
        block = per_mini_batch // self.size
        return [
            k * per_mini_batch + self.rank * block + i for k in range(num_mini_batches) for i in range(block)
        ]

    def block(self, num_items: int) -> range:
        """A contiguous block of ``num_items`` (held-out prompts): sizes differ by at most one."""
        base, extra = divmod(num_items, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    # -- combining the shares ------------------------------------------------------------------------------------
    def sum(self, *values: float) -> tuple[float, ...]:
        """Each value summed over the shares (float64: counts stay exact up to 2**53)."""
        return self._reduce(values, collectives.ReduceOp.SUM)

    def max(self, *values: float) -> tuple[float, ...]:
        return self._reduce(values, collectives.ReduceOp.MAX)

    def _reduce(self, values: Sequence[float], op) -> tuple[float, ...]:
        if self.size == 1:
            return tuple(float(v) for v in values)
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        collectives.all_reduce(tensor, op=op, group=self.group)
        return tuple(tensor.tolist())

    def sum_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every tensor summed over the shares, element-wise (one collective for all of them): the way
        per-share statistics (counts, sums, sums of squares) become the step's. Dtypes and shapes are kept."""
        if self.size == 1 or not tensors:
            return dict(tensors)
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors.values()])
        collectives.all_reduce(flat, group=self.group)
        out, start = {}, 0
        for key, t in tensors.items():
            out[key] = flat[start : start + t.numel()].reshape(t.shape).to(t.dtype)
            start += t.numel()
        return out

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every share's ``obj`` (small things: per-rank metric dicts, histogram counts), in share order."""
        if self.size == 1:
            return [obj]
        return collectives.all_gather_object(obj, group=self.group)

    def from_leader(self, obj: Any) -> Any:
        """The leader's ``obj`` on every peer (the others pass anything)."""
        if self.peers is None:
            return obj
        return collectives.broadcast_object(obj, src=self.leader, group=self.peers)

    def gather_from_peers(self, obj: Any) -> list[Any]:
        """Every peer's ``obj``, in rank order (``[obj]`` for a rank alone with its share)."""
        if self.peers is None:
            return [obj]
        return collectives.all_gather_object(obj, group=self.peers)

    @property
    def num_peers(self) -> int:
        return 1 if self.peers is None else dist.get_world_size(self.peers)

    @property
    def peer_index(self) -> int:
        return 0 if self.peers is None else dist.get_rank(self.peers)
