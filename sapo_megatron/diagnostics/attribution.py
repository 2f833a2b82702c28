"""Routing-induced ratio variance: how much of the variance of a log-ratio sits on routing-changed tokens.

``values`` is a per-token log-ratio whose two log-probs came from two forward passes, each with its own MoE
routing: ``log r = logprobs - logprobs_old`` (old pass vs update pass) or
``delta = logprobs_old - logprobs_rollout`` (rollout vs old pass). Tokens are grouped by ``c``, the number of
MoE layers whose top-k expert set differs between the two routings
(:func:`sapo_megatron.diagnostics.routing_stats.changed_layer_count`): ``c = 0`` is *stable*, ``c >= 1``
*changed*. Over the ``N`` grouped tokens, with ``m`` the global mean, ``m_g`` and ``n_g`` a group's mean and
count, the law of total variance reads::

    SS_total = sum_t (x_t - m)^2 = SS_within_stable + SS_within_changed + SS_between
    SS_within_g = sum_{t in g} (x_t - m_g)^2,   SS_between = sum_g n_g (m_g - m)^2

and the attribution is ``var_share_changed = SS_changed / SS_total`` with
``SS_changed = sum_{t changed} (x_t - m)^2`` (deviations from the *global* mean; it equals
``SS_within_changed + n_changed (m_changed - m)^2``), next to ``eta2 = SS_between / SS_total``, the fraction
explained by the group means alone.

Exact distributed reduction: :func:`grouped_variance_stats` returns per-group count, sum of ``x``, sum of
``x^2`` (float64) and the sum of squared deviations from each token's own sequence mean. All are sums over
tokens (the last over whole sequences, which micro-batches and data-parallel ranks never split), so adding them
over micro-batches and ranks (:func:`sapo_megatron.diagnostics.routing_stats.sum_statistics` or ``all_reduce(SUM)``)
and then calling :func:`finalize_variance_attribution` gives exactly the whole mini-batch's metrics.
Definitions and how to read them: docs/diagnostics.md.
"""

from __future__ import annotations

from typing import Mapping

import torch

from sapo_megatron.algorithms.inputs import as_valid_mask, check_tensor, raise_if_nonfinite, shape_of
from sapo_megatron.diagnostics.routing_stats import STATS_DTYPE, Routing, _safe_div, changed_layer_count
from sapo_megatron.routing_layout import RoutingRecord

# SS_total below this fraction of sum x^2 is float64 rounding of a constant, not variance: 1e-12 is ~10^4
# ulps, far above the rounding error of sum x^2 - (sum x)^2 / N, and far below any variance that float64
# sums can resolve (|mean| / std < 1e6).
RELATIVE_VARIANCE_FLOOR = 1e-12


