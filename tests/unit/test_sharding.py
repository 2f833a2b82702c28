"""Data-parallel shares: which prompts a rank holds, and the exact combinations of per-share numbers."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sapo_megatron.config import ConfigError, load_config
from sapo_megatron.diagnostics.mismatch import ratio_quantiles
from sapo_megatron.diagnostics.run_logger import (
    HISTOGRAM_RECORD_KEYS,
    histogram_record,
    histogram_summary,
    merge_histogram_summaries,
)
from sapo_megatron.launch import free_port
from sapo_megatron.sharding import DataShare


def test_each_share_holds_its_block_of_every_mini_batch():
    # 16 prompts, 4 mini-batches of 4, 2 ranks: rank 0 holds prompts 0-1, 4-5, 8-9, 12-13.
    shares = [DataShare(rank=d, size=2).prompt_indices(16, 4) for d in range(2)]
    assert shares[0] == [0, 1, 4, 5, 8, 9, 12, 13]
    assert shares[1] == [2, 3, 6, 7, 10, 11, 14, 15]
    # Together: every prompt once. Per mini-batch the ranks' blocks are the actor's contiguous row split.
    for prompts, mini_batches, size in [(16, 4, 2), (24, 2, 3), (8, 1, 8), (128, 4, 32)]:
        parts = [DataShare(rank=d, size=size).prompt_indices(prompts, mini_batches) for d in range(size)]
        assert sorted(i for p in parts for i in p) == list(range(prompts))
        per = prompts // mini_batches
        for k in range(mini_batches):
            blocks = [p[k * per // size : (k + 1) * per // size] for p in parts]
            assert [i for b in blocks for i in b] == list(range(k * per, (k + 1) * per))


def test_one_share_holds_everything_and_a_split_group_is_refused():
    assert DataShare().prompt_indices(6, 4) == list(range(6))
    with pytest.raises(ValueError, match="multiple of 8"):
        DataShare(rank=0, size=2).prompt_indices(12, 4)


def test_config_refuses_prompts_that_do_not_split_over_the_ranks():
    with pytest.raises(ConfigError, match=r"data.prompts_per_step=6: .* multiple of 8"):
        load_config(None, ["launch.nproc_per_node=2", "data.prompts_per_step=6", "algorithm.num_mini_batches=4"]).validate()
    load_config(None, ["launch.nproc_per_node=2", "data.prompts_per_step=8", "algorithm.num_mini_batches=4"]).validate()


def test_held_out_blocks_cover_every_prompt_once():
    for items in range(0, 11):
        blocks = [DataShare(rank=d, size=3).block(items) for d in range(3)]
        assert [i for b in blocks for i in b] == list(range(items))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_merged_histograms_equal_the_histogram_of_all_values():
    generator = torch.Generator().manual_seed(7)
    values = torch.randn(1000, generator=generator) * 0.3
    values[5] = float("nan")
    edges = torch.linspace(-0.5, 0.5, 101)
    parts = [histogram_summary(3, "log_ratio/stable", chunk, edges) for chunk in values.split([400, 0, 600])]
    merged = merge_histogram_summaries(parts)
    whole = histogram_summary(3, "log_ratio/stable", values, edges)
    for key in ("counts", "underflow", "overflow", "nonfinite", "num", "min", "max"):
        assert merged[key] == whole[key], key
    assert merged["sum"] == pytest.approx(whole["sum"], rel=1e-12)
    # What histograms.jsonl receives is exactly the whole batch's record.
    assert {k: merged[k] for k in HISTOGRAM_RECORD_KEYS} == histogram_record(3, "log_ratio/stable", values, edges)
    with pytest.raises(ValueError, match="edges must be the same"):
        merge_histogram_summaries([parts[0], histogram_summary(3, "log_ratio/stable", values, torch.linspace(0, 1, 5))])


def _quantile_worker(rank: int, port: int, logprobs, old, mask, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = slice(0, 3) if rank == 0 else slice(3, None)
        quantiles = ratio_quantiles(logprobs[rows], old[rows], mask[rows], qs=(0.0, 0.01, 0.25, 0.5, 0.9, 0.999, 1.0),
                                    group=dist.group.WORLD)
        share = DataShare(rank=rank, size=2, group=dist.group.WORLD)
        summed = share.sum_tensors({"count": mask[rows].sum(), "per_row": mask[rows].sum(1).double()[:2]})
        out[rank] = ({k: float(v) for k, v in quantiles.items()}, share.sum(1.5, rank), share.max(rank, -rank),
                     {k: v.tolist() for k, v in summed.items()})
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_quantiles_over_two_shares_are_the_exact_quantiles_of_all_tokens():
    """Two processes, each holding some rows: the bisection over bit patterns finds exactly the order
    statistics, so the quantiles equal those computed over all the rows in one process, bit for bit."""
    generator = torch.Generator().manual_seed(3)
    logprobs = torch.randn(7, 11, generator=generator) * 0.2 - 2.0
    old = logprobs + torch.randn(7, 11, generator=generator) * 0.05
    mask = torch.rand(7, 11, generator=generator) > 0.3
    mask[3:5] = False  # the second share holds two fully masked rows
    old[0, 0] = logprobs[0, 0]  # a ratio of exactly 1
    expected = {k: float(v) for k, v in ratio_quantiles(
        logprobs, old, mask, qs=(0.0, 0.01, 0.25, 0.5, 0.9, 0.999, 1.0)).items()}
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_quantile_worker, args=(free_port(), logprobs, old, mask, out), nprocs=2, join=True)
        results = dict(out)
    for rank in range(2):
        quantiles, sums, maxima, summed = results[rank]
        assert quantiles == expected
        assert sums == (3.0, 1.0) and maxima == (1.0, 0.0)
        assert summed["count"] == int(mask.sum())
        assert summed["per_row"] == (mask[0:2].sum(1) + mask[3:5].sum(1)).double().tolist()
