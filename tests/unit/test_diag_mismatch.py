"""Train/rollout mismatch metrics and ratio quantiles: closed-form values, KL direction, exact reduction."""

from __future__ import annotations

import math

import pytest
import torch

from sapo_megatron.diagnostics.mismatch import (
    MISMATCH_REDUCTIONS,
    mismatch_metrics,
    quantile_name,
    ratio_quantiles,
    reduce_mismatch_metrics,
)

F64 = torch.float64
NAN = float("nan")


def hand_batch():
    # delta = logprobs_old - logprobs_rollout = [1, -2, 0.5] (sequence 0) and [0.25] (sequence 1); sequence 2 is
    # fully masked. Masked positions hold NaN / -inf, which must not reach any metric.
    logprobs_old = torch.tensor([[-1.0, -3.0, -0.5], [-0.75, NAN, NAN], [NAN, NAN, NAN]], dtype=F64)
    logprobs_rollout = torch.tensor(
        [[-2.0, -1.0, -1.0], [-1.0, -math.inf, NAN], [-math.inf, NAN, NAN]], dtype=F64
    )
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    return logprobs_old, logprobs_rollout, mask


def test_mismatch_metrics_match_hand_computed_values():
    metrics = mismatch_metrics(*hand_batch())
    deltas = [1.0, -2.0, 0.5, 0.25]
    assert metrics["num_tokens"].item() == 4 and metrics["num_seqs"].item() == 2
    assert metrics["mismatch_mean"].item() == pytest.approx(-0.25 / 4, rel=1e-15)
    assert metrics["mismatch_abs_mean"].item() == pytest.approx(3.75 / 4, rel=1e-15)
    assert metrics["mismatch_abs_max"].item() == 2.0
    k3 = sum(math.exp(d) - d - 1 for d in deltas) / 4
    chi2 = sum((math.exp(d) - 1) ** 2 for d in deltas) / 4
    assert metrics["mismatch_kl_k3"].item() == pytest.approx(k3, rel=1e-14)
    assert metrics["mismatch_chi2"].item() == pytest.approx(chi2, rel=1e-14)
    # |delta| > ln 2 = 0.693: 1 and -2; |delta| > ln 5 = 1.609: -2 only
    assert metrics["mismatch_frac_above_ln2"].item() == 0.5
    assert metrics["mismatch_frac_above_ln5"].item() == 0.25
    # sequence means of delta: -0.5 / 3 and 0.25; the empty sequence is not counted
    assert metrics["mismatch_seq_log_ppl_diff"].item() == pytest.approx((-0.5 / 3 + 0.25) / 2, rel=1e-14)
    for key, value in metrics.items():
        assert key in MISMATCH_REDUCTIONS
        assert value.dim() == 0 and value.grad_fn is None and torch.isfinite(value), key


def test_k3_estimates_kl_from_rollout_to_old_and_chi2_its_pearson_divergence():
    # Tokens drawn from pi_rollout = (1/2, 1/4, 1/4) with exactly their expected frequencies, so token means are
    # the exact expectations under pi_rollout.
    p_rollout = [0.5, 0.25, 0.25]
    p_old = [0.125, 0.125, 0.75]
    tokens = [0, 0, 1, 2]
    logprobs_rollout = torch.tensor([[math.log(p_rollout[y]) for y in tokens]], dtype=F64)
    logprobs_old = torch.tensor([[math.log(p_old[y]) for y in tokens]], dtype=F64)
    metrics = mismatch_metrics(logprobs_old, logprobs_rollout, torch.ones(1, 4, dtype=torch.bool))

    kl_rollout_old = sum(p * math.log(p / q) for p, q in zip(p_rollout, p_old))
    kl_old_rollout = sum(q * math.log(q / p) for p, q in zip(p_rollout, p_old))
    chi2_old_rollout = sum((q - p) ** 2 / p for p, q in zip(p_rollout, p_old))
    chi2_rollout_old = sum((p - q) ** 2 / q for p, q in zip(p_rollout, p_old))
    assert abs(kl_rollout_old - kl_old_rollout) > 0.02 and abs(chi2_old_rollout - chi2_rollout_old) > 0.2
    assert metrics["mismatch_kl_k3"].item() == pytest.approx(kl_rollout_old, rel=1e-13)
    # k1 = -delta is the other unbiased estimator of the same KL
    assert -metrics["mismatch_mean"].item() == pytest.approx(kl_rollout_old, rel=1e-13)
    assert metrics["mismatch_chi2"].item() == pytest.approx(chi2_old_rollout, rel=1e-13)


