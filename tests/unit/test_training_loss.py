"""The training loss (policy loss + KL to the reference + entropy bonus): the KL term and its gradient against
the closed form for k1 / k2 / k3, the estimators against their definitions (Schulman, "Approximating KL
divergence"), and the object the actor builds from the config."""

from __future__ import annotations

import math

import pytest
import torch

from sapo_megatron.algorithms import (
    TrainingLoss,
    aggregate,
    policy_loss_from_config,
    sapo_loss,
    training_loss_from_config,
)
from sapo_megatron.config import AlgorithmConfig

F64 = torch.float64
NAN = float("nan")

# A hand-built batch: row 0 has 3 response tokens, row 1 has 2, row 2 none (batch padding). Masked positions
# hold NaN / -inf on purpose: they must not reach the loss or its gradient.
LOGPROBS = [[-1.0, -0.5, -2.0, NAN], [-0.3, -1.2, NAN, NAN], [NAN, NAN, NAN, NAN]]
LOGPROBS_REF = [[-1.2, -0.5, -1.0, -math.inf], [-0.8, -0.7, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]]
MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
# d = log r = logprobs_ref - logprobs at the valid positions, r = pi_ref / pi (Schulman's r = p(x) / q(x) with
# samples x ~ q = pi and p = pi_ref).
D = [[-0.2, 0.0, 1.0], [-0.5, 0.5]]
NUM_SEQS, TOKENS_PER_SEQ = 2, [3, 2]  # G and n_i of seq_mean_token_mean

CLOSED_FORM = {
    # estimator: (value k(d), derivative dk/dlogprobs), with logprobs = ref - d
    "k1": (lambda d: -d, lambda d: 1.0),
    "k2": (lambda d: 0.5 * d * d, lambda d: -d),
    "k3": (lambda d: math.exp(d) - 1 - d, lambda d: 1 - math.exp(d)),
}


def batch(advantages=(0.0, 0.0, 0.0)):
    logprobs = torch.tensor(LOGPROBS, dtype=F64, requires_grad=True)
    ref = torch.tensor(LOGPROBS_REF, dtype=F64)
    mask = torch.tensor(MASK, dtype=torch.bool)
    # logprobs_old = logprobs where valid (on-policy), finite everywhere.
    old = torch.where(mask, logprobs.detach(), torch.zeros(()))
    return logprobs, old, torch.tensor(advantages, dtype=F64), mask, ref


def closed_kl_term(estimator: str) -> tuple[float, list[list[float]]]:
    """seq_mean_token_mean of k over the valid tokens, and its derivative w.r.t. every logprob [3, 4]."""
    value_of, grad_of = CLOSED_FORM[estimator]
    value = sum(sum(value_of(d) for d in row) / n for row, n in zip(D, TOKENS_PER_SEQ)) / NUM_SEQS
    grad = [[0.0] * 4 for _ in range(3)]
    for i, (row, n) in enumerate(zip(D, TOKENS_PER_SEQ)):
        for t, d in enumerate(row):
            grad[i][t] = grad_of(d) / (NUM_SEQS * n)
    return value, grad


def sapo_training_loss(**regularizers) -> TrainingLoss:
    cfg = AlgorithmConfig(policy_loss="sapo", reduction="seq_mean_token_mean", **regularizers)
    return training_loss_from_config(cfg)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_term_and_gradient_match_the_closed_form(estimator):
    """With zero advantages SAPO contributes exactly nothing, so the loss is kl_coef times the KL term."""
    kl_coef = 0.3
    loss_fn = sapo_training_loss(kl_coef=kl_coef, kl_estimator=estimator)
    logprobs, old, advantages, mask, ref = batch()
    out = loss_fn(logprobs, old, advantages, mask, logprobs_ref=ref, num_global_tokens=5, num_global_seqs=2)
    value, grad = closed_kl_term(estimator)
    assert out.shares["pg_loss"].item() == 0.0
    assert out.shares["kl_loss"].item() == pytest.approx(value, rel=1e-14, abs=1e-16)
    assert out.loss.item() == pytest.approx(kl_coef * value, rel=1e-14, abs=1e-16)
    assert out.shares["loss"].item() == out.loss.item()
    (got,) = torch.autograd.grad(out.loss, logprobs)
    torch.testing.assert_close(got, kl_coef * torch.tensor(grad, dtype=F64), rtol=1e-13, atol=1e-16)
    # kl_mean is the flat token mean of k (a diagnostic, not the loss's reduction).
    flat = [CLOSED_FORM[estimator][0](d) for row in D for d in row]
    assert out.metrics["kl_mean"].item() == pytest.approx(sum(flat) / len(flat), rel=1e-14, abs=1e-16)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_gradient_adds_to_the_policy_gradient(estimator):
    advantages = (0.8, -1.1, 0.5)
    logprobs, old, adv, mask, ref = batch(advantages)
    # Off-policy by a fixed shift, so SAPO's gradient is not the plain policy gradient.
    old = torch.where(mask, old + 0.25, old)
    loss_fn = sapo_training_loss(kl_coef=0.05, kl_estimator=estimator)
    out = loss_fn(logprobs, old, adv, mask, logprobs_ref=ref, num_global_tokens=5, num_global_seqs=2)
    (got,) = torch.autograd.grad(out.loss, logprobs)
    pg, _ = sapo_loss(logprobs, old, adv, mask, reduction="seq_mean_token_mean", num_global_tokens=5, num_global_seqs=2)
    (pg_grad,) = torch.autograd.grad(pg, logprobs)
    _, kl_grad = closed_kl_term(estimator)
    torch.testing.assert_close(got, pg_grad + 0.05 * torch.tensor(kl_grad, dtype=F64), rtol=1e-13, atol=1e-16)
    assert out.shares["pg_loss"].item() == pytest.approx(pg.item(), rel=1e-15)
    assert not torch.isnan(got).any()


