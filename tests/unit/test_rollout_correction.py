"""Behaviour-policy correction: the truncated importance weights and their metric sums against closed forms
written out here, and the weights inside every policy loss and the training loss (value and gradient)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sapo_megatron.actor.batch import TrainBatch
from sapo_megatron.algorithms import (
    POLICY_LOSS_FUNCTIONS,
    RolloutCorrectionSums,
    TrainingLoss,
    get_policy_loss,
    policy_loss_from_config,
    rollout_correction_sums,
    rollout_correction_weights,
    sapo_loss,
    training_loss_from_config,
)
from sapo_megatron.config import REDUCTIONS, AlgorithmConfig

F64 = torch.float64
NAN, INF = float("nan"), float("inf")

HYPER = {
    "sapo": {"tau_pos": 0.8, "tau_neg": 1.3},
    "clip": {"eps_low": 0.2, "eps_high": 0.28},
    "dual_clip": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip_c": 1.6},
    "gspo": {"eps_low": 0.05, "eps_high": 0.08},
    "cispo": {"eps_low": 0.3, "eps_high": 0.2},
}


# -- the weights -------------------------------------------------------------------------------------------

# Rows of 3, 2, 0 and 4 valid tokens; masked positions hold NaN / -inf, which must not matter.
# Token ratios from 0.22 to 3.3; sequence ratios 1.22, 0.27 and 4.95.
OLD = [[-1.0, -0.2, -1.7, NAN], [-0.5, -2.5, -INF, 0.0], [NAN, NAN, NAN, NAN], [-0.1, -0.4, -0.9, -1.6]]
ROLLOUT = [[-1.4, -0.2, -1.5, -INF], [-0.7, -1.0, 0.0, NAN], [-1.0, -1.0, -1.0, -1.0], [-1.3, -0.2, -1.1, -2.0]]
MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]


def weight_inputs():
    return torch.tensor(OLD, dtype=F64), torch.tensor(ROLLOUT, dtype=F64), torch.tensor(MASK, dtype=torch.bool)


def closed_token_weights(clip: float) -> list[list[float]]:
    return [
        [min(math.exp(OLD[i][t] - ROLLOUT[i][t]), clip) if MASK[i][t] else 0.0 for t in range(4)] for i in range(4)
    ]


def closed_sequence_weights(clip: float) -> list[list[float]]:
    out = []
    for i in range(4):
        log_ratio = sum(OLD[i][t] - ROLLOUT[i][t] for t in range(4) if MASK[i][t])
        weight = min(math.exp(log_ratio), clip)
        out.append([weight if MASK[i][t] else 0.0 for t in range(4)])
    return out


@pytest.mark.parametrize("clip", [1.0, 1.5, 2.0, 100.0])
def test_token_weights_match_the_closed_form(clip):
    old, rollout, mask = weight_inputs()
    weights = rollout_correction_weights(old, rollout, mask, level="token", clip=clip)
    assert weights.dtype == torch.float32 and weights.shape == (4, 4) and not weights.requires_grad
    expected = torch.tensor(closed_token_weights(clip), dtype=torch.float32)
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    assert bool((weights[~mask] == 0).all())


@pytest.mark.parametrize("clip", [1.0, 1.5, 2.0, 100.0])
def test_sequence_weights_match_the_closed_form(clip):
    old, rollout, mask = weight_inputs()
    weights = rollout_correction_weights(old, rollout, mask, level="sequence", clip=clip)
    assert weights.dtype == torch.float32 and not weights.requires_grad
    expected = torch.tensor(closed_sequence_weights(clip), dtype=torch.float32)
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    # Every valid token of a row carries the same weight.
    for i in range(4):
        assert len(set(weights[i][mask[i]].tolist())) <= 1


def test_truncation_is_active_on_the_hand_batch():
    """The batch has tokens and a sequence above 2 and below 1, so the clip tests above mean something."""
    token = [w for row in closed_token_weights(INF) for w in row]
    sequence = [row[0] for row in closed_sequence_weights(INF)]
    assert max(token) > 2 and 0 < min(w for w in token if w > 0) < 1
    assert max(sequence) > 2 and min(w for w in sequence if w > 0) < 1 and any(1 < w < 1.5 for w in sequence)


def test_weights_follow_the_input_precision_and_are_detached():
    old, rollout, mask = weight_inputs()
    old32 = old.float().requires_grad_(True)
    weights = rollout_correction_weights(old32, rollout.float(), mask.to(torch.int64), level="token", clip=2.0)
    assert weights.dtype == torch.float32 and weights.grad_fn is None
    expected = torch.tensor(closed_token_weights(2.0), dtype=torch.float32)
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)


def test_weights_cannot_overflow():
    """Log-ratios of +-1000 per token, and sequence sums of +-2000: weights are the clip or 0, sums finite."""
    old = torch.tensor([[1000.0, -1000.0, 0.0], [1000.0, 1000.0, 0.0], [-1000.0, -1000.0, 0.0]])
    rollout = torch.zeros(3, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    token = rollout_correction_weights(old, rollout, mask, level="token", clip=2.0)
    assert token.tolist() == [[2.0, 0.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 0.0]]
    sequence = rollout_correction_weights(old, rollout, mask, level="sequence", clip=2.0)
    # Row 0: 1000 - 1000 = 0, a ratio of exactly 1.
    assert sequence.tolist() == [[1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 0.0]]
    for level in ("token", "sequence"):
        sums = rollout_correction_sums(old, rollout, mask, level=level, clip=2.0)
        for f in dataclasses.fields(sums):
            assert math.isfinite(float(getattr(sums, f.name))), (level, f.name)
        # The untruncated ratio is capped only to stay finite: at exp(20).
        assert float(sums.ratio_max) == pytest.approx(math.exp(20.0), rel=1e-12)
    # A clip beyond the finiteness cap acts as the cap.
    huge = rollout_correction_weights(old, rollout, mask, level="token", clip=1e30)
    assert huge[0, 0].item() == pytest.approx(math.exp(20.0), rel=1e-6) and math.isfinite(huge.max().item())


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"level": "off", "clip": 2.0}, "level='off'"),
        ({"level": "geometric", "clip": 2.0}, "level='geometric'"),
        ({"level": "token", "clip": 0.5}, "clip=0.5: must be a finite number >= 1"),
        ({"level": "token", "clip": INF}, "clip=inf"),
        ({"level": "token", "clip": True}, "clip=True"),
    ],
)
def test_bad_arguments_raise(kwargs, fragment):
    old, rollout, mask = weight_inputs()
    for fn in (rollout_correction_weights, rollout_correction_sums):
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            fn(old, rollout, mask, **kwargs)


def test_bad_inputs_raise():
    old, rollout, mask = weight_inputs()
    bad = rollout.clone()
    bad[0, 1] = NAN  # a valid position (masked ones already hold NaN and -inf)
    with pytest.raises(ValueError, match="logprobs_rollout has 1 NaN/inf"):
        rollout_correction_weights(old, bad, mask, level="token", clip=2.0)
    with pytest.raises(ValueError, match="logprobs_rollout has shape"):
        rollout_correction_weights(old, rollout[:, :3], mask, level="token", clip=2.0)
    with pytest.raises(ValueError, match="mask has shape"):
        rollout_correction_weights(old, rollout, mask[:3], level="sequence", clip=2.0)


# -- the metric sums ---------------------------------------------------------------------------------------

# Ratios pi_old / pi_rollout chosen by hand: row 0 (0.5, 1, 3), row 1 (4, 0.25), row 2 fully masked.
RATIOS = [[0.5, 1.0, 3.0], [4.0, 0.25, 1.0], [7.0, 7.0, 7.0]]
SUM_MASK = [[1, 1, 1], [1, 1, 0], [0, 0, 0]]


def sum_inputs():
    rollout = torch.tensor([[-0.3, -1.1, -2.0], [-0.7, -0.2, -0.9], [-1.0, -1.0, -1.0]], dtype=F64)
    old = rollout + torch.tensor(RATIOS, dtype=F64).log()
    return old, rollout, torch.tensor(SUM_MASK, dtype=torch.bool)


def test_token_sums_on_a_hand_batch():
    sums = rollout_correction_sums(*sum_inputs(), level="token", clip=2.0)
    # units 0.5, 1, 3, 4, 0.25; truncated at 2: 0.5, 1, 2, 2, 0.25
    expected = dict(units=5, ratio_sum=8.75, weight_sum=5.75, weight_sq_sum=9.3125, truncated=2, ratio_max=4.0)
    for name, value in expected.items():
        tensor = getattr(sums, name)
        assert tensor.dtype == F64 and tensor.dim() == 0
        assert float(tensor) == pytest.approx(value, rel=1e-14), name
    summary = sums.summary()
    assert summary == pytest.approx(
        {
            "weight_mean": 5.75 / 5,
            "weight_max": 4.0,
            "truncated_frac": 2 / 5,
            "ess": 5.75**2 / (5 * 9.3125),
            "ratio_mean": 8.75 / 5,
        },
        rel=1e-14,
    )


def test_sequence_sums_on_a_hand_batch():
    sums = rollout_correction_sums(*sum_inputs(), level="sequence", clip=1.2)
    # sequences: 0.5 * 1 * 3 = 1.5 (truncated to 1.2) and 4 * 0.25 = 1; the masked row is no unit
    expected = dict(units=2, ratio_sum=2.5, weight_sum=2.2, weight_sq_sum=1.44 + 1, truncated=1, ratio_max=1.5)
    for name, value in expected.items():
        assert float(getattr(sums, name)) == pytest.approx(value, rel=1e-14), name
    assert sums.summary()["ess"] == pytest.approx(2.2**2 / (2 * 2.44), rel=1e-14)
    assert sums.summary()["truncated_frac"] == 0.5


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sums_agree_with_the_weights(level):
    old, rollout, mask = weight_inputs()
    weights = rollout_correction_weights(old, rollout, mask, level=level, clip=2.0).double()
    sums = rollout_correction_sums(old, rollout, mask, level=level, clip=2.0)
    unit = mask if level == "token" else mask.any(dim=-1, keepdim=True) & (torch.arange(4) == 0)  # one per row
    per_unit = weights[unit]
    assert float(sums.units) == per_unit.numel()
    assert float(sums.weight_sum) == pytest.approx(float(per_unit.sum()), rel=1e-6)
    assert float(sums.weight_sq_sum) == pytest.approx(float(per_unit.square().sum()), rel=1e-6)
    assert float(sums.truncated) == float((per_unit == 2.0).sum())


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_shares_combine_exactly(level):
    """Two data-parallel shares (rows 0-1 and 2-3) add up to the whole batch's sums; max takes the max."""
    old, rollout, mask = weight_inputs()
    whole = rollout_correction_sums(old, rollout, mask, level=level, clip=2.0)
    parts = [
        rollout_correction_sums(old[r], rollout[r], mask[r], level=level, clip=2.0) for r in (slice(0, 2), slice(2, 4))
    ]
    combined = RolloutCorrectionSums.combine(parts)
    for f in dataclasses.fields(whole):
        assert float(getattr(combined, f.name)) == pytest.approx(float(getattr(whole, f.name)), rel=1e-14), f.name
    assert combined.summary() == pytest.approx(whole.summary(), rel=1e-14)


