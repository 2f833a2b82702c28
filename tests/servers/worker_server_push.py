"""Trainer ranks of the server weight-push test: EP2 over 2 ranks, pushing into 2 real `vllm serve` servers.

Usage: worker_server_push.py OUT_DIR HF_DIR URL0,URL1
Rank 0 writes OUT_DIR/result.pt with the rollouts, the Megatron log-probs of their sequences, the servers'
versions after each push, and the error every rank saw for the refused push.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
from worker_weight_sync import megatron_logprobs, perturb  # noqa: E402

PROMPTS = [[72, 101, 108, 108, 111, 33], [40, 41, 42, 43], [100, 101, 102, 103, 104, 105, 106, 107], [7, 8, 9]]


def main(out_dir: str, hf_dir: str, urls: str) -> None:
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.model import build_model
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed
    from sapo_megatron.bridge.sync import WeightSyncError
    from sapo_megatron.config import load_config
    from sapo_megatron.rollout.server_fleet import ServerFleet

    root = Path(__file__).parents[2]
    cfg = load_config(root / "recipes" / "tiny_cpu_sapo.yaml", [
        "launch.nproc_per_node=2", "parallel.expert=2", "rollout.mode=remote", f"rollout.server_urls={urls}",
        "rollout.sync_host=127.0.0.1", "rollout.collect_routed_experts=false", "rollout.max_new_tokens=10",
        f"trainer.run_dir={out_dir}",
    ]).validate()
    with MegatronCpuCompat("cpu"):
        placement = init_distributed(cfg.parallel, "cpu", seed=1234)
        rank = placement.rank
        model = build_model(hf_dir, cfg.parallel, device="cpu")
        fleet = ServerFleet.build(model, hf_dir, cfg, run_dir=Path(out_dir), device="cpu", collect_routed_experts=False)
        out: dict = {"versions": {}, "errors": {}}

        def rollout(label: str) -> None:
            batch = fleet.generate(PROMPTS, n=2, seed=5)
            sequences = [p + r for p, r in zip(batch.prompt_ids, batch.response_ids)]
            scored = megatron_logprobs(model, sequences)
            out[label] = {
                "response_ids": batch.response_ids, "logprobs_rollout": batch.logprobs_rollout,
                "weight_version": batch.weight_version, "samples_per_engine": list(fleet.samples_per_engine),
                "megatron": None if scored is None else [lp[len(p) - 1 :].tolist() for lp, p in zip(scored, batch.prompt_ids)],
            }
            if fleet.is_driver:
                out["versions"][label] = fleet.pool.versions()

        perturb(model, seed=1)
        fleet.push(model.chunks, 1)
        rollout("v1")
        # A non-finite weight: every engine's check refuses it after the transfer, before any load.
        weight = model.chunks[0].decoder.final_layernorm.weight
        saved = weight.detach().clone()
        weight.data[0] = float("nan")
        try:
            fleet.push(model.chunks, 2)
        except WeightSyncError as exc:
            out["errors"]["nan"] = str(exc)
        weight.data.copy_(saved)
        rollout("after-nan")
        perturb(model, seed=2)
        fleet.push(model.chunks, 2)
        rollout("v2")
        gathered = [None] * placement.world_size
        torch.distributed.all_gather_object(gathered, out)
        if rank == 0:
            torch.save(gathered, Path(out_dir) / "result.pt")
        fleet.close()
        destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