@torch.no_grad()
def grouped_variance_stats(
    values: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor, num_groups: int
) -> dict[str, torch.Tensor]:
    """Per-group sufficient statistics of ``values`` over valid tokens, each [num_groups] float64.

    ``values`` [batch, seq] float; ``groups`` [batch, seq] integer in ``[0, num_groups)``, or ``-1`` to leave a
    valid token out (it is only counted in ``num_excluded``). Keys: ``group_count``, ``group_sum`` (sum x),
    ``group_sumsq`` (sum x^2), ``group_seq_ss`` (sum of ``(x_t - mu_i)^2`` with ``mu_i`` the mean of the grouped
    tokens of the token's sequence ``i``), and ``num_excluded`` (0-dim). Pass whole sequences: ``group_seq_ss``
    is additive over sequences, not over pieces of one sequence (context parallelism: gather first).
    """
    values = check_tensor(values, "values")
    groups = check_tensor(groups, "groups")
    if values.dim() != 2:
        raise ValueError(f"values must be [batch, seq], got shape {shape_of(values)}")
    if not values.is_floating_point():
        raise ValueError(f"values must be a floating-point tensor, got dtype {values.dtype}")
    if shape_of(groups) != shape_of(values):
        raise ValueError(
            f"groups has shape {shape_of(groups)} but values has shape {shape_of(values)}; they must match"
        )
    if groups.dtype == torch.bool or groups.is_floating_point() or groups.is_complex():
        raise ValueError(f"groups must hold integer group ids (-1 = left out), got dtype {groups.dtype}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups={num_groups!r}: must be an int >= 1 (group ids are 0 .. num_groups - 1)")
    valid = as_valid_mask(mask, shape_of(values), shape_name="values")
    groups = groups.long()
    out_of_range = int((((groups < -1) | (groups >= num_groups)) & valid).sum())
    if out_of_range:
        raise ValueError(
            f"groups holds {out_of_range} id(s) outside [-1, {num_groups - 1}] at valid positions; use -1 to "
            f"leave a token out or raise num_groups"
        )
    raise_if_nonfinite((values.detach(), valid, "values"))

    included = valid & (groups >= 0)
    # float64 sums: SS = sum x^2 - (sum x)^2 / n must not lose the variance of log-ratios ~1e-3 to rounding.
    x = torch.where(included, values.detach().to(STATS_DTYPE), 0.0)
    weight = included.to(STATS_DTYPE)
    tokens_per_seq = weight.sum(dim=-1, keepdim=True)
    seq_mean = x.sum(dim=-1, keepdim=True) / tokens_per_seq.clamp(min=1)
    seq_deviation = torch.where(included, x - seq_mean, 0.0)
    index = torch.where(included, groups, 0).reshape(-1)

    def per_group(per_token: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(num_groups, dtype=STATS_DTYPE, device=values.device)
        return out.scatter_add_(0, index, per_token.reshape(-1))

    return {
        "group_count": per_group(weight),
        "group_sum": per_group(x),
        "group_sumsq": per_group(x.square()),
        "group_seq_ss": per_group(seq_deviation.square()),
        "num_excluded": (valid & ~included).sum().to(STATS_DTYPE),
    }


@torch.no_grad()
def routing_variance_stats(
    values: torch.Tensor, mask: torch.Tensor, routing_a: Routing, routing_b: Routing
) -> dict[str, torch.Tensor]:
    """:func:`grouped_variance_stats` grouped by the number of changed MoE layers (``layers + 1`` groups).

    ``routing_a`` / ``routing_b`` [batch, seq, layers, topk] (or :class:`RoutingRecord` s of ``batch`` rows) are
    the routings of the two passes that produced the two log-probs of ``values``, aligned with it: the routing
    at the position whose forward pass produced the log-prob. Tokens unrecorded in some layer of either routing
    are left out (``num_excluded``). Records are densified a chunk of rows at a time for the changed-layer
    count only; the sums run over the whole ``values`` at once, so the result is the dense inputs' bit for bit.
    """
    changed = changed_layer_count(routing_a, routing_b, mask)
    values = check_tensor(values, "values")
    if shape_of(values) != shape_of(changed):
        raise ValueError(
            f"values has shape {shape_of(values)} but the routings are for [batch, seq] = {shape_of(changed)}; "
            f"they must describe the same tokens"
        )
    num_layers = routing_a.num_layers if isinstance(routing_a, RoutingRecord) else routing_a.shape[2]
    return grouped_variance_stats(values, changed, mask, num_layers + 1)


def finalize_variance_attribution(stats: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Attribution metrics from (summed) :func:`grouped_variance_stats`; group 0 is *stable*, the rest *changed*.

    Scalars: ``num_tokens``, ``num_excluded``, ``changed_token_frac``; ``mean``, ``var`` (population) of all
    grouped tokens; ``mean_stable``, ``var_stable``, ``mean_changed``, ``var_changed``; ``ss_total``,
    ``ss_stable``, ``ss_changed`` (deviations from the global mean), ``ss_within_stable``,
    ``ss_within_changed``, ``ss_between``; ``var_share_changed = ss_changed / ss_total``,
    ``eta2 = ss_between / ss_total``; ``seq_ss_total``, ``seq_ss_changed`` (deviations from each token's
    sequence mean), ``seq_var_share_changed``, ``within_seq_frac = seq_ss_total / ss_total``;
    ``eta2_by_changed_layers`` (between-group SS over all groups / ss_total). Per group [num_groups]:
    ``count_by_changed_layers``, ``token_share_by_changed_layers``, ``mean_by_changed_layers``,
    ``var_by_changed_layers``, ``var_share_by_changed_layers`` (sums to 1).

    Empty groups give mean and variance 0 (read them with their count). When ``ss_total`` is 0 (or below
    :data:`RELATIVE_VARIANCE_FLOOR` of ``sum x^2``: rounding), there is no variance to attribute and every
    share, ``eta2`` and ``within_seq_frac`` is 0.
    """
    count, total, sumsq, seq_ss = (
        stats[key].to(STATS_DTYPE) for key in ("group_count", "group_sum", "group_sumsq", "group_seq_ss")
    )
    num_tokens = count.sum()
    mean = _safe_div(total.sum(), num_tokens)
    ss_total = (sumsq.sum() - total.sum() * mean).clamp(min=0)
    has_variance = ss_total > RELATIVE_VARIANCE_FLOOR * sumsq.sum()

    def share(ss: torch.Tensor) -> torch.Tensor:
        return torch.where(has_variance, ss / ss_total.clamp(min=1e-300), 0.0)

    def moments(n, s, q):
        """Mean, within-group SS and SS about the global mean of a group (or a pooled set of groups)."""
        group_mean = _safe_div(s, n)
        ss_within = (q - s * group_mean).clamp(min=0)
        ss_global = (q - 2 * mean * s + n * mean.square()).clamp(min=0)
        return group_mean, ss_within, ss_global

    group_mean, group_ss_within, group_ss_global = moments(count, total, sumsq)
    n_s, n_c = count[0], count[1:].sum()
    mean_s, ss_within_s, ss_s = moments(n_s, total[0], sumsq[0])
    mean_c, ss_within_c, ss_c = moments(n_c, total[1:].sum(), sumsq[1:].sum())
    ss_between = n_s * (mean_s - mean).square() + n_c * (mean_c - mean).square()
    ss_between_groups = (count * (group_mean - mean).square()).sum()
    seq_ss_total = seq_ss.sum()
    seq_ss_changed = seq_ss[1:].sum()

    metrics = {
        "num_tokens": num_tokens,
        "num_excluded": stats["num_excluded"].to(STATS_DTYPE),
        "changed_token_frac": _safe_div(n_c, num_tokens),
        "mean": mean,
        "var": _safe_div(ss_total, num_tokens),
        "mean_stable": mean_s,
        "var_stable": _safe_div(ss_within_s, n_s),
        "mean_changed": mean_c,
        "var_changed": _safe_div(ss_within_c, n_c),
        "ss_total": ss_total,
        "ss_stable": ss_s,
        "ss_changed": ss_c,
        "ss_within_stable": ss_within_s,
        "ss_within_changed": ss_within_c,
        "ss_between": ss_between,
        "var_share_changed": share(ss_c),
        "eta2": share(ss_between),
        "seq_ss_total": seq_ss_total,
        "seq_ss_changed": seq_ss_changed,
        "seq_var_share_changed": torch.where(
            has_variance, _safe_div(seq_ss_changed, seq_ss_total), torch.zeros_like(seq_ss_total)
        ),
        "within_seq_frac": share(seq_ss_total),
        "eta2_by_changed_layers": share(ss_between_groups),
        "count_by_changed_layers": count,
        "token_share_by_changed_layers": _safe_div(count, num_tokens),
        "mean_by_changed_layers": group_mean,
        "var_by_changed_layers": _safe_div(group_ss_within, count),
        "var_share_by_changed_layers": share(group_ss_global),
    }
    return {prefix + key: value for key, value in metrics.items()}