def test_sums_without_units():
    old, rollout, mask = sum_inputs()
    sums = rollout_correction_sums(old, rollout, torch.zeros_like(mask), level="token", clip=2.0)
    assert float(sums.units) == 0 and float(sums.ratio_max) == 0
    empty = {"weight_mean": 0.0, "weight_max": 0.0, "truncated_frac": 0.0, "ess": 1.0, "ratio_mean": 0.0}
    assert sums.summary() == empty
    # An empty share combines as the identity.
    full = rollout_correction_sums(old, rollout, mask, level="token", clip=2.0)
    assert (full + sums).summary() == full.summary()


# -- the weights in the losses -----------------------------------------------------------------------------


def loss_batch(seed: int = 0):
    """6 rows of 5, 2, 0, 4, 1 and 3 valid tokens; off-policy log-ratios; per-token weights in [0, 2]."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 2, 0, 4, 1, 3])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    logprobs_old = -torch.rand(6, 5, generator=gen, dtype=F64) * 2 - 0.1
    logprobs = logprobs_old + torch.randn(6, 5, generator=gen, dtype=F64) * 0.5
    advantages = torch.tensor([0.9, -1.2, 0.5, -0.4, 1.3, -0.8], dtype=F64)
    weights = torch.rand(6, 5, generator=gen, dtype=F64) * 2
    weights[0, 1] = 0.0  # a valid token that the correction switches off
    weights[~mask] = NAN  # never read
    return logprobs, logprobs_old, advantages, mask, weights


def reduction_weight(mask: torch.Tensor, reduction: str, i: int, norm_length: float) -> float:
    """d loss / d per-token value of any valid token of row ``i``, written out for each reduction."""
    n_tokens = int(mask.sum())
    n_seqs = int(mask.any(dim=-1).sum())
    n_i = int(mask[i].sum())
    return {
        "token_mean": 1 / n_tokens,
        "seq_mean_token_mean": 1 / (n_seqs * n_i),
        "seq_mean_token_sum": 1 / n_seqs,
        "seq_mean_token_sum_norm": 1 / (n_seqs * norm_length),
    }[reduction]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weighted_sapo_matches_the_closed_form(reduction):
    """loss = sum_it rho_it c_it * (-(4 / tau) sigmoid(tau (r - 1)) A_i), with rho the reduction's weight and
    c the importance weight; d loss / d logprob_it = -rho_it c_it A_i * 4 p (1 - p) * r, p = sigmoid(tau (r - 1))
    (d f / d r = 4 p (1 - p), and d r / d logprob = r)."""
    logprobs, logprobs_old, advantages, mask, weights = loss_batch()
    tau_pos, tau_neg, norm_length = HYPER["sapo"]["tau_pos"], HYPER["sapo"]["tau_neg"], 7.0
    logprobs.requires_grad_(True)
    loss, _ = sapo_loss(
        logprobs, logprobs_old, advantages, mask, tau_pos=tau_pos, tau_neg=tau_neg, reduction=reduction,
        norm_length=norm_length, rollout_weights=weights,
    )
    (grad,) = torch.autograd.grad(loss, logprobs)

    expected_loss, expected_grad = 0.0, torch.zeros(6, 5, dtype=F64)
    for i in range(6):
        for t in range(5):
            if not mask[i, t]:
                continue
            a, c = advantages[i].item(), weights[i, t].item()
            tau = tau_pos if a > 0 else tau_neg
            r = math.exp(logprobs[i, t].item() - logprobs_old[i, t].item())
            p = sigmoid(tau * (r - 1))
            rho = reduction_weight(mask, reduction, i, norm_length)
            expected_loss += rho * c * (-(4 / tau) * p * a)
            expected_grad[i, t] = -rho * c * a * 4 * p * (1 - p) * r
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-11, atol=1e-16)
    assert grad[0, 1].item() == 0.0 and bool((grad[~mask] == 0).all())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(POLICY_LOSS_FUNCTIONS))
def test_weights_of_one_give_exactly_the_unweighted_loss(name, reduction):
    logprobs, logprobs_old, advantages, mask, _ = loss_batch(seed=1)
    fn = get_policy_loss(name)
    results = []
    for weights in (None, torch.ones(6, 5, dtype=F64)):
        lp = logprobs.clone().requires_grad_(True)
        extra = {} if weights is None else {"rollout_weights": weights}
        loss, metrics = fn(
            lp, logprobs_old, advantages, mask, reduction=reduction, norm_length=7, **HYPER[name], **extra
        )
        results.append((loss, torch.autograd.grad(loss, lp)[0], metrics))
    (loss0, grad0, metrics0), (loss1, grad1, metrics1) = results
    assert torch.equal(loss0, loss1) and torch.equal(grad0, grad1)
    assert metrics0.keys() == metrics1.keys() and all(torch.equal(metrics0[k], metrics1[k]) for k in metrics0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(POLICY_LOSS_FUNCTIONS))
def test_every_loss_is_weighted_token_by_token(name, reduction):
    """For every loss the weighted loss is sum_it c_it * (the loss with the one-hot weight e_it), and each
    token's gradient is c_it times its unweighted gradient: the weight scales that token's term and nothing
    else (GSPO's sequence ratio is detached, so its tokens' gradients separate too)."""
    logprobs, logprobs_old, advantages, mask, weights = loss_batch(seed=2)
    weights = torch.where(mask, weights, 0.0)
    fn = get_policy_loss(name)

    def run(w):
        lp = logprobs.clone().requires_grad_(True)
        extra = {} if w is None else {"rollout_weights": w}
        loss, _ = fn(lp, logprobs_old, advantages, mask, reduction=reduction, norm_length=7, **HYPER[name], **extra)
        return loss, torch.autograd.grad(loss, lp)[0]

    loss, grad = run(weights)
    _, unweighted_grad = run(None)
    torch.testing.assert_close(grad, weights * unweighted_grad, rtol=1e-13, atol=1e-17)
    by_token = 0.0
    for i, t in mask.nonzero().tolist():
        one_hot = torch.zeros(6, 5, dtype=F64)
        one_hot[i, t] = 1.0
        by_token += weights[i, t].item() * run(one_hot)[0].item()
    assert loss.item() == pytest.approx(by_token, rel=1e-12, abs=1e-15)


def test_bad_weights_raise():
    logprobs, logprobs_old, advantages, mask, weights = loss_batch()
    negative = weights.clone()
    negative[3, 2] = -0.1
    with pytest.raises(ValueError, match="rollout_weights has 1 negative or NaN/inf"):
        sapo_loss(logprobs, logprobs_old, advantages, mask, rollout_weights=negative)
    nan = weights.clone()
    nan[0, 0] = NAN
    with pytest.raises(ValueError, match="rollout_weights has 1 negative or NaN/inf"):
        sapo_loss(logprobs, logprobs_old, advantages, mask, rollout_weights=nan)
    with pytest.raises(ValueError, match="rollout_weights has shape"):
        sapo_loss(logprobs, logprobs_old, advantages, mask, rollout_weights=weights[:, :4])
    with pytest.raises(ValueError, match="rollout_weights must be a floating-point"):
        sapo_loss(logprobs, logprobs_old, advantages, mask, rollout_weights=mask.to(torch.int64))


def test_no_gradient_flows_into_the_weights():
    logprobs, logprobs_old, advantages, mask, weights = loss_batch()
    weights = torch.where(mask, weights, 0.0).requires_grad_(True)
    lp = logprobs.clone().requires_grad_(True)
    loss, _ = sapo_loss(lp, logprobs_old, advantages, mask, rollout_weights=weights)
    grad_lp, grad_w = torch.autograd.grad(loss, (lp, weights), allow_unused=True)
    assert grad_w is None and grad_lp.abs().sum() > 0


# -- the training loss -------------------------------------------------------------------------------------


def test_training_loss_without_weights_is_the_untouched_path():
    """rollout_weights=None: the policy loss is called exactly as before (no extra argument: a policy loss that
    does not know rollout_weights still works), and the result is bit-identical to the plain function."""
    logprobs, logprobs_old, advantages, mask, _ = loss_batch()
    calls = []

    def plain(lp, old, adv, m, *, num_global_tokens=None, num_global_seqs=None):
        calls.append(1)
        return sapo_loss(lp, old, adv, m, num_global_tokens=num_global_tokens, num_global_seqs=num_global_seqs)

    counts = dict(num_global_tokens=15, num_global_seqs=5)
    out = TrainingLoss(plain, reduction="seq_mean_token_mean")(logprobs, logprobs_old, advantages, mask, **counts)
    direct, _ = sapo_loss(logprobs, logprobs_old, advantages, mask, **counts)
    assert calls and torch.equal(out.loss, direct)
    configured = training_loss_from_config(AlgorithmConfig())
    assert torch.equal(configured(logprobs, logprobs_old, advantages, mask, **counts).loss, direct)


@pytest.mark.parametrize("name", list(POLICY_LOSS_FUNCTIONS))
def test_training_loss_weights_the_policy_term_only(name):
    """With KL and entropy terms on, the weights change pg_loss and nothing else: kl_loss and entropy_loss are
    those of the unweighted loss, and pg_loss is the weighted policy loss's."""
    logprobs, logprobs_old, advantages, mask, weights = loss_batch(seed=4)
    gen = torch.Generator().manual_seed(5)
    ref = logprobs_old + 0.3 * torch.randn(6, 5, generator=gen, dtype=F64)
    entropy = torch.rand(6, 5, generator=gen, dtype=F64)
    cfg = AlgorithmConfig(policy_loss=name, reduction="token_mean", kl_coef=0.4, entropy_coef=0.01)
    loss_fn = training_loss_from_config(cfg)
    counts = dict(num_global_tokens=int(mask.sum()), num_global_seqs=int(mask.any(dim=-1).sum()))
    args = (logprobs, logprobs_old, advantages, mask)
    plain = loss_fn(*args, logprobs_ref=ref, entropy=entropy, **counts)
    weighted = loss_fn(*args, logprobs_ref=ref, entropy=entropy, rollout_weights=weights, **counts)
    policy_only, _ = policy_loss_from_config(cfg)(*args, rollout_weights=weights, **counts)
    assert torch.equal(weighted.shares["kl_loss"], plain.shares["kl_loss"])
    assert torch.equal(weighted.shares["entropy_loss"], plain.shares["entropy_loss"])
    assert torch.equal(weighted.shares["pg_loss"], policy_only.detach())
    assert abs(weighted.shares["pg_loss"] - plain.shares["pg_loss"]) > 1e-3
    expected = policy_only + 0.4 * plain.shares["kl_loss"] - 0.01 * plain.shares["entropy_loss"]
    assert weighted.loss.item() == pytest.approx(expected.item(), rel=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weighted_micro_batch_shares_add_up_to_the_whole(reduction):
    """Global counts make each micro-batch's weighted loss its exact share, as without weights."""
    logprobs, logprobs_old, advantages, mask, weights = loss_batch(seed=6)
    cfg = AlgorithmConfig(reduction=reduction, reduction_norm_length=7)
    loss_fn = training_loss_from_config(cfg)
    counts = dict(num_global_tokens=int(mask.sum()), num_global_seqs=int(mask.any(dim=-1).sum()))
    whole = loss_fn(logprobs, logprobs_old, advantages, mask, rollout_weights=weights, **counts).loss
    parts = sum(
        loss_fn(logprobs[r], logprobs_old[r], advantages[r], mask[r], rollout_weights=weights[r], **counts).loss
        for r in (slice(0, 1), slice(1, 4), slice(4, 6))
    )
    assert parts.item() == pytest.approx(whole.item(), rel=1e-13)


# -- the batch carries the weights -------------------------------------------------------------------------


def test_train_batch_carries_the_weights_through_every_reshaping():
    tokens = torch.arange(15).reshape(3, 5)
    weights = torch.rand(3, 5)
    batch = TrainBatch(
        tokens=tokens, loss_mask=tokens % 2 == 1, advantages=torch.tensor([0.5, -1.0, 2.0]),
        logprobs_old=-tokens.float(), rollout_weights=weights,
    )
    assert torch.equal(batch.select(slice(1, 3)).rollout_weights, weights[1:])
    assert torch.equal(batch.select(torch.tensor([2, 0])).rollout_weights, weights[[2, 0]])
    padded = batch.padded_to_multiple(4)
    assert torch.equal(padded.rollout_weights[:3], weights) and not padded.loss_mask[3].any()
    assert torch.equal(batch.narrowed(3).rollout_weights, weights[:, :3])
    widened = batch.widened(7)
    assert torch.equal(widened.rollout_weights[:, :5], weights) and bool((widened.rollout_weights[:, 5:] == 0).all())
    assert torch.equal(batch.with_seq_len_multiple(4).rollout_weights[:, :5], weights)
    assert batch.with_(rollout_weights=None).rollout_weights is None
    assert TrainBatch(tokens=tokens, loss_mask=batch.loss_mask, advantages=batch.advantages).rollout_weights is None
    with pytest.raises(ValueError, match=r"rollout_weights shape \(3, 4\) != tokens shape \(3, 5\)"):
        batch.with_(rollout_weights=weights[:, :4])
