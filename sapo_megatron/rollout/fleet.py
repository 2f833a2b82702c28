"""The rollout seam: one interface through which the trainer generates and moves weights, whatever the engines.

:class:`RolloutFleet` is what the RL step calls; two implementations stand behind it:

* :class:`ColocatedFleet`: one vLLM engine in every trainer rank (in-process, tensor parallel 1, on the rank's
  own device). Each rank asks for its data-parallel share's prompts; the share's peers (the ranks that hold the
  same share, :mod:`sapo_megatron.sharding`) split them into contiguous blocks, one per engine, generate, and
  gather the blocks among themselves. Every engine generates; no rank receives another share's samples.
* :class:`ServerFleet` (:mod:`sapo_megatron.rollout.server_fleet`): ``vllm serve`` servers on rollout nodes,
  reached over HTTP; each share's leader spreads its prompts over them and hands the samples to its peers.

Invariants, for both:

* ``generate`` is a collective over the trainer ranks; each rank passes its share's prompts (with their indices
  in the step's batch, ``prompt_indices``) and returns that share's prompt-major
  :class:`~sapo_megatron.rollout.engine.RolloutBatch` (``n`` consecutive rows per prompt, in the order given).
  Without :meth:`RolloutFleet.set_share` every rank holds the whole batch (one share).
* A prompt's samples depend only on the prompt, its global index in the batch, the seed and the weights: not
  on which engine, or how many engines, generated it (per-prompt seeds derive from the global index).
* ``push(model_chunks, version)`` is a collective; it returns once every engine serves ``version``, or raises
  :class:`~sapo_megatron.bridge.sync.WeightSyncError` on every rank. Problems found before any byte moves
  (names, shapes, versions, non-finite values) leave every engine on its previous version. Colocated engines
  load bucket by bucket: a failure after an engine loaded part of the version makes that engine unusable, and
  every rank's error says so (the run cannot go on with mixed weights).
* ``submit`` starts ``generate``'s local part (this rank's engine, or the share leader's requests to the servers)
  in a background thread and returns a :class:`PendingRollout`; no collective runs in that thread, so the actor
  may train meanwhile. ``PendingRollout.result()`` is the collective rest of ``generate`` (every rank calls it,
  in the same order), and returns exactly what ``generate`` would have. A push first waits until no local part
  is running: an engine never loads weights while it generates.
* ``samples_per_engine`` counts the rows each engine produced in the last ``generate``.
* An engine that raises inside ``generate`` makes every trainer rank raise :class:`EngineError`, with that
  engine's traceback, from the same call: no rank is left waiting in a collective for an engine that failed.
"""

from __future__ import annotations

import abc
import threading
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from sapo_megatron import collectives
from sapo_megatron.bridge.sync import DEFAULT_BUCKET_BYTES, WeightSync
from sapo_megatron.rollout.engine import RolloutBatch, RolloutEngine
from sapo_megatron.sharding import DataShare

Phase = Literal["rollout", "train", "sync"]


class EngineError(RuntimeError):
    """A rollout engine failed; raised on every trainer rank, with the failing engines' tracebacks."""


@dataclass
class _EngineFailure:
    """One rank's engine failure, exchanged in place of its share of the rollout."""

    rank: int
    summary: str
    traceback: str


def raise_engine_failures(parts: Sequence[Any], what: str, cause: BaseException | None = None) -> None:
    """Raises :class:`EngineError` naming every failed engine of ``parts`` (an all-gathered list), if any."""
    failures = [p for p in parts if isinstance(p, _EngineFailure)]
    if not failures:
        return
    heads = "; ".join(f"engine on rank {f.rank}: {f.summary}" for f in failures)
    tracebacks = "\n".join(f"--- traceback of the engine on rank {f.rank} ---\n{f.traceback.rstrip()}" for f in failures)
    raise EngineError(f"{what} failed ({heads}); the run stops\n{tracebacks}") from cause


