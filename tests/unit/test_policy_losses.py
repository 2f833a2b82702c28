"""Clip, dual-clip, GSPO and CISPO against closed forms; gradcheck of every loss; the registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

from sapo_megatron.algorithms import (
    POLICY_LOSS_FUNCTIONS,
    aggregate,
    cispo_loss,
    clip_loss,
    dual_clip_loss,
    get_policy_loss,
    gspo_loss,
    policy_loss_from_config,
    sapo_loss,
)
from sapo_megatron.config import (
    POLICY_LOSSES,
    REDUCTIONS,
    AlgorithmConfig,
    CispoConfig,
    ClipConfig,
    ConfigError,
    GspoConfig,
    SapoConfig,
)

F64 = torch.float64

# Hyperparameters wide enough that every loss has clipped and unclipped tokens on the random batch.
HYPER = {
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "clip": {"eps_low": 0.2, "eps_high": 0.28},
    "dual_clip": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip_c": 1.6},
    "gspo": {"eps_low": 0.05, "eps_high": 0.08},
    "cispo": {"eps_low": 0.3, "eps_high": 0.2},
}


def ragged_batch(seed: int = 0, scale: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 2, 0, 4, 1, 3])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    logprobs_old = -torch.rand(6, 5, generator=gen, dtype=F64) * 2 - 0.1
    logprobs = logprobs_old + torch.randn(6, 5, generator=gen, dtype=F64) * scale
    advantages = torch.tensor([0.9, -1.2, 0.5, -0.4, 1.3, -0.8], dtype=F64)
    return logprobs, logprobs_old, advantages, mask


def token_weights(mask: torch.Tensor, reduction: str, norm_length: float = 5.0) -> torch.Tensor:
    """d aggregate / d value per token (aggregate is linear; its values are checked in test_reductions)."""
    values = torch.zeros(mask.shape, dtype=F64, requires_grad=True)
    (weights,) = torch.autograd.grad(aggregate(values, mask, reduction, norm_length=norm_length), values)
    return weights


def clip_token(r: float, a: float, eps_low: float, eps_high: float):
    """(loss, d loss / d logprob, clipped) of PPO's surrogate for one token."""
    clipped_r = min(max(r, 1 - eps_low), 1 + eps_high)
    unclipped, clipped = -r * a, -clipped_r * a
    if clipped > unclipped:
        return clipped, 0.0, True
    return unclipped, -r * a, False


def per_token_expectation(fn, logprobs, logprobs_old, advantages_tok, mask):
    loss = torch.zeros(mask.shape, dtype=F64)
    grad = torch.zeros(mask.shape, dtype=F64)
    flags = []
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                r = math.exp(logprobs[i, t].item() - logprobs_old[i, t].item())
                value, derivative, flag = fn(i, t, r, advantages_tok[i, t].item())
                loss[i, t], grad[i, t] = value, derivative
                flags.append(flag)
    return loss, grad, flags