def test_estimators_follow_schulman():
    """Expectations under x ~ pi over a whole small vocabulary: k1 and k3 are unbiased for KL(pi || pi_ref),
    k3 is never negative, k2 is not unbiased. And used as losses (autograd through log pi at the samples),
    k2's expected gradient is the gradient of KL(pi || pi_ref), k3's that of KL(pi_ref || pi), k1's is 0
    (what regularizers.py states)."""
    from sapo_megatron.algorithms import kl_penalty

    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(7, generator=gen, dtype=F64, requires_grad=True)
    ref_logits = torch.randn(7, generator=gen, dtype=F64)
    logpi = torch.log_softmax(theta, dim=0)
    logref = torch.log_softmax(ref_logits, dim=0)
    pi, pi_ref = logpi.exp(), logref.exp()
    kl_forward = (pi * (logpi - logref)).sum()
    kl_reverse = (pi_ref * (logref - logpi)).sum()
    k = {name: kl_penalty(logpi[None], logref[None], name)[0] for name in ("k1", "k2", "k3")}
    weights = pi.detach()  # the sampling distribution is held fixed: autograd sees the per-sample estimator
    assert (weights * k["k1"]).sum().item() == pytest.approx(kl_forward.item(), rel=1e-12)
    assert (weights * k["k3"]).sum().item() == pytest.approx(kl_forward.item(), rel=1e-12)
    assert (k["k3"] >= 0).all()
    assert abs((weights * k["k2"]).sum().item() - kl_forward.item()) > 1e-3
    expected = {
        "k1": torch.zeros(7, dtype=F64),
        "k2": torch.autograd.grad(kl_forward, theta, retain_graph=True)[0],
        "k3": torch.autograd.grad(kl_reverse, theta, retain_graph=True)[0],
    }
    for name, want in expected.items():
        (got,) = torch.autograd.grad((weights * k[name]).sum(), theta, retain_graph=True)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14, msg=name)


def test_micro_batch_shares_add_up_to_the_whole_batch():
    """Each term of a micro-batch is its share of the whole-batch term, KL and entropy included."""
    gen = torch.Generator().manual_seed(5)
    lengths = torch.tensor([4, 2, 0, 3, 1, 4])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    old = -torch.rand(6, 5, generator=gen, dtype=F64) - 0.1
    logprobs = (old + 0.3 * torch.randn(6, 5, generator=gen, dtype=F64)).requires_grad_(True)
    ref = old - 0.4 * torch.rand(6, 5, generator=gen, dtype=F64)
    entropy = (torch.rand(6, 5, generator=gen, dtype=F64) + 0.5).requires_grad_(True)
    advantages = torch.tensor([0.7, -1.3, 0.4, -0.2, 1.1, -0.6], dtype=F64)
    loss_fn = sapo_training_loss(kl_coef=0.2, kl_estimator="k3", entropy_coef=0.01)
    counts = dict(num_global_tokens=int(mask.sum()), num_global_seqs=int(mask.any(dim=1).sum()))
    whole = loss_fn(logprobs, old, advantages, mask, logprobs_ref=ref, entropy=entropy, **counts)
    parts = [
        loss_fn(logprobs[rows], old[rows], advantages[rows], mask[rows], logprobs_ref=ref[rows],
                entropy=entropy[rows], **counts)
        for rows in (slice(0, 2), slice(2, 5), slice(5, 6))
    ]
    assert set(whole.shares) == {"pg_loss", "kl_loss", "entropy_loss", "loss"}
    for key, value in whole.shares.items():
        assert sum(p.shares[key] for p in parts).item() == pytest.approx(value.item(), rel=1e-13), key
    grads = torch.autograd.grad(sum(p.loss for p in parts), (logprobs, entropy))
    want = torch.autograd.grad(whole.loss, (logprobs, entropy))
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-16)
    expected_total = (
        whole.shares["pg_loss"] + 0.2 * whole.shares["kl_loss"] - 0.01 * whole.shares["entropy_loss"]
    )
    assert whole.loss.item() == pytest.approx(expected_total.item(), rel=1e-14)
    assert whole.shares["kl_loss"].item() == pytest.approx(
        aggregate(torch.exp(ref - logprobs) - (ref - logprobs) - 1, mask, "seq_mean_token_mean", **counts).item(),
        rel=1e-13,
    )


