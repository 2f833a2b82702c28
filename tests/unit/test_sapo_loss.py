"""SAPO: gate values, gradient weights and on-policy equivalence, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from sapo_megatron.algorithms import aggregate, sapo_gate, sapo_gate_weight, sapo_loss
from sapo_megatron.config import REDUCTIONS

F64 = torch.float64
TAUS = (0.5, 1.0, 1.05, 2.0)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def closed_gate(r: float, tau: float) -> float:
    return sigmoid(tau * (r - 1)) * 4 / tau


def closed_weight(r: float, tau: float) -> float:
    p = sigmoid(tau * (r - 1))
    return 4 * p * (1 - p)


def ragged_batch(seed: int = 0, scale: float = 0.4):
    """5 sequences of lengths 4, 2, 0, 3, 1 (one fully masked) with off-policy log-ratios."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([4, 2, 0, 3, 1])
    mask = torch.arange(4)[None, :] < lengths[:, None]
    logprobs_old = -torch.rand(5, 4, generator=gen, dtype=F64) * 2 - 0.1
    logprobs = logprobs_old + torch.randn(5, 4, generator=gen, dtype=F64) * scale
    advantages = torch.tensor([0.7, -1.3, 0.4, -0.2, 1.1], dtype=F64)
    return logprobs, logprobs_old, advantages, mask


def reduction_weights(mask: torch.Tensor, reduction: str, norm_length: float = 4.0) -> torch.Tensor:
    """d loss / d per-token value for each reduction, written out by hand."""
    n_tokens = mask.sum().item()
    per_seq = mask.sum(dim=-1)
    n_seqs = (per_seq > 0).sum().item()
    weights = torch.zeros(mask.shape, dtype=F64)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[i, t]:
                continue
            weights[i, t] = {
                "token_mean": 1 / n_tokens,
                "seq_mean_token_mean": 1 / (n_seqs * per_seq[i].item()),
                "seq_mean_token_sum": 1 / n_seqs,
                "seq_mean_token_sum_norm": 1 / (n_seqs * norm_length),
            }[reduction]
    return weights


@pytest.mark.parametrize("tau", TAUS)
def test_gate_is_two_over_tau_on_policy(tau):
    assert sapo_gate(torch.ones((), dtype=F64), tau).item() == pytest.approx(2 / tau, rel=1e-15)
    assert sapo_gate_weight(torch.ones((), dtype=F64), tau).item() == pytest.approx(1.0, rel=1e-15)


def test_gate_hand_values():
    # 4 sigmoid(0.5) = 4 / (1 + e^-0.5); tau = 2, r = 0.5: 2 sigmoid(-1) = 2 / (1 + e)
    assert sapo_gate(torch.tensor(1.5, dtype=F64), 1.0).item() == pytest.approx(4 / (1 + math.exp(-0.5)), rel=1e-14)
    assert sapo_gate(torch.tensor(0.5, dtype=F64), 2.0).item() == pytest.approx(2 / (1 + math.e), rel=1e-14)
    # tau = 1.05 at r = 2: 4/1.05 * sigmoid(1.05)
    expected = 4 / 1.05 / (1 + math.exp(-1.05))
    assert sapo_gate(torch.tensor(2.0, dtype=F64), 1.05).item() == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("tau", TAUS)
