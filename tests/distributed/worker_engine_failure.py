"""Two trainer ranks over gloo, each with a stand-in engine in a ColocatedFleet; the engines raise on chosen
calls. Every rank records what its ``generate`` calls raised or returned.

Usage: worker_engine_failure.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from sapo_megatron.rollout.engine import RolloutBatch
from sapo_megatron.rollout.fleet import ColocatedFleet, EngineError

# Call index -> ranks whose engine raises on it.
FAILING = {0: [1], 1: [0, 1], 2: []}


class FlakyEngine:
    weight_version = 3

    def __init__(self, rank: int):
        self.rank, self.calls = rank, 0

    def generate(self, prompts, *, n, seed, prompt_indices, **sampling):
        call, self.calls = self.calls, self.calls + 1
        if self.rank in FAILING[call]:
            sample_inside_vllm(call)
        rows = [p for p in prompts for _ in range(n)]
        return RolloutBatch(
            prompt_ids=rows, response_ids=[[7, 8]] * len(rows), logprobs_rollout=[[-0.5, -0.25]] * len(rows),
            finish_reasons=["eos"] * len(rows),
            prompt_index=[prompt_indices[i] for i, p in enumerate(prompts) for _ in range(n)],
            weight_version=self.weight_version,
        )


def sample_inside_vllm(call: int):
    raise RuntimeError(f"sampler blew up on call {call}")


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    fleet = ColocatedFleet(FlakyEngine(rank), None)
    results = []
    for call in sorted(FAILING):
        try:
            batch = fleet.generate([[1, 2], [3], [4, 5, 6], [7]], n=2, seed=0)
            results.append({"ok": len(batch), "prompt_index": batch.prompt_index})
        except EngineError as exc:
            results.append({"error": str(exc), "cause": repr(exc.__cause__)})
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
