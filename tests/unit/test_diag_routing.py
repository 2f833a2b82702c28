"""Routing diagnostics: top-k set changes, expert load and router entropy, by hand and under exact reduction."""

from __future__ import annotations

import math

import pytest
import torch

from sapo_megatron.diagnostics.routing_stats import (
    changed_layer_count,
    expert_load_stats,
    finalize_expert_load,
    finalize_router_entropy,
    finalize_routing_change,
    router_entropy_stats,
    routing_change_stats,
    sum_statistics,
)

F64 = torch.float64


def hand_routings():
    """5 tokens, 2 MoE layers, top-2 of 4 experts. Token 3 is masked (garbage); token 4 is unrecorded in layer 1
    of routing_b."""
    routing_a = torch.tensor(
        [[
            [[0, 1], [2, 3]],
            [[1, 2], [0, 3]],
            [[3, 0], [1, 2]],
            [[7, 7], [99, -5]],
            [[0, 1], [2, 3]],
        ]]
    )
    routing_b = torch.tensor(
        [[
            [[1, 0], [2, 1]],  # layer 0: same set reordered; layer 1: overlap 1 of 2
            [[3, 0], [3, 0]],  # layer 0: overlap 0; layer 1: same set
            [[0, 3], [2, 1]],  # both layers the same sets
            [[-9, 4], [4, 4]],
            [[0, 2], [3, -1]],  # layer 0: overlap 1; layer 1 partly recorded, hence unrecorded
        ]]
    )
    mask = torch.tensor([[1, 1, 1, 0, 1]], dtype=torch.bool)
    return routing_a, routing_b, mask


def test_routing_change_by_hand():
    routing_a, routing_b, mask = hand_routings()
    stats = routing_change_stats(routing_a, routing_b, mask)
    assert stats["pairs_compared"].tolist() == [4.0, 3.0]
    assert stats["pairs_changed"].tolist() == [2.0, 1.0]
    assert stats["overlap_sum"].tolist() == [2.5, 2.5]
    assert (stats["tokens_compared"].item(), stats["tokens_changed"].item(), stats["tokens_unrecorded"].item()) == (
        3.0, 2.0, 1.0,
    )
    metrics = finalize_routing_change(stats, prefix="rollout_vs_old/")
    assert metrics["rollout_vs_old/routing_changed_frac"].tolist() == [0.5, pytest.approx(1 / 3)]
    assert metrics["rollout_vs_old/routing_changed_frac_mean"].item() == pytest.approx(3 / 7)
    assert metrics["rollout_vs_old/routing_overlap"].tolist() == [0.625, pytest.approx(2.5 / 3)]
    assert metrics["rollout_vs_old/routing_overlap_mean"].item() == pytest.approx(5 / 7)
    assert metrics["rollout_vs_old/routing_token_changed_frac"].item() == pytest.approx(2 / 3)
    assert metrics["rollout_vs_old/routing_unrecorded_frac"].item() == 0.25
    assert changed_layer_count(routing_a, routing_b, mask).tolist() == [[1, 1, 0, -1, -1]]


def random_routings(seed=0, batch=4, seq=7, layers=3, topk=2, num_experts=6, flip=0.3):
    gen = torch.Generator().manual_seed(seed)
    pick = lambda: torch.rand(batch, seq, layers, num_experts, generator=gen).argsort(dim=-1)[..., :topk]  # noqa: E731
    routing_a = pick()
    other = pick()
    flips = torch.rand(batch, seq, layers, 1, generator=gen) < flip
    routing_b = torch.where(flips, other, routing_a)
    lengths = torch.tensor([7, 0, 3, 5])[:batch]
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    return routing_a, routing_b, mask


def test_sets_are_compared_regardless_of_order_and_the_comparison_is_symmetric():
    routing_a, routing_b, mask = random_routings()
    base = routing_change_stats(routing_a, routing_b, mask)
    gen = torch.Generator().manual_seed(1)
    order = torch.rand(routing_b.shape, generator=gen).argsort(dim=-1)
    shuffled = routing_change_stats(routing_a, routing_b.gather(-1, order), mask)
    swapped = routing_change_stats(routing_b, routing_a, mask)
    for key in base:
        assert torch.equal(shuffled[key], base[key]) and torch.equal(swapped[key], base[key]), key
    assert base["pairs_changed"].sum() > 0
    same = finalize_routing_change(routing_change_stats(routing_a, routing_a.flip(-1), mask))
    assert same["routing_changed_frac_mean"].item() == 0.0 and same["routing_overlap_mean"].item() == 1.0


