"""The end of a run: ``summary.json``, the reward curve, and the summary printed for people."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sapo_megatron.diagnostics.run_logger import read_metrics


def summarize(run_dir: Path, *, policy_loss: str, data_source: str, step: int, weight_version: int,
              seconds: float) -> dict:
    """Writes ``summary.json`` and ``reward_curve.png`` of ``run_dir`` from its metrics, prints the summary and
    returns it (call it on the driver)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    val = [(r["step"], r["reward/val_mean"]) for r in records if r.get("reward/val_mean") is not None]
    train_rewards = [r["reward/mean"] for r in records if r.get("reward/mean") is not None]
    step_times = [r["time/step"] for r in records if r.get("time/step") is not None]
    summary = {
        "run_dir": str(run_dir),
        "policy_loss": policy_loss,
        "steps": step,
        "val_reward_first": val[0][1] if val else None,
        "val_reward_last": val[-1][1] if val else None,
        "val_reward_best": max(v for _, v in val) if val else None,
        "train_reward_first": train_rewards[0] if train_rewards else None,
        "train_reward_last": train_rewards[-1] if train_rewards else None,
        "mean_step_seconds": sum(step_times) / len(step_times) if step_times else None,
        "wall_seconds_this_session": seconds,
        "weight_version": weight_version,
    }
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, run_dir / "summary.json")
    plot_reward_curve(records, run_dir / "reward_curve.png", title=f"{policy_loss} on {data_source}")
    print("\n== summary ==", flush=True)
    for key, value in summary.items():
        print(f"  {key:28s} {value:.4f}" if isinstance(value, float) else f"  {key:28s} {value}", flush=True)
    return summary


def plot_reward_curve(records: list[dict], path: Path, *, title: str) -> None:
    # matplotlib takes about a second to import: only at the end of a run, which plots once.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["reward/mean"]) for r in records if r.get("reward/mean") is not None]
    val = [(r["step"], r["reward/val_mean"]) for r in records if r.get("reward/val_mean") is not None]
    if train:
        ax.plot(*zip(*train), label="train (rollout) reward", alpha=0.6)
    if val:
        ax.plot(*zip(*val), marker="o", label="held-out reward")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)

