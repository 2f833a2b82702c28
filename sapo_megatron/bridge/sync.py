"""Weight sync: the Megatron actor's sharded weights -> HF-named full tensors -> one vLLM rollout engine.

Usage
-----
Colocated: the engine lives in the process of one trainer rank (typically global rank 0)::

    # on EVERY actor rank, after the optimizer step:
    sync = WeightSync.colocated(actor_model, engine=engine if rank == 0 else None)   # once
    stats = sync.push(actor_model.chunks, version)                                   # every step

Remote: the engine lives in a process of its own, joined to the trainer ranks by a sync group::

    # trainer rank r of N:
    group = SyncGroup.connect(host, port, rank=r, world_size=N + 1)
    sync = WeightSync.remote(actor_model, group)
    stats = sync.push(actor_model.chunks, version)
    # the engine's process (rank N of the sync group):
    receiver = WeightReceiver(engine, SyncGroup.connect(host, port, rank=N, world_size=N + 1))
    stats = receiver.receive()          # once per push, blocks until the trainer pushes

API
---
``WeightSync(bridge, transport, *, bucket_bytes=DEFAULT_BUCKET_BYTES)``
    ``bridge`` is the actor's :class:`~sapo_megatron.bridge.qwen3_moe.Qwen3MoeBridge` (``ActorModel.bridge``);
    ``transport`` says where the engine is (:class:`ColocatedTransport`, :class:`RemoteTransport`);
    ``bucket_bytes`` bounds the full-tensor bytes moved per message round (a tensor larger than that travels
    alone). ``WeightSync.colocated(model, engine=None, *, engine_rank=0, group=None, bucket_bytes=...,
    staging_device=None)`` and ``WeightSync.remote(model, group, *, bucket_bytes=...)`` build both at once;
    ``model`` is an ``ActorModel`` or a bridge.
``WeightSync.push(model_chunks, version) -> SyncStats``
    A collective over every rank of the transport's group (all actor ranks, plus the remote receiver).
    ``model_chunks`` are this rank's chunks, wrapped (DDP, Float16Module) or not. Returns once the engine
    serves ``version`` (an int above the engine's current ``weight_version``); every rank gets the same
    totals. Raises :class:`WeightSyncError` on every rank when the sync did not happen; its message says what
    each engine then holds (see "Failures").
``WeightReceiver(engine, group, *, staging_device=None).receive() -> SyncStats``
    The engine's side of a remote push.
``SyncGroup.from_torch(group=None)``, ``SyncGroup.connect(host, port, *, rank, world_size, backend="gloo", timeout_s=300)``
    A group of the running torch.distributed job (colocated), or a standalone group with its own
    rendezvous (remote: gloo on CPU, NCCL on GPU) that does not disturb the trainer's default group.
    ``timeout_s`` bounds forming it (:class:`SyncGroupJoinError` names the ranks that did not arrive) and
    every wait inside it.

Protocol (one push)
-------------------
1. Metadata, one ``all_gather_object``: every trainer rank lists the pieces it owns (HF names, layout, piece
   index and count, shape, dtype; each piece is owned by exactly one rank, see
   :meth:`Qwen3MoeBridge.weight_shards`) and which of them hold a nan or inf (each owner reads its own pieces
   once, so a piece is checked once however many engines receive it), the version and the bucket size; each
   engine's rank adds the engine's checkpoint schema, current version and anything that keeps it from taking
   an update (unusable, weights asleep). Every rank derives the same plan from it and checks it: all pieces
   present once, consistent shapes and dtypes, exactly the engine's tensor names and shapes, floating-point
   dtypes, finite values, a version above the engines' (all on the same one), engines ready. A problem raises
   on every rank before any tensor moves, and every engine keeps its version.
2. Buckets: parameters in a fixed order, grouped so that each bucket holds at most ``bucket_bytes`` of full
   tensors. Per bucket, every owner packs its pieces into one flat buffer and sends it to every engine's rank
   (but its own): one message per owner, bucket and engine instead of mbridge's collectives per tensor (an
   object exchange and a pipeline broadcast for each of Qwen3-30B-A3B's ~18,900 tensors), and only the
   engines' ranks receive the full tensors. A sender keeps at most two buckets in flight; an engine's rank
   receives the next bucket while it rebuilds the HF tensors of the current one. Each message ends in a status
   block that says whether its sender could pack it.
3. Load. Colocated engines (:class:`ColocatedTransport`) load each bucket as soon as it is rebuilt, through
   the engine's streamed update (``engine.start_update(version)``, :class:`WeightUpdate`: per bucket the
   names/shapes/dtypes check of the chunk, then vLLM's load of it; the values were checked in step 1), so no
   copy of the model waits anywhere. An engine stops loading at the first bucket that a sender could not pack
   or that it could not rebuild or load, and drains the rest so that every rank finishes the round. Remote
   engines (:class:`RemoteTransport`, a ``vllm serve`` worker) keep what they receive and load it only if the
   whole transfer succeeded everywhere (an ``all_gather_object`` of every rank's outcome first), through
   ``update_weights`` (see "Memory").
4. Result, one ``all_gather_object``: each engine's outcome (colocated: each engine commits, making
   ``version`` current, exactly when it loaded every bucket without an error), so that all ranks return, or
   raise, together.

Shared memory
-------------
Colocated ranks on one host (every rank of the group reports the same machine, CPU tensors) skip the
sockets in step 2: each sender owns one shared-memory segment (``/dev/shm``) of two slots, each the size of
its largest share of a bucket, and packs bucket ``b`` into slot ``b % 2``; one small all-gather per bucket says
that every slot is packed (and whether each sender could pack it), then each engine's rank rebuilds the HF
tensors as views of the senders' slots and loads them. An engine joins the all-gather of bucket ``b + 1``
only once it has loaded bucket ``b``, so a slot is packed again only when no engine reads it any more (the
engines keep no reference to a loaded chunk). A byte is copied once, by its sender, however many engines
read it, instead of through the kernel's socket buffers once per engine. Segments and their mappings are
kept by the ``WeightSync`` for the next push (pages are faulted in once), and each file is unlinked at the
end of the push that created it.

Memory
------
Colocated, a push holds a few buckets, never the model: a sender its two packing buffers (sockets) or its
two shared-memory slots of at most one bucket each (allocated at its first push and reused by the later ones;
``WeightSync.release_buffers()`` frees them); an engine's rank the receive buffers of the bucket it loads and
of the next one (sockets; none with shared memory) and the rebuilt HF tensors of one bucket that are copies
rather than views (pieces concatenated across tensor-parallel ranks, regrouped QKV heads), freed once the
bucket is loaded. ``SyncStats.buffer_bytes`` reports the most a rank held at once. A tensor larger than
``bucket_bytes`` travels alone, so the bound is a few times ``max(bucket_bytes, largest tensor)``. Inside the
engine, vLLM's layer-wise reload (GPU, and the CPU fallback) re-materialises one layer at a time and keeps
copies of a layer whose tensors span two buckets (a MoE layer's experts) until the layer is complete. Pieces
the engine's rank owns itself are passed to the engine as views of its parameters, so a single-process
colocated push copies nothing before vLLM's own load. A remote engine's rank keeps what it receives until
the load (about the model's size in the staging dtype, on the group's device or on ``staging_device``),
which keeps a failed push from leaving a server with mixed weights.

Failures
--------
Validation problems (step 1), non-finite values included, leave every engine untouched. An error while
packing, receiving, rebuilding or loading (steps 2-3) stops the engines at that bucket: a colocated engine
that had loaded nothing of the version keeps its version; one that had loaded part of it is marked unusable
(it refuses to generate or take another update: its weights mix two versions, and a run cannot continue on
them); one that had loaded everything serves the new version. Every rank raises a :class:`WeightSyncError`
that names each engine's state. A remote engine loads nothing unless the whole transfer succeeded; an error
inside vLLM after its load has started makes it unusable. A rank that dies mid-transfer makes the others'
sends and receives fail with the group's transport error (or its timeout); a colocated engine that had loaded
part of the version is then marked unusable before the error propagates.
"""

