"""Toy tasks: deterministic, resumable streams with a held-out split, and the reward's exact values."""

from __future__ import annotations

import pytest

from sapo_megatron.data.toy import TASKS, ToyTaskStream, parse_toy_source
from sapo_megatron.rewards.toy import toy_reward


def test_answers_follow_the_task():
    stream = ToyTaskStream("reverse", seed=3)
    for ex in stream.take(50):
        letters = ex.prompt[len("reverse:") : -1]
        assert ex.answer == letters[::-1]
        assert 3 <= len(letters) <= 5
    ex = ToyTaskStream("sort", seed=3).take(1)[0]
    assert ex.answer == "".join(sorted(ex.prompt[len("sort:") : -1]))


def test_stream_resumes_exactly_from_its_state():
    a = ToyTaskStream("copy", seed=7)
    a.take(13)
    state = a.state_dict()
    expected = a.take(5)
    b = ToyTaskStream("copy", seed=7)
    b.load_state_dict(state)
    assert b.take(5) == expected


def test_heldout_split_is_disjoint_from_train():
    train = {ex.prompt for ex in ToyTaskStream("reverse", seed=1).take(2000)}
    heldout = {ex.prompt for ex in ToyTaskStream("reverse", seed=1, split="validation").take(200)}
    assert heldout and not (train & heldout)


def test_parse_toy_source_errors_name_the_allowed_tasks():
    assert parse_toy_source("toy:sort") == "sort"
    with pytest.raises(ValueError, match="allowed: copy, reverse, sort"):
        parse_toy_source("toy:shuffle")
    with pytest.raises(ValueError, match="not a toy task"):
        parse_toy_source("data/prompts.jsonl")
    assert set(TASKS) == {"copy", "reverse", "sort"}


def test_reward_values():
    assert toy_reward("cba", "cba") == 1.0
    assert toy_reward("cbx", "cba") == pytest.approx(0.5 * 2 / 3)
    assert toy_reward("cbaa", "cba") == pytest.approx(0.5 * 3 / 4)
    assert toy_reward("", "cba") == 0.0
    assert toy_reward("cbx", "cba", partial_credit=False) == 0.0
