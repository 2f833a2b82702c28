"""MoE routing diagnostics: top-k set changes between two routings, expert load, router entropy.

Inputs: ``routing`` is an integer tensor of expert ids ``[batch, seq, layers, topk]`` (the top-k experts of
each token in each MoE layer; the order within the top-k is irrelevant: sets are compared), ``mask`` the
``[batch, seq]`` bool (or 0/1) mask of valid tokens. An id of ``-1`` (:data:`UNRECORDED`) means "no routing
recorded"; a (token, layer) pair with any ``-1`` among its ``topk`` ids is *unrecorded* and takes part in no
statistic. Values at masked positions are ignored, whatever they are.

A routing may also be a :class:`~sapo_megatron.routing_layout.RoutingRecord` of ``batch`` rows (a position it does
not hold is unrecorded). The functions then densify it :data:`DENSE_CHUNK_IDS` ids at a time (whole rows) and add
the chunks' statistics, so memory stays at one chunk whatever the batch. The results are those of the dense
tensors: counts exactly; ``overlap_sum`` adds multiples of ``1 / topk``, exact in float64 when ``topk`` is a
power of two (Qwen3-MoE: 8), else equal up to the summation order's rounding.

Every ``*_stats`` function returns **sufficient statistics**: a dict of float64 tensors that are sums over
tokens (counts, sums), so micro-batches and ranks combine exactly by adding them
(:func:`sum_statistics`, or ``torch.distributed.all_reduce`` with ``SUM`` on each tensor). The matching
``finalize_*`` function turns the summed statistics into metrics. Ratios such as the load imbalance are
non-linear in the counts and are therefore only formed at the end, from the pooled counts; averaging
per-micro-batch ratios would not give the mini-batch's value. float64 counts are exact up to 2**53.

Definitions and how to read them: docs/diagnostics.md.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch

from sapo_megatron.algorithms.inputs import as_valid_mask, check_tensor, compute_dtype, shape_of
from sapo_megatron.routing_layout import UNRECORDED, RoutingRecord, check_routing, distribution_entropy, softmax_entropy

STATS_DTYPE = torch.float64
# Ids densified at once from a RoutingRecord: 2^24 (128 MiB as int64; the checks hold a few such temporaries).
DENSE_CHUNK_IDS = 1 << 24

Routing = Union[torch.Tensor, RoutingRecord]


def row_chunks(mask, *routings: Routing) -> Optional[list[slice]]:
    """Row ranges to densify the :class:`RoutingRecord` among ``routings`` in (``None`` when none is a record:
    dense tensors are used whole). Each range holds at most :data:`DENSE_CHUNK_IDS` ids (one row at least)."""
    records = [r for r in routings if isinstance(r, RoutingRecord)]
    if not records:
        return None
    mask = check_tensor(mask, "mask")
    if mask.dim() != 2:
        raise ValueError(f"mask must be [batch, seq], got shape {shape_of(mask)}")
    rows, width = shape_of(mask)
    for record in records:
        if record.rows != rows:
            raise ValueError(f"a routing record holds {record.rows} rows; mask has {rows}")
    per_row = max(1, width * records[0].num_layers * records[0].topk)
    step = max(1, DENSE_CHUNK_IDS // per_row)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)] or [slice(0, 0)]


def dense_rows(routing: Routing, rows: slice, width: int) -> torch.Tensor:
    """Rows ``rows`` of ``routing`` in the dense layout (a record is densified to ``width`` positions)."""
    if isinstance(routing, RoutingRecord):
        return routing.select(rows).dense(width)
    return check_tensor(routing, "routing")[rows]


def sum_statistics(parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Elementwise sum of sufficient-statistics dicts from the same ``*_stats`` function (micro-batches, ranks)."""
    if len(parts) == 0:
        raise ValueError("sum_statistics needs at least one statistics dict")
    first = parts[0]
    for index, part in enumerate(parts):
        if set(part) != set(first):
            raise ValueError(
                f"statistics dict {index} has keys {sorted(part)} but dict 0 has {sorted(first)}; "
                f"only dicts from the same *_stats function can be summed"
            )
        for key, value in part.items():
            if shape_of(value) != shape_of(first[key]):
                raise ValueError(
                    f"statistics dict {index} has {key} of shape {shape_of(value)} but dict 0 has "
                    f"{shape_of(first[key])}; the layer / expert counts must be the same in every part"
                )
    return {key: torch.stack([part[key] for part in parts]).sum(dim=0) for key in first}


