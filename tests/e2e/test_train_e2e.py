"""End to end: `sapo-megatron train` on the tiny recipe, two ranks with expert parallelism (EP2, which is
also data parallel for the dense weights), real megatron-core + real vLLM; then a SIGKILL after a checkpoint
and a rerun of the same command, whose following steps must equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]

# Small and fast, but every part of the step runs: 2 mini-batches, micro-batches, validation, checkpoints.
OVERRIDES = [
    "launch.nproc_per_node=2",
    "parallel.expert=2",
    "data.prompts_per_step=4",
    "rollout.n_samples=4",
    "algorithm.num_mini_batches=2",
    "trainer.micro_batch_size=4",
    # A few supervised steps first (exercises the warm-up): the outputs become letters and earn partial credit.
    "trainer.sft_warmup_steps=8",
    "trainer.val_prompts=8",
    "trainer.eval_interval=2",
    "trainer.save_interval=2",
    "trainer.keep_checkpoints=0",
    "optimizer.lr=1e-3",
    # Partial credit: a random model earns some reward, so every step has a non-zero gradient.
    "reward.fn=toy",
    # Phase offload on: the actor's state leaves for every rollout and must come back exactly.
    "optimizer.offload_params=true",
    "optimizer.offload_grads=true",
    "optimizer.offload_optimizer=true",
]


def _command(run_dir: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sapo_megatron.cli",
        "train",
        str(REPO / "recipes" / "tiny_cpu_sapo.yaml"),
        *OVERRIDES,
        f"trainer.steps={steps}",
        f"trainer.run_dir={run_dir}",
    ]


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", PYTHONUNBUFFERED="1")
    return env


def _run(run_dir: Path, steps: int, timeout: float = 600) -> str:
    proc = subprocess.run(
        _command(run_dir, steps), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _metrics(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"each step must be recorded once, in order: {steps}"
    return {r["step"]: r for r in records}


# What a resumed run must reproduce exactly (timings and throughput are not deterministic).
DETERMINISTIC = ("reward/", "loss/", "ratio/", "mismatch/", "response/", "weights/")


def _deterministic(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.startswith(DETERMINISTIC)}


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to the launcher and every rank below it (torchrun runs the ranks in its own session)."""
    import psutil

    try:
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(victims, timeout=60)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    _run(run_dir, steps=4)
    return run_dir


def test_a_run_writes_its_record_changes_the_weights_and_feeds_them_to_the_engine(uninterrupted):
    run_dir = uninterrupted
    metrics = _metrics(run_dir)
    assert sorted(metrics) == [0, 1, 2, 3, 4]
    # The warm-up's sync is version 1; step k's rollout ran on the weights of step k-1's sync (version k):
    # the engine received every version.
    assert [metrics[s]["weights/rollout_version"] for s in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 4.0]
    for step in (1, 2, 3, 4):
        assert metrics[step]["sync/tensors"] > 0 and metrics[step]["loss/grad_norm"] > 0
        # The update moved the policy: the second mini-batch is off-policy (its ratios are not all 1).
        assert metrics[step]["ratio/mb1/ratio_std"] > 0
        # One engine per rank, both generating: 4 prompts x 4 samples, two prompts each.
        assert (metrics[step]["rollout/engine0/samples"], metrics[step]["rollout/engine1/samples"]) == (8.0, 8.0)
        # Both engines sample with the weights the actor recomputes log-probs with (fp32).
        assert metrics[step]["mismatch/mismatch_abs_max"] < 1e-5
    assert {"reward/val_mean"} <= set(metrics[0]) and "reward/val_mean" in metrics[2]
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["weight_version"] == 5
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert checkpoints == ["step_000002", "step_000004"]


def test_sigkill_after_a_checkpoint_then_the_same_command_resumes_identically(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(run_dir, steps=4),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        # Wait until step 3 is under way (step 2 checkpointed and logged), then kill every rank at once.
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and 2 in _metrics(run_dir):
                if (run_dir / "checkpoints" / "latest").exists():
                    break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    finally:
        _kill_tree(proc)

    _run(run_dir, steps=4)
    resumed, reference = _metrics(run_dir), _metrics(uninterrupted)
    assert sorted(resumed) == [0, 1, 2, 3, 4]
    for step in (3, 4):
        assert _deterministic(resumed[step]) == _deterministic(reference[step]), f"step {step} differs after resume"


def test_remote_mode_trains_on_two_vllm_servers_that_serve_each_pushed_version(tmp_path):
    """rollout.mode=remote with two trainer ranks (EP2): the driver starts two real `vllm serve` servers on this
    machine; both generate every step, and every push goes through vLLM's HTTP weight-update API into both."""
    run_dir = tmp_path / "remote"
    overrides = OVERRIDES + ["rollout.mode=remote", "rollout.num_engines=2", "rollout.collect_routed_experts=false"]
    proc = subprocess.run(
        [*_command(run_dir, steps=3)[:5], *overrides, "trainer.steps=3", f"trainer.run_dir={run_dir}"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    metrics = _metrics(run_dir)
    # The warm-up's push is version 1; each step pushes the next.
    assert [metrics[s]["weights/rollout_version"] for s in (1, 2, 3)] == [1.0, 2.0, 3.0]
    for step in (1, 2, 3):
        # 4 prompts x 4 samples, two prompts per server.
        assert (metrics[step]["rollout/engine0/samples"], metrics[step]["rollout/engine1/samples"]) == (8.0, 8.0)
        # The servers sample with exactly the weights the actor recomputes log-probs with (fp32).
        assert metrics[step]["mismatch/mismatch_abs_max"] < 1e-5
        assert metrics[step]["sync/tensors"] > 0
    assert sorted(p.name for p in (run_dir / "servers").iterdir()) == ["server0.log", "server1.log"]
