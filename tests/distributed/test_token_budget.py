"""Token-budget micro-batches (``trainer.max_tokens_per_micro_batch``) give the fixed split's step.

Real megatron-core over gloo, fp32, the tiny Qwen3-MoE, the length-skewed batch of worker_token_budget.py.
In every layout the same two SAPO steps run once with 3 rows per micro-batch and once under a 40-token
budget (micro-batches of different row counts and widths; a 44-token row alone; under DP2 the ranks'
first-fit counts differ and one rank splits a group to agree). Loss, metrics, grad norm, the updated
weights, the log-probs and the routing must agree within 1e-6: every reduction divides by the mini-batch's
global counts, so only the fp32 summation order differs.
"""

from __future__ import annotations

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
        "tp1-pp1-ep1-etp1-dp2-alltoall",  # DP2: the two ranks agree on the micro-batch count
        "tp1-pp2-ep1-etp1-dp1-alltoall",  # PP2: 1F1B with per-micro-batch activation shapes
        "tp1-pp1-ep2-etp1-dp2-alltoall",  # EP2: the all-to-all between ranks with different micro-batches
        "tp2-pp1-ep1-etp2-dp1-alltoall",  # TP2 with sequence parallelism: widths are multiples of 2
    ],
}
REFUSED = "tp1-pp1-ep2-etp1-dp2-allgather"  # run last in the 2-rank job; only the refusal is recorded
LAYOUTS = [layout for layouts in JOBS.values() for layout in layouts]
MINI_BATCHES = (slice(0, 8), slice(8, 16))
TOLERANCE = 1e-6


def _launch(args: list, nproc: int) -> None:
    run_torchrun([str(HERE / "worker_token_budget.py"), *map(str, args)], nproc, timeout=JOB_TIMEOUT_S).check()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Runs the jobs lazily (the single-process one first: it fixes logprobs_old); returns a layout's
    ``(fixed, budget)`` records per rank."""
    out = tmp_path_factory.mktemp("token-budget")
    done: set[int] = set()

    def records(layout: str) -> list[tuple[dict, dict]]:
        for nproc in sorted(JOBS):
            if nproc not in done:
                _launch([out, tiny_model_dir, *JOBS[nproc], *([REFUSED] if nproc == 2 else [])], nproc)
                done.add(nproc)
            if layout in JOBS[nproc]:
                break
        nproc = next(n for n, layouts in JOBS.items() if layout in layouts)
        return [
            (torch.load(out / layout / f"fixed-rank{r}.pt"), torch.load(out / layout / f"budget-rank{r}.pt"))
            for r in range(nproc)
        ]

    records.out = out
    return records


def _kept(mask: torch.Tensor) -> torch.Tensor:
    """Positions up to each row's last loss position: what a token-budget pass computes and returns."""
    last = torch.where(mask, torch.arange(mask.shape[1]), torch.full((), -1)).amax(dim=1)
    return torch.arange(mask.shape[1])[None, :] <= last[:, None]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _assert_values_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # Log-probs of magnitude ~5 have an fp32 ulp of 4.8e-7: 1e-6 relative as well as absolute.
    torch.testing.assert_close(actual, expected, rtol=TOLERANCE, atol=TOLERANCE, msg=lambda m: f"{what}: {m}")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_token_budget_step_equals_fixed_split(runs, layout):
    import sys

    sys.path.insert(0, str(HERE))
    from worker_token_budget import make_batch

    mask = make_batch(0)["loss_mask"]
    kept = _kept(mask)
    for rank, (fixed, budget) in enumerate(runs(layout)):
        what = f"{layout} rank {rank}"
        # The budget really regrouped: micro-batches of several widths, none the full padded width.
        assert budget["micro_rows"] != fixed["micro_rows"], what
        assert len(set(budget["micro_widths"])) > 1 and max(budget["micro_widths"]) < 45, what
        for step in range(2):
            f_metrics, b_metrics = fixed["metrics"][step], budget["metrics"][step]
            assert set(f_metrics) == set(b_metrics), what
            for key, value in f_metrics.items():
                # Relative above 1: ratio_max ~3.7 is exp() of float32 log-probs and carries their relative error.
                assert abs(b_metrics[key] - value) <= TOLERANCE * max(1.0, abs(value)), f"{what} step {step}: {key}"
            assert b_metrics["update_skipped"] == 0.0
            for name, tensor in fixed["weights"][step].items():
                diff = _max_diff(budget["weights"][step][name], tensor)
                assert diff <= TOLERANCE, f"{what} step {step} {name}: weights differ by {diff:.2e}"
            rows = MINI_BATCHES[step]
            step_kept = kept[rows]
            _assert_values_close(
                budget["logprobs_train"][step][step_kept],
                fixed["logprobs_train"][step][step_kept],
                f"{what} step {step}",
            )
            assert torch.equal(budget["routing_train"][step][step_kept], fixed["routing_train"][step][step_kept]), what
            # Past the last loss position a token-budget pass reports nothing.
            assert bool((budget["logprobs_train"][step][~step_kept] == 0).all())
            assert bool((budget["routing_train"][step][~step_kept] == -1).all())
            _assert_values_close(budget["logprobs_after"][step][kept], fixed["logprobs_after"][step][kept], what)
        _assert_values_close(budget["logprobs"][kept], fixed["logprobs"][kept], what)
        _assert_values_close(budget["router_entropy"][kept], fixed["router_entropy"][kept], what)
        assert torch.equal(budget["routing"][kept], fixed["routing"][kept]), what
        assert bool((budget["logprobs"][~kept] == 0).all()) and bool((budget["routing"][~kept] == -1).all())


