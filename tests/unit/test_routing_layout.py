"""Compact routing records (sapo_megatron.routing_layout): layout, round trips, selection, sampling, and the
routing diagnostics computed on records, which must equal the dense tensors' exactly."""

from __future__ import annotations

import pickle

import pytest
import torch

from sapo_megatron.routing_layout import (
    UNRECORDED,
    RoutingRecord,
    replay_positions,
    routing_dtype,
    sample_positions,
)


def random_routing(rows: int, seq: int, layers: int, topk: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Distinct experts per (token, layer), int64 [rows, seq, layers, topk]."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, seq, layers, num_experts, generator=g)
    return scores.topk(topk, dim=-1).indices


def response_mask(rows: int, seq: int, seed: int = 0) -> torch.Tensor:
    """One contiguous response span per row (some rows empty), as collate_sequences lays them out."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, seq, dtype=torch.bool)
    for row in range(rows):
        start = int(torch.randint(1, seq // 2, (1,), generator=g))
        length = int(torch.randint(0, seq - start, (1,), generator=g)) if row % 4 != 3 else 0
        mask[row, start : start + length] = True
    return mask


# -- dtype -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_experts, dtype",
    [(1, torch.uint8), (128, torch.uint8), (255, torch.uint8), (256, torch.uint8), (257, torch.int16),
     (32768, torch.int16)],
)
def test_routing_dtype_is_the_smallest_that_holds_every_expert_id(num_experts, dtype):
    assert routing_dtype(num_experts) == dtype
    # The largest id survives the round trip through the compact dtype.
    assert int(torch.tensor(num_experts - 1).to(dtype)) == num_experts - 1


@pytest.mark.parametrize("num_experts", [0, -3, 32769, True, 8.0])
def test_routing_dtype_refuses_what_it_cannot_hold(num_experts):
    with pytest.raises(ValueError, match="num_experts"):
        routing_dtype(num_experts)


# -- round trips --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", [128, 256, 300])
def test_dense_record_dense_is_bit_identical_at_the_recorded_positions(num_experts):
    dense = random_routing(6, 11, 3, 4, num_experts, seed=num_experts)
    dense[0, 0, 0] = torch.tensor([num_experts - 1, 0, 1, 2])  # the largest id (255 for uint8) round-trips
    positions = response_mask(6, 11)
    record = RoutingRecord.from_dense(dense, positions, num_experts)
    assert record.experts.dtype == routing_dtype(num_experts)
    assert record.rows == 6 and record.num_tokens == int(positions.sum())
    assert torch.equal(record.counts(), positions.sum(dim=1))
    for dtype in (torch.int64, torch.int32, torch.int16):
        back = record.dense(11, dtype=dtype)
        assert back.dtype == dtype and back.shape == dense.shape
        assert torch.equal(back[positions].long(), dense[positions])
        assert bool((back[~positions] == UNRECORDED).all())
    assert torch.equal(record.positions_mask(11), positions)
    # Every position recorded, the record is the dense tensor.
    whole = RoutingRecord.from_dense(dense, torch.ones(6, 11, dtype=torch.bool), num_experts)
    assert torch.equal(whole.dense(11), dense)
    # Wider densification pads with -1; narrower than a recorded position is an error.
    assert bool((whole.dense(13)[:, 11:] == UNRECORDED).all())
    with pytest.raises(ValueError, match="outside a width of 10"):
        whole.dense(10)
    with pytest.raises(ValueError, match="signed integer"):
        whole.dense(11, dtype=torch.uint8)


def test_a_record_pickles_and_compares_by_content():
    dense = random_routing(3, 7, 2, 2, 16)
    positions = response_mask(3, 7, seed=1)
    record = RoutingRecord.from_dense(dense, positions, 16)
    assert pickle.loads(pickle.dumps(record)) == record
    assert record == RoutingRecord.from_dense(dense.int(), positions, 16)
    assert record != RoutingRecord.from_dense(dense, positions, 17)
    other = dense.clone()
    other[positions.nonzero()[0, 0], positions.nonzero()[0, 1], 0] = (dense[positions][0, 0] + 1) % 16
    assert record != RoutingRecord.from_dense(other.sort(dim=-1).values, positions, 16)


def test_nbytes_is_the_compact_layout():
    # Qwen3-30B-A3B's shape: 48 MoE layers, top-8 of 128 experts; 2 rows of 5 and 3 recorded tokens.
    dense = random_routing(2, 6, 48, 8, 128)
    positions = torch.zeros(2, 6, dtype=torch.bool)
    positions[0, 1:6], positions[1, :3] = True, True
    record = RoutingRecord.from_dense(dense, positions, 128)
    assert record.nbytes == 8 * 48 * 8 * 1 + 8 * 4 + 3 * 8
    # The int32 dense tensor of the same rows: 2 x 6 positions x 48 x 8 x 4 bytes.
    assert dense.int().numel() * 4 == 18432


def test_from_dense_refuses_unrecorded_or_out_of_range_ids_at_kept_positions():
    dense = random_routing(2, 4, 1, 2, 8)
    positions = torch.ones(2, 4, dtype=torch.bool)
    holes = dense.clone()
    holes[1, 2] = UNRECORDED
    with pytest.raises(ValueError, match=r"1 id\(s\)|2 id\(s\)"):
        RoutingRecord.from_dense(holes, positions, 8)
    keep = positions.clone()
    keep[1, 2] = False
    assert RoutingRecord.from_dense(holes, keep, 8).num_tokens == 7
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        RoutingRecord.from_dense(dense, positions, 4)
    with pytest.raises(ValueError, match="positions has shape"):
        RoutingRecord.from_dense(dense, positions[:, :3], 8)


def test_the_layout_is_checked_on_construction():
    experts = torch.zeros(3, 1, 2, dtype=torch.uint8)
    offsets = torch.tensor([0, 2, 3])
    RoutingRecord(experts, torch.tensor([4, 5, 0], dtype=torch.int32), offsets, 8)
    with pytest.raises(ValueError, match="rise strictly within each row"):
        RoutingRecord(experts, torch.tensor([5, 4, 0], dtype=torch.int32), offsets, 8)
    with pytest.raises(ValueError, match="dtype torch.int32"):
        RoutingRecord(experts.int(), torch.tensor([4, 5, 0], dtype=torch.int32), offsets, 8)
    with pytest.raises(ValueError, match="rise from 0 to the 3 tokens"):
        RoutingRecord(experts, torch.tensor([4, 5, 0], dtype=torch.int32), torch.tensor([0, 2, 4]), 8)


def test_check_values_finds_repeated_and_out_of_range_experts():
    dense = random_routing(2, 3, 2, 2, 8)
    record = RoutingRecord.from_dense(dense, torch.ones(2, 3, dtype=torch.bool), 8)
    record.check_values()
    repeated = dense.clone()
    repeated[1, 1, 0] = torch.tensor([3, 3])
    with pytest.raises(ValueError, match="repeat an expert"):
        RoutingRecord.from_dense(repeated, torch.ones(2, 3, dtype=torch.bool), 8).check_values()
    wide = RoutingRecord(torch.full((1, 1, 2), -2, dtype=torch.int16), torch.zeros(1, dtype=torch.int32),
                         torch.tensor([0, 1]), 300)
    with pytest.raises(ValueError, match=r"outside \[0, 300\)"):
        wide.check_values()


# -- selection ----------------------------------------------------------------------------------------------------


def test_select_restricted_truncated_and_concat_equal_the_dense_operations():
    dense = random_routing(7, 9, 2, 3, 32, seed=3)
    positions = response_mask(7, 9, seed=3)
    record = RoutingRecord.from_dense(dense, positions, 32)
    for rows in ([4, 0, 4], slice(2, 6), torch.tensor([6, 1]), range(3), 5):
        index = torch.arange(7)[rows] if not isinstance(rows, int) else torch.tensor([rows])
        index = torch.as_tensor(index).reshape(-1)
        assert record.select(rows) == RoutingRecord.from_dense(dense[index], positions[index], 32)
    assert record.select(torch.tensor([True, False] * 3 + [True])) == record.select([0, 2, 4, 6])
    assert record.select([]).rows == 0 and record.select([]).num_tokens == 0
    sub = torch.rand(7, 9, generator=torch.Generator().manual_seed(5)) > 0.5
    assert record.restricted(sub) == RoutingRecord.from_dense(dense, positions & sub, 32)
    assert record.restricted(sub[:, :4]) == RoutingRecord.from_dense(dense, positions & sub & (torch.arange(9) < 4), 32)
    assert record.truncated(5) == RoutingRecord.from_dense(dense, positions & (torch.arange(9) < 5), 32)
    parts = [record.select(slice(0, 2)), record.select(slice(2, 2)), record.select(slice(2, 7))]
    assert RoutingRecord.concat(parts) == record
    with pytest.raises(ValueError, match="differ in layers"):
        RoutingRecord.concat([record, RoutingRecord.from_dense(dense[..., :1, :], positions, 32)])


def test_from_sequences_lays_engine_rows_on_train_batch_positions():
    from sapo_megatron.actor.batch import collate_sequences
    from sapo_megatron.actor.routing_replay import rollout_routing_to_train

    prompts, responses = [[5, 6, 7], [8], [3, 3]], [[1, 2], [3, 4, 9], []]
    tokens, mask, _ = collate_sequences(prompts, responses, pad_id=0, seq_len=6)
    g = torch.Generator().manual_seed(0)
    # The engine's layout: one row per token fed through the model (all but the last sampled token), compact.
    routed = [torch.rand(len(p) + len(r) - 1, 2, 8, generator=g).topk(2, dim=-1).indices.to(torch.uint8)
              for p, r in zip(prompts, responses)]
    dense = rollout_routing_to_train(routed, 6)
    # Every position the engine routed, or only the loss positions (the response), or the replay positions.
    for positions in (None, mask, replay_positions(mask)):
        record = RoutingRecord.from_sequences(routed, positions, 8)
        kept = dense[..., 0, 0] >= 0 if positions is None else positions
        assert record == RoutingRecord.from_dense(dense, kept, 8)
    # Replay positions are exactly what the engine routed for rows with a response.
    assert torch.equal(replay_positions(mask)[:2], (dense[..., 0, 0] >= 0)[:2])
    beyond = mask.clone()
    beyond[0, 4] = True
    with pytest.raises(ValueError, match="row 0 keeps position 4, but its routing covers only 4 positions"):
        RoutingRecord.from_sequences(routed, beyond, 8)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        RoutingRecord.from_sequences(routed, mask, 4)
    with pytest.raises(ValueError, match="row 1 has shape"):
        RoutingRecord.from_sequences([routed[0], routed[1][..., :1]], None, 8)


def test_replay_positions_run_to_each_rows_last_loss_position():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    expected = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0] * 7, [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(replay_positions(mask), expected)


# -- sampled capture ----------------------------------------------------------------------------------------------


def test_sampled_positions_are_a_capped_deterministic_subset_of_the_loss_positions():
    mask = response_mask(16, 40, seed=7)
    row_ids = torch.arange(100, 116)
    total = int(mask.sum())
    assert total > 200
    sample = sample_positions(mask, row_ids, 64, seed=3, step=5)
    assert int(sample.sum()) == 64 and bool((sample <= mask).all())
    # The same rule every time it is asked: the rollout's and the old pass's records pair the same tokens.
    assert torch.equal(sample, sample_positions(mask, row_ids, 64, seed=3, step=5))
    # Another seed or step draws other tokens; 0 or a cap above the count keeps every loss position.
    assert not torch.equal(sample, sample_positions(mask, row_ids, 64, seed=4, step=5))
    assert not torch.equal(sample, sample_positions(mask, row_ids, 64, seed=3, step=6))
    assert torch.equal(sample_positions(mask, row_ids, 0, seed=3), mask)
    assert torch.equal(sample_positions(mask, row_ids, total, seed=3), mask)
    # A token's priority depends on its global row index and position only: the same rows in another order (or
    # held with other rows) give the same choice among them.
    order = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_positions(mask[order], row_ids[order], 64, seed=3, step=5), sample[order])
    # Spread over the rows, not the first ones' tokens.
    assert int((sample.sum(dim=1) > 0).sum()) >= 8
    # A larger cap keeps a superset (the sample grows by the next-smallest keys).
    assert bool((sample <= sample_positions(mask, row_ids, 128, seed=3, step=5)).all())
    with pytest.raises(ValueError, match="max_tokens"):
        sample_positions(mask, row_ids, -1, seed=3)
    with pytest.raises(ValueError, match="row_ids"):
        sample_positions(mask, row_ids[:3], 10, seed=3)


# -- diagnostics on records ----------------------------------------------------------------------------------------


def _perturbed(dense: torch.Tensor, num_experts: int, frac: float, seed: int) -> torch.Tensor:
    """``dense`` with one expert of some (token, layer) pairs swapped for an unused one."""
    g = torch.Generator().manual_seed(seed)
    out = dense.clone()
    flip = torch.rand(dense.shape[:3], generator=g) < frac
    for b, t, m in flip.nonzero().tolist():
        used = set(out[b, t, m].tolist())
        out[b, t, m, 0] = next(e for e in range(num_experts) if e not in used)
    return out


def _assert_same_stats(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("chunk_ids", [None, 1, 700])
def test_diagnostics_on_records_equal_the_dense_diagnostics_exactly(monkeypatch, chunk_ids):
    """Rollout record (response positions) vs old record (replay positions), as the trainer pairs them; the dense
    tensors hold -1 outside each record. With small chunks the records are densified a few rows at a time."""
    from sapo_megatron.diagnostics import routing_stats as diag
    from sapo_megatron.diagnostics.attribution import routing_variance_stats

    if chunk_ids is not None:
        monkeypatch.setattr(diag, "DENSE_CHUNK_IDS", chunk_ids)
    num_experts, rows, seq = 16, 12, 23
    mask = response_mask(rows, seq, seed=11)
    old = random_routing(rows, seq, 3, 4, num_experts, seed=1)
    rollout = _perturbed(old, num_experts, 0.2, seed=2)
    rollout_record = RoutingRecord.from_dense(rollout, mask, num_experts)
    old_record = RoutingRecord.from_dense(old, replay_positions(mask), num_experts)
    rollout_dense, old_dense = rollout_record.dense(seq), old_record.dense(seq)
    values = torch.randn(rows, seq, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    for a, b in ((rollout_record, old_record), (rollout_record, old_dense), (old_record, old_record)):
        da = a.dense(seq) if isinstance(a, RoutingRecord) else a
        db = b.dense(seq) if isinstance(b, RoutingRecord) else b
        _assert_same_stats(diag.routing_change_stats(a, b, mask), diag.routing_change_stats(da, db, mask))
        assert torch.equal(diag.changed_layer_count(a, b, mask), diag.changed_layer_count(da, db, mask))
        _assert_same_stats(routing_variance_stats(values, mask, a, b), routing_variance_stats(values, mask, da, db))
    _assert_same_stats(
        diag.expert_load_stats(old_record, mask, num_experts), diag.expert_load_stats(old_dense, mask, num_experts)
    )
    # The comparison is not empty: routing changed on some tokens and not on others.
    changed = diag.changed_layer_count(rollout_record, old_record, mask)
    assert int((changed > 0).sum()) > 0 and int((changed == 0).sum()) > 0
    assert torch.equal(rollout_dense, rollout_record.dense(seq))


def test_diagnostics_on_a_sample_are_the_dense_diagnostics_on_the_sampled_mask():
    from sapo_megatron.diagnostics.routing_stats import expert_load_stats, routing_change_stats

    num_experts, rows, seq = 8, 10, 30
    mask = response_mask(rows, seq, seed=4)
    old = random_routing(rows, seq, 2, 2, num_experts, seed=5)
    rollout = _perturbed(old, num_experts, 0.3, seed=6)
    sample = sample_positions(mask, torch.arange(rows), 25, seed=0, step=1)
    # Both records built from the one sample mask: they hold the same tokens.
    rollout_record = RoutingRecord.from_dense(rollout, sample, num_experts)
    old_record = RoutingRecord.from_dense(old, sample, num_experts)
    assert torch.equal(rollout_record.positions_mask(seq), old_record.positions_mask(seq))
    stats = routing_change_stats(rollout_record, old_record, sample)
    _assert_same_stats(stats, routing_change_stats(rollout, old, sample))
    assert float(stats["tokens_compared"]) == 25 and float(stats["tokens_unrecorded"]) == 0
    _assert_same_stats(
        expert_load_stats(old_record, sample, num_experts), expert_load_stats(old, sample, num_experts)
    )


def test_routing_sample_tokens_config():
    from sapo_megatron.config import ConfigError, load_config

    assert load_config(None).diagnostics.routing_sample_tokens == 0
    assert load_config(None, ["diagnostics.routing_sample_tokens=4096"]).diagnostics.routing_sample_tokens == 4096
    with pytest.raises(ConfigError, match=r"diagnostics.routing_sample_tokens=-1: must be >= 0"):
        load_config(None, ["diagnostics.routing_sample_tokens=-1"])
    # A replay needs every position up to the last response token: sampling it is refused, naming the fix.
    for replay in ("old", "rollout"):
        with pytest.raises(ConfigError, match=r"routing_sample_tokens=8 with algorithm.routing_replay=.*set "
                                              r"diagnostics.routing_sample_tokens=0 or algorithm.routing_replay=off"):
            load_config(None, ["diagnostics.routing_sample_tokens=8", f"algorithm.routing_replay={replay}"])
