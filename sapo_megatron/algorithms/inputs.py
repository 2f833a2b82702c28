"""Input checks and the masked, overflow-guarded log-ratio shared by every policy loss.

Public: the diagnostics check their tensors with the same functions (``check_tensor``, ``as_valid_mask``,
``compute_dtype``), so that a bad input reads the same error wherever it enters.

Two rules hold for everything built on top of this module:

* Positions outside the mask are replaced with neutral values by ``torch.where`` *before* any arithmetic.
  Multiplying by the mask afterwards is not enough: ``0 * nan`` is ``nan`` in the forward pass, and even a
  ``where`` applied at the end leaks ``nan`` into the gradient, because the backward pass of ``exp`` (or any
  other op) at the padded position multiplies a zero upstream gradient by a ``nan`` local derivative.
* The log-ratio is clamped to ``[-LOG_RATIO_BOUND, LOG_RATIO_BOUND]``. ``exp(20) ~ 4.9e8`` is finite in
  float32 and bfloat16, whereas ``exp(89)`` already overflows float32 and turns the loss into ``inf``/``nan``.
  ``torch.clamp`` passes the gradient through unchanged inside the bound, so ordinary tokens are unaffected;
  a token beyond it gets a zero gradient. For SAPO that is (numerically) the exact gradient anyway: the
  gradient is ``4 p (1 - p) r``, which is below ``1e-8`` once ``|log r| > 20``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Optional, Union

import torch

from sapo_megatron.config import REDUCTIONS

# |log r| above this is treated as the bound itself (and gets no gradient); see the module docstring.
LOG_RATIO_BOUND = 20.0

Count = Union[int, float, torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """bfloat16/float16 log-probs are upcast: ``exp`` of a bf16 log-ratio is off by up to ~0.4%."""
    return torch.promote_types(dtype, torch.float32)


def shape_of(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def check_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not known; use one of {', '.join(REDUCTIONS)}")


def check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r}: must be a finite number > 0")
    return float(value)


def as_valid_mask(
    mask, shape: tuple[int, ...], *, mask_name: str = "mask", shape_name: str = "logprobs"
) -> torch.Tensor:
    """Boolean view of a bool or 0/1 mask of exactly ``shape``."""
    mask = check_tensor(mask, mask_name)
    if shape_of(mask) != shape:
        raise ValueError(
            f"{mask_name} has shape {shape_of(mask)} but {shape_name} has shape {shape}; "
            f"both must be [batch, seq] with the same sizes"
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(f"{mask_name} has unsupported dtype {mask.dtype}; use torch.bool or 0/1 values")
    bad = int(((mask != 0) & (mask != 1)).sum())
    if bad:
        raise ValueError(
            f"{mask_name} must be boolean or hold only 0 and 1; {bad} position(s) hold other values "
            f"(convert with {mask_name} > 0 if it is a weight)"
        )
    return mask != 0


def check_count(value: Optional[Count], name: str) -> Optional[Count]:
    """Global counts may be Python numbers (checked here) or 0-dim tensors (not read, to avoid a device sync)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {shape_of(value)}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name}={value!r}: must be a finite count >= 0 (the number of valid tokens/sequences in the whole "
            f"mini-batch, over all micro-batches and data-parallel ranks)"
        )
    return value


def raise_if_nonfinite(*checks: tuple[torch.Tensor, torch.Tensor, str]) -> None:
    """Each check is ``(values, where, name)``; one device sync for all of them."""
    counts = torch.stack([(~torch.isfinite(values) & where).sum() for values, where, _ in checks]).tolist()
    for bad, (_, _, name) in zip(counts, checks):
        if bad:
            raise ValueError(
                f"{name} has {bad} NaN/inf value(s) at valid (mask=1) positions; non-finite values are only "
                f"allowed where the mask is 0 (check the log-prob computation or the mask alignment)"
            )