def engine_shares(num_prompts: int, num_engines: int) -> list[range]:
    """Contiguous blocks of prompt indices, one per engine, sizes differing by at most one (the first engines
    take the extra prompts). A prompt's samples stay on one engine, so a GRPO group is never split."""
    if num_engines < 1:
        raise ValueError(f"engine_shares(num_engines={num_engines}): need at least one engine")
    base, extra = divmod(num_prompts, num_engines)
    shares, start = [], 0
    for e in range(num_engines):
        size = base + (e < extra)
        shares.append(range(start, start + size))
        start += size
    return shares


def concat_batches(parts: Sequence[RolloutBatch], weight_version: int | None = None) -> RolloutBatch:
    """The rows of ``parts`` in order, as one batch (every part must carry the same weight version)."""
    parts = [p for p in parts if len(p)]
    versions = {p.weight_version for p in parts}
    if len(versions) > 1:
        raise RuntimeError(f"the engines generated with different weight versions {sorted(versions)}")
    version = versions.pop() if versions else (weight_version if weight_version is not None else 0)
    routed = [p.routed_experts for p in parts]
    if any(r is None for r in routed) and not all(r is None for r in routed):
        raise RuntimeError("some engines returned routed experts and others did not")
    return RolloutBatch(
        prompt_ids=[row for p in parts for row in p.prompt_ids],
        response_ids=[row for p in parts for row in p.response_ids],
        logprobs_rollout=[row for p in parts for row in p.logprobs_rollout],
        finish_reasons=[row for p in parts for row in p.finish_reasons],
        prompt_index=[row for p in parts for row in p.prompt_index],
        weight_version=version,
        routed_experts=None if not parts or routed[0] is None else [row for r in routed for row in r],
        version_starts=(None if all(p.version_starts is None for p in parts)
                        else [p.row_versions(i) for p in parts for i in range(len(p))]),
    )


