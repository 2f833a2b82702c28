"""One data-parallel rank's share of a synthetic Qwen3-30B-A3B-shaped step, in a fresh process; see
test_data_memory.py.

Builds the share's rollout state with the trainer's code (``Rollout`` -> ``build_train_batch``, the old-pass
log-probs, ``RoutingRecord`` s of the response positions) at the recipe's batch, lengths, MoE layers and top-k,
measures how much the process's resident memory (VmRSS) grew, and the peak of the rollout-vs-old routing
diagnostics on the share's first rows; prints one JSON line with both and the planner's figures for the same
token totals.

    python worker_data_memory.py RANK DATA_PARALLEL [--diagnostics]
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys

import torch

from sapo_megatron.algorithms import compute_advantages
from sapo_megatron.diagnostics.attribution import routing_variance_stats
from sapo_megatron.diagnostics.routing_stats import expert_load_stats, routing_change_stats
from sapo_megatron.planner import data_state_bytes
from sapo_megatron.routing_layout import POSITION_DTYPE, RoutingRecord
from sapo_megatron.sharding import DataShare
from sapo_megatron.trainer import Rollout, build_train_batch

# The recipe (recipes/qwen3_30b_a3b_sapo.yaml) and Qwen3-30B-A3B, except the model itself, which this step
# never runs: the data's sizes do not depend on it beyond the vocabulary, the MoE layers and k.
PROMPTS, SAMPLES, NUM_MINI_BATCHES = 128, 16, 4
MAX_PROMPT, MAX_RESPONSE = 1024, 8192
VOCAB, MOE_LAYERS, TOPK, EXPERTS = 151_936, 48, 8, 128
# Lengths: prompts uniform in [32, 1024] (514 on average with this seed); responses 2 % truncated at 8192, the
# rest 1 + an exponential of mean 1024 (under 8192): 1,139 on average with this seed. Uniform in [1, 8192]
# would put ~6.4 GB of routing records in the DP1 process, on a machine shared with other test runs.
TRUNCATED_FRACTION, RESPONSE_MEAN = 0.02, 1024.0
SEED = 20261207
# The diagnostics' peak is measured on the share's first rows: at this width (~9,200 positions x 48 x 8 ids
# a row) diagnostics.routing_stats densifies 4 rows at a time, so 4 rows reach the peak that any number of rows
# reaches (more rows take longer, ~13 s for 4 on a loaded 2-core machine, not more memory).
DIAGNOSTIC_ROWS = 4


def lengths() -> tuple[list[int], list[int]]:
    """Prompt length per prompt and response length per sample of the whole step (the same in every process)."""
    gen = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(32, MAX_PROMPT + 1, (PROMPTS,), generator=gen)
    rows = PROMPTS * SAMPLES
    response = 1 + torch.empty(rows).exponential_(1 / RESPONSE_MEAN, generator=gen).floor()
    response = response.clamp(max=MAX_RESPONSE - 1)
    truncated = torch.rand(rows, generator=gen) < TRUNCATED_FRACTION
    response = torch.where(truncated, MAX_RESPONSE, response.long())
    return prompt.tolist(), response.tolist()


def random_routing(tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Expert ids uint8 ``[tokens, MOE_LAYERS, TOPK]``, each token's k distinct (a random first expert, then every
    EXPERTS/k-th one), as a router's top-k is, so the diagnostics accept them."""
    first = torch.randint(0, EXPERTS, (tokens, MOE_LAYERS, 1), dtype=torch.uint8, generator=gen)
    spread = torch.arange(0, EXPERTS, EXPERTS // TOPK, dtype=torch.uint8)
    ids = first + spread  # uint8 wraps modulo 256, a multiple of EXPERTS
    ids.bitwise_and_(EXPERTS - 1)
    return ids


def response_record(loss_mask: torch.Tensor, gen: torch.Generator) -> RoutingRecord:
    """A routing record of the response positions (the loss mask), as the diagnostics-only records hold."""
    positions = loss_mask.nonzero()[:, 1].to(POSITION_DTYPE)
    offsets = torch.zeros(loss_mask.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = loss_mask.sum(dim=1).cumsum(0)
    return RoutingRecord(random_routing(positions.numel(), gen), positions, offsets, EXPERTS)


def settled_rss() -> int:
    """VmRSS once garbage is collected and malloc has given its free pages back: glibc keeps up to ~64 MiB of
    freed temporaries (its dynamic trim threshold) resident otherwise, whatever the share's size."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status("VmRSS")


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def build_share(rank: int, size: int, prompt_lengths: list[int], response_lengths: list[int], gen):
    """The share's step state, as the trainer holds it through the step."""
    indices = DataShare(rank=rank, size=size).prompt_indices(PROMPTS, NUM_MINI_BATCHES)
    prompts, responses, logprobs, finish = [], [], [], []
    for p in indices:
        # Fixed per prompt, so each sample of a group carries the same prompt (its own copy, as after pickle).
        prompt_tokens = torch.randint(0, VOCAB, (prompt_lengths[p],), generator=torch.Generator().manual_seed(p))
        for s in range(SAMPLES):
            n = response_lengths[p * SAMPLES + s]
            prompts.append(prompt_tokens.tolist())
            responses.append(torch.randint(0, VOCAB, (n,), generator=gen).tolist())
            logprobs.append((-torch.rand(n, generator=gen) * 3).tolist())
            finish.append("length" if n == MAX_RESPONSE else "stop")
    rewards = (torch.rand(len(responses), generator=gen) < 0.5).float().tolist()
    rollout = Rollout(prompts=prompts, responses=responses, logprobs_rollout=logprobs, rewards=rewards,
                      finish_reasons=finish, weight_version=0)  # fmt: skip
    advantages = compute_advantages(torch.tensor(rewards), SAMPLES, "grpo")
    batch = build_train_batch(rollout, advantages, pad_id=0)
    # The old pass's log-probs, [b, S] float32 like the actor's.
    noise = 0.01 * torch.randn(batch.logprobs_rollout.shape, generator=gen)
    batch = batch.with_(logprobs_old=batch.logprobs_rollout + noise)
    del noise
    routing_rollout = response_record(batch.loss_mask, gen)
    routing_old = response_record(batch.loss_mask, gen)
    # One update mini-batch's: the share's first 1/K of rows (its block of mini-batch 0).
    routing_update = response_record(batch.loss_mask[: batch.size // NUM_MINI_BATCHES], gen)
    return rollout, batch, (routing_rollout, routing_old, routing_update)


def exact_allocator() -> ctypes.CDLL:
    """glibc malloc from now on maps every block of 64 KiB or more on its own and unmaps it when freed, so that
    the resident size follows what is allocated: by default it keeps freed blocks (up to its dynamic 32 MiB
    threshold) for reuse, and a second call of the same function then seems to need nothing."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    assert libc.mallopt(m_mmap_threshold, 64 * 1024) == 1 and libc.mallopt(m_trim_threshold, 0) == 1
    return libc


def rollout_vs_old(batch, routing_rollout: RoutingRecord, routing_old: RoutingRecord) -> None:
    """The routing diagnostics of diagnostics.step.StepDiagnostics.rollout_vs_old, in its order."""
    mask = batch.loss_mask
    expert_load_stats(routing_old, mask, EXPERTS)
    routing_change_stats(routing_rollout, routing_old, mask)
    delta = torch.where(mask, batch.logprobs_old - batch.logprobs_rollout, 0.0)
    routing_variance_stats(delta, mask, routing_rollout, routing_old)


def diagnostics_peak(batch, routing_rollout: RoutingRecord, routing_old: RoutingRecord, libc: ctypes.CDLL) -> int:
    """Peak resident growth of the rollout-vs-old diagnostics on the share's first DIAGNOSTIC_ROWS rows."""
    rows = slice(0, DIAGNOSTIC_ROWS)
    part = batch.select(rows)
    a, b = routing_rollout.select(rows), routing_old.select(rows)
    gc.collect()
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = status("VmRSS")
    rollout_vs_old(part, a, b)
    return status("VmHWM") - base


def main() -> None:
    rank, size = int(sys.argv[1]), int(sys.argv[2])
    with_diagnostics = "--diagnostics" in sys.argv[3:]
    prompt_lengths, response_lengths = lengths()
    gen = torch.Generator().manual_seed(SEED + 1 + rank)
    # Warm up every code path once on a small share so that lazy imports and allocator pools are not counted.
    small = build_share(0, PROMPTS // NUM_MINI_BATCHES, [8] * PROMPTS, [4] * (PROMPTS * SAMPLES), gen)
    if with_diagnostics:
        rollout_vs_old(small[1], small[2][0], small[2][1])
    del small

    before = settled_rss()
    rollout, batch, records = build_share(rank, size, prompt_lengths, response_lengths, gen)
    measured = settled_rss() - before

    def plan(rows: slice):
        return data_state_bytes(
            sequences=len(rollout.responses[rows]),
            prompt_tokens=sum(len(p) for p in rollout.prompts[rows]),
            response_tokens=sum(len(r) for r in rollout.responses[rows]),
            seq_len=batch.seq_len,
            num_moe_layers=MOE_LAYERS,
            topk=TOPK,
            num_experts=EXPERTS,
            record_rollout=True,
            record_old=True,
            replay=False,
            kl=False,
            num_mini_batches=NUM_MINI_BATCHES,
        )

    planned = plan(slice(None))
    held = ("rollout_lists", "train_batch", "routing_rollout", "routing_old", "routing_update")
    built = {name: getattr(planned, name) for name in held}
    result = {
        "rank": rank,
        "data_parallel": size,
        "sequences": batch.size,
        "seq_len": batch.seq_len,
        "response_tokens": sum(len(r) for r in rollout.responses),
        "measured_bytes": measured,
        "planned_bytes": sum(built.values()),
        "planned": built,
        "record_bytes": [record.nbytes for record in records],
    }
    if with_diagnostics:
        # Last: it changes the allocator's settings for the rest of the process.
        result["diagnostics_peak_bytes"] = diagnostics_peak(batch, records[0], records[1], exact_allocator())
        result["diagnostics_planned_bytes"] = plan(slice(0, DIAGNOSTIC_ROWS)).diagnostics_transient
    print(json.dumps(result))


if __name__ == "__main__":
    main()
