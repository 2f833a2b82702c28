"""How a data-parallel rank's rows become micro-batches: a fixed number of rows each, or a token budget.

Fixed split (``trainer.micro_batch_size``): consecutive rows, every micro-batch padded to the batch's width.

Token budget (``trainer.max_tokens_per_micro_batch``, verl's "dynamic batch size" with right padding instead
of packing): rows are sorted by length, longest first, and each goes into the first micro-batch that stays
within the budget with it (first-fit decreasing). A micro-batch is padded only to its own longest row, so
its cost is ``rows x width`` padded tokens; a row longer than the budget gets a micro-batch of its own.
On a length-skewed batch (most responses short, a few long) the short rows stop paying for the long ones.

A row's *length* here is the number of positions the loss, the metrics and the diagnostics read: up to and
including the position after its last loss-mask position (:func:`row_lengths`). Causal attention makes the
logits at position ``t`` depend only on tokens ``0..t``, so cutting the right padding changes none of them.

Why the result equals the fixed split's: every reduction divides by the mini-batch's *global* token /
sequence counts (:mod:`sapo_megatron.algorithms.reductions`), so each micro-batch's loss is its exact share
whatever rows it holds, and :class:`~sapo_megatron.actor.loss_adapter.MegatronLossScale` undoes megatron's
``1 / num_microbatches``. Only the floating-point summation order differs (rounding, ~1e-7 in fp32).

Every rank of a schedule must run the same number of micro-batches (pipeline stages exchange one activation
per micro-batch; expert-parallel ranks, which hold different rows, meet in every MoE layer's all-to-all).
The actor therefore takes the largest first-fit count over the data-parallel group and splits its own
groups until it has that many (:func:`group_by_token_budget` with ``num_groups``); splitting a group never
raises any micro-batch's padded cost, so the budget still holds.

Packed sequences (``trainer.pack_sequences``, GPU with Transformer Engine): a micro-batch's rows are laid end to
end in one row instead (:mod:`sapo_megatron.actor.packing`), so its cost is the sum of its rows' lengths (rounded
up to ``multiple``), not ``rows x width``; the same first-fit-decreasing grouping runs on that cost
(``packed=True``). Per-token outputs are unpacked to the micro-batch's ``[rows, width]`` inside the loss
function, so everything from :meth:`MicroBatchLayout.assemble` on is the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sapo_megatron.actor.packing import SequencePacking


def round_up(value: int, multiple: int) -> int:
    return value + (-value) % multiple


def row_lengths(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions of each row that a loss or metric reads, int64 ``[B]``.

    Position ``t`` of the loss mask predicts token ``t + 1``, so a row whose last loss position is ``t`` needs
    tokens ``0..t + 1``: length ``t + 2`` (capped at the width). A row without any loss position (batch
    padding, an empty response) contributes nothing anywhere and gets length 1.
    """
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask must be [batch, seq], got shape {tuple(loss_mask.shape)}")
    width = loss_mask.shape[1]
    positions = torch.arange(1, width + 1, dtype=torch.int64)
    last = (loss_mask.bool().to(torch.int64) * positions).amax(dim=1) if width else torch.zeros(0, dtype=torch.int64)
    # last = (index of the last loss position) + 1, or 0 for a row without one.
    return torch.where(last > 0, (last + 1).clamp(max=width), torch.ones_like(last))


def padded_tokens(group: Sequence[int], lengths: Sequence[int], multiple: int = 1, *, packed: bool = False) -> int:
    """The tokens a micro-batch of rows ``group`` costs: rows x its longest row (rounded up to ``multiple``), or
    with ``packed`` the sum of its rows' lengths (rounded up to ``multiple``)."""
    if packed:
        return round_up(sum(lengths[i] for i in group), multiple)
    return len(group) * round_up(max(lengths[i] for i in group), multiple)