def _check_pair(routing_a, routing_b, mask, name_a: str, name_b: str):
    routing_a = check_tensor(routing_a, name_a)
    routing_b = check_tensor(routing_b, name_b)
    if shape_of(routing_a) != shape_of(routing_b):
        raise ValueError(
            f"{name_b} has shape {shape_of(routing_b)} but {name_a} has shape {shape_of(routing_a)}; both must be "
            f"[batch, seq, layers, topk] for the same tokens, MoE layers and top-k"
        )
    valid, recorded_a = check_routing(routing_a, mask, name=name_a)
    _, recorded_b = check_routing(routing_b, mask, name=name_b)
    return routing_a.long(), routing_b.long(), valid, recorded_a & recorded_b


def _overlap_counts(routing_a: torch.Tensor, routing_b: torch.Tensor) -> torch.Tensor:
    """``|A & B|`` per (token, layer) for sets of distinct ids, [batch, seq, layers]."""
    # One layer at a time keeps the [tokens, topk, topk] comparison small for 48 layers x top-8.
    per_layer = [
        (routing_a[:, :, layer, :, None] == routing_b[:, :, layer, None, :]).any(dim=-1).sum(dim=-1)
        for layer in range(routing_a.shape[2])
    ]
    return torch.stack(per_layer, dim=2)


@torch.no_grad()
def changed_layer_count(routing_a: Routing, routing_b: Routing, mask: torch.Tensor) -> torch.Tensor:
    """Number of MoE layers whose top-k expert set differs, per token, [batch, seq] int64.

    ``-1`` for a token that is masked out or unrecorded in some layer of either routing: a partial record
    cannot tell that the token's routing did not change.
    """
    chunks = row_chunks(mask, routing_a, routing_b)
    if chunks is None:
        return _changed_layer_count(routing_a, routing_b, mask)
    width = mask.shape[1]
    return torch.cat(
        [
            _changed_layer_count(dense_rows(routing_a, rows, width), dense_rows(routing_b, rows, width), mask[rows])
            for rows in chunks
        ]
    )


