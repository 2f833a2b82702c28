"""The one place where Megatron's own loss averaging is undone.

Our policy losses are normalised by explicit *global* counts (tokens or sequences of the whole mini-batch),
so the loss a micro-batch returns is already its exact share of the mini-batch loss: summing the shares
over micro-batches and data-parallel ranks gives the whole-batch loss, and the same for gradients.

Megatron, for a loss function that returns ``(loss, reduced_dict)`` (two values), does two things that
assume a per-micro-batch *mean* instead:

1. ``schedules.forward_step_calc_loss`` multiplies the loss by ``cp_size / num_microbatches``;
2. ``DistributedDataParallel`` scales gradients by ``1 / (dp_size * cp_size)`` before summing them over the
   data-parallel x context-parallel group (``calculate_per_token_loss=False``; expert parameters are scaled
   so that the result is the same).

The product is ``1 / (num_microbatches * dp_size)``, so the loss handed to Megatron is the share multiplied
by ``num_microbatches * dp_size``; the unscaled share is what gets reported.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MegatronLossScale:
    num_microbatches: int
    data_parallel_size: int

    def __post_init__(self):
        assert self.num_microbatches >= 1 and self.data_parallel_size >= 1

    @property
    def factor(self) -> float:
        return float(self.num_microbatches * self.data_parallel_size)

    def to_megatron(self, loss_share):
        """The tensor to return from the schedule's loss function for a global-count-normalised loss."""
        return loss_share * self.factor
