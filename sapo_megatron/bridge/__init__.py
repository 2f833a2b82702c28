"""Megatron <-> Hugging Face weights: names and layouts as data (``layout``), mbridge underneath.

``get_bridge`` imports megatron-core and mbridge on first use, so importing this package stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from mbridge.core.parallel_states import ParallelStates

    from sapo_megatron.bridge.qwen3_moe import Qwen3MoeBridge

SUPPORTED_MODEL_TYPES = ("qwen3_moe",)


def moe_layer_pattern(hf_config: Any) -> list[int]:
    """1 for each MoE layer of a Qwen3-MoE model, 0 for each dense one, in model order; ``hf_config`` is a
    transformers config or its ``config.json`` as a dict.

    transformers' rule (Qwen3MoeDecoderLayer): layer ``i`` is MoE when the model has experts, ``i`` is not in
    ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``. The one place that reads it: the bridge writes
    it into megatron's ``moe_layer_freq`` (which the routing records' layer axis follows), and the planner and the
    rollout engine read it from ``config.json``.
    """
    if isinstance(hf_config, dict):
        get = hf_config.get
    else:
        def get(key: str, default: Any = None) -> Any:
            return getattr(hf_config, key, default)
    # The published Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts.
    experts = int(get("num_experts") or get("num_local_experts") or 0)
    step = int(get("decoder_sparse_step") or 1)
    dense = set(get("mlp_only_layers") or [])
    return [int(experts > 0 and i not in dense and (i + 1) % step == 0) for i in range(int(get("num_hidden_layers")))]


def load_hf_config(hf_dir: str | os.PathLike) -> Any:
    """The transformers config of a local HF model directory (no hub access)."""
    from transformers import AutoConfig

    path = Path(hf_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"hf_dir={str(path)!r} is not a Hugging Face model directory (no config.json)")
    return AutoConfig.from_pretrained(str(path))


def get_bridge(
    hf_dir_or_config: str | os.PathLike | Any,
    *,
    dtype: "torch.dtype",
    device: "str | torch.device | None" = None,
    moe_token_dispatcher: str = "alltoall",
    sequence_parallel: bool | None = None,
    use_te: bool | None = None,
    parallel_states: "ParallelStates | None" = None,
    **transformer_config_overrides: Any,
) -> "Qwen3MoeBridge":
    """The bridge for a HF model directory (or an already loaded HF config).

    Megatron's parallel state must be initialised first unless ``parallel_states`` is given (e.g. to
    translate a config for a layout that is not running). ``transformer_config_overrides`` are extra
    ``TransformerConfig`` fields (recomputation, for example).
    """
    hf_config = (
        load_hf_config(hf_dir_or_config) if isinstance(hf_dir_or_config, (str, os.PathLike)) else hf_dir_or_config
    )
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={hf_config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    # Imports megatron-core, mbridge and transformers (~8 s): only when a bridge is made (module docstring).
    from sapo_megatron.bridge.qwen3_moe import Qwen3MoeBridge

    bridge = Qwen3MoeBridge(
        hf_config,
        dtype=dtype,
        parallel_states=parallel_states,
        device=device,
        use_te=use_te,
        moe_token_dispatcher=moe_token_dispatcher,
        sequence_parallel=sequence_parallel,
    )
    if transformer_config_overrides:
        bridge.set_extra_args(**transformer_config_overrides)
    return bridge


__all__ = ["SUPPORTED_MODEL_TYPES", "get_bridge", "load_hf_config", "moe_layer_pattern"]