def test_changed_layer_count_matches_a_python_set_comparison():
    routing_a, routing_b, mask = random_routings(seed=4, flip=0.5)
    counts = changed_layer_count(routing_a, routing_b, mask)
    for b in range(mask.shape[0]):
        for s in range(mask.shape[1]):
            expected = -1
            if mask[b, s]:
                expected = sum(
                    set(routing_a[b, s, layer].tolist()) != set(routing_b[b, s, layer].tolist())
                    for layer in range(routing_a.shape[2])
                )
            assert counts[b, s].item() == expected


def test_summed_micro_batch_statistics_equal_the_whole_batch():
    routing_a, routing_b, mask = random_routings(seed=2)
    routing_b[2, 1, 0, 1] = -1  # one unrecorded pair
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(*routing_a.shape[:3], 6, generator=gen, dtype=F64)
    functions = {
        "change": lambda rows: routing_change_stats(routing_a[rows], routing_b[rows], mask[rows]),
        "load": lambda rows: expert_load_stats(routing_a[rows], mask[rows], 6),
        "entropy": lambda rows: router_entropy_stats(mask[rows], router_logits=logits[rows]),
    }
    for name, fn in functions.items():
        whole = fn([0, 1, 2, 3])
        per_rank = [sum_statistics([fn([0]), fn([1])]), sum_statistics([fn([2]), fn([3])])]
        combined = sum_statistics(per_rank)
        for key in whole:
            assert whole[key].dtype == F64
            assert torch.allclose(combined[key], whole[key], rtol=1e-14, atol=0), (name, key)
    # the load imbalance of the pooled counts is not the mean of per-part imbalances; finalize sees the pool
    parts = [expert_load_stats(routing_a[[i]], mask[[i]], 6) for i in (0, 2)]
    pooled = finalize_expert_load(sum_statistics(parts))["load_max_over_mean"]
    averaged = torch.stack([finalize_expert_load(p)["load_max_over_mean"] for p in parts]).mean(dim=0)
    assert not torch.allclose(pooled, averaged)


def test_expert_load_by_hand():
    routing_a, _, mask = hand_routings()
    stats = expert_load_stats(routing_a, mask, num_experts=4)
    # layer 0: {0,1} {1,2} {3,0} {0,1}; layer 1: {2,3} {0,3} {1,2} {2,3}; token 3 is masked
    assert stats["expert_counts"].tolist() == [[3, 3, 1, 1], [1, 1, 3, 3]]
    metrics = finalize_expert_load(stats)
    assert metrics["expert_load"][0].tolist() == [0.375, 0.375, 0.125, 0.125]
    assert metrics["load_max_over_mean"].tolist() == [1.5, 1.5]
    assert metrics["load_cv"].tolist() == [0.5, 0.5]  # counts 3,3,1,1: mean 2, population std 1
    entropy = -(2 * 0.375 * math.log(0.375) + 2 * 0.125 * math.log(0.125))
    assert metrics["load_entropy"].tolist() == pytest.approx([entropy, entropy], rel=1e-14)
    assert metrics["load_entropy_norm_mean"].item() == pytest.approx(entropy / math.log(4), rel=1e-14)


def test_expert_load_extremes_and_empty_layers():
    balanced = torch.tensor([[[[0, 1]], [[2, 3]]]])  # 2 tokens, 1 layer, top-2 of 4: every expert once
    metrics = finalize_expert_load(expert_load_stats(balanced, torch.ones(1, 2), 4))
    assert metrics["load_max_over_mean"].item() == 1.0 and metrics["load_cv"].item() == 0.0
    assert metrics["load_entropy_norm"].item() == pytest.approx(1.0, rel=1e-15)

    # layer 0: expert 2 takes every slot (top-1); layer 1: never recorded
    collapsed = torch.tensor([[[[2], [-1]], [[2], [-1]], [[2], [-1]]]])
    metrics = finalize_expert_load(expert_load_stats(collapsed, torch.ones(1, 3), 4))
    assert metrics["expert_load"].tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]
    assert metrics["load_max_over_mean"].tolist() == [4.0, 0.0]
    assert metrics["load_entropy"].tolist() == [0.0, 0.0]
    # the layer without counts is left out of the layer means
    assert metrics["load_max_over_mean_mean"].item() == 4.0
    assert metrics["load_cv_mean"].item() == pytest.approx(math.sqrt(3), rel=1e-14)


