"""Aggregation of per-token values into one loss, normalised by explicit global counts.

A mini-batch is split into micro-batches (gradient accumulation) and across data-parallel ranks. Each
reduction below is *linear in the per-token values* once its denominators are fixed, so if every
micro-batch divides by the counts of the **whole** mini-batch, the loss it returns is exactly its share:
summing the shares (and their gradients) over micro-batches and ranks gives the whole-batch loss (and
gradient), independent of how the batch was split or padded. Without global counts the local micro-batch
counts are used, which is the whole-batch loss when there is only one micro-batch.

Reductions (``n_i`` = valid tokens of sequence ``i``, ``G`` = sequences with ``n_i >= 1``, ``N = sum n_i``):

==========================  ===============================================  =================================
name                        loss                                             used by
==========================  ===============================================  =================================
``token_mean``              ``sum_i sum_t v_it / N``                         DAPO, CISPO (long answers weigh more)
``seq_mean_token_mean``     ``1/G sum_i (1/n_i sum_t v_it)``                 the SAPO, GRPO and GSPO papers
``seq_mean_token_sum``      ``1/G sum_i sum_t v_it``                         ablations
``seq_mean_token_sum_norm`` ``1/G sum_i (sum_t v_it / L)``, ``L`` constant   Dr. GRPO (no length bias)
==========================  ===============================================  =================================

Sequences without a valid token contribute 0 and are **not** counted in ``G``: they are batch padding
(``TrainBatch.padded_to_multiple``) or fully truncated responses, and counting them would make the loss
depend on how much padding a layout needed. The trainer therefore passes ``num_global_seqs`` = number of
sequences with at least one valid token (:func:`count_valid_sequences`), and ``num_global_tokens`` =
:func:`count_valid_tokens`, both summed over micro-batches and all-reduced over data-parallel ranks.

An all-zero mask (with no global counts, or with counts of 0) gives a loss of exactly 0 that is still
connected to the graph of ``values``: ``backward()`` works and yields zero gradients instead of NaN.
"""

from __future__ import annotations

from typing import Optional

import torch

from sapo_megatron.algorithms.inputs import (
    Count,
    as_valid_mask,
    check_count,
    check_positive,
    check_reduction,
    check_tensor,
    shape_of,
)


def count_valid_tokens(mask: torch.Tensor) -> torch.Tensor:
    """Valid tokens in ``mask`` (0-dim int64); sum this over micro-batches and data-parallel ranks."""
    mask = check_tensor(mask, "mask")
    return as_valid_mask(mask, shape_of(mask), shape_name="mask").sum()


def count_valid_sequences(mask: torch.Tensor) -> torch.Tensor:
    """Sequences with at least one valid token (0-dim int64): the sequence denominator of every reduction."""
    mask = check_tensor(mask, "mask")
    if mask.dim() != 2:
        raise ValueError(f"mask must be [batch, seq], got shape {shape_of(mask)}")
    return as_valid_mask(mask, shape_of(mask), shape_name="mask").any(dim=-1).sum()


def _divide(numerator: torch.Tensor, denominator) -> torch.Tensor:
    # A zero denominator only happens when nothing is valid anywhere, so the numerator is 0 as well;
    # dividing by 1 instead keeps the result 0 (not NaN) and the graph intact.
    if isinstance(denominator, torch.Tensor):
        return numerator / denominator.to(device=numerator.device, dtype=numerator.dtype).clamp(min=1)
    return numerator / max(float(denominator), 1.0)


def aggregate_valid(
    values: torch.Tensor,
    valid: torch.Tensor,
    reduction: str,
    *,
    num_global_tokens: Optional[Count] = None,
    num_global_seqs: Optional[Count] = None,
    norm_length: Optional[float] = None,
) -> torch.Tensor:
    """:func:`aggregate` for inputs that are already checked: ``valid`` is a bool mask of ``values``' shape."""
    masked = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if reduction == "token_mean":
        tokens = valid.sum() if num_global_tokens is None else num_global_tokens
        return _divide(masked.sum(), tokens)
    tokens_per_seq = valid.sum(dim=-1)
    token_sums = masked.sum(dim=-1)
    if reduction == "seq_mean_token_mean":
        per_seq = token_sums / tokens_per_seq.clamp(min=1).to(values.dtype)
    elif reduction == "seq_mean_token_sum":
        per_seq = token_sums
    elif reduction == "seq_mean_token_sum_norm":
        assert norm_length is not None and norm_length > 0, "norm_length is checked by the caller"
        per_seq = token_sums / float(norm_length)
    else:
        raise AssertionError(f"unchecked reduction {reduction!r}")
    seqs = (tokens_per_seq > 0).sum() if num_global_seqs is None else num_global_seqs
    return _divide(per_seq.sum(), seqs)


def check_aggregate_args(
    reduction: str,
    num_global_tokens: Optional[Count],
    num_global_seqs: Optional[Count],
    norm_length: Optional[float],
) -> tuple[Optional[Count], Optional[Count], Optional[float]]:
    """Validates the reduction keywords shared by :func:`aggregate` and every policy loss."""
    check_reduction(reduction)
    num_global_tokens = check_count(num_global_tokens, "num_global_tokens")
    num_global_seqs = check_count(num_global_seqs, "num_global_seqs")
    if reduction == "seq_mean_token_sum_norm":
        if norm_length is None:
            raise ValueError(
                "reduction='seq_mean_token_sum_norm' needs norm_length (Dr. GRPO's constant token normaliser, "
                "usually the maximum response length); pass norm_length=... or set algorithm.reduction_norm_length"
            )
        norm_length = check_positive(norm_length, "norm_length")
    return num_global_tokens, num_global_seqs, norm_length


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    reduction: str,
    *,
    num_global_tokens: Optional[Count] = None,
    num_global_seqs: Optional[Count] = None,
    norm_length: Optional[float] = None,
) -> torch.Tensor:
    """Reduces per-token ``values`` [batch, seq] over the valid positions of ``mask`` to a 0-dim loss.

    ``mask`` is bool or 0/1. Values at masked-out positions are never read (they may be NaN).
    ``num_global_tokens`` is used by ``token_mean``; ``num_global_seqs`` by the three ``seq_mean_*``
    reductions; each may be a Python number or a one-element tensor (e.g. the result of an all-reduce).
    ``norm_length`` is required by ``seq_mean_token_sum_norm`` and ignored by the others. See the module
    docstring for the formulas and the micro-batch contract.
    """
    values = check_tensor(values, "values")
    if values.dim() != 2:
        raise ValueError(f"values must be [batch, seq], got shape {shape_of(values)}")
    if not values.is_floating_point():
        raise ValueError(f"values must be a floating-point tensor, got dtype {values.dtype}")
    valid = as_valid_mask(mask, shape_of(values), shape_name="values")
    num_global_tokens, num_global_seqs, norm_length = check_aggregate_args(
        reduction, num_global_tokens, num_global_seqs, norm_length
    )
    return aggregate_valid(
        values,
        valid,
        reduction,
        num_global_tokens=num_global_tokens,
        num_global_seqs=num_global_seqs,
        norm_length=norm_length,
    )
