"""MoE routing record / replay in the megatron actor, for several parallel layouts in turn over one gloo job.

Usage: worker_routing_replay.py OUT_DIR HF_DIR REFERENCE_FILE LAYOUT [LAYOUT ...]
A layout reads ``tp2-pp1-ep1`` (expert-TP follows TP, sequence parallelism on with TP > 1, data parallelism
takes the remaining ranks), optionally ``-recompute`` (full activation recomputation). Every rank writes
``OUT_DIR/<layout>/rank<r>.pt`` with the results of this sequence (``lp_*`` log-probs [B, S], ``r_*``
routings [B, S, layers, topk], ``ent_*`` router entropies [B, S, layers], all as returned on this rank):
  natural    compute_logprobs, recorded, with router entropy      -> lp_natural, r_natural, ent_natural
  forced     compute_logprobs replaying the reference's forced routing -> lp_forced, r_forced
  -- every router's weight is perturbed --
  perturbed  compute_logprobs, recorded                           -> lp_perturbed, r_perturbed
  record     compute_logprobs, recorded as a RoutingRecord of the replay positions -> rec_perturbed
  replayed 0 compute_logprobs replaying r_natural (same weights)  -> lp_replayed_0, r_replayed_0
  replayed R compute_logprobs replaying r_natural as a RoutingRecord of every position -> lp_replayed_rec
  train 1    train_mini_batch, recorded                           -> metrics_1, r_train_1
  free       compute_logprobs, recorded (weights after step 1)    -> lp_free, r_free
  replayed   compute_logprobs replaying r_natural                 -> lp_replayed, r_replayed
  train 2    train_mini_batch replaying r_natural (as a RoutingRecord of every position), recorded as a
             RoutingRecord of the replay positions               -> metrics_2, rec_train_2
plus ``loss_expected_{1,2}`` (the policy loss of the log-probs the training pass should have seen),
``loss_free_2`` (the loss had step 2 not replayed), ``replay_positions`` and ``num_experts``.
"""

import sys
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu_sapo.yaml"
PERTURBATION = 0.01  # router weights are ~N(0, 0.02): flips the top-k of some tokens, not of all


def config_for(layout: str, world_size: int):
    from sapo_megatron.config import load_config

    parts = layout.split("-")
    tp, pp, ep = (int(part[2:]) for part in parts[:3])
    return load_config(
        RECIPE,
        [
            "trainer.micro_batch_size=2",
            f"parallel.tensor={tp}",
            f"parallel.pipeline={pp}",
            f"parallel.expert={ep}",
            f"parallel.expert_tensor={1 if ep > 1 else tp}",
            f"parallel.sequence_parallel={str(tp > 1).lower()}",
            f"launch.nproc_per_node={world_size}",
            f"model.recompute_activations={str('recompute' in parts[3:]).lower()}",
        ],
    )


def perturb_routers(chunks) -> None:
    """The same change on every rank: the noise of a router depends only on its (global) layer number."""
    from megatron.core.transformer.moe.router import TopKRouter

    with torch.no_grad():
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    generator = torch.Generator().manual_seed(1000 + module.layer_number)
                    noise = torch.randn(module.weight.shape, generator=generator)
                    module.weight.add_(PERTURBATION * noise.to(module.weight.device, module.weight.dtype))


def main(out_dir: str, hf_dir: str, reference_file: str, *layouts: str) -> None:
    import os

    from sapo_megatron.actor.batch import TrainBatch
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.factory import build_actor
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed
    from sapo_megatron.routing_layout import RoutingRecord, replay_positions

    reference = torch.load(reference_file)
    tokens = reference["input_ids"]
    batch, seq = tokens.shape
    loss_mask = torch.zeros(batch, seq, dtype=torch.bool)
    loss_mask[:, 2:10] = True
    loss_mask[3, 6:] = False
    advantages = torch.tensor([0.9, -1.1, 0.4, -0.3, 1.5])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    with MegatronCpuCompat("cpu"):
        for layout in layouts:
            cfg = config_for(layout, world_size)
            placement = init_distributed(cfg.parallel, "cpu", seed=1234)
            actor = build_actor(cfg, hf_dir, device=torch.device("cpu"))
            policy = actor.policy
            data = TrainBatch(tokens=tokens, loss_mask=loss_mask, advantages=advantages)
            out = {}
            natural = policy.compute_logprobs(data, record_routing=True, record_router_entropy=True)
            out["lp_natural"], out["r_natural"], out["ent_natural"] = natural.logprobs, natural.routing, natural.router_entropy
            forced = policy.compute_logprobs(data, record_routing=True, replay_routing=reference["forced_routing"])
            out["lp_forced"], out["r_forced"] = forced.logprobs, forced.routing
            num_experts = out["num_experts"] = actor.model.config.num_moe_experts
            positions = out["replay_positions"] = replay_positions(loss_mask)
            # The natural routing as a record of every position: replaying it must be replaying the dense tensor.
            natural_record = RoutingRecord.from_dense(out["r_natural"], torch.ones_like(loss_mask), num_experts)
            perturb_routers(actor.ddp_chunks)
            perturbed = policy.compute_logprobs(data, record_routing=True)
            out["lp_perturbed"], out["r_perturbed"] = perturbed.logprobs, perturbed.routing
            out["rec_perturbed"] = policy.compute_logprobs(data, record_routing=True, routing_positions=positions).routing
            replayed_0 = policy.compute_logprobs(data, record_routing=True, replay_routing=out["r_natural"])
            out["lp_replayed_0"], out["r_replayed_0"] = replayed_0.logprobs, replayed_0.routing
            out["lp_replayed_rec"] = policy.compute_logprobs(data, replay_routing=natural_record).logprobs
            # Off-policy against the natural routing's log-probs, so the SAPO gate is away from r = 1.
            train = data.with_(logprobs_old=out["lp_natural"])
            step_1 = policy.train_mini_batch(train, record_routing=True)
            out["metrics_1"], out["r_train_1"] = step_1.scalars(), step_1.routing
            free = policy.compute_logprobs(data, record_routing=True)
            out["lp_free"], out["r_free"] = free.logprobs, free.routing
            replayed = policy.compute_logprobs(data, record_routing=True, replay_routing=out["r_natural"])
            out["lp_replayed"], out["r_replayed"] = replayed.logprobs, replayed.routing
            step_2 = policy.train_mini_batch(
                train, record_routing=True, routing_positions=positions, replay_routing=natural_record
            )
            out["metrics_2"], out["rec_train_2"] = step_2.scalars(), step_2.routing

            def loss_of(logprobs):
                loss, _ = policy.policy_loss(
                    logprobs,
                    train.logprobs_old,
                    train.advantages,
                    train.loss_mask,
                    num_global_tokens=train.num_valid_tokens(),
                    num_global_seqs=train.num_valid_sequences(),
                )
                return float(loss)

            out["loss_expected_1"] = loss_of(out["lp_perturbed"])
            out["loss_expected_2"] = loss_of(out["lp_replayed"])
            out["loss_free_2"] = loss_of(out["lp_free"])
            target = Path(out_dir) / layout
            target.mkdir(parents=True, exist_ok=True)
            torch.save(out, target / f"rank{placement.rank}.pt")
            del actor, policy
            destroy_distributed(keep_process_group=True)
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
