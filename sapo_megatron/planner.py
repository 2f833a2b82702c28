"""Launch and memory planning: where every rank, parallel group and rollout engine goes, and what each GPU holds.

``sapo-megatron plan RECIPE [overrides]`` prints the plan and refuses (``PlanError``, exit code 2) a layout that
does not divide the world size or does not fit ``launch.gpu_memory_gib - launch.gpu_reserved_gib`` on one GPU.
It needs no GPU and no weights: the architecture comes from ``config.json`` in ``model.hf_path``, from the
embedded tiny model's spec, or from a built-in preset (``PRESETS``; picked automatically when ``hf_path``'s last
component names it, e.g. ``.../Qwen3-30B-A3B-Base`` without a ``config.json``).

What is counted, per GPU (bytes; the formulas are in ``docs/planner.md``):

* **parameters** exactly as megatron-core holds them: attention and dense MLPs split over TP, experts split over
  EP and ETP, layers over PP, embedding / output layer on the first / last stage, norms and the router
  replicated. Dense parameters live in one DDP buffer, expert parameters (when EP > 1) in another.
* **gradients**: megatron DDP's fp32 buffers (``grad_reduce_in_fp32``, as ``actor.factory.wrap_in_ddp`` sets).
  With the distributed optimizer both buffers are padded (each parameter starts at a multiple of 64 elements,
  the buffer ends at a multiple of lcm(DP, 128)); ``padding_bound`` is the most that padding can add.
* **optimizer states**: Adam's two fp32 moments, plus an fp32 master copy when the parameters are not fp32,
  sharded by the distributed optimizer over DP x CP (dense) and over expert-DP (experts).
  ``optimizer.optimizer_cpu_offload`` moves master copy, moments and an fp32 gradient copy to the host
  (megatron's HybridDeviceOptimizer with ``optimizer_offload_fraction=1`` and the precision-aware optimizer).
* **activations** of one training step with and without full recompute (``model.recompute_activations``),
  from a per-token, per-layer count of the tensors autograd keeps (see ``ACTIVATION_ASSUMPTIONS``).
* **rollout engines**: weights / engine TP plus ``rollout.kv_cache_memory_bytes`` per GPU.

Colocated engines share the actor's GPUs, so the plan takes the peak over three phases: *train* (engines
asleep), *weight sync* (engine weights awake, actor parameters resident) and *rollout* (engine weights + KV cache
+ whatever the phase offloads ``optimizer.offload_params/grads/optimizer`` leave on the GPU). Remote engines
get their own nodes (``launch.rollout_nnodes``) and the phases separate.
"""

from __future__ import annotations

import itertools
import json
import math
import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sapo_megatron.bridge import SUPPORTED_MODEL_TYPES, moe_layer_pattern
from sapo_megatron.config import Config, ConfigError
from sapo_megatron.models.tiny import TINY_MODEL_NAME, TinyModelSpec

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# megatron DDP reduces gradients in fp32 (actor.factory.wrap_in_ddp sets grad_reduce_in_fp32=True).
GRAD_BYTES = 4
ADAM_MOMENT_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_COPY_BYTES = 4  # fp32 main parameters when the model's parameters are bf16 / fp16
# Host side of HybridDeviceOptimizer per optimizer element: fp32 parameter copy, two moments, pinned fp32 grad.
CPU_OPTIMIZER_BYTES = 4 + 8 + 4
# megatron's parameter-start alignment with the distributed optimizer (param_and_grad_buffer.py).
PARAM_ALIGNMENT = 64
BUCKET_ALIGNMENT = 128

ACTIVATION_ASSUMPTIONS = (
    "activations in the parameter dtype; flash attention (no [s, s] scores kept); no dropout; sequence "
    "parallelism whenever TP > 1; balanced routing (each rank's experts get top_k x its tokens); SwiGLU with "
    "fused bias-activation (keeps fc1's output, not the activation's); 1F1B pipeline schedule; full recompute "
    "keeps each layer's input and rebuilds one layer at a time; sequences padded to max_prompt_length + "
    "max_new_tokens + 1; logits of one micro-batch plus one transient copy on the last stage (their gradient "
    "reuses their storage)"
)


class PlanError(ConfigError):
    """A layout that cannot run: it does not divide the GPUs or does not fit their memory; names the key."""


