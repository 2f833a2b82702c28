"""Shared test set-up: GPU-only tests are skipped (never faked) on machines without CUDA."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (GPU path: NCCL, Transformer Engine, GPU vLLM)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded tiny Qwen3-MoE, built once per test session into a private cache."""
    from sapo_megatron.models.tiny import TinyModelSpec, build_tiny_model

    return build_tiny_model(TinyModelSpec(), cache_dir=tmp_path_factory.mktemp("tiny-model-cache"))
