"""Bad inputs on their way through the step (docs/demo.md, "Bad input"): non-finite rollout log-probs and empty
responses are kept out of the loss and counted; a prompt longer than the context is refused before generation;
a reward that is not a number is a counted, logged reward failure; malformed data rows are counted skips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sapo_megatron.data.prompts import load_prompts
from sapo_megatron.rewards.sandbox import RewardSandbox
from sapo_megatron.rollout.engine import RolloutEngine
from sapo_megatron.trainer import Rollout, build_train_batch, screen_logprobs


def test_rows_with_nonfinite_rollout_logprobs_and_empty_responses_never_reach_the_loss():
    logprobs, excluded = screen_logprobs([[-0.5, -0.25], [float("nan"), -1.0], [-0.1, float("-inf")], [], [-2.0]])
    assert excluded == [1, 2]
    assert logprobs == [[-0.5, -0.25], [0.0, 0.0], [0.0, 0.0], [], [-2.0]]
    rollout = Rollout(
        prompts=[[5, 6], [5, 6], [9], [9], [9]],
        responses=[[11, 12], [13, 14], [15, 16], [], [17]],
        logprobs_rollout=logprobs,
        rewards=[1.0, 0.0, 0.5, 0.0, 1.0],
        finish_reasons=["eos"] * 5,
        weight_version=1,
        excluded_rows=excluded,
        empty_responses=1,
    )
    batch = build_train_batch(rollout, torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0]), pad_id=0)
    assert batch.loss_mask.sum(1).tolist() == [2, 0, 0, 0, 1]
    assert torch.isfinite(batch.logprobs_rollout).all()
    # The rows that stay are untouched.
    assert batch.logprobs_rollout[0, 1:3].tolist() == [-0.5, -0.25] and batch.logprobs_rollout[4, 0].item() == -2.0
    assert batch.num_valid_tokens() == 3


def test_a_prompt_longer_than_the_context_is_refused_before_generation():
    engine = object.__new__(RolloutEngine)  # only the argument check: no vLLM behind it
    engine.vocab_size, engine.max_model_len, engine.collect_routed_experts = 100, 16, False
    args = dict(n=1, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=0, routed=False)
    assert engine._check_generate_args([[1] * 8], **args) == [[1] * 8]
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\]\): 9 prompt tokens \+ max_new_tokens=8 exceed "
                                         r"max_model_len=16; shorten the prompt or lower max_new_tokens"):
        engine._check_generate_args([[1] * 8, [1] * 9], **args)


def reward_of_any_type(response: str, ground_truth: str):
    """Returns whatever the response names (module level: it runs in a spawned worker)."""
    return {
        "str": "1.0", "none": None, "list": [1.0], "bytes": b"1", "int": 1, "numpy": np.float32(0.5),
        "tensor": torch.tensor(0.25), "inf": math.inf,
    }[response]  # fmt: skip


def test_a_reward_that_is_not_a_number_is_a_counted_failure_with_its_reason():
    items = [(kind, "") for kind in ("int", "str", "numpy", "none", "tensor", "list", "bytes", "inf")]
    with RewardSandbox(reward_of_any_type, timeout_s=30.0, max_workers=1) as sandbox:
        rewards, stats = sandbox.score(items)
    assert rewards == [1.0, 0.0, 0.5, 0.0, 0.25, 0.0, 0.0, 0.0]
    assert (stats.n_items, stats.n_errors, stats.n_timeouts, stats.n_worker_restarts) == (8, 5, 0, 0)
    assert stats.failure_samples == (
        "item 1: TypeError: reward is not a number: '1.0' (str)",
        "item 3: TypeError: reward is not a number: 'None' (NoneType)",
        "item 5: TypeError: reward is not a number: '[1.0]' (list)",
        "item 6: TypeError: reward is not a number: b'1' (bytes)",
        "item 7: reward is not finite: inf",
    )


def test_malformed_data_rows_are_counted_skips_and_the_rest_loads(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "p1", "answer": "1"}\n'
        "{not json\n"
        '["a list"]\n'
        '{"prompt": "", "answer": "2"}\n'
        '{"prompt": "p3", "answer": 3}\n'
        '{"answer": "4"}\n'
        '{"prompt": "a long prompt indeed", "answer": "5"}\n'
        '{"prompt": "p6", "answer": "6"}\n'
    )
    examples, stats = load_prompts(path, count_tokens=lambda text: len(text.split()), max_prompt_length=3)
    assert [e.prompt for e in examples] == ["p1", "p6"]
    assert (stats.n_rows, stats.n_kept) == (8, 2)
    assert dict(stats.skipped) == {
        "invalid_json": 1, "not_an_object": 1, "empty_prompt": 1, "answer_not_string": 1, "missing_prompt": 1,
        "prompt_too_long": 1,
    }  # fmt: skip
