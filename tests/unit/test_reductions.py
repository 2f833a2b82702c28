"""Reductions: closed-form values, and exact micro-batch / data-parallel invariance with global counts."""

from __future__ import annotations

import math

import pytest
import torch

from sapo_megatron.algorithms import aggregate, count_valid_sequences, count_valid_tokens, get_policy_loss
from sapo_megatron.config import POLICY_LOSSES, REDUCTIONS

F64 = torch.float64
NAN = float("nan")

HYPER = {
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "clip": {"eps_low": 0.2, "eps_high": 0.28},
    "dual_clip": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip_c": 1.6},
    "gspo": {"eps_low": 0.05, "eps_high": 0.08},
    "cispo": {"eps_low": 0.3, "eps_high": 0.2},
}
NORM_LENGTH = 7


def hand_example():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN], [7.0, 8.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    return values, mask


@pytest.mark.parametrize(
    "reduction, expected, expected_with_counts",
    [
        ("token_mean", 7 / 3, 7 / 10),  # (1 + 2 + 4) / 3 tokens; / 10 global tokens
        ("seq_mean_token_mean", (1.5 + 4) / 2, (1.5 + 4) / 5),  # the empty row is not a sequence
        ("seq_mean_token_sum", (3 + 4) / 2, (3 + 4) / 5),
        ("seq_mean_token_sum_norm", (3 / 4 + 4 / 4) / 2, (3 / 4 + 4 / 4) / 5),
    ],
)
def test_closed_form_values(reduction, expected, expected_with_counts):
    values, mask = hand_example()
    assert aggregate(values, mask, reduction, norm_length=4).item() == pytest.approx(expected, rel=1e-15)
    with_counts = aggregate(values, mask, reduction, num_global_tokens=10, num_global_seqs=5, norm_length=4)
    assert with_counts.item() == pytest.approx(expected_with_counts, rel=1e-15)
    as_tensors = aggregate(
        values, mask.bool(), reduction, num_global_tokens=torch.tensor(10), num_global_seqs=torch.tensor([5.0]),
        norm_length=4,
    )
    assert as_tensors.item() == pytest.approx(expected_with_counts, rel=1e-15)


def test_counts():
    _, mask = hand_example()
    assert count_valid_tokens(mask).item() == 3
    assert count_valid_sequences(mask).item() == 2


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_sequences_do_not_count(reduction):
    values, mask = hand_example()
    padded_values = torch.cat([values, torch.full((4, 3), 123.0, dtype=F64)])
    padded_mask = torch.cat([mask, torch.zeros(4, 3)])
    assert aggregate(padded_values, padded_mask, reduction, norm_length=4).item() == pytest.approx(
        aggregate(values, mask, reduction, norm_length=4).item(), rel=1e-15
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_zero_mask_gives_zero_loss_with_a_graph(reduction):
    values = torch.randn(3, 4, dtype=F64, requires_grad=True)
    for counts in ({}, {"num_global_tokens": 0, "num_global_seqs": 0}):
        loss = aggregate(values, torch.zeros(3, 4, dtype=torch.bool), reduction, norm_length=4, **counts)
        assert loss.item() == 0.0 and loss.grad_fn is not None
        (grad,) = torch.autograd.grad(loss, values)
        assert bool((grad == 0).all())


# ------------------------------------------------------------------------------------------------------
# Micro-batch and data-parallel invariance
# ------------------------------------------------------------------------------------------------------


def invariance_batch():
    """7 sequences of lengths 7, 3, 0, 5, 1, 6, 2 with per-token advantages and off-policy ratios."""
    gen = torch.Generator().manual_seed(42)
    lengths = torch.tensor([7, 3, 0, 5, 1, 6, 2])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    logprobs_old = -torch.rand(7, 7, generator=gen, dtype=F64) * 2 - 0.05
    logprobs = logprobs_old + torch.randn(7, 7, generator=gen, dtype=F64) * 0.3
    advantages = torch.randn(7, 7, generator=gen, dtype=F64)
    return logprobs, logprobs_old, advantages, mask, lengths


SPLITS = {
    # uneven contiguous micro-batches (gradient accumulation on one rank)
    "micro_batches": [[0, 1], [2], [3, 4, 5, 6]],
    # two data-parallel ranks (strided), each with two micro-batches; the empty sequence is alone in one
    "data_parallel": [[0, 4], [6], [1, 3], [5, 2]],
}


@pytest.mark.parametrize("name", POLICY_LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("split", SPLITS)
def test_sum_of_micro_batch_shares_is_the_whole_batch_loss(name, reduction, split):
    logprobs, logprobs_old, advantages, mask, lengths = invariance_batch()
    fn = get_policy_loss(name)
    kwargs = dict(reduction=reduction, norm_length=NORM_LENGTH, **HYPER[name])

    whole_lp = logprobs.clone().requires_grad_(True)
    whole, _ = fn(whole_lp, logprobs_old, advantages, mask, **kwargs)
    (whole_grad,) = torch.autograd.grad(whole, whole_lp)

    num_global_tokens = int(count_valid_tokens(mask))
    num_global_seqs = int(count_valid_sequences(mask))
    leaf = logprobs.clone().requires_grad_(True)
    total = torch.zeros((), dtype=F64)
    for rows in SPLITS[split]:
        index = torch.tensor(rows)
        # each micro-batch is padded only to its own longest sequence (at least one column)
        width = max(1, int(lengths[index].max()))
        share, _ = fn(
            leaf[index, :width],
            logprobs_old[index, :width],
            advantages[index, :width],
            mask[index, :width],
            num_global_tokens=num_global_tokens,
            num_global_seqs=num_global_seqs,
            **kwargs,
        )
        share.backward()
        total = total + share.detach()
    assert total.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(leaf.grad, whole_grad, rtol=1e-12, atol=1e-15)
    assert whole_grad.abs().sum() > 0


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean"])
def test_local_counts_are_not_invariant(reduction):
    """Why global counts are needed: averaging micro-batch means weighs tokens by micro-batch size."""
    logprobs, logprobs_old, advantages, mask, _ = invariance_batch()
    fn = get_policy_loss("sapo")
    whole, _ = fn(logprobs, logprobs_old, advantages, mask, reduction=reduction)
    parts = [
        fn(logprobs[rows], logprobs_old[rows], advantages[rows], mask[rows], reduction=reduction)[0]
        for rows in ([0, 1], [3, 4, 5, 6])
    ]
    assert not math.isclose(sum(p.item() for p in parts) / len(parts), whole.item(), rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"reduction": "mean"}, "reduction='mean' is not known; use one of token_mean, seq_mean_token_mean"),
        ({"reduction": "seq_mean_token_sum_norm"}, "needs norm_length"),
        ({"reduction": "seq_mean_token_sum_norm", "norm_length": 0}, "norm_length=0: must be a finite number > 0"),
        ({"reduction": "token_mean", "num_global_tokens": -3}, "num_global_tokens=-3: must be a finite count >= 0"),
        ({"reduction": "token_mean", "num_global_seqs": float("nan")}, "num_global_seqs=nan"),
        ({"reduction": "token_mean", "num_global_tokens": torch.ones(2)}, "one-element tensor, got shape \\(2,\\)"),
    ],
)
def test_bad_arguments_raise(kwargs, fragment):
    values, mask = hand_example()
    reduction = kwargs.pop("reduction")
    with pytest.raises(ValueError, match=fragment):
        aggregate(values, mask, reduction, **kwargs)


def test_bad_shapes_and_masks_raise():
    values, mask = hand_example()
    with pytest.raises(ValueError, match=r"mask has shape \(3, 2\) but values has shape \(3, 3\)"):
        aggregate(values, mask[:, :2], "token_mean")
    with pytest.raises(ValueError, match=r"values must be \[batch, seq\], got shape \(9,\)"):
        aggregate(values.reshape(-1), mask.reshape(-1), "token_mean")
    with pytest.raises(ValueError, match="mask must be boolean or hold only 0 and 1; 2 position"):
        aggregate(values, mask * torch.tensor([0.5, 1.0, 1.0]), "token_mean")
