"""The actor's megatron-core GPTModel (MoE layers), built from a Hugging Face Qwen3-MoE directory via the bridge.

The model is fp32 on CPU with megatron's local layer spec, and uses Transformer Engine's spec on a GPU
where TE is installed. Weights come from the HF safetensors through the bridge and go back out the same
way (``export_hf_weights``: HF names and full tensors, on every rank).

Inputs are right-padded token ids: megatron's RoPE numbers positions 0..S-1 whatever ``position_ids``
say, so a left-padded row would be rotated wrongly. With sequence parallelism the sequence is padded to a
multiple of the TP size internally; padding at the end never changes earlier positions (causal attention,
no token dropping in the MoE layers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch

from sapo_megatron.bridge import get_bridge
from sapo_megatron.config import ParallelConfig
from sapo_megatron.device import resolve_device

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

    from sapo_megatron.bridge.qwen3_moe import Qwen3MoeBridge

PARAMS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ActorModel:
    """This rank's model chunks (one per virtual pipeline stage) and the bridge that built them."""

    bridge: "Qwen3MoeBridge"
    chunks: list[torch.nn.Module]

    @property
    def config(self) -> "TransformerConfig":
        return self.bridge.config

    @property
    def device(self) -> torch.device:
        return self.bridge.device


def params_dtype_of(name: str) -> torch.dtype:
    if name not in PARAMS_DTYPES:
        raise ValueError(f"model.params_dtype={name!r}: use one of {', '.join(PARAMS_DTYPES)}")
    return PARAMS_DTYPES[name]


def _check_sequence_parallel(bridge: "Qwen3MoeBridge", parallel: ParallelConfig) -> None:
    if parallel.tensor > 1 and any(bridge.moe_layer_pattern()) and not parallel.sequence_parallel:
        raise ValueError(
            f"parallel.sequence_parallel=false with parallel.tensor={parallel.tensor}: megatron-core trains MoE "
            "layers under tensor parallelism only with sequence parallelism; set parallel.sequence_parallel=true"
        )


def plan_model(
    hf_dir_or_config: str | os.PathLike | Any,
    parallel: ParallelConfig,
    *,
    device: str | torch.device | None = "cpu",
    params_dtype: str = "float32",
) -> "Qwen3MoeBridge":
    """The bridge (TransformerConfig, layer pattern, weight names) for a layout, without building a model.

    Needs no process group: the parallel sizes come from ``parallel`` and this is rank 0 of each group.
    Used to check that a large model (Qwen3-30B-A3B) translates before any hardware is involved.
    """
    from mbridge.core.parallel_states import ParallelStates

    parallel.validate("parallel")
    states = ParallelStates(
        tp_size=parallel.tensor,
        pp_size=parallel.pipeline,
        vpp_size=parallel.virtual_pipeline or None,
        cp_size=parallel.context,
        ep_size=parallel.expert,
        etp_size=parallel.expert_tensor_size,
    )
    bridge = get_bridge(
        hf_dir_or_config,
        dtype=params_dtype_of(params_dtype),
        device=device,
        moe_token_dispatcher=parallel.moe_token_dispatcher,
        sequence_parallel=parallel.sequence_parallel,
        use_te=False if resolve_device(device).type == "cpu" else None,
        parallel_states=states,
    )
    _check_sequence_parallel(bridge, parallel)
    return bridge


def build_model(
    hf_dir: str | os.PathLike,
    parallel: ParallelConfig,
    *,
    device: str | torch.device | None = None,
    params_dtype: str = "float32",
    load_weights: bool = True,
    **transformer_config_overrides: Any,
) -> ActorModel:
    """Builds this rank's chunks for the initialised parallel state and (by default) loads the HF weights.

    ``parallel`` must be the layout passed to :func:`sapo_megatron.actor.parallel.init_distributed`; its
    ``sequence_parallel`` and ``moe_token_dispatcher`` go into the TransformerConfig.
    """
    from megatron.core import parallel_state

    running = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size(),
        parallel_state.get_expert_tensor_parallel_world_size(),
    )
    wanted = (parallel.tensor, parallel.pipeline, parallel.expert, parallel.expert_tensor_size)
    if running != wanted:
        raise ValueError(
            f"parallel (tensor, pipeline, expert, expert_tensor)={wanted} differs from the initialised parallel "
            f"state {running}; pass the same ParallelConfig to init_distributed and build_model"
        )
    bridge = get_bridge(
        hf_dir,
        dtype=params_dtype_of(params_dtype),
        device=device,
        moe_token_dispatcher=parallel.moe_token_dispatcher,
        sequence_parallel=parallel.sequence_parallel,
        **transformer_config_overrides,
    )
    _check_sequence_parallel(bridge, parallel)
    chunks = bridge.get_model()
    if load_weights:
        bridge.load_weights(chunks, hf_dir)
    return ActorModel(bridge=bridge, chunks=chunks)


def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """megatron's mask convention: True where attention is NOT allowed; [1, 1, S, S]."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(diagonal=1)[None, None]


def forward_logits(
    model: ActorModel,
    input_ids: torch.Tensor,
    *,
    micro_batch_size: int | None = None,
    gather_vocab: bool = True,
) -> torch.Tensor | None:
    """Logits [B, S, V] (or this TP rank's vocab slice [B, S, V/TP]) for right-padded ``input_ids`` [B, S].

    Runs megatron's forward-only pipeline schedule, so every rank of the model-parallel group must call
    it with the same ``input_ids``. Returns the logits on the last pipeline stage and ``None`` elsewhere.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"input_ids: expected integer token ids [batch, seq], got {input_ids.dtype} {tuple(input_ids.shape)}"
        )
    batch, seq_len = input_ids.shape
    micro_batch_size = micro_batch_size or batch
    if batch % micro_batch_size:
        raise ValueError(f"micro_batch_size={micro_batch_size} must divide the batch size {batch}")
    device = model.device if model.device.type == "cpu" else torch.device("cuda", torch.cuda.current_device())
    multiple = parallel_state.get_tensor_model_parallel_world_size() if model.config.sequence_parallel else 1
    padded_len = seq_len + (-seq_len) % multiple
    tokens = torch.nn.functional.pad(input_ids, (0, padded_len - seq_len)).to(device)
    micro_batches = list(torch.split(tokens, micro_batch_size))
    position_ids = torch.arange(padded_len, device=device).expand(micro_batch_size, padded_len)
    attention_mask = causal_mask(padded_len, device)

    def forward_step(data_iterator: Iterator[torch.Tensor], chunk: torch.nn.Module):
        micro_batch = next(data_iterator)
        logits = chunk(micro_batch, position_ids, attention_mask, runtime_gather_output=gather_vocab)
        # No loss function: the schedule keeps the last stage's outputs as they are.
        return logits, None

    if len(model.chunks) > 1:
        data_iterator: Any = [iter(micro_batches) for _ in model.chunks]
    else:
        data_iterator = iter(micro_batches)
    modes = [chunk.training for chunk in model.chunks]
    try:
        for chunk in model.chunks:
            chunk.eval()
        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=data_iterator,
                model=model.chunks,
                num_microbatches=len(micro_batches),
                seq_length=padded_len,
                micro_batch_size=micro_batch_size,
                forward_only=True,
            )
    finally:
        for chunk, training in zip(model.chunks, modes):
            chunk.train(training)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(outputs, dim=0)[:, :seq_len]


def export_hf_weights(model: ActorModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every weight, on every rank; all ranks must iterate it to the end together.

    The tensors can share memory with the live parameters: copy the ones you keep across an update.
    """
    return model.bridge.export_weights(model.chunks)
