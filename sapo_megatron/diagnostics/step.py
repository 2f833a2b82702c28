"""One step's diagnostics and accounting, computed on this rank's share and combined over the shares.

:class:`StepDiagnostics` compares the step's passes token by token (docs/diagnostics.md defines each number);
:func:`rollout_metrics` counts the rollout's rewards, lengths and failures. Both add per-share statistics over
the data-parallel group before they become metrics (:mod:`sapo_megatron.sharding`), so the logged numbers are
those of the step's whole batch.
"""

from __future__ import annotations

from typing import Optional

import torch

from sapo_megatron.algorithms.rollout_correction import RolloutCorrectionSums
from sapo_megatron.diagnostics.attribution import finalize_variance_attribution, routing_variance_stats
from sapo_megatron.diagnostics.mismatch import mismatch_metrics, ratio_quantiles, reduce_mismatch_metrics
from sapo_megatron.diagnostics.routing_stats import (
    changed_layer_count,
    expert_load_stats,
    finalize_expert_load,
    finalize_router_entropy,
    finalize_routing_change,
    routing_change_stats,
    token_entropy_stats,
)
from sapo_megatron.diagnostics.run_logger import flatten_metrics, histogram_summary, merge_histogram_summaries
from sapo_megatron.sharding import DataShare


