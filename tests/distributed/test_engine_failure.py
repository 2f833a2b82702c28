"""An engine that raises inside ``generate`` stops every trainer rank with its traceback, never a hang: the
failure is exchanged in place of the samples, so the ranks waiting in the gather raise too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sapo_megatron.launch import run_torchrun

HERE = Path(__file__).parent


@pytest.mark.distributed
def test_an_engine_that_raises_stops_every_rank_with_its_traceback(tmp_path):
    run_torchrun([str(HERE / "worker_engine_failure.py"), str(tmp_path)], 2, timeout=120).check()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, (one_failed, both_failed, fine) in enumerate(ranks):
        # Call 0: rank 1's engine raised; both ranks raise, with rank 1's traceback down to the raising frame.
        message = one_failed["error"]
        assert message.startswith("generate failed (engine on rank 1: RuntimeError: sampler blew up on call 0)")
        assert "--- traceback of the engine on rank 1 ---" in message
        assert "in sample_inside_vllm" in message and "rank 0 ---" not in message
        # The rank whose engine raised keeps the original exception as the cause.
        assert one_failed["cause"] == ("RuntimeError('sampler blew up on call 0')" if rank == 1 else "None")
        # Call 1: both engines raised; each is named with its own traceback.
        assert "engine on rank 0: RuntimeError: sampler blew up on call 1; engine on rank 1:" in both_failed["error"]
        assert both_failed["error"].count("in sample_inside_vllm") == 2
        # Call 2: the fleet still works: 4 prompts x 2 samples, prompt-major, on every rank.
        assert fine == {"ok": 8, "prompt_index": [0, 0, 1, 1, 2, 2, 3, 3]}
