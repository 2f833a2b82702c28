"""Qwen3-MoE between Hugging Face (transformers 5) and megatron-core, built on mbridge 0.15.1.

mbridge's own ``Qwen3MoEBridge`` assumes transformers 4 and Transformer Engine. This subclass, registered
for ``model_type == "qwen3_moe"``, keeps mbridge's config base and model provider and changes:

- config translation for transformers 5: ``rope_parameters["rope_theta"]`` (no ``rope_theta`` attribute),
  ``num_experts`` (an alias of ``num_local_experts``), ``norm_topk_prob`` -> softmax before or after top-k,
  dense layers from ``mlp_only_layers`` / ``decoder_sparse_step`` -> ``moe_layer_freq``;
- the layer spec: Transformer Engine's when it is installed and the device is a GPU, otherwise megatron's
  local spec (SequentialMLP experts, torch norms that accept sequence parallelism, no fused kernels);
- weight names for both specs, as data (:data:`LOCAL_SPEC_RULES`, :data:`TE_SPEC_RULES`), with global
  layer and expert ids under pipeline and expert parallelism;
- model construction without ``module.cuda()`` on CPU, and sequence parallelism set by the caller
  (default: on when TP > 1, which megatron's MoE layers require for training);
- load / export: every rank reads the HF tensors it needs and slices its shard (no scatter); export
  exchanges the parameter list across pipeline stages once, then gathers each tensor with plain
  collectives (no per-tensor object exchange);
- :meth:`Qwen3MoeBridge.weight_shards`: the pieces this rank owns, named by their HF tensors, which the
  weight sync to the rollout engine (:mod:`sapo_megatron.bridge.sync`) sends.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from mbridge.core import register_model
from mbridge.core.parallel_states import ParallelStates
from mbridge.models.qwen3moe import Qwen3MoEBridge as _MbridgeQwen3MoEBridge
from safetensors import safe_open
from safetensors.torch import save_file

from sapo_megatron import collectives
from sapo_megatron.bridge import moe_layer_pattern as hf_moe_layer_pattern
from sapo_megatron.bridge.layout import (
    AttentionShape,
    Layout,
    WeightRule,
    full_shape,
    hf_to_megatron,
    megatron_to_hf,
    shard,
    unshard,
)
from sapo_megatron.device import resolve_device

_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."

_COMMON_RULES = (
    WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Layout.COLUMN),
    WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",), Layout.REPLICATED),
    WeightRule("output_layer.weight", ("lm_head.weight",), Layout.COLUMN),
    WeightRule(
        _L + "self_attention.linear_qkv.weight",
        (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
        Layout.QKV,
    ),
    WeightRule(
        _L + "self_attention.linear_qkv.bias",
        (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
        Layout.QKV,
        when="qkv_bias",
    ),
    WeightRule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), Layout.ROW),
    WeightRule(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), Layout.REPLICATED),
    WeightRule(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), Layout.REPLICATED),
    WeightRule(_L + "mlp.router.weight", (_H + "mlp.gate.weight",), Layout.REPLICATED, when="moe"),
    WeightRule(
        _L + "mlp.linear_fc1.weight",
        (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
        Layout.GATE_UP,
        when="dense",
    ),
    WeightRule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), Layout.ROW, when="dense"),
)

_INPUT_NORM_HF = (_H + "input_layernorm.weight",)
_POST_ATTENTION_NORM_HF = (_H + "post_attention_layernorm.weight",)
_EXPERT_FC1_HF = (_H + "mlp.experts.{expert}.gate_proj.weight", _H + "mlp.experts.{expert}.up_proj.weight")
_EXPERT_FC2_HF = (_H + "mlp.experts.{expert}.down_proj.weight",)

# megatron's local spec: separate torch norms, SequentialMLP experts.
LOCAL_SPEC_RULES: tuple[WeightRule, ...] = _COMMON_RULES + (
    WeightRule(_L + "input_layernorm.weight", _INPUT_NORM_HF, Layout.REPLICATED),
    WeightRule(_L + "pre_mlp_layernorm.weight", _POST_ATTENTION_NORM_HF, Layout.REPLICATED),
    WeightRule(
        _L + "mlp.experts.local_experts.{expert}.linear_fc1.weight", _EXPERT_FC1_HF, Layout.GATE_UP, True, "moe"
    ),
    WeightRule(_L + "mlp.experts.local_experts.{expert}.linear_fc2.weight", _EXPERT_FC2_HF, Layout.ROW, True, "moe"),
)

# Transformer Engine's spec: the input norm is fused into linear_qkv and a dense MLP's norm into linear_fc1
# (a MoE layer keeps a separate pre_mlp_layernorm); experts are TEGroupedMLP, one parameter per local expert.
TE_SPEC_RULES: tuple[WeightRule, ...] = _COMMON_RULES + (
    WeightRule(_L + "self_attention.linear_qkv.layer_norm_weight", _INPUT_NORM_HF, Layout.REPLICATED),
    WeightRule(_L + "pre_mlp_layernorm.weight", _POST_ATTENTION_NORM_HF, Layout.REPLICATED, when="moe"),
    WeightRule(_L + "mlp.linear_fc1.layer_norm_weight", _POST_ATTENTION_NORM_HF, Layout.REPLICATED, when="dense"),
    WeightRule(_L + "mlp.experts.linear_fc1.weight{expert}", _EXPERT_FC1_HF, Layout.GATE_UP, True, "moe"),
    WeightRule(_L + "mlp.experts.linear_fc2.weight{expert}", _EXPERT_FC2_HF, Layout.ROW, True, "moe"),
)


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (each keeps it as ``.module``)."""
    from megatron.core.models.gpt import GPTModel

    while not isinstance(module, GPTModel):
        if not hasattr(module, "module"):
            raise TypeError(f"{type(module).__name__} is neither a GPTModel nor a wrapper around one")
        module = module.module
    return module


