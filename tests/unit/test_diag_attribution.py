"""Routing-induced ratio variance: hand-computed decomposition, exact additivity, invariances."""

from __future__ import annotations

import pytest
import torch

from sapo_megatron.algorithms.metrics import sequence_log_ratio_variance
from sapo_megatron.diagnostics.attribution import (
    finalize_variance_attribution,
    grouped_variance_stats,
    routing_variance_stats,
)
from sapo_megatron.diagnostics.routing_stats import changed_layer_count, sum_statistics

F64 = torch.float64
NAN = float("nan")


def hand_example():
    """Stable tokens x = -0.5, 0, 0.5, 0; changed tokens x = 2 (1 layer changed) and 4 (2 layers changed)."""
    values = torch.tensor([[-0.5, 2.0, 0.0, NAN], [0.5, 4.0, 0.0, NAN]], dtype=F64)
    groups = torch.tensor([[0, 1, 0, 5], [0, 2, 0, -7]])  # ids at masked positions are never read
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    return values, groups, mask


HAND_EXPECTED = {
    # global mean 1; SS_total = 2.25 + 0.25 + 1 + 1 + 1 + 9 = 14.5
    "num_tokens": 6.0, "num_excluded": 0.0, "changed_token_frac": 2 / 6,
    "mean": 1.0, "var": 14.5 / 6,
    "mean_stable": 0.0, "var_stable": 0.5 / 4, "mean_changed": 3.0, "var_changed": 1.0,
    "ss_total": 14.5, "ss_stable": 4.5, "ss_changed": 10.0,
    "ss_within_stable": 0.5, "ss_within_changed": 2.0, "ss_between": 4 * 1.0 + 2 * 4.0,
    "var_share_changed": 10 / 14.5, "eta2": 12 / 14.5,
    # sequence means 0.5 and 1.5: deviations (-1, 1.5, -0.5) and (-1, 2.5, -1.5)
    "seq_ss_total": 13.0, "seq_ss_changed": 2.25 + 6.25, "seq_var_share_changed": 8.5 / 13,
    "within_seq_frac": 13 / 14.5,
    "eta2_by_changed_layers": (4 * 1.0 + 1 * 1.0 + 1 * 9.0) / 14.5,
}
HAND_EXPECTED_BY_LAYERS = {
    "count_by_changed_layers": [4.0, 1.0, 1.0],
    "token_share_by_changed_layers": [4 / 6, 1 / 6, 1 / 6],
    "mean_by_changed_layers": [0.0, 2.0, 4.0],
    "var_by_changed_layers": [0.125, 0.0, 0.0],
    "var_share_by_changed_layers": [4.5 / 14.5, 1 / 14.5, 9 / 14.5],
}


def assert_hand_metrics(metrics, prefix=""):
    for key, expected in HAND_EXPECTED.items():
        assert metrics[prefix + key].item() == pytest.approx(expected, rel=1e-14, abs=1e-15), key
    for key, expected in HAND_EXPECTED_BY_LAYERS.items():
        assert metrics[prefix + key].tolist() == pytest.approx(expected, rel=1e-14, abs=1e-15), key


def test_attribution_by_hand():
    values, groups, mask = hand_example()
    stats = grouped_variance_stats(values, groups, mask, num_groups=3)
    assert stats["group_count"].tolist() == [4.0, 1.0, 1.0]
    assert stats["group_sum"].tolist() == [0.0, 2.0, 4.0]
    assert stats["group_sumsq"].tolist() == [0.5, 4.0, 16.0]
    assert stats["group_seq_ss"].tolist() == [1 + 0.25 + 1 + 2.25, 2.25, 6.25]
    metrics = finalize_variance_attribution(stats, prefix="update/")
    assert_hand_metrics(metrics, prefix="update/")
    assert all(key.startswith("update/") for key in metrics)


def test_attribution_from_routings_groups_by_changed_layer_count():
    values, _, mask = hand_example()
    # 2 layers, top-1 of 4 experts; routing_b differs from routing_a in as many layers as hand_example's groups
    routing_a = torch.zeros(2, 4, 2, 1, dtype=torch.long)
    routing_b = routing_a.clone()
    routing_b[0, 1, 0] = 3  # x = 2: one changed layer
    routing_b[1, 1, :] = 2  # x = 4: two changed layers
    mask = mask.clone()
    mask[0, 3] = True
    values = values.clone()
    values[0, 3] = 100.0  # valid but unrecorded: left out of every statistic
    routing_b[0, 3, 1] = -1
    assert changed_layer_count(routing_a, routing_b, mask).tolist() == [[0, 1, 0, -1], [0, 2, 0, -1]]
    stats = routing_variance_stats(values, mask, routing_a, routing_b)
    metrics = finalize_variance_attribution(stats)
    assert metrics["num_excluded"].item() == 1.0
    for key, expected in dict(HAND_EXPECTED, num_excluded=1.0).items():
        assert metrics[key].item() == pytest.approx(expected, rel=1e-14, abs=1e-15), key


