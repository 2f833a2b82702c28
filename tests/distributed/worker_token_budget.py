"""The same two SAPO steps with fixed-size and with token-budget micro-batches, per parallel layout.

Usage:
  worker_token_budget.py OUT_DIR HF_DIR LAYOUT [LAYOUT ...]

For every layout (``tp1-pp2-ep1-etp1-dp1-alltoall``, see worker_actor_step.parse_layout) and each mode
(``fixed``: ``trainer.micro_batch_size=3``; ``budget``: ``trainer.max_tokens_per_micro_batch=40``) the actor is
built afresh from the same HF weights and runs the trainer's sequence: old log-probs with routing and router
entropy recorded, mini-batch A (rows 0-7) replaying the old pass's routing, mini-batch B (rows 8-15) routing
freely, and the log-probs after both. ``logprobs_old`` is fixed once (from the first fixed-mode pass of the
first layout, plus seeded noise) and written to OUT_DIR/logprobs_old.pt so every layout trains on it.
Writes OUT_DIR/<layout>/<mode>-rank<r>.pt.

Under data parallelism two more modes hand the actor only this rank's share, as the trainer does (``local=True``):
``local`` (fixed micro-batches) and ``local-budget``. Rank ``d`` of ``D`` holds the ``d``-th of ``D`` equal blocks
of each mini-batch (:func:`share_rows`); its per-token results are gathered back into batch order here, so
that they compare with the whole-batch runs row for row. As in the trainer, routing travels as compact
``RoutingRecord`` s there: the old pass records its replay positions, mini-batch A replays the old routing as a
record of those positions, and the updates record their loss positions (densified here for the comparison).

The batch is length-skewed like an RL rollout: most responses are short, a few run to the width, and one row
(44 tokens) is longer than the 40-token budget on its own.
"""

import sys
from pathlib import Path

import torch

from worker_actor_step import RECIPE, overrides, parse_layout

SEQ_LEN = 45  # odd: sequence parallelism has to pad
MINI_BATCHES = (slice(0, 8), slice(8, 16))
MICRO_BATCH_SIZE = 3
MAX_TOKENS = 40
# prompt + response + 1 = the row's length; 0 responses are fully masked rows.
PROMPT_LENS = [3, 2, 4, 3, 2, 5, 3, 2, 4, 3, 2, 2, 3, 5, 4, 2]
RESPONSE_LENS = [27, 4, 30, 3, 6, 2, 0, 5, 3, 40, 4, 2, 26, 0, 5, 3]


def share_rows(rank: int, size: int) -> torch.Tensor:
    """The rows of data-parallel rank ``rank`` of ``size``: its block of every mini-batch, mini-batch order."""
    blocks = []
    for rows in MINI_BATCHES:
        block = (rows.stop - rows.start) // size
        blocks.append(torch.arange(rows.start + rank * block, rows.start + (rank + 1) * block))
    return torch.cat(blocks)


def _in_batch_order(local: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Every rank's ``local`` values (``local[i]`` belongs to batch row ``rows[i]``) placed in batch order."""
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, (rows, local))
    width = max(values.shape[1] for _, values in parts)
    fill = -1 if not local.is_floating_point() else 0
    out = torch.full((num_rows, width, *local.shape[2:]), fill, dtype=local.dtype)
    for part_rows, values in parts:
        out[part_rows, : values.shape[1]] = values
    return out


