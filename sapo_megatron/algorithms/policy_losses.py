"""Policy losses behind one contract, and the registry that binds them to the config.

Every loss is called as::

    loss, metrics = fn(logprobs, logprobs_old, advantages, mask, *, <its hyperparameters>,
                       reduction="seq_mean_token_mean", num_global_tokens=None, num_global_seqs=None,
                       norm_length=None, rollout_weights=None)

with [batch, seq] ``logprobs`` (current policy), ``logprobs_old`` (trainer recompute before the update) and
``mask``; ``advantages`` [batch] or [batch, seq]. Input handling (masking with ``torch.where``, the +-20
log-ratio guard, NaN checks), the reductions and the metrics are shared, so the losses differ only in the
per-token surrogate. The loss is minimised; ``ratio = exp(logprobs - logprobs_old)``.

``rollout_weights`` [batch, seq] (optional; finite, >= 0 where valid) multiplies each token's surrogate before
the reduction: the behaviour-policy correction's truncated importance weights
(:mod:`.rollout_correction`), constants of the update, so each token's gradient is scaled by its weight. The
reduction's denominators do not change. Without them (``None``) the loss is computed exactly as before.

* ``sapo``: ``-f(r) A`` with the soft gate ``f(r) = 4/tau sigmoid(tau (r - 1))`` (:mod:`.sapo`).
* ``clip``: PPO/GRPO ``max(-r A, -clip(r, 1 - eps_low, 1 + eps_high) A)``; ``eps_high > eps_low`` is DAPO's
  clip-higher.
* ``dual_clip``: ``clip``, and for ``A < 0`` the loss is also capped at ``-c A`` (Ye et al. 2020), so a token
  whose ratio exploded (``r > c``) stops contributing gradient instead of growing without bound.
* ``gspo``: the sequence ratio ``s_i = exp(mean_t log r_it)`` in GSPO-token's form
  ``s_it = sg[s_i] * pi_it / sg[pi_it]``, clipped to ``[1 - eps_low, 1 + eps_high]``. Each token's gradient is
  ``s_i A_it grad log pi_it``; with ``seq_mean_token_mean`` and per-sequence advantages this is GSPO exactly.
* ``cispo``: REINFORCE weighted by the detached, clipped ratio: ``-sg[clip(r, 1 - eps_low, 1 + eps_high)] A
  log pi``. No token's gradient is dropped, only its weight is truncated. The loss *value* contains
  ``log pi`` and is not comparable to the other losses; only its gradient is meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from sapo_megatron.algorithms.inputs import Count, check_positive, prepare_policy_inputs
from sapo_megatron.algorithms.metrics import masked_max, masked_mean, masked_min, ratio_metrics
from sapo_megatron.algorithms.reductions import aggregate_valid, check_aggregate_args
from sapo_megatron.algorithms.sapo import sapo_loss
from sapo_megatron.config import POLICY_LOSSES, AlgorithmConfig

LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]


def _check_eps_low_below_one(eps_low: float) -> float:
    eps_low = check_positive(eps_low, "eps_low")
    if eps_low >= 1:
        raise ValueError(f"eps_low={eps_low!r}: must be < 1 so that the lower clip bound 1 - eps_low stays > 0")
    return eps_low


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate (as a loss) and where the clipped branch is the active one."""
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    # Explicit selection (not torch.maximum) so a tie routes the whole gradient through the unclipped branch.
    clip_active = clipped > unclipped
    return torch.where(clip_active, clipped, unclipped), clip_active


def _finish(per_token, inputs, reduction, num_global_tokens, num_global_seqs, norm_length) -> torch.Tensor:
    return aggregate_valid(
        inputs.weighted(per_token),
        inputs.valid,
        reduction,
        num_global_tokens=num_global_tokens,
        num_global_seqs=num_global_seqs,
        norm_length=norm_length,
    )


def clip_loss(
    logprobs: torch.Tensor,
    logprobs_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    reduction: str = "seq_mean_token_mean",
    num_global_tokens: Optional[Count] = None,
    num_global_seqs: Optional[Count] = None,
    norm_length: Optional[float] = None,
    rollout_weights: Optional[torch.Tensor] = None,
) -> LossOutput:
    """PPO/GRPO clipped surrogate with an asymmetric band ``[1 - eps_low, 1 + eps_high]``."""
    eps_low = _check_eps_low_below_one(eps_low)
    eps_high = check_positive(eps_high, "eps_high")
    counts = check_aggregate_args(reduction, num_global_tokens, num_global_seqs, norm_length)
    inputs = prepare_policy_inputs(logprobs, logprobs_old, advantages, mask, rollout_weights)
    ratio = inputs.log_ratio.exp()
    per_token, clip_active = _clipped_surrogate(ratio, inputs.advantages, eps_low, eps_high)
    loss = _finish(per_token, inputs, reduction, *counts)
    with torch.no_grad():
        metrics = ratio_metrics(inputs.log_ratio, inputs.valid)
        metrics["clip_frac"] = masked_mean(clip_active.to(ratio.dtype), inputs.valid)
    return loss, metrics


