"""Train/rollout log-prob mismatch metrics and importance-ratio quantiles, in pure torch.

The rollout engine (vLLM) and the trainer (Megatron) compute the log-probs of the same sampled tokens with
different kernels, precisions and, for MoE models, possibly different expert routing. With
``delta = logprobs_old - logprobs_rollout = log(pi_old / pi_rollout)`` per valid token, the tokens were
sampled from ``pi_rollout``, so token means are Monte-Carlo estimates of expectations under the rollout
policy (at each position, given the sampled prefix):

* ``mismatch_kl_k3 = mean(exp(delta) - delta - 1)`` estimates ``KL(pi_rollout || pi_old)``: since
  ``E_rollout[exp(delta)] = sum_y pi_old(y) = 1``, ``E_rollout[k3] = E_rollout[-delta]
  = E_rollout[log pi_rollout - log pi_old]``. Every term is >= 0, which makes it the low-variance choice.
* ``mismatch_chi2 = mean((exp(delta) - 1)^2)`` estimates the Pearson divergence
  ``chi^2(pi_old || pi_rollout) = sum_y (pi_old - pi_rollout)^2 / pi_rollout``, which is also the variance
  under the rollout policy of the importance weight ``pi_old / pi_rollout`` (its mean is 1).

Both are unbiased only when ``logprobs_rollout`` are the log-probs of the distribution that was actually
sampled (after temperature / top-p processing) and ``pi_old`` puts no mass outside its support.

Metrics follow :mod:`sapo_megatron.algorithms.metrics`: detached 0-dim tensors over valid tokens only, each
with a declared reduction (:data:`MISMATCH_REDUCTIONS`, the same kinds with the same semantics), combined
exactly over micro-batches and ranks by :func:`reduce_mismatch_metrics`. The names are not in the loss's
``METRIC_REDUCTIONS``, so this module keeps its own table. Quantiles do not combine from parts; see
:func:`ratio_quantiles`. Definitions and how to read them: docs/diagnostics.md.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from sapo_megatron import collectives

from sapo_megatron.algorithms import LOG_RATIO_BOUND
from sapo_megatron.algorithms.inputs import (
    as_valid_mask,
    check_tensor,
    compute_dtype,
    raise_if_nonfinite,
    shape_of,
)
from sapo_megatron.algorithms.metrics import masked_max, masked_mean, reduce_metrics

LN2 = math.log(2.0)
LN5 = math.log(5.0)

MISMATCH_REDUCTIONS: dict[str, str] = {
    "num_tokens": "sum",
    "num_seqs": "sum",
    # delta = logprobs_old - logprobs_rollout per valid token
    "mismatch_mean": "token_mean",
    "mismatch_abs_mean": "token_mean",
    "mismatch_abs_max": "max",
    # k3 estimate of KL(pi_rollout || pi_old), tokens sampled from pi_rollout
    "mismatch_kl_k3": "token_mean",
    # estimate of chi^2(pi_old || pi_rollout) = Var_rollout[pi_old / pi_rollout]
    "mismatch_chi2": "token_mean",
    # pi_old / pi_rollout outside [1/2, 2] and outside [1/5, 5]
    "mismatch_frac_above_ln2": "token_mean",
    "mismatch_frac_above_ln5": "token_mean",
    # mean over sequences of (mean_t logprobs_old - mean_t logprobs_rollout) = log PPL_rollout - log PPL_old
    "mismatch_seq_log_ppl_diff": "seq_mean",
}

DEFAULT_QUANTILES = (0.01, 0.05, 0.5, 0.95, 0.99)


def _check_pair(first, second, mask, first_name: str, second_name: str, *, two_dim: bool):
    first = check_tensor(first, first_name)
    second = check_tensor(second, second_name)
    if two_dim and first.dim() != 2:
        raise ValueError(f"{first_name} must be [batch, seq], got shape {shape_of(first)}")
    for tensor, name in ((first, first_name), (second, second_name)):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if shape_of(second) != shape_of(first):
        raise ValueError(
            f"{second_name} has shape {shape_of(second)} but {first_name} has shape {shape_of(first)}; "
            f"they must match"
        )
    valid = as_valid_mask(mask, shape_of(first), shape_name=first_name)
    raise_if_nonfinite((first.detach(), valid, first_name), (second.detach(), valid, second_name))
    dtype = torch.promote_types(compute_dtype(first.dtype), second.dtype)
    zero = torch.zeros((), dtype=dtype, device=first.device)
    # where() before any arithmetic: masked positions may hold NaN / -inf and must not reach a sum.
    first = torch.where(valid, first.detach().to(dtype), zero)
    second = torch.where(valid, second.detach().to(dtype), zero)
    return first, second, valid


@torch.no_grad()
def mismatch_metrics(
    logprobs_old: torch.Tensor, logprobs_rollout: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Train/rollout mismatch over the valid tokens of a [batch, seq] micro-batch.

    ``delta = logprobs_old - logprobs_rollout``. Keys and reductions: :data:`MISMATCH_REDUCTIONS`. An empty
    micro-batch gives 0 for the means and ``-inf`` for ``mismatch_abs_max`` (the identity of ``max``).
    ``delta`` is clamped to +-``LOG_RATIO_BOUND`` inside ``exp`` only (k3, chi2), so one extreme token cannot
    overflow the mean to inf; ``mismatch_abs_max`` and the other metrics use the unclamped ``delta``.
    """
    logprobs_old, logprobs_rollout, valid = _check_pair(
        logprobs_old, logprobs_rollout, mask, "logprobs_old", "logprobs_rollout", two_dim=True
    )
    dtype = logprobs_old.dtype
    delta = logprobs_old - logprobs_rollout  # 0 at masked positions
    abs_delta = delta.abs()
    clamped = delta.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    # expm1 keeps the digits that exp(d) - 1 would cancel for the typical |d| ~ 1e-3.
    excess = torch.expm1(clamped)
    k3 = excess - clamped
    chi2 = excess.square()

    tokens_per_seq = valid.sum(dim=-1)
    has_tokens = tokens_per_seq > 0
    num_seqs = has_tokens.sum().to(dtype)
    seq_mean_delta = delta.sum(dim=-1) / tokens_per_seq.clamp(min=1).to(dtype)
    return {
        "num_tokens": valid.sum().to(dtype),
        "num_seqs": num_seqs,
        "mismatch_mean": masked_mean(delta, valid),
        "mismatch_abs_mean": masked_mean(abs_delta, valid),
        "mismatch_abs_max": masked_max(abs_delta, valid),
        "mismatch_kl_k3": masked_mean(k3, valid),
        "mismatch_chi2": masked_mean(chi2, valid),
        "mismatch_frac_above_ln2": masked_mean((abs_delta > LN2).to(dtype), valid),
        "mismatch_frac_above_ln5": masked_mean((abs_delta > LN5).to(dtype), valid),
        "mismatch_seq_log_ppl_diff": torch.where(has_tokens, seq_mean_delta, 0.0).sum() / num_seqs.clamp(min=1),
    }