# ----------------------------------------------------------------------------------------------------------
# The model's architecture
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the plan needs (a Qwen3-MoE ``config.json`` reduced to what costs memory)."""

    name: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    intermediate_size: int  # the dense MLP of layers that are not MoE
    moe_layers: tuple[bool, ...]
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, config: dict, name: str) -> "ModelShape":
        """From a Qwen3-MoE ``config.json``; the MoE layers by the bridge's rule (transformers')."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise PlanError(
                f"model.hf_path: model_type={model_type!r} in {name}; the planner knows "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        layers = int(config["num_hidden_layers"])
        # The published Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts.
        experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
        heads = int(config["num_attention_heads"])
        return cls(
            name=name,
            hidden_size=int(config["hidden_size"]),
            num_layers=layers,
            num_attention_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
            vocab_size=int(config["vocab_size"]),
            num_experts=experts,
            top_k=int(config.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(config.get("moe_intermediate_size") or 0),
            intermediate_size=int(config.get("intermediate_size") or 0),
            moe_layers=tuple(bool(moe) for moe in moe_layer_pattern(config)),
            attention_bias=bool(config.get("attention_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @property
    def total_params(self) -> int:
        layers = 0
        for i in range(self.num_layers):
            counts = layer_param_counts(self, i, TensorSplit())
            layers += counts["dense"] + counts["expert"]
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return layers + embeddings + self.hidden_size  # + the final norm

    @property
    def active_params(self) -> int:
        """Parameters one token passes through (top_k of the experts)."""
        inactive = sum(
            (self.num_experts - self.top_k) * 3 * self.moe_intermediate_size * self.hidden_size
            for moe in self.moe_layers
            if moe
        )
        return self.total_params - inactive


# Qwen3-30B-A3B (Base / Instruct / Thinking share it): the published config.json.
QWEN3_30B_A3B = ModelShape(
    name="Qwen3-30B-A3B (built-in preset)",
    hidden_size=2048,
    num_layers=48,
    num_attention_heads=32,
    num_kv_heads=4,
    head_dim=128,
    vocab_size=151936,
    num_experts=128,
    top_k=8,
    moe_intermediate_size=768,
    intermediate_size=6144,
    moe_layers=(True,) * 48,
)
PRESETS = {"qwen3-30b-a3b": QWEN3_30B_A3B}


def _tiny_shape(dense: bool) -> ModelShape:
    spec = TinyModelSpec(dense=dense)
    return ModelShape(
        name=f"tiny-qwen3-moe{'-dense' if dense else ''} (embedded spec)",
        hidden_size=spec.hidden_size,
        num_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_kv_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        vocab_size=spec.vocab_size,
        num_experts=spec.num_experts,
        top_k=spec.num_experts_per_tok,
        moe_intermediate_size=spec.moe_intermediate_size,
        intermediate_size=spec.intermediate_size,
        moe_layers=(not dense,) * spec.num_hidden_layers,
    )


def resolve_model_shape(cfg: Config, preset: str | None = None) -> ModelShape:
    """``preset`` if given, else the tiny spec, ``model.hf_path/config.json``, or a preset named by the path."""
    if preset is not None:
        key = preset.lower()
        if key not in PRESETS:
            raise PlanError(f"--preset {preset!r}: unknown; use one of {', '.join(PRESETS)}")
        return PRESETS[key]
    hf_path = cfg.model.hf_path
    if hf_path == TINY_MODEL_NAME:
        return _tiny_shape(cfg.model.dense)
    config_file = Path(hf_path) / "config.json"
    if config_file.is_file():
        shape = ModelShape.from_hf_config(json.loads(config_file.read_text()), str(config_file))
        return _densified(shape) if cfg.model.dense else shape
    leaf = Path(hf_path).name.lower()
    for key, shape in PRESETS.items():
        if leaf.startswith(key):
            shape = replace(shape, name=f"{shape.name}, matched by model.hf_path={hf_path!r} (no config.json there)")
            return _densified(shape) if cfg.model.dense else shape
    raise PlanError(
        f"model.hf_path={hf_path!r} has no config.json and names no built-in preset; point it at a Hugging Face "
        f"model directory or pass --preset ({', '.join(PRESETS)})"
    )


def _densified(shape: ModelShape) -> ModelShape:
    return replace(shape, name=shape.name + ", dense control", moe_layers=(False,) * shape.num_layers)


# ----------------------------------------------------------------------------------------------------------
# Parameters per rank
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSplit:
    tensor: int = 1
    expert: int = 1
    expert_tensor: int = 1


def layer_param_counts(shape: ModelShape, layer: int, split: TensorSplit) -> dict[str, int]:
    """One rank's parameters of decoder layer ``layer``: {'dense': ..., 'expert': ..., '*_tensors': ...}.

    'dense' parameters are reduced over data parallelism, 'expert' ones over expert-data parallelism;
    the tensor counts bound the distributed optimizer's alignment padding.
    """
    h, t = shape.hidden_size, split.tensor
    heads, kv, d = shape.num_attention_heads, shape.num_kv_heads, shape.head_dim
    qkv_rows = (heads + 2 * kv) * d
    dense = h + qkv_rows * h // t + 2 * d + heads * d * h // t + h  # input norm, qkv, q/k norms, proj, mlp norm
    dense_tensors = 6
    if shape.attention_bias:
        dense += qkv_rows // t
        dense_tensors += 1
    expert = expert_tensors = 0
    if shape.moe_layers[layer]:
        dense += shape.num_experts * h  # the router is replicated on every TP rank
        dense_tensors += 1
        local_experts = shape.num_experts // split.expert
        expert = local_experts * 3 * shape.moe_intermediate_size * h // split.expert_tensor
        expert_tensors = 2 * local_experts  # fc1 (gate and up fused) and fc2 per expert
    else:
        dense += 3 * shape.intermediate_size * h // t
        dense_tensors += 2
    return {"dense": dense, "expert": expert, "dense_tensors": dense_tensors, "expert_tensors": expert_tensors}


@dataclass(frozen=True)
class StageParams:
    """The parameters one rank of pipeline stage ``stage`` holds (all its virtual-pipeline chunks).

    ``dense`` is what megatron's DDP reduces over DP x CP, ``expert`` what it reduces over expert-DP.
    """

    stage: int
    layers: tuple[int, ...]
    dense: int
    expert: int
    dense_tensors: int
    expert_tensors: int

    @property
    def total(self) -> int:
        return self.dense + self.expert


def stage_layers(num_layers: int, pipeline: int, virtual_pipeline: int) -> list[tuple[int, ...]]:
    """Decoder layers of each pipeline rank; with interleaving, rank p holds virtual stages p, p + PP, ..."""
    chunks = pipeline * max(1, virtual_pipeline)
    per_chunk = num_layers // chunks
    out = []
    for rank in range(pipeline):
        layers: list[int] = []
        for virtual_stage in range(rank, chunks, pipeline):
            layers.extend(range(virtual_stage * per_chunk, (virtual_stage + 1) * per_chunk))
        out.append(tuple(layers))
    return out


def stage_params(shape: ModelShape, cfg: Config) -> list[StageParams]:
    p = cfg.parallel
    split = TensorSplit(p.tensor, p.expert, p.expert_tensor_size)
    h, vocab_shard = shape.hidden_size, shape.vocab_size // p.tensor
    stages = []
    for stage, layers in enumerate(stage_layers(shape.num_layers, p.pipeline, p.virtual_pipeline)):
        counts = {"dense": 0, "expert": 0, "dense_tensors": 0, "expert_tensors": 0}
        for layer in layers:
            for key, value in layer_param_counts(shape, layer, split).items():
                counts[key] += value
        if p.expert == 1:
            # megatron-core marks expert weights as expert-parallel only when EP > 1; otherwise they share the
            # dense buffer and are reduced (and sharded) over DP like everything else.
            counts["dense"] += counts.pop("expert")
            counts["dense_tensors"] += counts.pop("expert_tensors")
            counts["expert"] = counts["expert_tensors"] = 0
        if stage == 0:
            counts["dense"] += vocab_shard * h  # word embeddings
            counts["dense_tensors"] += 1
        if stage == p.pipeline - 1:
            counts["dense"] += h + vocab_shard * h  # final norm, output layer (untied)
            counts["dense_tensors"] += 2
        stages.append(StageParams(stage=stage, layers=layers, **counts))
    return stages


def padding_bound(num_tensors: int, shard_group: int, distributed_optimizer: bool) -> int:
    """Most elements megatron's buffer alignment can add to one DDP buffer holding ``num_tensors`` tensors.

    Assumes one bucket per buffer, which is what megatron builds when ``overlap_grad_reduce`` is off.
    """
    if not distributed_optimizer or num_tensors == 0:
        return 0
    return (PARAM_ALIGNMENT - 1) * num_tensors + math.lcm(shard_group, BUCKET_ALIGNMENT) - 1


# ----------------------------------------------------------------------------------------------------------
# Layout: ranks, groups, engines
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    world_size: int  # actor ranks
    nnodes: int
    gpus_per_node: int
    tensor: int
    pipeline: int
    context: int
    data: int
    expert: int
    expert_tensor: int
    expert_data: int
    # name -> list of rank groups, with megatron-core's "tp-cp-ep-dp-pp" order
    groups: dict[str, list[list[int]]]
    engines: list[dict[str, Any]]  # {"index", "tensor_parallel", "node", "gpus", "ranks"}
    rollout_nnodes: int
    rollout_mode: str


def _rank_groups(dims: list[tuple[str, int]], vary: tuple[str, ...]) -> list[list[int]]:
    """Groups of ranks that differ only in the ``vary`` dimensions; ``dims`` fastest-varying first."""
    sizes = [size for _, size in dims]
    strides = [math.prod(sizes[:i]) for i in range(len(sizes))]
    fixed = [i for i, (name, _) in enumerate(dims) if name not in vary]
    varying = [i for i, (name, _) in enumerate(dims) if name in vary]
    groups = []
    for fixed_index in itertools.product(*(range(sizes[i]) for i in reversed(fixed))):
        base = sum(strides[i] * v for i, v in zip(reversed(fixed), fixed_index))
        ranks = []
        for varying_index in itertools.product(*(range(sizes[i]) for i in reversed(varying))):
            ranks.append(base + sum(strides[i] * v for i, v in zip(reversed(varying), varying_index)))
        groups.append(sorted(ranks))
    return sorted(groups)


def parallel_groups(cfg: Config) -> dict[str, list[list[int]]]:
    """Every group megatron-core builds for this layout (its default order ``tp-cp-ep-dp-pp``)."""
    p, world = cfg.parallel, cfg.launch.world_size
    data = world // (p.tensor * p.pipeline * p.context)
    expert_data = world // (p.expert * p.expert_tensor_size * p.pipeline)
    dense_dims = [("tp", p.tensor), ("cp", p.context), ("dp", data), ("pp", p.pipeline)]
    expert_dims = [("tp", p.expert_tensor_size), ("ep", p.expert), ("dp", expert_data), ("pp", p.pipeline)]
    groups = {
        "TP": _rank_groups(dense_dims, ("tp",)),
        "PP": _rank_groups(dense_dims, ("pp",)),
        "DP": _rank_groups(dense_dims, ("dp",)),
        "EP": _rank_groups(expert_dims, ("ep",)),
        "ETP": _rank_groups(expert_dims, ("tp",)),
        "EDP": _rank_groups(expert_dims, ("dp",)),
    }
    if p.context > 1:
        groups["CP"] = _rank_groups(dense_dims, ("cp",))
        groups["DPxCP"] = _rank_groups(dense_dims, ("cp", "dp"))
    return groups


def check_layout(cfg: Config, shape: ModelShape) -> Layout:
    """The checks ``init_distributed`` and the bridge make, without a process group; ``PlanError`` names the key."""
    # torch: a plan is made without it until here (`sapo-megatron plan` on a laptop starts in a blink).
    from sapo_megatron.actor.parallel import check_layout as check_actor_layout

    p, launch, rollout = cfg.parallel, cfg.launch, cfg.rollout
    world = launch.world_size
    # What init_distributed would refuse, for the device the run is meant for (a plan is for GPUs unless
    # the recipe says cpu).
    try:
        data = check_actor_layout(p, world, "cpu" if cfg.trainer.device == "cpu" else "cuda")
    except (ValueError, ConfigError) as exc:
        raise PlanError(str(exc)) from None
    expert_data = world // (p.expert * p.expert_tensor_size * p.pipeline)

    # What the bridge refuses when it builds the model (sapo_megatron.bridge.qwen3_moe._check_divisibility).
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise PlanError(message)

    need(not shape.tie_word_embeddings, f"{shape.name}: tied embeddings are not supported by the Qwen3-MoE bridge")
    need(shape.vocab_size % p.tensor == 0, f"parallel.tensor={p.tensor} does not divide vocab_size {shape.vocab_size}")
    need(
        shape.num_kv_heads % p.tensor == 0,
        f"parallel.tensor={p.tensor} does not divide the {shape.num_kv_heads} key/value heads of {shape.name}",
    )
    need(
        shape.num_attention_heads % p.tensor == 0,
        f"parallel.tensor={p.tensor} does not divide the {shape.num_attention_heads} attention heads",
    )
    chunks = p.pipeline * max(1, p.virtual_pipeline)
    need(
        shape.num_layers % chunks == 0,
        f"parallel.pipeline={p.pipeline} x virtual_pipeline={max(1, p.virtual_pipeline)} does not divide the "
        f"{shape.num_layers} layers",
    )
    if any(shape.moe_layers):
        need(
            shape.num_experts % p.expert == 0,
            f"parallel.expert={p.expert} does not divide the {shape.num_experts} experts",
        )
        need(
            shape.moe_intermediate_size % p.expert_tensor_size == 0,
            f"parallel.expert_tensor={p.expert_tensor_size} does not divide moe_intermediate_size "
            f"{shape.moe_intermediate_size}",
        )
        need(
            p.tensor == 1 or p.sequence_parallel,
            f"parallel.sequence_parallel=false with parallel.tensor={p.tensor}: megatron-core trains MoE layers "
            "under tensor parallelism only with sequence parallelism; set parallel.sequence_parallel=true",
        )
    if not all(shape.moe_layers):
        need(
            shape.intermediate_size % p.tensor == 0,
            f"parallel.tensor={p.tensor} does not divide intermediate_size {shape.intermediate_size}",
        )

    # Rollout engines: one engine never spans nodes (its TP group talks over NVLink).
    engine_tp = rollout.engine_tensor_parallel
    need(
        launch.nproc_per_node % engine_tp == 0,
        f"rollout.engine_tensor_parallel={engine_tp} does not divide launch.nproc_per_node={launch.nproc_per_node}: "
        "an engine must fit inside one node",
    )
    need(
        shape.num_attention_heads % engine_tp == 0,
        f"rollout.engine_tensor_parallel={engine_tp} does not divide the {shape.num_attention_heads} attention heads",
    )
    engine_gpus = rollout.num_engines * engine_tp
    if rollout.mode == "colocated":
        need(
            launch.rollout_nnodes == 0,
            f"launch.rollout_nnodes={launch.rollout_nnodes} with rollout.mode=colocated: colocated engines use the "
            "actor's GPUs; set launch.rollout_nnodes=0 or rollout.mode=remote",
        )
        need(
            engine_gpus <= world,
            f"rollout.num_engines={rollout.num_engines} x rollout.engine_tensor_parallel={engine_tp} = {engine_gpus} "
            f"GPUs, but the colocated engines share the actor's {world} GPUs",
        )
        first_gpu = 0
    else:
        rollout_gpus = launch.rollout_nnodes * launch.nproc_per_node
        need(
            launch.rollout_nnodes >= 1,
            "rollout.mode=remote needs GPUs of its own: set launch.rollout_nnodes >= 1 (nodes that run only engines)",
        )
        need(
            engine_gpus <= rollout_gpus,
            f"rollout.num_engines={rollout.num_engines} x rollout.engine_tensor_parallel={engine_tp} = {engine_gpus} "
            f"GPUs, but launch.rollout_nnodes={launch.rollout_nnodes} x launch.nproc_per_node="
            f"{launch.nproc_per_node} = {rollout_gpus}",
        )
        first_gpu = world  # engine ranks follow the actor's ranks
    engines = []
    for index in range(rollout.num_engines):
        start = first_gpu + index * engine_tp
        ranks = list(range(start, start + engine_tp))
        engines.append(
            {
                "index": index,
                "tensor_parallel": engine_tp,
                "node": start // launch.nproc_per_node,
                "gpus": [r % launch.nproc_per_node for r in ranks],
                "ranks": ranks,
            }
        )
    return Layout(
        world_size=world,
        nnodes=launch.nnodes,
        gpus_per_node=launch.nproc_per_node,
        tensor=p.tensor,
        pipeline=p.pipeline,
        context=p.context,
        data=data,
        expert=p.expert,
        expert_tensor=p.expert_tensor_size,
        expert_data=expert_data,
        groups=parallel_groups(cfg),
        engines=engines,
        rollout_nnodes=launch.rollout_nnodes,
        rollout_mode=rollout.mode,
    )


# ----------------------------------------------------------------------------------------------------------
# Memory per GPU
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateMemory:
    """Model state of one rank (a pipeline stage's worst case), in bytes and elements."""

    stage: int
    params: int  # parameter count on the rank
    dense_params: int
    expert_params: int
    param_bytes: int
    grad_bytes: int
    optimizer_elements: int  # fp32 elements the distributed optimizer owns on this rank (dense + expert shard)
    optimizer_gpu_bytes: int
    optimizer_host_bytes: int  # with optimizer_cpu_offload
    dense_padding_bound: int  # elements
    expert_padding_bound: int


def state_memory(shape: ModelShape, cfg: Config, layout: Layout) -> list[StateMemory]:
    """Parameters, gradient buffers and optimizer states of one rank of each pipeline stage."""
    opt = cfg.optimizer
    param_bytes = DTYPE_BYTES[cfg.model.params_dtype]
    dense_group = layout.data * layout.context
    distributed = opt.use_distributed_optimizer
    out = []
    for stage in stage_params(shape, cfg):
        dense_shard = math.ceil(stage.dense / dense_group) if distributed else stage.dense
        expert_shard = math.ceil(stage.expert / layout.expert_data) if distributed else stage.expert
        optimizer_elements = dense_shard + expert_shard
        per_element = ADAM_MOMENT_BYTES + (MASTER_COPY_BYTES if param_bytes != 4 else 0)
        on_host = opt.optimizer_cpu_offload
        out.append(
            StateMemory(
                stage=stage.stage,
                params=stage.total,
                dense_params=stage.dense,
                expert_params=stage.expert,
                param_bytes=stage.total * param_bytes,
                grad_bytes=stage.total * GRAD_BYTES,
                optimizer_elements=optimizer_elements,
                optimizer_gpu_bytes=0 if on_host else optimizer_elements * per_element,
                optimizer_host_bytes=optimizer_elements * CPU_OPTIMIZER_BYTES if on_host else 0,
                dense_padding_bound=padding_bound(stage.dense_tensors, dense_group, distributed),
                expert_padding_bound=padding_bound(stage.expert_tensors, layout.expert_data, distributed),
            )
        )
    return out


def attention_bytes_per_token(shape: ModelShape, cfg: Config) -> float:
    """Bytes autograd keeps per token for one attention block (input norm .. output projection)."""
    t, b = cfg.parallel.tensor, DTYPE_BYTES[cfg.model.params_dtype]
    h, a, g, d = shape.hidden_size, shape.num_attention_heads, shape.num_kv_heads, shape.head_dim
    # norm input + qkv input (h each); the qkv output behind the q/k-norm views ((a + 2g) d); q, k after
    # norm and RoPE ((a + g) d); the attention output = projection input (a d); fp32 softmax statistics (4 a).
    return (b * (2 * h + (3 * a + 3 * g) * d) + 4 * a) / t


def mlp_bytes_per_token(shape: ModelShape, cfg: Config, moe: bool) -> float:
    """Bytes autograd keeps per token for one MLP block (pre-MLP norm .. output), routed or dense."""
    p, b = cfg.parallel, DTYPE_BYTES[cfg.model.params_dtype]
    t, h = p.tensor, shape.hidden_size
    if not moe:
        # norm input, fc1 input, fc1 output (gate and up), fc2 input
        return b * (2 * h + 3 * shape.intermediate_size) / t
    k, f, e = shape.top_k, shape.moe_intermediate_size, p.expert_tensor_size
    # norm input and router input (h each); fp32 router scores and probabilities (8 E); per routed copy: the
    # expert input gathered over ETP (e h), fc1 output (2 f), fc2 input (f), fc2 output kept for the
    # probability weighting (h).
    return (b * (2 * h + k * (e * h + 3 * f + h)) + 8 * shape.num_experts) / t


@dataclass(frozen=True)
class ActivationMemory:
    stage: int
    tokens_per_micro_batch: int  # per rank (after context parallelism)
    micro_batches: int  # per optimizer step, per data-parallel rank
    in_flight: float  # micro-batches of this stage's layers alive at once (1F1B)
    layer_bytes_per_token: float  # largest single layer
    stage_bytes_per_token: float  # all layers of the stage
    logits_bytes: int
    no_recompute: int
    recompute: int


def sequence_length(cfg: Config) -> int:
    """Longest training row: prompt + response + 1, rounded up for sequence parallelism (as the trainer pads)."""
    length = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens + 1
    multiple = cfg.parallel.tensor if cfg.parallel.sequence_parallel else 1
    return length + (-length) % multiple


def activation_memory(shape: ModelShape, cfg: Config, layout: Layout) -> list[ActivationMemory]:
    p, b = cfg.parallel, DTYPE_BYTES[cfg.model.params_dtype]
    tokens = cfg.trainer.micro_batch_size * math.ceil(sequence_length(cfg) / p.context)
    rollout_batch = cfg.data.prompts_per_step * cfg.rollout.n_samples
    mini_batch = rollout_batch // cfg.algorithm.num_mini_batches
    micro_batches = math.ceil(mini_batch / (layout.data * cfg.trainer.micro_batch_size))
    attention = attention_bytes_per_token(shape, cfg)
    checkpoint_per_layer = b * shape.hidden_size / p.tensor  # a layer's input, sequence-parallel
    out = []
    for stage, layers in enumerate(stage_layers(shape.num_layers, p.pipeline, p.virtual_pipeline)):
        per_layer = [attention + mlp_bytes_per_token(shape, cfg, shape.moe_layers[i]) for i in layers]
        chunks = max(1, p.virtual_pipeline)
        if chunks == 1:
            in_flight = min(micro_batches, p.pipeline - stage)
        else:
            # megatron's interleaved warm-up, in micro-batch x chunk units, over the chunks the rank holds.
            chunk_passes = min(micro_batches * chunks, 2 * (p.pipeline - stage - 1) + (chunks - 1) * p.pipeline + 1)
            in_flight = chunk_passes / chunks
        last = stage == p.pipeline - 1
        logits = 2 * tokens * (shape.vocab_size // p.tensor) * b if last else 0
        full = in_flight * tokens * sum(per_layer)
        recompute = in_flight * tokens * len(layers) * checkpoint_per_layer + tokens * max(per_layer)
        out.append(
            ActivationMemory(
                stage=stage,
                tokens_per_micro_batch=tokens,
                micro_batches=micro_batches,
                in_flight=in_flight,
                layer_bytes_per_token=max(per_layer),
                stage_bytes_per_token=sum(per_layer),
                logits_bytes=logits,
                no_recompute=int(full) + logits,
                recompute=int(recompute) + logits,
            )
        )
    return out


@dataclass(frozen=True)
class EngineMemory:
    weight_bytes: int  # per GPU of an engine
    kv_cache_bytes: int  # per GPU
    kv_bytes_per_token: int  # per GPU
    kv_tokens: int
    sequences_at_max_length: int
    largest_tensor_bytes: int  # the biggest full HF tensor a weight sync moves at once


def engine_memory(shape: ModelShape, cfg: Config) -> EngineMemory:
    tp = cfg.rollout.engine_tensor_parallel
    b = DTYPE_BYTES[cfg.model.params_dtype]
    kv_heads_per_gpu = math.ceil(shape.num_kv_heads / tp)  # vLLM replicates KV heads when TP > kv heads
    kv_per_token = 2 * shape.num_layers * kv_heads_per_gpu * shape.head_dim * b
    kv = cfg.rollout.kv_cache_memory_bytes
    tokens = kv // kv_per_token
    max_len = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    largest = max(
        shape.vocab_size * shape.hidden_size,
        (shape.num_attention_heads * shape.head_dim) * shape.hidden_size,
        3 * max(shape.intermediate_size, shape.moe_intermediate_size) * shape.hidden_size,
    )
    return EngineMemory(
        weight_bytes=math.ceil(shape.total_params * b / tp),
        kv_cache_bytes=kv,
        kv_bytes_per_token=kv_per_token,
        kv_tokens=tokens,
        sequences_at_max_length=tokens // max_len,
        largest_tensor_bytes=largest * b,
    )


def engine_layouts(shape: ModelShape, cfg: Config, budget_bytes: int) -> list[dict]:
    """For engine tensor parallel 1, 2, 4, 8: what an engine GPU holds while it generates, when it has the GPU
    to itself (a rollout node, or a colocated GPU whose actor state is offloaded): its share of the weights,
    the KV cache the rest of the budget leaves, how many full-length sequences that is per GPU, and the bytes a
    weight push brings into each GPU (every worker of an engine receives the full tensors)."""
    b = DTYPE_BYTES[cfg.model.params_dtype]
    max_len = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    rows = []
    for tp in (1, 2, 4, 8):
        if shape.num_attention_heads % tp:
            continue
        weights = math.ceil(shape.total_params * b / tp)
        kv_per_token = 2 * shape.num_layers * math.ceil(shape.num_kv_heads / tp) * shape.head_dim * b
        kv = max(0, budget_bytes - weights - ENGINE_ACTIVATION_RESERVE_BYTES)
        rows.append({"tp": tp, "weights": weights, "kv": kv, "sequences_per_gpu": kv // kv_per_token // max_len / tp,
                     "push_ingress": shape.total_params * b})
    return rows


# What an engine's forward passes take beyond weights and KV cache (vLLM's profile of the activations and the
# sampler at the recipe's batch size is about this on one GPU); the layout table leaves it free.
ENGINE_ACTIVATION_RESERVE_BYTES = 4 * 1024**3


def engine_layout_lines(shape: ModelShape, cfg: Config, budget_bytes: int) -> list[str]:
    rows = engine_layouts(shape, cfg, budget_bytes)
    max_len = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    # KV room for the GPU's share of a rollout (prompts x samples over the engine GPUs), up to 32 full-length
    # sequences: with fewer in flight, decoding is bound by reading the weights for every token and the rollout
    # runs in several waves; beyond that a GPU is busy anyway.
    launch = cfg.launch
    gpus = (launch.rollout_nnodes if cfg.rollout.mode == "remote" and launch.rollout_nnodes else launch.nnodes)
    gpus *= launch.nproc_per_node
    share = math.ceil(cfg.data.prompts_per_step * cfg.rollout.n_samples / gpus)
    wanted = min(32, share)
    lines = [f"engine layouts, an engine GPU to itself (budget minus {ENGINE_ACTIVATION_RESERVE_BYTES / 1024**3:.0f} GiB "
             f"for activations; sequences of {max_len} tokens):",
             f"  {'engine TP':>9}  {'weights GiB/GPU':>15}  {'KV GiB/GPU':>10}  {'sequences/GPU':>13}  {'push GB in/GPU':>14}"]
    for r in rows:
        lines.append(f"  {r['tp']:>9}  {r['weights'] / 1024**3:>15.2f}  {r['kv'] / 1024**3:>10.2f}  "
                     f"{r['sequences_per_gpu']:>13.1f}  {r['push_ingress'] / 1e9:>14.1f}")
    fitting = [r for r in rows if r["sequences_per_gpu"] >= wanted]
    if fitting:
        best = fitting[0]
        lines.append(f"  suggested: engine TP {best['tp']} (the smallest with room for {wanted} full-length sequences "
                     f"per GPU; the batch gives each engine GPU {share}); configured: {cfg.rollout.engine_tensor_parallel}")
    else:
        lines.append(f"  no engine layout keeps {wanted} full-length sequences per GPU: shorten rollout.max_new_tokens "
                     "or add GPUs")
    return lines


# ----------------------------------------------------------------------------------------------------------
# The step's data per rank: rollout, training batch, routing records, diagnostics
# ----------------------------------------------------------------------------------------------------------

# CPython 3.11 on 64-bit: a list holds an 8-byte pointer per item; an int below 2**30 is a 28-byte object and a
# float a 24-byte one, both rounded up to pymalloc's 16-byte size classes (32 bytes). Token ids come back from
# the engines through pickle, which does not share int objects between rows, so every id is an object of its
# own (ids below 257 are cached singletons; counting them as objects makes this an upper bound).
PY_POINTER_BYTES = 8
PY_INT_BYTES = 32
PY_FLOAT_BYTES = 32
PY_LIST_BYTES = 64  # the list object with its GC header (56 bytes), in its size class
# diagnostics.routing_stats reads a RoutingRecord a chunk of whole rows at a time (at most its DENSE_CHUNK_IDS dense
# ids, one row at least), densified to the batch's width. What it allocates at its peak per dense id of a chunk:
# both records' chunks as int64 (16 bytes) and check_routing's sort of one of them (values and indices, 16),
# plus masks. Measured (VmHWM, with malloc returning every freed block) on 16 rows of 9,163 positions, 4 rows a
# chunk: 33.6 for routing_change_stats, changed_layer_count and routing_variance_stats, 25.3 for
# expert_load_stats (one record); tests/distributed/test_data_memory.py checks it.
DIAGNOSTIC_BYTES_PER_DENSE_ID = 33.6
# The fixed-edge histograms of diagnostics.step.StepDiagnostics (bins each): log r of stable and routing-changed
# tokens, the ratio for positive and negative advantages, and the rollout/old mismatch.
DIAGNOSTIC_HISTOGRAM_BINS = (100, 100, 120, 120, 100)
# A logged scalar is a dict entry: its key (~70 bytes), a float, and the dict's slot.
DIAGNOSTIC_SCALAR_BYTES = 160
# Per MoE layer, the metrics one step logs: changed fraction and overlap for rollout vs old and for each
# mini-batch, plus expert load (max/mean, cv, entropy, normalised entropy) and router entropy (2).
DIAGNOSTIC_LAYER_SERIES_FIXED = 6
# Prompts and responses of the "typical" column: a quarter of their maximum on average, the longest at the
# maximum (so every [b, S] tensor stays as wide as in the worst case). An illustration, not a measurement:
# the token-proportional items scale linearly with it.
TYPICAL_LENGTH_FRACTION = 0.25


@dataclass(frozen=True)
class DataState:
    """Bytes one rank holds for one RL step's data (``data_state_bytes``). Counts are per rank: its
    data-parallel share of the rollout (tensor-, pipeline- and context-parallel peers hold the same copy)."""

    sequences: int
    seq_len: int
    record_tokens: int  # tokens of each step-long routing record (0: none)
    update_record_tokens: int  # tokens of one update mini-batch's record
    # host, held through the step
    rollout_lists: int  # Rollout: prompt ids, response ids, rollout log-probs, rewards, finish reasons
    train_batch: int  # TrainBatch [b, S] tensors + advantages [b]
    routing_rollout: int  # the engines' routing (rollout.collect_routed_experts)
    routing_old: int  # the old-logprob pass's routing (MoE)
    routing_update: int  # one update mini-batch's routing (MoE)
    router_entropy: int  # the old pass's router entropy, float32 [b, S, layers] (MoE)
    diagnostics: int  # histograms and logged scalars
    # host, transient
    diagnostics_transient: int  # the largest moment of the diagnostics (a densified chunk, [b, S] counts)
    # device
    device_micro_batch: int  # one micro-batch's inputs on the GPU
    device_router_entropy: int  # the old pass's router entropy, on the GPU until the pass ends (MoE)
    # Asynchronous RL (rollout.max_staleness = k): the k scored batches generated ahead of the step.
    rollouts_ahead: int = 0

    @property
    def host_resident(self) -> int:
        return (
            self.rollout_lists + self.train_batch + self.routing_rollout + self.routing_old + self.routing_update
            + self.router_entropy + self.diagnostics + self.rollouts_ahead
        )  # fmt: skip

    @property
    def host_peak(self) -> int:
        return self.host_resident + self.diagnostics_transient

    @property
    def device(self) -> int:
        """The data's most on the GPU: at the end of the old-logprob pass (a forward pass, whose activations
        stay below training's), its router entropy next to the last micro-batch."""
        return self.device_micro_batch + self.device_router_entropy


def routing_record_bytes(tokens: int, rows: int, num_moe_layers: int, topk: int, num_experts: int) -> int:
    """A packed routing record (``routing_layout.RoutingRecord``): the recorded tokens' expert ids
    ``[tokens, num_moe_layers, topk]`` (uint8 up to 256 experts, else int16), their positions (int32) and
    ``rows + 1`` int64 row offsets."""
    id_bytes = 1 if num_experts <= 256 else 2
    return tokens * (num_moe_layers * topk * id_bytes + 4) + 8 * (rows + 1)


def data_state_bytes(
    *,
    sequences: int,
    prompt_tokens: int,
    response_tokens: int,
    seq_len: int,
    num_moe_layers: int,
    topk: int,
    num_experts: int,
    record_rollout: bool,
    record_old: bool,
    replay: bool,
    kl: bool,
    num_mini_batches: int = 1,
    micro_batch_size: int = 1,
    routing_sample_tokens: int = 0,
    dense_chunk_ids: int | None = None,
    rollout_weights: bool = False,
    batches_ahead: int = 0,
) -> DataState:
    """The step's data on one rank, from its share's exact token totals (a test passes measured lengths).

    ``sequences`` rows (``b``) with ``prompt_tokens`` and ``response_tokens`` in total (prompts counted once
    per row: every sample holds its own copy), ``seq_len`` the TrainBatch width ``S`` (longest prompt +
    response + 1). ``record_rollout``: the engines' routing is kept (``rollout.collect_routed_experts``);
    ``record_old``: the trainer records its routing and router entropy (an MoE model); ``replay``:
    ``algorithm.routing_replay`` is not ``off``, so records cover prompt positions too; ``kl``:
    ``algorithm.kl_coef > 0`` adds ``logprobs_ref``. ``routing_sample_tokens > 0`` caps each
    diagnostics-only record at that many response tokens (refused with replay, as the config refuses it).
    ``dense_chunk_ids``: how many dense ids the routing diagnostics densify at once (default: theirs).
    ``rollout_weights``: ``algorithm.rollout_correction`` is on (a float32 ``[b, S]`` weight per token).
    ``batches_ahead``: ``rollout.max_staleness``, scored batches held ahead of the step, each a ``Rollout`` of the
    same size (asynchronous RL needs servers, which return no routed experts to keep).

    Host: the Rollout's Python lists (8-byte pointer + 32-byte int or float object per token; a list object
    per row), the TrainBatch (tokens int64, loss_mask bool, logprobs_rollout / logprobs_old (/ logprobs_ref)
    float32, advantages float32 [b]), the routing records (``routing_record_bytes``; the update's covers
    ``1 / num_mini_batches`` of the share), the router entropy, the histograms and logged scalars, and the
    largest transient of the diagnostics (a densified chunk of the records, ``[b, S]`` tensors). Device: one micro-batch of ``micro_batch_size`` rows as the actor
    moves it (tokens and labels int64, loss mask, logprobs_old (and ref), advantages, position ids, the
    [S, S] bool causal mask ``actor.model.causal_mask`` builds, and with replay the int32 routing the
    routers are forced to).
    """
    if routing_sample_tokens < 0:
        raise ValueError(f"routing_sample_tokens={routing_sample_tokens}: must be >= 0 (0 records every token)")
    if replay and routing_sample_tokens:
        raise ValueError("routing_sample_tokens > 0 with routing replay: replay needs the routing of every token")
    b, s, layers, k = sequences, seq_len, num_moe_layers, topk
    mini = max(1, num_mini_batches)

    pointer_and_object = PY_POINTER_BYTES + PY_INT_BYTES  # ints and floats cost the same
    rollout_lists = (
        pointer_and_object * (prompt_tokens + 2 * response_tokens)  # prompt ids, response ids, log-probs
        + (PY_POINTER_BYTES + PY_FLOAT_BYTES) * b  # rewards
        + PY_POINTER_BYTES * b  # finish reasons: two shared strings
        + PY_LIST_BYTES * 3 * b  # a list per row of the first three
        + 5 * (PY_LIST_BYTES + PY_POINTER_BYTES * b)  # the five outer lists
    )
    logprob_rows = 2 + (1 if kl else 0) + (1 if rollout_weights else 0)  # rollout, old (, ref) (, weights)
    train_batch = b * s * (8 + 1 + 4 * logprob_rows) + 4 * b

    moe = layers > 0 and topk > 0
    if not moe:
        record_rollout = record_old = False
    # Replay records every position up to each row's last loss position (routing_layout.replay_positions):
    # the prompt and the response but the last token.
    tokens = prompt_tokens + response_tokens - b if replay else response_tokens
    if routing_sample_tokens:
        tokens = min(tokens, routing_sample_tokens)
    update_tokens = math.ceil(tokens / mini)
    record = routing_record_bytes(tokens, b, layers, k, num_experts)
    update_record = routing_record_bytes(update_tokens, math.ceil(b / mini), layers, k, num_experts)
    routing_rollout = record if record_rollout else 0
    routing_old = record if record_old else 0
    routing_update = update_record if record_old else 0
    router_entropy = 4 * b * s * layers if record_old else 0

    histogram_bins = sum(DIAGNOSTIC_HISTOGRAM_BINS)
    histograms = 8 * histogram_bins + 4 * (histogram_bins + len(DIAGNOSTIC_HISTOGRAM_BINS))  # int64 counts, edges
    expert_load = 8 * layers * num_experts if record_old else 0  # float64 [layers, experts] counts
    layer_series = (2 * (mini + (1 if record_rollout else 0)) + DIAGNOSTIC_LAYER_SERIES_FIXED) if record_old else 0
    diagnostics = histograms + expert_load + DIAGNOSTIC_SCALAR_BYTES * layer_series * layers

    # The routing diagnostics densify one chunk of rows at a time (diagnostics.routing_stats.DENSE_CHUNK_IDS).
    if dense_chunk_ids is None:
        # torch (see check_layout).
        from sapo_megatron.diagnostics.routing_stats import DENSE_CHUNK_IDS as dense_chunk_ids
    mini_rows = math.ceil(b / mini)
    per_row = s * layers * k
    chunk = 0
    if record_old and per_row:
        chunk = math.ceil(DIAGNOSTIC_BYTES_PER_DENSE_ID * min(b, max(1, dense_chunk_ids // per_row)) * per_row)
    # Rollout vs old over the share: a chunk, the changed-layer count (int64) and the log-prob difference
    # (float32) of every position. Each update mini-batch: its log-probs and log r (float32), about five bool
    # masks (advantage sign, changed routing) and its changed-layer count, over [b / K, S], and a chunk.
    old_phase = chunk + b * s * (8 + 4)
    update_phase = chunk + mini_rows * s * (4 + 4 + 5 + 8)
    diagnostics_transient = max(old_phase, update_phase)

    m = micro_batch_size
    device_micro_batch = (
        m * s * (8 + 8 + 1 + 4 * (1 + (1 if kl else 0)))  # tokens, labels, loss mask, logprobs_old (, ref)
        + 4 * m  # advantages
        + 8 * s  # position ids (expanded over the rows, not copied)
        + s * s  # the causal mask, bool [1, 1, S, S]
        + (4 * m * s * layers * k if replay and moe else 0)  # int32 replay routing, every layer at once
    )
    # actor.routing_replay keeps each micro-batch's router entropy on the device it was computed on, then assembles
    # the share's [b, S, L] float32 there before moving it to the host: twice the tensor at the end of the pass.
    device_router_entropy = 2 * router_entropy
    return DataState(
        sequences=b,
        seq_len=s,
        record_tokens=tokens if (record_rollout or record_old) else 0,
        update_record_tokens=update_tokens if record_old else 0,
        rollout_lists=rollout_lists,
        train_batch=train_batch,
        routing_rollout=routing_rollout,
        routing_old=routing_old,
        routing_update=routing_update,
        router_entropy=router_entropy,
        diagnostics=diagnostics,
        diagnostics_transient=diagnostics_transient,
        device_micro_batch=device_micro_batch,
        device_router_entropy=device_router_entropy,
        rollouts_ahead=batches_ahead * rollout_lists,
    )


def sequences_per_rank(cfg: Config, data_parallel: int) -> int:
    """Rows of the largest data-parallel share: prompt groups are never split over ranks."""
    return math.ceil(cfg.data.prompts_per_step / data_parallel) * cfg.rollout.n_samples


def data_memory(shape: ModelShape, cfg: Config, layout: Layout, length_fraction: float = 1.0) -> DataState:
    """``data_state_bytes`` for one rank at the config's size; every prompt and response at
    ``length_fraction`` of ``data.max_prompt_length`` / ``rollout.max_new_tokens`` on average, the longest
    at the maximum (``S`` is ``sequence_length(cfg)`` either way)."""
    b = sequences_per_rank(cfg, layout.data)
    moe = any(shape.moe_layers) and not cfg.model.dense
    return data_state_bytes(
        sequences=b,
        prompt_tokens=math.ceil(b * cfg.data.max_prompt_length * length_fraction),
        response_tokens=math.ceil(b * cfg.rollout.max_new_tokens * length_fraction),
        seq_len=sequence_length(cfg),
        num_moe_layers=sum(shape.moe_layers) if moe else 0,
        topk=shape.top_k if moe else 0,
        num_experts=shape.num_experts,
        record_rollout=moe and cfg.rollout.collect_routed_experts,
        record_old=moe,
        replay=cfg.algorithm.routing_replay != "off",
        kl=cfg.algorithm.kl_coef > 0,
        num_mini_batches=cfg.algorithm.num_mini_batches,
        micro_batch_size=cfg.trainer.micro_batch_size,
        routing_sample_tokens=cfg.diagnostics.routing_sample_tokens,
        rollout_weights=cfg.algorithm.rollout_correction != "off",
        batches_ahead=cfg.rollout.max_staleness,
    )


@dataclass(frozen=True)
class Scenario:
    """Peak bytes per GPU in each phase for one combination of offload switches."""

    name: str
    optimizer_cpu_offload: bool
    offload_params: bool
    offload_grads: bool
    offload_optimizer: bool
    recompute: bool
    train: int
    sync: int
    rollout: int
    rollout_gpu: int  # remote mode: the engines' own GPUs
    host_per_node: int

    @property
    def peak(self) -> int:
        return max(self.train, self.sync, self.rollout, self.rollout_gpu)


def _scenario(
    name: str,
    cfg: Config,
    shape: ModelShape,
    layout: Layout,
    *,
    optimizer_cpu_offload: bool,
    offload_params: bool,
    offload_grads: bool,
    offload_optimizer: bool,
    recompute: bool,
) -> Scenario:
    opt_cfg = replace(cfg.optimizer, optimizer_cpu_offload=optimizer_cpu_offload)
    scenario_cfg = replace(cfg, optimizer=opt_cfg)
    states = state_memory(shape, scenario_cfg, layout)
    activations = activation_memory(shape, cfg, layout)
    engine = engine_memory(shape, cfg)
    data = data_memory(shape, cfg, layout)
    colocated = layout.rollout_mode == "colocated"
    train = sync = rollout = host = 0
    for state, act in zip(states, activations):
        grads = state.grad_bytes + GRAD_BYTES * (state.dense_padding_bound + state.expert_padding_bound)
        params = state.param_bytes + DTYPE_BYTES[cfg.model.params_dtype] * (
            state.dense_padding_bound + state.expert_padding_bound
        )
        optimizer = state.optimizer_gpu_bytes
        activation = act.recompute if recompute else act.no_recompute
        # Train: the colocated engine sleeps (weights to host, KV cache freed); the actor holds everything.
        train = max(train, params + grads + optimizer + activation + data.device_micro_batch)
        if colocated:
            # Sync: engine weights awake, actor parameters read by the export; grads and optimizer states can
            # already be on the host when they are phase-offloaded.
            resident = (0 if offload_grads else grads) + (0 if offload_optimizer else optimizer)
            sync = max(sync, engine.weight_bytes + params + resident + engine.largest_tensor_bytes)
            resident += 0 if offload_params else params
            rollout = max(rollout, engine.weight_bytes + engine.kv_cache_bytes + resident)
        # actor.offload copies parameters and optimizer states into pinned buffers it keeps for the next
        # rollout; gradient buffers are dropped, not copied (they are zeroed before every backward anyway).
        offloaded = (
            (params if offload_params and colocated else 0)
            + (optimizer if offload_optimizer and colocated else 0)
            + state.optimizer_host_bytes
        )
        # The engine sleeps at level 2 (nothing kept on the host), but a colocated push stages the received
        # full tensors in host memory until every engine has them (rollout.fleet: staging_device="cpu"), then
        # loads them one tensor at a time (the largest_tensor_bytes of the sync phase); pinned host memory stays
        # cached by torch, so the offloaded state and the staging count at once.
        # The step's data (rollout, batch, routing records) lives on the host from the rollout to the end of the
        # weight sync, next to both; its diagnostics transient comes while the staging buffers sit in the cache.
        host = max(host, offloaded + (engine.weight_bytes if colocated else 0) + data.host_peak)
    rollout_gpu = 0 if colocated else engine.weight_bytes + engine.kv_cache_bytes
    return Scenario(
        name=name,
        optimizer_cpu_offload=optimizer_cpu_offload,
        offload_params=offload_params,
        offload_grads=offload_grads,
        offload_optimizer=offload_optimizer,
        recompute=recompute,
        train=train,
        sync=sync,
        rollout=rollout,
        rollout_gpu=rollout_gpu,
        host_per_node=host * layout.gpus_per_node,
    )


def scenarios(cfg: Config, shape: ModelShape, layout: Layout) -> list[Scenario]:
    """The configured switches first, then none, each one alone, and all of them (same recompute setting)."""
    opt = cfg.optimizer
    recompute = cfg.model.recompute_activations
    flags = ("optimizer_cpu_offload", "offload_params", "offload_grads", "offload_optimizer")
    configured = {name: getattr(opt, name) for name in flags}
    none, every = dict.fromkeys(flags, False), dict.fromkeys(flags, True)
    variants: list[tuple[str, dict[str, bool]]] = [("configured", configured), ("no offload", none)]
    variants += [(name, {other: other == name for other in flags}) for name in flags]
    variants.append(("phase offload (params+grads+optimizer)", {**every, "optimizer_cpu_offload": False}))
    variants.append(("all offloads", every))
    variants.append(
        (f"configured, recompute {'off' if recompute else 'on'}", {**configured, "recompute": not recompute})
    )
    out = []
    for name, switches in variants:
        switches = {"recompute": recompute, **switches}
        out.append(_scenario(name, cfg, shape, layout, **switches))
    return out


# ----------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    cfg: Config
    shape: ModelShape
    layout: Layout
    states: list[StateMemory]
    activations: list[ActivationMemory]
    engine: EngineMemory
    scenarios: list[Scenario]
    data: DataState  # per rank, every prompt and response at its maximum length
    data_typical: DataState  # per rank, lengths at TYPICAL_LENGTH_FRACTION of the maximum on average
    warnings: list[str] = field(default_factory=list)

    @property
    def configured(self) -> Scenario:
        return self.scenarios[0]

    @property
    def budget_bytes(self) -> int:
        launch = self.cfg.launch
        return int((launch.gpu_memory_gib - launch.gpu_reserved_gib) * GIB)

    def check_fits(self) -> None:
        """``PlanError`` naming the key when the configured switches do not fit a GPU or the host."""
        launch, peak = self.cfg.launch, self.configured
        if peak.peak > self.budget_bytes:
            phase = max(("train", peak.train), ("weight sync", peak.sync), ("rollout", peak.rollout),
                        ("rollout GPU", peak.rollout_gpu), key=lambda item: item[1])[0]  # fmt: skip
            fitting = [s.name for s in self.scenarios[1:] if s.peak <= self.budget_bytes]
            hint = f"; these variants fit: {', '.join(fitting)}" if fitting else "; use more GPUs or a wider layout"
            raise PlanError(
                f"launch.gpu_memory_gib={launch.gpu_memory_gib:g}: the {phase} phase needs {_gib(peak.peak)} GiB per "
                f"GPU, more than gpu_memory_gib - launch.gpu_reserved_gib = {_gib(self.budget_bytes)} GiB{hint}"
            )
        if launch.host_memory_gib and peak.host_per_node > launch.host_memory_gib * GIB:
            raise PlanError(
                f"launch.host_memory_gib={launch.host_memory_gib:g}: offloaded state, sleeping engines and the step's "
                "data need "
                f"{_gib(peak.host_per_node)} GiB per node; turn off some optimizer.offload_* switches or add host "
                "memory"
            )


def make_plan(cfg: Config, preset: str | None = None) -> Plan:
    """The plan of a validated config; raises ``PlanError`` for a layout that cannot run (memory not checked)."""
    shape = resolve_model_shape(cfg, preset)
    layout = check_layout(cfg, shape)
    warnings = []
    rollout_batch = cfg.data.prompts_per_step * cfg.rollout.n_samples
    mini_batch = rollout_batch // cfg.algorithm.num_mini_batches
    per_step = layout.data * cfg.trainer.micro_batch_size
    if mini_batch % per_step:
        warnings.append(
            f"a mini-batch of {mini_batch} sequences is not a multiple of DP({layout.data}) x "
            f"trainer.micro_batch_size({cfg.trainer.micro_batch_size}) = {per_step}: the actor pads it with empty rows"
        )
    if cfg.rollout.mode == "colocated" and len(layout.engines) * cfg.rollout.engine_tensor_parallel < layout.world_size:
        warnings.append(
            f"{len(layout.engines) * cfg.rollout.engine_tensor_parallel} of {layout.world_size} GPUs run an engine; "
            "the others idle during the rollout"
        )
    engine = engine_memory(shape, cfg)
    if engine.sequences_at_max_length < 1:
        warnings.append(
            f"rollout.kv_cache_memory_bytes={cfg.rollout.kv_cache_memory_bytes} holds {engine.kv_tokens} tokens, less "
            f"than one sequence of {cfg.data.max_prompt_length + cfg.rollout.max_new_tokens}"
        )
    if cfg.rollout.mode == "remote" and any(
        getattr(cfg.optimizer, name) for name in ("offload_params", "offload_grads", "offload_optimizer")
    ):
        warnings.append("optimizer.offload_params/grads/optimizer free nothing with remote engines (own GPUs)")
    return Plan(
        cfg=cfg,
        shape=shape,
        layout=layout,
        states=state_memory(shape, cfg, layout),
        activations=activation_memory(shape, cfg, layout),
        engine=engine,
        scenarios=scenarios(cfg, shape, layout),
        data=data_memory(shape, cfg, layout),
        data_typical=data_memory(shape, cfg, layout, TYPICAL_LENGTH_FRACTION),
        warnings=warnings,
    )


# ----------------------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------------------


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def _billions(count: int) -> str:
    return f"{count / 1e9:.3f} B" if count >= 1e8 else f"{count:,}"


def _format_groups(groups: list[list[int]], width: int = 100, max_groups: int = 64) -> list[str]:
    items = ["[" + ",".join(map(str, g)) + "]" for g in groups[:max_groups]]
    if len(groups) > max_groups:
        items.append(f"... ({len(groups) - max_groups} more)")
    lines, line = [], ""
    for item in items:
        if line and len(line) + 1 + len(item) > width:
            lines.append(line)
            line = item
        else:
            line = f"{line} {item}" if line else item
    if line:
        lines.append(line)
    return lines


def format_plan(plan: Plan) -> str:
    cfg, shape, layout = plan.cfg, plan.shape, plan.layout
    p, launch, rollout = cfg.parallel, cfg.launch, cfg.rollout
    out: list[str] = []
    add = out.append
    # One unit for every table: GiB for real models, MiB for the tiny demo (where GiB would print zeros).
    unit, unit_bytes = ("GiB", GIB) if max(s.peak for s in plan.scenarios) >= GIB else ("MiB", 1024**2)

    def size(nbytes: float) -> str:
        return f"{nbytes / unit_bytes:.2f}"

    add(f"model: {shape.name}")
    add(
        f"  {shape.num_layers} layers ({sum(shape.moe_layers)} MoE), hidden {shape.hidden_size}, heads "
        f"{shape.num_attention_heads} (kv {shape.num_kv_heads}, head_dim {shape.head_dim}), vocab {shape.vocab_size}, "
        f"experts {shape.num_experts} top-{shape.top_k} (ffn {shape.moe_intermediate_size})"
    )
    add(f"  parameters: {_billions(shape.total_params)} total, {_billions(shape.active_params)} active per token")
    add("")
    add("launch:")
    total_nodes = launch.nnodes + launch.rollout_nnodes
    add(
        f"  {total_nodes} node(s) x {launch.nproc_per_node} GPUs: actor on {launch.nnodes} node(s) = "
        f"{layout.world_size} ranks"
        + (f", rollout engines on {launch.rollout_nnodes} more" if launch.rollout_nnodes else "")
    )
    add(
        f"  actor layout: TP {p.tensor} x PP {p.pipeline}"
        + (f" (virtual {p.virtual_pipeline})" if p.virtual_pipeline else "")
        + f" x CP {p.context} x DP {layout.data};  experts: EP {p.expert} x ETP {layout.expert_tensor} x "
        f"EDP {layout.expert_data} x PP {p.pipeline};  sequence parallel {'on' if p.sequence_parallel else 'off'}, "
        f"{p.moe_token_dispatcher} dispatcher"
    )
    for node in range(launch.nnodes):
        first = node * launch.nproc_per_node
        add(f"  node {node}: ranks {first}-{first + launch.nproc_per_node - 1} (GPU 0-{launch.nproc_per_node - 1})")
    add("parallel groups (megatron-core order tp-cp-ep-dp-pp):")
    for name, groups in layout.groups.items():
        add(f"  {name:<5} size {len(groups[0])}, {len(groups)} group(s):")
        out.extend("    " + line for line in _format_groups(groups))
    add(
        f"rollout engines ({rollout.mode}): {len(layout.engines)} x TP {rollout.engine_tensor_parallel} "
        f"({len(layout.engines) * rollout.engine_tensor_parallel} GPUs)"
    )
    by_node: dict[int, list[str]] = {}
    for engine in layout.engines:
        gpus = engine["gpus"]
        text = f"e{engine['index']}:gpu{gpus[0]}" + (f"-{gpus[-1]}" if len(gpus) > 1 else "")
        by_node.setdefault(engine["node"], []).append(text)
    for node, engines in by_node.items():
        role = "actor + engines" if rollout.mode == "colocated" else "engines only"
        add(f"  node {node} ({role}): " + " ".join(engines))
    add("")

    add(f"model state per GPU ({cfg.model.params_dtype} parameters, fp32 gradients, Adam; "
        f"{'distributed' if cfg.optimizer.use_distributed_optimizer else 'replicated'} optimizer):")  # fmt: skip
    add(
        f"  {'stage':<6}{'params':>16}{'dense':>16}{'expert':>16}"
        f"{f'param {unit}':>11}{f'grad {unit}':>10}{f'optim {unit}':>11}"
    )
    for state in plan.states:
        optim = state.optimizer_gpu_bytes or state.optimizer_host_bytes
        where = " (host)" if state.optimizer_host_bytes else ""
        add(
            f"  {state.stage:<6}{state.params:>16,}{state.dense_params:>16,}{state.expert_params:>16,}"
            f"{size(state.param_bytes):>11}{size(state.grad_bytes):>10}{size(optim):>11}{where}"
        )
    add(
        f"  optimizer shards: dense over DPxCP = {layout.data * layout.context}, experts over EDP = "
        f"{layout.expert_data}; "
        f"buffer alignment adds at most {max(s.dense_padding_bound + s.expert_padding_bound for s in plan.states):,} "
        "elements per rank"
    )
    add("")
    add(
        f"activations per GPU (micro-batch {cfg.trainer.micro_batch_size} x {sequence_length(cfg)} tokens"
        + (f" / CP {p.context}" if p.context > 1 else "")
        + f", {plan.activations[0].micro_batches} micro-batches per optimizer step):"
    )
    add(
        f"  {'stage':<6}{'in flight':>10}{'KiB/token/layer':>17}{f'logits {unit}':>12}"
        f"{f'no recompute {unit}':>18}{f'recompute {unit}':>15}"
    )
    for act in plan.activations:
        add(
            f"  {act.stage:<6}{act.in_flight:>10.2f}{act.layer_bytes_per_token / 1024:>17.1f}"
            f"{size(act.logits_bytes):>12}"
            f"{size(act.no_recompute):>18}{size(act.recompute):>15}"
        )
    assumptions = "assumes: " + ACTIVATION_ASSUMPTIONS
    out.extend(textwrap.wrap(assumptions, width=110, initial_indent="  ", subsequent_indent="    "))
    add("")
    engine = plan.engine
    add(
        f"rollout engine per GPU: weights {size(engine.weight_bytes)} {unit} + KV cache "
        f"{size(engine.kv_cache_bytes)} {unit} "
        f"({engine.kv_bytes_per_token / 1024:.0f} KiB/token -> {engine.kv_tokens:,} tokens, "
        f"{engine.sequences_at_max_length} sequences of {cfg.data.max_prompt_length + rollout.max_new_tokens} tokens)"
    )
    for line in engine_layout_lines(plan.shape, cfg, plan.budget_bytes):
        add(line)
    add("")
    out.extend(data_lines(plan))
    add("")
    budget = plan.budget_bytes
    add(
        f"peak per GPU ({unit}; budget {launch.gpu_memory_gib:g} - {launch.gpu_reserved_gib:g} GiB reserved = "
        f"{size(budget)} {unit}):"
    )
    remote = rollout.mode == "remote"
    # Remote engines have GPUs of their own: no shared sync / rollout phase on the actor's GPUs.
    phases = f"{'actor':>8}{'engine':>8}" if remote else f"{'train':>8}{'sync':>8}{'rollout':>9}"
    add(f"  {'offload switches':<42}{phases}{'peak':>8}{'host/node':>11}  fits")
    for scenario in plan.scenarios:
        row = f"  {scenario.name:<42}{size(scenario.train):>8}"
        if remote:
            row += f"{size(scenario.rollout_gpu):>8}"
        else:
            row += f"{size(scenario.sync):>8}{size(scenario.rollout):>9}"
        fits = scenario.peak <= budget and (
            not launch.host_memory_gib or scenario.host_per_node <= launch.host_memory_gib * GIB
        )
        row += f"{size(scenario.peak):>8}{size(scenario.host_per_node):>11}  {'yes' if fits else 'NO'}"
        add(row)
    configured = plan.configured
    switches = [name for name in ("optimizer_cpu_offload", "offload_params", "offload_grads", "offload_optimizer")
                if getattr(configured, name)]  # fmt: skip
    add(
        f"  configured: {', '.join(switches) or 'no offload'}; recompute {'on' if configured.recompute else 'off'}"
        + (f"; host memory checked against {launch.host_memory_gib:g} GiB" if launch.host_memory_gib else "")
    )
    for warning in plan.warnings:
        add(f"warning: {warning}")
    return "\n".join(out)


def data_lines(plan: Plan) -> list[str]:
    """The step's data per rank (``data_state_bytes``): worst case and typical lengths side by side."""
    cfg, worst, typical = plan.cfg, plan.data, plan.data_typical
    mib = 1024**2
    b, s = worst.sequences, worst.seq_len
    shape = plan.shape
    moe_layers = sum(shape.moe_layers) if any(shape.moe_layers) and not cfg.model.dense else 0
    k = shape.top_k
    id_type = "uint8" if shape.num_experts <= 256 else "int16"
    header = (
        f"step data per rank (MiB, host unless marked GPU): {cfg.data.prompts_per_step} prompts x "
        f"{cfg.rollout.n_samples} samples over DP {plan.layout.data} = {b} sequences, S = {s}; worst: every "
        f"prompt {cfg.data.max_prompt_length} and every response {cfg.rollout.max_new_tokens} tokens; typical: "
        f"{TYPICAL_LENGTH_FRACTION:g} of that on average, the longest at the maximum:"
    )
    lines = textwrap.wrap(header, width=110, subsequent_indent="  ")
    lines.append(f"  {'item':<78}{'worst':>9}{'typical':>9}")

    def row(label: str, name: str) -> None:
        lines.append(f"  {label:<78}{getattr(worst, name) / mib:>9.1f}{getattr(typical, name) / mib:>9.1f}")

    replay = cfg.algorithm.routing_replay
    covered = "prompt + response" if replay != "off" else "response"
    if cfg.diagnostics.routing_sample_tokens:
        covered = "sampled response"
    row("rollout lists: prompt, response ids, log-probs (Python objects, 40 B/token)", "rollout_lists")
    logprobs = "rollout, old" + (", ref" if cfg.algorithm.kl_coef > 0 else "")
    row(f"train batch [{b}, {s}]: tokens int64, mask, log-probs f32 ({logprobs})", "train_batch")
    if worst.record_tokens:
        tokens = f"{worst.record_tokens:,} {covered} tokens x ({moe_layers} x {k} {id_type} + int32)"
        if worst.routing_rollout:
            row(f"routing_rollout record: {tokens}", "routing_rollout")
        row(f"routing_old record: {tokens}", "routing_old")
        row(f"routing of one update mini-batch (1/{cfg.algorithm.num_mini_batches})", "routing_update")
        row(f"router entropy of the old pass: f32 [{b}, {s}, {moe_layers}]", "router_entropy")
    row("diagnostics: histograms, expert load, logged scalars", "diagnostics")
    row("resident through the step", "host_resident")
    transient = "diagnostics transient: "
    transient += ("a chunk of rows of the records as int64, [b, S] counts" if worst.record_tokens
                  else "one mini-batch's log r and masks")
    row(transient, "diagnostics_transient")
    row("host peak", "host_peak")
    micro = cfg.trainer.micro_batch_size
    row(f"GPU: one micro-batch [{micro}, {s}] with its [{s}, {s}] bool causal mask", "device_micro_batch")
    if worst.device_router_entropy:
        row(f"GPU, end of the old pass: router entropy, 2 x f32 [{b}, {s}, {moe_layers}]", "device_router_entropy")
    lines.append(
        f"  peak table below: host/node adds {plan.layout.gpus_per_node} x the worst host peak, train the GPU "
        "micro-batch"
    )
    return lines
