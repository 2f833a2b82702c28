"""SAPO: Soft Adaptive Policy Optimization (Gao et al., arXiv 2511.20347).

The objective replaces PPO's hard clip with a smooth gate of the token ratio ``r = exp(logprobs - logprobs_old)``::

    J = E[ 1/G sum_i 1/|y_i| sum_t f_it(r_it) A_it ],    f(r) = sigmoid(tau (r - 1)) * 4 / tau,
    tau_it = tau_pos if A_it > 0 else tau_neg.

Its gradient is ``w(r) * r * A * grad log pi`` with ``w = 4 p (1 - p)``, ``p = sigmoid(tau (r - 1))``: the
weight decays smoothly as the token moves off-policy, and ``w(1) = 1`` for every ``tau``, so on-policy SAPO is
exactly the unclipped policy gradient. That is the reason for the ``4 / tau`` factor; without it the step size
would scale with ``tau / 4``. ``tau_neg > tau_pos`` makes negative-advantage updates decay faster, because
pushing a sampled token down raises the logits of many unsampled tokens and spreads instability.
See docs/sapo.md.
"""

from __future__ import annotations

from typing import Optional

import torch

from sapo_megatron.algorithms.inputs import Count, check_positive, prepare_policy_inputs
from sapo_megatron.algorithms.metrics import masked_mean, ratio_metrics, sequence_log_ratio_variance
from sapo_megatron.algorithms.reductions import aggregate_valid, check_aggregate_args


def sapo_gate(ratio: torch.Tensor, tau) -> torch.Tensor:
    """``f(r) = sigmoid(tau (r - 1)) * 4 / tau``; ``tau``: a positive number or a tensor broadcastable to ``ratio``."""
    return torch.sigmoid(tau * (ratio - 1)) * (4 / tau)


def sapo_gate_weight(ratio: torch.Tensor, tau) -> torch.Tensor:
    """``w(r) = 4 p (1 - p)`` with ``p = sigmoid(tau (r - 1))``: ``df/dr``, and the weight on ``r grad log pi``."""
    p = torch.sigmoid(tau * (ratio - 1))
    return 4 * p * (1 - p)


def sapo_loss(
    logprobs: torch.Tensor,
    logprobs_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    reduction: str = "seq_mean_token_mean",
    num_global_tokens: Optional[Count] = None,
    num_global_seqs: Optional[Count] = None,
    norm_length: Optional[float] = None,
    rollout_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SAPO policy loss ``-f(r) A``, aggregated by ``reduction``; returns ``(loss, metrics)``.

    ``logprobs`` (current policy, with grad), ``logprobs_old`` (trainer recompute before the update; treated as a
    constant) and ``mask`` (bool or 0/1) are [batch, seq]; ``advantages`` is [batch] (one per sequence) or
    [batch, seq]. Values at masked-out positions are ignored, NaN included. The log-ratio is clamped to
    +-20 before ``exp`` (see ``_inputs.LOG_RATIO_BOUND``). The loss is computed in float32 or wider.

    ``reduction``, ``num_global_tokens``, ``num_global_seqs`` and ``norm_length`` are those of
    :func:`sapo_megatron.algorithms.aggregate`; with global counts the result is this micro-batch's share of the
    whole-batch loss. Metrics: see :data:`sapo_megatron.algorithms.METRIC_REDUCTIONS`.

    ``rollout_weights`` [batch, seq] (behaviour-policy correction, :mod:`.rollout_correction`): each token's
    term becomes ``-c_t f(r_t) A_t`` with ``c_t`` its weight, a constant (the gradient w.r.t. the token's
    log-prob is ``-c_t w(r_t) r_t A_t``); the metrics are those of the unweighted tokens.
    """
    tau_pos = check_positive(tau_pos, "tau_pos")
    tau_neg = check_positive(tau_neg, "tau_neg")
    num_global_tokens, num_global_seqs, norm_length = check_aggregate_args(
        reduction, num_global_tokens, num_global_seqs, norm_length
    )
    inputs = prepare_policy_inputs(logprobs, logprobs_old, advantages, mask, rollout_weights)
    advantages_tok = inputs.advantages
    # Built in the compute dtype: a float32 1.05 would perturb float64 losses at the 1e-8 level.
    tau = torch.where(advantages_tok > 0, advantages_tok.new_tensor(tau_pos), advantages_tok.new_tensor(tau_neg))
    ratio = inputs.log_ratio.exp()
    gate = sapo_gate(ratio, tau)
    loss = aggregate_valid(
        inputs.weighted(-gate * advantages_tok),
        inputs.valid,
        reduction,
        num_global_tokens=num_global_tokens,
        num_global_seqs=num_global_seqs,
        norm_length=norm_length,
    )
    metrics = _sapo_metrics(inputs.log_ratio, advantages_tok, inputs.valid, gate, tau, tau_pos, tau_neg)
    return loss, metrics


@torch.no_grad()
def _sapo_metrics(log_ratio, advantages_tok, valid, gate, tau, tau_pos, tau_neg) -> dict[str, torch.Tensor]:
    metrics = ratio_metrics(log_ratio, valid)
    ratio = log_ratio.detach().exp()
    weight = sapo_gate_weight(ratio, tau)
    metrics["gate_mean"] = masked_mean(gate.detach(), valid)
    metrics["gate_weight_mean"] = masked_mean(weight, valid)
    metrics["gate_weight_below_half_frac"] = masked_mean((weight < 0.5).to(weight.dtype), valid)
    # The paper's analysis uses one tau per sequence; with per-token advantages the sign of the sequence's
    # mean advantage decides it (for GRPO-style advantages the sign is the same on every token).
    has_tokens = valid.any(dim=-1)
    seq_advantage_sum = torch.where(valid, advantages_tok, 0.0).sum(dim=-1)
    seq_tau = torch.where(seq_advantage_sum > 0, log_ratio.new_tensor(tau_pos), log_ratio.new_tensor(tau_neg))
    seq_var = sequence_log_ratio_variance(log_ratio, valid)
    bound = seq_tau.square() * seq_var / 4
    metrics["log_ratio_seq_var_bound_mean"] = (
        torch.where(has_tokens, bound, 0.0).sum() / metrics["num_seqs"].clamp(min=1)
    )
    return metrics
