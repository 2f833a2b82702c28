"""Token-budget micro-batching: the grouping, the row lengths it groups by, and putting rows back in order."""

from __future__ import annotations

import random

import pytest
import torch

from sapo_megatron.actor.batch import TrainBatch
from sapo_megatron.actor.micro_batching import (
    MicroBatchLayout,
    group_by_token_budget,
    padded_tokens,
    round_up,
    row_lengths,
)


def test_first_fit_decreasing_worked_example():
    # Longest first: 1 (10), 3 (10) fill a group of 2 x 10 = 20; 5 (6), 2 (4), 0 (3) fit 3 x 6 = 18;
    # 4 (2) would make 4 x 6 = 24 there and 3 x 10 = 30 in the first group, so it opens a third.
    lengths = [3, 10, 4, 10, 2, 6]
    assert group_by_token_budget(lengths, 20) == [[1, 3], [0, 2, 5], [4]]


def test_groups_are_runs_of_the_length_order():
    # A group's cost is rows x its first (longest) row's width, whatever the joining row's length, so a group
    # that turns one row away turns away every later one: the groups are consecutive runs of the sorted rows.
    assert group_by_token_budget([9, 8, 2, 1, 1], 12) == [[0], [1], [2, 3, 4]]
    assert group_by_token_budget([1, 7, 7, 7, 2, 2, 2, 2], 14) == [[1, 2], [3, 4], [0, 5, 6, 7]]


def test_a_row_longer_than_the_budget_gets_a_micro_batch_of_its_own():
    assert group_by_token_budget([3, 25, 3], 10) == [[1], [0, 2]]
    assert group_by_token_budget([25, 30], 10) == [[1], [0]]


def test_the_width_rounds_up_to_the_sequence_multiple():
    # Widths 5 -> 6 and 3 -> 4 with multiple 2: 2 x 6 = 12 fits, a third row would not (18 > 12).
    assert group_by_token_budget([5, 5, 3], 12, multiple=2) == [[0, 1], [2]]
    assert group_by_token_budget([5, 5, 3], 12) == [[0, 1], [2]]
    assert group_by_token_budget([5, 5, 3], 15) == [[0, 1, 2]]
    assert group_by_token_budget([5, 5, 3], 15, multiple=2) == [[0, 1], [2]]


@pytest.mark.parametrize("seed", range(20))
def test_budget_respected_and_every_row_exactly_once(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 12), rng.randint(40, 64)]) for _ in range(rng.randint(1, 40))]
    budget, multiple = rng.randint(16, 200), rng.choice([1, 2, 4])
    groups = group_by_token_budget(lengths, budget, multiple=multiple)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert group == sorted(group)
        assert len(group) == 1 or padded_tokens(group, lengths, multiple) <= budget
    # Forcing more groups (as the actor does to agree with the other data-parallel ranks) keeps both properties.
    for num_groups in range(len(groups), len(lengths) + 1):
        split = group_by_token_budget(lengths, budget, multiple=multiple, num_groups=num_groups)
        assert len(split) == num_groups
        assert sorted(i for g in split for i in g) == list(range(len(lengths)))
        assert all(len(g) == 1 or padded_tokens(g, lengths, multiple) <= budget for g in split)


def test_num_groups_halves_the_costliest_group():
    # First fit: [[1, 3] (20 tokens), [0, 2, 5] (18), [4] (2)]; one more group halves [1, 3].
    assert group_by_token_budget([3, 10, 4, 10, 2, 6], 20, num_groups=4) == [[1], [3], [0, 2, 5], [4]]
    # Then [0, 2, 5] (18) is the costliest splittable one: its longer half (5, 2) first.
    assert group_by_token_budget([3, 10, 4, 10, 2, 6], 20, num_groups=5) == [[1], [3], [2, 5], [0], [4]]


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="token budget must be >= 1"):
        group_by_token_budget([1, 2], 0)
    with pytest.raises(ValueError, match="row length must be >= 1"):
        group_by_token_budget([1, 0], 8)
    with pytest.raises(ValueError, match="needs at least 3 micro-batches"):
        group_by_token_budget([3, 10, 4, 10, 2, 6], 20, num_groups=2)
    with pytest.raises(ValueError, match="more micro-batches than the 2 rows"):
        group_by_token_budget([1, 2], 8, num_groups=3)


def test_row_lengths_cover_the_last_loss_position_and_the_token_it_predicts():
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[0, 2:5] = True  # last loss position 4 predicts token 5: tokens 0..5
    mask[1, 6] = True  # position 6 predicts token 7, the last of the width
    mask[3, 0] = True
    assert row_lengths(mask).tolist() == [6, 8, 1, 2]  # row 2 has no loss position


def test_narrowed_keeps_the_first_positions_and_the_advantages():
    tokens = torch.arange(12).reshape(2, 6)
    batch = TrainBatch(
        tokens=tokens, loss_mask=tokens % 2 == 1, advantages=torch.tensor([0.5, -1.0]), logprobs_old=-tokens.float()
    )
    cut = batch.narrowed(4)
    assert torch.equal(cut.tokens, tokens[:, :4]) and torch.equal(cut.logprobs_old, -tokens[:, :4].float())
    assert torch.equal(cut.advantages, batch.advantages) and cut.logprobs_ref is None
    assert batch.narrowed(6) is batch
    with pytest.raises(ValueError, match=r"width=7: must be in \[1, 6\]"):
        batch.narrowed(7)


def test_assemble_restores_row_order_and_width():
    lengths = [3, 10, 4, 10, 2, 6]
    groups = group_by_token_budget(lengths, 20)
    widths = [max(lengths[i] for i in g) for g in groups]
    layout = MicroBatchLayout(
        rows=tuple(torch.tensor(g) for g in groups), widths=tuple(widths), padded_size=6, num_local=6, width=12
    )
    full = torch.arange(6 * 12, dtype=torch.float32).reshape(6, 12)
    parts = [full[torch.tensor(g), :w] for g, w in zip(groups, widths)]
    out = layout.assemble(parts, fill=-1.0)
    # Groups [1, 3] (width 10), [0, 2, 5] (width 6), [4] (width 2).
    width_of_row = torch.tensor([6, 10, 6, 10, 2, 6])
    covered = torch.arange(12)[None, :] < width_of_row[:, None]
    assert torch.equal(out, torch.where(covered, full, torch.full((), -1.0)))
    assert round_up(13, 4) == 16 and round_up(12, 4) == 12