from __future__ import annotations

import collections
import itertools
import os
import pickle
import socket
import re
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch
import torch.distributed as dist

from sapo_megatron.bridge.layout import AttentionShape, Layout, full_shape, megatron_to_hf, unshard

if TYPE_CHECKING:
    from sapo_megatron.bridge.qwen3_moe import Qwen3MoeBridge, WeightShard

DEFAULT_BUCKET_BYTES = 512 * 1024**2
# Offsets of pieces inside a packed bucket: any dtype can then be viewed in place.
_ALIGN = 64
# Packed buckets a sender holds at once: one on the wire while the next is packed.
_MAX_IN_FLIGHT = 2
# A standalone group's bound on forming and on every wait inside it (rollout.sync_timeout_s sets it for runs).
DEFAULT_GROUP_TIMEOUT_S = 300.0


class WeightSyncError(RuntimeError):
    """A push that did not make its version current; the message says where the engine stands."""


class SyncGroupJoinError(RuntimeError):
    """A standalone sync group did not form within its timeout. ``missing``: the ranks that never arrived at the
    rendezvous ``address`` (empty: all arrived but could not connect to each other; ``None``: unknown, because
    rank 0, which holds the rendezvous store, had already given up; rank 0 itself always knows)."""

    def __init__(self, message: str, *, address: str, missing: list[int] | None, timeout_s: float) -> None:
        super().__init__(message)
        self.address = address
        self.missing = missing
        self.timeout_s = timeout_s


def _first_line(exc: BaseException) -> str:
    """An exception's first line: torch.distributed's errors append a C++ stack trace."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


@dataclass(frozen=True)
class SyncStats:
    """One push as seen by this rank. Totals are the same on every rank; timings and traffic are this rank's."""

    version: int
    bytes: int  # bytes of the HF tensors delivered to the engine (the whole model, in the trainer's dtype)
    num_tensors: int  # HF tensors delivered
    num_buckets: int
    seconds: float  # wall time of the whole push on this rank
    metadata_seconds: float  # the metadata exchange and the plan
    export_seconds: float  # packing owned pieces (senders) / rebuilding HF tensors from pieces (engine rank)
    transfer_seconds: float  # blocked on sends and receives
    load_seconds: float  # loading into the engine on an engine's rank (per bucket and the commit), waiting elsewhere
    sent_bytes: int
    received_bytes: int
    check_seconds: float = 0.0  # the finite-value check of the pieces this rank owns (part of metadata_seconds)
    # The most bytes of transfer buffers this rank held at once: packing buffers or shared-memory slots, receive
    # buffers, and rebuilt HF tensors that are copies rather than views (module docstring, "Memory").
    buffer_bytes: int = 0

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else float("inf")


# ----------------------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------------------


