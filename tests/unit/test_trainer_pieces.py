"""The RL loop's pure pieces: batch assembly from a rollout, mini-batch split, metric flattening, the
supervised warm-up loss, and the run's reward curve / summary helpers."""

from __future__ import annotations

import math

import pytest
import torch

from sapo_megatron.algorithms.supervised import nll_loss
from sapo_megatron.config import load_config
from sapo_megatron.diagnostics.run_logger import flatten_metrics
from sapo_megatron.diagnostics.summary import plot_reward_curve
from sapo_megatron.rewards.registry import reward_function
from sapo_megatron.trainer import Rollout, build_train_batch, due, mini_batches


def _rollout():
    return Rollout(
        prompts=[[5, 6, 7], [5, 6, 7], [9, 10]],
        responses=[[11, 12], [13], [14, 15, 16]],
        logprobs_rollout=[[-0.5, -0.25], [-1.0], [-0.1, -0.2, -0.3]],
        rewards=[1.0, 0.0, 0.5],
        finish_reasons=["eos", "eos", "length"],
        weight_version=3,
    )


def test_train_batch_aligns_rollout_logprobs_with_the_positions_that_predict_them():
    batch = build_train_batch(_rollout(), torch.tensor([1.0, -1.0, 0.0]), pad_id=0)
    # Longest prompt + response is 5 tokens; one more position so the last token is predicted in-window.
    assert batch.tokens.shape == (3, 6)
    assert batch.tokens[0].tolist() == [5, 6, 7, 11, 12, 0]
    # Position t predicts tokens[t + 1]: response token 11 (index 3) is predicted at position 2.
    assert batch.loss_mask[0].tolist() == [False, False, True, True, False, False]
    assert batch.labels[0, 2] == 11 and batch.labels[0, 3] == 12
    assert batch.logprobs_rollout[0, 2:4].tolist() == [-0.5, -0.25]
    assert batch.loss_mask[2].tolist() == [False, True, True, True, False, False]
    assert batch.logprobs_rollout[2, 1:4].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert batch.num_valid_tokens() == 6


def test_mini_batches_are_contiguous_equal_slices():
    batch = build_train_batch(_rollout(), torch.tensor([1.0, -1.0, 0.0]), pad_id=0)
    batch = batch.select(slice(0, 2))
    parts = mini_batches(batch, 2)
    assert [p.size for p in parts] == [1, 1]
    assert torch.equal(parts[1].tokens, batch.tokens[1:2])


def test_the_one_flattener_names_per_layer_and_other_vectors_and_refuses_matrices():
    out = flatten_metrics({"a": torch.tensor(0.5), "per_layer": torch.tensor([0.1, 0.2]), "b": 3}, "routing/x/")
    assert out == {"routing/x/a": 0.5, "routing/x/per_layer/layer0": pytest.approx(0.1), "routing/x/per_layer/layer1": pytest.approx(0.2), "routing/x/b": 3.0}
    # The variance attribution's per-group vectors are indexed by changed-layer count, not by layer.
    assert flatten_metrics({"var": torch.tensor([1.0, 2.0])}, "attribution/", index="") == {"attribution/var/0": 1.0, "attribution/var/1": 2.0}
    with pytest.raises(ValueError, match="histogram"):
        flatten_metrics({"m": torch.ones(2, 2)}, "routing/x/")


def test_due_fires_on_interval_and_last_step_only():
    assert [s for s in range(1, 8) if due(s, 3, 7)] == [3, 6, 7]
    assert not any(due(s, 0, 7) for s in range(1, 8))


def test_nll_loss_is_the_token_mean_negative_log_likelihood_and_its_gradient():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, metrics = nll_loss(logprobs, torch.zeros(2, 3), torch.zeros(2), mask)
    assert float(loss) == pytest.approx((1 + 2 + 0.5) / 3)
    loss.backward()
    expected = torch.where(mask, torch.full((2, 3), -1 / 3), torch.zeros(2, 3))
    assert torch.allclose(logprobs.grad, expected)
    assert float(metrics["num_tokens"]) == 3 and float(metrics["num_seqs"]) == 2
    # With a global count (micro-batching), each part contributes its share of the whole batch's mean.
    loss_a, _ = nll_loss(logprobs[:1], None, None, mask[:1], num_global_tokens=3)
    loss_b, _ = nll_loss(logprobs[1:], None, None, mask[1:], num_global_tokens=3)
    assert float(loss_a + loss_b) == pytest.approx(float(loss))


def test_reward_function_follows_the_data_source():
    from sapo_megatron.rewards.math import math_reward
    from sapo_megatron.rewards.toy import toy_reward

    assert reward_function(load_config(None, ["data.train=toy:reverse"])) is toy_reward
    assert reward_function(load_config(None, ["data.train=prompts.jsonl"])) is math_reward
    exact = reward_function(load_config(None, ["reward.fn=toy_exact"]))
    assert exact("ab", "ab") == 1.0 and exact("ax", "ab") == 0.0
    assert toy_reward("ax", "ab") == 0.25


