"""The reward function a run scores with (``reward.fn``), as a picklable callable for the sandbox workers."""

from __future__ import annotations

from functools import partial
from typing import Callable

from sapo_megatron.config import Config
from sapo_megatron.data.sources import is_toy_source
from sapo_megatron.rewards.math import math_reward
from sapo_megatron.rewards.toy import toy_reward


def reward_function(cfg: Config) -> Callable[[str, str], float]:
    """A picklable ``(response, answer) -> reward`` for the sandbox workers."""
    name = cfg.reward.fn
    if name == "auto":
        name = "toy" if is_toy_source(cfg.data.train) else "math"
    if name == "toy":
        return toy_reward
    if name == "toy_exact":
        return partial(toy_reward, partial_credit=False)
    return math_reward

