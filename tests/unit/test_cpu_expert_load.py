"""Pure pieces of the direct CPU expert load (the engine-level test is in test_rollout_engine.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from sapo_megatron.rollout.cpu_expert_load import _rows_as_one_view, split_expert_tensors


def test_split_expert_tensors_groups_experts_by_layer_and_keeps_the_rest_in_order():
    t = torch.zeros(1)
    named = [
        ("model.embed_tokens.weight", t),
        ("model.layers.1.mlp.experts.0.up_proj.weight", t + 1),
        ("model.layers.1.mlp.gate.weight", t),
        ("model.layers.1.mlp.experts.0.gate_proj.weight", t + 2),
        ("model.layers.0.mlp.experts.3.down_proj.weight", t + 3),
        ("model.layers.0.mlp.shared_expert.up_proj.weight", t),
    ]
    rest, experts = split_expert_tensors(named)
    assert [n for n, _ in rest] == [
        "model.embed_tokens.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.0.mlp.shared_expert.up_proj.weight",
    ]
    assert sorted(experts) == [0, 1]
    assert sorted(experts[1][0]) == ["gate_proj", "up_proj"]
    assert experts[1][0]["gate_proj"].item() == 2 and experts[0][3]["down_proj"].item() == 3


def test_adjacent_rows_become_one_view_without_a_copy():
    fc1 = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    view = _rows_as_one_view(fc1[:3], fc1[3:], torch.float32)
    assert view is not None and view.data_ptr() == fc1.data_ptr()
    assert torch.equal(view, fc1)
    # A view starting inside the storage keeps its offset.
    inner = _rows_as_one_view(fc1[1:3], fc1[3:5], torch.float32)
    assert inner is not None and torch.equal(inner, fc1[1:5])


@pytest.mark.parametrize(
    "case",
    ["separate tensors", "reversed order", "gap", "other dtype", "not contiguous", "other row shape"],
)
def test_rows_that_are_not_adjacent_in_one_storage_are_refused(case):
    fc1 = torch.arange(48, dtype=torch.float32).reshape(12, 4)
    first, second, dtype = fc1[:3], fc1[3:6], torch.float32
    if case == "separate tensors":
        second = fc1[3:6].clone()
    elif case == "reversed order":
        first, second = fc1[3:6], fc1[:3]
    elif case == "gap":
        second = fc1[4:7]
    elif case == "other dtype":
        dtype = torch.bfloat16
    elif case == "not contiguous":
        first, second = fc1[:6:2], fc1[6:12:2]
    elif case == "other row shape":
        second = fc1[3:6].reshape(-1)[:12].reshape(4, 3)
    assert _rows_as_one_view(first, second, dtype) is None


def _record(level: int, msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord("vllm.model_executor.model_loader.reload.layerwise", level, __file__, 1, msg, args, None)


def test_weight_update_log_filter_drops_only_the_known_chatter():
    from sapo_megatron.rollout.engine import _WeightUpdateLogFilter

    direct, reload = _WeightUpdateLogFilter("RoutedExperts"), _WeightUpdateLogFilter(None)
    failed = "%s: Failed to load weights"
    not_loaded = "Following weights were not loaded from checkpoint: %s"
    experts = {"model.layers.0.mlp.experts.routed_experts.w13_weight", "model.layers.0.mlp.experts.routed_experts.w2_weight"}
    for quiet in (direct, reload):
        assert not quiet.filter(_record(logging.INFO, "Reloading weights inplace..."))
        assert not quiet.filter(_record(logging.WARNING, failed, "RotaryEmbedding"))
        # A layer that should have received weights and did not is a real problem.
        assert quiet.filter(_record(logging.WARNING, failed, "QKVParallelLinear"))
        assert quiet.filter(_record(logging.WARNING, not_loaded, experts | {"lm_head.weight"}))
        assert quiet.filter(_record(logging.ERROR, "something else"))
    # Only the direct load leaves the expert layers out on purpose.
    assert not direct.filter(_record(logging.WARNING, failed, "RoutedExperts"))
    assert not direct.filter(_record(logging.WARNING, not_loaded, experts))
    assert reload.filter(_record(logging.WARNING, failed, "RoutedExperts"))
    assert reload.filter(_record(logging.WARNING, not_loaded, experts))