class PendingRollout:
    """A rollout whose local part runs in a background thread (:meth:`RolloutFleet.submit`).

    ``wait()`` blocks until the local part is done (no collective); ``result()`` then runs the collective part and
    returns the share's :class:`~sapo_megatron.rollout.engine.RolloutBatch` (every rank calls it)."""

    def __init__(self, local, collect) -> None:
        self._collect = collect
        self._outcome: Any = None
        self._error: BaseException | None = None
        self._collected = False

        def run() -> None:
            try:
                self._outcome = local()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller of result()
                self._error = exc

        self._thread = threading.Thread(target=run, name="rollout", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> RolloutBatch:
        if self._collected:
            raise RuntimeError("PendingRollout.result() was already called")
        self.wait()
        self._collected = True
        if self._error is not None:
            raise self._error
        return self._collect(self._outcome)


class RolloutFleet(abc.ABC):
    """What the trainer needs from its engines (see the module docstring for the invariants)."""

    num_engines: int
    samples_per_engine: list[int]
    # True while the engines hold no real weights (colocated GPU engines start with dummy ones).
    needs_initial_push: bool = False
    # This rank's data-parallel share; None = every rank holds the whole batch.
    share: DataShare | None = None

    def set_share(self, share: DataShare) -> None:
        """From now on each rank generates for, and receives, only ``share``'s prompts (set once the trainer's
        parallel layout exists)."""
        self.share = share

    _pending: "PendingRollout | None" = None

    def generate(self, prompt_ids: Sequence[Sequence[int]], *, n: int, seed: int,
                 prompt_indices: Sequence[int] | None = None, **sampling: Any) -> RolloutBatch:
        """``n`` samples per prompt of this rank's share; ``prompt_indices`` are the prompts' indices in the
        step's batch (default ``0, 1, ...``: the per-prompt seeds derive from them); ``sampling`` overrides the
        rollout config's ``max_new_tokens``, ``temperature``, ``top_p``."""
        self.wait_idle()
        local, collect = self._generation(prompt_ids, n=n, seed=seed, prompt_indices=prompt_indices, **sampling)
        return collect(local())

    def submit(self, prompt_ids: Sequence[Sequence[int]], *, n: int, seed: int,
               prompt_indices: Sequence[int] | None = None, **sampling: Any) -> PendingRollout:
        """:meth:`generate`, its local part started in a background thread (see :class:`PendingRollout`)."""
        self.wait_idle()
        local, collect = self._generation(prompt_ids, n=n, seed=seed, prompt_indices=prompt_indices, **sampling)
        self._pending = PendingRollout(local, collect)
        return self._pending

    def wait_idle(self) -> None:
        """Returns once no submitted rollout's local part is running (the engines are idle)."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None

    @abc.abstractmethod
    def _generation(self, prompt_ids, *, n: int, seed: int, prompt_indices=None, **sampling: Any):
        """``(local, collect)``: ``local()`` runs this rank's part of the rollout without any collective and
        returns an outcome (samples or a failure); ``collect(outcome)`` is the collective rest, returning the
        share's batch or raising on every rank."""

    @abc.abstractmethod
    def push(self, model_chunks: Sequence[torch.nn.Module], version: int):
        """Makes ``version`` (the actor's current weights) every engine's weights; returns the ``SyncStats``."""

    def enter_phase(self, phase: Phase) -> None:
        """Hands the device memory to whoever needs it next (colocated GPU engines sleep and wake)."""

    def pause(self, mode: Literal["abort", "wait", "keep"] = "wait") -> None:
        """Stops taking new work (remote servers); in-process engines only generate inside ``generate``."""

    def resume(self) -> None:
        """Undoes :meth:`pause`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stops the engines this fleet started (never the trainer's process group)."""


class ColocatedFleet(RolloutFleet):
    """One in-process engine per trainer rank (see the module docstring).

    Args:
        engine: this rank's :class:`~sapo_megatron.rollout.engine.RolloutEngine`.
        weight_sync: a :class:`~sapo_megatron.bridge.sync.WeightSync` whose engines are every rank's engine.
        group: the torch.distributed group of the trainer ranks (default: the whole job).
    """

    def __init__(self, engine, weight_sync, *, group: Any = None) -> None:
        self.engine = engine
        self.weight_sync = weight_sync
        self.group = group
        initialized = dist.is_initialized()
        self.rank = dist.get_rank(group) if initialized else 0
        self.num_engines = dist.get_world_size(group) if initialized else 1
        self.samples_per_engine = [0] * self.num_engines

    @classmethod
    def start(cls, hf_dir, rollout_config, *, device: str, dtype: str, collect_routed_experts: bool) -> "ColocatedFleet":
        """This rank's engine, on its own device, before the actor exists.

        On GPU the engine is built first, with dummy weights (the first push brings the actor's), while the
        device is still empty, so vLLM's start-up memory check sees the whole device; it then sleeps at level 2
        (weights and KV cache freed) before the actor takes its memory. :meth:`connect` adds the weight sync."""
        on_gpu = device == "cuda"
        engine = RolloutEngine(hf_dir, rollout_config, device=device, dtype=dtype,
                               collect_routed_experts=collect_routed_experts, dummy_weights=on_gpu)
        if engine.sleep_supported:
            engine.sleep(level=2)
        return cls(engine, None)

    def connect(self, model, *, bucket_bytes: int | None = None) -> "ColocatedFleet":
        """The weight sync from ``model`` (this rank's actor shards) into every rank's engine."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        # Every engine loads each bucket as soon as it is rebuilt, on the engine's own device: beside its weights
        # and the actor's parameters a push holds a few buckets, never a staged copy of the model
        # (bridge/sync.py, "Memory").
        self.weight_sync = WeightSync.colocated(model, engine=self.engine, engine_ranks=range(world),
                                                bucket_bytes=bucket_bytes or DEFAULT_BUCKET_BYTES)
        return self

    @classmethod
    def build(cls, model, hf_dir, rollout_config, *, device: str, dtype: str, collect_routed_experts: bool,
              bucket_bytes: int | None = None) -> "ColocatedFleet":
        """:meth:`start` and :meth:`connect` at once (the actor already exists)."""
        fleet = cls.start(hf_dir, rollout_config, device=device, dtype=dtype,
                          collect_routed_experts=collect_routed_experts)
        return fleet.connect(model, bucket_bytes=bucket_bytes)

    @property
    def needs_initial_push(self) -> bool:
        """Whether the engines hold no real weights yet (dummy weights): the trainer pushes version 0 first."""
        return self.engine.weight_version < 0

    def _generation(self, prompt_ids, *, n: int, seed: int, prompt_indices=None, **sampling: Any):
        prompts = [list(p) for p in prompt_ids]
        indices = list(range(len(prompts))) if prompt_indices is None else [int(i) for i in prompt_indices]
        if len(indices) != len(prompts):
            raise ValueError(f"generate: {len(indices)} prompt_indices for {len(prompts)} prompts; give one each")
        # The peers of this rank's share split its prompts, one block per engine.
        if self.share is None:
            num_peers, position = self.num_engines, self.rank
        else:
            num_peers, position = self.share.num_peers, self.share.peer_index
        block = engine_shares(len(prompts), num_peers)[position]

        def local_part():
            try:
                if len(block):
                    return self.engine.generate(prompts[block.start : block.stop], n=n, seed=seed,
                                                prompt_indices=indices[block.start : block.stop], **sampling), None
                return concat_batches([], weight_version=self.engine.weight_version), None
            except Exception as exc:
                # Exchanged in place of the samples: the other ranks are already waiting in the gathers.
                return _EngineFailure(self.rank, f"{type(exc).__name__}: {exc}", traceback.format_exc()), exc

        return local_part, lambda outcome: self._collect(outcome, num_prompts=len(prompts), n=n)

    def _collect(self, outcome, *, num_prompts: int, n: int) -> RolloutBatch:
        local, cause = outcome
        if self.share is None:
            parts = self._all_gather(local)
            outcomes = parts
        else:
            parts = self.share.gather_from_peers(local)
            # Every engine's count or failure, over the whole job: a failure in another share stops every rank
            # in this same call, and the per-engine counts are logged.
            outcomes = self._all_gather(local if isinstance(local, _EngineFailure) else len(local))
        raise_engine_failures(outcomes, "generate", cause)
        raise_engine_failures(parts, "generate", cause)
        self.samples_per_engine = [p if isinstance(p, int) else len(p) for p in outcomes]
        batch = concat_batches(parts, weight_version=self.engine.weight_version)
        assert len(batch) == num_prompts * n, f"the fleet returned {len(batch)} samples, expected {num_prompts * n}"
        return batch

    def _all_gather(self, obj: Any) -> list:
        if self.num_engines == 1:
            return [obj]
        return collectives.all_gather_object(obj, group=self.group)

    def push(self, model_chunks, version: int):
        self.wait_idle()
        return self.weight_sync.push(model_chunks, version)

    def enter_phase(self, phase: Phase) -> None:
        """GPU engines: asleep at level 2 while the actor trains (every train phase is followed by a push, which
        brings the weights back), the weights woken alone for the push (no KV cache beside the actor's
        parameters), and the KV cache last, for the rollout."""
        engine = self.engine
        if not engine.sleep_supported:
            return
        if phase == "train":
            if engine.asleep != {"weights", "kv_cache"}:
                engine.sleep(level=2)
        elif phase == "sync":
            if "weights" in engine.asleep:
                engine.wake_up(["weights"])
        elif engine.asleep:
            engine.wake_up(sorted(engine.asleep))

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    def close(self) -> None:
        self.wait_idle()
        self.engine.close()
