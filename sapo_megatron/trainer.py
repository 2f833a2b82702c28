"""The RL loop: prompts -> rollout (vLLM) -> rewards -> advantages -> logprobs_old -> mini-batch updates
-> weight sync -> diagnostics and logs -> checkpoint and validation.

:func:`train_step` is the whole step on one screen; everything it calls is a named function or a
component's method. :func:`train` sets the run up, resumes it, loops, and shuts it down.

Rollouts come from a :class:`~sapo_megatron.rollout.fleet.RolloutFleet`: engines colocated in every trainer
rank or ``vllm serve`` servers (``rollout.mode=remote``). Each data-parallel rank holds only its share of the
step (:mod:`sapo_megatron.sharding`): it asks the fleet for its share's prompts, receives their samples, and
keeps the share's batch, log-probs, routing records and diagnostics inputs; the share's leader scores the
rewards in its reward sandbox. Logged numbers combine the shares with exact reductions; rank 0 (the *driver*)
logs and prints. Prompts are drawn identically on every rank from the seeded, resumable stream, so the data
position needs no communication.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from sapo_megatron import collectives
from sapo_megatron.actor.batch import TrainBatch, collate_sequences
from sapo_megatron.actor.checkpoint import find_checkpoint, load_checkpoint, read_rank_file, save_checkpoint
from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
from sapo_megatron.actor.factory import build_actor
from sapo_megatron.actor.offload import ActorOffloader
from sapo_megatron.actor.parallel import destroy_distributed, init_distributed
from sapo_megatron.actor.reference import ReferencePolicy
from sapo_megatron.algorithms import compute_advantages, rollout_correction_sums, rollout_correction_weights
from sapo_megatron.algorithms.supervised import nll_loss
from sapo_megatron.bridge.sync import WeightSync
from sapo_megatron.collectives import rank, world_size
from sapo_megatron.config import Config, save_config
from sapo_megatron.console import Progress, run_console
from sapo_megatron.data.sources import build_prompt_streams, encode_prompt
from sapo_megatron.data.toy import ToyTaskStream
from sapo_megatron.device import resolve_device
from sapo_megatron.diagnostics.run_logger import RunLogger, flatten_metrics, write_custom_scalars_layout
from sapo_megatron.diagnostics.step import (
    StepDiagnostics,
    rollout_correction_metrics,
    rollout_metrics,
    staleness_metrics,
)
from sapo_megatron.diagnostics.summary import summarize
from sapo_megatron.launch import check_launch, launch_ranks
from sapo_megatron.models import resolve_model_dir
from sapo_megatron.rewards.registry import reward_function
from sapo_megatron.rewards.sandbox import RewardSandbox
from sapo_megatron.rollout.fleet import ColocatedFleet
from sapo_megatron.rollout.server_fleet import ServerFleet
from sapo_megatron.routing_layout import RoutingRecord, replay_positions, sample_positions
from sapo_megatron.sharding import DataShare

DRIVER_RANK = 0


# ----------------------------------------------------------------------------------------------------------
# Communication between the driver (rank 0) and the other ranks
# ----------------------------------------------------------------------------------------------------------


def broadcast_from_driver(obj: Any) -> Any:
    """The driver's ``obj`` on every rank (others pass anything, typically ``None``)."""
    return collectives.broadcast_object(obj, src=DRIVER_RANK)


# ----------------------------------------------------------------------------------------------------------
# The step's pieces
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One rollout batch on every rank: ``n`` consecutive rows per prompt."""

    prompts: list[list[int]]
    responses: list[list[int]]
    logprobs_rollout: list[list[float]]
    rewards: list[float]
    finish_reasons: list[str]
    weight_version: int
    reward_failures: int = 0
    routed_experts: Any = None
    samples_per_engine: list[int] = field(default_factory=list)
    # Rows whose rollout log-probs were not finite: kept in their group (rewards, advantages) but out of the loss.
    excluded_rows: list[int] = field(default_factory=list)
    empty_responses: int = 0
    # Each row's prompt index in the step's batch (the share's rows are not the batch's first ones).
    prompt_index: list[int] = field(default_factory=list)
    # Per row, (first token, weight version) of each version that produced its tokens (RolloutBatch.version_starts);
    # None: every token came from weight_version.
    version_starts: Optional[list[list[tuple[int, int]]]] = None

    def oldest_versions(self) -> list[int]:
        """Each row's oldest weight version (the one its first token came from)."""
        if self.version_starts is None:
            return [self.weight_version] * len(self.prompts)
        return [spans[0][1] for spans in self.version_starts]


