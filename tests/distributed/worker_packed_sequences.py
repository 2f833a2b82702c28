"""The same two SAPO steps with padded and with packed token-budget micro-batches, per parallel layout.

Usage:
  worker_packed_sequences.py OUT_DIR HF_DIR DEVICE LAYOUT [LAYOUT ...]

DEVICE ``cpu``: megatron's local layer spec, whose ``DotProductAttention`` refuses packed sequences; the packed runs
swap in :class:`ThdReferenceAttention` (that attention run once per ``cu_seqlens`` segment), a stand-in for
Transformer Engine's THD kernel, so that everything around the kernel (packing, RoPE per segment, unpacking, the
loss, routing record and replay in packed order, sequence parallelism, pipeline shapes) runs for real on CPU.
The first CPU layout also records the actor's refusal of packing on the plain local attention.
DEVICE ``cuda``: the GPU path, Transformer Engine's spec and its own attention; nothing is swapped.

For every layout (``tp2-pp1-ep1-etp2-dp1-alltoall``, see worker_actor_step.parse_layout) and each mode
(``budget``: ``trainer.max_tokens_per_micro_batch=40``, each micro-batch padded to its longest row; ``packed``:
the same budget with ``trainer.pack_sequences``) the actor is built afresh from the same HF weights and runs the
trainer's sequence on worker_token_budget's length-skewed batch: old log-probs (with entropy, routing and router
entropy), mini-batch A (rows 0-7) replaying the budget run's old routing, mini-batch B (rows 8-15) routing freely,
the log-probs after both. ``logprobs_old`` is the budget run's plus seeded noise, for both modes. Under data
parallelism ``local-budget`` / ``local-packed`` hand the actor only this rank's share (``local=True``, routing as
compact records), as the trainer does. Writes OUT_DIR/<layout>/<mode>-rank<r>.pt.
"""

import sys
from pathlib import Path

import torch

from worker_actor_step import RECIPE, overrides, parse_layout
from worker_token_budget import MAX_TOKENS, MINI_BATCHES, SEQ_LEN, _in_batch_order, make_batch, share_rows


def thd_reference_attention_class():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class ThdReferenceAttention(DotProductAttention):
        """megatron's local attention once per packed sequence: what TE's THD kernel computes, on CPU."""

        def forward(
            self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
        ):
            if packed_seq_params is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
            # Megatron's attention squeezed the dummy batch dim: [t, heads, dim] in, [t, 1, heads x dim] out.
            assert packed_seq_params.qkv_format == "thd" and attention_mask is None
            assert torch.equal(packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv)
            cu = packed_seq_params.cu_seqlens_q.tolist()
            assert cu[-1] == query.shape[0], "cu_seqlens must cover the packed row"
            assert packed_seq_params.max_seqlen_q == max(b - a for a, b in zip(cu[:-1], cu[1:]))
            out = []
            for start, stop in zip(cu[:-1], cu[1:]):
                n = stop - start
                mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=query.device), diagonal=1)[None, None]
                q, k, v = (t[start:stop].unsqueeze(1) for t in (query, key, value))
                out.append(super().forward(q, k, v, mask, attn_mask_type, attention_bias))
            return torch.cat(out, dim=0)

    return DotProductAttention, ThdReferenceAttention


def install_thd_reference_attention(chunks) -> int:
    local, reference = thd_reference_attention_class()
    swapped = 0
    for chunk in chunks:
        for module in chunk.modules():
            if type(module) is local:
                module.__class__ = reference
                swapped += 1
    return swapped


def packed_policy(actor, pack: bool):
    """The actor's policy, or the same model, optimizer and loss behind a policy that packs."""
    from sapo_megatron.actor.actor import MegatronPolicy

    policy = actor.policy
    if not pack:
        return policy
    return MegatronPolicy(
        policy.model,
        optimizer=policy.optimizer,
        scheduler=policy.scheduler,
        loss=policy.loss,
        micro_batch_size=policy.micro_batch_size,
        temperature=policy.temperature,
        device=policy.device,
        sequence_multiple=policy.sequence_multiple,
        max_tokens_per_micro_batch=policy.max_tokens_per_micro_batch,
        pack_sequences=True,
    )


