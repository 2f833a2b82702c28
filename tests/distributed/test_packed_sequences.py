"""Packed token-budget micro-batches (``trainer.pack_sequences``) give the padded micro-batches' step.

worker_packed_sequences.py runs the trainer's sequence (old log-probs with entropy, routing and router entropy;
mini-batch A replaying the old routing; mini-batch B; the log-probs after) on worker_token_budget's length-skewed
batch, once with each token-budget micro-batch padded to its longest row and once packed into one row with
megatron-core's THD ``packed_seq_params`` (40-token budget).

On CPU (fp32, megatron-core over gloo) the attention of the packed runs is megatron's local attention run once per
``cu_seqlens`` segment (the worker's ``ThdReferenceAttention``; megatron's local attention itself refuses packed
sequences, and so does the actor, which is checked too). Everything else is the real path: packing, per-segment
RoPE, unpacking before the loss, routing record and replay in packed order, sequence parallelism over the packed
row (TP2), per-micro-batch activation shapes (PP2), expert-parallel all-to-all between ranks with different packed
lengths and data-parallel shares (EP2 x DP2, ``local=True`` as the trainer). Loss, metrics, grad norm, weights,
log-probs, entropy and router entropy agree within 1e-6, routing exactly: only the fp32 summation order differs.

On one GPU (``gpu`` mark) the packed runs use Transformer Engine's own THD attention in bf16, through the config
switch; the tolerances there are bf16's (see :data:`GPU_TOLERANCE`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sapo_megatron.launch import run_torchrun

HERE = Path(__file__).parent
JOB_TIMEOUT_S = 420
SINGLE = "tp1-pp1-ep1-etp1-dp1-alltoall"
JOBS = {
    1: [SINGLE],
    2: [
        "tp2-pp1-ep1-etp2-dp1-alltoall",  # TP2 + sequence parallelism: each rank routes half of the packed row
        "tp1-pp2-ep1-etp1-dp1-alltoall",  # PP2: 1F1B exchanges [packed length, 1, hidden] activations
        "tp1-pp1-ep2-etp1-dp2-alltoall",  # EP2 x DP2: ranks with different packed micro-batches meet in all-to-all
    ],
}
LAYOUTS = [layout for layouts in JOBS.values() for layout in layouts]
MINI_BATCHES = (slice(0, 8), slice(8, 16))
TOLERANCE = 1e-6
# bf16 on a GPU, TE's THD kernel against its padded (sbhd) kernel, and GEMMs of other shapes: every activation is
# rounded to bf16 (8 mantissa bits, relative 3.9e-3) after a different summation order. On the tiny model (logits
# < 1) two bf16 implementations differ by 4.4e-3 in log-probs (test_bf16_fidelity, CPU); a flipped near-tied
# routing decision in the free-routing passes moves the tokens after it further. Log-probs absolute (mean and max
# over the kept positions), loss absolute (|loss| ~ 0.1 here), grad norm relative, routing as the fraction of kept
# (token, MoE layer) top-k sets that agree. Chosen from those numbers, not measured: this test has not yet run.
GPU_TOLERANCE = {"logprob_mean": 1e-2, "logprob_max": 0.1, "loss_abs": 1e-2, "grad_norm_rel": 3e-2, "routing": 0.9}


def _launch(out: Path, hf_dir, device: str, layouts: list, nproc: int) -> None:
    args = [str(HERE / "worker_packed_sequences.py"), str(out), str(hf_dir), device, *layouts]
    run_torchrun(args, nproc, timeout=JOB_TIMEOUT_S).check()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Runs the CPU jobs lazily; returns a layout's ``(padded, packed)`` records per rank (``local=True`` with
    ``local=True``)."""
    out = tmp_path_factory.mktemp("packed-sequences")
    done: set[int] = set()

    def records(layout: str, local: bool = False) -> list[tuple[dict, dict]]:
        nproc = next(n for n, layouts in JOBS.items() if layout in layouts)
        if nproc not in done:
            _launch(out, tiny_model_dir, "cpu", JOBS[nproc], nproc)
            done.add(nproc)
        prefix = "local-" if local else ""
        return [
            (torch.load(out / layout / f"{prefix}budget-rank{r}.pt"), torch.load(out / layout / f"{prefix}packed-rank{r}.pt"))
            for r in range(nproc)
        ]

    records.out = out
    return records