def test_built_from_the_config():
    cfg = AlgorithmConfig(policy_loss="clip", reduction="seq_mean_token_sum_norm", kl_coef=0.1, kl_estimator="k2",
                          entropy_coef=0.001)
    loss_fn = training_loss_from_config(cfg, max_response_length=16)
    assert loss_fn.policy_loss == policy_loss_from_config(cfg, max_response_length=16)
    assert (loss_fn.reduction, loss_fn.norm_length) == ("seq_mean_token_sum_norm", 16)
    assert (loss_fn.kl_coef, loss_fn.kl_estimator, loss_fn.entropy_coef) == (0.1, "k2", 0.001)
    assert loss_fn.needs_reference and loss_fn.needs_entropy
    plain = training_loss_from_config(AlgorithmConfig())
    assert not plain.needs_reference and not plain.needs_entropy
    # Without regularizers the result is the policy loss's, metrics and all.
    logprobs, old, advantages, mask, _ = batch((0.5, -0.5, 1.0))
    out = plain(logprobs, old + 0.1, advantages, mask, num_global_tokens=5, num_global_seqs=2)
    loss, metrics = policy_loss_from_config(AlgorithmConfig())(
        logprobs, old + 0.1, advantages, mask, num_global_tokens=5, num_global_seqs=2
    )
    assert out.loss.item() == loss.item() and set(out.shares) == {"pg_loss", "loss"}
    assert set(out.metrics) == set(metrics)
    assert all(torch.equal(out.metrics[key], value) for key, value in metrics.items())


def test_bad_settings_and_missing_inputs_raise():
    with pytest.raises(ValueError, match="kl_coef=-0.1: must be >= 0"):
        TrainingLoss(sapo_loss, reduction="token_mean", kl_coef=-0.1)
    with pytest.raises(ValueError, match="kl_estimator='k4' is not known"):
        TrainingLoss(sapo_loss, reduction="token_mean", kl_estimator="k4")
    with pytest.raises(ValueError, match="entropy_coef=nan: must be a finite number"):
        TrainingLoss(sapo_loss, reduction="token_mean", entropy_coef=float("nan"))
    logprobs, old, advantages, mask, _ = batch()
    with pytest.raises(ValueError, match="kl_coef > 0 needs logprobs_ref"):
        sapo_training_loss(kl_coef=0.1)(logprobs, old, advantages, mask, num_global_tokens=5, num_global_seqs=2)
    with pytest.raises(ValueError, match="entropy_coef != 0 needs entropy"):
        sapo_training_loss(entropy_coef=0.1)(logprobs, old, advantages, mask, num_global_tokens=5, num_global_seqs=2)


def test_the_actor_reads_its_settings_from_the_loss_object():
    from sapo_megatron.actor.actor import MegatronPolicy
    from sapo_megatron.algorithms.supervised import nll_loss

    loss_fn = sapo_training_loss(kl_coef=0.2, kl_estimator="k1")
    policy = MegatronPolicy([], loss=loss_fn, micro_batch_size=1)
    assert (policy.kl_coef, policy.kl_estimator, policy.entropy_coef) == (0.2, "k1", 0.0)
    assert policy.reduction == "seq_mean_token_mean" and policy.policy_loss is loss_fn.policy_loss
    # The warm-up swaps the policy term only.
    policy.policy_loss = nll_loss
    assert policy.loss.policy_loss is nll_loss and policy.loss.kl_coef == 0.2
