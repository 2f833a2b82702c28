"""Everything Megatron: parallel state, model build (via the bridge), log-probs, the train step, checkpoints,
and the one CPU-compatibility layer for megatron-core.

Submodules import megatron-core; import them directly (``from sapo_megatron.actor.model import ...``) so
that importing this package stays cheap.
"""
