"""Optional KL-to-reference penalty and entropy bonus, added to a policy loss with the same reduction.

Both are off by default (``algorithm.kl_coef = 0``, ``algorithm.entropy_coef = 0``), as in the SAPO paper.
The full objective the trainer minimises is::

    loss = policy_loss + kl_coef * aggregate(kl) - entropy_coef * aggregate(entropy)

where ``aggregate`` uses the policy loss's reduction and the *same* global counts, so every term is a
micro-batch's exact share of the whole-batch term and the sum stays invariant to micro-batching.
:func:`regularized_loss` does exactly that; :class:`sapo_megatron.algorithms.loss.TrainingLoss` binds it to
the policy loss and the config, and is what the actor's pipeline loss function calls.

KL estimators of ``KL(pi || pi_ref)`` per token, from samples of ``pi`` (Schulman, "Approximating KL
divergence", 2020: samples ``x ~ q`` with ``q = pi``, ``p = pi_ref``, ``r = p(x) / q(x)``), with
``d = log r = logprobs_ref - logprobs``:

* ``k1 = -d``                     (= ``logprobs - logprobs_ref``; unbiased, can be negative)
* ``k2 = d^2 / 2``                (biased, low variance)
* ``k3 = exp(d) - d - 1``         (= ``(r - 1) - log r``; unbiased, always >= 0; the GRPO default)

Their gradients w.r.t. ``logprobs`` (the reference is a constant): ``1``, ``logprobs - logprobs_ref`` and
``1 - exp(d)``. Used as a loss on samples of ``pi`` itself, the expected gradient of ``k1`` is 0, that of
``k2`` is the gradient of ``KL(pi || pi_ref)``, and that of ``k3`` the gradient of the reverse
``KL(pi_ref || pi)`` (Tang & Munos, "On a few pitfalls in KL divergence gradient estimation for RL", 2025):
the estimators agree in value, not in gradient. All three are offered, as in other RL trainers; ``k3`` is
the default (GRPO's).

``d`` is clamped to +-20 for ``k3`` (``exp`` overflow guard, as for the policy ratio); beyond the bound the
token's KL gradient is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Optional

import torch

from sapo_megatron.algorithms.inputs import (
    LOG_RATIO_BOUND,
    Count,
    as_valid_mask,
    check_tensor,
    compute_dtype,
    raise_if_nonfinite,
    shape_of,
)
from sapo_megatron.algorithms.metrics import masked_mean
from sapo_megatron.algorithms.reductions import aggregate_valid, check_aggregate_args
from sapo_megatron.config import KL_ESTIMATORS


def kl_penalty(
    logprobs: torch.Tensor,
    logprobs_ref: torch.Tensor,
    estimator: str = "k3",
    *,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token KL estimate [batch, seq] of the current policy to the reference; 0 where ``mask`` is 0.

    Without ``mask`` every position must be finite; with it, masked-out positions are ignored (NaN included)
    and never leak NaN into the gradient.
    """
    logprobs = check_tensor(logprobs, "logprobs")
    logprobs_ref = check_tensor(logprobs_ref, "logprobs_ref")
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not known; use one of {', '.join(KL_ESTIMATORS)}")
    if not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be a floating-point tensor, got dtype {logprobs.dtype}")
    if shape_of(logprobs_ref) != shape_of(logprobs):
        raise ValueError(
            f"logprobs_ref has shape {shape_of(logprobs_ref)} but logprobs has shape {shape_of(logprobs)}; "
            f"they must match"
        )
    if mask is None:
        valid = torch.ones_like(logprobs, dtype=torch.bool)
    else:
        valid = as_valid_mask(mask, shape_of(logprobs))
    raise_if_nonfinite((logprobs.detach(), valid, "logprobs"), (logprobs_ref.detach(), valid, "logprobs_ref"))
    dtype = compute_dtype(logprobs.dtype)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    # The reference model is frozen: no gradient flows into it.
    delta = torch.where(valid, logprobs_ref.detach().to(dtype), zero) - torch.where(valid, logprobs.to(dtype), zero)
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta.square()
    delta = delta.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return delta.exp() - delta - 1