def test_gate_derivative_is_the_closed_form_weight_on_a_grid(tau):
    ratio = torch.linspace(0.05, 4.0, 80, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(sapo_gate(ratio, tau).sum(), ratio)
    expected = torch.tensor([closed_weight(r, tau) for r in ratio.tolist()], dtype=F64)
    torch.testing.assert_close(grad, expected, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(sapo_gate_weight(ratio.detach(), tau), expected, rtol=1e-13, atol=1e-15)
    # the weight decays away from r = 1 on both sides
    assert expected.max().item() == pytest.approx(1.0, abs=1e-3)
    assert expected[0] < 1 and expected[-1] < expected[0]


def test_larger_tau_decays_faster_off_policy():
    ratio = torch.tensor([0.5, 1.5, 2.5], dtype=F64)
    assert bool((sapo_gate_weight(ratio, 1.05) < sapo_gate_weight(ratio, 1.0)).all())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_and_token_gradient_match_closed_form(reduction):
    logprobs, logprobs_old, advantages, mask = ragged_batch()
    advantages_tok = advantages[:, None] * torch.tensor([1.0, -0.5, 2.0, 0.0], dtype=F64)  # mixed signs and a 0
    logprobs.requires_grad_(True)
    loss, _ = sapo_loss(
        logprobs, logprobs_old, advantages_tok, mask, tau_pos=0.8, tau_neg=1.3, reduction=reduction, norm_length=4
    )
    (grad,) = torch.autograd.grad(loss, logprobs)

    weights = reduction_weights(mask, reduction)
    expected_loss = 0.0
    expected_grad = torch.zeros_like(grad)
    for i in range(5):
        for t in range(4):
            if not mask[i, t]:
                continue
            a = advantages_tok[i, t].item()
            tau = 0.8 if a > 0 else 1.3
            r = math.exp(logprobs[i, t].item() - logprobs_old[i, t].item())
            expected_loss += -closed_gate(r, tau) * a * weights[i, t].item()
            # d/dlogprob of -f(r) A = -f'(r) r A = -w(r) r A
            expected_grad[i, t] = -closed_weight(r, tau) * r * a * weights[i, t]
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tau_pos, tau_neg", [(1.0, 1.05), (0.3, 0.3), (2.0, 5.0), (7.5, 0.9)])
def test_on_policy_gradient_equals_plain_policy_gradient(reduction, tau_pos, tau_neg):
    _, logprobs_old, advantages, mask = ragged_batch(seed=3)
    logprobs = logprobs_old.clone().requires_grad_(True)
    loss, metrics = sapo_loss(
        logprobs, logprobs_old, advantages, mask, tau_pos=tau_pos, tau_neg=tau_neg, reduction=reduction, norm_length=6
    )
    (grad,) = torch.autograd.grad(loss, logprobs)

    reference = logprobs_old.clone().requires_grad_(True)
    pg = aggregate(-advantages[:, None] * reference, mask, reduction, norm_length=6)
    (expected,) = torch.autograd.grad(pg, reference)
    torch.testing.assert_close(grad, expected, rtol=1e-13, atol=1e-16)
    assert grad.abs().sum() > 0
    assert metrics["gate_weight_mean"].item() == pytest.approx(1.0, rel=1e-15)


def test_tau_pos_only_acts_on_positive_advantages():
    logprobs, logprobs_old, _, mask = ragged_batch(seed=5)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]] * 5, dtype=F64)
    grads = []
    for tau_pos in (0.5, 3.0):
        lp = logprobs.clone().requires_grad_(True)
        loss, _ = sapo_loss(lp, logprobs_old, advantages, mask, tau_pos=tau_pos, tau_neg=1.05)
        grads.append(torch.autograd.grad(loss, lp)[0])
    negative = (advantages < 0) & mask
    positive = (advantages > 0) & mask
    torch.testing.assert_close(grads[0][negative], grads[1][negative], rtol=0, atol=0)
    assert bool((grads[0][positive] != grads[1][positive]).all())


def test_gradcheck_float64():
    logprobs, logprobs_old, advantages, mask = ragged_batch(seed=1)
    logprobs.requires_grad_(True)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda lp: sapo_loss(lp, logprobs_old, advantages, mask, reduction=reduction, norm_length=5)[0],
            (logprobs,),
        )


