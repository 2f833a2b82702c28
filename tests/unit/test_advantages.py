"""Advantage estimators and the KL / entropy regularisers against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from sapo_megatron.algorithms import aggregate, compute_advantages, kl_penalty, regularized_loss, sapo_loss

F64 = torch.float64

# Two prompts, three responses each: rewards (1, 0, 0) and (0.5, 2, 3.5).
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.5, 2.0, 3.5], dtype=F64)


def test_grpo_hand_values():
    # group 1: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    # group 2: mean 2, unbiased std sqrt((1.5^2 + 0 + 1.5^2) / 2) = 1.5
    s1 = math.sqrt(1 / 3)
    expected = [(2 / 3) / s1, (-1 / 3) / s1, (-1 / 3) / s1, -1.0, 0.0, 1.0]
    got = compute_advantages(REWARDS, 3, "grpo", eps=0.0)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-14, atol=1e-15)
    with_eps = compute_advantages(REWARDS, 3, "grpo", eps=0.5)
    assert with_eps[3].item() == pytest.approx(-1.5 / 2.0, rel=1e-14)


def test_dr_grpo_hand_values():
    expected = [2 / 3, -1 / 3, -1 / 3, -1.5, 0.0, 1.5]
    torch.testing.assert_close(compute_advantages(REWARDS, 3, "dr_grpo"), torch.tensor(expected, dtype=F64))


def test_rloo_hand_values():
    # R_i minus the mean of the other two responses
    expected = [1 - 0, 0 - 0.5, 0 - 0.5, 0.5 - 2.75, 2 - 2.0, 3.5 - 1.25]
    torch.testing.assert_close(compute_advantages(REWARDS, 3, "rloo"), torch.tensor(expected, dtype=F64))


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_shape_is_kept_and_groups_are_rows(estimator):
    flat = compute_advantages(REWARDS, 3, estimator)
    grouped = compute_advantages(REWARDS.reshape(2, 3), 3, estimator)
    assert grouped.shape == (2, 3)
    torch.testing.assert_close(grouped.reshape(-1), flat, rtol=0, atol=0)
    # every group's advantages are centred
    torch.testing.assert_close(grouped.sum(dim=-1), torch.zeros(2, dtype=F64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_uniform_group_gives_exact_zeros(estimator, eps):
    # 0.1 is not representable: R_i - mean is a rounding residue (~1e-17) that std normalisation would blow up
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 1.0], dtype=F64)
    got = compute_advantages(rewards, 3, estimator, eps=eps)
    assert bool(torch.isfinite(got).all())
    assert got[:3].tolist() == [0.0, 0.0, 0.0]
    assert bool((got[3:] != 0).all())


def test_integer_rewards_and_group_of_one():
    got = compute_advantages(torch.tensor([1, 0, 0, 1]), 2, "grpo")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([0.7071, -0.7071, -0.7071, 0.7071]), rtol=0, atol=1e-4)
    assert compute_advantages(torch.tensor([3.0, -1.0]), 1, "grpo").tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        ((REWARDS, 4, "grpo"), "rewards has 6 entries, not a multiple of group_size=4"),
        ((REWARDS.reshape(2, 3), 2, "grpo"), r"rewards has shape \(2, 3\) but group_size=2"),
        ((REWARDS, 1, "rloo"), "estimator='rloo' needs group_size >= 2"),
        ((REWARDS, 0, "grpo"), "group_size=0: must be an integer >= 1"),
        ((REWARDS, 3, "gae"), "estimator='gae' is not known; use one of grpo, dr_grpo, rloo"),
        ((torch.tensor([1.0, float("nan"), 0.0]), 3, "grpo"), "rewards has 1 NaN/inf value"),
        ((REWARDS.reshape(1, 2, 3), 3, "grpo"), r"rewards has shape \(1, 2, 3\)"),
    ],
)
def test_bad_advantage_inputs_raise(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        compute_advantages(*args)


# ------------------------------------------------------------------------------------------------------
# KL penalty and entropy bonus
# ------------------------------------------------------------------------------------------------------


def test_kl_estimators_hand_values_and_gradients():
    logprobs = torch.tensor([[-1.0, -0.5, -2.0]], dtype=F64, requires_grad=True)
    logprobs_ref = torch.tensor([[-1.2, -0.5, -1.0]], dtype=F64)
    d = [-0.2, 0.0, 1.0]  # ref - logprobs
    expected = {
        "k1": [0.2, 0.0, -1.0],
        "k2": [0.02, 0.0, 0.5],
        "k3": [math.exp(x) - x - 1 for x in d],
    }
    expected_grad = {"k1": [1.0, 1.0, 1.0], "k2": [-x for x in d], "k3": [1 - math.exp(x) for x in d]}
    for estimator in ("k1", "k2", "k3"):
        kl = kl_penalty(logprobs, logprobs_ref, estimator)
        torch.testing.assert_close(kl, torch.tensor([expected[estimator]], dtype=F64), rtol=1e-14, atol=1e-16)
        (grad,) = torch.autograd.grad(kl.sum(), logprobs)
        torch.testing.assert_close(grad, torch.tensor([expected_grad[estimator]], dtype=F64), rtol=1e-14, atol=1e-16)


def test_kl_ignores_masked_nan():
    logprobs = torch.tensor([[-1.0, float("nan")]], dtype=F64, requires_grad=True)
    logprobs_ref = torch.tensor([[-2.0, float("-inf")]], dtype=F64)
    mask = torch.tensor([[True, False]])
    kl = kl_penalty(logprobs, logprobs_ref, "k3", mask=mask)
    (grad,) = torch.autograd.grad(kl.sum(), logprobs)
    assert kl[0, 1].item() == 0.0 and kl[0, 0].item() == pytest.approx(math.exp(-1) + 1 - 1, rel=1e-14)
    assert grad[0, 1].item() == 0.0 and math.isfinite(grad[0, 0].item())
    with pytest.raises(ValueError, match="logprobs has 1 NaN/inf value"):
        kl_penalty(logprobs, logprobs_ref, "k3")
    with pytest.raises(ValueError, match="estimator='k4' is not known; use one of k1, k2, k3"):
        kl_penalty(logprobs, logprobs_ref, "k4", mask=mask)


def test_regularized_loss_adds_terms_with_the_same_reduction():
    gen = torch.Generator().manual_seed(3)
    logprobs_old = -torch.rand(3, 4, generator=gen, dtype=F64) - 0.1
    logprobs = (logprobs_old + 0.2 * torch.randn(3, 4, generator=gen, dtype=F64)).requires_grad_(True)
    logprobs_ref = logprobs_old - 0.1
    entropy = (torch.rand(3, 4, generator=gen, dtype=F64) + 0.5).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    advantages = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    counts = dict(num_global_tokens=9, num_global_seqs=4)
    pg, _ = sapo_loss(logprobs, logprobs_old, advantages, mask, reduction="token_mean", **counts)
    loss, metrics = regularized_loss(
        pg, logprobs, mask, reduction="token_mean", logprobs_ref=logprobs_ref, kl_coef=0.3, entropy=entropy,
        entropy_coef=0.01, **counts,
    )
    k3 = torch.exp(logprobs_ref - logprobs) - (logprobs_ref - logprobs) - 1
    expected = (
        pg
        + 0.3 * aggregate(k3, mask, "token_mean", **counts)
        - 0.01 * aggregate(entropy, mask, "token_mean", **counts)
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-14)
    grads = torch.autograd.grad(loss, (logprobs, entropy), retain_graph=True)
    expected_grads = torch.autograd.grad(expected, (logprobs, entropy))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-16)
    assert grads[1][mask].tolist() == [-0.01 / 9] * 5
    assert metrics["kl_mean"].item() == pytest.approx(k3[mask].mean().item(), rel=1e-14)
    assert metrics["entropy_mean"].item() == pytest.approx(entropy[mask].mean().item(), rel=1e-14)

    unchanged, _ = regularized_loss(pg, logprobs, mask, reduction="token_mean", logprobs_ref=logprobs_ref, **counts)
    assert unchanged.item() == pg.item()
    with pytest.raises(ValueError, match="kl_coef > 0 needs logprobs_ref"):
        regularized_loss(pg, logprobs, mask, reduction="token_mean", kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy_coef != 0 needs entropy"):
        regularized_loss(pg, logprobs, mask, reduction="token_mean", entropy_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef=-0.1: must be >= 0"):
        regularized_loss(pg, logprobs, mask, reduction="token_mean", logprobs_ref=logprobs_ref, kl_coef=-0.1)
