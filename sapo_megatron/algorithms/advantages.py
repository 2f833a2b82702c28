"""Group-relative advantage estimators: one scalar per response, from the rewards of its prompt's group.

Rewards come as ``[num_prompts * n]`` (the ``n`` responses of a prompt contiguous) or ``[num_prompts, n]``;
the advantages have the same shape. For a group ``R_1..R_n`` with mean ``m``:

* ``grpo``:    ``(R_i - m) / (std + eps)`` with the unbiased (n - 1) standard deviation, as in DeepSeekMath,
  TRL and verl. A single-response group uses std = 0.
* ``dr_grpo``: ``R_i - m`` (Dr. GRPO drops the std division, which up-weights nearly-solved prompts).
* ``rloo``:    ``R_i - mean_{j != i} R_j = n / (n - 1) * (R_i - m)`` (leave-one-out baseline; needs n >= 2).

A group whose rewards are all equal carries no preference and gets advantages of exactly 0 under every
estimator (not a rounding residue of ``R_i - m``).
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from sapo_megatron.algorithms.inputs import check_tensor, compute_dtype, shape_of
from sapo_megatron.config import ADVANTAGE_ESTIMATORS


def compute_advantages(
    rewards: torch.Tensor, group_size: int, estimator: str, eps: float = 1e-6
) -> torch.Tensor:
    """Advantages for ``rewards`` grouped by prompt (``group_size`` responses each); see the module docstring."""
    rewards = check_tensor(rewards, "rewards")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not known; use one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}: must be an integer >= 1 (responses per prompt)")
    if isinstance(eps, bool) or not isinstance(eps, Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps={eps!r}: must be a finite number >= 0")
    if rewards.dim() == 1:
        if rewards.numel() % group_size:
            raise ValueError(
                f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}; "
                f"pass [num_prompts * group_size] rewards with each prompt's responses contiguous"
            )
    elif rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(
                f"rewards has shape {shape_of(rewards)} but group_size={group_size}; "
                f"a 2-D rewards tensor must be [num_prompts, group_size]"
            )
    else:
        raise ValueError(
            f"rewards has shape {shape_of(rewards)}; expected [num_prompts * group_size] or [num_prompts, group_size]"
        )
    if estimator == "rloo" and group_size < 2:
        raise ValueError("estimator='rloo' needs group_size >= 2: the leave-one-out baseline uses the other responses")
    if rewards.is_complex():
        raise ValueError(f"rewards must be real, got dtype {rewards.dtype}")
    dtype = compute_dtype(rewards.dtype) if rewards.is_floating_point() else torch.float32
    grouped = rewards.detach().to(dtype).reshape(-1, group_size)
    bad = int((~torch.isfinite(grouped)).sum())
    if bad:
        raise ValueError(f"rewards has {bad} NaN/inf value(s); every response needs a finite reward")

    mean = grouped.mean(dim=-1, keepdim=True)
    centred = grouped - mean
    if estimator == "grpo":
        std = grouped.std(dim=-1, keepdim=True, correction=1) if group_size > 1 else torch.zeros_like(mean)
        advantages = centred / (std + eps)
    elif estimator == "dr_grpo":
        advantages = centred
    else:
        advantages = centred * (group_size / (group_size - 1))
    uniform = grouped.amax(dim=-1, keepdim=True) == grouped.amin(dim=-1, keepdim=True)
    advantages = torch.where(uniform, grouped.new_zeros(()), advantages)
    return advantages.reshape(rewards.shape)