def _kept(mask: torch.Tensor) -> torch.Tensor:
    """Positions up to each row's last loss position: what a token-budget pass computes and returns."""
    last = torch.where(mask, torch.arange(mask.shape[1]), torch.full((), -1)).amax(dim=1)
    return torch.arange(mask.shape[1])[None, :] <= last[:, None]


def _batch_mask() -> torch.Tensor:
    sys.path.insert(0, str(HERE))
    from worker_token_budget import make_batch

    return make_batch(0)["loss_mask"]


def _close(actual: torch.Tensor, expected: torch.Tensor, kept: torch.Tensor, what: str) -> None:
    # Widths may differ (a share is cut to its own longest row): compare the common width; nothing kept lies beyond.
    width = min(actual.shape[1], expected.shape[1])
    assert not bool(kept[:, width:].any()), what
    k = kept[:, :width]
    # Log-probs of magnitude ~5 have an fp32 ulp of 4.8e-7: 1e-6 relative as well as absolute.
    torch.testing.assert_close(
        actual[:, :width][k], expected[:, :width][k], rtol=TOLERANCE, atol=TOLERANCE, msg=lambda m: f"{what}: {m}"
    )


def _same_routing(actual: torch.Tensor, expected: torch.Tensor, kept: torch.Tensor, what: str) -> None:
    width = min(actual.shape[1], expected.shape[1])
    k = kept[:, :width]
    assert torch.equal(actual[:, :width][k], expected[:, :width][k]), what


def _assert_same_step(padded: dict, packed: dict, kept: torch.Tensor, what: str) -> None:
    for step in range(2):
        p_metrics, k_metrics = padded["metrics"][step], packed["metrics"][step]
        assert set(p_metrics) == set(k_metrics), what
        for key, value in p_metrics.items():
            # Relative above 1: ratio_max ~3.7 is exp() of float32 log-probs and carries their relative error.
            assert abs(k_metrics[key] - value) <= TOLERANCE * max(1.0, abs(value)), f"{what} step {step}: {key}"
        assert k_metrics["update_skipped"] == 0.0
        for name, tensor in padded["weights"][step].items():
            diff = float((packed["weights"][step][name].double() - tensor.double()).abs().max())
            assert diff <= TOLERANCE, f"{what} step {step} {name}: weights differ by {diff:.2e}"
        step_kept = kept[MINI_BATCHES[step]]
        _close(packed["logprobs_train"][step], padded["logprobs_train"][step], step_kept, f"{what} step {step}")
        _same_routing(packed["routing_train"][step], padded["routing_train"][step], step_kept, f"{what} step {step}")
        _close(packed["logprobs_after"][step], padded["logprobs_after"][step], kept, f"{what} after step {step}")
    for key in ("logprobs", "entropy", "router_entropy"):
        _close(packed[key], padded[key], kept, f"{what} {key}")
    _same_routing(packed["routing"], padded["routing"], kept, f"{what} routing")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_step_equals_padded_step(runs, layout):
    mask = _batch_mask()
    kept = _kept(mask)
    for rank, (padded, packed) in enumerate(runs(layout)):
        what = f"{layout} rank {rank}"
        # Really packed: every micro-batch is one row, and fewer of them than padded ones hold the same rows.
        assert all(rows == 1 for rows, _ in packed["micro_shapes"]), what
        assert len(packed["micro_shapes"]) < len(padded["micro_shapes"]), what
        assert max(n for _, n in packed["micro_shapes"]) <= 40, what
        _assert_same_step(padded, packed, kept, what)
        # Past the last loss position a packed pass reports nothing, as a padded token-budget pass.
        assert bool((packed["logprobs"][~kept] == 0).all()) and bool((packed["routing"][~kept] == -1).all())