def _replace_in_spec(spec: Any, old: type, new: type) -> Any:
    """A copy of a megatron layer spec with every reference to class ``old`` replaced by ``new``."""
    if spec is old:
        return new
    if isinstance(spec, list):
        return [_replace_in_spec(item, old, new) for item in spec]
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: _replace_in_spec(getattr(spec, f.name), old, new) for f in dataclasses.fields(spec)}
        return dataclasses.replace(spec, **changes)
    return spec


class SequenceParallelTorchNorm:
    """megatron's ``WrappedTorchNorm`` for the local (non-TE) layer spec, minus its sequence-parallel veto.

    A norm over the hidden dimension is the same computation whether the sequence is split across TP ranks
    or not; what sequence parallelism needs in addition is that the (replicated) weight's gradient is
    summed over the TP group, which megatron's ``finalize_model_grads`` does for parameters marked
    ``sequence_parallel``, as its own fused norms mark them. The weight is created in ``params_dtype``.
    """

    def __new__(
        cls,
        config: Any,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by the torch norm; leave it off")
        if config.normalization == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization={config.normalization!r}: use 'RMSNorm' or 'LayerNorm'")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class _SafetensorsReader:
    """Reads named tensors from a HF directory (one file or an index of shards), each file opened once."""

    def __init__(self, hf_dir: Path) -> None:
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise ValueError(f"hf_dir={str(hf_dir)!r} holds no *.safetensors weights")
        self._handles = {name: safe_open(str(hf_dir / name), framework="pt", device="cpu") for name in files}
        if weight_map is None:
            weight_map = {key: name for name, handle in self._handles.items() for key in handle.keys()}
        self.weight_map: dict[str, str] = weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{name} is not in the checkpoint")
        return self._handles[self.weight_map[name]].get_tensor(name)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One local parameter, resolved against the rules; identical on all ranks of a pipeline stage."""

    rule_index: int
    layer: int | None  # global
    local_expert: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class WeightShard:
    """This rank's piece of one megatron parameter, named by the HF tensors the full parameter becomes.

    ``unshard(layout, pieces)`` of the ``count`` pieces (in ``index`` order) is the full megatron tensor, and
    ``megatron_to_hf(layout, full, bridge.attention_shape)`` splits it into the tensors ``hf_names``.
    """

    hf_names: tuple[str, ...]
    layout: Layout
    index: int  # this piece's rank in the sharding group (0 for a replicated layout)
    count: int  # pieces that make up the full parameter (1 for a replicated layout)
    tensor: torch.Tensor  # the live parameter, detached: shares its memory


@register_model("qwen3_moe")
class Qwen3MoeBridge(_MbridgeQwen3MoEBridge):
    """mbridge's Qwen3-MoE bridge for transformers 5 and megatron's local spec (see the module docstring)."""

    def __init__(
        self,
        hf_config: Any,
        dtype: torch.dtype = torch.float32,
        parallel_states: ParallelStates | None = None,
        make_vocab_size_divisible_by: int | None = None,
        *,
        device: str | torch.device | None = None,
        use_te: bool | None = None,
        moe_token_dispatcher: str = "alltoall",
        sequence_parallel: bool | None = None,
    ) -> None:
        self.device = resolve_device(device)
        if use_te is None:
            use_te = self.device.type == "cuda" and transformer_engine_available()
        if use_te and self.device.type != "cuda":
            raise ValueError("use_te=True needs a CUDA device: Transformer Engine does not run on CPU")
        if use_te and not transformer_engine_available():
            raise ValueError("use_te=True but transformer_engine is not installed; pip install transformer-engine")
        if moe_token_dispatcher not in ("alltoall", "allgather"):
            raise ValueError(
                f"moe_token_dispatcher={moe_token_dispatcher!r}: use 'alltoall' or 'allgather'"
            )
        if make_vocab_size_divisible_by is not None:
            raise ValueError("make_vocab_size_divisible_by: vocabulary padding is not supported; leave it None")
        if getattr(hf_config, "tie_word_embeddings", False):
            raise ValueError("tie_word_embeddings=True: tied embeddings are not supported for Qwen3-MoE here")
        self.use_te = use_te
        self.moe_token_dispatcher = moe_token_dispatcher
        self._sequence_parallel = sequence_parallel
        self.rules = TE_SPEC_RULES if use_te else LOCAL_SPEC_RULES
        self.hf_config = hf_config
        self.mpu = parallel_states if parallel_states is not None else ParallelStates.get_parallel_state()
        # Before mbridge builds the TransformerConfig, whose own checks are assertions without the fix.
        self._check_divisibility()
        super().__init__(hf_config, dtype=dtype, parallel_states=self.mpu)

    # -- configuration -------------------------------------------------------------------------------------

    @property
    def rope_theta(self) -> float:
        rope = getattr(self.hf_config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(
                f"rope_parameters.rope_type={rope['rope_type']!r}: only plain RoPE ('default') is supported"
            )
        if "rope_theta" in rope:
            return float(rope["rope_theta"])
        if hasattr(self.hf_config, "rope_theta"):  # transformers 4
            return float(self.hf_config.rope_theta)
        raise ValueError("the HF config has neither rope_parameters['rope_theta'] nor rope_theta")

    def moe_layer_pattern(self) -> list[int]:
        """1 for a MoE layer, 0 for a dense one (:func:`sapo_megatron.bridge.moe_layer_pattern`)."""
        return hf_moe_layer_pattern(self.hf_config)

    @property
    def attention_shape(self) -> AttentionShape:
        cfg = self.hf_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return AttentionShape(cfg.num_attention_heads, cfg.num_key_value_heads, head_dim)

    def _build_config(self):
        cfg = self.hf_config
        sequence_parallel = self._sequence_parallel
        if sequence_parallel is None:
            sequence_parallel = self.mpu.tp_size > 1
        if sequence_parallel and self.mpu.tp_size == 1:
            raise ValueError("sequence_parallel=True needs tensor parallelism (parallel.tensor > 1)")
        fused = self.use_te
        return self._build_base_config(
            use_cpu_initialization=False,
            sequence_parallel=sequence_parallel,
            add_qkv_bias=bool(getattr(cfg, "attention_bias", False)),
            qk_layernorm=True,
            # MoE
            num_moe_experts=cfg.num_experts,
            moe_layer_freq=self.moe_layer_pattern(),
            moe_ffn_hidden_size=cfg.moe_intermediate_size,
            moe_router_topk=cfg.num_experts_per_tok,
            moe_router_score_function="softmax",
            # transformers normalises the top-k of a full softmax when norm_topk_prob; that equals a softmax
            # over the top-k logits. Without it, the top-k of the full softmax are used as they are.
            moe_router_pre_softmax=not getattr(cfg, "norm_topk_prob", False),
            # transformers computes the routing softmax in fp32 whatever the model dtype.
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_router_bias_update_rate=0.0,
            moe_token_dispatcher_type=self.moe_token_dispatcher,
            # megatron refuses variable sequence lengths with the allgather dispatcher; the pipeline then
            # sizes its send/receive buffers from the seq_length given to the schedule.
            variable_seq_lengths=self.moe_token_dispatcher == "alltoall",
            moe_grouped_gemm=self.use_te,
            # Fused kernels exist only with TE / on GPU.
            masked_softmax_fusion=fused,
            persist_layer_norm=fused,
            bias_activation_fusion=fused,
            bias_dropout_fusion=fused,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
        )

    def _get_gptmodel_args(self) -> dict:
        return dict(
            vocab_size=self.hf_config.vocab_size,
            max_sequence_length=self.hf_config.max_position_embeddings,
            position_embedding_type="rope",
            rotary_base=self.rope_theta,
        )

    def _get_transformer_layer_spec(self, vp_stage: int | None = None):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        self.has_vp_stage = True  # read by mbridge's model provider
        spec = get_gpt_decoder_block_spec(
            self.config, use_transformer_engine=self.use_te, normalization="RMSNorm", vp_stage=vp_stage
        )
        if not self.use_te:
            spec = _replace_in_spec(spec, WrappedTorchNorm, SequenceParallelTorchNorm)
        return spec

    def _check_divisibility(self) -> None:
        cfg, mpu = self.hf_config, self.mpu
        if cfg.vocab_size % mpu.tp_size:
            raise ValueError(f"vocab_size {cfg.vocab_size} is not divisible by parallel.tensor={mpu.tp_size}")
        if cfg.num_key_value_heads % mpu.tp_size:
            raise ValueError(
                f"num_key_value_heads {cfg.num_key_value_heads} is not divisible by parallel.tensor={mpu.tp_size}"
            )
        if any(self.moe_layer_pattern()) and cfg.num_experts % mpu.ep_size:
            raise ValueError(f"num_experts {cfg.num_experts} is not divisible by parallel.expert={mpu.ep_size}")
        if cfg.num_hidden_layers % (mpu.pp_size * (mpu.vpp_size or 1)):
            raise ValueError(
                f"num_hidden_layers {cfg.num_hidden_layers} is not divisible by parallel.pipeline={mpu.pp_size}"
                f" x virtual_pipeline={mpu.vpp_size or 1}"
            )

    # -- model construction --------------------------------------------------------------------------------

    def get_model(
        self,
        weight_path: str | os.PathLike | None = None,
        post_model_creation_callbacks: list[Callable[..., None]] = (),
        **unused: Any,
    ) -> list[torch.nn.Module]:
        """One GPTModel per virtual pipeline stage on this rank; mbridge's version moves it to CUDA."""
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.models.gpt.gpt_model import ModelType
        from megatron.core.transformer.module import Float16Module

        if unused:
            raise ValueError(f"unsupported get_model options {sorted(unused)}: wrap the chunks yourself (e.g. DDP)")
        provider = self._model_provider(list(post_model_creation_callbacks))
        vpp = self.mpu.vpp_size
        chunks = []
        if self.mpu.pp_size > 1 and vpp and vpp > 1:
            for stage in range(vpp):
                chunk = provider(
                    pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                    post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                    vp_stage=stage,
                )
                chunk.vp_stage = stage
                chunks.append(chunk)
        else:
            chunks.append(
                provider(
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(),
                )
            )
        for chunk in chunks:
            chunk.model_type = ModelType.encoder_or_decoder
            for param in chunk.parameters():
                tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
            if self.device.type == "cuda":
                chunk.cuda(torch.cuda.current_device())
        if self.dtype in (torch.bfloat16, torch.float16):
            chunks = [Float16Module(self.config, chunk) for chunk in chunks]
        if weight_path is not None:
            self.load_weights(chunks, weight_path)
        return chunks

    # -- name resolution -----------------------------------------------------------------------------------

    def _resolve(self, chunk: torch.nn.Module, local_name: str) -> tuple[int, int | None, int | None]:
        for index, rule in enumerate(self.rules):
            match = rule.pattern.match(local_name)
            if match is None:
                continue
            groups = match.groupdict()
            layer = None
            if "layer" in groups:
                layer = chunk.decoder.layers[int(groups["layer"])].layer_number - 1
            expert = int(groups["expert"]) if "expert" in groups else None
            return index, layer, expert
        raise NotImplementedError(f"no weight rule maps the megatron parameter {local_name!r}")

    def _entries(self, chunk: torch.nn.Module) -> list[tuple[_Entry, torch.Tensor]]:
        out = []
        for name, param in chunk.named_parameters():
            rule_index, layer, expert = self._resolve(chunk, name)
            out.append((_Entry(rule_index, layer, expert, tuple(param.shape), param.dtype), param))
        return out

    def _experts_per_rank(self) -> int:
        return self.hf_config.num_experts // self.mpu.ep_size

    def _hf_names(self, rule: WeightRule, layer: int | None, global_expert: int | None) -> list[str]:
        return [template.format(layer=layer, expert=global_expert) for template in rule.hf]

    def _group_of(self, rule: WeightRule) -> tuple[int, int, Any]:
        """(rank, size, group) of the tensor-parallel group that shards this rule's parameters."""
        if rule.expert:
            return self.mpu.etp_rank, self.mpu.etp_size, self.mpu.etp_group
        return self.mpu.tp_rank, self.mpu.tp_size, self.mpu.tp_group

    def hf_weight_names(self) -> list[str]:
        """Every HF tensor name of the model, from the config and the rules alone (no model is built)."""
        names = [name for rule in self.rules if "{layer}" not in rule.megatron for name in rule.hf]
        for layer, is_moe in enumerate(self.moe_layer_pattern()):
            held = {"always", "moe" if is_moe else "dense"} | ({"qkv_bias"} if self.config.add_qkv_bias else set())
            for rule in self.rules:
                if "{layer}" in rule.megatron and rule.when in held:
                    for expert in range(self.hf_config.num_experts) if rule.expert else [None]:
                        names.extend(self._hf_names(rule, layer, expert))
        return names

    def weight_shards(self, models: list[torch.nn.Module], *, owned_only: bool = True) -> list[WeightShard]:
        """This rank's pieces of every parameter of ``models`` (chunks, wrapped or not); no communication.

        With ``owned_only`` a rank keeps only the pieces it is responsible for, so that over all ranks every
        piece of every parameter is listed exactly once, which is what a weight sync sends. The owner of a piece
        among its copies (data-parallel replicas, expert-data-parallel replicas for experts, and the ranks of
        the tensor-parallel group for a replicated layout) is chosen by a hash of its name, the same on every
        rank: the sending spreads over all replicas instead of resting on the first one, whose network links
        would otherwise carry the whole model to every engine (docs/benchmarks.md, the 30B push on paper).
        """
        from megatron.core import parallel_state

        if owned_only and torch.distributed.is_initialized():
            replica = parallel_state.get_data_parallel_rank(with_context_parallel=True)
            replicas = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
            expert_replica = parallel_state.get_expert_data_parallel_rank()
            expert_replicas = parallel_state.get_expert_data_parallel_world_size()
        else:
            replica = expert_replica = 0
            replicas = expert_replicas = 1
        shards = []
        for chunk in models:
            for entry, param in self._entries(unwrap_model(chunk)):
                rule = self.rules[entry.rule_index]
                rank, size, _ = self._group_of(rule)
                expert = None
                if rule.expert:
                    expert = self.mpu.ep_rank * self._experts_per_rank() + entry.local_expert
                names = tuple(self._hf_names(rule, entry.layer, expert))
                if rule.layout is Layout.REPLICATED:
                    # Every rank of the group holds the whole tensor: one piece, sent by one rank of the group.
                    if owned_only and rank != _owner(names, size, "tp"):
                        continue
                    rank, size = 0, 1
                if owned_only:
                    copies, mine = (expert_replicas, expert_replica) if rule.expert else (replicas, replica)
                    if mine != _owner(names + (str(rank),), copies, "dp"):
                        continue
                shards.append(WeightShard(names, rule.layout, rank, size, param.detach()))
        return shards

    # -- load ----------------------------------------------------------------------------------------------

    def load_weights(
        self, models: list[torch.nn.Module], weights_path: str | os.PathLike, memory_efficient: bool = False
    ) -> None:
        """Copies the HF weights in ``weights_path`` into this rank's shards of ``models``.

        Every rank reads the tensors it needs and keeps its slice; ``memory_efficient`` is accepted for
        mbridge's signature and has no effect.
        """
        hf_dir = Path(weights_path)
        if not (hf_dir / "config.json").is_file():
            raise ValueError(f"weights_path={str(hf_dir)!r} is not a Hugging Face model directory (no config.json)")
        reader = _SafetensorsReader(hf_dir)
        attention = self.attention_shape
        for chunk in models:
            chunk = unwrap_model(chunk)
            for entry, param in self._entries(chunk):
                rule = self.rules[entry.rule_index]
                expert = None
                if rule.expert:
                    expert = self.mpu.ep_rank * self._experts_per_rank() + entry.local_expert
                hf_tensors = [reader.get(name) for name in self._hf_names(rule, entry.layer, expert)]
                rank, size, _ = self._group_of(rule)
                local = shard(rule.layout, hf_to_megatron(rule.layout, hf_tensors, attention), rank, size)
                if local.shape != param.shape:
                    raise ValueError(
                        f"{rule.hf[0].format(layer=entry.layer, expert=expert)}: checkpoint shard {tuple(local.shape)}"
                        f" does not fit the megatron parameter {tuple(param.shape)}; does config.json match?"
                    )
                with torch.no_grad():
                    param.copy_(local)

    # -- export --------------------------------------------------------------------------------------------

    def export_weights(self, models: list[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (HF name, full tensor) for every weight, on every rank; a collective over all ranks.

        Every rank must iterate the generator to the end, in step with the others.
        """
        mpu = self.mpu
        attention = self.attention_shape
        chunks = [unwrap_model(chunk) for chunk in models]
        local = [self._entries(chunk) for chunk in chunks]
        # The one metadata exchange: what each pipeline stage holds (ranks of a stage hold the same list).
        stage_entries: list[list[list[_Entry]]] = [None] * mpu.pp_size  # type: ignore[list-item]
        mine = [[entry for entry, _ in chunk_entries] for chunk_entries in local]
        if mpu.pp_size > 1:
            stage_entries = collectives.all_gather_object(mine, group=mpu.pp_group)
        else:
            stage_entries = [mine]
        device = self.device if self.device.type == "cpu" else torch.device("cuda", torch.cuda.current_device())

        for stage, chunk_lists in enumerate(stage_entries):
            owner = stage == mpu.pp_rank
            for chunk_index, entries in enumerate(chunk_lists):
                for position, entry in enumerate(entries):
                    rule = self.rules[entry.rule_index]
                    rank, size, group = self._group_of(rule)
                    experts_here = mpu.ep_size if rule.expert else 1
                    shape = full_shape(rule.layout, entry.shape, size)
                    fulls: list[torch.Tensor]
                    if owner:
                        param = local[chunk_index][position][1].detach()
                        assert (local[chunk_index][position][0]) == entry
                        full = self._gather(rule.layout, param, size, group)
                        fulls = self._gather_list(full, experts_here, mpu.ep_group)
                    else:
                        fulls = [torch.empty(shape, dtype=entry.dtype, device=device) for _ in range(experts_here)]
                    if mpu.pp_size > 1:
                        src = torch.distributed.get_global_rank(mpu.pp_group, stage)
                        for tensor in fulls:
                            collectives.broadcast(tensor, src=src, group=mpu.pp_group)
                    for ep_rank, full in enumerate(fulls):
                        expert = None
                        if rule.expert:
                            expert = ep_rank * self._experts_per_rank() + entry.local_expert
                        names = self._hf_names(rule, entry.layer, expert)
                        yield from zip(names, megatron_to_hf(rule.layout, full, attention))

    def save_weights(
        self,
        models: list[torch.nn.Module],
        weights_path: str | os.PathLike,
        memory_efficient: bool = False,
        *,
        max_shard_bytes: int = 5 * 1024**3,
    ) -> None:
        """Writes a HF checkpoint (safetensors shards + index + config.json) from rank 0; a collective.

        ``memory_efficient`` is accepted for mbridge's signature and ignored: shards are written as soon
        as they fill, so at most one shard is held in memory.
        """

        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be > 0")
        writer = torch.distributed.get_rank() == 0 if torch.distributed.is_initialized() else True
        out = Path(weights_path)
        shards: list[dict[str, torch.Tensor]] = [{}]
        shard_bytes = total_bytes = 0
        files: list[Path] = []
        if writer:
            out.mkdir(parents=True, exist_ok=True)
        for name, tensor in self.export_weights(models):
            if not writer:
                continue
            size = tensor.numel() * tensor.element_size()
            if shards[-1] and shard_bytes + size > max_shard_bytes:
                files.append(out / f"shard-{len(files):05d}.tmp")
                save_file(shards[-1], str(files[-1]))
                shards.append({})
                shard_bytes = 0
            shards[-1][name] = tensor.detach().to("cpu", copy=True).contiguous()
            shard_bytes += size
            total_bytes += size
        if not writer:
            return
        files.append(out / f"shard-{len(files):05d}.tmp")
        save_file(shards[-1], str(files[-1]))
        if len(files) == 1:
            os.replace(files[0], out / "model.safetensors")
        else:
            weight_map = {}
            for index, tmp in enumerate(files):
                final = f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
                with safe_open(str(tmp), framework="pt") as handle:
                    weight_map.update({key: final for key in handle.keys()})
                os.replace(tmp, out / final)
            index_doc = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (out / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
        self.hf_config.save_pretrained(str(out))

    @staticmethod
    def _gather(layout: Layout, tensor: torch.Tensor, size: int, group: Any) -> torch.Tensor:
        if size == 1 or layout is Layout.REPLICATED:
            return tensor
        return unshard(layout, collectives.all_gather(tensor, group=group))

    @staticmethod
    def _gather_list(tensor: torch.Tensor, size: int, group: Any) -> list[torch.Tensor]:
        if size == 1:
            return [tensor]
        return collectives.all_gather(tensor, group=group)


def _owner(key: tuple[str, ...], copies: int, salt: str) -> int:
    """Which of ``copies`` identical copies of a piece sends it: a hash of its names, equal on every rank."""
    if copies == 1:
        return 0
    return zlib.crc32("|".join((salt, *key)).encode()) % copies