class SyncGroup:
    """The processes of a sync and this process's rank among them; used through point-to-point messages and
    object all-gathers only.

    Build it with :meth:`from_torch` (a group of the running torch.distributed job), :meth:`connect` (a
    standalone group) or :meth:`single` (one process, no communication).
    """

    def __init__(self, process_group: Any, rank: int, size: int, device: torch.device, *, store: Any = None) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"SyncGroup: rank {rank} is outside a group of {size}")
        self.process_group = process_group
        self.rank = rank
        self.size = size
        self.device = device
        # A standalone group's rendezvous store must outlive the group.
        self._store = store

    @classmethod
    def single(cls) -> "SyncGroup":
        return cls(None, 0, 1, torch.device("cpu"))

    @classmethod
    def from_torch(cls, group: Any = None) -> "SyncGroup":
        """``group`` (default: the whole job) of the initialised torch.distributed job; ranks are group ranks."""
        if not dist.is_initialized():
            if group is not None:
                raise ValueError("SyncGroup.from_torch(group=...): torch.distributed is not initialised")
            return cls.single()
        pg = group if group is not None else dist.group.WORLD
        backend = str(dist.get_backend(pg)).lower()
        device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        return cls(pg, dist.get_rank(pg), dist.get_world_size(pg), device)

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        rank: int,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float = DEFAULT_GROUP_TIMEOUT_S,
    ) -> "SyncGroup":
        """A standalone group over ``world_size`` processes that rendezvous at ``host:port`` (rank 0 hosts the
        store). It is independent of the default torch.distributed group, so trainer ranks and a rollout
        process started separately can share it. ``backend="nccl"`` needs a CUDA device per process.

        ``timeout_s`` bounds every wait: forming the group (a rank that never arrives makes the others raise
        :class:`SyncGroupJoinError` naming it, instead of waiting), and then each send, receive and collective
        (gloo raises; a peer that died or hangs fails a push within it rather than stalling it). It must exceed
        the longest legitimate wait inside one push: an engine's load, while the trainer ranks wait for its
        outcome."""
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"SyncGroup.connect(backend={backend!r}): use 'gloo' (CPU) or 'nccl' (GPU)")
        if not 0 <= rank < world_size:
            raise ValueError(f"SyncGroup.connect(rank={rank}, world_size={world_size}): need 0 <= rank < world_size")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
            raise ValueError(f"SyncGroup.connect(timeout_s={timeout_s!r}): must be a finite number of seconds > 0")
        address = f"{host}:{port}"
        timeout = timedelta(seconds=timeout_s)
        try:
            store = dist.TCPStore(
                host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False
            )
        except Exception as exc:  # DistNetworkError and friends: their text carries a C++ trace
            raise SyncGroupJoinError(
                f"rank {rank} could not reach the sync group's rendezvous at {address} within {timeout_s:g} s: "
                f"{_first_line(exc)}", address=address, missing=[rank], timeout_s=timeout_s,
            ) from None
        # Each rank says it arrived before the backend's own rendezvous, whose timeout names only store keys:
        # after a failure the ranks that never came are read from here.
        arrivals = dist.PrefixStore("sapo_megatron.arrived", store)
        arrivals.set(str(rank), socket.gethostname())
        prefixed = dist.PrefixStore("sapo_megatron.weight_sync", store)
        try:
            if backend == "gloo":
                return cls(dist.ProcessGroupGloo(prefixed, rank, world_size, timeout), rank, world_size,
                           torch.device("cpu"), store=store)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
            return cls(pg, rank, world_size, torch.device("cuda", torch.cuda.current_device()), store=store)
        except Exception as exc:
            try:
                missing = [r for r in range(world_size) if not arrivals.check([str(r)])]
            except Exception:  # rank 0, which holds the store, already gave up
                missing = None
            if missing:
                what = f"rank(s) {', '.join(map(str, missing))} of {world_size} did not arrive"
            elif missing is None:
                what = "the ranks that did not arrive are unknown (the rendezvous store is gone)"
            else:
                what = "every rank arrived, but they did not connect to each other"
            raise SyncGroupJoinError(
                f"the sync group at {address} did not form within {timeout_s:g} s: {what} ({_first_line(exc)})",
                address=address, missing=missing, timeout_s=timeout_s,
            ) from None

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (pickled: the peers are this job's own processes)."""
        if self.size == 1:
            return [obj]
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(self.device)
        length = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        lengths = [torch.empty_like(length) for _ in range(self.size)]
        self.process_group.allgather([lengths], [length]).wait()
        sizes = [int(n.item()) for n in lengths]
        padded = torch.zeros(max(sizes), dtype=torch.uint8, device=self.device)
        padded[: payload.numel()] = payload
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        self.process_group.allgather([gathered], [padded]).wait()
        return [pickle.loads(t[:n].cpu().numpy().tobytes()) for t, n in zip(gathered, sizes)]

    def send(self, tensor: torch.Tensor, dst: int, tag: int):
        return self.process_group.send([tensor], dst, tag)

    def recv(self, tensor: torch.Tensor, src: int, tag: int):
        return self.process_group.recv([tensor], src, tag)


# ----------------------------------------------------------------------------------------------------------
# Transports
# ----------------------------------------------------------------------------------------------------------


class WeightTarget(Protocol):
    """An engine as the receiving side of a push sees it (``RolloutEngine``, or the ``sapo_reshard`` backend inside
    a vLLM server's worker): the HF checkpoint schema it serves, its current version, and a checked load that
    either makes ``version`` current or raises and leaves the previous one. A colocated push streams instead
    (``start_update``, see :class:`WeightUpdate`); ``update_blocker()``, when the target has it, says why the
    engine cannot take an update now (checked with the plan, before any byte moves)."""

    schema: dict[str, tuple[int, ...]]
    weight_version: int

    def update_weights(self, named: list[tuple[str, torch.Tensor]], version: int) -> None: ...


class WeightUpdate(Protocol):
    """One streamed update of an engine (``engine.start_update(version)``): ``load`` each bucket's HF tensors as
    they are rebuilt (the engine keeps no reference to them once ``load`` returns, so the transport may reuse
    their memory), then ``commit`` (every checkpoint tensor loaded once: ``version`` becomes current) or
    ``abort`` (the engine is untouched if nothing was loaded, unusable otherwise). ``loaded``: whether any tensor
    reached the engine's weights; ``finite_checked=True``: the push already checked the values."""

    loaded: bool

    def load(self, named: list[tuple[str, torch.Tensor]], *, finite_checked: bool = False) -> None: ...

    def commit(self) -> None: ...

    def abort(self, reason: str) -> None: ...


class Transport:
    """Where the engines are, seen from a trainer rank: the group, the engines' ranks in it, and this rank's
    engine when one lives in this process. ``staging_device`` (engines' ranks): where rebuilt tensors go before
    the load (colocated: one bucket at a time; remote: the whole update); ``None`` keeps them on the group's
    device."""

    def __init__(
        self,
        group: SyncGroup,
        engine_ranks: Sequence[int],
        engine: "WeightTarget | None" = None,
        staging_device: str | torch.device | None = None,
    ) -> None:
        engine_ranks = sorted(set(engine_ranks))
        if not engine_ranks or not all(0 <= r < group.size for r in engine_ranks):
            raise ValueError(f"engine_ranks={engine_ranks}: give ranks inside the sync group of {group.size} ranks")
        self.group = group
        self.engine_ranks = engine_ranks
        self.engine = engine
        self.staging_device = torch.device(staging_device) if staging_device is not None else None

    @property
    def engine_rank(self) -> int:
        """The first engine's rank (the only one for a single engine)."""
        return self.engine_ranks[0]


class ColocatedTransport(Transport):
    """Engines in the processes of trainer ranks ``engine_ranks`` of ``group`` (default: the whole job; default
    ranks: ``[engine_rank]``, i.e. one engine on rank 0). Every engine receives the whole model.

    Pass this rank's engine on an engine's rank and ``None`` on every other rank.
    """

    def __init__(
        self,
        engine: "WeightTarget | None",
        *,
        engine_rank: int = 0,
        engine_ranks: Sequence[int] | None = None,
        group: Any = None,
        staging_device: str | torch.device | None = None,
    ) -> None:
        sync_group = SyncGroup.from_torch(group)
        super().__init__(sync_group, [engine_rank] if engine_ranks is None else engine_ranks, engine, staging_device)
        if (sync_group.rank in self.engine_ranks) != (engine is not None):
            raise ValueError(
                f"ColocatedTransport on rank {sync_group.rank}: pass the engine on engine_ranks={self.engine_ranks} "
                f"and engine=None on every other rank (got engine={'an engine' if engine is not None else None})"
            )


class RemoteTransport(Transport):
    """The engines are in other processes: the last ``num_engines`` ranks of ``group``, each running
    :class:`WeightReceiver` (in a vLLM server, the ``sapo_reshard`` backend does)."""

    def __init__(self, group: SyncGroup, num_engines: int = 1) -> None:
        if not 1 <= num_engines < group.size:
            raise ValueError(f"RemoteTransport(num_engines={num_engines}): need 1 <= num_engines < {group.size}")
        first = group.size - num_engines
        if group.rank >= first:
            raise ValueError(
                f"RemoteTransport: rank {group.rank} is an engine's rank (the group's last {num_engines}); "
                "run WeightReceiver there"
            )
        super().__init__(group, range(first, group.size))


# ----------------------------------------------------------------------------------------------------------
# The plan: what moves where, identical on every rank
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Param:
    """One megatron parameter in full: where its pieces are and the HF tensors it becomes."""

    hf_names: tuple[str, ...]
    layout: Layout
    dtype: torch.dtype
    shard_shape: tuple[int, ...]
    owners: list[int]  # owners[i]: the rank that sends piece i
    hf_shapes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def piece_bytes(self) -> int:
        return _numel(self.shard_shape) * _itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.piece_bytes * len(self.owners)


@dataclass
class _Bucket:
    params: list[int] = field(default_factory=list)
    # source rank -> [(param, piece, byte offset)] in its packed message, and the message's size
    segments: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)


@dataclass
class _Plan:
    version: int
    engine_version: int
    attention: AttentionShape
    params: list[_Param]
    buckets: list[_Bucket]
    engine_ranks: list[int] = field(default_factory=lambda: [0])

    @property
    def num_tensors(self) -> int:
        return sum(len(p.hf_names) for p in self.params)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.params)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _aligned(n: int) -> int:
    return n + (-n) % _ALIGN