def screen_logprobs(logprobs_rollout: list[list[float]]) -> tuple[list[list[float]], list[int]]:
    """The rollout log-probs with every row that holds a NaN or infinity zeroed, and the indices of those rows.

    Why skip, not fail: one bad sample (an engine numerics bug on one sequence) should not stop a run, and
    NaN must never reach the loss or the diagnostics. The row stays in its GRPO group, so the group's
    advantages keep their meaning; :func:`build_train_batch` masks it out of the loss."""
    screened, bad = [], []
    for row, values in enumerate(logprobs_rollout):
        if all(math.isfinite(v) for v in values):
            screened.append(values)
        else:
            bad.append(row)
            screened.append([0.0] * len(values))
    return screened, bad


def generate_and_score(ctx: "RunContext", examples: list, indices: list[int], *, n: int, seed: int) -> Rollout:
    """Samples ``n`` responses for each of this share's prompts (``examples``, at ``indices`` in the step's
    batch) on the fleet and scores them in the share leader's reward sandbox; the share's peers return the
    same rollout."""
    prompt_ids = [encode_prompt(ctx.tokenizer, ex.prompt) for ex in examples]
    return score_rollout(ctx, examples, indices, ctx.fleet.generate(prompt_ids, n=n, seed=seed, prompt_indices=indices))


def score_rollout(ctx: "RunContext", examples: list, indices: list[int], out) -> Rollout:
    """The fleet's samples ``out`` for ``examples`` (at ``indices``), screened and scored by the share's leader
    (a collective over the share)."""
    logprobs_rollout, excluded = screen_logprobs(out.logprobs_rollout)
    empty = sum(len(r) == 0 for r in out.response_ids)
    scored = None
    if ctx.share.is_leader:
        if excluded:
            print(f"[rollout] warning: {len(excluded)} of {len(out)} samples have non-finite rollout log-probs "
                  f"(rows {excluded[:10]} of this share); they are excluded from the loss", flush=True)
        texts = ctx.tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
        answer_of = {index: ex.answer for index, ex in zip(indices, examples)}
        answers = [answer_of[i] for i in out.prompt_index]
        rewards, stats = ctx.sandbox.score(list(zip(texts, answers))) if texts else ([], None)
        failures = 0 if stats is None else stats.n_errors + stats.n_timeouts
        if failures:
            print(f"[reward] warning: {failures} of {stats.n_items} rewards failed and scored 0: "
                  + "; ".join(stats.failure_samples), flush=True)
        scored = (list(rewards), failures)
    rewards, failures = ctx.share.from_leader(scored)
    return Rollout(
        prompts=out.prompt_ids,
        responses=out.response_ids,
        logprobs_rollout=logprobs_rollout,
        rewards=rewards,
        finish_reasons=list(out.finish_reasons),
        weight_version=out.weight_version,
        reward_failures=failures,
        routed_experts=out.routed_experts,
        samples_per_engine=list(ctx.fleet.samples_per_engine),
        excluded_rows=excluded,
        empty_responses=empty,
        prompt_index=list(out.prompt_index),
        version_starts=out.version_starts,
    )


def build_train_batch(rollout: Rollout, advantages: torch.Tensor, *, pad_id: int):
    # One extra position so that the last response token is predicted inside the window.
    width = max(len(p) + len(r) for p, r in zip(rollout.prompts, rollout.responses)) + 1
    tokens, mask, logprobs_rollout = collate_sequences(
        rollout.prompts, rollout.responses, pad_id=pad_id, seq_len=width, response_logprobs=rollout.logprobs_rollout
    )
    if rollout.excluded_rows:
        mask[rollout.excluded_rows] = False
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=advantages, logprobs_rollout=logprobs_rollout)


def mini_batches(batch, num_mini_batches: int) -> list:
    return [batch.select(index) for index in mini_batch_slices(batch.size, num_mini_batches)]


def sync_weights(ctx: "RunContext", *, version: Optional[int] = None) -> dict[str, float]:
    """Pushes the actor's weights into every engine as ``version`` (default: the next one); a collective."""
    ctx.enter_sync_phase()
    ctx.weight_version = ctx.weight_version + 1 if version is None else version
    stats = ctx.fleet.push(ctx.actor.model.chunks, ctx.weight_version)
    return {"sync/bytes": float(stats.bytes), "sync/tensors": float(stats.num_tensors)}