def random_batch(seed=3):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 1, 0, 4, 3, 6, 2])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    logprobs_rollout = -torch.rand(7, 6, generator=gen, dtype=F64) * 3
    logprobs_old = logprobs_rollout + torch.randn(7, 6, generator=gen, dtype=F64) * 0.8
    logprobs_old = torch.where(mask, logprobs_old, NAN)
    return logprobs_old, logprobs_rollout, mask


def test_reduced_micro_batch_metrics_equal_whole_batch_metrics():
    logprobs_old, logprobs_rollout, mask = random_batch()
    whole = mismatch_metrics(logprobs_old, logprobs_rollout, mask)
    ranks = [[[0, 1], [2]], [[3], [4, 5, 6]]]  # the empty sequence alone in a micro-batch
    parts, per_rank = [], []
    for rank in ranks:
        rank_parts = [mismatch_metrics(logprobs_old[rows], logprobs_rollout[rows], mask[rows]) for rows in rank]
        parts.extend(rank_parts)
        per_rank.append(reduce_mismatch_metrics(rank_parts))
    assert parts[1]["mismatch_abs_max"].item() == -math.inf  # empty part: the identity of max
    for reduced in (reduce_mismatch_metrics(parts), reduce_mismatch_metrics(per_rank)):
        assert set(reduced) == set(whole)
        for key in whole:
            assert reduced[key].item() == pytest.approx(whole[key].item(), rel=1e-12, abs=1e-15), key
    # tokens above ln 2 counted directly
    delta = (logprobs_old - logprobs_rollout)[mask]
    assert whole["mismatch_frac_above_ln2"].item() == pytest.approx((delta.abs() > math.log(2)).double().mean())


def test_masked_values_and_sequence_order_do_not_matter():
    logprobs_old, logprobs_rollout, mask = random_batch()
    clean = mismatch_metrics(torch.where(mask, logprobs_old, 0.0), torch.where(mask, logprobs_rollout, 0.0), mask)
    dirty = mismatch_metrics(
        torch.where(mask, logprobs_old, math.inf), torch.where(mask, logprobs_rollout, -math.inf), mask.long()
    )
    perm = torch.tensor([4, 0, 6, 2, 1, 5, 3])
    permuted = mismatch_metrics(logprobs_old[perm], logprobs_rollout[perm], mask[perm])
    for key in clean:
        assert dirty[key].item() == clean[key].item(), key
        assert permuted[key].item() == pytest.approx(clean[key].item(), rel=1e-14, abs=1e-16), key


def test_identical_logprobs_give_zero_mismatch_and_exp_is_overflow_guarded():
    logprobs_old, _, mask = random_batch()
    same = mismatch_metrics(logprobs_old, logprobs_old.clone(), mask)
    for key in MISMATCH_REDUCTIONS:
        if not key.startswith("num_"):
            assert same[key].item() == 0.0, key

    extreme = mismatch_metrics(torch.tensor([[0.0, -1.0]]), torch.tensor([[-100.0, -1.0]]), torch.ones(1, 2))
    assert extreme["mismatch_abs_max"].item() == 100.0
    assert extreme["mismatch_kl_k3"].item() == pytest.approx((math.expm1(20.0) - 20.0) / 2, rel=1e-6)
    assert torch.isfinite(extreme["mismatch_chi2"])
    # bfloat16 inputs are computed in float32
    assert mismatch_metrics(torch.zeros(1, 2, dtype=torch.bfloat16), torch.zeros(1, 2, dtype=torch.bfloat16),
                            torch.ones(1, 2))["mismatch_mean"].dtype == torch.float32