def _natural_key(name: str) -> list:
    # Layer and expert numbers compare as numbers, so the order follows the model.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _few(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _build_plan(infos: list[dict], engine_ranks: int | Sequence[int], layouts: dict | None = None) -> _Plan:
    """The plan every rank derives from the gathered metadata; raises WeightSyncError listing every problem.
    ``layouts`` (kept by a ``WeightSync`` across its pushes): the parameters and buckets derived from pieces that
    are the same push after push (only versions and values change), keyed by everything they depend on, so that
    a push re-derives only when the layout changed."""
    engine_ranks = [engine_ranks] if isinstance(engine_ranks, int) else list(engine_ranks)
    engines = {r: infos[r]["engine"] for r in engine_ranks}
    assert all(e is not None for e in engines.values()), "an engine's rank sent no engine description"
    engine = engines[engine_ranks[0]]
    engine_version = engine["version"]
    trainers = [info for info in infos if info["pieces"] is not None]
    problems: list[str] = [f"rank {info['rank']}: {info['error']}" for info in infos if info["error"]]
    # Every engine of a fleet must be on the same version with the same checkpoint: a push moves them together.
    for r, other in engines.items():
        if other["version"] != engine_version:
            problems.append(
                f"the engines are on different versions (rank {engine_ranks[0]}: {engine_version}, rank {r}: "
                f"{other['version']}); a fleet moves together, restart the stray engine"
            )
        if other["schema"] != engine["schema"]:
            problems.append(f"the engine on rank {r} serves another checkpoint than the engine on rank {engine_ranks[0]}")
        if other.get("blocker"):
            problems.append(f"the engine on rank {r} cannot take an update: {other['blocker']}")
    # Each owner checked its own pieces (module docstring, "Protocol"): a non-finite weight stops every engine's
    # load before any byte moves, however the buckets fall.
    nonfinite = sorted({name for info in trainers for name in info.get("nonfinite") or []}, key=_natural_key)
    if nonfinite:
        problems.append(f"non-finite values (nan/inf) in {_few(nonfinite)}")

    versions = sorted({repr(info["version"]) for info in trainers})
    version = trainers[0]["version"] if trainers else None
    if not trainers:
        problems.append("no trainer rank takes part")
    elif len(versions) > 1:
        problems.append(f"trainer ranks push different versions ({', '.join(versions)})")
    elif isinstance(version, bool) or not isinstance(version, int) or version <= engine_version:
        problems.append(
            f"version {version!r} must be an integer above the engine's weight_version {engine_version} "
            "(a stale or repeated sync is refused)"
        )
    bucket_sizes = {info["bucket_bytes"] for info in trainers}
    if len(bucket_sizes) > 1:
        problems.append(f"trainer ranks use different bucket_bytes {sorted(bucket_sizes)}")
    attentions = {info["attention"] for info in trainers}
    if len(attentions) > 1:
        problems.append(f"trainer ranks disagree on the attention shape {sorted(attentions)}")

    attention = AttentionShape(*next(iter(attentions))) if attentions else AttentionShape(1, 1, 1)
    schema: dict[str, tuple[int, ...]] = engine["schema"]
    bucket_bytes = next(iter(bucket_sizes)) if bucket_sizes else 0
    key = None
    if layouts is not None and len(attentions) == 1 and len(bucket_sizes) == 1:
        key = (tuple((info["rank"], tuple(info["pieces"])) for info in trainers), attention, bucket_bytes,
               tuple(engine_ranks), tuple(schema.items()))
    layout = layouts.get(key) if key is not None else None
    if layout is None:
        layout = _layout(trainers, attention, schema, bucket_bytes, engine_ranks)
        if key is not None and not layout[2]:
            layouts.clear()  # one layout per WeightSync: its model's
            layouts[key] = layout
    ordered, buckets, layout_problems = layout
    problems += layout_problems
    if problems:
        raise WeightSyncError(
            f"weight sync to version {version!r} refused before any transfer: " + "; ".join(problems)
            + f". Nothing was sent; the engine stays on weight_version {engine_version}"
        )
    return _Plan(version, engine_version, attention, ordered, buckets, engine_ranks)


def _layout(trainers: list[dict], attention: AttentionShape, schema: dict[str, tuple[int, ...]], bucket_bytes: int,
            engine_ranks: list[int]) -> tuple[list[_Param], list[_Bucket], list[str]]:
    """The parameters in model order and their buckets, from the trainers' pieces and the engine's schema, and
    the problems found on the way (the plan refuses the push if there are any)."""
    problems: list[str] = []
    params: dict[tuple[str, ...], _Param] = {}
    for info in trainers:
        for names, layout, index, count, shape, dtype in info["pieces"]:
            if not 0 <= index < count:
                problems.append(f"{names[0]}: rank {info['rank']} sends piece {index} of {count}")
                continue
            param = params.get(names)
            if param is None:
                param = params[names] = _Param(names, Layout(layout), getattr(torch, dtype), shape, [-1] * count)
            described = (param.layout.value, len(param.owners), param.shard_shape, _dtype_name(param.dtype))
            if described != (layout, count, shape, dtype):
                problems.append(
                    f"{names[0]}: rank {info['rank']} holds a piece as (layout, pieces, shape, dtype) = "
                    f"{(layout, count, shape, dtype)}, another rank as {described}"
                )
                continue
            if param.owners[index] != -1:
                problems.append(
                    f"{names[0]}: piece {index} is owned by both rank {param.owners[index]} and {info['rank']}"
                )
            param.owners[index] = info["rank"]

    sent: dict[str, tuple[int, ...]] = {}
    for param in params.values():
        missing_pieces = [i for i, owner in enumerate(param.owners) if owner == -1]
        if missing_pieces:
            problems.append(f"{param.hf_names[0]}: no rank owns piece(s) {missing_pieces} of {len(param.owners)}")
        if not param.dtype.is_floating_point:
            problems.append(f"{param.hf_names[0]}: dtype {param.dtype} is not floating-point")
        try:
            full = torch.empty(full_shape(param.layout, param.shard_shape, len(param.owners)), device="meta")
            param.hf_shapes = [tuple(t.shape) for t in megatron_to_hf(param.layout, full, attention)]
        except (RuntimeError, ValueError) as exc:
            problems.append(f"{param.hf_names[0]}: a {param.layout.value} piece of shape {param.shard_shape} "
                            f"does not split into HF tensors ({exc})")
            continue
        sent.update(zip(param.hf_names, param.hf_shapes))

    unknown = sorted(set(sent) - set(schema), key=_natural_key)
    missing = sorted(set(schema) - set(sent), key=_natural_key)
    wrong = [f"{name}: sent {sent[name]}, engine expects {schema[name]}"
             for name in sorted(set(sent) & set(schema), key=_natural_key) if tuple(sent[name]) != tuple(schema[name])]
    if missing:
        problems.append(f"{len(missing)} tensor(s) the engine needs are not sent: {_few(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) the engine does not have: {_few(unknown)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s): {_few(wrong)}")
    if problems:
        return [], [], problems
    ordered = sorted(params.values(), key=lambda p: _natural_key(p.hf_names[0]))
    buckets: list[_Bucket] = []
    filled = 0
    for index, param in enumerate(ordered):
        if not buckets or (buckets[-1].params and filled + param.nbytes > bucket_bytes):
            buckets.append(_Bucket())
            filled = 0
        bucket = buckets[-1]
        bucket.params.append(index)
        filled += param.nbytes
        for piece, owner in enumerate(param.owners):
            if engine_ranks == [owner]:
                continue  # the only engine's rank reads its own pieces in place and sends nothing
            offset = bucket.sizes.get(owner, 0)
            bucket.segments.setdefault(owner, []).append((index, piece, offset))
            bucket.sizes[owner] = offset + _aligned(param.piece_bytes)
    return ordered, buckets, problems


