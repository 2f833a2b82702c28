"""Behaviour-policy correction: truncated importance weights of the old policy against the rollout engine's.

The responses are sampled by the rollout engine's policy ``pi_rollout`` (vLLM's numerics, and with
``rollout.max_staleness > 0`` older weights), whereas every policy loss takes its ratio against ``pi_old``, the
trainer's recompute before the update (``ratio = exp(logprobs - logprobs_old)``). The loss's ratio and gate only
see how far the update moved from ``pi_old``; the gap ``pi_old`` vs ``pi_rollout`` is an off-policy gap of its
own, corrected by an importance weight on each token's policy-gradient term::

    token level:     w_it = min(exp(logprobs_old_it - logprobs_rollout_it), C)
    sequence level:  w_it = min(exp(sum_t' (logprobs_old_it' - logprobs_rollout_it')), C)   for every valid t

with ``C = algorithm.rollout_correction_clip`` (>= 1). Truncating the ratio at ``C`` bounds the variance at the
price of a small bias (truncated importance sampling). The weight is a constant of the update: the loss
multiplies each valid token's policy-gradient term by it and no gradient flows through it
(:class:`~sapo_megatron.algorithms.loss.TrainingLoss`, ``rollout_weights=``); the KL and entropy terms are not
weighted.

Overflow: the log-ratio (per token, or summed over the sequence) is capped at ``+LOG_RATIO_BOUND`` (20) before
``exp``, so a ratio is at most ``exp(20) ~ 4.9e8`` and never ``inf``; a clip above that acts as that cap. Very
negative log-ratios underflow to a weight of 0, which is their value to float precision. Positions outside the
mask may hold anything (NaN, ``-inf``); NaN/inf at a valid position raises ``ValueError``.

Reference: F. Yao, L. Liu et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"
(blog post, Aug 2025, fengyao.notion.site/off-policy-rl: truncated importance sampling, TIS, for the vLLM /
trainer mismatch), and verl's rollout correction (``algorithm.rollout_is``, ``rollout_is_threshold``,
``rollout_is_level`` token / sequence, ``rollout_is_mode=truncate``; docs/advance/rollout_is.md). This module
follows the TIS definition (an upper clip only, no lower bound, no rejection). See docs/sapo.md,
"Behaviour-policy correction".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Real
from typing import Mapping, Sequence

import torch

from sapo_megatron.algorithms.inputs import (
    LOG_RATIO_BOUND,
    as_valid_mask,
    check_tensor,
    compute_dtype,
    raise_if_nonfinite,
    shape_of,
)

# The levels that produce weights (algorithm.rollout_correction without "off").
ROLLOUT_CORRECTION_LEVELS: tuple[str, ...] = ("token", "sequence")


def _check_args(level: str, clip) -> float:
    if level not in ROLLOUT_CORRECTION_LEVELS:
        raise ValueError(
            f"level={level!r}: use one of {', '.join(ROLLOUT_CORRECTION_LEVELS)} "
            f"(algorithm.rollout_correction=off means no weights: do not compute any)"
        )
    if isinstance(clip, bool) or not isinstance(clip, Real) or not math.isfinite(clip) or clip < 1:
        raise ValueError(f"clip={clip!r}: must be a finite number >= 1 (the largest importance weight kept)")
    return float(clip)


def _unit_log_ratios(logprobs_old, logprobs_rollout, mask, level: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-ratio ``log(pi_old / pi_rollout)`` of each weighted unit and which units are valid.

    Token level: ``[B, S]`` and the mask; sequence level: ``[B]`` (the row's sum) and rows with a valid token.
    Capped at ``+LOG_RATIO_BOUND``; 0 at invalid units."""
    logprobs_old = check_tensor(logprobs_old, "logprobs_old")
    logprobs_rollout = check_tensor(logprobs_rollout, "logprobs_rollout")
    if logprobs_old.dim() != 2:
        raise ValueError(f"logprobs_old must be [batch, seq], got shape {shape_of(logprobs_old)}")
    if not logprobs_old.is_floating_point() or not logprobs_rollout.is_floating_point():
        raise ValueError(
            f"logprobs_old and logprobs_rollout must be floating point, got {logprobs_old.dtype} and "
            f"{logprobs_rollout.dtype}"
        )
    shape = shape_of(logprobs_old)
    if shape_of(logprobs_rollout) != shape:
        raise ValueError(
            f"logprobs_rollout has shape {shape_of(logprobs_rollout)} but logprobs_old has shape {shape}; "
            f"they must match"
        )
    valid = as_valid_mask(mask, shape, shape_name="logprobs_old")
    raise_if_nonfinite(
        (logprobs_old.detach(), valid, "logprobs_old"), (logprobs_rollout.detach(), valid, "logprobs_rollout")
    )
    dtype = torch.promote_types(compute_dtype(logprobs_old.dtype), compute_dtype(logprobs_rollout.dtype))
    zero = torch.zeros((), dtype=dtype, device=logprobs_old.device)
    # torch.where before the subtraction: masked positions may hold -inf or NaN.
    log_ratio = torch.where(valid, logprobs_old.detach().to(dtype), zero) - torch.where(
        valid, logprobs_rollout.detach().to(dtype), zero
    )
    if level == "sequence":
        log_ratio, valid = log_ratio.sum(dim=-1), valid.any(dim=-1)
    return log_ratio.clamp(max=LOG_RATIO_BOUND), valid