def test_overflow_guard_keeps_loss_finite_and_leaves_normal_gradients_unchanged():
    logprobs_old = torch.zeros(1, 3, dtype=F64)
    # log r = 3 (inside the +-20 bound), 50 (exp would be 5e21) and -200 (exp underflows to 0)
    logprobs = torch.tensor([[3.0, 50.0, -200.0]], dtype=F64, requires_grad=True)
    advantages = torch.tensor([-1.0], dtype=F64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, metrics = sapo_loss(logprobs, logprobs_old, advantages, mask, reduction="seq_mean_token_sum")
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert math.isfinite(loss.item()) and bool(torch.isfinite(grad).all())
    r = math.exp(3.0)
    assert grad[0, 0].item() == pytest.approx(closed_weight(r, 1.05) * r, rel=1e-9)
    assert grad[0, 0].item() > 0
    # beyond the bound the gradient is 0; the true SAPO gradient there is below 1e-300 anyway
    assert grad[0, 1].item() == 0.0 and grad[0, 2].item() == 0.0
    assert metrics["ratio_max"].item() == pytest.approx(math.exp(20.0), rel=1e-12)
    assert metrics["ratio_min"].item() == pytest.approx(math.exp(-20.0), rel=1e-12)
    # loss: the saturated gate is 4/tau at r = e^20 and 4/tau sigmoid(-tau) at r = e^-20 (times -A = 1)
    expected = closed_gate(r, 1.05) + 4 / 1.05 + closed_gate(math.exp(-20.0), 1.05)
    assert loss.item() == pytest.approx(expected, rel=1e-12)

    # float32: exp(50) would overflow to inf without the clamp
    loss32, _ = sapo_loss(logprobs.detach().float(), logprobs_old.float(), advantages.float(), mask)
    assert math.isfinite(loss32.item())


def test_metrics_closed_form():
    logprobs_old = torch.zeros(3, 3, dtype=F64)
    log_r = torch.tensor([[0.2, -0.4, 1.5], [0.1, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    advantages = torch.tensor([-2.0, 0.5, 1.0], dtype=F64)
    loss, metrics = sapo_loss(log_r.clone().requires_grad_(True), logprobs_old, advantages, mask)

    tokens = [(0.2, 1.05), (-0.4, 1.05), (1.5, 1.05), (0.1, 1.0)]
    ratios = [math.exp(z) for z, _ in tokens]
    gates = [closed_gate(math.exp(z), tau) for z, tau in tokens]
    weights = [closed_weight(math.exp(z), tau) for z, tau in tokens]
    mean_r = sum(ratios) / 4
    var0 = sum((z - 1.3 / 3) ** 2 for z in (0.2, -0.4, 1.5)) / 3

    expected = {
        "num_tokens": 4.0,
        "num_seqs": 2.0,
        "ratio_mean": mean_r,
        "ratio_std": math.sqrt(sum((r - mean_r) ** 2 for r in ratios) / 4),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "gate_mean": sum(gates) / 4,
        "gate_weight_mean": sum(weights) / 4,
        "gate_weight_below_half_frac": sum(w < 0.5 for w in weights) / 4,
        # sequence 1 has a single token: Var = 0
        "log_ratio_seq_var_mean": var0 / 2,
        "log_ratio_seq_var_bound_mean": (1.05**2 * var0 / 4) / 2,
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key].item() == pytest.approx(value, rel=1e-12), key
        assert metrics[key].dim() == 0 and not metrics[key].requires_grad
    assert sum(w < 0.5 for w in weights) == 1  # the r = e^1.5 token is strongly damped


def test_var_bound_holds_for_the_sequence_gate():
    """The paper's bound: |mean_t w(z_t) - w(mean z)| <= tau^2 Var / 4 with w(z) = sech^2(tau z / 2)."""
    gen = torch.Generator().manual_seed(11)
    for tau in (1.0, 1.05, 3.0):
        for scale in (0.05, 0.3, 1.0):
            z = torch.randn(16, generator=gen, dtype=F64) * scale
            weight = 1 / torch.cosh(tau * z / 2) ** 2
            gap = abs(weight.mean().item() - (1 / math.cosh(tau * z.mean().item() / 2) ** 2))
            logprobs = z[None, :].clone()
            _, metrics = sapo_loss(
                logprobs, torch.zeros_like(logprobs), torch.tensor([-1.0], dtype=F64),
                torch.ones(1, 16, dtype=torch.bool), tau_neg=tau,
            )
            assert metrics["log_ratio_seq_var_mean"].item() == pytest.approx(z.var(correction=0).item(), rel=1e-12)
            assert gap <= metrics["log_ratio_seq_var_bound_mean"].item() + 1e-15


@pytest.mark.parametrize("name, value", [("tau_pos", 0.0), ("tau_neg", -1.0), ("tau_pos", float("nan"))])
def test_non_positive_tau_raises(name, value):
    logprobs, logprobs_old, advantages, mask = ragged_batch()
    with pytest.raises(ValueError, match=f"{name}=.*must be a finite number > 0"):
        sapo_loss(logprobs, logprobs_old, advantages, mask, **{name: value})
