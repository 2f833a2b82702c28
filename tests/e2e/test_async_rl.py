"""Asynchronous RL end to end (``rollout.max_staleness = k``): real megatron-core trainer ranks and real
``vllm serve`` servers (started by the run on this machine), the next batch generated while the actor trains.

* The schedule, read back from the logged versions over 20 steps: step ``s`` trains on samples generated with the
  weights of step ``max(0, s - 1 - k)``, so every sample's staleness is exactly ``min(s - 1, k)`` and never above
  ``k`` (k = 1: one trainer rank and one server; k = 2: two data-parallel trainer ranks and two servers).
* Resume: a run of 4 steps, then the same command with ``trainer.steps=8``, equals an uninterrupted 8-step run
  number for number (the batches generated ahead are saved with the checkpoint; the next one is generated from
  the checkpoint's weights, as it was in the uninterrupted run).
* Colocated engines are refused with max_staleness > 0, before anything starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]

OVERRIDES = [
    "data.prompts_per_step=4",
    "rollout.n_samples=4",
    "algorithm.num_mini_batches=2",
    "trainer.micro_batch_size=8",
    "trainer.sft_warmup_steps=4",
    "trainer.eval_interval=0",
    "trainer.val_prompts=8",
    "trainer.save_interval=0",
    "trainer.keep_checkpoints=0",
    # A constant rate: a run of 4 steps and one of 8 then share their first steps exactly.
    "optimizer.lr_decay_style=constant",
    "optimizer.lr=1e-3",
    "reward.fn=toy",
    "rollout.mode=remote",
    "rollout.collect_routed_experts=false",
]
# What a resumed run must reproduce exactly (timings are not deterministic).
DETERMINISTIC = ("reward/", "loss/", "ratio/", "mismatch/", "response/", "weights/", "staleness/")


def _train(run_dir: Path, *overrides: str, timeout: float = 600) -> dict[int, dict]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "sapo_megatron.cli", "train", str(REPO / "recipes" / "tiny_cpu_sapo.yaml"),
               *OVERRIDES, *overrides, f"trainer.run_dir={run_dir}"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["step"] > 0}


def _check_schedule(metrics: dict[int, dict], k: int, steps: int, samples: int) -> None:
    assert sorted(metrics) == list(range(1, steps + 1))
    first_actor_version = metrics[1]["weights/actor_version"]
    for step, m in metrics.items():
        actor, oldest = m["weights/actor_version"], m["weights/rollout_version_min"]
        # One push per step: the actor trains step s from version first + s - 1.
        assert actor == first_actor_version + step - 1, step
        stale = min(step - 1, k)
        assert actor - oldest == stale, f"step {step}: samples from version {oldest}, actor at {actor}, k={k}"
        assert m["staleness/max"] == stale and m["staleness/mean"] == stale and m["staleness/token_mean"] == stale
        histogram = [m[f"staleness/samples_{d}"] for d in range(k + 1)]
        assert histogram == [samples if d == stale else 0.0 for d in range(k + 1)], (step, histogram)
        assert m["staleness/samples_over"] == 0.0
        assert m["weights/rollout_version"] == oldest


@pytest.mark.parametrize("k,ranks", [(1, 1), (2, 2)], ids=["k1-one-rank", "k2-two-ranks"])
def test_no_sample_is_staler_than_k_over_twenty_steps(tmp_path, tiny_model_dir, k, ranks):
    layout = [] if ranks == 1 else ["launch.nproc_per_node=2", "parallel.expert=2", "rollout.num_engines=2"]
    metrics = _train(tmp_path / "run", f"rollout.max_staleness={k}", "trainer.steps=20", *layout, timeout=900)
    _check_schedule(metrics, k, steps=20, samples=16)


@pytest.mark.distributed
def test_an_asynchronous_run_resumes_exactly(tmp_path, tiny_model_dir):
    common = ["rollout.max_staleness=2", "launch.nproc_per_node=2", "parallel.expert=2", "trainer.save_interval=4"]
    reference = _train(tmp_path / "uninterrupted", *common, "trainer.steps=8")
    _train(tmp_path / "resumed", *common, "trainer.steps=4")
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step_000004"
    # Each share's leader saved the share's two batches generated ahead (steps 5 and 6).
    assert sorted(p.name for p in (checkpoint / "rank_files").iterdir()) == ["rollouts_ahead_dp0.pt", "rollouts_ahead_dp1.pt"]
    resumed = _train(tmp_path / "resumed", *common, "trainer.steps=8")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        got = {k: v for k, v in resumed[step].items() if k.startswith(DETERMINISTIC)}
        want = {k: v for k, v in reference[step].items() if k.startswith(DETERMINISTIC)}
        assert got == want, f"step {step} differs after resume"



def test_colocated_engines_are_refused_before_anything_starts(tmp_path):
    command = [sys.executable, "-m", "sapo_megatron.cli", "train", str(REPO / "recipes" / "tiny_cpu_sapo.yaml"),
               "rollout.max_staleness=1", f"trainer.run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "rollout.max_staleness=1 needs rollout.mode=remote" in proc.stderr
    assert not (tmp_path / "run").exists()
