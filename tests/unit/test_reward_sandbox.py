"""RewardSandbox: raising, hanging, crashing and non-finite reward functions cost one reward each, are
counted, and leave the sandbox usable; items keep their order."""

from __future__ import annotations

import functools
import os
import time

import pytest

from sapo_megatron.rewards.math import math_reward
from sapo_megatron.rewards.sandbox import RewardSandbox, SandboxStats

# The functions below run in spawned worker processes, so they live at module level (picklable by name).


def misbehaving_reward(response: str, ground_truth: str) -> float:
    """Exact match, except for responses that ask it to misbehave."""
    if response == "raise":
        raise RuntimeError("verifier bug on this input")
    if response == "hang":
        time.sleep(3600)
    if response == "crash":
        os._exit(3)
    if response == "nan":
        return float("nan")
    return 1.0 if response == ground_truth else 0.0


def _fail_to_load():
    raise ImportError("No module named 'verifier_that_is_not_installed'")


class UnloadableReward:
    """Pickles fine here, but unpickling it in the worker raises, like a reward whose module fails to import."""

    def __reduce__(self):
        return (_fail_to_load, ())

    def __call__(self, response: str, ground_truth: str) -> float:
        return 0.0


def test_failures_are_contained_counted_and_the_sandbox_keeps_working():
    items = [
        ("7", "7"),
        ("raise", "1"),
        ("hang", "1"),
        ("3", "4"),
        ("crash", "1"),
        ("nan", "1"),
        ("5", "5"),
    ]
    with RewardSandbox(misbehaving_reward, timeout_s=1.0, max_workers=2) as sandbox:
        rewards, stats = sandbox.score(items)
        assert rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        assert (stats.n_items, stats.n_errors, stats.n_timeouts) == (7, 3, 1)
        # The hung worker and the crashed one were replaced.
        assert stats.n_worker_restarts == 2
        assert sorted(stats.failure_samples) == [
            "item 1: RuntimeError: verifier bug on this input",
            "item 2: no reward after 1 s",
            "item 4: worker process died (exit code 3)",
            "item 5: reward is not finite: nan",
        ]

        # Same sandbox, next batch: the replacements serve it.
        rewards, stats = sandbox.score([("2", "2"), ("2", "3")])
        assert rewards == [1.0, 0.0]
        assert (stats.n_errors, stats.n_timeouts, stats.n_worker_restarts) == (0, 0, 0)
        assert sandbox.score([]) == ([], SandboxStats())


def test_math_reward_runs_in_the_sandbox():
    reward_fn = functools.partial(math_reward, missing_answer_reward=-1.0)
    items = [
        ("... so the sum is $\\boxed{1,000}$.", "1000"),
        ("Answer: 204", "204"),
        ("Answer: 205", "204"),
        ("I am not sure.", "204"),
    ]
    with RewardSandbox(reward_fn, timeout_s=10.0, max_workers=1) as sandbox:
        rewards, stats = sandbox.score(items)
    assert rewards == [1.0, 1.0, 0.0, -1.0]
    assert (stats.n_errors, stats.n_timeouts) == (0, 0)


def test_unusable_reward_functions_are_configuration_errors():
    with pytest.raises(ValueError, match="define it at module level"):
        RewardSandbox(lambda response, answer: 1.0, timeout_s=1.0, max_workers=1)
    with pytest.raises(ValueError, match="timeout_s=0"):
        RewardSandbox(misbehaving_reward, timeout_s=0, max_workers=1)
    with pytest.raises(ValueError, match="max_workers=0"):
        RewardSandbox(misbehaving_reward, timeout_s=1.0, max_workers=0)
    sandbox = RewardSandbox(UnloadableReward(), timeout_s=1.0, max_workers=1)
    with pytest.raises(ValueError, match="could not be loaded in a worker process: ImportError: No module named"):
        sandbox.score([("1", "1")])
    with pytest.raises(RuntimeError, match="after close"):
        sandbox.score([("1", "1")])
