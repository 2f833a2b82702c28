"""The actor's SAPO train step is exact and does not depend on the parallel layout.

Real megatron-core over gloo, fp32, the tiny Qwen3-MoE. Four jobs (see worker_actor_step.py), each shared by
all checks: a plain-PyTorch reference (transformers + torch.optim.Adam + clip_grad_norm_, one process that never
imports megatron) that also fixes the batch and ``logprobs_old``; then megatron with 1, 2 and 4 processes,
each running every listed layout in turn. Every run recomputes the log-probs, then takes the trainer's two
mini-batch steps (A, then B, which is off-policy by A's update as well), recomputing log-probs and exporting
the HF weights after each.

What the batch exercises: 16 right-padded rows of 13 tokens (odd, so sequence parallelism pads), uneven
prompt and response lengths, one fully masked row per mini-batch, advantages of both signs, ratios in about
[0.25, 5] (SAPO gate weights below 1/2 on some tokens), 3 rows per micro-batch (several micro-batches per
schedule and padding rows: 8 rows pad to 9, or to 12 over two data-parallel ranks), gradient clipping active
in both steps. Adam runs with ``adam_eps`` far above every gradient entry, so its update is proportional to
the clipped gradient and the weights after a step pin down the gradient's direction; ``grad_norm`` (before
clipping) pins down its scale.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sapo_megatron.launch import run_torchrun

HERE = Path(__file__).parent
JOB_TIMEOUT_S = 300

SINGLE = "tp1-pp1-ep1-etp1-dp1-alltoall"
JOBS = {
    1: [SINGLE],
    2: [
        "tp2-pp1-ep1-etp2-dp1-alltoall",  # TP2 with sequence parallelism; experts split over TP
        "tp1-pp2-ep1-etp1-dp1-alltoall",  # PP2: 1F1B over 3 micro-batches
        # EP2 on two ranks: attention and the other dense weights are data-parallel over the same two ranks.
        "tp1-pp1-ep2-etp1-dp2-alltoall",
        "tp1-pp1-ep2-etp1-dp2-allgather",
        "tp1-pp1-ep1-etp1-dp2-alltoall",  # DP2, experts replicated: the loss scaling, the distributed optimizer
        "tp1-pp1-ep1-etp1-dp2-alltoall-nodistopt",  # DP2 with megatron's plain optimizer
    ],
    4: [
        "tp2-pp2-ep2-etp1-dp1-alltoall",
        "tp1-pp2-ep2-etp1-dp2-alltoall",  # DP2 x PP2, experts split over the data-parallel ranks
    ],
}
LAYOUTS = [layout for layouts in JOBS.values() for layout in layouts]
PARALLEL = [layout for layout in LAYOUTS if layout != SINGLE]
MINI_BATCHES = (slice(0, 8), slice(8, 16))
SAPO = {"tau_pos": 1.0, "tau_neg": 1.05}  # recipes/tiny_cpu_sapo.yaml
# fp32 log-probs of magnitude ~5 are spaced 4.8e-7 apart; megatron differs from transformers, and one layout from
# another, by at most 2 spacings (9.5e-7 measured on every layout); 4 spacings allowed.
LOGPROB_ATOL = 2e-6
# Metrics that are exp() of float32 log-probs of magnitude ~5 (ulp 4.8e-7) carry a relative error as well.
RATIO_METRICS = {"ratio_mean", "ratio_std", "ratio_min", "ratio_max", "gate_mean"}


def _launch(args: list, nproc: int) -> None:
    run_torchrun([str(HERE / "worker_actor_step.py"), *map(str, args)], nproc, timeout=JOB_TIMEOUT_S).check()


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The plain-PyTorch reference run; it also writes the inputs every megatron run reads."""
    out = tmp_path_factory.mktemp("actor-step")
    _launch(["reference", out, tiny_model_dir], 1)
    return out


