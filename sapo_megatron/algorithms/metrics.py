"""Loss diagnostics as 0-dim tensors with a declared cross-micro-batch reduction.

Every policy loss returns ``(loss, metrics)``; ``metrics`` maps a name from :data:`METRIC_REDUCTIONS` to a
detached 0-dim tensor computed over the micro-batch's valid tokens only. Nothing calls ``.item()``, so the
loss never forces a device synchronisation for logging.

How each kind combines micro-batches (and, after an all-gather of the per-rank results, ranks):

* ``"sum"``: add (``num_tokens``, ``num_seqs``: valid tokens and sequences with >= 1 valid token).
* ``"token_mean"``: mean weighted by ``num_tokens``.
* ``"seq_mean"``: mean weighted by ``num_seqs``.
* ``"token_std"``: pooled population standard deviation, using the metric's mean (:data:`STD_MEAN_OF`) and
  ``num_tokens``: ``var = sum_k n_k (std_k^2 + (mean_k - mean)^2) / sum_k n_k``.
* ``"min"`` / ``"max"``: elementwise min / max. A part without valid tokens reports ``+inf`` / ``-inf``,
  the identity of the reduction, so it never hides the true extreme of the other parts.

:func:`reduce_metrics` applies these rules exactly; applying it to already reduced dicts (one per rank) gives
the same result as applying it to all micro-batches at once.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

METRIC_REDUCTIONS: dict[str, str] = {
    "num_tokens": "sum",
    "num_seqs": "sum",
    # r = exp(logprobs - logprobs_old) per valid token
    "ratio_mean": "token_mean",
    "ratio_std": "token_std",
    "ratio_min": "min",
    "ratio_max": "max",
    # Var_i: population variance of log r over the valid tokens of sequence i, averaged over sequences
    "log_ratio_seq_var_mean": "seq_mean",
    # SAPO: f(r) = 4/tau sigmoid(tau (r - 1)); gate weight w = 4 p (1 - p), p = sigmoid(tau (r - 1))
    "gate_mean": "token_mean",
    "gate_weight_mean": "token_mean",
    "gate_weight_below_half_frac": "token_mean",
    # SAPO: tau_i^2 Var_i / 4, the paper's bound on |mean_t w(log r_it) - w(mean_t log r_it)|
    "log_ratio_seq_var_bound_mean": "seq_mean",
    # clip / dual_clip / gspo / cispo: fraction of valid tokens whose update is clipped
    "clip_frac": "token_mean",
    "dual_clip_frac": "token_mean",
    # gspo: the sequence-level ratio s_i = exp(mean_t log r_it)
    "seq_ratio_mean": "seq_mean",
    "seq_ratio_min": "min",
    "seq_ratio_max": "max",
    # regularized_loss
    "kl_mean": "token_mean",
    "entropy_mean": "token_mean",
}

STD_MEAN_OF: dict[str, str] = {"ratio_std": "ratio_mean"}

_WEIGHT_OF_KIND = {"token_mean": "num_tokens", "token_std": "num_tokens", "seq_mean": "num_seqs"}


def _flat_with(values: torch.Tensor, fill: float) -> torch.Tensor:
    # An appended identity element keeps amin/amax defined for an empty batch.
    return torch.cat([values.reshape(-1), values.new_full((1,), fill)])


@torch.no_grad()
def masked_min(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return _flat_with(torch.where(valid, values, values.new_full((), float("inf"))), float("inf")).min()


@torch.no_grad()
def masked_max(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return _flat_with(torch.where(valid, values, values.new_full((), float("-inf"))), float("-inf")).max()


@torch.no_grad()
def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    total = torch.where(valid, values, values.new_zeros(())).sum()
    return total / valid.sum().clamp(min=1).to(values.dtype)


@torch.no_grad()
def sequence_log_ratio_variance(log_ratio: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-sequence population variance of ``log_ratio`` over valid tokens ([batch]; 0 without tokens)."""
    zero = log_ratio.new_zeros(())
    tokens = valid.sum(dim=-1).clamp(min=1).to(log_ratio.dtype)
    seq_mean = torch.where(valid, log_ratio, zero).sum(dim=-1) / tokens
    deviation = torch.where(valid, log_ratio - seq_mean.unsqueeze(-1), zero)
    return deviation.square().sum(dim=-1) / tokens