def _changed_layer_count(routing_a: torch.Tensor, routing_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    routing_a, routing_b, valid, recorded = _check_pair(routing_a, routing_b, mask, "routing_a", "routing_b")
    changed = ((_overlap_counts(routing_a, routing_b) < routing_a.shape[-1]) & recorded).sum(dim=-1)
    fully_recorded = valid & recorded.all(dim=-1)
    return torch.where(fully_recorded, changed, torch.full_like(changed, UNRECORDED))


@torch.no_grad()
def routing_change_stats(routing_a: Routing, routing_b: Routing, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sufficient statistics of how the top-k sets of ``routing_b`` differ from those of ``routing_a``.

    Per layer ([layers]): ``pairs_compared`` (valid tokens recorded in both), ``pairs_changed`` (of those,
    tokens whose top-k set differs), ``overlap_sum`` (sum of ``|A & B| / topk``). Per token (0-dim):
    ``tokens_compared`` (valid tokens recorded in every layer of both), ``tokens_changed`` (of those, changed in
    at least one layer), ``tokens_unrecorded`` (valid tokens that are not). Finalize with
    :func:`finalize_routing_change`.
    """
    chunks = row_chunks(mask, routing_a, routing_b)
    if chunks is None:
        return _routing_change_stats(routing_a, routing_b, mask)
    width = mask.shape[1]
    return _sum_chunks(
        [
            _routing_change_stats(dense_rows(routing_a, rows, width), dense_rows(routing_b, rows, width), mask[rows])
            for rows in chunks
        ]
    )


def _sum_chunks(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return parts[0] if len(parts) == 1 else sum_statistics(parts)


def _routing_change_stats(
    routing_a: torch.Tensor, routing_b: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    routing_a, routing_b, valid, recorded = _check_pair(routing_a, routing_b, mask, "routing_a", "routing_b")
    topk = routing_a.shape[-1]
    overlap = _overlap_counts(routing_a, routing_b)
    changed = (overlap < topk) & recorded
    fully_recorded = valid & recorded.all(dim=-1)
    stats = {
        "pairs_compared": recorded.sum(dim=(0, 1)),
        "pairs_changed": changed.sum(dim=(0, 1)),
        "overlap_sum": torch.where(recorded, overlap.to(STATS_DTYPE) / topk, 0.0).sum(dim=(0, 1)),
        "tokens_compared": fully_recorded.sum(),
        "tokens_changed": (fully_recorded & changed.any(dim=-1)).sum(),
        "tokens_unrecorded": (valid & ~fully_recorded).sum(),
    }
    return {key: value.to(STATS_DTYPE) for key, value in stats.items()}


def _safe_div(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    # 0 where nothing was counted: the counts returned next to it say that the value is empty.
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), 0.0)


def finalize_routing_change(stats: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Metrics from (summed) :func:`routing_change_stats`; every key starts with ``prefix``.

    ``routing_changed_frac`` [layers]: fraction of compared tokens whose top-k set changed;
    ``routing_changed_frac_mean``: the same over all compared (token, layer) pairs; ``routing_overlap``
    [layers] and ``routing_overlap_mean``: mean ``|A & B| / topk`` likewise; ``routing_token_changed_frac``:
    fraction of fully recorded tokens changed in at least one layer; ``routing_unrecorded_frac``: fraction of
    valid tokens not fully recorded; plus the two token counts. Empty denominators give 0.
    """
    compared = stats["pairs_compared"]
    tokens = stats["tokens_compared"]
    metrics = {
        "routing_changed_frac": _safe_div(stats["pairs_changed"], compared),
        "routing_changed_frac_mean": _safe_div(stats["pairs_changed"].sum(), compared.sum()),
        "routing_overlap": _safe_div(stats["overlap_sum"], compared),
        "routing_overlap_mean": _safe_div(stats["overlap_sum"].sum(), compared.sum()),
        "routing_token_changed_frac": _safe_div(stats["tokens_changed"], tokens),
        "routing_unrecorded_frac": _safe_div(stats["tokens_unrecorded"], tokens + stats["tokens_unrecorded"]),
        "routing_tokens_compared": tokens,
        "routing_tokens_unrecorded": stats["tokens_unrecorded"],
    }
    return {prefix + key: value for key, value in metrics.items()}


@torch.no_grad()
def expert_load_stats(routing: Routing, mask: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor]:
    """``expert_counts`` [layers, num_experts]: token-slots routed to each expert (recorded valid tokens only).

    Each recorded (token, layer) pair contributes ``topk`` slots, one to each of its experts.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r}: must be the (int >= 1) number of routed experts per layer")
    chunks = row_chunks(mask, routing)
    if chunks is None:
        return _expert_load_stats(routing, mask, num_experts)
    width = mask.shape[1]
    return _sum_chunks(
        [_expert_load_stats(dense_rows(routing, rows, width), mask[rows], num_experts) for rows in chunks]
    )


def _expert_load_stats(routing: torch.Tensor, mask: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor]:
    _, recorded = check_routing(routing, mask, num_experts=num_experts)
    routing = routing.long()
    num_layers = routing.shape[2]
    layer_offset = torch.arange(num_layers, device=routing.device)[:, None] * num_experts
    slot_recorded = recorded[..., None].expand_as(routing)
    # Unrecorded slots are sent to index 0 with weight 0, so they never add a count.
    index = torch.where(slot_recorded, routing + layer_offset, 0).reshape(-1)
    counts = torch.zeros(num_layers * num_experts, dtype=STATS_DTYPE, device=routing.device)
    counts.scatter_add_(0, index, slot_recorded.reshape(-1).to(STATS_DTYPE))
    return {"expert_counts": counts.reshape(num_layers, num_experts)}


def finalize_expert_load(stats: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Metrics from (summed) :func:`expert_load_stats`; every key starts with ``prefix``.

    With ``c_le`` the counts and ``f_le = c_le / sum_e c_le`` the load of expert ``e`` in layer ``l``:
    ``expert_load`` [layers, experts] = ``f``; ``load_max_over_mean`` [layers] = ``max_e c / mean_e c``
    (1 = perfectly balanced, ``num_experts`` = one expert takes everything); ``load_cv`` [layers] =
    population std / mean of ``c`` over experts; ``load_entropy`` [layers] = ``-sum_e f log f`` (nats;
    ``log num_experts`` when balanced); ``load_entropy_norm`` = ``load_entropy / log num_experts`` (1 when
    balanced; 1 also for a single expert). The ``*_mean`` scalars average over layers that have counts. A
    layer without counts gives 0.
    """
    counts = stats["expert_counts"]
    num_experts = counts.shape[-1]
    total = counts.sum(dim=-1)
    has_counts = total > 0
    load = _safe_div(counts, total[:, None])
    mean = total / num_experts
    max_over_mean = _safe_div(counts.max(dim=-1).values, mean)
    cv = _safe_div((counts - mean[:, None]).square().mean(dim=-1).sqrt(), mean)
    entropy = -torch.where(load > 0, load * load.clamp(min=1e-300).log(), 0.0).sum(dim=-1)
    entropy_norm = entropy / math.log(num_experts) if num_experts > 1 else torch.where(has_counts, 1.0, 0.0)
    entropy_norm = entropy_norm.to(STATS_DTYPE)
    layers = has_counts.sum()

    def layer_mean(values: torch.Tensor) -> torch.Tensor:
        return _safe_div(torch.where(has_counts, values, 0.0).sum(), layers.to(STATS_DTYPE))

    metrics = {
        "expert_load": load,
        "load_max_over_mean": max_over_mean,
        "load_max_over_mean_mean": layer_mean(max_over_mean),
        "load_cv": cv,
        "load_cv_mean": layer_mean(cv),
        "load_entropy": entropy,
        "load_entropy_mean": layer_mean(entropy),
        "load_entropy_norm": entropy_norm,
        "load_entropy_norm_mean": layer_mean(entropy_norm),
    }
    return {prefix + key: value for key, value in metrics.items()}


@torch.no_grad()
def router_entropy_stats(
    mask: torch.Tensor,
    *,
    router_probs: Optional[torch.Tensor] = None,
    router_logits: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Sum over valid tokens of the router entropy per layer, from probs or logits ``[batch, seq, layers, experts]``.

    Pass exactly one of ``router_probs`` (each row a distribution over all routed experts, before top-k
    selection) and ``router_logits`` (softmax is applied). Entropy ``H = -sum_e p_e log p_e`` in nats,
    ``0 log 0 = 0``. Returns ``router_entropy_sum`` [layers] and ``router_entropy_count`` (valid tokens).
    """
    if (router_probs is None) == (router_logits is None):
        raise ValueError("pass exactly one of router_probs= and router_logits= ([batch, seq, layers, experts])")
    name = "router_probs" if router_probs is not None else "router_logits"
    values = check_tensor(router_probs if router_probs is not None else router_logits, name)
    if values.dim() != 4:
        raise ValueError(f"{name} must be [batch, seq, layers, experts], got shape {shape_of(values)}")
    if not values.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {values.dtype}")
    valid = as_valid_mask(mask, shape_of(values)[:2], shape_name=f"{name}[..., 0, 0]")
    dtype = compute_dtype(values.dtype)
    values = values.detach().to(dtype)
    row_valid = valid[:, :, None].expand(values.shape[:3])
    # Masked rows become a uniform distribution / zero logits before any arithmetic: NaN there never leaks.
    if router_probs is not None:
        values = torch.where(row_valid[..., None], values, 1.0 / values.shape[-1])
        bad_value = (~torch.isfinite(values) | (values < 0)).any(dim=-1)
        # 1e-3 tolerates bfloat16 rounding of a softmax; a top-k renormalised subset also sums to 1 and is
        # accepted, but then the entropy is that of the renormalised weights.
        bad_sum = ~bad_value & ((values.sum(dim=-1) - 1).abs() > 1e-3)
        bad = torch.stack([bad_value.sum(), bad_sum.sum()]).tolist()
        if bad[0]:
            raise ValueError(f"router_probs has {bad[0]} row(s) with NaN/inf or negative values at valid tokens")
        if bad[1]:
            raise ValueError(
                f"router_probs has {bad[1]} row(s) at valid tokens that do not sum to 1 (within 1e-3); pass "
                f"router_logits= instead if these are scores"
            )
        entropy = distribution_entropy(values, values.clamp(min=1e-300).log())
    else:
        values = torch.where(row_valid[..., None], values, 0.0)
        # -inf logits (an excluded expert) are allowed; NaN, +inf or a row of only -inf are not.
        bad_row = (torch.isnan(values) | (values == float("inf"))).any(dim=-1) | (values == float("-inf")).all(-1)
        bad = int(bad_row.sum())
        if bad:
            raise ValueError(
                f"router_logits has {bad} row(s) at valid tokens with NaN, +inf or no finite logit at all"
            )
        entropy = softmax_entropy(values)
    return _entropy_sums(entropy, valid)


@torch.no_grad()
def token_entropy_stats(entropy: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`router_entropy_stats` from per-token router entropies ``[batch, seq, layers]`` (nats) that are
    already computed, as the actor records them; summed in :data:`STATS_DTYPE`."""
    if entropy.dim() != 3:
        raise ValueError(f"router entropy must be [batch, seq, layers], got shape {shape_of(entropy)}")
    valid = as_valid_mask(mask, shape_of(entropy)[:2], shape_name="router_entropy[..., 0]")
    return _entropy_sums(entropy.detach().to(STATS_DTYPE), valid)


def _entropy_sums(entropy: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """``router_entropy_sum`` [layers] over the valid tokens of ``entropy`` [batch, seq, layers] and the count."""
    return {
        "router_entropy_sum": torch.where(valid[..., None], entropy, 0.0).sum(dim=(0, 1)).to(STATS_DTYPE),
        "router_entropy_count": valid.sum().to(STATS_DTYPE),
    }


def finalize_router_entropy(stats: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """``router_entropy`` [layers] (mean over valid tokens, nats) and ``router_entropy_mean`` over layers."""
    entropy = _safe_div(stats["router_entropy_sum"], stats["router_entropy_count"])
    return {prefix + "router_entropy": entropy, prefix + "router_entropy_mean": entropy.mean()}