def run(out_dir: str, hf_dir: str, device: str, *layouts: str) -> None:
    import contextlib
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
    dtype = "float32" if device == "cpu" else "bfloat16"
    settings = [
        *overrides(),
        f"trainer.max_tokens_per_micro_batch={MAX_TOKENS}",
        f"model.params_dtype={dtype}",
        f"trainer.device={device}",
    ]
    # On a GPU the packed runs go through the config switch itself (validated here, checked against the machine
    # by build_actor); on CPU the config refuses it, and the packing policy is built beside the actor instead.
    bases = {False: load_config(RECIPE, settings)}
    bases[True] = load_config(RECIPE, [*settings, "trainer.pack_sequences=true"]) if device == "cuda" else bases[False]
    compat = MegatronCpuCompat("cpu") if device == "cpu" else contextlib.nullcontext()
    refusal_recorded = device != "cpu"
    with compat:
        for layout in layouts:
            parallel, data_parallel, distributed_optimizer = parse_layout(layout)
            modes = ["budget", "packed"] + (["local-budget", "local-packed"] if data_parallel > 1 else [])
            saved = None
            for mode in modes:
                pack = mode.endswith("packed")
                base = bases[pack]
                cfg = dataclasses.replace(
                    base,
                    parallel=parallel,
                    optimizer=dataclasses.replace(base.optimizer, use_distributed_optimizer=distributed_optimizer),
                )
                placement = init_distributed(cfg.parallel, device, seed=1)
                assert placement.data == data_parallel, f"{layout}: data-parallel size is {placement.data}"
                actor = build_actor(cfg, hf_dir, device=torch.device(device), total_steps=1)
                target = Path(out_dir) / layout
                target.mkdir(parents=True, exist_ok=True)
                if pack and device == "cpu":
                    if not refusal_recorded:
                        # The local spec's attention cannot take cu_seqlens: the actor says so before a forward.
                        try:
                            packed_policy(actor, True).compute_logprobs(batch)
                            error = None
                        except ValueError as exc:
                            error = str(exc)
                        torch.save({"error": error}, Path(out_dir) / f"refused-rank{placement.rank}.pt")
                        refusal_recorded = True
                    assert install_thd_reference_attention(actor.model.chunks) > 0
                policy = packed_policy(actor, pack and device == "cpu")
                assert policy.pack_sequences == pack
                local = mode.startswith("local")
                dp_rank = torch.distributed.get_rank() // (parallel.tensor * parallel.pipeline)
                if local:
                    rows_of_share = share_rows(dp_rank, data_parallel)
                    width = int(torch.where(batch.loss_mask[rows_of_share], torch.arange(SEQ_LEN), -1).max()) + 2
                    share = batch.select(rows_of_share).narrowed(width)
                    passed = policy.compute_logprobs(
                        share,
                        with_entropy=True,
                        record_routing=True,
                        routing_positions=replay_positions(share.loss_mask),
                        record_router_entropy=True,
                        local=True,
                    )
                    logprobs, entropy, routing, router_entropy = (
                        _in_batch_order(t, rows_of_share, batch.size)
                        for t in (
                            passed.logprobs,
                            passed.entropy,
                            passed.routing.dense(share.seq_len, dtype=torch.int32),
                            passed.router_entropy,
                        )
                    )
                else:
                    passed = policy.compute_logprobs(
                        batch, with_entropy=True, record_routing=True, record_router_entropy=True
                    )
                    logprobs, entropy = passed.logprobs, passed.entropy
                    routing, router_entropy = passed.routing, passed.router_entropy
                if saved is None:
                    # The first (budget) mode of the layout fixes logprobs_old and the replayed routing.
                    old = torch.where(batch.loss_mask, logprobs + data["noise"], torch.zeros(()))
                    saved = {"logprobs_old": old, "routing": routing}
                train = batch.with_(logprobs_old=saved["logprobs_old"])
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
                            positions = replay_positions(mine_batch.loss_mask)
                            replay = RoutingRecord.from_dense(saved["routing"][mine], positions, num_experts)
                        done = policy.train_mini_batch(
                            mine_batch, replay_routing=replay, record_routing=True,
                            routing_positions=mine_batch.loss_mask, return_logprobs=True, local=True,
                        )
                        offset = mine - rows.start
                        step_routing = done.routing.dense(mine_batch.seq_len, dtype=torch.int32)
                        step_routing = _in_batch_order(step_routing, offset, rows.stop - rows.start)
                        step_logprobs = _in_batch_order(done.logprobs, offset, rows.stop - rows.start)
                    else:
                        replay = saved["routing"][rows] if step == 0 else None
                        done = policy.train_mini_batch(
                            train.select(rows), replay_routing=replay, record_routing=True, return_logprobs=True
                        )
                        step_routing, step_logprobs = done.routing, done.logprobs
                    metrics.append(done.scalars())
                    routing_train.append(step_routing)
                    logprobs_train.append(step_logprobs)
                    weights.append(
                        {name: tensor.detach().float().cpu().clone() for name, tensor in export_hf_weights(actor.model)}
                    )
                    if local:
                        lp = policy.compute_logprobs(share, local=True).logprobs
                        after.append(_in_batch_order(lp, rows_of_share, batch.size))
                    else:
                        after.append(policy.compute_logprobs(batch).logprobs)
                record = {
                    "logprobs": logprobs,
                    "entropy": entropy,
                    "routing": routing,
                    "router_entropy": router_entropy,
                    "metrics": metrics,
                    "weights": weights,
                    "logprobs_after": after,
                    "routing_train": routing_train,
                    "logprobs_train": logprobs_train,
                    "micro_rows": [r.tolist() for r in micro_layout.rows],
                    "micro_shapes": micro_layout.model_shapes(),
                }
                torch.save(record, target / f"{mode}-rank{placement.rank}.pt")
                del actor, policy
                destroy_distributed(keep_process_group=True)
    destroy_distributed()


if __name__ == "__main__":
    run(*sys.argv[1:])