@pytest.fixture(scope="module")
def megatron_runs(tiny_model_dir, run_dir):
    """Runs the megatron jobs lazily, each at most once per module; returns the ranks' records of a layout."""
    done: set[int] = set()

    def records(layout: str) -> list[dict]:
        nproc = next(n for n, layouts in JOBS.items() if layout in layouts)
        if nproc not in done:
            _launch(["megatron", run_dir, tiny_model_dir, *JOBS[nproc]], nproc)
            done.add(nproc)
        paths = sorted((run_dir / layout).glob("rank*.pt"))
        assert len(paths) == nproc, f"{layout}: {len(paths)} rank records for {nproc} ranks"
        return [torch.load(path) for path in paths]

    return records


@pytest.fixture(scope="module")
def inputs(run_dir) -> dict:
    return torch.load(run_dir / "inputs.pt")


@pytest.fixture(scope="module")
def reference(run_dir) -> dict:
    return torch.load(run_dir / "reference.pt")


@pytest.fixture(scope="module")
def initial_weights(tiny_model_dir) -> dict:
    return load_file(Path(tiny_model_dir) / "model.safetensors")


def _assert_weights_close(weights: dict, expected: dict, before: dict, expected_before: dict, what: str) -> None:
    """Weights within 1e-6 (measured 1.2e-7), and each tensor's update within 1e-4 of the expected update,
    relative to its norm (measured 3.5e-5: expert updates are ~1e-4 per entry on weights of ~2e-2, whose fp32
    spacing is ~2e-9): the absolute check alone would let a wrong expert gradient pass."""
    assert sorted(weights) == sorted(expected), f"{what}: exported names differ"
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=lambda m: f"{what} {name}: {m}")
        update, expected_update = weights[name] - before[name], tensor - expected_before[name]
        scale = float(expected_update.norm())
        if scale == 0:
            assert torch.equal(update, torch.zeros_like(update)), f"{what} {name}: updated, expected untouched"
        else:
            error = float((update - expected_update).norm()) / scale
            assert error < 1e-4, f"{what} {name}: update off by {error:.2e} of its norm"


def _assert_metrics_close(metrics: dict, expected: dict, atol: float, what: str) -> None:
    for key, value in expected.items():
        rtol = 1e-6 if key in RATIO_METRICS or key == "grad_norm" else 0.0
        assert metrics[key] == pytest.approx(value, rel=rtol, abs=atol), f"{what}: {key}"