def random_case(seed=7, batch=9, seq=11, num_groups=4):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, seq + 1, (batch,), generator=gen)
    lengths[2] = 0
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    groups = torch.randint(0, num_groups, (batch, seq), generator=gen)
    groups = torch.where(torch.rand(batch, seq, generator=gen) < 0.1, -1, groups)
    # changed tokens are both shifted and noisier, as routing flips tend to be
    values = 0.05 * torch.randn(batch, seq, generator=gen, dtype=F64) + 0.3 * groups.clamp(min=0) * torch.randn(
        batch, seq, generator=gen, dtype=F64
    ) + 0.1 * (groups > 0)
    values = torch.where(mask, values, NAN)
    return values, groups, mask, num_groups


def test_decomposition_adds_up_and_equals_a_direct_two_pass_computation():
    values, groups, mask, num_groups = random_case()
    m = finalize_variance_attribution(grouped_variance_stats(values, groups, mask, num_groups))
    included = mask & (groups >= 0)
    x, g = values[included], groups[included]
    changed = g > 0
    mean = x.mean()
    ss_total = (x - mean).square().sum()
    rel = dict(rel=1e-12, abs=1e-14)
    assert m["ss_total"].item() == pytest.approx(ss_total.item(), **rel)
    assert m["ss_changed"].item() == pytest.approx((x[changed] - mean).square().sum().item(), **rel)
    for key, part in (("ss_within_changed", x[changed]), ("ss_within_stable", x[~changed])):
        assert m[key].item() == pytest.approx((part - part.mean()).square().sum().item(), **rel), key
    assert m["var_changed"].item() == pytest.approx(x[changed].var(correction=0).item(), **rel)
    # the law of total variance, both views
    parts = m["ss_within_stable"] + m["ss_within_changed"] + m["ss_between"]
    assert parts.item() == pytest.approx(m["ss_total"].item(), **rel)
    assert (m["ss_stable"] + m["ss_changed"]).item() == pytest.approx(m["ss_total"].item(), **rel)
    assert m["var_share_by_changed_layers"].sum().item() == pytest.approx(1.0, **rel)
    assert m["var_share_by_changed_layers"][1:].sum().item() == pytest.approx(m["var_share_changed"].item(), **rel)
    assert 0 < m["eta2"].item() <= m["eta2_by_changed_layers"].item() < m["var_share_changed"].item() < 1
    assert m["num_excluded"].item() == (mask & (groups < 0)).sum().item()


def test_sequence_part_is_the_loss_var_i_weighted_by_length():
    values, _, mask, _ = random_case(seed=11)
    groups = torch.zeros_like(mask, dtype=torch.long)  # every token grouped: same tokens as the loss's Var_i
    m = finalize_variance_attribution(grouped_variance_stats(values, groups, mask, 2))
    var_i = sequence_log_ratio_variance(torch.where(mask, values, 0.0), mask)
    assert m["seq_ss_total"].item() == pytest.approx((var_i * mask.sum(dim=-1)).sum().item(), rel=1e-12)
    assert m["seq_var_share_changed"].item() == 0.0 and m["var_share_changed"].item() == 0.0


def test_summed_statistics_of_chunks_equal_the_whole():
    values, groups, mask, num_groups = random_case(seed=3)
    whole = grouped_variance_stats(values, groups, mask, num_groups)
    fn = lambda rows: grouped_variance_stats(values[rows], groups[rows], mask[rows], num_groups)  # noqa: E731
    # uneven micro-batches, one holding only the empty sequence, on two strided "ranks"
    rank0 = sum_statistics([fn([0, 4]), fn([2]), fn([6, 8])])
    rank1 = sum_statistics([fn([1, 3, 5]), fn([7])])
    combined = sum_statistics([rank0, rank1])
    for key in whole:
        assert torch.allclose(combined[key], whole[key], rtol=1e-13, atol=1e-15), key
    m_whole = finalize_variance_attribution(whole)
    m_combined = finalize_variance_attribution(combined)
    for key in m_whole:
        assert torch.allclose(m_combined[key], m_whole[key], rtol=1e-12, atol=1e-14), key


