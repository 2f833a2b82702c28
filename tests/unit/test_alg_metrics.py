"""Loss metrics: detached 0-dim tensors whose declared reductions recombine micro-batches exactly."""

from __future__ import annotations

import pytest
import torch

from sapo_megatron.algorithms import METRIC_REDUCTIONS, STD_MEAN_OF, get_policy_loss, reduce_metrics
from sapo_megatron.config import POLICY_LOSSES

F64 = torch.float64

HYPER = {
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "clip": {"eps_low": 0.2, "eps_high": 0.28},
    "dual_clip": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip_c": 1.6},
    "gspo": {"eps_low": 0.05, "eps_high": 0.08},
    "cispo": {"eps_low": 0.3, "eps_high": 0.2},
}


def batch():
    gen = torch.Generator().manual_seed(21)
    lengths = torch.tensor([6, 2, 0, 4, 1, 5, 3])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    logprobs_old = -torch.rand(7, 6, generator=gen, dtype=F64) * 2 - 0.1
    logprobs = logprobs_old + torch.randn(7, 6, generator=gen, dtype=F64) * 0.6
    advantages = torch.randn(7, generator=gen, dtype=F64)
    return logprobs, logprobs_old, advantages, mask


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_reduced_micro_batch_metrics_equal_whole_batch_metrics(name):
    logprobs, logprobs_old, advantages, mask = batch()
    fn = get_policy_loss(name)
    _, whole = fn(logprobs.clone().requires_grad_(True), logprobs_old, advantages, mask, **HYPER[name])
    for key, value in whole.items():
        assert key in METRIC_REDUCTIONS
        assert value.dim() == 0 and not value.requires_grad and value.grad_fn is None

    # micro-batches of two "ranks"; the empty sequence sits alone in one micro-batch
    rank_splits = [[[0, 1], [2]], [[3, 4, 5], [6]]]
    per_rank = []
    all_parts = []
    for rank in rank_splits:
        parts = [
            fn(logprobs[rows], logprobs_old[rows], advantages[rows], mask[rows], **HYPER[name])[1] for rows in rank
        ]
        all_parts.extend(parts)
        per_rank.append(reduce_metrics(parts))
    flat = reduce_metrics(all_parts)
    hierarchical = reduce_metrics(per_rank)
    assert set(flat) == set(whole)
    for key in whole:
        assert flat[key].item() == pytest.approx(whole[key].item(), rel=1e-12, abs=1e-15), key
        assert hierarchical[key].item() == pytest.approx(whole[key].item(), rel=1e-12, abs=1e-15), key
    assert whole["num_tokens"].item() == 21 and whole["num_seqs"].item() == 6


def test_every_declared_reduction_is_known():
    assert set(METRIC_REDUCTIONS.values()) <= {"sum", "token_mean", "seq_mean", "token_std", "min", "max"}
    for std_key, mean_key in STD_MEAN_OF.items():
        assert METRIC_REDUCTIONS[std_key] == "token_std" and METRIC_REDUCTIONS[mean_key] == "token_mean"


def test_pooled_std_is_exact_when_std_is_small_relative_to_the_mean():
    # ratios near 1 with spread ~1e-4: an E[x^2] - E[x]^2 formula would lose most digits in float32
    ratios = 1 + 1e-4 * torch.tensor([1.0, -2.0, 3.0, 0.5, -1.5, 2.5])
    parts = []
    for chunk in (ratios[:2], ratios[2:]):
        mean = chunk.mean()
        parts.append({"num_tokens": torch.tensor(float(len(chunk))), "ratio_mean": mean,
                      "ratio_std": (chunk - mean).square().mean().sqrt()})
    reduced = reduce_metrics(parts)
    expected = ratios.double().var(correction=0).sqrt().item()
    assert reduced["ratio_std"].item() == pytest.approx(expected, rel=1e-4)


def test_reduce_metrics_rejects_mismatched_or_undeclared_metrics():
    with pytest.raises(ValueError, match="at least one"):
        reduce_metrics([])
    one = {"num_tokens": torch.tensor(2.0), "ratio_mean": torch.tensor(1.0)}
    with pytest.raises(ValueError, match="metrics dict 1 has keys"):
        reduce_metrics([one, {"num_tokens": torch.tensor(1.0)}])
    with pytest.raises(ValueError, match=r"metric\(s\) \['my_metric'\] have no declared reduction"):
        reduce_metrics([{"my_metric": torch.tensor(1.0)}])
    with pytest.raises(ValueError, match=r"need the count\(s\) \['num_tokens'\]"):
        reduce_metrics([{"ratio_mean": torch.tensor(1.0)}])