def test_reward_curve_png_is_written_atomically(tmp_path):
    records = [{"step": s, "reward/mean": s / 10, "reward/val_mean": (s / 10 if s % 2 == 0 else None)} for s in range(6)]
    path = tmp_path / "reward_curve.png"
    plot_reward_curve(records, path, title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_batch_carries_its_routing_records_and_slices_them_with_its_rows():
    from sapo_megatron.actor.batch import TrainBatch
    from sapo_megatron.routing_layout import RoutingRecord

    tokens = torch.arange(24).reshape(4, 6)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 2:5] = True
    dense = torch.randint(0, 8, (4, 6, 3, 2), generator=torch.Generator().manual_seed(1))
    record = RoutingRecord.from_dense(dense, mask, 8)
    batch = TrainBatch(tokens=tokens, loss_mask=mask, advantages=torch.zeros(4), routing_old=record)
    part = batch.select(slice(1, 3))
    assert part.routing_old == record.select(slice(1, 3))
    assert torch.equal(part.routing_old.dense(6)[mask[1:3]], dense[1:3][mask[1:3]].long())
    picked = batch.select(torch.tensor([3, 0]))
    assert torch.equal(picked.routing_old.dense(6)[mask[[3, 0]]], dense[[3, 0]][mask[[3, 0]]].long())
    # The actor's own reshaping of a batch leaves the records out (a pass takes its replay as an argument).
    assert batch.padded_to_multiple(3).routing_old is None and batch.narrowed(5).routing_old is None
    assert batch.widened(8).routing_old is None and batch.without_routing().routing_old is None
    with pytest.raises(ValueError, match="routing_old holds 2 rows, the batch 4"):
        batch.with_(routing_old=record.select(slice(0, 2)))


def test_staleness_metrics_count_each_sample_by_its_oldest_version():
    from sapo_megatron.diagnostics.step import staleness_metrics
    from sapo_megatron.sharding import DataShare

    # Actor at version 7; four samples from versions 7, 6, 6 and 5 with 2, 4, 2 and 8 response tokens; k = 2.
    m = staleness_metrics(DataShare(), [7, 6, 6, 5], [2, 4, 2, 8], actor_version=7, max_staleness=2)
    assert m["staleness/mean"] == (0 + 1 + 1 + 2) / 4
    assert m["staleness/max"] == 2.0
    assert m["staleness/token_mean"] == (0 * 2 + 1 * 4 + 1 * 2 + 2 * 8) / 16
    assert [m[f"staleness/samples_{d}"] for d in range(3)] == [1.0, 2.0, 1.0]
    assert m["staleness/samples_over"] == 0.0
    assert (m["weights/actor_version"], m["weights/rollout_version_min"]) == (7.0, 5.0)
    # A sample older than k lands in samples_over, never in the histogram's last bin.
    assert staleness_metrics(DataShare(), [4], [3], actor_version=7, max_staleness=2)["staleness/samples_over"] == 1.0


def test_rollout_oldest_versions_follow_the_version_spans():
    rollout = Rollout(prompts=[[1], [1]], responses=[[2, 3], [4]], logprobs_rollout=[[0.0, 0.0], [0.0]],
                      rewards=[0.0, 1.0], finish_reasons=["eos", "eos"], weight_version=5)
    assert rollout.oldest_versions() == [5, 5]
    rollout.version_starts = [[(0, 4), (1, 5)], [(0, 5)]]
    assert rollout.oldest_versions() == [4, 5]


def test_rollout_correction_metrics_of_one_share_are_its_own_summary():
    from sapo_megatron.algorithms import rollout_correction_sums
    from sapo_megatron.diagnostics.step import rollout_correction_metrics
    from sapo_megatron.sharding import DataShare

    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    rollout = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -4.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    sums = rollout_correction_sums(old, rollout, mask, level="token", clip=2.0)
    m = rollout_correction_metrics(DataShare(), sums)
    ratios = [math.exp(0.5), math.exp(-1.0), 1.0, math.exp(1.0)]  # the four valid tokens
    weights = [min(r, 2.0) for r in ratios]
    assert m["rollout_correction/weight_mean"] == pytest.approx(sum(weights) / 4, rel=1e-6)
    assert m["rollout_correction/weight_max"] == pytest.approx(math.exp(1.0), rel=1e-6)
    assert m["rollout_correction/truncated_frac"] == 0.25
    assert m["rollout_correction/ess"] == pytest.approx(sum(weights) ** 2 / (4 * sum(w * w for w in weights)), rel=1e-6)