def group_by_token_budget(
    lengths: Sequence[int],
    max_tokens: int,
    *,
    multiple: int = 1,
    num_groups: int | None = None,
    packed: bool = False,
) -> list[list[int]]:
    """First-fit-decreasing grouping of rows under a padded-token budget.

    ``lengths[i]`` is row ``i``'s length; ``multiple`` rounds every micro-batch's width up (sequence
    parallelism splits the sequence over tensor-parallel ranks). Rows are visited longest first (ties by
    index) and each joins the first group whose padded cost stays ``<= max_tokens`` with it, else opens a
    new group; a row that alone exceeds the budget is a group of its own. (A group's cost does not depend on
    the joining row's length, so a group that turns one row away turns away all later ones: the groups are
    consecutive runs of the sorted rows.) With ``packed`` a group costs the sum of its rows' lengths rounded up
    to ``multiple`` (:func:`padded_tokens`): plain first-fit-decreasing bin packing, where a short row may still
    join a group that turned a longer one away. With ``num_groups`` (at least the
    first-fit count, at most the number of rows), the group with the largest padded cost among those with
    two or more rows is halved until there are exactly that many.

    Returns the groups in the order they were opened (longest rows first); the indices inside each group
    are ascending. Every index appears exactly once.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: the token budget must be >= 1")
    if multiple < 1:
        raise ValueError(f"multiple={multiple}: must be >= 1")
    lengths = [int(n) for n in lengths]
    if any(n < 1 for n in lengths):
        raise ValueError(f"every row length must be >= 1, got {min(lengths)}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    widths: list[int] = []  # a group's width is its first (longest) row's, rounded up
    sums: list[int] = []  # a group's packed tokens before rounding
    for i in order:
        for g, group in enumerate(groups):
            cost = round_up(sums[g] + lengths[i], multiple) if packed else (len(group) + 1) * widths[g]
            if cost <= max_tokens:
                group.append(i)
                sums[g] += lengths[i]
                break
        else:
            groups.append([i])
            widths.append(round_up(lengths[i], multiple))
            sums.append(lengths[i])
    if num_groups is not None:
        if num_groups < len(groups):
            raise ValueError(
                f"num_groups={num_groups}: the budget of {max_tokens} tokens needs at least {len(groups)} micro-batches"
            )
        if num_groups > len(lengths):
            raise ValueError(f"num_groups={num_groups}: more micro-batches than the {len(lengths)} rows")
        while len(groups) < num_groups:
            # Halve the costliest splittable group; its rows are longest first, so the halves stay sorted.
            g = max(
                (g for g in range(len(groups)) if len(groups[g]) > 1),
                key=lambda g: (padded_tokens(groups[g], lengths, multiple, packed=packed), -g),
            )
            group = groups[g]
            half = (len(group) + 1) // 2
            groups[g : g + 1] = [group[:half], group[half:]]
    return [sorted(group) for group in groups]


@dataclass(frozen=True)
class MicroBatchLayout:
    """This rank's micro-batches of one schedule run.

    ``rows[i]`` are the row indices (into this data-parallel rank's slice of the padded batch) of micro-batch
    ``i``, ``widths[i]`` its padded width. ``padded_size`` is the row count of the whole padded batch over all
    data-parallel ranks, ``num_local`` this rank's share of it, ``width`` the full (padded) width.
    ``local``: the batch handed to the actor was already this data-parallel rank's share (``padded_size ==
    num_local``): nothing is sliced or gathered over data-parallel ranks.
    ``packing``: with packed sequences, how each micro-batch ``[len(rows[i]), widths[i]]`` is packed into the one
    row the model sees (:class:`~sapo_megatron.actor.packing.SequencePacking`); ``None`` otherwise.
    """

    rows: tuple[torch.Tensor, ...]
    widths: tuple[int, ...]
    padded_size: int
    num_local: int
    width: int
    local: bool = False
    packing: Optional[tuple[SequencePacking, ...]] = None

    def __post_init__(self):
        assert len(self.rows) == len(self.widths) and len(self.rows) >= 1
        assert sum(len(r) for r in self.rows) == self.num_local, "every local row in exactly one micro-batch"
        assert all(0 < w <= self.width for w in self.widths)
        if self.packing is not None:
            assert len(self.packing) == len(self.rows)
            assert all(p.rows == len(r) and p.width == w for p, r, w in zip(self.packing, self.rows, self.widths))

    @property
    def num_microbatches(self) -> int:
        return len(self.rows)

    @property
    def uniform(self) -> bool:
        """True when every micro-batch has the same shape (megatron's fixed p2p shapes suffice)."""
        return len(set(self.model_shapes())) == 1

    def model_shapes(self) -> list[tuple[int, int]]:
        """``(batch, seq)`` of each micro-batch as the model sees it: ``(1, packed length)`` when packed."""
        if self.packing is not None:
            return [(1, p.total) for p in self.packing]
        return [(len(r), w) for r, w in zip(self.rows, self.widths)]

    def assemble(self, parts: Sequence[torch.Tensor], fill: float = 0.0) -> torch.Tensor:
        """Per-micro-batch values ``parts[i]`` ``[len(rows[i]), widths[i], ...]`` put back in this rank's row
        order at the full width, ``[num_local, width, ...]``; positions past a micro-batch's width hold ``fill``."""
        assert len(parts) == self.num_microbatches
        first = parts[0]
        out = torch.full((self.num_local, self.width, *first.shape[2:]), fill, dtype=first.dtype)
        for part, rows, width in zip(parts, self.rows, self.widths):
            assert tuple(part.shape[:2]) == (len(rows), width), (tuple(part.shape), len(rows), width)
            out[rows, :width] = part.to(out.device)
        return out