def _piece_view(buffer: torch.Tensor, offset: int, param: _Param) -> torch.Tensor:
    return buffer[offset : offset + param.piece_bytes].view(param.dtype).view(param.shard_shape)


class _SharedMemory:
    """A rank's shared-memory segments (module docstring, "Shared memory"): the one it packs into and the mapped
    segments of the other senders, kept across pushes by its ``WeightSync``."""

    DIRECTORY = "/dev/shm"
    _ids = itertools.count()

    def __init__(self) -> None:
        self.own: tuple[str, torch.Tensor] | None = None
        self.peers: dict[int, tuple[str, torch.Tensor]] = {}
        self._unlink: list[str] = []

    @classmethod
    def host(cls) -> str | None:
        """This machine's identity (host name and boot id), or None where there is no shared-memory directory."""
        if not os.path.isdir(cls.DIRECTORY):
            return None
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
        except OSError:
            return None
        return f"{socket.gethostname()}/{boot}"

    def segment(self, size: int) -> tuple[str, torch.Tensor]:
        """This rank's segment of at least ``size`` bytes (reused while large enough)."""
        if self.own is None or self.own[1].numel() < size:
            self.own = None  # drop the old mapping before the new one exists
            path = os.path.join(self.DIRECTORY, f"sapo_megatron-weight-sync-{os.getpid()}-{next(self._ids)}")
            self._unlink.append(path)
            self.own = (path, torch.from_file(path, shared=True, size=size, dtype=torch.uint8))
        return self.own[0], self.own[1][:size]

    def peer(self, rank: int, path: str | None, size: int) -> torch.Tensor:
        """Sender ``rank``'s segment, mapped once per file."""
        if path is None:
            raise RuntimeError(f"rank {rank} has no shared-memory segment")
        held = self.peers.get(rank)
        if held is None or held[0] != path or held[1].numel() < size:
            self.peers.pop(rank, None)
            self.peers[rank] = (path, torch.from_file(path, shared=True, size=size, dtype=torch.uint8))
        return self.peers[rank][1]

    def unlink_new_files(self) -> None:
        """Removes the names of the segments created in this push (every peer has mapped them by now); the
        memory lives on in the mappings."""
        while self._unlink:
            try:
                os.unlink(self._unlink.pop())
            except FileNotFoundError:
                pass

    def release(self) -> None:
        self.unlink_new_files()
        self.own = None
        self.peers.clear()


# ----------------------------------------------------------------------------------------------------------
# One push, on one rank
# ----------------------------------------------------------------------------------------------------------