def dual_clip_loss(
    logprobs: torch.Tensor,
    logprobs_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float = 3.0,
    reduction: str = "seq_mean_token_mean",
    num_global_tokens: Optional[Count] = None,
    num_global_seqs: Optional[Count] = None,
    norm_length: Optional[float] = None,
    rollout_weights: Optional[torch.Tensor] = None,
) -> LossOutput:
    """:func:`clip_loss`, with the loss of negative-advantage tokens capped at ``-dual_clip_c * A``."""
    eps_low = _check_eps_low_below_one(eps_low)
    eps_high = check_positive(eps_high, "eps_high")
    dual_clip_c = check_positive(dual_clip_c, "dual_clip_c")
    if dual_clip_c <= 1:
        raise ValueError(f"dual_clip_c={dual_clip_c!r}: dual-clip needs a constant c > 1 (3 is customary)")
    counts = check_aggregate_args(reduction, num_global_tokens, num_global_seqs, norm_length)
    inputs = prepare_policy_inputs(logprobs, logprobs_old, advantages, mask, rollout_weights)
    ratio = inputs.log_ratio.exp()
    advantages_tok = inputs.advantages
    clipped_loss, clip_active = _clipped_surrogate(ratio, advantages_tok, eps_low, eps_high)
    cap = -dual_clip_c * advantages_tok
    dual_active = (advantages_tok < 0) & (clipped_loss > cap)
    per_token = torch.where(dual_active, cap, clipped_loss)
    loss = _finish(per_token, inputs, reduction, *counts)
    with torch.no_grad():
        metrics = ratio_metrics(inputs.log_ratio, inputs.valid)
        metrics["clip_frac"] = masked_mean(clip_active.to(ratio.dtype), inputs.valid)
        metrics["dual_clip_frac"] = masked_mean(dual_active.to(ratio.dtype), inputs.valid)
    return loss, metrics


def gspo_loss(
    logprobs: torch.Tensor,
    logprobs_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    reduction: str = "seq_mean_token_mean",
    num_global_tokens: Optional[Count] = None,
    num_global_seqs: Optional[Count] = None,
    norm_length: Optional[float] = None,
    rollout_weights: Optional[torch.Tensor] = None,
) -> LossOutput:
    """GSPO (token form): clipped surrogate on ``s_it = sg[exp(mean_t log r_it)] * pi_it / sg[pi_it]``."""
    eps_low = check_positive(eps_low, "eps_low")
    eps_high = check_positive(eps_high, "eps_high")
    counts = check_aggregate_args(reduction, num_global_tokens, num_global_seqs, norm_length)
    inputs = prepare_policy_inputs(logprobs, logprobs_old, advantages, mask, rollout_weights)
    tokens_per_seq = inputs.valid.sum(dim=-1).clamp(min=1).to(inputs.log_ratio.dtype)
    # Mean of the already clamped token log-ratios, so the sequence log-ratio is inside +-20 as well.
    seq_log_ratio = inputs.log_ratio.detach().sum(dim=-1) / tokens_per_seq
    seq_ratio = seq_log_ratio.exp()
    # Equal to s_i in value; its derivative w.r.t. logprobs_it is s_i (token t only).
    token_ratio = seq_ratio.unsqueeze(-1) * torch.exp(inputs.logprobs - inputs.logprobs.detach())
    per_token, clip_active = _clipped_surrogate(token_ratio, inputs.advantages, eps_low, eps_high)
    loss = _finish(per_token, inputs, reduction, *counts)
    with torch.no_grad():
        metrics = ratio_metrics(inputs.log_ratio, inputs.valid)
        metrics["clip_frac"] = masked_mean(clip_active.to(seq_ratio.dtype), inputs.valid)
        has_tokens = inputs.valid.any(dim=-1)
        metrics["seq_ratio_mean"] = masked_mean(seq_ratio, has_tokens)
        metrics["seq_ratio_min"] = masked_min(seq_ratio, has_tokens)
        metrics["seq_ratio_max"] = masked_max(seq_ratio, has_tokens)
    return loss, metrics