@torch.no_grad()
def ratio_metrics(log_ratio: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Counts, token-ratio statistics and the mean within-sequence variance of log r (all valid-only)."""
    log_ratio = log_ratio.detach()
    dtype = log_ratio.dtype
    ratio = log_ratio.exp()
    num_tokens = valid.sum().to(dtype)
    has_tokens = valid.any(dim=-1)
    num_seqs = has_tokens.sum().to(dtype)
    ratio_mean = masked_mean(ratio, valid)
    ratio_var = masked_mean((ratio - ratio_mean).square(), valid)
    seq_var = sequence_log_ratio_variance(log_ratio, valid)
    return {
        "num_tokens": num_tokens,
        "num_seqs": num_seqs,
        "ratio_mean": ratio_mean,
        "ratio_std": ratio_var.sqrt(),
        "ratio_min": masked_min(ratio, valid),
        "ratio_max": masked_max(ratio, valid),
        "log_ratio_seq_var_mean": torch.where(has_tokens, seq_var, 0.0).sum() / num_seqs.clamp(min=1),
    }


def reduce_metrics(
    parts: Sequence[Mapping[str, torch.Tensor]],
    reductions: Mapping[str, str] = METRIC_REDUCTIONS,
    *,
    table: str = "METRIC_REDUCTIONS",
) -> dict[str, torch.Tensor]:
    """Combines metric dicts of micro-batches (or of ranks) exactly, by the kinds in ``reductions``
    (:data:`METRIC_REDUCTIONS` by default; ``table`` names it in errors)."""
    if len(parts) == 0:
        raise ValueError("reduce_metrics needs at least one metrics dict")
    keys = list(parts[0])
    for index, part in enumerate(parts):
        if set(part) != set(keys):
            raise ValueError(
                f"metrics dict {index} has keys {sorted(part)} but dict 0 has {sorted(keys)}; "
                f"only dicts from the same loss can be combined"
            )
    unknown = [key for key in keys if key not in reductions]
    if unknown:
        raise ValueError(f"metric(s) {unknown} have no declared reduction; add them to {table}")
    needed = {_WEIGHT_OF_KIND[reductions[key]] for key in keys if reductions[key] in _WEIGHT_OF_KIND}
    missing = sorted(needed - set(keys))
    if missing:
        raise ValueError(f"weighted metrics need the count(s) {missing} in every metrics dict")

    def stacked(key: str) -> torch.Tensor:
        return torch.stack([torch.as_tensor(part[key]).detach().reshape(()) for part in parts])

    out: dict[str, torch.Tensor] = {}
    for key in keys:
        kind = reductions[key]
        values = stacked(key)
        if kind == "sum":
            out[key] = values.sum()
        elif kind == "min":
            out[key] = values.min()
        elif kind == "max":
            out[key] = values.max()
        elif kind in ("token_mean", "seq_mean"):
            weights = stacked(_WEIGHT_OF_KIND[kind]).to(values.dtype)
            out[key] = (weights * values).sum() / weights.sum().clamp(min=1)
        elif kind == "token_std":
            weights = stacked("num_tokens").to(values.dtype)
            means = stacked(STD_MEAN_OF[key]).to(values.dtype)
            total = weights.sum().clamp(min=1)
            pooled_mean = (weights * means).sum() / total
            # Within-part plus between-part variance; no E[x^2] - E[x]^2 cancellation when std << mean.
            pooled_var = (weights * (values.square() + (means - pooled_mean).square())).sum() / total
            out[key] = pooled_var.sqrt()
        else:
            raise AssertionError(f"unhandled metric reduction {kind!r}")
    return out