class _Exchange:
    """Runs the protocol of the module docstring on this rank: as a sender (a trainer rank), as a receiver (an
    engine's rank), or both at once (the rank of a colocated engine, which also owns pieces the other engines
    need). ``target`` is this rank's engine side (``schema``, ``weight_version``, and ``start_update(version)``
    when ``stream``, else ``update_weights(named, version)``) on an engine's rank, ``None`` elsewhere."""

    def __init__(
        self,
        group: SyncGroup,
        engine_ranks: Sequence[int],
        target: "WeightTarget | None",
        staging_device: torch.device | None,
        pack_buffers: list[torch.Tensor | None] | None = None,
        shared: _SharedMemory | None = None,
        *,
        stream: bool = False,
        layouts: dict | None = None,
    ) -> None:
        self.group = group
        self.engine_ranks = list(engine_ranks)
        self.target = target
        self.staging_device = staging_device
        # A sender's packing buffers, owned by its WeightSync so that later pushes reuse them.
        self.pack_buffers = pack_buffers if pack_buffers is not None else [None] * _MAX_IN_FLIGHT
        # Offered by a colocated WeightSync on CPU; used when every rank of the group is on this machine.
        self.shared = shared if group.device.type == "cpu" else None
        # Load each bucket as it is rebuilt (colocated engines) instead of the whole model once it has arrived.
        self.stream = stream
        # The plan's parameters and buckets of earlier pushes (see _build_plan), kept by the caller.
        self.layouts = layouts
        self.times = collections.Counter()
        self.sent_bytes = 0
        self.received_bytes = 0
        self.buffer_bytes = 0
        self.copied_bytes = 0
        self.loaded_buckets = 0

    def run(
        self,
        shards: "list[WeightShard] | None",
        *,
        version: Any = None,
        bucket_bytes: int = 0,
        attention: AttentionShape | None = None,
        error: str | None = None,
    ) -> SyncStats:
        start = time.perf_counter()
        me = self.group.rank
        local = {(s.hf_names, s.index): s.tensor for s in shards or []}
        nonfinite = None
        if shards is not None:
            tick = time.perf_counter()
            try:
                nonfinite = _nonfinite_pieces(shards)
            except Exception as exc:
                error = error or f"could not check its pieces for non-finite values: {type(exc).__name__}: {exc}"
            self.times["check"] += time.perf_counter() - tick
        info = {
            "rank": me,
            "version": version,
            "bucket_bytes": bucket_bytes,
            "attention": (attention.num_attention_heads, attention.num_query_groups, attention.head_dim)
            if attention
            else None,
            "pieces": None
            if shards is None
            else [
                (s.hf_names, s.layout.value, s.index, s.count, tuple(s.tensor.shape), _dtype_name(s.tensor.dtype))
                for s in shards
            ],
            "nonfinite": nonfinite,
            "engine": None,
            "error": error,
        }
        if me in self.engine_ranks:
            assert self.target is not None
            blocker = getattr(self.target, "update_blocker", None)
            info["engine"] = {"schema": self.target.schema, "version": self.target.weight_version,
                              "blocker": blocker() if callable(blocker) else None}
        info["shared_memory"] = _SharedMemory.host() if self.shared is not None else None
        infos = self.group.all_gather_object(info)
        plan = _build_plan(infos, self.engine_ranks, self.layouts)
        hosts = {i.get("shared_memory") for i in infos}
        shared = self.group.size > 1 and len(hosts) == 1 and None not in hosts
        self.times["metadata"] += time.perf_counter() - start

        try:
            if self.stream:
                return self._push_streamed(plan, local, shared, start)
            return self._push_staged(plan, local, start)
        finally:
            if self.shared is not None:
                self.shared.unlink_new_files()

    def _stats(self, plan: _Plan, start: float) -> SyncStats:
        return SyncStats(
            version=plan.version,
            bytes=plan.nbytes,
            num_tensors=plan.num_tensors,
            num_buckets=len(plan.buckets),
            seconds=time.perf_counter() - start,
            metadata_seconds=self.times["metadata"],
            export_seconds=self.times["export"],
            transfer_seconds=self.times["transfer"],
            load_seconds=self.times["load"],
            sent_bytes=self.sent_bytes,
            received_bytes=self.received_bytes,
            check_seconds=self.times["check"],
            buffer_bytes=self.buffer_bytes,
        )

    # -- colocated engines: each bucket is loaded as soon as it is rebuilt ----------------------------------

    def _push_streamed(self, plan: _Plan, local: dict, shared: bool, start: float) -> SyncStats:
        me = self.group.rank
        update: WeightUpdate | None = None
        consume = None
        if me in plan.engine_ranks:
            try:
                update = self.target.start_update(plan.version)
            except Exception as exc:
                refused = f"the engine refused to start the update ({type(exc).__name__}: {exc})"

                def consume(named: list[tuple[str, torch.Tensor]]) -> None:
                    # Still receive every bucket (the senders wait for this rank), loading nothing.
                    raise RuntimeError(refused)
            else:
                def consume(named: list[tuple[str, torch.Tensor]]) -> None:
                    update.load(named, finite_checked=True)  # every owner checked its pieces before the plan
                    self.loaded_buckets += 1
        try:
            error = (self._transfer_ring if shared else self._transfer)(plan, local, consume)
        except BaseException as exc:
            # A transport error (a peer died, a wait timed out): the other ranks fail in the transport too. An
            # engine that loaded part of the version must not serve it.
            if update is not None:
                update.abort(f"the push of version {plan.version} broke off ({_first_line(exc)})")
            raise

        # Each engine settles on its own state: all buckets loaded without an error anywhere it could see (a
        # sender's failure to pack reaches every engine with the bucket) makes the version current; otherwise the
        # update is aborted, which leaves the engine untouched if nothing was loaded and unusable if something was.
        state = None
        tick = time.perf_counter()
        if me in plan.engine_ranks and update is None:
            state = {"loaded": False, "committed": False, "failure": None, "version": self.target.weight_version}
        if update is not None:
            failure = None
            committed = error is None and self.loaded_buckets == len(plan.buckets)
            if committed:
                try:
                    update.commit()
                except Exception as exc:
                    committed, failure = False, f"{type(exc).__name__}: {exc}"
            else:
                update.abort(f"the push of version {plan.version} failed ({error})")
            state = {"loaded": update.loaded, "committed": committed, "failure": failure,
                     "version": self.target.weight_version}
        self.times["load"] += time.perf_counter() - tick
        tick = time.perf_counter()
        outcomes = self.group.all_gather_object((error, state))
        self.times["transfer"] += time.perf_counter() - tick
        errors = [e for e, _ in outcomes if e]
        failures = [f"engine on rank {r}: {st['failure']}" for r, (_, st) in enumerate(outcomes) if st and st["failure"]]
        if not errors and not failures:
            return self._stats(plan, start)

        engines = {r: outcomes[r][1] for r in plan.engine_ranks}
        what = (f"weight sync to version {plan.version} failed while loading into the engine ({'; '.join(failures)})"
                if failures else f"weight sync to version {plan.version} failed during the transfer")
        if errors:
            what += f": {'; '.join(errors)}"
        if not any(st["loaded"] for st in engines.values()):
            raise WeightSyncError(f"{what}. Nothing was loaded; the engine stays on weight_version {plan.engine_version}")
        mixed = [r for r, st in engines.items() if st["loaded"] and not st["committed"]]
        served = [r for r, st in engines.items() if st["committed"]]
        untouched = [r for r, st in engines.items() if not st["loaded"]]
        states = []
        if mixed:
            states.append(
                f"the engine(s) on rank(s) {', '.join(map(str, mixed))} loaded part of version {plan.version} and are "
                f"now unusable: their weights mix weight_version {plan.engine_version} and {plan.version}, and the run "
                "cannot continue on mixed weights (restart the engines)"
            )
        if served:
            states.append(f"the engine(s) on rank(s) {', '.join(map(str, served))} loaded all of it and serve "
                          f"weight_version {plan.version}")
        if untouched:
            states.append(f"the engine(s) on rank(s) {', '.join(map(str, untouched))} loaded nothing and stay on "
                          f"weight_version {plan.engine_version}")
        raise WeightSyncError(f"{what}. " + "; ".join(states))

    def _consume(self, consume, b: int, named: list[tuple[str, torch.Tensor]]) -> str | None:
        tick = time.perf_counter()
        try:
            consume(named)
            return None
        except Exception as exc:
            return f"rank {self.group.rank} could not load bucket {b} into its engine: {type(exc).__name__}: {exc}"
        finally:
            self.times["load"] += time.perf_counter() - tick

    def _hold(self, nbytes: int) -> None:
        self.buffer_bytes = max(self.buffer_bytes, nbytes)

    # -- remote engines: the whole model arrives, then one checked load --------------------------------------

    def _push_staged(self, plan: _Plan, local: dict, start: float) -> SyncStats:
        me = self.group.rank
        staged: list[tuple[str, torch.Tensor]] = []
        error = self._transfer(plan, local, staged.extend if me in plan.engine_ranks else None)
        # The receive buffers stay alive until the load: the rebuilt tensors are views of them.
        self._hold(self.received_bytes + self.copied_bytes)
        if error is not None:
            staged = []

        # Waiting here is waiting for the other ranks to finish their part of the transfer.
        tick = time.perf_counter()
        outcomes = self.group.all_gather_object(error)
        self.times["transfer"] += time.perf_counter() - tick
        failed = [message for message in outcomes if message]
        if failed:
            raise WeightSyncError(
                f"weight sync to version {plan.version} failed during the transfer: {'; '.join(failed)}. "
                f"Nothing was loaded; the engine stays on weight_version {plan.engine_version}"
            )

        load_start = time.perf_counter()
        outcome = None
        cause: BaseException | None = None
        if me in self.engine_ranks:
            failure = None
            try:
                self.target.update_weights(staged, plan.version)
            except Exception as exc:  # reported to every rank below
                cause, failure = exc, f"{type(exc).__name__}: {exc}"
            del staged
            outcome = (failure, self.target.weight_version)
        results = self.group.all_gather_object(outcome)
        self.times["load"] += time.perf_counter() - load_start
        load_errors = [(r, *results[r]) for r in self.engine_ranks if results[r][0]]
        if load_errors:
            where = "; ".join(
                (f"engine on rank {r}: " if len(self.engine_ranks) > 1 else "") + f"{message}" for r, message, _ in load_errors
            )
            versions = ", ".join(str(results[r][1]) for r in self.engine_ranks)
            raise WeightSyncError(
                f"weight sync to version {plan.version} failed while loading into the engine ({where}); "
                f"the engine reports weight_version {versions}"
            ) from cause
        return self._stats(plan, start)

    # -- transports -------------------------------------------------------------------------------------------

    def _transfer(self, plan: _Plan, local: dict, consume) -> str | None:
        """Sends this rank's pieces to every other engine's rank and, on an engine's rank (``consume`` given),
        receives, rebuilds the full HF tensors of each bucket and hands them to ``consume``. Receives are posted
        one bucket ahead of any wait on a send, so ranks that both send and receive cannot wait on each other.
        Every message ends in a status block whose first byte says the sender could not pack it: the engines then
        stop loading at that bucket. Returns this rank's error, if any (the other buckets still travel, so that
        every rank finishes the round)."""
        me = self.group.rank
        receiving = consume is not None
        destinations = [e for e in plan.engine_ranks if e != me]
        send_error = receive_error = None
        in_flight: collections.deque = collections.deque()
        slot = 0
        pending = self._post(plan, 0) if receiving and plan.buckets else None
        for b, bucket in enumerate(plan.buckets):
            tick = time.perf_counter()
            if receiving:
                buffers, works = pending
                # Receive ahead: the next bucket's bytes arrive while this one is sent, rebuilt and loaded.
                pending = self._post(plan, b + 1) if b + 1 < len(plan.buckets) else None
            segments = bucket.segments.get(me) if destinations else None
            if segments:
                size = bucket.sizes[me]
                buffer = self._pack_buffer(slot, size + _ALIGN)
                slot = (slot + 1) % _MAX_IN_FLIGHT
                if send_error is None:
                    try:
                        for index, piece, offset in segments:
                            param = plan.params[index]
                            _piece_view(buffer, offset, param).copy_(local[(param.hf_names, piece)])
                    except Exception as exc:
                        send_error = f"rank {me} could not pack bucket {b}: {type(exc).__name__}: {exc}"
                buffer[size] = int(send_error is not None)
                tock = time.perf_counter()
                self.times["export"] += tock - tick
                in_flight.append([self.group.send(buffer, dst, b) for dst in destinations])
                self.sent_bytes += size * len(destinations)
                # The next bucket is packed into the buffer of the oldest sends, so those must be complete.
                while len(in_flight) >= _MAX_IN_FLIGHT:
                    for work in in_flight.popleft():
                        work.wait()
                self.times["transfer"] += time.perf_counter() - tock
            if not receiving:
                continue
            tick = time.perf_counter()
            for work in works:
                work.wait()
            tock = time.perf_counter()
            self.times["transfer"] += tock - tick
            held = sum(t.numel() for t in self.pack_buffers if t is not None) + sum(
                t.numel() for t in [*buffers.values(), *(pending[0].values() if pending else [])])
            if receive_error is not None or send_error is not None:
                # Drain the remaining buckets so every sender completes; a rank that could not pack stops its own
                # engine too, as every other engine stops at that bucket.
                continue
            try:
                if buffers:
                    flags = torch.stack([buffers[src][bucket.sizes[src]] for src in sorted(buffers)]).tolist()
                    unpacked = [src for src, flag in zip(sorted(buffers), flags) if flag]
                    if unpacked:
                        receive_error = f"rank(s) {', '.join(map(str, unpacked))} could not pack bucket {b}"
                        continue
                where = {(index, piece): offset for src in buffers for index, piece, offset in bucket.segments[src]}
                named, copied = self._rebuild(plan, bucket, local, buffers, where)
            except Exception as exc:
                receive_error = f"rank {me} could not rebuild bucket {b}: {type(exc).__name__}: {exc}"
                continue
            finally:
                self.times["export"] += time.perf_counter() - tock
            self._hold(held + copied)
            self.copied_bytes += copied
            receive_error = self._consume(consume, b, named)
            del named, buffers
        tick = time.perf_counter()
        while in_flight:
            for work in in_flight.popleft():
                work.wait()
        self.times["transfer"] += time.perf_counter() - tick
        if not receiving:
            self._hold(sum(t.numel() for t in self.pack_buffers if t is not None))
        return send_error or receive_error

    def _transfer_ring(self, plan: _Plan, local: dict, consume) -> str | None:
        """What :meth:`_transfer` does, through shared memory (module docstring, "Shared memory"): each sender
        packs bucket ``b`` into slot ``b % 2`` of its segment, one small all-gather per bucket says every slot is
        packed (and whether each sender could pack it), then each engine's rank rebuilds the bucket from views of
        the slots and loads it. An engine joins the all-gather of bucket ``b + 1`` only after loading bucket
        ``b``, so a slot is packed again only once every engine is done with what it held."""
        me = self.group.rank
        destinations = [e for e in plan.engine_ranks if e != me]
        slot = max((bucket.sizes.get(me, 0) for bucket in plan.buckets), default=0) if destinations else 0
        send_error = receive_error = None
        path = segment = None
        if slot:
            try:
                path, segment = self.shared.segment(2 * slot)
            except Exception as exc:
                send_error = f"rank {me} could not map its shared-memory segment: {type(exc).__name__}: {exc}"
        for b, bucket in enumerate(plan.buckets):
            tick = time.perf_counter()
            mine = bucket.segments.get(me) if destinations else None
            if mine and send_error is None:
                try:
                    base = (b % 2) * slot
                    for index, piece, offset in mine:
                        param = plan.params[index]
                        _piece_view(segment, base + offset, param).copy_(local[(param.hf_names, piece)])
                    self.sent_bytes += bucket.sizes[me] * len(destinations)
                except Exception as exc:
                    send_error = f"rank {me} could not pack bucket {b}: {type(exc).__name__}: {exc}"
            tock = time.perf_counter()
            self.times["export"] += tock - tick
            reports = self.group.all_gather_object((path, slot, send_error is not None))
            tick = time.perf_counter()
            self.times["transfer"] += tick - tock
            if consume is None or receive_error is not None or send_error is not None:
                continue  # a rank that could not pack stops its own engine too, as every other engine stops
            unpacked = [src for src in bucket.sizes if src != me and reports[src][2]]
            if unpacked:
                receive_error = f"rank(s) {', '.join(map(str, sorted(unpacked)))} could not pack bucket {b}"
                continue
            try:
                messages = {src: self.shared.peer(src, reports[src][0], 2 * reports[src][1])
                            for src in bucket.sizes if src != me}
                where = {(index, piece): (b % 2) * reports[src][1] + offset
                         for src, entries in bucket.segments.items() if src != me for index, piece, offset in entries}
                self.received_bytes += sum(size for src, size in bucket.sizes.items() if src != me)
                named, copied = self._rebuild(plan, bucket, local, messages, where)
            except Exception as exc:
                receive_error = f"rank {me} could not rebuild bucket {b}: {type(exc).__name__}: {exc}"
                continue
            finally:
                self.times["export"] += time.perf_counter() - tick
            self._hold(2 * slot + copied)
            receive_error = self._consume(consume, b, named)
            del named
        self._hold(2 * slot)
        return send_error or receive_error

    def _rebuild(self, plan: _Plan, bucket: _Bucket, local: dict, messages: dict[int, torch.Tensor],
                 where: dict[tuple[int, int], int]) -> tuple[list[tuple[str, torch.Tensor]], int]:
        """The HF tensors of ``bucket``: each parameter's pieces, this rank's own read in place and the others'
        as views of the sender's message (``messages[src]``, piece at byte ``where[(param, piece)]``); and the
        bytes of those that had to be copied (pieces concatenated, heads regrouped) rather than viewed."""
        me = self.group.rank
        out: list[tuple[str, torch.Tensor]] = []
        copied = 0
        for index in bucket.params:
            param = plan.params[index]
            pieces = [
                local[(param.hf_names, piece)]
                if owner == me
                else _piece_view(messages[owner], where[(index, piece)], param)
                for piece, owner in enumerate(param.owners)
            ]
            sources = {p.untyped_storage().data_ptr() for p in pieces}
            full = unshard(param.layout, pieces)
            for name, tensor in zip(param.hf_names, megatron_to_hf(param.layout, full, plan.attention)):
                if self.staging_device is not None:
                    tensor = tensor.to(self.staging_device)
                if tensor.untyped_storage().data_ptr() not in sources:
                    copied += tensor.numel() * tensor.element_size()
                out.append((name, tensor))
        return out, copied

    def _pack_buffer(self, slot: int, size: int) -> torch.Tensor:
        """``size`` bytes of packing buffer ``slot``; reused across buckets and pushes because fresh CPU memory
        costs a page fault per page on first touch, about as much as the copy into it."""
        held = self.pack_buffers[slot]
        if held is None or held.numel() < size or held.device != self.group.device:
            # Drop the old buffer before allocating its replacement, so the two never coexist.
            held = self.pack_buffers[slot] = None
            held = self.pack_buffers[slot] = torch.empty(size, dtype=torch.uint8, device=self.group.device)
        return held[:size]

    def _post(self, plan: _Plan, b: int) -> tuple[dict[int, torch.Tensor], list]:
        buffers, works = {}, []
        for src, size in sorted(plan.buckets[b].sizes.items()):
            if src == self.group.rank:
                continue  # this rank's own pieces are read in place
            buffers[src] = torch.empty(size + _ALIGN, dtype=torch.uint8, device=self.group.device)
            works.append(self.group.recv(buffers[src], src, b))
            self.received_bytes += size
        return buffers, works