def cispo_loss(
    logprobs: torch.Tensor,
    logprobs_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 1.0e6,
    eps_high: float = 0.28,
    reduction: str = "seq_mean_token_mean",
    num_global_tokens: Optional[Count] = None,
    num_global_seqs: Optional[Count] = None,
    norm_length: Optional[float] = None,
    rollout_weights: Optional[torch.Tensor] = None,
) -> LossOutput:
    """CISPO: ``-sg[clip(r, 1 - eps_low, 1 + eps_high)] * A * logprobs`` (MiniMax-M1)."""
    eps_low = check_positive(eps_low, "eps_low")
    eps_high = check_positive(eps_high, "eps_high")
    counts = check_aggregate_args(reduction, num_global_tokens, num_global_seqs, norm_length)
    inputs = prepare_policy_inputs(logprobs, logprobs_old, advantages, mask, rollout_weights)
    ratio = inputs.log_ratio.detach().exp()
    weight = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -weight * inputs.advantages * inputs.logprobs
    loss = _finish(per_token, inputs, reduction, *counts)
    with torch.no_grad():
        metrics = ratio_metrics(inputs.log_ratio, inputs.valid)
        metrics["clip_frac"] = masked_mean((weight != ratio).to(ratio.dtype), inputs.valid)
    return loss, metrics


POLICY_LOSS_FUNCTIONS: dict[str, Callable[..., LossOutput]] = {
    "sapo": sapo_loss,
    "clip": clip_loss,
    "dual_clip": dual_clip_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
}
assert tuple(POLICY_LOSS_FUNCTIONS) == POLICY_LOSSES, "the registry and config.POLICY_LOSSES must agree"


def get_policy_loss(name: str) -> Callable[..., LossOutput]:
    """The loss function registered under ``name`` (unbound: hyperparameters are keyword arguments)."""
    try:
        return POLICY_LOSS_FUNCTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy loss {name!r}; allowed: {', '.join(POLICY_LOSS_FUNCTIONS)}") from None


@dataclass(frozen=True)
class PolicyLoss:
    """A policy loss with its hyperparameters and reduction bound; call it with the batch tensors."""

    name: str
    reduction: str
    hyperparameters: Mapping[str, float] = field(default_factory=dict)
    norm_length: Optional[float] = None

    def __call__(
        self,
        logprobs: torch.Tensor,
        logprobs_old: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        num_global_tokens: Optional[Count] = None,
        num_global_seqs: Optional[Count] = None,
        rollout_weights: Optional[torch.Tensor] = None,
    ) -> LossOutput:
        return get_policy_loss(self.name)(
            logprobs,
            logprobs_old,
            advantages,
            mask,
            reduction=self.reduction,
            num_global_tokens=num_global_tokens,
            num_global_seqs=num_global_seqs,
            norm_length=self.norm_length,
            rollout_weights=rollout_weights,
            **self.hyperparameters,
        )


def _hyperparameters(cfg: AlgorithmConfig) -> dict[str, float]:
    name = cfg.policy_loss
    if name == "sapo":
        return {"tau_pos": cfg.sapo.tau_pos, "tau_neg": cfg.sapo.tau_neg}
    if name == "clip":
        return {"eps_low": cfg.clip.eps_low, "eps_high": cfg.clip.eps_high}
    if name == "dual_clip":
        return {"eps_low": cfg.clip.eps_low, "eps_high": cfg.clip.eps_high, "dual_clip_c": cfg.clip.dual_clip_c}
    if name == "gspo":
        return {"eps_low": cfg.gspo.eps_low, "eps_high": cfg.gspo.eps_high}
    if name == "cispo":
        return {"eps_low": cfg.cispo.eps_low, "eps_high": cfg.cispo.eps_high}
    raise AssertionError(f"policy loss {name!r} has no hyperparameter mapping")


def policy_loss_from_config(cfg: AlgorithmConfig, *, max_response_length: Optional[int] = None) -> PolicyLoss:
    """Binds ``cfg.policy_loss``'s hyperparameters and ``cfg.reduction`` into a :class:`PolicyLoss`.

    For ``seq_mean_token_sum_norm`` the constant normaliser is ``cfg.reduction_norm_length``, or, when that is
    0 ("the maximum response length"), ``max_response_length`` (the trainer passes ``rollout.max_new_tokens``).
    """
    get_policy_loss(cfg.policy_loss)
    cfg.validate("algorithm")
    norm_length = None
    if cfg.reduction == "seq_mean_token_sum_norm":
        norm_length = cfg.reduction_norm_length or max_response_length
        if not norm_length:
            raise ValueError(
                "algorithm.reduction=seq_mean_token_sum_norm with algorithm.reduction_norm_length=0 means "
                "'normalise by the maximum response length': pass max_response_length=... "
                "(rollout.max_new_tokens) or set algorithm.reduction_norm_length > 0"
            )
        norm_length = check_positive(norm_length, "max_response_length")
    return PolicyLoss(
        name=cfg.policy_loss,
        reduction=cfg.reduction,
        hyperparameters=_hyperparameters(cfg),
        norm_length=norm_length,
    )