class StepDiagnostics:
    """The routing-induced ratio-variance diagnostics of one step (docs/diagnostics.md defines each one).

    Pairs of passes are compared token by token: the rollout engine vs the old-logprob recompute (their
    log-prob difference is the train/rollout mismatch), and the old-logprob pass vs each update
    mini-batch's forward (their difference is log r, the ratio SAPO gates). Histograms go to
    ``histograms.jsonl`` for the dashboard.

    Each rank computes on its share: sufficient statistics (sums, counts) are added over the shares before they
    become metrics, quantiles are exact order statistics over every share's tokens, and histograms add their
    counts; so the numbers are the whole batch's (one share: the same code path, bit for bit).
    """

    LOG_RATIO_EDGES = torch.linspace(-0.5, 0.5, 101)
    RATIO_EDGES = torch.linspace(0.0, 3.0, 121)
    DELTA_EDGES = torch.linspace(-0.05, 0.05, 101)

    def __init__(self, step: int, *, share: DataShare, num_experts: int = 0, logger=None):
        """``share``: this rank's share (its statistics are added to the others'); ``num_experts``: the routed
        experts (MoE); ``logger``: the driver's :class:`~sapo_megatron.diagnostics.run_logger.RunLogger` (the
        other ranks pass ``None``)."""
        self.step, self.share, self.num_experts, self.logger = step, share, num_experts, logger
        self.metrics: dict[str, float] = {}
        self.log_ratio: dict[str, list[torch.Tensor]] = {"stable": [], "routing_changed": []}
        self.ratio: dict[str, list[torch.Tensor]] = {"adv_pos": [], "adv_neg": []}
        self.delta: Optional[torch.Tensor] = None

    def mismatch(self, batch) -> dict[str, torch.Tensor]:
        """Train/rollout mismatch of the step (docs/diagnostics.md), combined over the shares."""

        local = mismatch_metrics(batch.logprobs_old, batch.logprobs_rollout, batch.loss_mask)
        if self.share.size == 1:
            return local
        return reduce_mismatch_metrics(self.share.gather_objects(local))

    def rollout_vs_old(self, batch, routing_rollout, routing_old, router_entropy_old=None, routing_mask=None) -> None:
        """``routing_mask``: the positions the routing records hold (default: the loss mask); the routing
        diagnostics are computed over them (a sample when ``diagnostics.routing_sample_tokens`` is set)."""

        total = self.share.sum_tensors
        mask = batch.loss_mask
        self.delta = (batch.logprobs_old - batch.logprobs_rollout)[mask]
        if router_entropy_old is not None:
            self.metrics.update(flatten_metrics(router_entropy_metrics(router_entropy_old, mask, total), "routing/"))
        routed = mask if routing_mask is None else routing_mask
        if routing_old is not None:
            load = finalize_expert_load(total(expert_load_stats(routing_old, routed, self.num_experts)))
            # The [layers, experts] matrices go to histograms; the per-layer summaries are scalars.
            self.metrics.update(flatten_metrics({k: v for k, v in load.items() if v.dim() <= 1}, "routing/expert_load/"))
        if routing_rollout is None or routing_old is None:
            return
        change = finalize_routing_change(total(routing_change_stats(routing_rollout, routing_old, routed)))
        self.metrics.update(flatten_metrics(change, "routing/rollout_vs_old/"))
        delta = torch.where(routed, batch.logprobs_old - batch.logprobs_rollout, 0.0)
        attribution = finalize_variance_attribution(total(routing_variance_stats(delta, routed, routing_rollout, routing_old)))
        self.metrics.update(flatten_metrics(attribution, "attribution/rollout_vs_old/", index=""))

    def update_mini_batch(self, k: int, mb, logprobs, routing_old, routing_update, routing_mask=None) -> None:
        total = self.share.sum_tensors
        mask = mb.loss_mask
        log_ratio = torch.where(mask, logprobs - mb.logprobs_old, 0.0)
        quantiles = ratio_quantiles(logprobs, mb.logprobs_old, mask, group=self.share.group if self.share.size > 1 else None)
        self.metrics.update(flatten_metrics(quantiles, f"ratio/mb{k}/"))
        positive = mask & (mb.advantages > 0)[:, None]
        negative = mask & (mb.advantages < 0)[:, None]
        self.ratio["adv_pos"].append(log_ratio[positive].exp())
        self.ratio["adv_neg"].append(log_ratio[negative].exp())
        if routing_old is None or routing_update is None:
            self.log_ratio["stable"].append(log_ratio[mask])
            return
        routed = mask if routing_mask is None else routing_mask
        change = finalize_routing_change(total(routing_change_stats(routing_old, routing_update, routed)))
        self.metrics.update(flatten_metrics(change, f"routing/old_vs_mb{k}/"))
        routed_log_ratio = torch.where(routed, log_ratio, 0.0)
        attribution = finalize_variance_attribution(
            total(routing_variance_stats(routed_log_ratio, routed, routing_old, routing_update))
        )
        self.metrics.update(flatten_metrics(attribution, f"attribution/old_vs_mb{k}/", index=""))
        changed = changed_layer_count(routing_old, routing_update, routed)
        # Over the recorded positions only: an unsampled token is neither stable nor changed.
        self.log_ratio["stable"].append(log_ratio[routed & (changed == 0)])
        self.log_ratio["routing_changed"].append(log_ratio[routed & (changed > 0)])

    def finish(self) -> dict[str, float]:
        # A dense model has no routing to split the log-ratio by: only the "stable" histogram (all tokens).
        names = [name for name in self.log_ratio if self.num_experts or name != "routing_changed"]
        wanted = [(f"log_ratio/{name}", _cat(self.log_ratio[name]), self.LOG_RATIO_EDGES) for name in names]
        wanted += [(f"ratio/{name}", _cat(parts), self.RATIO_EDGES) for name, parts in self.ratio.items()]
        if self.delta is not None:
            wanted.append(("mismatch/delta", self.delta, self.DELTA_EDGES))
        # Bin counts (and the sums TensorBoard shows) add over the shares: one small exchange for all of them.
        local = [histogram_summary(self.step, name, values, edges) for name, values, edges in wanted]
        parts = self.share.gather_objects(local)
        logger = self.logger
        if logger is not None:
            for index in range(len(local)):
                logger.log_histogram_summary(merge_histogram_summaries([p[index] for p in parts]))
        return self.metrics