def run(fn, logprobs, logprobs_old, advantages, mask, **kwargs):
    lp = logprobs.clone().requires_grad_(True)
    loss, metrics = fn(lp, logprobs_old, advantages, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss, grad, metrics


def mixed_advantages(advantages):
    return advantages[:, None] * torch.tensor([1.0, -0.7, 1.5, 0.0, -2.0], dtype=F64)


@pytest.mark.parametrize("reduction", ["seq_mean_token_mean", "token_mean"])
def test_clip_matches_closed_form(reduction):
    logprobs, logprobs_old, advantages, mask = ragged_batch()
    adv = mixed_advantages(advantages)
    eps_low, eps_high = 0.2, 0.28
    expected_tok, expected_grad, flags = per_token_expectation(
        lambda i, t, r, a: clip_token(r, a, eps_low, eps_high), logprobs, logprobs_old, adv, mask
    )
    loss, grad, metrics = run(
        clip_loss, logprobs, logprobs_old, adv, mask, eps_low=eps_low, eps_high=eps_high, reduction=reduction
    )
    weights = token_weights(mask, reduction)
    assert loss.item() == pytest.approx((expected_tok * weights).sum().item(), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad * weights, rtol=1e-12, atol=1e-16)
    assert 0 < sum(flags) < len(flags)
    assert metrics["clip_frac"].item() == pytest.approx(sum(flags) / len(flags), rel=1e-15)


def test_clip_higher_is_asymmetric():
    logprobs_old = torch.zeros(1, 4, dtype=F64)
    ratio = torch.tensor([[1.25, 1.30, 0.85, 0.75]], dtype=F64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=F64)
    _, grad, metrics = run(
        clip_loss, ratio.log(), logprobs_old, advantages, mask, eps_low=0.2, eps_high=0.28,
        reduction="seq_mean_token_sum",
    )
    # 1.25 < 1.28 still learns; 1.30 is clipped; 0.85 > 0.8 still learns; 0.75 is clipped (A < 0)
    torch.testing.assert_close(grad, torch.tensor([[-1.25, 0.0, 0.85, 0.0]], dtype=F64), rtol=1e-14, atol=0)
    assert metrics["clip_frac"].item() == 0.5


@pytest.mark.parametrize("reduction", ["seq_mean_token_mean", "seq_mean_token_sum"])
def test_dual_clip_matches_closed_form(reduction):
    logprobs, logprobs_old, advantages, mask = ragged_batch(seed=2, scale=0.8)
    adv = mixed_advantages(advantages)
    c = 1.6

    def dual(i, t, r, a):
        value, derivative, _ = clip_token(r, a, 0.2, 0.28)
        if a < 0 and value > -c * a:
            return -c * a, 0.0, True
        return value, derivative, False

    expected_tok, expected_grad, flags = per_token_expectation(dual, logprobs, logprobs_old, adv, mask)
    loss, grad, metrics = run(
        dual_clip_loss, logprobs, logprobs_old, adv, mask, reduction=reduction, **HYPER["dual_clip"]
    )
    weights = token_weights(mask, reduction)
    assert loss.item() == pytest.approx((expected_tok * weights).sum().item(), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad * weights, rtol=1e-12, atol=1e-16)
    assert 0 < sum(flags)
    assert metrics["dual_clip_frac"].item() == pytest.approx(sum(flags) / len(flags), rel=1e-15)


def test_dual_clip_caps_exploded_negative_tokens():
    logprobs_old = torch.zeros(1, 3, dtype=F64)
    logprobs = torch.tensor([[math.log(4.0), math.log(2.0), math.log(4.0)]], dtype=F64)
    advantages = torch.tensor([[-1.0, -1.0, 1.0]], dtype=F64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, grad, _ = run(
        dual_clip_loss, logprobs, logprobs_old, advantages, mask, dual_clip_c=3.0, reduction="seq_mean_token_sum"
    )
    # r = 4 > c = 3 with A < 0: loss 3 and no gradient; r = 2 < c: plain -r A; A > 0 with r = 4: clipped at 1.2
    assert loss.item() == pytest.approx(3.0 + 2.0 - 1.2, rel=1e-14)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 2.0, 0.0]], dtype=F64), rtol=1e-14, atol=0)
    plain, plain_grad, _ = run(clip_loss, logprobs, logprobs_old, advantages, mask, reduction="seq_mean_token_sum")
    assert plain.item() == pytest.approx(4.0 + 2.0 - 1.2, rel=1e-14)
    assert plain_grad[0, 0].item() == pytest.approx(4.0, rel=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gspo_matches_closed_form(reduction):
    logprobs, logprobs_old, advantages, mask = ragged_batch(seed=4, scale=0.15)
    adv = mixed_advantages(advantages)
    eps_low, eps_high = HYPER["gspo"]["eps_low"], HYPER["gspo"]["eps_high"]
    seq_ratio = []
    for i in range(mask.shape[0]):
        n = int(mask[i].sum())
        z = [(logprobs[i, t] - logprobs_old[i, t]).item() for t in range(n)]
        seq_ratio.append(math.exp(sum(z) / n) if n else 1.0)

    def gspo(i, t, r, a):
        return clip_token(seq_ratio[i], a, eps_low, eps_high)  # d s_it / d logprob_it = s_i

    expected_tok, expected_grad, flags = per_token_expectation(gspo, logprobs, logprobs_old, adv, mask)
    loss, grad, metrics = run(
        gspo_loss, logprobs, logprobs_old, adv, mask, reduction=reduction, norm_length=5, **HYPER["gspo"]
    )
    weights = token_weights(mask, reduction)
    assert loss.item() == pytest.approx((expected_tok * weights).sum().item(), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad * weights, rtol=1e-12, atol=1e-16)
    assert 0 < sum(flags) < len(flags)
    valid_ratios = [s for i, s in enumerate(seq_ratio) if mask[i].any()]
    assert metrics["seq_ratio_mean"].item() == pytest.approx(sum(valid_ratios) / len(valid_ratios), rel=1e-13)
    assert metrics["seq_ratio_max"].item() == pytest.approx(max(valid_ratios), rel=1e-13)


def test_gspo_token_form_equals_the_sequence_objective():
    """With seq_mean_token_mean and one advantage per sequence, GSPO-token's gradient is GSPO's."""
    logprobs, logprobs_old, advantages, mask = ragged_batch(seed=6, scale=0.1)
    eps_low, eps_high = 0.05, 0.08
    _, grad, _ = run(gspo_loss, logprobs, logprobs_old, advantages, mask, eps_low=eps_low, eps_high=eps_high)

    lp = logprobs.clone().requires_grad_(True)
    per_seq = []
    for i in range(mask.shape[0]):
        n = int(mask[i].sum())
        if n == 0:
            continue
        s = torch.exp((lp[i, :n] - logprobs_old[i, :n]).mean())
        a = advantages[i]
        per_seq.append(-torch.minimum(s * a, s.clamp(1 - eps_low, 1 + eps_high) * a))
    (expected,) = torch.autograd.grad(torch.stack(per_seq).mean(), lp)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-16)
    assert (grad != 0).any()


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean"])
def test_cispo_matches_closed_form(reduction):
    logprobs, logprobs_old, advantages, mask = ragged_batch(seed=7)
    adv = mixed_advantages(advantages)
    eps_low, eps_high = HYPER["cispo"]["eps_low"], HYPER["cispo"]["eps_high"]

    def cispo(i, t, r, a):
        weight = min(max(r, 1 - eps_low), 1 + eps_high)
        return -weight * a * logprobs[i, t].item(), -weight * a, weight != r

    expected_tok, expected_grad, flags = per_token_expectation(cispo, logprobs, logprobs_old, adv, mask)
    loss, grad, metrics = run(cispo_loss, logprobs, logprobs_old, adv, mask, reduction=reduction, **HYPER["cispo"])
    weights = token_weights(mask, reduction)
    assert loss.item() == pytest.approx((expected_tok * weights).sum().item(), rel=1e-12)
    # the ratio is detached: no token loses its gradient, clipping only caps its weight
    torch.testing.assert_close(grad, expected_grad * weights, rtol=1e-12, atol=1e-16)
    assert bool((grad[mask & (adv != 0)] != 0).all())
    assert 0 < sum(flags) < len(flags)
    assert metrics["clip_frac"].item() == pytest.approx(sum(flags) / len(flags), rel=1e-15)