class StepTimer:
    """Seconds per phase of a step; a phase timed inside another (:meth:`apart`) is not counted twice."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._inner = 0.0

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start, inner = time.perf_counter(), self._inner
        try:
            yield
        finally:
            # Time spent in nested apart() phases belongs to them.
            elapsed = time.perf_counter() - start - (self._inner - inner)
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed

    @contextmanager
    def apart(self, name: str) -> Iterator[None]:
        """Times ``name`` inside another phase and takes it out of that phase's time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            self._inner += elapsed

    def metrics(self) -> dict[str, float]:
        out = {f"time/{name}": seconds for name, seconds in self.seconds.items()}
        out["time/step"] = sum(self.seconds.values())
        out["time/diagnostics_frac"] = self.seconds.get("diagnostics", 0.0) / out["time/step"]
        return out


# ----------------------------------------------------------------------------------------------------------
# Run state
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RunContext:
    cfg: Config
    device: torch.device
    hf_dir: Path
    actor: Any
    tokenizer: Any
    train_stream: Any
    val_examples: list
    fleet: Any  # the RolloutFleet: colocated engines or remote servers
    sandbox: Any = None  # the share's leader only
    logger: Any = None  # driver only
    share: DataShare = field(default_factory=DataShare)
    reference: Any = None  # the KL term's frozen reference policy (algorithm.kl_coef > 0)
    offloader: dict = field(default_factory=dict)
    weight_version: int = 0
    step: int = 0
    # Asynchronous RL: this share's scored batches generated ahead, by step, and the one being generated.
    ahead: dict = field(default_factory=dict)
    launched: Optional[LaunchedRollout] = None

    @property
    def is_driver(self) -> bool:
        return rank() == DRIVER_RANK

    @property
    def is_moe(self) -> bool:
        return bool(self.actor.model.config.num_moe_experts) and not self.cfg.model.dense

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (0 for a dense model)."""
        return int(self.actor.model.config.num_moe_experts) if self.is_moe else 0

    # -- colocated phases: who holds the device memory when ------------------------------------------------
    # rollout: the engine's weights + KV cache; the actor's offloaded state (optimizer.offload_*) on the host.
    # train:   the actor; the engine asleep (weights on the host, KV cache dropped) where vLLM can sleep.
    # sync:    the actor's parameters + the engine's weights; gradients and optimizer states on the host.
    # Two offloaders, so that gradients/optimizer states leave before the sync and parameters after it.

    def enter_sync_phase(self) -> None:
        opt = self.cfg.optimizer
        if (opt.offload_grads or opt.offload_optimizer) and not self.offloader["state"].is_offloaded:
            self.offloader["state"].offload(params=False, grads=opt.offload_grads, optimizer=opt.offload_optimizer)
        self.fleet.enter_phase("sync")

    def enter_rollout_phase(self) -> None:
        opt = self.cfg.optimizer
        if (opt.offload_grads or opt.offload_optimizer) and not self.offloader["state"].is_offloaded:
            self.offloader["state"].offload(params=False, grads=opt.offload_grads, optimizer=opt.offload_optimizer)
        if opt.offload_params and not self.offloader["params"].is_offloaded:
            self.offloader["params"].offload(params=True, grads=False, optimizer=False)
        self.fleet.enter_phase("rollout")

    def enter_train_phase(self) -> None:
        self.fleet.enter_phase("train")
        self.offloader["params"].reload()
        self.offloader["state"].reload()

    def trainer_state(self) -> dict:
        state = {"step": self.step, "weight_version": self.weight_version, "data": self.train_stream.state_dict()}
        if self.ahead:
            state["rollouts_ahead"] = {"steps": sorted(self.ahead), "max_staleness": self.cfg.rollout.max_staleness,
                                       "data_parallel_size": self.share.size}
        return state

    def load_trainer_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.weight_version = int(state["weight_version"])
        self.train_stream.load_state_dict(state["data"])


# ----------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------


def train_step(ctx: RunContext, step: int) -> dict[str, float]:
    """One RL step. Every rank runs it on its data-parallel share; the driver logs."""
    cfg, timer = ctx.cfg, StepTimer()
    diag = StepDiagnostics(step, share=ctx.share, num_experts=ctx.num_experts, logger=ctx.logger)
    with timer("rollout"):
        rollout = rollout_share(ctx, step)
    batch, positions = train_batch(ctx, rollout, step)
    with timer("old_logprob"):
        batch, router_entropy = old_logprobs(ctx, batch, positions)
    batch, correction = rollout_correction(ctx, batch)
    metrics = rollout_metrics(ctx.share, rollout, torch.tensor(rollout.rewards, dtype=torch.float32), batch)
    metrics.update(correction)
    metrics.update(staleness_metrics(ctx.share, rollout.oldest_versions(), [len(r) for r in rollout.responses],
                                     actor_version=ctx.weight_version, max_staleness=cfg.rollout.max_staleness))
    with timer("diagnostics"):
        metrics.update(flatten_metrics(diag.mismatch(batch), "mismatch/"))
        diag.rollout_vs_old(batch, batch.routing_rollout, batch.routing_old, router_entropy,
                            routing_mask=positions.get("diagnostics"))
    with timer("update"):
        updates = update_mini_batches(ctx, batch, positions, diag, timer, metrics)
    metrics.update(step_losses(updates))
    metrics["optimizer/lr"] = float(ctx.actor.optimizer.param_groups[0]["lr"])
    with timer("rollout_wait"):
        # The batch generated ahead during this step must be complete before the engines take new weights.
        collect_launched(ctx)
    with timer("sync"):
        metrics.update(sync_weights(ctx))
    with timer("diagnostics"):
        metrics.update(diag.finish())
    return metrics | timer.metrics()


def rollout_share(ctx: RunContext, step: int) -> Rollout:
    """This share's scored rollout for ``step``.

    Synchronous (``rollout.max_staleness = 0``): generated now, with the weights of the previous step.
    Asynchronous (``k > 0``): generated ahead, with the weights of step ``max(0, step - 1 - k)``; this call also
    starts the generation of step ``step + k``'s batch in the background (the engines hold the weights of step
    ``step - 1``), which runs while the actor trains this step. The schedule depends on the step numbers alone, so
    a resumed run generates exactly the samples of an uninterrupted one. The batches in between exist already,
    except at a run's first step, which generates them in turn."""
    k = ctx.cfg.rollout.max_staleness
    rollout = ctx.ahead.pop(step, None)
    if rollout is None:
        rollout = sample_share(ctx, step)
    for later in range(step + 1, step + k):
        if later not in ctx.ahead:
            ctx.ahead[later] = sample_share(ctx, later)
    if k:
        launch_rollout(ctx, step + k)
    return rollout