def reduce_mismatch_metrics(parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Combines :func:`mismatch_metrics` dicts of micro-batches (or of ranks) exactly.

    Same rules as :func:`sapo_megatron.algorithms.reduce_metrics`: ``sum`` adds, ``token_mean`` / ``seq_mean``
    weight by ``num_tokens`` / ``num_seqs``, ``max`` takes the maximum. Reducing already reduced dicts (one per
    rank) gives the same result as reducing all micro-batches at once.
    """
    return reduce_metrics(parts, MISMATCH_REDUCTIONS, table="MISMATCH_REDUCTIONS")


def quantile_name(q: float) -> str:
    """``0.01 -> "ratio_p1"``, ``0.5 -> "ratio_p50"``, ``0.999 -> "ratio_p99.9"``."""
    return f"ratio_p{round(100 * q, 6):g}"


@torch.no_grad()
def ratio_quantiles(
    logprobs: torch.Tensor,
    logprobs_old: torch.Tensor,
    mask: torch.Tensor,
    qs: Sequence[float] = DEFAULT_QUANTILES,
    *,
    group: Any = None,
) -> dict[str, torch.Tensor]:
    """Quantiles of ``r = exp(logprobs - logprobs_old)`` over the valid tokens, keyed by :func:`quantile_name`.

    ``group``: a process group whose ranks hold different tokens of one batch (data-parallel shares); the
    quantiles are then those of all their tokens together, exactly (:func:`_order_statistics`), on every rank.

    The definition is the linear interpolation between order statistics of ``torch.quantile`` and NumPy's
    default: with the ``n`` valid ratios sorted, ``h = q (n - 1)``,
    ``Q(q) = r_(floor h) + (h - floor h) (r_(floor h + 1) - r_(floor h))``. The log-ratio is clamped to
    +-``LOG_RATIO_BOUND`` as in the losses. Without valid tokens every quantile is NaN (undefined).

    Tensors may have any shape (all the same): quantiles do not combine from per-micro-batch values, so pass
    the whole mini-batch, e.g. the valid log-probs of all micro-batches concatenated into 1-d tensors with an
    all-true mask. No ``.item()`` or boolean indexing: the computation never waits for the device.
    """
    qs = tuple(qs)
    if len(qs) == 0:
        raise ValueError("qs is empty; pass at least one quantile level in [0, 1], e.g. qs=(0.05, 0.5, 0.95)")
    for q in qs:
        if isinstance(q, bool) or not isinstance(q, Real) or not 0.0 <= q <= 1.0:
            raise ValueError(f"qs holds {q!r}; every quantile level must be a number in [0, 1] (0.05 = p5)")
    names = [quantile_name(q) for q in qs]
    if len(set(names)) != len(names):
        raise ValueError(f"qs={qs} holds duplicate levels ({names}); pass each level once")
    logprobs, logprobs_old, valid = _check_pair(
        logprobs, logprobs_old, mask, "logprobs", "logprobs_old", two_dim=False
    )
    ratio = (logprobs - logprobs_old).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp().reshape(-1)
    # Masked ratios become +inf and sort behind the n valid ones, so indices < n address valid values only.
    ordered = torch.where(valid.reshape(-1), ratio, float("inf")).sort().values
    count = valid.sum()
    distributed = group is not None and dist.is_initialized() and dist.get_world_size(group) > 1
    if distributed:
        count = count.to(torch.int64).cpu()
        collectives.all_reduce(count, group=group)
    levels = torch.tensor(qs, dtype=torch.float64, device=ratio.device)
    position = levels * (count - 1).clamp(min=0).to(torch.float64).to(ratio.device)
    lower = position.floor().long()
    upper = torch.minimum(lower + 1, (count.to(ratio.device) - 1).clamp(min=0))
    frac = (position - lower.to(torch.float64)).to(ratio.dtype)
    if distributed:
        # The needed order statistics of all ranks' tokens, found without moving the tokens.
        found = _order_statistics(ordered[: int(valid.sum())], torch.cat([lower, upper]), int(count), group)
        low_value, high_value = found[: len(qs)], found[len(qs) :]
    else:
        if ordered.numel() == 0:
            ordered = ratio.new_full((1,), float("nan"))
        low_value = ordered.gather(0, lower.clamp(max=ordered.numel() - 1))
        high_value = ordered.gather(0, upper.clamp(max=ordered.numel() - 1))
    values = low_value + frac * (high_value - low_value)
    values = torch.where(count > 0, values, float("nan"))
    return {name: values[index] for index, name in enumerate(names)}


def _order_statistics(local_sorted: torch.Tensor, ranks: torch.Tensor, count: int, group: Any) -> torch.Tensor:
    """The ``ranks``-th smallest (0-based) of the values that the ranks of ``group`` hold together, exactly.

    Each rank holds its values sorted (``local_sorted``: finite and >= 0, as ratios are); ``count`` is the total.
    For non-negative IEEE floats the order of the values is the order of their bit patterns read as integers, so
    a bisection over the bit patterns finds each order statistic: the smallest pattern ``b`` with at least
    ``rank + 1`` values ``<= b`` over all ranks. One all-reduce of a few counts per halving, 32 (float32) or 64
    (float64) halvings: the tokens themselves never move (a mini-batch's are ~10^6 at 30B). NaN without values.
    """
    dtype = local_sorted.dtype
    int_dtype = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
                 torch.bfloat16: torch.int16}[dtype]
    if count == 0:
        return torch.full((len(ranks),), float("nan"), dtype=dtype, device=local_sorted.device)
    bits = local_sorted.contiguous().view(int_dtype).to(torch.int64).cpu()
    targets = ranks.to(torch.int64).cpu().clamp(max=count - 1)
    low = torch.zeros(len(targets), dtype=torch.int64)
    high = torch.full((len(targets),), torch.iinfo(int_dtype).max, dtype=torch.int64)
    while bool((low < high).any()):
        middle = (low + high) // 2
        at_most = torch.searchsorted(bits, middle, right=True).to(torch.int64)
        collectives.all_reduce(at_most, group=group)
        enough = at_most >= targets + 1
        high = torch.where(enough, middle, high)
        low = torch.where(enough, low, middle + 1)
    return low.to(int_dtype).view(dtype).to(local_sorted.device)
