"""The CPU-compatibility layer: exact restore, scoping to megatron-core, the CUDA no-op, and what it redirects."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from sapo_megatron.actor.cpu_compat import CALL_SITE_MODULES, MegatronCpuCompat, needs_cpu_compat


@pytest.fixture(scope="module")
def megatron_modules():
    import importlib

    for name in CALL_SITE_MODULES:
        importlib.import_module(name)
    return {name: module for name, module in sys.modules.items() if name.startswith("megatron.core")}


MISSING = object()


def _patchable_state() -> dict:
    """Every attribute the layer may replace, keyed by (owner, name); MISSING where there is none."""
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    modules = [m for n, m in sorted(sys.modules.items()) if n.startswith("megatron.core") and m is not None]
    state = {(module, "torch"): module.__dict__.get("torch", MISSING) for module in modules}
    singles = [
        (tp_random, "_get_cuda_rng_state"),
        (tp_random, "_set_cuda_rng_state"),
        (moe_utils, "te_general_gemm"),
        (moe_utils, "maybe_move_tensor_to_cpu"),
        (token_dispatcher, "maybe_move_tensor_to_cpu"),
        (clip_grads, "clip_grad_by_total_norm_fp32"),
        (optimizer, "clip_grad_by_total_norm_fp32"),
        (distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups"),
        (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
        (torch.Tensor, "type"),
    ]
    for owner, name in singles:
        state[(owner, name)] = owner.__dict__.get(name, MISSING)
    return state


def test_install_then_remove_restores_every_attribute_exactly(megatron_modules):
    before = _patchable_state()
    compat = MegatronCpuCompat("cpu")
    compat.install()
    try:
        assert compat.installed and MegatronCpuCompat.active_instance() is compat
        targets = {(id(owner), name) for owner, name in compat.patched_targets()}
        during = _patchable_state()
        changed = {(id(owner), name) for (owner, name), value in during.items() if value is not before[(owner, name)]}
        # Everything that changed was recorded, and everything recorded changed.
        assert changed == targets
        from megatron.core.transformer import utils as transformer_utils

        assert (id(transformer_utils), "torch") in targets
        assert sum(name == "torch" for _, name in targets) >= len(CALL_SITE_MODULES)
    finally:
        compat.remove()
    after = _patchable_state()
    assert after.keys() == before.keys()
    assert all(after[key] is before[key] for key in before)
    assert not compat.installed and compat.patched_targets() == []
    assert MegatronCpuCompat.active_instance() is None
    from megatron.core.transformer.moe import moe_utils

    assert ("te_general_gemm" in moe_utils.__dict__) == (before[(moe_utils, "te_general_gemm")] is not MISSING)


def test_redirects_are_scoped_to_megatron_core(megatron_modules):
    from megatron.core.transformer import utils as transformer_utils

    real_current_device, real_empty = torch.cuda.current_device, torch.empty
    with MegatronCpuCompat("cpu"):
        # The process's torch is untouched: vLLM / transformers in the same process see no change.
        assert torch.cuda.current_device is real_current_device and torch.empty is real_empty
        assert sys.modules["torch"] is torch
        seen_by_megatron = transformer_utils.torch
        assert seen_by_megatron.cuda.current_device() == torch.device("cpu")
        assert seen_by_megatron.zeros(2, device="cuda").device == torch.device("cpu")
        assert seen_by_megatron.Tensor is torch.Tensor and seen_by_megatron.float32 is torch.float32
        # transformer/utils.py builds the default causal mask on "cuda".
        mask = transformer_utils.get_default_causal_mask(5)
        assert mask.device.type == "cpu" and torch.equal(mask, torch.ones(5, 5, dtype=torch.bool).triu(1))


def test_cuda_device_makes_install_a_no_op(megatron_modules):
    assert needs_cpu_compat("cpu") is True
    assert needs_cpu_compat(torch.device("cpu")) is True
    assert needs_cpu_compat("cuda") is False and needs_cpu_compat("cuda:1") is False
    assert needs_cpu_compat(torch.device("cuda", 0)) is False
    assert needs_cpu_compat(None) is (not torch.cuda.is_available())
    assert needs_cpu_compat("auto") is (not torch.cuda.is_available())
    with pytest.raises(ValueError, match="device='tpu'"):
        needs_cpu_compat("tpu")

    before = _patchable_state()
    compat = MegatronCpuCompat("cuda")
    with compat:
        assert not compat.enabled and not compat.installed
        assert compat.patched_targets() == [] and MegatronCpuCompat.active_instance() is None
        during = _patchable_state()
        assert all(during[key] is before[key] for key in before)


def test_only_one_instance_at_a_time(megatron_modules):
    with MegatronCpuCompat("cpu") as first:
        assert first.install() is first  # installing twice is harmless
        with pytest.raises(RuntimeError, match="another MegatronCpuCompat is installed"):
            MegatronCpuCompat("cpu").install()
    assert MegatronCpuCompat.active_instance() is None


def test_rng_tracker_forks_the_cpu_generator(megatron_modules):
    from megatron.core import tensor_parallel

    saved = torch.get_rng_state()
    try:
        with MegatronCpuCompat("cpu"):
            tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0, force_reset_rng=True)
            with tensor_parallel.get_cuda_rng_tracker().fork():
                inside = torch.randn(4)
            outside = torch.randn(4)
    finally:
        torch.set_rng_state(saved)
    # The model-parallel stream is seeded seed + 2718 + tp_rank; the default stream (seed) is not
    # advanced by what ran inside the fork.
    assert torch.equal(inside, torch.randn(4, generator=torch.Generator().manual_seed(123 + 2718 + 1)))
    assert torch.equal(outside, torch.randn(4, generator=torch.Generator().manual_seed(123)))


def test_rng_warning_is_filtered_only_while_installed(megatron_modules, caplog):
    logger = logging.getLogger("megatron.core.tensor_parallel.random")
    message = "CPU RNG state changed within GPU RNG context"
    with MegatronCpuCompat("cpu"), caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(message)
        logger.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(message)
    assert [r.getMessage() for r in caplog.records] == [message]


def test_split_sizes_become_numpy_for_gloo(megatron_modules):
    from megatron.core.transformer.moe import token_dispatcher

    splits = torch.tensor([3, 0, 5])
    with MegatronCpuCompat("cpu"):
        moved = token_dispatcher.maybe_move_tensor_to_cpu(splits, as_numpy=True)
        kept = token_dispatcher.maybe_move_tensor_to_cpu(splits)
    assert isinstance(moved, np.ndarray) and moved.tolist() == [3, 0, 5]
    assert kept is splits


def test_grad_clipping_accepts_cpu_fp32_grads(megatron_modules):
    from megatron.core.optimizer import clip_grads

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    params[0].grad = torch.tensor([1.0, -2.0, 3.0])
    params[1].grad = torch.full((2, 2), 4.0)
    expected = [p.grad * (1.0 / (4.0 + 1.0e-6)) for p in params]
    with MegatronCpuCompat("cpu"):
        clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=4.0)
        # Only inside the wrapped megatron function do CPU tensors carry CUDA type names.
        assert torch.zeros(1).type() == "torch.FloatTensor"
    for param, grad in zip(params, expected):
        torch.testing.assert_close(param.grad, grad, rtol=0, atol=0)
    assert "type" not in torch.Tensor.__dict__
    with pytest.raises(AssertionError):
        clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=4.0)
