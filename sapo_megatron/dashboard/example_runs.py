"""Synthetic run directories in the trainer's format, to try the dashboard without training and to test it.

The metrics and histograms are computed by the trainer's own step diagnostics
(:class:`~sapo_megatron.diagnostics.step.StepDiagnostics`) and loss functions on random tensors (so every name,
bin and value range is what a run writes), with a train/rollout mismatch and routing changes that grow over
the steps, and routing-changed tokens given a wider log-ratio spread than stable ones::

    python -c "from sapo_megatron.dashboard.example_runs import write_example_run as w; \\
               w('runs/demo_sapo'); w('runs/demo_grpo', policy_loss='clip', seed=1)"
    sapo-megatron dashboard runs/demo_sapo runs/demo_grpo
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sapo_megatron.actor.batch import TrainBatch
from sapo_megatron.algorithms.policy_losses import policy_loss_from_config
from sapo_megatron.config import load_config, save_config
from sapo_megatron.diagnostics.routing_stats import changed_layer_count
from sapo_megatron.diagnostics.run_logger import RunLogger, flatten_metrics, write_custom_scalars_layout
from sapo_megatron.diagnostics.step import StepDiagnostics
from sapo_megatron.routing_layout import softmax_entropy
from sapo_megatron.sharding import DataShare

HISTOGRAM_NAMES = ("log_ratio/stable", "log_ratio/routing_changed", "ratio/adv_pos", "ratio/adv_neg", "mismatch/delta")


def write_example_run(
    run_dir: str | os.PathLike,
    *,
    policy_loss: str = "sapo",
    num_steps: int = 12,
    num_layers: int = 4,
    num_mini_batches: int = 2,
    moe: bool = True,
    seed: int = 0,
) -> Path:
    """Writes ``config.yaml``, ``metrics.jsonl``, ``histograms.jsonl`` and TensorBoard events; returns the dir.

    ``moe=False`` writes a dense-model run: no ``routing/*`` or ``attribution/*`` metrics and no routing split
    of the log-ratio histogram.
    """
    run_dir = Path(run_dir)
    cfg = load_config(
        None,
        [
            f"algorithm.policy_loss={policy_loss}",
            f"algorithm.num_mini_batches={num_mini_batches}",
            f"trainer.run_dir={run_dir}",
        ],
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    loss_fn = policy_loss_from_config(cfg.algorithm)
    write_custom_scalars_layout(run_dir)
    logger = RunLogger(run_dir)

    gen = torch.Generator().manual_seed(seed)
    batch, seq, num_experts, topk = 16, 48, 8, 2

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def perturb(routing: torch.Tensor, prob: float) -> torch.Tensor:
        """Replaces the top-k set of a random ``prob`` share of (token, layer) pairs with another one."""
        fresh = torch.rand(*routing.shape[:3], num_experts, generator=gen).topk(topk, dim=-1).indices
        flip = torch.rand(*routing.shape[:3], 1, generator=gen) < prob
        return torch.where(flip, fresh, routing)

    try:
        for step in range(1, num_steps + 1):
            progress = step / num_steps
            lengths = torch.randint(seq // 3, seq + 1, (batch,), generator=gen)
            mask = torch.arange(seq)[None, :] < lengths[:, None]
            logprobs_rollout = -torch.rand(batch, seq, generator=gen, dtype=torch.float64) * 3
            routing_rollout = torch.rand(batch, seq, num_layers, num_experts, generator=gen).topk(topk, dim=-1).indices
            # Deeper layers flip more often, and more so as training goes on: a visible pattern in the heatmap.
            flip_prob = [0.02 + 0.1 * progress * (layer + 1) / num_layers for layer in range(num_layers)]
            routing_old = torch.stack(
                [perturb(routing_rollout[:, :, layer : layer + 1], p)[:, :, 0] for layer, p in enumerate(flip_prob)],
                dim=2,
            )
            changed_rollout = changed_layer_count(routing_rollout, routing_old, mask).clamp(min=0)
            delta = randn(batch, seq) * 0.01 + randn(batch, seq) * (0.06 * changed_rollout)
            logprobs_old = logprobs_rollout + delta

            metrics: dict[str, float] = {
                "reward/mean": float(0.2 + 0.5 * progress + 0.03 * randn(1)),
            }
            if step % 4 == 0:
                metrics["reward/val_mean"] = float(0.15 + 0.5 * progress + 0.02 * randn(1))
            advantages = randn(batch).sign()
            rows = TrainBatch(tokens=torch.zeros(batch, seq, dtype=torch.long), loss_mask=mask, advantages=advantages,
                              logprobs_rollout=logprobs_rollout, logprobs_old=logprobs_old)
            diag = StepDiagnostics(step, share=DataShare(), num_experts=num_experts if moe else 0, logger=logger)
            metrics |= flatten_metrics(diag.mismatch(rows), "mismatch/")
            if moe:
                # Routers grow more decided as training goes on: sharper logits, lower entropy.
                router_logits = randn(batch, seq, num_layers, num_experts) * (1.0 + 2.0 * progress)
                diag.rollout_vs_old(rows, routing_rollout, routing_old, softmax_entropy(router_logits).float())
            else:
                diag.rollout_vs_old(rows, None, None)

            pg_losses = []
            for k in range(num_mini_batches):
                routing_update = perturb(routing_old, 0.01 + 0.04 * progress) if k > 0 else routing_old
                changed_update = changed_layer_count(routing_old, routing_update, mask).clamp(min=0)
                # The policy drifts from pi_old over the mini-batches; routing-changed tokens drift further.
                log_ratio = randn(batch, seq) * (0.01 + 0.04 * k) + randn(batch, seq) * (0.12 * changed_update)
                logprobs = torch.where(mask, logprobs_old + log_ratio, 0.0)
                loss, loss_metrics = loss_fn(logprobs, logprobs_old, advantages, mask)
                pg_losses.append(float(loss))
                metrics |= flatten_metrics(loss_metrics, f"ratio/mb{k}/")
                diag.update_mini_batch(k, rows, logprobs, routing_old if moe else None, routing_update if moe else None)
            metrics["loss/pg_loss"] = sum(pg_losses) / len(pg_losses)
            metrics["loss/loss"] = metrics["loss/pg_loss"]  # no KL or entropy term, as in the demo recipes
            # The trainer's gradient norm before clipping: ~1, two orders above the loss (no random draw, so
            # the other series do not depend on it).
            metrics["loss/grad_norm"] = 1.6 - 0.8 * progress + 5.0 * abs(metrics["loss/pg_loss"])
            metrics |= diag.finish()  # also writes the step's histograms
            metrics |= {"time/rollout": 4.0 + randn(1).abs().item(), "time/old_logprob": 0.8, "time/update": 2.5,
                        "time/sync": 0.4}
            metrics["time/step"] = sum(metrics[f"time/{p}"] for p in ("rollout", "old_logprob", "update", "sync"))
            logger.log(step, metrics)
    finally:
        logger.close()
    return run_dir
