"""The models the pipeline trains: the embedded tiny Qwen3-MoE, or a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

from sapo_megatron.config import Config, ConfigError
from sapo_megatron.models.tiny import TINY_MODEL_NAME, TinyModelSpec, build_tiny_model


def resolve_model_dir(cfg: Config) -> Path:
    """``model.hf_path``: the embedded tiny model (built once, cached) or a Hugging Face directory."""
    if cfg.model.hf_path == TINY_MODEL_NAME:
        return build_tiny_model(TinyModelSpec(dense=cfg.model.dense))
    path = Path(cfg.model.hf_path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.hf_path={cfg.model.hf_path!r} is not a Hugging Face model directory (no config.json); "
            f"give a local directory or 'tiny-qwen3-moe'"
        )
    return path