@pytest.mark.parametrize("name", POLICY_LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_every_loss(name, reduction):
    logprobs, logprobs_old, advantages, mask = ragged_batch(seed=8)
    # GSPO-token's gradient is defined through stop-gradients; it is the derivative of its forward value only
    # when the advantage is constant over each sequence (then it is GSPO's), so it gets per-sequence ones.
    adv = advantages if name == "gspo" else mixed_advantages(advantages)
    fn = get_policy_loss(name)

    if name == "cispo":
        # CISPO's weight sg[clip(r)] is a constant of the update. Shifting logprobs and logprobs_old together
        # keeps r (so the weight) fixed, and the finite difference then measures exactly d loss / d logprobs.
        def loss_of(shift):
            return fn(logprobs + shift, logprobs_old + shift, adv, mask, reduction=reduction, norm_length=5,
                      **HYPER[name])[0]

        point = torch.zeros_like(logprobs)
    else:
        def loss_of(lp):
            return fn(lp, logprobs_old, adv, mask, reduction=reduction, norm_length=5, **HYPER[name])[0]

        point = logprobs.clone()
    assert torch.autograd.gradcheck(loss_of, (point.requires_grad_(True),))


def test_cispo_plain_finite_difference_differs():
    """Without holding the weight fixed, the value's derivative includes d clip(r) / d logprobs: not CISPO."""
    logprobs, logprobs_old, advantages, mask = ragged_batch(seed=8)
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(
            lambda lp: cispo_loss(lp, logprobs_old, advantages, mask, **HYPER["cispo"])[0],
            (logprobs.clone().requires_grad_(True),),
        )


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_per_sequence_advantages_broadcast_like_per_token(name):
    logprobs, logprobs_old, advantages, mask = ragged_batch(seed=9)
    fn = get_policy_loss(name)
    loss_seq, grad_seq, _ = run(fn, logprobs, logprobs_old, advantages, mask, **HYPER[name])
    loss_tok, grad_tok, _ = run(fn, logprobs, logprobs_old, advantages[:, None].expand(6, 5), mask, **HYPER[name])
    assert loss_seq.item() == loss_tok.item()
    torch.testing.assert_close(grad_seq, grad_tok, rtol=0, atol=0)


def test_clip_overflow_guard():
    logprobs_old = torch.zeros(1, 2, dtype=F64)
    logprobs = torch.tensor([[19.0, 60.0]], dtype=F64)
    advantages = torch.tensor([-1.0], dtype=F64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, grad, _ = run(clip_loss, logprobs, logprobs_old, advantages, mask, reduction="seq_mean_token_sum")
    # inside the bound the gradient is untouched (-r A); beyond it the ratio is held at e^20 with no gradient
    assert grad[0, 0].item() == pytest.approx(math.exp(19.0), rel=1e-12)
    assert grad[0, 1].item() == 0.0
    assert loss.item() == pytest.approx(math.exp(19.0) + math.exp(20.0), rel=1e-12)


def test_registry_names_and_unknown_name():
    assert tuple(POLICY_LOSS_FUNCTIONS) == POLICY_LOSSES
    assert get_policy_loss("sapo") is sapo_loss and get_policy_loss("cispo") is cispo_loss
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'; allowed: sapo, clip, dual_clip, gspo, cispo"):
        get_policy_loss("ppo")


NON_DEFAULT = dict(
    sapo=SapoConfig(tau_pos=0.6, tau_neg=1.7),
    clip=ClipConfig(eps_low=0.1, eps_high=0.35, dual_clip_c=1.4),
    gspo=GspoConfig(eps_low=0.02, eps_high=0.03),
    cispo=CispoConfig(eps_low=0.1, eps_high=0.1),
)
BOUND_HYPER = {
    "sapo": {"tau_pos": 0.6, "tau_neg": 1.7},
    "clip": {"eps_low": 0.1, "eps_high": 0.35},
    "dual_clip": {"eps_low": 0.1, "eps_high": 0.35, "dual_clip_c": 1.4},
    "gspo": {"eps_low": 0.02, "eps_high": 0.03},
    "cispo": {"eps_low": 0.1, "eps_high": 0.1},
}


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_policy_loss_from_config_binds_hyperparameters_and_reduction(name):
    logprobs, logprobs_old, advantages, mask = ragged_batch(seed=10, scale=1.0)
    cfg = AlgorithmConfig(policy_loss=name, reduction="token_mean", **NON_DEFAULT)
    bound = policy_loss_from_config(cfg)
    assert bound.name == name and dict(bound.hyperparameters) == BOUND_HYPER[name]
    loss, metrics = bound(logprobs, logprobs_old, advantages, mask, num_global_tokens=30)
    direct, _ = get_policy_loss(name)(
        logprobs, logprobs_old, advantages, mask, reduction="token_mean", num_global_tokens=30, **BOUND_HYPER[name]
    )
    defaults, _ = get_policy_loss(name)(
        logprobs, logprobs_old, advantages, mask, reduction="token_mean", num_global_tokens=30
    )
    assert loss.item() == direct.item()
    assert loss.item() != defaults.item()
    assert metrics["num_tokens"].item() == mask.sum().item()


def test_policy_loss_from_config_norm_length():
    logprobs, logprobs_old, advantages, mask = ragged_batch()
    cfg = AlgorithmConfig(reduction="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="max_response_length"):
        policy_loss_from_config(cfg)
    from_rollout = policy_loss_from_config(cfg, max_response_length=8)
    assert from_rollout.norm_length == 8
    explicit = policy_loss_from_config(AlgorithmConfig(reduction="seq_mean_token_sum_norm", reduction_norm_length=5),
                                       max_response_length=8)
    assert explicit.norm_length == 5
    expected, _ = sapo_loss(
        logprobs, logprobs_old, advantages, mask, reduction="seq_mean_token_sum_norm", norm_length=8
    )
    assert from_rollout(logprobs, logprobs_old, advantages, mask)[0].item() == expected.item()


def test_policy_loss_from_config_validates():
    with pytest.raises(ConfigError, match="algorithm.sapo.tau_pos"):
        policy_loss_from_config(AlgorithmConfig(sapo=SapoConfig(tau_pos=0.0)))
    with pytest.raises(ValueError, match="allowed: sapo, clip"):
        policy_loss_from_config(AlgorithmConfig(policy_loss="reinforce"))


@pytest.mark.parametrize(
    "fn, kwargs, fragment",
    [
        (clip_loss, {"eps_low": 1.0}, "eps_low=1.0: must be < 1"),
        (clip_loss, {"eps_high": 0.0}, "eps_high=0.0: must be a finite number > 0"),
        (dual_clip_loss, {"dual_clip_c": 1.0}, "dual_clip_c=1.0: dual-clip needs a constant c > 1"),
        (gspo_loss, {"eps_low": -1e-4}, "eps_low=-0.0001"),
        (cispo_loss, {"eps_high": float("inf")}, "eps_high=inf"),
    ],
)
def test_bad_hyperparameters_raise(fn, kwargs, fragment):
    logprobs, logprobs_old, advantages, mask = ragged_batch()
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        fn(logprobs, logprobs_old, advantages, mask, **kwargs)