def test_shift_scale_and_order_invariance():
    values, groups, mask, num_groups = random_case(seed=5)
    base = finalize_variance_attribution(grouped_variance_stats(values, groups, mask, num_groups))
    shifted = finalize_variance_attribution(grouped_variance_stats(values + 0.75, groups, mask, num_groups))
    scaled = finalize_variance_attribution(grouped_variance_stats(-3.0 * values, groups, mask, num_groups))
    perm = torch.tensor([8, 3, 0, 5, 1, 7, 2, 6, 4])
    permuted = finalize_variance_attribution(grouped_variance_stats(values[perm], groups[perm], mask[perm], num_groups))
    shares = ("var_share_changed", "eta2", "seq_var_share_changed", "within_seq_frac", "eta2_by_changed_layers",
              "var_share_by_changed_layers", "changed_token_frac")
    for key in shares:
        assert torch.allclose(shifted[key], base[key], rtol=1e-9), key
        assert torch.allclose(scaled[key], base[key], rtol=1e-12), key
    for key in ("ss_total", "ss_changed", "ss_between", "seq_ss_total", "var_changed"):
        assert shifted[key].item() == pytest.approx(base[key].item(), rel=1e-9), key
        assert scaled[key].item() == pytest.approx(9 * base[key].item(), rel=1e-12), key
    assert shifted["mean_changed"].item() == pytest.approx(base["mean_changed"].item() + 0.75, rel=1e-12)
    for key in base:
        assert torch.allclose(permuted[key], base[key], rtol=1e-12, atol=1e-15), key


def test_no_variance_no_tokens_and_no_changed_tokens_give_zeros_not_nan():
    mask = torch.ones(2, 3, dtype=torch.bool)
    groups = torch.tensor([[0, 1, 0], [2, 0, 1]])
    constant_values = torch.full((2, 3), 0.1, dtype=F64)
    constant = finalize_variance_attribution(grouped_variance_stats(constant_values, groups, mask, 3))
    empty = finalize_variance_attribution(
        grouped_variance_stats(torch.full((2, 3), NAN), groups, torch.zeros_like(mask), 3)
    )
    for metrics in (constant, empty):
        for key, value in metrics.items():
            assert torch.isfinite(value).all(), key
    assert constant["var_share_changed"].item() == 0.0 and constant["eta2"].item() == 0.0
    assert constant["mean"].item() == pytest.approx(0.1, rel=1e-15)
    assert empty["num_tokens"].item() == 0.0 and empty["ss_total"].item() == 0.0
    stable = finalize_variance_attribution(
        grouped_variance_stats(torch.tensor([[1.0, 2.0, 4.0]], dtype=F64), torch.zeros(1, 3, dtype=torch.long),
                               torch.ones(1, 3), 2)
    )
    assert stable["changed_token_frac"].item() == 0.0 and stable["var_share_changed"].item() == 0.0
    assert stable["mean_changed"].item() == 0.0 and stable["var_stable"].item() == pytest.approx(14 / 9)


def test_attribution_input_errors_name_the_argument():
    values, groups, mask = hand_example()
    with pytest.raises(ValueError, match=r"groups holds 1 id\(s\) outside \[-1, 1\]"):
        grouped_variance_stats(values, groups, mask, num_groups=2)
    with pytest.raises(ValueError, match="groups must hold integer group ids"):
        grouped_variance_stats(values, groups.double(), mask, num_groups=3)
    with pytest.raises(ValueError, match="groups has shape"):
        grouped_variance_stats(values, groups[:, :3], mask, num_groups=3)
    with pytest.raises(ValueError, match="num_groups=0"):
        grouped_variance_stats(values, groups, mask, num_groups=0)
    with pytest.raises(ValueError, match="values has 2 NaN/inf value"):
        grouped_variance_stats(values, groups.clamp(min=-1), torch.ones_like(mask), num_groups=8)
    with pytest.raises(ValueError, match=r"values must be \[batch, seq\]"):
        grouped_variance_stats(values[0], groups[0], mask[0], num_groups=3)
    routing = torch.zeros(2, 4, 2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="values has shape"):
        routing_variance_stats(values[:, :3], mask, routing, routing)
