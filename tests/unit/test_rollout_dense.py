"""The dense control (a Qwen3-MoE config with every layer in mlp_only_layers) runs in the rollout engine and
samples from the same distribution as transformers' model of those weights."""

from __future__ import annotations

import pytest
import torch

from sapo_megatron.config import RolloutConfig
from sapo_megatron.models.tiny import TinyModelSpec, build_tiny_model

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return build_tiny_model(TinyModelSpec(dense=True), cache_dir=tmp_path_factory.mktemp("tiny-dense"))


def test_dense_control_generates_with_the_transformers_distribution(dense_dir):
    from transformers import AutoModelForCausalLM

    from sapo_megatron.rollout.engine import RolloutEngine

    cfg = RolloutConfig(n_samples=3, max_new_tokens=6, temperature=1.0, seed=0, kv_cache_memory_bytes=64 << 20)
    engine = RolloutEngine(dense_dir, cfg, device="cpu", dtype="float32")
    try:
        assert engine.num_moe_layers == 0
        batch = engine.generate([[97, 98, 99, 61], [100, 101, 61]])
    finally:
        engine.close()
    model = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for prompt, response, logprobs in zip(batch.prompt_ids, batch.response_ids, batch.logprobs_rollout):
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
            step = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(response)], dim=-1)
            expected = step.gather(-1, torch.tensor(response)[:, None])[:, 0]
            worst = max(worst, float((expected - torch.tensor(logprobs)).abs().max()))
    assert len(batch) == 6 and all(len(r) > 0 for r in batch.response_ids)
    assert worst < 1e-4