def rollout_metrics(share: DataShare, rollout, rewards: torch.Tensor, batch) -> dict[str, float]:
    """The step's reward, response and rollout numbers: sums and counts of every share, added (one collective)."""
    lengths = batch.loss_mask.sum(1)
    (rows, reward_sum, exact, failures, nonfinite, empty, length_sum, truncated) = share.sum(
        len(rollout.rewards),
        float(rewards.double().sum()),
        float((rewards == 1.0).sum()),
        rollout.reward_failures,
        len(rollout.excluded_rows),
        rollout.empty_responses,
        float(lengths.sum()),
        sum(r == "length" for r in rollout.finish_reasons),
    )
    metrics = {
        "reward/mean": reward_sum / rows,
        "reward/exact_frac": exact / rows,
        "reward/failures": failures,
        "rollout/nonfinite_logprob_samples": nonfinite,
        "response/empty": empty,
        "response/length_mean": length_sum / rows,
        "response/truncated_frac": truncated / rows,
        "weights/rollout_version": float(rollout.weight_version),
    }
    metrics.update({f"rollout/engine{i}/samples": float(k) for i, k in enumerate(rollout.samples_per_engine)})
    return metrics


def staleness_metrics(share: DataShare, oldest_versions: list[int], response_lengths: list[int], *,
                      actor_version: int, max_staleness: int) -> dict[str, float]:
    """How far behind the actor the step's samples were generated (asynchronous RL), over every share.

    A sample's staleness is the actor's weight version before this step's update minus the oldest version that
    produced one of its tokens. Logged: ``staleness/mean`` and ``staleness/max`` over samples,
    ``staleness/token_mean`` weighted by response tokens, and the histogram ``staleness/samples_{d}`` (samples
    of staleness ``d`` for ``d`` = 0 .. ``max_staleness``, and ``staleness/samples_over`` above it: a scheduler
    bug, always 0), plus ``weights/actor_version`` and ``weights/rollout_version_min``."""
    stale = [actor_version - v for v in oldest_versions]
    bins = [0.0] * (max_staleness + 2)
    for d in stale:
        bins[min(max(d, 0), max_staleness + 1)] += 1
    tokens = sum(response_lengths)
    token_weighted = sum(d * n for d, n in zip(stale, response_lengths))
    rows, total, tokens, token_weighted, *bins = share.sum(len(stale), float(sum(stale)), float(tokens),
                                                           float(token_weighted), *bins)
    # The oldest version over every share, as a max of its negation (one reduction for both).
    worst, neg_oldest = share.max(float(max(stale, default=0)), float(-min(oldest_versions, default=actor_version)))
    metrics = {
        "staleness/mean": total / rows if rows else 0.0,
        "staleness/max": worst,
        "staleness/token_mean": token_weighted / tokens if tokens else 0.0,
        "staleness/samples_over": bins[-1],
        "weights/actor_version": float(actor_version),
        "weights/rollout_version_min": -neg_oldest,
    }
    metrics.update({f"staleness/samples_{d}": bins[d] for d in range(max_staleness + 1)})
    return metrics


def rollout_correction_metrics(share: DataShare, sums) -> dict[str, float]:
    """``rollout_correction/*`` (weight_mean, weight_max, truncated_frac, ess, ratio_mean) over every share, from
    each share's :class:`~sapo_megatron.algorithms.rollout_correction.RolloutCorrectionSums`, combined by its own
    rules (sums added, the largest ratio kept)."""
    combined = RolloutCorrectionSums.combine(share.gather_objects(sums))
    return {f"rollout_correction/{k}": v for k, v in combined.summary().items()}


def router_entropy_metrics(router_entropy: torch.Tensor, mask: torch.Tensor, combine=None) -> dict[str, torch.Tensor]:
    """``router_entropy`` [layers] (mean over the valid tokens of the per-token router entropy
    ``[B, S, layers]``, nats) and ``router_entropy_mean`` over layers; 0 without valid tokens. ``combine`` adds
    the statistics of the other shares (:meth:`~sapo_megatron.sharding.DataShare.sum_tensors`)."""

    stats = token_entropy_stats(router_entropy, mask)
    return finalize_router_entropy(combine(stats) if combine is not None else stats)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0)