@pytest.mark.distributed
def test_the_batch_exercises_what_the_tests_claim(inputs, reference):
    """Guards the fixture itself: off-policy ratios, masked rows, both advantage signs, clipping active."""
    from sapo_megatron.config import load_config

    mask, advantages = inputs["loss_mask"], inputs["advantages"]
    cfg = load_config(HERE.parents[1] / "recipes" / "tiny_cpu_sapo.yaml")
    assert (cfg.algorithm.policy_loss, cfg.algorithm.sapo.tau_pos, cfg.algorithm.sapo.tau_neg) == (
        "sapo",
        SAPO["tau_pos"],
        SAPO["tau_neg"],
    )
    assert inputs["tokens"].shape == (16, 13) and inputs["micro_batch_size"] == 3
    for rows, metrics in zip(MINI_BATCHES, reference["metrics"]):
        assert (~mask[rows].any(dim=1)).sum() == 1, "one fully masked row per mini-batch"
        assert (advantages[rows] > 0).any() and (advantages[rows] < 0).any()
        assert len(set(mask[rows].sum(dim=1).tolist())) > 4, "uneven response lengths"
        assert metrics["num_seqs"] == 7 and metrics["num_tokens"] == mask[rows].sum()
        assert metrics["ratio_min"] < 0.5 and metrics["ratio_max"] > 4
        assert metrics["gate_weight_below_half_frac"] > 0
        assert metrics["grad_norm"] > inputs["optimizer"]["clip_grad"], "clipping must be active"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_recomputed_logprobs_match_transformers(megatron_runs, reference, layout):
    """``compute_logprobs`` (vocab-parallel log-probs through the forward-only schedule) against transformers,
    on the initial weights and on the weights after each step."""
    for rank, record in enumerate(megatron_runs(layout)):
        assert record["logprobs"].shape == reference["logprobs"].shape and record["logprobs"].dtype == torch.float32
        # The last position predicts nothing. Log-probs are ~-5 here (fp32 spacing 4.8e-7); measured 9.5e-7.
        torch.testing.assert_close(
            record["logprobs"][..., :-1], reference["logprobs"][..., :-1], rtol=0, atol=LOGPROB_ATOL, msg=f"rank {rank}"
        )


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sapo_inside_the_pipeline_equals_sapo_loss(megatron_runs, inputs, layout):
    """The loss and metrics reduced over micro-batches, pipeline stages and data-parallel ranks equal
    ``sapo_loss`` on the whole mini-batch, evaluated outside megatron on the log-probs the step started from."""
    from sapo_megatron.algorithms import sapo_loss

    for rank, record in enumerate(megatron_runs(layout)):
        for step, rows in enumerate(MINI_BATCHES):
            mask = inputs["loss_mask"][rows]
            loss, expected = sapo_loss(
                record["logprobs"][step][rows],
                inputs["logprobs_old"][rows],
                inputs["advantages"][rows],
                mask,
                **SAPO,
                reduction="seq_mean_token_mean",
                num_global_tokens=int(mask.sum()),
                num_global_seqs=int(mask.any(dim=1).sum()),
            )
            metrics = record["metrics"][step]
            assert set(metrics) == set(expected) | {"loss", "pg_loss", "grad_norm", "update_skipped"}
            assert metrics["update_skipped"] == 0.0
            expected = {key: float(value) for key, value in expected.items()}
            expected["loss"] = expected["pg_loss"] = float(loss)
            _assert_metrics_close(metrics, expected, 1e-6, f"rank {rank} step {step}")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", [SINGLE, "tp1-pp2-ep1-etp1-dp1-alltoall", "tp1-pp1-ep1-etp1-dp2-alltoall"])
def test_update_matches_plain_pytorch(megatron_runs, reference, initial_weights, layout):
    """Megatron's step (schedule, loss adapter, DDP, optimizer, clipping) against transformers + torch Adam with
    ``loss = sapo_loss`` and ``clip_grad_norm_`` on the same weights and batch. Megatron's MoE aux loss is off
    (load balancing 'none') and transformers adds none without ``output_router_logits``: no router term differs."""
    for rank, record in enumerate(megatron_runs(layout)):
        before, expected_before = initial_weights, initial_weights
        for step in range(2):
            what = f"rank {rank} step {step}"
            # A different loss value here would mean different log-probs in the step, not a reduction issue.
            # Measured: loss within 2.7e-7, grad_norm within 2.6e-7 relative.
            assert record["metrics"][step]["loss"] == pytest.approx(reference["metrics"][step]["loss"], abs=1e-6)
            assert record["metrics"][step]["grad_norm"] == pytest.approx(
                reference["metrics"][step]["grad_norm"], rel=1e-6
            ), what
            _assert_weights_close(record["weights"][step], reference["weights"][step], before, expected_before, what)
            before, expected_before = record["weights"][step], reference["weights"][step]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", PARALLEL)
def test_parallel_layout_matches_single_process(megatron_runs, initial_weights, layout):
    (single,) = megatron_runs(SINGLE)
    for rank, record in enumerate(megatron_runs(layout)):
        # Measured 9.5e-7 (2 fp32 spacings at ~-5); metrics within 1.5e-7 (ratios 4.9e-7 relative).
        torch.testing.assert_close(
            record["logprobs"], single["logprobs"], rtol=0, atol=LOGPROB_ATOL, msg=f"rank {rank}"
        )
        before, single_before = initial_weights, initial_weights
        for step in range(2):
            what = f"rank {rank} step {step}"
            _assert_metrics_close(record["metrics"][step], single["metrics"][step], 1e-6, what)
            _assert_weights_close(record["weights"][step], single["weights"][step], before, single_before, what)
            before, single_before = record["weights"][step], single["weights"][step]
