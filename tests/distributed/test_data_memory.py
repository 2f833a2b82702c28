"""The step's data per rank, measured: a synthetic Qwen3-30B-A3B-shaped step (the recipe's 128 prompts x 16
samples, lengths up to 1,024 + 8,192 tokens, 48 MoE layers, top-8 of 128 experts; no model) built with the
trainer's code in fresh processes, once as one data-parallel rank and once as each of two
(worker_data_memory.py; the ranks need no process group: each builds its own share).

Checks, per rank: the resident memory (VmRSS growth) of the rollout and routing state at DP 2 is at most 0.55
of DP 1's, and within 25 % of the planner's figure (``planner.data_state_bytes`` given the share's real token
totals). In the DP 1 process, the peak of the rollout-vs-old routing diagnostics (on the share's first rows:
they read the records a chunk of rows at a time, so more rows take longer, not more memory) is within 25 % of
the planner's transient.

The processes run one after another (DP 1 holds ~2.6 GB), so the test belongs in a module of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("worker_data_memory.py")
WORKER_TIMEOUT_S = 180
TOLERANCE = 0.25
DP2_OVER_DP1 = 0.55


def _share(rank: int, size: int, *flags: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(WORKER), str(rank), str(size), *flags], capture_output=True,
                          text=True, env=env, timeout=WORKER_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(3 * WORKER_TIMEOUT_S + 30)
def test_data_parallel_share_halves_the_resident_state_and_matches_the_planner():
    whole = _share(0, 1, "--diagnostics")
    halves = [_share(rank, 2) for rank in range(2)]
    for result in [whole, *halves]:
        print(json.dumps(result))
    assert whole["sequences"] == 2048 and [h["sequences"] for h in halves] == [1024, 1024]
    for result in [whole, *halves]:
        measured, planned = result["measured_bytes"], result["planned_bytes"]
        assert abs(measured - planned) <= TOLERANCE * planned, result
    peak, planned = whole["diagnostics_peak_bytes"], whole["diagnostics_planned_bytes"]
    assert abs(peak - planned) <= TOLERANCE * planned, whole
    for half in halves:
        assert half["measured_bytes"] <= DP2_OVER_DP1 * whole["measured_bytes"], (half, whole)