@torch.no_grad()
def rollout_correction_weights(
    logprobs_old: torch.Tensor,
    logprobs_rollout: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str,
    clip: float,
) -> torch.Tensor:
    """Per-token truncated importance weights ``[B, S]`` (float32, detached, 0 outside ``mask``).

    ``logprobs_old`` (the trainer's recompute), ``logprobs_rollout`` (the engine's) and ``mask`` (bool or 0/1)
    are ``[B, S]`` in the actor's alignment. ``level="token"``: ``min(exp(old_t - rollout_t), clip)`` per valid
    token; ``level="sequence"``: every valid token of a row gets ``min(exp(sum_t (old_t - rollout_t)), clip)``
    over the row's valid tokens. ``clip``: ``algorithm.rollout_correction_clip`` (finite, >= 1). Computed in
    float32 or wider from the log-ratio, capped at ``+LOG_RATIO_BOUND`` before ``exp``.
    """
    clip = _check_args(level, clip)
    log_ratio, valid_units = _unit_log_ratios(logprobs_old, logprobs_rollout, mask, level)
    # min(exp(x), C) = exp(min(x, log C)): the truncation in log space.
    weights = log_ratio.clamp(max=math.log(clip)).exp()
    weights = torch.where(valid_units, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
    if level == "sequence":
        valid = as_valid_mask(mask, shape_of(logprobs_old), shape_name="logprobs_old")
        weights = torch.where(valid, weights.unsqueeze(-1), torch.zeros((), dtype=weights.dtype, device=weights.device))
    return weights.to(torch.float32)


@dataclass(frozen=True)
class RolloutCorrectionSums:
    """This rank's sums of the correction's statistics, 0-dim float64 tensors (no device sync to build them).

    A *unit* is what one weight belongs to: a valid token (token level) or a sequence with at least one valid
    token (sequence level). ``ratio`` is a unit's untruncated importance ratio ``pi_old / pi_rollout`` (of the
    token, or the product over the sequence's tokens), capped only at ``exp(LOG_RATIO_BOUND)`` to stay finite;
    ``weight = min(ratio, clip)`` is what the loss applies.

    * ``units``: number of units (tokens or sequences)
    * ``ratio_sum``: ``sum ratio`` (before truncation)
    * ``weight_sum``: ``sum weight`` (after truncation)
    * ``weight_sq_sum``: ``sum weight^2``
    * ``truncated``: number of units with ``ratio > clip``
    * ``ratio_max``: ``max ratio`` (0 without units: ratios are >= 0)

    Shares of several data-parallel ranks (or micro-batches) combine exactly with :meth:`combine` (``+``):
    every field adds, but ``ratio_max``, which takes the maximum. :meth:`summary` gives the logged values.
    """

    units: torch.Tensor
    ratio_sum: torch.Tensor
    weight_sum: torch.Tensor
    weight_sq_sum: torch.Tensor
    truncated: torch.Tensor
    ratio_max: torch.Tensor

    def __add__(self, other: "RolloutCorrectionSums") -> "RolloutCorrectionSums":
        if not isinstance(other, RolloutCorrectionSums):
            return NotImplemented
        values = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name).to(getattr(self, f.name).device)
            values[f.name] = torch.maximum(mine, theirs) if f.name == "ratio_max" else mine + theirs
        return RolloutCorrectionSums(**values)

    @classmethod
    def combine(cls, parts: Sequence["RolloutCorrectionSums"]) -> "RolloutCorrectionSums":
        """The sums of all ``parts`` (data-parallel shares, micro-batches) together."""
        if len(parts) == 0:
            raise ValueError("RolloutCorrectionSums.combine needs at least one part")
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def summary(self) -> Mapping[str, float]:
        """The logged values (``rollout_correction/<name>``), over the units of these sums:

        * ``weight_mean``: ``weight_sum / units``, the mean weight the loss applies
        * ``weight_max``: ``ratio_max``, the largest ratio before truncation (compare with the clip)
        * ``truncated_frac``: ``truncated / units``
        * ``ess``: ``weight_sum^2 / (units * weight_sq_sum)``, the effective sample size as a fraction of the
          units (1 when every weight is equal, ``1/n`` when one unit carries all the weight)
        * ``ratio_mean``: ``ratio_sum / units``, the mean ratio before truncation (1 in expectation when the
          rollout policy sampled the tokens; far from 1: a large mismatch)

        Without units every value is 0 but ``ess``, which is 1 (no weighting happened).
        """
        units = float(self.units)
        if units == 0:
            return {"weight_mean": 0.0, "weight_max": 0.0, "truncated_frac": 0.0, "ess": 1.0, "ratio_mean": 0.0}
        weight_sum, weight_sq_sum = float(self.weight_sum), float(self.weight_sq_sum)
        return {
            "weight_mean": weight_sum / units,
            "weight_max": float(self.ratio_max),
            "truncated_frac": float(self.truncated) / units,
            # All weights 0 (every ratio underflowed): nothing carries weight, so no effective sample.
            "ess": weight_sum * weight_sum / (units * weight_sq_sum) if weight_sq_sum > 0 else 0.0,
            "ratio_mean": float(self.ratio_sum) / units,
        }


@torch.no_grad()
def rollout_correction_sums(
    logprobs_old: torch.Tensor,
    logprobs_rollout: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str,
    clip: float,
) -> RolloutCorrectionSums:
    """This rank's :class:`RolloutCorrectionSums` for the weights :func:`rollout_correction_weights` gives on
    the same arguments (units: tokens at ``level="token"``, sequences at ``level="sequence"``)."""
    clip = _check_args(level, clip)
    log_ratio, valid = _unit_log_ratios(logprobs_old, logprobs_rollout, mask, level)
    log_ratio = log_ratio.to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=log_ratio.device)
    ratio = torch.where(valid, log_ratio.exp(), zero)
    weight = torch.where(valid, log_ratio.clamp(max=math.log(clip)).exp(), zero)
    return RolloutCorrectionSums(
        units=valid.sum().to(torch.float64),
        ratio_sum=ratio.sum(),
        weight_sum=weight.sum(),
        weight_sq_sum=weight.square().sum(),
        truncated=((ratio > clip) & valid).sum().to(torch.float64),
        ratio_max=ratio.amax() if ratio.numel() else zero,
    )
