"""Rewards for the toy tasks: exact match, or partial credit per correct position."""

from __future__ import annotations


def toy_reward(response: str, answer: str, *, partial_credit: bool = True) -> float:
    """1.0 for the exact answer; otherwise (with partial credit) half the fraction of right characters.

    Partial credit is capped at 0.5 so that only exact answers can push the mean reward above 0.5.
    Positions are compared one to one; a longer or shorter response is penalised by the length of the
    longer string in the denominator.
    """
    if response == answer:
        return 1.0
    if not partial_credit or not answer:
        return 0.0
    hits = sum(1 for a, b in zip(response, answer) if a == b)
    return 0.5 * hits / max(len(response), len(answer))
