"""The RL algorithm core: advantages, policy losses, reductions and metrics, and the behaviour-policy
correction's importance weights, in pure torch.

Nothing here imports Megatron: the losses take [batch, seq] tensors and explicit global counts, so the same
code serves the unit tests, the CPU demo and the parallel actor (whose loss adapter undoes Megatron's own
averaging). See docs/sapo.md for the objective and the design choices.
"""

from sapo_megatron.algorithms.inputs import LOG_RATIO_BOUND
from sapo_megatron.algorithms.advantages import compute_advantages
from sapo_megatron.algorithms.loss import LossOutput, TrainingLoss, training_loss_from_config
from sapo_megatron.algorithms.metrics import METRIC_REDUCTIONS, STD_MEAN_OF, reduce_metrics
from sapo_megatron.algorithms.policy_losses import (
    POLICY_LOSS_FUNCTIONS,
    PolicyLoss,
    cispo_loss,
    clip_loss,
    dual_clip_loss,
    get_policy_loss,
    gspo_loss,
    policy_loss_from_config,
)
from sapo_megatron.algorithms.reductions import aggregate, count_valid_sequences, count_valid_tokens
from sapo_megatron.algorithms.regularizers import RegularizedLoss, kl_penalty, regularized_loss
from sapo_megatron.algorithms.rollout_correction import (
    ROLLOUT_CORRECTION_LEVELS,
    RolloutCorrectionSums,
    rollout_correction_sums,
    rollout_correction_weights,
)
from sapo_megatron.algorithms.sapo import sapo_gate, sapo_gate_weight, sapo_loss

__all__ = [
    "LOG_RATIO_BOUND",
    "LossOutput",
    "METRIC_REDUCTIONS",
    "POLICY_LOSS_FUNCTIONS",
    "PolicyLoss",
    "ROLLOUT_CORRECTION_LEVELS",
    "RegularizedLoss",
    "RolloutCorrectionSums",
    "STD_MEAN_OF",
    "TrainingLoss",
    "aggregate",
    "cispo_loss",
    "clip_loss",
    "compute_advantages",
    "count_valid_sequences",
    "count_valid_tokens",
    "dual_clip_loss",
    "get_policy_loss",
    "gspo_loss",
    "kl_penalty",
    "policy_loss_from_config",
    "reduce_metrics",
    "regularized_loss",
    "rollout_correction_sums",
    "rollout_correction_weights",
    "sapo_gate",
    "sapo_gate_weight",
    "sapo_loss",
    "training_loss_from_config",
]
