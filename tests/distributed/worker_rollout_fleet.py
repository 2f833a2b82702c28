"""Trainer ranks of the colocated-fleet test: one vLLM engine per rank, every one of them generating.

Usage: worker_rollout_fleet.py OUT_DIR HF_DIR LAYOUT
Every rank writes ``OUT_DIR/rank<r>.pt``::

    {"before": batch generated from the HF weights, "after": batch generated after a push,
     "samples_per_engine": {"before": [...], "after": [...]}, "engine": log-probs of FIXED_TOKENS after the push,
     "megatron": the same from megatron (last pipeline stage, else None), "version": engine version}

A batch is {"prompt_ids", "response_ids", "logprobs_rollout", "finish_reasons", "prompt_index", "weight_version"}.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from worker_weight_sync import build_engine, engine_logprobs, fixed_tokens, megatron_logprobs, parse_layout, perturb  # noqa: E402

NUM_PROMPTS = 7  # not a multiple of the engine count: the shares differ in size
SAMPLES = 3
MAX_NEW_TOKENS = 12


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(3, 30, (NUM_PROMPTS,), generator=g).tolist()
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def as_dict(batch) -> dict:
    out = dataclasses.asdict(batch)
    out.pop("routed_experts")
    return out


def main(out_dir: str, hf_dir: str, layout: str) -> None:
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.model import build_model
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed
    from sapo_megatron.bridge.sync import WeightSync
    from sapo_megatron.rollout.fleet import ColocatedFleet

    parallel = parse_layout(layout)
    with MegatronCpuCompat("cpu"):
        placement = init_distributed(parallel, "cpu", seed=1234)
        rank, world = placement.rank, placement.world_size
        model = build_model(hf_dir, parallel, device="cpu")
        engine = build_engine(hf_dir)
        fleet = ColocatedFleet(engine, WeightSync.colocated(model, engine=engine, engine_ranks=range(world),
                                                            bucket_bytes=64 * 1024))
        out: dict = {"samples_per_engine": {}}
        sampling = dict(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0)
        out["before"] = as_dict(fleet.generate(prompts(), n=SAMPLES, seed=11, **sampling))
        out["samples_per_engine"]["before"] = list(fleet.samples_per_engine)
        perturb(model, seed=1)
        out["stats"] = dataclasses.asdict(fleet.push(model.chunks, 1))
        out["version"] = engine.weight_version
        out["engine"] = engine_logprobs(engine, fixed_tokens())
        logprobs = megatron_logprobs(model, fixed_tokens().tolist())
        out["megatron"] = None if logprobs is None else torch.stack(logprobs)
        out["after"] = as_dict(fleet.generate(prompts(), n=SAMPLES, seed=11, **sampling))
        out["samples_per_engine"]["after"] = list(fleet.samples_per_engine)
        # As the trainer runs it: each data-parallel rank asks for, and receives, only its share's prompts.
        from megatron.core import parallel_state as mpu

        from sapo_megatron.sharding import DataShare

        share = DataShare.build(mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size(),
                                mpu.get_data_parallel_group())
        fleet.set_share(share)
        mine = list(share.block(len(prompts())))
        out["share_indices"] = mine
        out["shared"] = as_dict(fleet.generate([prompts()[i] for i in mine], n=SAMPLES, seed=11,
                                               prompt_indices=mine, **sampling))
        out["samples_per_engine"]["shared"] = list(fleet.samples_per_engine)
        target = Path(out_dir)
        target.mkdir(parents=True, exist_ok=True)
        torch.save(out, target / f"rank{rank}.pt")
        fleet.close()
        destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