def make_batch(pad_id: int) -> dict:
    generator = torch.Generator().manual_seed(20261207)
    rows = len(PROMPT_LENS)
    tokens = torch.full((rows, SEQ_LEN), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(rows, SEQ_LEN, dtype=torch.bool)
    for row, (n_prompt, n_resp) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        length = n_prompt + n_resp
        assert length < SEQ_LEN
        tokens[row, :length] = torch.randint(0, 256, (length,), generator=generator)
        loss_mask[row, n_prompt - 1 : n_prompt - 1 + n_resp] = True
    advantages = torch.randn(rows, generator=generator)
    advantages[0], advantages[1], advantages[8], advantages[9] = 1.1, -0.8, -1.2, 0.9
    noise = 0.6 * torch.randn(rows, SEQ_LEN, generator=generator)
    return {"tokens": tokens, "loss_mask": loss_mask, "advantages": advantages, "noise": noise}


def run(out_dir: str, hf_dir: str, *layouts: str) -> None:
    import dataclasses

    from transformers import AutoTokenizer

    from sapo_megatron.actor.batch import TrainBatch
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.factory import build_actor
    from sapo_megatron.actor.model import export_hf_weights
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed
    from sapo_megatron.config import load_config
    from sapo_megatron.routing_layout import RoutingRecord, replay_positions

    data = make_batch(AutoTokenizer.from_pretrained(hf_dir).pad_token_id)
    batch = TrainBatch(tokens=data["tokens"], loss_mask=data["loss_mask"], advantages=data["advantages"])
    base = load_config(RECIPE, [*overrides(), f"trainer.micro_batch_size={MICRO_BATCH_SIZE}"])
    old_path = Path(out_dir) / "logprobs_old.pt"
    with MegatronCpuCompat("cpu"):
        for layout in layouts:
            parallel, data_parallel, distributed_optimizer = parse_layout(layout)
            # Expert parallelism with the allgather dispatcher is refused: only the refusal is recorded.
            refused = parallel.moe_token_dispatcher == "allgather" and parallel.expert > 1
            modes = (("budget", MAX_TOKENS),) if refused else (("fixed", 0), ("budget", MAX_TOKENS))
            if data_parallel > 1 and not refused:
                modes += (("local", 0), ("local-budget", MAX_TOKENS))
            for mode, max_tokens in modes:
                cfg = dataclasses.replace(
                    base,
                    parallel=parallel,
                    optimizer=dataclasses.replace(base.optimizer, use_distributed_optimizer=distributed_optimizer),
                    trainer=dataclasses.replace(base.trainer, max_tokens_per_micro_batch=max_tokens),
                )
                placement = init_distributed(cfg.parallel, "cpu", seed=1)
                assert placement.data == data_parallel, f"{layout}: data-parallel size is {placement.data}"
                actor = build_actor(cfg, hf_dir, device=torch.device("cpu"), total_steps=1)
                policy = actor.policy
                if refused:
                    try:
                        policy.compute_logprobs(batch)
                        error = None
                    except ValueError as exc:
                        error = str(exc)
                    target = Path(out_dir) / layout
                    target.mkdir(parents=True, exist_ok=True)
                    torch.save({"error": error}, target / f"{mode}-rank{placement.rank}.pt")
                    del actor, policy
                    destroy_distributed(keep_process_group=True)
                    continue
                local = mode.startswith("local")
                dp_rank = torch.distributed.get_rank() // (parallel.tensor * parallel.pipeline)
                if local:
                    rows_of_share = share_rows(dp_rank, data_parallel)
                    # Cut to the share's own longest row, as the trainer's collate does.
                    width = int(torch.where(batch.loss_mask[rows_of_share], torch.arange(SEQ_LEN), -1).max()) + 2
                    share = batch.select(rows_of_share).narrowed(width)
                    passed = policy.compute_logprobs(
                        share,
                        record_routing=True,
                        routing_positions=replay_positions(share.loss_mask),
                        record_router_entropy=True,
                        local=True,
                    )
                    logprobs, record, router_entropy = passed.logprobs, passed.routing, passed.router_entropy
                    logprobs, routing, router_entropy = (
                        _in_batch_order(t, rows_of_share, batch.size)
                        for t in (logprobs, record.dense(share.seq_len, dtype=torch.int32), router_entropy)
                    )
                else:
                    passed = policy.compute_logprobs(batch, record_routing=True, record_router_entropy=True)
                    logprobs, routing, router_entropy = passed.logprobs, passed.routing, passed.router_entropy
                if not old_path.exists():
                    # The first pass of the first job: fix logprobs_old for every layout and mode.
                    torch.distributed.barrier()
                    if placement.rank == 0:
                        old = torch.where(batch.loss_mask, logprobs + data["noise"], torch.zeros(()))
                        torch.save({"logprobs_old": old, "routing": routing}, old_path)
                    torch.distributed.barrier()
                saved = torch.load(old_path)
                train = batch.with_(logprobs_old=saved["logprobs_old"])
                # The layout of mini-batch A's micro-batches on this rank (a collective: every rank calls it).
                micro, micro_layout = policy._local_micro_batches(train.select(MINI_BATCHES[0]))
                metrics, weights, after, routing_train, logprobs_train = [], [], [], [], []
                for step, rows in enumerate(MINI_BATCHES):
                    if local:
                        block = (rows.stop - rows.start) // data_parallel
                        mine = torch.arange(rows.start + dp_rank * block, rows.start + (dp_rank + 1) * block)
                        mine_batch = train.select(mine)
                        replay = None
                        if step == 0:
                            num_experts = actor.model.config.num_moe_experts
                            old_positions = replay_positions(mine_batch.loss_mask)
                            replay = RoutingRecord.from_dense(saved["routing"][mine], old_positions, num_experts)
                        done = policy.train_mini_batch(
                            mine_batch, replay_routing=replay, record_routing=True,
                            routing_positions=mine_batch.loss_mask, return_logprobs=True, local=True,
                        )
                        step_metrics, step_record, step_logprobs = done.scalars(), done.routing, done.logprobs
                        offset = mine - rows.start
                        step_routing = step_record.dense(mine_batch.seq_len, dtype=torch.int32)
                        step_routing = _in_batch_order(step_routing, offset, rows.stop - rows.start)
                        step_logprobs = _in_batch_order(step_logprobs, offset, rows.stop - rows.start)
                    else:
                        replay = saved["routing"][rows] if step == 0 else None
                        done = policy.train_mini_batch(
                            train.select(rows), replay_routing=replay, record_routing=True, return_logprobs=True
                        )
                        step_metrics, step_routing, step_logprobs = done.scalars(), done.routing, done.logprobs
                    metrics.append(step_metrics)
                    routing_train.append(step_routing)
                    logprobs_train.append(step_logprobs)
                    weights.append({name: tensor.detach().clone() for name, tensor in export_hf_weights(actor.model)})
                    if local:
                        after.append(_in_batch_order(policy.compute_logprobs(share, local=True).logprobs, rows_of_share,
                                                     batch.size))
                    else:
                        after.append(policy.compute_logprobs(batch).logprobs)
                record = {
                    "logprobs": logprobs,
                    "routing": routing,
                    "router_entropy": router_entropy,
                    "metrics": metrics,
                    "weights": weights,
                    "logprobs_after": after,
                    "routing_train": routing_train,
                    "logprobs_train": logprobs_train,
                    "micro_rows": [r.tolist() for r in micro_layout.rows],
                    "micro_widths": list(micro_layout.widths),
                }
                target = Path(out_dir) / layout
                target.mkdir(parents=True, exist_ok=True)
                torch.save(record, target / f"{mode}-rank{placement.rank}.pt")
                del actor, policy
                destroy_distributed(keep_process_group=True)
    destroy_distributed()


if __name__ == "__main__":
    run(*sys.argv[1:])
