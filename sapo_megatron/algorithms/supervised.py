"""Supervised negative log-likelihood with the policy losses' contract, for the optional warm-up stage.

Some verifiable tasks give a randomly initialised model no reward at all, so RL has no signal to start
from. A few supervised steps on (prompt, answer) pairs bring the policy to where a rollout is sometimes
right; from there RL does the rest. The function has the same signature as the policy losses so the
actor runs it through the same pipeline loss function.
"""

from __future__ import annotations

from typing import Optional

import torch

from sapo_megatron.algorithms.inputs import Count
from sapo_megatron.algorithms.reductions import aggregate


def nll_loss(
    logprobs: torch.Tensor,
    logprobs_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_global_tokens: Optional[Count] = None,
    num_global_seqs: Optional[Count] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean NLL of the masked (answer) tokens; ``logprobs_old`` and ``advantages`` are ignored."""
    valid = mask.bool()
    loss = -aggregate(logprobs, valid, "token_mean", num_global_tokens=num_global_tokens)
    metrics = {
        "num_tokens": valid.sum().to(logprobs.dtype).detach(),
        "num_seqs": valid.any(dim=-1).sum().to(logprobs.dtype).detach(),
    }
    return loss, metrics