def draw_share(ctx: RunContext) -> tuple[list, list[int]]:
    """The next batch's prompts (drawn identically on every rank, in step order): this share's, and their
    indices in the batch."""
    cfg = ctx.cfg
    examples = ctx.train_stream.take(cfg.data.prompts_per_step)
    indices = ctx.share.prompt_indices(len(examples), cfg.algorithm.num_mini_batches)
    return [examples[i] for i in indices], indices


def sample_share(ctx: RunContext, step: int) -> Rollout:
    """Step ``step``'s batch, generated now with the engines' current weights, and scored."""
    examples, indices = draw_share(ctx)
    ctx.enter_rollout_phase()
    rollout = generate_and_score(ctx, examples, indices, n=ctx.cfg.rollout.n_samples, seed=ctx.cfg.rollout.seed + step)
    ctx.enter_train_phase()
    return rollout


@dataclass
class LaunchedRollout:
    """A batch being generated in the background (asynchronous RL)."""

    step: int
    examples: list
    indices: list[int]
    pending: Any  # rollout.fleet.PendingRollout


def launch_rollout(ctx: RunContext, step: int) -> None:
    """Starts generating step ``step``'s batch in the background, with the engines' current weights."""
    examples, indices = draw_share(ctx)
    prompt_ids = [encode_prompt(ctx.tokenizer, ex.prompt) for ex in examples]
    pending = ctx.fleet.submit(prompt_ids, n=ctx.cfg.rollout.n_samples, seed=ctx.cfg.rollout.seed + step,
                               prompt_indices=indices)
    ctx.launched = LaunchedRollout(step, examples, indices, pending)


def collect_launched(ctx: RunContext) -> None:
    """Waits for the batch generated in the background (if any), scores it and keeps it for its step (a
    collective: every rank has the same launched batch)."""
    launched, ctx.launched = ctx.launched, None
    if launched is not None:
        out = launched.pending.result()
        ctx.ahead[launched.step] = score_rollout(ctx, launched.examples, launched.indices, out)


def ahead_file_name(share: DataShare) -> str:
    return f"rollouts_ahead_dp{share.rank}.pt"


def save_ahead(ctx: RunContext) -> dict[str, bytes]:
    """The share's batches generated ahead, as the file its leader saves with a checkpoint (asynchronous RL:
    their weights are gone once the run has moved on, so a resumed run reads them back)."""
    if not ctx.ahead or not ctx.share.is_leader:
        return {}
    buffer = io.BytesIO()
    torch.save({step: dataclasses.asdict(r) for step, r in sorted(ctx.ahead.items())}, buffer)
    return {ahead_file_name(ctx.share): buffer.getvalue()}