def _nonfinite_pieces(shards: "list[WeightShard]") -> list[str]:
    """The HF names of the pieces among ``shards`` holding a nan or inf. A sum is finite only if every element is
    (nan and inf propagate): it reads each piece once without the temporary that a per-element isfinite
    allocates (about 10x faster on CPU); only pieces whose sum is not finite, including finite ones whose sum
    overflows, get the exact check. One host sync per device."""
    per_device: dict[torch.device, list[int]] = {}
    for i, shard in enumerate(shards):
        per_device.setdefault(shard.tensor.device, []).append(i)
    bad = []
    for indices in per_device.values():
        sums = torch.stack([shards[i].tensor.sum().float() for i in indices])
        suspects = [i for i, ok in zip(indices, torch.isfinite(sums).tolist()) if not ok]
        bad += [shards[i].hf_names[0] for i in suspects if not bool(torch.isfinite(shards[i].tensor).all())]
    return bad



# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------


class WeightSync:
    """Pushes the actor's weights into the rollout engines; see the module docstring for the API and protocol."""

    def __init__(
        self, bridge: "Qwen3MoeBridge", transport: Transport, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES
    ) -> None:
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
            raise ValueError(f"WeightSync(bucket_bytes={bucket_bytes!r}): must be an integer > 0")
        self.bridge = bridge
        self.transport = transport
        self.bucket_bytes = bucket_bytes
        self._pack_buffers: list[torch.Tensor | None] = [None] * _MAX_IN_FLIGHT
        self._shared = _SharedMemory()
        self._layouts: dict = {}

    def release_buffers(self) -> None:
        """Frees this rank's packing buffers and shared-memory segments (the next push allocates them again).
        Call it on every rank of the group: a segment's name is gone after its first push, so the others must
        drop their mappings of it too."""
        self._pack_buffers[:] = [None] * _MAX_IN_FLIGHT
        self._shared.release()

    @classmethod
    def colocated(
        cls,
        model: Any,
        engine: "WeightTarget | None" = None,
        *,
        engine_rank: int = 0,
        engine_ranks: Sequence[int] | None = None,
        group: Any = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        staging_device: str | torch.device | None = None,
    ) -> "WeightSync":
        """``model``: an ``ActorModel`` or its bridge. This rank's engine on an engine's rank, ``None`` elsewhere."""
        transport = ColocatedTransport(
            engine, engine_rank=engine_rank, engine_ranks=engine_ranks, group=group, staging_device=staging_device
        )
        return cls(getattr(model, "bridge", model), transport, bucket_bytes=bucket_bytes)

    @classmethod
    def remote(
        cls, model: Any, group: SyncGroup, *, num_engines: int = 1, bucket_bytes: int = DEFAULT_BUCKET_BYTES
    ) -> "WeightSync":
        """``group``: the sync group whose last ``num_engines`` ranks run :class:`WeightReceiver`."""
        return cls(getattr(model, "bridge", model), RemoteTransport(group, num_engines), bucket_bytes=bucket_bytes)

    def push(self, model_chunks: Sequence[torch.nn.Module], version: int) -> SyncStats:
        """Makes ``version`` every engine's weights: a collective over every rank of the transport's group."""
        shards, error = None, None
        try:
            shards = self.bridge.weight_shards(list(model_chunks))
        except Exception as exc:
            # Still take part, so that every rank raises the same error instead of the others hanging.
            shards, error = [], f"could not list its weight shards: {type(exc).__name__}: {exc}"
        transport = self.transport
        colocated = isinstance(transport, ColocatedTransport)
        exchange = _Exchange(transport.group, transport.engine_ranks, transport.engine, transport.staging_device,
                             self._pack_buffers, shared=self._shared if colocated else None, stream=colocated,
                             layouts=self._layouts)
        with torch.no_grad():
            return exchange.run(
                shards, version=version, bucket_bytes=self.bucket_bytes, attention=self.bridge.attention_shape,
                error=error,
            )