@pytest.mark.distributed
@pytest.mark.slow
def test_data_parallel_ranks_agree_on_the_micro_batch_count(runs):
    """Under DP2 the ranks' slices of mini-batch A need 3 and 1 micro-batches; the second rank halves its
    costliest group until it has 3 as well."""
    (_, budget0), (_, budget1) = runs("tp1-pp1-ep1-etp1-dp2-alltoall")
    # Rank 0 holds rows 0-3 (lengths 30, 6, 34, 6), rank 1 rows 4-7 (8, 7, 1, 7: one group of 4 x 8 = 32).
    assert budget0["micro_rows"] == [[2], [0], [1, 3]] and budget0["micro_widths"] == [34, 30, 6]
    assert budget1["micro_rows"] == [[0], [1], [2, 3]] and budget1["micro_widths"] == [8, 7, 7]


@pytest.mark.distributed
@pytest.mark.slow
def test_expert_parallel_allgather_dispatcher_is_refused(runs):
    """Expert-parallel ranks with different micro-batch sizes cannot use the allgather dispatcher."""
    runs("tp1-pp1-ep1-etp1-dp2-alltoall")  # the 2-rank job, which ends with this layout
    for rank in range(2):
        error = torch.load(runs.out / REFUSED / f"budget-rank{rank}.pt")["error"]
        assert error is not None and "needs parallel.moe_token_dispatcher=alltoall" in error


LOCAL_LAYOUTS = ["tp1-pp1-ep1-etp1-dp2-alltoall", "tp1-pp1-ep2-etp1-dp2-alltoall"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local", "local-budget"])
@pytest.mark.parametrize("layout", LOCAL_LAYOUTS)
def test_data_parallel_shares_give_the_whole_batch_step(runs, layout, mode):
    """Each rank handed only its share (``local=True``, as the trainer does) gives the step of the whole batch
    split by the actor: loss, metrics, grad norm and weights within 1e-6, and the same log-probs and routing
    for every row (gathered back into batch order by the worker)."""
    import sys

    sys.path.insert(0, str(HERE))
    from worker_token_budget import make_batch

    kept = _kept(make_batch(0)["loss_mask"])
    runs(layout)
    for rank in range(2):
        what = f"{layout} {mode} rank {rank}"
        fixed = torch.load(runs.out / layout / f"fixed-rank{rank}.pt")
        local = torch.load(runs.out / layout / f"{mode}-rank{rank}.pt")
        for step in range(2):
            f_metrics, l_metrics = fixed["metrics"][step], local["metrics"][step]
            assert set(f_metrics) == set(l_metrics), what
            for key, value in f_metrics.items():
                assert abs(l_metrics[key] - value) <= TOLERANCE * max(1.0, abs(value)), f"{what} step {step}: {key}"
            for name, tensor in fixed["weights"][step].items():
                diff = _max_diff(local["weights"][step][name], tensor)
                assert diff <= TOLERANCE, f"{what} step {step} {name}: weights differ by {diff:.2e}"
            step_kept = kept[MINI_BATCHES[step]]
            if step == 0:
                # Mini-batch A replayed the old routing (a record of the replay positions here, the dense tensor
                # in the fixed run): the update's routing, recorded at the loss positions, is that routing.
                step_mask = make_batch(0)["loss_mask"][MINI_BATCHES[step]]
                routing_width = local["routing_train"][step].shape[1]
                assert torch.equal(
                    local["routing_train"][step][step_mask[:, :routing_width]],
                    fixed["routing_train"][step][:, :routing_width][step_mask[:, :routing_width]],
                ), what
            width = local["logprobs_train"][step].shape[1]
            _assert_values_close(
                local["logprobs_train"][step][step_kept[:, :width]],
                fixed["logprobs_train"][step][:, :width][step_kept[:, :width]],
                f"{what} step {step}",
            )
            after_width = local["logprobs_after"][step].shape[1]
            after_kept = kept[:, :after_width]
            _assert_values_close(
                local["logprobs_after"][step][after_kept],
                fixed["logprobs_after"][step][:, :after_width][after_kept],
                what,
            )
        width = local["logprobs"].shape[1]
        k = kept[:, :width]
        assert bool(kept[:, width:].logical_not().all()), "the share's width covers every kept position"
        _assert_values_close(local["logprobs"][k], fixed["logprobs"][:, :width][k], what)
        _assert_values_close(local["router_entropy"][k], fixed["router_entropy"][:, :width][k], what)
        assert torch.equal(local["routing"][k], fixed["routing"][:, :width][k]), what