@dataclass(frozen=True)
class PolicyInputs:
    """Masked, validated views of a policy-loss batch, all [batch, seq] in the compute dtype.

    Every masked-out position holds 0 (log-ratio, advantage and log-prob alike), so downstream arithmetic is
    finite there and contributes nothing.
    """

    valid: torch.Tensor  # bool
    log_ratio: torch.Tensor  # logprobs - logprobs_old, clamped; carries the gradient of logprobs
    advantages: torch.Tensor  # detached
    logprobs: torch.Tensor  # carries the gradient of logprobs
    # Per-token weights of the policy-gradient term (behaviour-policy correction), detached, 0 where masked;
    # None: unweighted (the loss is computed exactly as without the argument).
    weights: Optional[torch.Tensor] = None

    def weighted(self, per_token: torch.Tensor) -> torch.Tensor:
        """``per_token`` times the weights (a constant factor per token), or ``per_token`` itself without them."""
        return per_token if self.weights is None else per_token * self.weights


def prepare_policy_inputs(logprobs, logprobs_old, advantages, mask, rollout_weights=None) -> PolicyInputs:
    logprobs = check_tensor(logprobs, "logprobs")
    logprobs_old = check_tensor(logprobs_old, "logprobs_old")
    advantages = check_tensor(advantages, "advantages")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [batch, seq], got shape {shape_of(logprobs)}")
    if not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be a floating-point tensor, got dtype {logprobs.dtype}")
    shape = shape_of(logprobs)
    if shape_of(logprobs_old) != shape:
        raise ValueError(
            f"logprobs_old has shape {shape_of(logprobs_old)} but logprobs has shape {shape}; they must match"
        )
    if shape_of(advantages) not in (shape[:1], shape):
        raise ValueError(
            f"advantages has shape {shape_of(advantages)}; expected [batch]={shape[:1]} (one per sequence) "
            f"or [batch, seq]={shape} (one per token)"
        )
    valid = as_valid_mask(mask, shape)

    # A fully masked sequence (batch padding) may carry any per-sequence advantage, NaN included.
    advantage_valid = valid.any(dim=-1) if advantages.dim() == 1 else valid
    raise_if_nonfinite(
        (logprobs.detach(), valid, "logprobs"),
        (logprobs_old.detach(), valid, "logprobs_old"),
        (advantages.detach(), advantage_valid, "advantages"),
    )

    dtype = compute_dtype(logprobs.dtype)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    logprobs_c = torch.where(valid, logprobs.to(dtype), zero)
    # The old policy is a constant of the update, whatever the caller's autograd state.
    logprobs_old_c = torch.where(valid, logprobs_old.detach().to(dtype), zero)
    log_ratio = (logprobs_c - logprobs_old_c).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    adv = advantages.detach().to(dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1).expand(shape)
    adv = torch.where(valid, adv, zero)
    weights = None if rollout_weights is None else _policy_weights(rollout_weights, valid, dtype)
    return PolicyInputs(valid=valid, log_ratio=log_ratio, advantages=adv, logprobs=logprobs_c, weights=weights)


def _policy_weights(rollout_weights, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``rollout_weights`` [batch, seq] checked (finite and >= 0 where valid), detached, in ``dtype``, 0 where
    masked. A negative weight would turn a clipped surrogate's pessimistic bound into an optimistic one."""
    rollout_weights = check_tensor(rollout_weights, "rollout_weights")
    if shape_of(rollout_weights) != shape_of(valid):
        raise ValueError(
            f"rollout_weights has shape {shape_of(rollout_weights)} but logprobs has shape {shape_of(valid)}; "
            f"they must match (one weight per token)"
        )
    if not rollout_weights.is_floating_point():
        raise ValueError(f"rollout_weights must be a floating-point tensor, got dtype {rollout_weights.dtype}")
    weights = rollout_weights.detach()
    # One device sync for both checks; NaN fails ">= 0" as well.
    bad = int((~(torch.isfinite(weights) & (weights >= 0)) & valid).sum())
    if bad:
        raise ValueError(
            f"rollout_weights has {bad} negative or NaN/inf value(s) at valid (mask=1) positions; importance "
            f"weights are finite and >= 0 (see sapo_megatron.algorithms.rollout_correction)"
        )
    weights = weights.to(device=valid.device, dtype=dtype)
    return torch.where(valid, weights, torch.zeros((), dtype=dtype, device=valid.device))
