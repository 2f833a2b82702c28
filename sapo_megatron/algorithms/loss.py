"""The training loss, built once from the algorithm config: the policy loss, then :func:`regularized_loss`.

``TrainingLoss`` is the one object that turns per-token tensors into the loss the actor minimises::

    loss = policy_loss + kl_coef * aggregate(kl(logprobs, logprobs_ref)) - entropy_coef * aggregate(entropy)

with every term aggregated by the policy loss's reduction and the same global counts (so each micro-batch's
value is its exact share of the whole-batch loss). With ``rollout_weights`` (the behaviour-policy correction,
:mod:`.rollout_correction`) each token's policy-loss term is multiplied by its weight; the KL and entropy terms
are not. The actor's pipeline loss function calls it on each micro-batch; the pure-torch tests call the same
object on whole batches. Nothing else computes KL or entropy terms.

Its result is typed (:class:`LossOutput`): ``loss`` (with gradient), ``metrics`` (detached, each with a
declared reduction in :data:`METRIC_REDUCTIONS`) and ``shares``: detached terms that add up over micro-batches
and data-parallel ranks to the whole-batch terms, ``pg_loss``, ``kl_loss`` (when ``logprobs_ref`` is given),
``entropy_loss`` (when ``entropy`` is given) and ``loss``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Callable, Optional

import torch

from sapo_megatron.algorithms.inputs import Count, check_reduction
from sapo_megatron.algorithms.policy_losses import PolicyLoss, policy_loss_from_config
from sapo_megatron.algorithms.regularizers import regularized_loss
from sapo_megatron.config import KL_ESTIMATORS, AlgorithmConfig


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    shares: dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainingLoss:
    """A policy loss plus the KL-to-reference and entropy terms, with one reduction for all of them.

    ``policy_loss`` has the algorithm core's contract ``(logprobs, logprobs_old, advantages, mask, *,
    num_global_tokens, num_global_seqs) -> (loss, metrics)``. ``reduction`` and ``norm_length`` are the ones
    the policy loss aggregates with (a :class:`PolicyLoss` carries them: :meth:`of` reads them from it, so the
    value lives in one place).
    """

    policy_loss: Callable
    reduction: str
    norm_length: Optional[float] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0

    def __post_init__(self):
        check_reduction(self.reduction)
        for name in ("kl_coef", "entropy_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r}: must be a finite number")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef={self.kl_coef!r}: must be >= 0 (0 disables the KL penalty)")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r} is not known; use one of {', '.join(KL_ESTIMATORS)}")

    @classmethod
    def of(cls, policy_loss: PolicyLoss, **regularizers) -> "TrainingLoss":
        """``policy_loss`` with its own reduction; ``regularizers``: ``kl_coef``, ``kl_estimator``, ``entropy_coef``."""
        return cls(policy_loss, reduction=policy_loss.reduction, norm_length=policy_loss.norm_length, **regularizers)

    @property
    def needs_reference(self) -> bool:
        """The batch must carry ``logprobs_ref`` (the reference policy's log-probs)."""
        return self.kl_coef > 0

    @property
    def needs_entropy(self) -> bool:
        """The caller must compute the per-token entropy of the current policy."""
        return self.entropy_coef != 0

    def __call__(
        self,
        logprobs: torch.Tensor,
        logprobs_old: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        logprobs_ref: Optional[torch.Tensor] = None,
        entropy: Optional[torch.Tensor] = None,
        num_global_tokens: Optional[Count] = None,
        num_global_seqs: Optional[Count] = None,
        rollout_weights: Optional[torch.Tensor] = None,
    ) -> LossOutput:
        """The loss on [batch, seq] tensors. ``logprobs_ref`` is required when ``kl_coef > 0`` and ``entropy``
        when ``entropy_coef != 0``; given with a zero coefficient they are only reported (``kl_mean``,
        ``kl_loss``; ``entropy_mean``, ``entropy_loss``).

        ``rollout_weights`` [batch, seq]: the behaviour-policy correction's per-token weights
        (:func:`~sapo_megatron.algorithms.rollout_correction.rollout_correction_weights`). They multiply each
        token's policy-gradient term only (the policy loss must accept ``rollout_weights=``, as every
        :class:`PolicyLoss` does); the KL and entropy terms are not weighted. ``None`` calls the policy loss
        without the argument."""
        counts = dict(num_global_tokens=num_global_tokens, num_global_seqs=num_global_seqs)
        if rollout_weights is None:
            pg_loss, metrics = self.policy_loss(logprobs, logprobs_old, advantages, mask, **counts)
        else:
            pg_loss, metrics = self.policy_loss(
                logprobs, logprobs_old, advantages, mask, rollout_weights=rollout_weights, **counts
            )
        total = regularized_loss(
            pg_loss,
            logprobs,
            mask,
            reduction=self.reduction,
            norm_length=self.norm_length,
            logprobs_ref=logprobs_ref,
            kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator,
            entropy=entropy,
            entropy_coef=self.entropy_coef,
            **counts,
        )
        # The policy loss's own counts win where both report one (they agree on any finite batch).
        metrics = {**total.metrics, **metrics}
        shares = {"pg_loss": pg_loss.detach().reshape(())}
        if total.kl_loss is not None:
            shares["kl_loss"] = total.kl_loss.detach()
        if total.entropy_loss is not None:
            shares["entropy_loss"] = total.entropy_loss.detach()
        shares["loss"] = total.loss.detach()
        return LossOutput(loss=total.loss, metrics=metrics, shares=shares)


def training_loss_from_config(cfg: AlgorithmConfig, *, max_response_length: Optional[int] = None) -> TrainingLoss:
    """The configured policy loss (:func:`policy_loss_from_config`) with ``cfg``'s KL and entropy terms."""
    return TrainingLoss.of(
        policy_loss_from_config(cfg, max_response_length=max_response_length),
        kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator,
        entropy_coef=cfg.entropy_coef,
    )