def load_ahead(ctx: RunContext, step_dir: Path, state: dict) -> None:
    """The batches generated ahead that the checkpoint of ``step_dir`` holds for this rank's share."""
    saved = state.get("rollouts_ahead")
    if not saved:
        return
    cfg = ctx.cfg
    if saved["max_staleness"] != cfg.rollout.max_staleness or saved["data_parallel_size"] != ctx.share.size:
        raise ValueError(
            f"checkpoint {str(step_dir)!r} holds batches generated ahead for rollout.max_staleness="
            f"{saved['max_staleness']} over {saved['data_parallel_size']} data-parallel shares; this run has "
            f"max_staleness={cfg.rollout.max_staleness} and {ctx.share.size} shares. Resume with the same "
            "rollout.max_staleness and data-parallel size (the samples of an asynchronous run depend on both)"
        )
    data = read_rank_file(step_dir, ahead_file_name(ctx.share))
    if data is None:
        raise ValueError(f"checkpoint {str(step_dir)!r} lacks {ahead_file_name(ctx.share)} (batches generated "
                         "ahead for this rank's share): it is incomplete; resume from an earlier step")
    rows = torch.load(io.BytesIO(data), weights_only=False)
    ctx.ahead = {int(step): Rollout(**fields) for step, fields in rows.items()}
    if sorted(ctx.ahead) != list(saved["steps"]):
        raise ValueError(f"checkpoint {str(step_dir)!r}: {ahead_file_name(ctx.share)} holds steps "
                         f"{sorted(ctx.ahead)}, its trainer state says {saved['steps']}")


def train_batch(ctx: RunContext, rollout: Rollout, step: int):
    """The share's batch: advantages, token tensors and the rollout's routing record; and the positions that
    the step's routing records keep (:func:`routing_positions`)."""
    cfg = ctx.cfg
    rewards = torch.tensor(rollout.rewards, dtype=torch.float32)
    advantages = compute_advantages(rewards, cfg.rollout.n_samples, cfg.algorithm.advantage)
    batch = build_train_batch(rollout, advantages, pad_id=ctx.tokenizer.pad_token_id)
    positions = routing_positions(ctx, rollout, batch, step)
    if rollout.routed_experts is not None:
        # Compact records of the positions kept (docs/diagnostics.md); the engines' per-sample arrays go.
        kept = positions["full"] if cfg.algorithm.routing_replay == "rollout" else positions["diagnostics"]
        batch = batch.with_(routing_rollout=RoutingRecord.from_sequences(rollout.routed_experts, kept, ctx.num_experts))
        rollout.routed_experts = None
    return batch, positions


def old_logprobs(ctx: RunContext, batch, positions: dict):
    """The batch with the old policy's log-probs and routing (and the reference's log-probs with a KL term);
    and the old pass's router entropy (MoE)."""
    replay = ctx.cfg.algorithm.routing_replay
    old = ctx.actor.policy.compute_logprobs(
        batch,
        record_routing=ctx.is_moe,
        routing_positions=positions.get("full" if replay == "old" else "diagnostics"),
        record_router_entropy=ctx.is_moe,
        replay_routing=batch.routing_rollout if replay == "rollout" else None,
        local=True,
    )
    batch = batch.with_(logprobs_old=old.logprobs, routing_old=old.routing)
    if ctx.reference is not None:
        batch = batch.with_(logprobs_ref=ctx.reference.compute_logprobs(batch, local=True).logprobs)
    return batch, old.router_entropy


def rollout_correction(ctx: RunContext, batch) -> tuple[Any, dict[str, float]]:
    """With ``algorithm.rollout_correction`` on: the batch with its truncated importance weights (old policy
    against the rollout's, docs/sapo.md) and their metrics over every share; else the batch as it was."""
    alg = ctx.cfg.algorithm
    if alg.rollout_correction == "off":
        return batch, {}
    args = (batch.logprobs_old, batch.logprobs_rollout, batch.loss_mask)
    kwargs = dict(level=alg.rollout_correction, clip=alg.rollout_correction_clip)
    metrics = rollout_correction_metrics(ctx.share, rollout_correction_sums(*args, **kwargs))
    return batch.with_(rollout_weights=rollout_correction_weights(*args, **kwargs)), metrics


