"""Rollout generation on vLLM engines (CPU and GPU): token ids in, responses with rollout log-probs out.

Importing this package does not import vLLM; the engine imports it when it is built.
"""

from sapo_megatron.rollout.engine import RolloutBatch, RolloutEngine
from sapo_megatron.rollout.weight_transfer import checkpoint_schema

__all__ = ["RolloutBatch", "RolloutEngine", "checkpoint_schema"]