@dataclass(frozen=True)
class RegularizedLoss:
    """What :func:`regularized_loss` returns. It unpacks as ``(loss, metrics)``, the contract of every policy
    loss; the two terms are there for reporting (a micro-batch's share of each, like ``loss``).

    ``kl_loss`` is ``aggregate(kl)`` (before ``kl_coef``), present when ``logprobs_ref`` was given;
    ``entropy_loss`` is ``aggregate(entropy)`` (before ``entropy_coef``), present when ``entropy`` was given.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    kl_loss: Optional[torch.Tensor] = None
    entropy_loss: Optional[torch.Tensor] = None

    def __iter__(self):
        return iter((self.loss, self.metrics))


def regularized_loss(
    policy_loss: torch.Tensor,
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    reduction: str,
    logprobs_ref: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    num_global_tokens: Optional[Count] = None,
    num_global_seqs: Optional[Count] = None,
    norm_length: Optional[float] = None,
) -> RegularizedLoss:
    """``policy_loss + kl_coef * aggregate(kl) - entropy_coef * aggregate(entropy)``; returns a
    :class:`RegularizedLoss`, which unpacks as ``(loss, metrics)``.

    Pass the policy loss's reduction and global counts. ``logprobs_ref`` is needed when ``kl_coef > 0`` and
    ``entropy`` (per-token entropy of the current policy, [batch, seq], with grad) when ``entropy_coef != 0``;
    when given with a zero coefficient they are only reported. Metrics: ``kl_mean`` / ``entropy_mean`` (token
    means over valid positions) with ``num_tokens`` / ``num_seqs`` for :func:`reduce_metrics`.
    """
    policy_loss = check_tensor(policy_loss, "policy_loss")
    if policy_loss.numel() != 1:
        raise ValueError(f"policy_loss must be a scalar loss, got shape {shape_of(policy_loss)}")
    logprobs = check_tensor(logprobs, "logprobs")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [batch, seq], got shape {shape_of(logprobs)}")
    valid = as_valid_mask(mask, shape_of(logprobs))
    counts = check_aggregate_args(reduction, num_global_tokens, num_global_seqs, norm_length)
    for name, value in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r}: must be a finite number")
    if kl_coef < 0:
        raise ValueError(f"kl_coef={kl_coef!r}: must be >= 0 (0 disables the KL penalty)")
    if kl_coef > 0 and logprobs_ref is None:
        raise ValueError("kl_coef > 0 needs logprobs_ref (the reference policy's log-probs of the same tokens)")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy (per-token entropy of the current policy, [batch, seq])")

    def share(values: torch.Tensor) -> torch.Tensor:
        return aggregate_valid(
            values, valid, reduction, num_global_tokens=counts[0], num_global_seqs=counts[1], norm_length=counts[2]
        )

    loss = policy_loss.reshape(())
    dtype = compute_dtype(logprobs.dtype)
    metrics: dict[str, torch.Tensor] = {
        "num_tokens": valid.sum().to(dtype),
        "num_seqs": valid.any(dim=-1).sum().to(dtype),
    }
    kl_loss = entropy_loss = None
    if logprobs_ref is not None:
        kl = kl_penalty(logprobs, logprobs_ref, kl_estimator, mask=valid)
        kl_loss = share(kl)
        if kl_coef > 0:
            loss = loss + kl_coef * kl_loss
        metrics["kl_mean"] = masked_mean(kl.detach(), valid)
    if entropy is not None:
        entropy = check_tensor(entropy, "entropy")
        if shape_of(entropy) != shape_of(logprobs):
            raise ValueError(
                f"entropy has shape {shape_of(entropy)} but logprobs has shape {shape_of(logprobs)}; they must match"
            )
        raise_if_nonfinite((entropy.detach(), valid, "entropy"))
        entropy_c = torch.where(valid, entropy.to(compute_dtype(entropy.dtype)), 0.0)
        entropy_loss = share(entropy_c)
        if entropy_coef != 0:
            loss = loss - entropy_coef * entropy_loss
        metrics["entropy_mean"] = masked_mean(entropy_c.detach(), valid)
    return RegularizedLoss(loss=loss, metrics=metrics, kl_loss=kl_loss, entropy_loss=entropy_loss)