def update_mini_batches(ctx: RunContext, batch, positions: dict, diag: StepDiagnostics, timer: "StepTimer",
                        metrics: dict) -> list:
    """One optimizer step per mini-batch (the share holds its block of every mini-batch, in mini-batch order:
    mini-batch ``k`` is its ``k``-th slice), each step's numbers into ``metrics``; returns the results."""
    replay = ctx.cfg.algorithm.routing_replay
    updates = []
    for k, rows in enumerate(mini_batch_slices(batch.size, ctx.cfg.algorithm.num_mini_batches)):
        mb = batch.select(rows)
        mb_positions = positions["diagnostics"][rows] if ctx.is_moe else None
        update = ctx.actor.policy.train_mini_batch(
            mb, record_routing=ctx.is_moe, routing_positions=mb_positions,
            replay_routing={"old": mb.routing_old, "rollout": mb.routing_rollout}.get(replay),
            return_logprobs=True, local=True,
        )
        updates.append(update)
        metrics.update(flatten_metrics(update.metrics, f"ratio/mb{k}/"))
        metrics.update(flatten_metrics(update.losses, f"loss/mb{k}/"))
        with timer.apart("diagnostics"):
            diag.update_mini_batch(k, mb, update.logprobs, mb.routing_old, update.routing, routing_mask=mb_positions)
    return updates


def step_losses(updates: list) -> dict[str, float]:
    """The step's loss, its terms and the gradient norm: means over its mini-batches."""
    keys = [k for k in ("loss", "pg_loss", "kl_loss", "entropy_loss", "grad_norm") if k in updates[0].losses]
    return {f"loss/{key}": sum(u.losses[key] for u in updates) / len(updates) for key in keys}


def routing_positions(ctx: RunContext, rollout: Rollout, batch, step: int) -> dict[str, torch.Tensor]:
    """Which positions the step's routing records keep, bool ``[rows, seq]``: ``diagnostics`` (the response
    positions, or a seeded sample of at most ``diagnostics.routing_sample_tokens`` of them per rank) and
    ``full`` (every position up to each row's last response token: what a replay needs). Empty for a dense
    model."""
    if not ctx.is_moe:
        return {}
    n = ctx.cfg.rollout.n_samples
    # Each row's index in the step's whole batch: the sample is the same whatever the sharding.
    row_ids = torch.tensor(rollout.prompt_index, dtype=torch.int64) * n + torch.arange(batch.size) % n
    diagnostics = sample_positions(batch.loss_mask, row_ids, ctx.cfg.diagnostics.routing_sample_tokens,
                                   seed=ctx.cfg.trainer.seed, step=step)
    return {"diagnostics": diagnostics, "full": replay_positions(batch.loss_mask)}


def mini_batch_slices(size: int, num_mini_batches: int) -> list[slice]:
    """Contiguous slices: each prompt's group stays together, later slices are updated off-policy."""
    step = size // num_mini_batches
    return [slice(i * step, (i + 1) * step) for i in range(num_mini_batches)]


def validate(ctx: RunContext, step: int) -> dict[str, float]:
    """Mean reward of one sample per held-out prompt, with a fixed seed (comparable across steps)."""
    if not ctx.val_examples:
        return {}
    block = ctx.share.block(len(ctx.val_examples))
    ctx.enter_rollout_phase()
    rollout = generate_and_score(ctx, ctx.val_examples[block.start : block.stop], list(block), n=1,
                                 seed=ctx.cfg.rollout.seed + 1_000_003)
    ctx.enter_train_phase()
    rewards = torch.tensor(rollout.rewards, dtype=torch.float64)
    count, total, exact = ctx.share.sum(len(rewards), float(rewards.sum()), float((rewards == 1.0).sum()))
    return {"reward/val_mean": total / count, "reward/val_exact_frac": exact / count}