def test_router_entropy_from_probs_and_logits():
    probs = torch.tensor([[[[0.5, 0.25, 0.25, 0.0], [0.25] * 4], [[1.0, 0.0, 0.0, 0.0], [0.25] * 4],
                           [[math.nan] * 4, [math.nan] * 4]]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    metrics = finalize_router_entropy(router_entropy_stats(mask, router_probs=probs), prefix="old/")
    # layer 0: H(1/2, 1/4, 1/4, 0) = 1.5 ln 2 and a one-hot 0; layer 1: uniform, ln 4
    assert metrics["old/router_entropy"].tolist() == pytest.approx([0.75 * math.log(2), math.log(4)], rel=1e-14)
    assert metrics["old/router_entropy_mean"].item() == pytest.approx((0.75 * math.log(2) + math.log(4)) / 2)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 2, 5, generator=gen, dtype=F64)
    logits[0, 0, 0, 1] = -math.inf  # an excluded expert
    mask = torch.ones(2, 3, dtype=torch.bool)
    from_logits = router_entropy_stats(mask, router_logits=logits)
    from_probs = router_entropy_stats(mask, router_probs=logits.softmax(dim=-1))
    assert torch.allclose(from_logits["router_entropy_sum"], from_probs["router_entropy_sum"], rtol=1e-12)
    uniform = router_entropy_stats(mask, router_logits=torch.full((2, 3, 2, 5), 3.0))
    assert finalize_router_entropy(uniform)["router_entropy"].tolist() == pytest.approx([math.log(5)] * 2)


def test_routing_input_errors_name_the_argument():
    routing_a, routing_b, mask = hand_routings()
    with pytest.raises(ValueError, match="routing_b has shape"):
        routing_change_stats(routing_a, routing_b[:, :, :1], mask)
    with pytest.raises(ValueError, match="routing_a must hold integer expert ids"):
        routing_change_stats(routing_a.float(), routing_b, mask)
    with pytest.raises(ValueError, match=r"routing_a must be \[batch, seq, layers, topk\]"):
        routing_change_stats(routing_a[0], routing_b[0], mask)
    with pytest.raises(ValueError, match="mask has shape"):
        routing_change_stats(routing_a, routing_b, mask[:, :3])
    bad = routing_b.clone()
    bad[0, 0, 0, 0] = -2
    with pytest.raises(ValueError, match="routing_b holds 1 id.s. below -1"):
        routing_change_stats(routing_a, bad, mask)
    bad[0, 0, 0] = torch.tensor([1, 1])
    with pytest.raises(ValueError, match="routing_b repeats an expert within the top-k of 1"):
        routing_change_stats(routing_a, bad, mask)
    with pytest.raises(ValueError, match="routing holds 4 id.s. >= num_experts=3"):
        expert_load_stats(routing_a, mask, num_experts=3)
    with pytest.raises(ValueError, match="num_experts=0"):
        expert_load_stats(routing_a, mask, num_experts=0)
    probs = torch.full((1, 5, 2, 4), 0.25)
    with pytest.raises(ValueError, match="exactly one of router_probs= and router_logits="):
        router_entropy_stats(mask, router_probs=probs, router_logits=probs)
    with pytest.raises(ValueError, match="do not sum to 1"):
        router_entropy_stats(mask, router_probs=probs * 2)
    with pytest.raises(ValueError, match="NaN/inf or negative"):
        router_entropy_stats(mask, router_probs=probs - 0.5)
    logits = torch.zeros(1, 5, 2, 4)
    logits[0, 0, 0, 0] = math.nan
    logits[0, 1, 1] = -math.inf
    with pytest.raises(ValueError, match="router_logits has 2 row"):
        router_entropy_stats(mask, router_logits=logits)
    with pytest.raises(ValueError, match="statistics dict 1 has expert_counts of shape"):
        sum_statistics([expert_load_stats(routing_a, mask, 4), expert_load_stats(routing_a, mask, 5)])