@pytest.mark.distributed
@pytest.mark.slow
def test_packed_data_parallel_shares_give_the_padded_shares_step(runs):
    """Each rank handed only its share (``local=True``, routing as compact records, as the trainer does)."""
    kept = _kept(_batch_mask())
    for rank, (padded, packed) in enumerate(runs("tp1-pp1-ep2-etp1-dp2-alltoall", local=True)):
        assert all(rows == 1 for rows, _ in packed["micro_shapes"]), rank
        _assert_same_step(padded, packed, kept, f"local rank {rank}")


@pytest.mark.distributed
@pytest.mark.slow
def test_local_attention_is_refused(runs):
    """megatron's local attention cannot take cu_seqlens: the actor refuses packing before any forward."""
    runs(SINGLE)
    error = torch.load(runs.out / "refused-rank0.pt")["error"]
    assert error is not None and "trainer.pack_sequences=true needs Transformer Engine's attention" in error


@pytest.mark.gpu
@pytest.mark.slow
def test_packed_step_on_gpu_with_transformer_engine(tiny_model_dir, tmp_path):
    """One GPU, Transformer Engine's layer spec, bf16: compute_logprobs and two train_mini_batch steps, padded and
    packed through ``trainer.pack_sequences=true``, agree within :data:`GPU_TOLERANCE`."""
    pytest.importorskip("transformer_engine")
    _launch(tmp_path, tiny_model_dir, "cuda", [SINGLE], 1)
    padded = torch.load(tmp_path / SINGLE / "budget-rank0.pt")
    packed = torch.load(tmp_path / SINGLE / "packed-rank0.pt")
    kept = _kept(_batch_mask())
    assert all(rows == 1 for rows, _ in packed["micro_shapes"])
    assert len(packed["micro_shapes"]) < len(padded["micro_shapes"])
    tol = GPU_TOLERANCE

    def logprobs_close(actual, expected, k, what):
        width = min(actual.shape[1], expected.shape[1])
        diff = (actual[:, :width][k[:, :width]].double() - expected[:, :width][k[:, :width]].double()).abs()
        assert float(diff.mean()) <= tol["logprob_mean"] and float(diff.max()) <= tol["logprob_max"], (
            f"{what}: mean {float(diff.mean()):.3e}, max {float(diff.max()):.3e}"
        )

    def routing_agrees(actual, expected, k, what):
        width = min(actual.shape[1], expected.shape[1])
        a, b = actual[:, :width][k[:, :width]], expected[:, :width][k[:, :width]]
        same = (a.sort(dim=-1).values == b.sort(dim=-1).values).all(dim=-1).double().mean()
        assert float(same) >= tol["routing"], f"{what}: {float(same):.4f} of the top-k sets agree"

    logprobs_close(packed["logprobs"], padded["logprobs"], kept, "old log-probs")
    logprobs_close(packed["entropy"], padded["entropy"], kept, "entropy")
    routing_agrees(packed["routing"], padded["routing"], kept, "old routing")
    for step in range(2):
        p, k = padded["metrics"][step], packed["metrics"][step]
        assert k["update_skipped"] == p["update_skipped"] == 0.0
        assert abs(k["loss"] - p["loss"]) <= tol["loss_abs"], (step, k["loss"], p["loss"])
        assert abs(k["grad_norm"] - p["grad_norm"]) <= tol["grad_norm_rel"] * p["grad_norm"], (step, k, p)
        step_kept = kept[MINI_BATCHES[step]]
        logprobs_close(packed["logprobs_train"][step], padded["logprobs_train"][step], step_kept, f"step {step}")
        if step == 0:
            # Mini-batch A replayed the same routing in both runs: the update routed with it exactly.
            _same_routing(packed["routing_train"][0], padded["routing_train"][0], step_kept, "replayed routing")
        logprobs_close(packed["logprobs_after"][step], padded["logprobs_after"][step], kept, f"after step {step}")