class WeightReceiver:
    """An engine's side of a remote push: one of the last ``num_engines`` ranks of ``group``, in the engine's
    process (for a ``vllm serve`` server, inside its worker: :mod:`sapo_megatron.rollout.weight_transfer`)."""

    def __init__(
        self, engine: WeightTarget, group: SyncGroup, *, num_engines: int = 1,
        staging_device: str | torch.device | None = None,
    ) -> None:
        first = group.size - num_engines
        if not (1 <= num_engines < group.size and group.rank >= first):
            raise ValueError(
                f"WeightReceiver: the engines must be the last num_engines={num_engines} ranks of the sync group "
                f"of {group.size}, not rank {group.rank}"
            )
        self.engine = engine
        self.group = group
        self.engine_ranks = list(range(first, group.size))
        self.staging_device = torch.device(staging_device) if staging_device is not None else None
        self._layouts: dict = {}

    def receive(self) -> SyncStats:
        """Takes part in one push of the trainer ranks; returns once the engine serves the pushed version."""
        exchange = _Exchange(self.group, self.engine_ranks, self.engine, self.staging_device, layouts=self._layouts)
        with torch.no_grad():
            return exchange.run(None)


__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "ColocatedTransport",
    "RemoteTransport",
    "DEFAULT_GROUP_TIMEOUT_S",
    "SyncGroup",
    "SyncGroupJoinError",
    "SyncStats",
    "Transport",
    "WeightReceiver",
    "WeightSync",
    "WeightSyncError",
    "WeightTarget",
]