def supervised_warmup(ctx: RunContext) -> None:
    """``trainer.sft_warmup_steps`` NLL steps on (prompt, answer + EOS) pairs of the training stream."""
    cfg, policy = ctx.cfg, ctx.actor.policy
    # A separate stream (another seed), so the warm-up does not move the RL data position.
    stream = ToyTaskStream(ctx.train_stream.task, seed=cfg.data.seed + 7919, split="train")
    eos = ctx.tokenizer.eos_token_id
    lr = cfg.trainer.sft_lr or cfg.optimizer.lr
    # The warm-up runs outside the RL schedule: its own rate, and the scheduler does not count its steps.
    # The NLL in place of the policy loss, and no KL term (the warm-up's batches have no reference log-probs).
    warmup_loss = dataclasses.replace(policy.loss, policy_loss=nll_loss, kl_coef=0.0)
    try:
        for i in range(cfg.trainer.sft_warmup_steps):
            for group in ctx.actor.optimizer.param_groups:
                group["lr"] = lr
            examples = stream.take(cfg.data.prompts_per_step * cfg.rollout.n_samples // cfg.algorithm.num_mini_batches)
            prompts = [encode_prompt(ctx.tokenizer, ex.prompt) for ex in examples]
            answers = [ctx.tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [eos] for ex in examples]
            width = max(len(p) + len(a) for p, a in zip(prompts, answers)) + 1
            tokens, mask, _ = collate_sequences(prompts, answers, pad_id=ctx.tokenizer.pad_token_id, seq_len=width)
            batch = TrainBatch(
                tokens=tokens, loss_mask=mask, advantages=torch.zeros(len(examples)), logprobs_old=torch.zeros(tokens.shape)
            )
            update = policy.train_mini_batch(batch, loss=warmup_loss, advance_schedule=False)
            if ctx.is_driver and (i + 1) % 10 == 0:
                print(f"[warm-up] step {i + 1}/{cfg.trainer.sft_warmup_steps} nll {update.losses['loss']:.3f}", flush=True)
    finally:
        if policy.scheduler is not None:
            policy.scheduler.step(increment=0)  # back to the schedule's rate


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def setup(cfg: Config) -> RunContext:
    from transformers import AutoTokenizer

    device = resolve_device(cfg.trainer.device, name="trainer.device", must_exist=True)
    if device.type == "cpu":
        MegatronCpuCompat("cpu").install()
    init_distributed(cfg.parallel, device, seed=cfg.trainer.seed)
    # The driver builds the cached tiny model first; the others then find it on disk.
    hf_dir = resolve_model_dir(cfg) if rank() == DRIVER_RANK else None
    hf_dir = Path(broadcast_from_driver(str(hf_dir) if hf_dir else None))
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    collect = cfg.rollout.collect_routed_experts and not cfg.model.dense
    if cfg.rollout.mode == "colocated":
        # Every rank builds its engine here, at the same point (vLLM creates its process groups collectively
        # over the whole torch.distributed job), and before the actor, so that a GPU engine starts on an empty
        # device (ColocatedFleet.start).
        fleet = ColocatedFleet.start(
            hf_dir, cfg.rollout, device=device.type, dtype=cfg.model.params_dtype, collect_routed_experts=collect
        )
    actor = build_actor(cfg, hf_dir, device=device, total_steps=cfg.trainer.steps)
    share = data_share()
    train_stream, val_examples = build_prompt_streams(cfg, tokenizer)
    sandbox = None
    if share.is_leader:
        sandbox = RewardSandbox(reward_function(cfg), timeout_s=cfg.reward.timeout_s, max_workers=cfg.reward.num_workers)
    if cfg.rollout.mode == "remote":
        fleet = ServerFleet.build(
            actor.model, hf_dir, cfg, run_dir=Path(cfg.trainer.run_dir), device=device.type,
            collect_routed_experts=collect,
        )
    else:
        fleet.connect(actor.model)
    fleet.set_share(share)
    return RunContext(
        offloader={"state": ActorOffloader(actor), "params": ActorOffloader(actor)},
        cfg=cfg,
        device=device,
        hf_dir=hf_dir,
        actor=actor,
        tokenizer=tokenizer,
        train_stream=train_stream,
        val_examples=val_examples,
        fleet=fleet,
        sandbox=sandbox,
        share=share,
    )


def data_share() -> DataShare:
    """This rank's share of each step's data, from megatron's data-parallel layout (a collective)."""
    from megatron.core import parallel_state as mpu

    return DataShare.build(
        mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size(), mpu.get_data_parallel_group()
    )


def resume_or_start(ctx: RunContext) -> None:
    """Loads the newest complete checkpoint of the run directory, or runs the warm-up of a new run."""
    ckpt_root = Path(ctx.cfg.trainer.run_dir) / "checkpoints"
    kl = ctx.cfg.algorithm.kl_coef > 0
    # A resumed run's reference is its initial policy, saved with its checkpoints: a holder to load it into.
    reference = ReferencePolicy.capture(ctx.actor.policy) if kl and ctx.cfg.trainer.resume else None
    loaded = load_checkpoint(ctx.actor, ckpt_root, reference=reference) if ctx.cfg.trainer.resume else None
    if loaded is not None:
        ctx.reference = reference
        step, state = loaded
        ctx.load_trainer_state(state)
        load_ahead(ctx, find_checkpoint(ckpt_root, step), state)
        if ctx.is_driver:
            print(f"[resume] from {ckpt_root} at step {step}", flush=True)
        # The new engine holds the HF weights: give it the checkpoint's, under the version they had, so the
        # record reads as if the run had never stopped.
        sync_weights(ctx, version=ctx.weight_version)
        return
    if ctx.fleet.needs_initial_push:
        # The engines started with dummy weights: give them the actor's initial ones as version 0.
        sync_weights(ctx, version=0)
    if ctx.cfg.trainer.sft_warmup_steps:
        supervised_warmup(ctx)
        sync_weights(ctx)
    # The KL term pulls towards the weights RL starts from (after the warm-up).
    ctx.reference = ReferencePolicy.capture(ctx.actor.policy) if kl else None


def save(ctx: RunContext) -> None:
    # Offloaded storages are empty: the checkpoint needs every tensor resident.
    for offloader in ctx.offloader.values():
        offloader.reload()
    save_checkpoint(
        ctx.actor,
        Path(ctx.cfg.trainer.run_dir) / "checkpoints",
        ctx.step,
        ctx.trainer_state(),
        keep_last=ctx.cfg.trainer.keep_checkpoints or None,
        reference=ctx.reference,
        rank_files=save_ahead(ctx),
    )


def due(step: int, interval: int, last: int) -> bool:
    return interval > 0 and (step % interval == 0 or step == last)


def train(cfg: Config, *, verbose: bool = False) -> Optional[dict]:
    """Runs (or resumes) the training run of ``cfg``; returns the summary, or None when interrupted.

    With ``launch.nproc_per_node > 1`` and not already inside torchrun, starts the ranks itself. Library output
    (logging, warnings, C++ and child processes) goes to ``<run_dir>/logs/`` and the terminal shows ours, unless
    ``verbose`` (:mod:`sapo_megatron.console`).
    """
    cfg.validate()
    if cfg.launch.world_size > 1 and "RANK" not in os.environ:
        return launch_ranks(cfg, verbose=verbose)
    check_launch(cfg, os.environ)
    # torch.distributed is not up yet: the rank torchrun gave this process names its log file.
    rank_ = int(os.environ.get("RANK", "0"))
    with run_console(cfg.trainer.run_dir, rank=rank_, world_size=cfg.launch.world_size, verbose=verbose):
        ctx = setup(cfg)
        try:
            return run(ctx)
        except KeyboardInterrupt:
            if ctx.is_driver:
                print(
                    f"\n[interrupted] at step {ctx.step + 1}; nothing half-written was kept. "
                    "Rerun the same command to resume from the last checkpoint.",
                    file=sys.stderr,
                    flush=True,
                )
            return None
        finally:
            shutdown(ctx)


def run(ctx: RunContext) -> dict:
    cfg = ctx.cfg
    resume_or_start(ctx)
    run_dir = Path(cfg.trainer.run_dir)
    if ctx.is_driver:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        ctx.logger = RunLogger(run_dir, resume_step=ctx.step)
        write_custom_scalars_layout(run_dir)
    started = time.perf_counter()
    first_step = ctx.step + 1
    if ctx.step == 0:
        log(ctx, 0, validate(ctx, 0) | {"time/elapsed": time.perf_counter() - started})
    progress = Progress(cfg.trainer.steps, first_step - 1, enabled=ctx.is_driver)
    for step in range(first_step, cfg.trainer.steps + 1):
        metrics = train_step(ctx, step)
        ctx.step = step
        if due(step, cfg.trainer.eval_interval, cfg.trainer.steps):
            metrics.update(validate(ctx, step))
        # Seconds since this session's RL loop began (after the warm-up): time-to-reward curves.
        metrics["time/elapsed"] = time.perf_counter() - started
        log(ctx, step, metrics)
        progress.update(step, metrics)
        if due(step, cfg.trainer.save_interval, cfg.trainer.steps):
            save(ctx)
    progress.close()
    summary = {"step": ctx.step}
    if ctx.is_driver:
        summary = summarize(run_dir, policy_loss=cfg.algorithm.policy_loss, data_source=cfg.data.train, step=ctx.step,
                            weight_version=ctx.weight_version, seconds=time.perf_counter() - started)
    return summary


def log(ctx: RunContext, step: int, metrics: dict) -> None:
    if ctx.is_driver and metrics:
        ctx.logger.log(step, metrics)


def shutdown(ctx: RunContext) -> None:
    for closer in (ctx.logger, ctx.sandbox, ctx.fleet):
        if closer is not None:
            try:
                closer.close()
            except Exception as exc:  # shutting down: report, keep closing the rest
                print(f"[shutdown] {type(closer).__name__}.close(): {exc}", file=sys.stderr)
    destroy_distributed()


if __name__ == "__main__":
    # A rank started by launch_ranks (or by torchrun/srun directly) with the resolved config file.
    import argparse

    from sapo_megatron.config import load_config
    from sapo_megatron.launch import exit_when_orphaned

    parser = argparse.ArgumentParser(prog="python -m sapo_megatron.trainer")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--verbose", action="store_true", help="library output on the terminal, not in logs/")
    args = parser.parse_args()
    exit_when_orphaned()
    summary = train(load_config(args.config, args.overrides), verbose=args.verbose)
    sys.exit(0 if summary is not None else 130)