def test_mismatch_input_errors_name_the_argument():
    old, rollout, mask = hand_batch()
    with pytest.raises(ValueError, match="logprobs_rollout has shape"):
        mismatch_metrics(old, rollout[:, :2], mask)
    with pytest.raises(ValueError, match=r"logprobs_old must be \[batch, seq\]"):
        mismatch_metrics(old.reshape(-1), rollout.reshape(-1), mask.reshape(-1))
    finite_old = torch.where(torch.isnan(old), -1.0, old)
    with pytest.raises(ValueError, match="logprobs_rollout has 1 NaN/inf"):
        mismatch_metrics(finite_old, rollout, torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="logprobs_old must be a floating-point"):
        mismatch_metrics(old.long(), rollout, mask)
    with pytest.raises(ValueError, match="mask must be boolean or hold only 0 and 1"):
        mismatch_metrics(old, rollout, mask.long() * 2)
    with pytest.raises(ValueError, match="at least one"):
        reduce_mismatch_metrics([])
    with pytest.raises(ValueError, match="no declared reduction"):
        reduce_mismatch_metrics([{"num_tokens": torch.tensor(1.0), "ratio_mean": torch.tensor(1.0)}])
    with pytest.raises(ValueError, match=r"need the count\(s\) \['num_seqs'\]"):
        reduce_mismatch_metrics([{"mismatch_seq_log_ppl_diff": torch.tensor(1.0)}])


def test_ratio_quantiles_by_hand():
    # r = 1, 2, 3, 4 (valid), the rest masked with NaN. Linear interpolation: h = q (n - 1).
    logprobs = torch.tensor([[math.log(3.0), 0.0, NAN], [math.log(4.0), math.log(2.0), NAN]], dtype=F64)
    logprobs_old = torch.tensor([[0.0, 0.0, 7.0], [0.0, 0.0, NAN]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    out = ratio_quantiles(logprobs, logprobs_old, mask, qs=(0.0, 0.25, 0.5, 1.0 / 3.0, 1.0))
    assert list(out) == ["ratio_p0", "ratio_p25", "ratio_p50", "ratio_p33.3333", "ratio_p100"]
    assert [v.item() for v in out.values()] == pytest.approx([1.0, 1.75, 2.5, 2.0, 4.0], rel=1e-14)
    assert all(v.dim() == 0 for v in out.values())


def test_ratio_quantiles_equal_torch_quantile_and_ignore_layout():
    gen = torch.Generator().manual_seed(5)
    logprobs_old = -torch.rand(6, 9, generator=gen, dtype=F64)
    logprobs = logprobs_old + torch.randn(6, 9, generator=gen, dtype=F64) * 0.3
    mask = torch.rand(6, 9, generator=gen) < 0.6
    qs = (0.01, 0.05, 0.5, 0.95, 0.99)
    out = ratio_quantiles(torch.where(mask, logprobs, NAN), logprobs_old, mask, qs=qs)
    ratios = (logprobs - logprobs_old)[mask].exp()
    expected = torch.quantile(ratios, torch.tensor(qs, dtype=F64))
    assert [out[quantile_name(q)].item() for q in qs] == pytest.approx(expected.tolist(), rel=1e-14)
    # the same tokens as flat 1-d tensors (micro-batches concatenated) give the same quantiles
    flat = ratio_quantiles(logprobs[mask], logprobs_old[mask], torch.ones(int(mask.sum()), dtype=torch.bool), qs=qs)
    assert all(flat[k].item() == pytest.approx(out[k].item(), rel=1e-15) for k in out)
    assert list(ratio_quantiles(logprobs, logprobs_old, mask)) == ["ratio_p1", "ratio_p5", "ratio_p50", "ratio_p95",
                                                                  "ratio_p99"]


def test_ratio_quantiles_without_tokens_are_nan_and_bad_levels_raise():
    empty = ratio_quantiles(torch.full((2, 3), NAN), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert all(torch.isnan(v) for v in empty.values())
    zero_size = ratio_quantiles(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool), qs=(0.5,))
    assert torch.isnan(zero_size["ratio_p50"])
    args = (torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="qs is empty"):
        ratio_quantiles(*args, qs=())
    with pytest.raises(ValueError, match=r"qs holds 5; every quantile level must be a number in \[0, 1\]"):
        ratio_quantiles(*args, qs=(0.5, 5))
    with pytest.raises(ValueError, match="duplicate levels"):
        ratio_quantiles(*args, qs=(0.5, 0.5))
    with pytest.raises(ValueError, match="logprobs_old has shape"):
        ratio_quantiles(torch.zeros(1, 2), torch.zeros(2, 1), torch.ones(1, 2))
