"""The step on data-parallel shares logs what the whole batch gives.

`sapo-megatron train` on the tiny recipe twice, same seeds and data: one rank holding everything, and two
data-parallel ranks each holding its share (its prompts, samples, rewards, log-probs, routing records and
diagnostics inputs; colocated engines, one per rank, each generating its share). The first step starts from
the same weights, so its samples are identical; every number it logs combines the shares' statistics
(sums and counts added, exact order statistics for the quantiles, histogram counts added) and must equal the
one-rank run's: exactly for counts, within fp32 summation order (1e-6) for means over tokens.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "data.prompts_per_step=8",
    "rollout.n_samples=4",
    "algorithm.num_mini_batches=2",
    "trainer.micro_batch_size=4",
    "trainer.sft_warmup_steps=0",
    "trainer.val_prompts=6",
    "trainer.eval_interval=1",
    "trainer.save_interval=0",
    "reward.fn=toy",
]
# Equal in value: counts and means of integers. The rest (rewards, sums over tokens) within TOLERANCE: the
# shares' partial sums add in another order than one sum over the whole batch.
EXACT = ("response/", "rollout/", "weights/", "reward/failures", "reward/exact_frac", "reward/val_exact_frac")
TOLERANCE = 1e-6


def _train(run_dir: Path, nproc: int) -> None:
    command = [
        sys.executable, "-m", "sapo_megatron.cli", "train", str(REPO / "recipes" / "tiny_cpu_sapo.yaml"),
        *OVERRIDES, f"launch.nproc_per_node={nproc}", "trainer.steps=1", f"trainer.run_dir={run_dir}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


def _records(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("sharded")
    for nproc in (1, 2):
        _train(root / f"dp{nproc}", nproc)
    return root / "dp1", root / "dp2"


@pytest.mark.timeout(1500)
def test_two_shares_log_the_whole_batch_numbers(runs):
    one, two = (_records(r, "metrics.jsonl") for r in runs)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1]
    for whole, sharded in zip(one, two):
        keys = {k for k in whole if not k.startswith(("time/", "throughput/"))}
        engine_keys = {k for k in keys | set(sharded) if k.startswith("rollout/engine")}
        assert keys - engine_keys == {k for k in sharded if not k.startswith(("time/", "throughput/"))} - engine_keys
        for key in sorted(keys - engine_keys):
            a, b = whole[key], sharded[key]
            if a is None or b is None:
                assert a is None and b is None, key
            elif key.startswith(EXACT) or key.endswith(("/num_tokens", "/num_seqs")):
                assert a == b, f"step {whole['step']} {key}: {a} vs {b}"
            else:
                assert math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE), f"step {whole['step']} {key}: {a} vs {b}"
    step = two[1]
    # Both engines generated: each rank's share is half of the 8 prompts x 4 samples.
    assert (step["rollout/engine0/samples"], step["rollout/engine1/samples"]) == (16.0, 16.0)
    assert one[1]["rollout/engine0/samples"] == 32.0
    # The routing diagnostics and the quantiles were among the numbers compared.
    for key in ("routing/rollout_vs_old/routing_changed_frac_mean", "routing/old_vs_mb1/routing_overlap_mean",
                "attribution/old_vs_mb1/num_tokens", "routing/expert_load/load_max_over_mean_mean", "ratio/mb1/ratio_p50",
                "mismatch/mismatch_abs_max"):
        assert key in step and key in one[1], key


@pytest.mark.timeout(1500)
def test_two_shares_log_the_whole_batch_histograms(runs):
    one, two = (_records(r, "histograms.jsonl") for r in runs)
    assert [(h["step"], h["name"]) for h in one] == [(h["step"], h["name"]) for h in two]
    filled = {h["name"] for h in one if sum(h["counts"]) + h["underflow"] + h["overflow"] > 0}
    assert {"log_ratio/stable", "mismatch/delta"} <= filled, filled
    for whole, sharded in zip(one, two):
        for key in ("counts", "underflow", "overflow", "nonfinite", "edges"):
            assert whole[key] == sharded[key], f"{whole['name']} step {whole['step']}: {key}"
