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


__all__ = ["SUPPORTED_MODEL_TYPES", "get_bridge", "load_hf_config"]
