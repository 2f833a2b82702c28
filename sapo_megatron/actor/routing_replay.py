"""MoE routing record and replay for the actor's megatron-core model.

Layout (:mod:`sapo_megatron.routing_layout`, shared with the diagnostics and the rollout engine): a routing gives
*global* expert ids aligned with a :class:`TrainBatch`: the experts that MoE layer ``m`` (MoE layers in model
order, dense layers skipped) chose for the token ``tokens[b, t]``, i.e. the routing that produced the logits at
position ``t``. Ids within a token are in the router's order (descending router logit). It comes as a dense
integer tensor ``[batch, seq, num_moe_layers, topk]`` where ``-1`` (:data:`UNRECORDED`) means "no routing" (a
replay routes such a (token, layer) normally), or as a :class:`~sapo_megatron.routing_layout.RoutingRecord`: only
the recorded positions, compact. A pass records a ``RoutingRecord`` when it is given the positions to keep
(``routing_positions``); it keeps them per micro-batch, as the routers run, so no dense routing of the whole
batch ever exists. The dense result (without positions: every position) is assembled from that record.

Recording and replay go through megatron-core's own hook in ``topk_routing_with_score_function``: every
``TopKRouter`` asks its ``router_replay`` object (:class:`~megatron.core.transformer.moe.router_replay.RouterReplay`)
for the top-k. :class:`RoutingReplay` installs one ``LayerReplay`` (a ``RouterReplay``) per router of
this rank and removes them again; it does not need ``moe_enable_routing_replay`` in the model config. A
replayed top-k takes the router's scores at the given experts (``scores.gather``), exactly as megatron's
``REPLAY_FORWARD`` does, so the gate weights still follow the current router weights and get gradients.

Where the tokens of a pass live: each data-parallel rank holds a contiguous slice of the (padded) batch,
split into micro-batches (consecutive rows of the full width, or, under a token budget, any rows cut to the
micro-batch's own width: :class:`~sapo_megatron.actor.micro_batching.MicroBatchLayout`); with sequence
parallelism each tensor-parallel rank routes one contiguous slice of the micro-batch's sequence (megatron's
hidden states are ``[seq, batch, hidden]``, routed as ``seq * batch`` rows); each pipeline stage holds some of
the MoE layers. :meth:`RoutingPass.gather_record` reassembles the recorded positions over those three groups,
one micro-batch at a time; a replay routing is cut the same way before each micro-batch's forward (a record
is densified one micro-batch at a time into megatron's int64 top-k).

A pass can also record each router's entropy per token (:data:`ENTROPY_DTYPE` ``[batch, seq, num_moe_layers]``,
nats, 0 where nothing was recorded): the entropy of the softmax over *all* routed experts, before the top-k,
taken from the same hook (megatron hands it the router logits, or their softmax with
``moe_router_pre_softmax``). It is gathered exactly like the routing.

With packed sequences (``trainer.pack_sequences``, :mod:`sapo_megatron.actor.packing`) megatron sees a micro-batch
as one row: its routers route ``packed_length x 1`` tokens in packed order (under sequence parallelism each
tensor-parallel rank a contiguous slice of it). The packed order runs through each row's kept positions, row after
row, so a packed micro-batch's kept tokens come out in the (row, position) order a record stores them in; a replay
routing is packed the same way (the rounding tail routes freely), and router entropy is put back at each token's
(row, position).

Activation recomputation re-runs the routers inside backward. In a training pass every top-k used in a
forward is queued per layer and popped, in order, by the recomputation (megatron's ``REPLAY_BACKWARD``
queue), so recomputed activations always use the forward's experts, with or without a replay routing.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from sapo_megatron import collectives
from sapo_megatron.routing_layout import (
    POSITION_DTYPE,
    UNRECORDED,
    RoutingRecord,
    check_routing,
    replay_positions,
    routing_dtype,
    softmax_entropy,
    token_slots,
)

# The dense result's dtype (compute_logprobs(record_routing=True) without positions).
ROUTING_DTYPE = torch.int32
ENTROPY_DTYPE = torch.float32


def _megatron_router_classes():
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.router_replay import RouterReplay

    return TopKRouter, RouterReplay


def _in_backward() -> bool:
    """True while autograd runs a backward node, i.e. inside activation recomputation."""
    return torch._C._current_autograd_node() is not None


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def check_record(
    record: RoutingRecord, rows: int, seq_len: int, num_layers: int, topk: int, num_experts: int, name: str
) -> RoutingRecord:
    """Validates a replay :class:`RoutingRecord` for a batch of ``rows`` x ``seq_len``; returns it."""
    expected = (rows, num_layers, topk, num_experts)
    got = (record.rows, record.num_layers, record.topk, record.num_experts)
    if got != expected:
        raise ValueError(
            f"{name}: a record of (rows, num_moe_layers, topk, num_experts) = {got}; this batch and model need "
            f"{expected}"
        )
    if record.num_tokens and int(record.positions.max()) >= seq_len:
        raise ValueError(f"{name} holds position {int(record.positions.max())}, past the batch's {seq_len} positions")
    record.check_values(name)
    return record


def check_positions(positions: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Validates the positions a pass records (``routing_positions``); returns them as bool on the CPU."""
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.bool:
        raise ValueError("routing_positions must be a bool tensor [batch, seq]")
    if tuple(positions.shape) != tuple(loss_mask.shape):
        raise ValueError(
            f"routing_positions has shape {tuple(positions.shape)}; the batch is [batch, seq] = "
            f"{tuple(loss_mask.shape)}"
        )
    positions = positions.cpu()
    beyond = int((positions & ~replay_positions(loss_mask.cpu())).sum())
    if beyond:
        # A token-budget micro-batch ends after its rows' last loss position: later positions are not computed.
        raise ValueError(
            f"routing_positions: {beyond} position(s) after their row's last loss position; nothing reads their "
            "routing (record the loss positions, or replay_positions(loss_mask) for a replay)"
        )
    return positions


def rollout_routing_to_train(routed_experts: Sequence[torch.Tensor], seq_len: int) -> torch.Tensor:
    """The rollout engine's per-sample routing (``RolloutBatch.routed_experts``) in TrainBatch alignment.

    ``routed_experts[i]`` is ``[prompt_len + response_len - 1, layers, topk]``: row ``t`` is token ``t`` of
    ``prompt + response``, the sequence :func:`~sapo_megatron.actor.batch.collate_sequences` lays out from
    position 0. The last sampled token was never fed through the engine, so its position (and the right
    padding) stays ``-1``; those positions predict nothing inside the loss mask.
    Returns int32 ``[len(routed_experts), seq_len, layers, topk]``: the dense layout, for a small batch. A
    share of a large one goes through :meth:`~sapo_megatron.routing_layout.RoutingRecord.from_sequences`, which
    keeps only the positions a step needs, compactly.
    """
    if len(routed_experts) == 0:
        raise ValueError("rollout_routing_to_train: no samples")
    first = routed_experts[0]
    if first.dim() != 3:
        raise ValueError(f"routed_experts[0] must be [tokens, layers, topk], got shape {tuple(first.shape)}")
    layers, topk = first.shape[1:]
    out = torch.full((len(routed_experts), seq_len, layers, topk), UNRECORDED, dtype=ROUTING_DTYPE)
    for i, routed in enumerate(routed_experts):
        if routed.dim() != 3 or tuple(routed.shape[1:]) != (layers, topk):
            raise ValueError(
                f"routed_experts[{i}] has shape {tuple(routed.shape)}; every sample needs [tokens, {layers}, {topk}]"
            )
        if routed.shape[0] > seq_len:
            raise ValueError(f"routed_experts[{i}] covers {routed.shape[0]} tokens, more than seq_len={seq_len}")
        out[i, : routed.shape[0]] = routed.to(ROUTING_DTYPE)
    return out


def _layer_replay_class():
    """The RouterReplay subclass, built on first use so that importing this module does not import megatron."""
    _, RouterReplay = _megatron_router_classes()

    class LayerReplay(RouterReplay):
        """megatron's per-router replay state, driven by a :class:`RoutingReplay` instead of global actions."""

        def __init__(self, owner: "RoutingReplay", moe_index: int):
            super().__init__()
            # The base class registers every instance in a process-wide list for its static setters; this
            # one is driven only by its owner, so it stays out of that list (and out of other models' way).
            RouterReplay.global_router_replay_instances.remove(self)
            self.owner = owner
            self.moe_index = moe_index
            self.micro_index: Optional[int] = None

        def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
            current = self.owner.current
            if current is None:
                return default_compute_topk(scores, topk, num_groups, group_topk)
            if _in_backward():
                # Activation recomputation: the same experts as this micro-batch's forward.
                assert self.replay_backward_list, "recomputed routing without a queued forward routing"
                indices = self.replay_backward_list.pop(0).to(scores.device)
                return scores.gather(1, indices), indices
            target = self.target_topk_idx
            if target is None:
                probs, indices = default_compute_topk(scores, topk, num_groups, group_topk)
            else:
                indices = target.to(scores.device)
                given = indices[:, 0] != UNRECORDED
                if not bool(given.all()):
                    computed = default_compute_topk(scores, topk, num_groups, group_topk)[1]
                    indices = torch.where(given[:, None], indices, computed)
                probs = scores.gather(1, indices)
            if current.training:
                self.replay_backward_list.append(indices)
            if current.record:
                assert self.micro_index is not None, "a router ran before RoutingPass.before_forward"
                current.store(self.moe_index, self.micro_index, indices)
            if current.record_entropy:
                assert self.micro_index is not None, "a router ran before RoutingPass.before_forward"
                current.store_entropy(self.moe_index, self.micro_index, self.owner.router_entropy(scores))
            return probs, indices

    return LayerReplay


class RoutingPass:
    """One forward(-backward) schedule run with routing record and/or replay; see :meth:`RoutingReplay.pass_`."""

    def __init__(
        self,
        owner: "RoutingReplay",
        micro: list,
        layout,
        *,
        training: bool,
        record: bool,
        replay: Optional[Union[torch.Tensor, RoutingRecord]],
        record_entropy: bool = False,
        positions: Optional[torch.Tensor] = None,
    ):
        self.owner = owner
        self.training = training
        self.record = record
        self.record_entropy = record_entropy
        assert len(micro) == layout.num_microbatches
        self._micro_index = {id(mb): i for i, mb in enumerate(micro)}
        # Local rows and width of each micro-batch (a MicroBatchLayout).
        self._rows = layout.rows
        self._widths = layout.widths
        self._num_local = layout.num_local
        self._seq_len = layout.width
        # The batch was this data-parallel rank's share: replay routings are not sliced, records not gathered.
        self._local = layout.local
        # Packed sequences: each micro-batch's SequencePacking (megatron's token order is the packed order).
        self._packing = layout.packing
        self._records: dict[tuple[int, int], torch.Tensor] = {}
        self._entropies: dict[tuple[int, int], torch.Tensor] = {}
        self._keep: Optional[torch.Tensor] = None
        self._keep_micro: list[torch.Tensor] = []
        self._keep_packed: list[torch.Tensor] = []
        if record:
            assert positions is not None, "a recording pass needs the positions to keep"
            self._keep = self._local_positions(positions, layout.padded_size)
            self._keep_micro = [
                self._keep[rows, :width].to(owner.device) for rows, width in zip(self._rows, self._widths)
            ]
            if self._packing is not None:
                # The kept positions in packed order, bool [packed length] (False in the rounding tail).
                self._keep_packed = [
                    packing.pack(self._keep[rows, :width], fill=False).to(owner.device)
                    for packing, rows, width in zip(self._packing, self._rows, self._widths)
                ]
        self._replay_local = None if replay is None else self._local_replay(replay, layout.padded_size)
        self._replay_cache: Optional[tuple[int, torch.Tensor]] = None

    def _dp_slice(self, padded_size: int) -> slice:
        """This data-parallel rank's rows of the padded batch (the whole share when the pass runs on a share)."""
        from megatron.core import parallel_state as mpu

        if self._local:
            return slice(0, padded_size)
        per_rank = padded_size // mpu.get_data_parallel_world_size()
        assert per_rank == self._num_local, (per_rank, self._num_local)
        start = mpu.get_data_parallel_rank() * per_rank
        return slice(start, start + per_rank)

    def _local_positions(self, positions: torch.Tensor, padded_size: int) -> torch.Tensor:
        """The positions to record, bool ``[num_local, width]`` over this rank's rows, none past a micro-batch's
        width (a token-budget micro-batch stops after its rows' last loss position) nor in padding rows."""
        rows, seq = positions.shape
        keep = torch.zeros(padded_size, self._seq_len, dtype=torch.bool)
        keep[:rows, :seq] = positions.cpu()
        keep = keep[self._dp_slice(padded_size)].clone()
        for rows_, width in zip(self._rows, self._widths):
            keep[rows_, width:] = False
        if self._packing is not None:
            # A packed row holds only its own length: positions after it are not computed (and not recorded).
            lengths = torch.zeros(keep.shape[0], dtype=torch.int64)
            for rows_, packing in zip(self._rows, self._packing):
                lengths[rows_] = torch.tensor(packing.lengths, dtype=torch.int64)
            keep &= torch.arange(keep.shape[1])[None, :] < lengths[:, None]
        return keep

    def _packing_at(self, index: int):
        return None if self._packing is None else self._packing[index]

    def _local_replay(self, routing, padded_size: int):
        """This data-parallel rank's rows of the padded batch (full width), as the actor pads and slices it."""
        extra_rows = padded_size - (routing.rows if isinstance(routing, RoutingRecord) else routing.shape[0])
        if isinstance(routing, RoutingRecord):
            if extra_rows:
                # TrainBatch.padded_to_multiple appends copies of row 0: same tokens, so the same routing.
                rows = torch.cat([torch.arange(routing.rows), torch.zeros(extra_rows, dtype=torch.long)])
                routing = routing.select(rows)
            return routing.select(self._dp_slice(padded_size)) if not self._local else routing
        if extra_rows:
            routing = torch.cat([routing, routing[:1].expand(extra_rows, *routing.shape[1:])], dim=0)
        extra_seq = self._seq_len - routing.shape[1]
        if extra_seq:
            routing = torch.nn.functional.pad(routing, (0, 0, 0, 0, 0, extra_seq), value=UNRECORDED)
        return routing[self._dp_slice(padded_size)]

    def _replay_of(self, index: int) -> torch.Tensor:
        """Micro-batch ``index``'s replay routing, int64 ``[rows, width, layers, topk]`` (``-1``: route freely);
        packed, ``[packed length, layers, topk]`` in packed order."""
        if self._replay_cache is not None and self._replay_cache[0] == index:
            return self._replay_cache[1]
        rows, width = self._rows[index], self._widths[index]
        if isinstance(self._replay_local, RoutingRecord):
            # Positions past the micro-batch's width are not computed in this pass: nothing to replay there.
            replay = self._replay_local.select(rows).truncated(width).dense(width, dtype=torch.int64)
        else:
            replay = self._replay_local[rows, :width]
        packing = self._packing_at(index)
        if packing is not None:
            replay = packing.pack(replay, fill=UNRECORDED)
        # Interleaved pipelines call before_forward once per model chunk: densify a micro-batch once.
        self._replay_cache = (index, replay)
        return replay

    # -- called by the actor's forward step and by the routers ------------------------------------------------
    def before_forward(self, chunk: torch.nn.Module, mb) -> None:
        """Points ``chunk``'s routers at micro-batch ``mb`` (and its slice of the replay routing)."""
        index = self._micro_index[id(mb)]
        replay = None
        packed = self._packing_at(index) is not None
        if self._replay_local is not None:
            replay = self._replay_of(index)
            if packed:
                # Already megatron's token order [s * b, layers, k] (b = 1): this rank's slice of the packed row.
                start, stop = self.owner.sequence_slice(replay.shape[0])
                replay = replay[start:stop]
            else:
                start, stop = self.owner.sequence_slice(replay.shape[1])
                replay = replay[:, start:stop]
        for layer in self.owner.layers_of(chunk):
            layer.micro_index = index
            if replay is None:
                layer.target_topk_idx = None
            elif packed:
                layer.target_topk_idx = replay[:, layer.moe_index].to(self.owner.device)
            else:
                # [b, s, k] -> megatron's token order [s * b, k].
                rows = replay[:, :, layer.moe_index].transpose(0, 1).reshape(-1, replay.shape[-1])
                layer.target_topk_idx = rows.to(self.owner.device)

    def store(self, moe_index: int, micro_index: int, indices: torch.Tensor) -> None:
        # Only the kept positions, compact, as the router runs: the pass never holds a dense routing.
        if self._packing is not None:
            keep = self._keep_packed[micro_index]
            start, stop = self.owner.sequence_slice(keep.shape[0])
            # Packed order visits the kept positions row by row: the kept tokens are already in (row, position) order.
            kept = indices.detach()[keep[start:stop].to(indices.device)]
            self._records[(moe_index, micro_index)] = kept.to(self.owner.record_dtype).cpu()
            return
        keep = self._keep_micro[micro_index]
        start, stop = self.owner.sequence_slice(keep.shape[1])
        # Megatron's token order [s_local * b, k] -> [b, s_local, k]; boolean indexing keeps (row, position) order.
        rows = indices.detach().reshape(stop - start, keep.shape[0], -1).transpose(0, 1)
        kept = rows[keep[:, start:stop].to(rows.device)]
        self._records[(moe_index, micro_index)] = kept.to(self.owner.record_dtype).cpu()

    def store_entropy(self, moe_index: int, micro_index: int, entropy: torch.Tensor) -> None:
        self._entropies[(moe_index, micro_index)] = entropy.detach().to(ENTROPY_DTYPE)

    # -- context manager ----------------------------------------------------------------------------------------
    def __enter__(self) -> "RoutingPass":
        if self.owner.current is not None:
            raise RuntimeError("a routing pass is already running on this model")
        self.owner.current = self
        return self

    def __exit__(self, *exc) -> None:
        self.owner.current = None
        self.owner.clear_layer_state()

    # -- result -----------------------------------------------------------------------------------------------
    def gather_record(self, batch_size: int) -> RoutingRecord:
        """The routing at the pass's positions as a :class:`RoutingRecord` of ``batch_size`` rows (this rank's
        share when the pass ran on a share, else the whole batch), on the CPU of every rank. Collective over the
        tensor-, pipeline- (and, for a whole batch, data-) parallel groups: all ranks call it."""
        from megatron.core import parallel_state as mpu

        assert self.record, "gather_record() needs a pass with record=True"
        owner = self.owner
        layers, topk = owner.num_moe_layers, owner.topk
        keep = self._keep
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(dim=1).cumsum(0)])
        experts = torch.empty((int(offsets[-1]), layers, topk), dtype=owner.record_dtype)
        # Each (token, MoE layer) is routed on exactly one tensor-parallel rank (sequence parallelism splits the
        # positions) and one pipeline stage (stages split the layers); elsewhere it holds -1, below every id.
        groups = []
        if owner.sequence_parallel and mpu.get_tensor_model_parallel_world_size() > 1:
            groups.append(mpu.get_tensor_model_parallel_group())
        if mpu.get_pipeline_model_parallel_world_size() > 1:
            groups.append(mpu.get_pipeline_model_parallel_group())
        for index, (rows, width) in enumerate(zip(self._rows, self._widths)):
            keep_micro = keep[rows, :width]
            tokens = int(keep_micro.sum())
            parts = [self._records.pop((m, index), None) for m in range(layers)]
            if groups:
                # int32: gloo and NCCL both reduce it (no int16 max in gloo); one micro-batch's worth at a time.
                micro = torch.full((tokens, layers, topk), UNRECORDED, dtype=torch.int32)
                if self._packing is not None:
                    # This rank routed a slice of the packed row; the packed order is the record's order.
                    keep_packed = self._keep_packed[index].cpu()
                    start, stop = owner.sequence_slice(keep_packed.shape[0])
                    slots = (keep_packed.cumsum(0) - 1)[start:stop][keep_packed[start:stop]]
                else:
                    start, stop = owner.sequence_slice(width)
                    slots = (keep_micro.reshape(-1).cumsum(0) - 1).reshape(keep_micro.shape)[:, start:stop]
                    slots = slots[keep_micro[:, start:stop]]
                for m, part in enumerate(parts):
                    if part is not None:
                        micro[slots, m] = part.to(torch.int32)
                if tokens:
                    # The peers hold the same rows and positions, so they all skip an empty micro-batch alike.
                    for group in groups:
                        collectives.all_reduce(micro, op=dist.ReduceOp.MAX, group=group)
                assert bool((micro >= 0).all()), "a kept (token, layer) was routed on no rank"
                micro = micro.to(owner.record_dtype)
            else:
                assert all(part is not None for part in parts) or tokens == 0, "a MoE layer recorded nothing"
                micro = (
                    torch.stack(parts, dim=1) if tokens else torch.empty((0, layers, topk), dtype=owner.record_dtype)
                )
            # The micro-batch's rows, in its own row order, go to their slots in the share's row order.
            experts[token_slots(offsets, rows)] = micro
        record = RoutingRecord(experts, keep.nonzero()[:, 1].to(POSITION_DTYPE), offsets, owner.num_experts)
        if mpu.get_data_parallel_world_size() > 1 and not self._local:
            # Only the whole-batch API (local=False) gathers; the trainer's shares never do.
            record = RoutingRecord.concat(collectives.all_gather_object(record, group=mpu.get_data_parallel_group()))
        return record if record.rows == batch_size else record.select(slice(0, batch_size))

    def gather(self, batch_size: int, seq_len: int) -> torch.Tensor:
        """The recorded routing as a dense int32 ``[batch_size, seq_len, layers, topk]`` (``-1`` where nothing was
        recorded) on the CPU of every rank; collective like :meth:`gather_record`."""
        return self.gather_record(batch_size).dense(seq_len, dtype=ROUTING_DTYPE)

    def gather_entropy(self, batch_size: int, seq_len: int) -> torch.Tensor:
        """The recorded router entropy of the whole batch, float32 ``[batch_size, seq_len, layers]`` (nats) on
        the CPU, on every rank; collective like :meth:`gather_record`."""
        assert self.record_entropy, "gather_entropy() needs a pass with record_entropy=True"
        # The other tensor-parallel ranks and pipeline stages hold 0: the sum is the owner's value, bit for bit.
        entropy = self._gather(self._entropies, (1,), 0.0, ENTROPY_DTYPE, dist.ReduceOp.SUM, batch_size, seq_len)
        return entropy[..., 0]

    def _gather(self, records: dict, tail: tuple, fill, dtype, op, batch_size: int, seq_len: int) -> torch.Tensor:
        """``records[(moe_index, micro_index)]`` (megatron's token order ``[s_local * b, *tail]``) assembled
        into ``[batch_size, seq_len, layers, *tail]`` over the tensor-, pipeline- and data-parallel groups.
        ``op`` combines a value with ``fill`` (held by every rank that did not route the token) into the value."""
        from megatron.core import parallel_state as mpu

        owner = self.owner
        local = torch.full(
            (self._num_local, self._seq_len, owner.num_moe_layers, *tail), fill, dtype=dtype, device=owner.device
        )
        for (moe_index, micro_index), values in records.items():
            packing = self._packing_at(micro_index)
            if packing is not None:
                # This rank's slice of the packed row, each real token back at its (row, position).
                start, stop = owner.sequence_slice(packing.total)
                real, rows, positions = packing.locate(start, stop)
                values = values.reshape(stop - start, *tail)[real.to(values.device)]
                local[self._rows[micro_index][rows].to(local.device), positions.to(local.device), moe_index] = values
                continue
            # Under sequence parallelism this rank routed its slice of the micro-batch's own width.
            start, stop = owner.sequence_slice(self._widths[micro_index])
            rows = values.reshape(stop - start, -1, *tail).transpose(0, 1)
            local[self._rows[micro_index].to(local.device), start:stop, moe_index] = rows
        if owner.sequence_parallel and mpu.get_tensor_model_parallel_world_size() > 1:
            # Micro-batches of different widths split at different positions: combine whole-width tensors.
            collectives.all_reduce(local, op=op, group=mpu.get_tensor_model_parallel_group())
        if mpu.get_pipeline_model_parallel_world_size() > 1:
            collectives.all_reduce(local, op=op, group=mpu.get_pipeline_model_parallel_group())
        if mpu.get_data_parallel_world_size() > 1 and not self._local:
            local = _all_gather_cat(local, dim=0, group=mpu.get_data_parallel_group())
        return local[:batch_size, :seq_len].cpu()


def _all_gather_cat(tensor: torch.Tensor, *, dim: int, group) -> torch.Tensor:
    return torch.cat(collectives.all_gather(tensor, group=group), dim=dim)


class RoutingReplay:
    """Records / replays the top-k expert choice of every MoE router in this rank's model chunks.

    ``chunks`` are the (DDP-wrapped or bare) model chunks the schedule runs. ``install()`` puts a replay
    object on each ``TopKRouter``; ``remove()`` restores what was there. While no :class:`RoutingPass` runs,
    the routers compute their top-k exactly as without it.
    """

    def __init__(self, chunks: Sequence[torch.nn.Module]):
        TopKRouter, _ = _megatron_router_classes()
        self.chunks = list(chunks)
        self.current: Optional[RoutingPass] = None
        self._routers: dict[int, list] = {}
        self._saved: list = []
        self._layers: dict[int, list] = {}
        config = None
        for chunk in self.chunks:
            routers = [m for m in _unwrap(chunk).modules() if isinstance(m, TopKRouter)]
            self._routers[id(chunk)] = routers
            for router in routers:
                config = router.config
        if config is None:
            # The pipeline stage may hold no MoE layer: the model's config still tells the layout.
            config = getattr(_unwrap(self.chunks[0]), "config", None)
        pattern = [0] * config.num_layers
        if config.num_moe_experts:
            # The MoE layers as the bridge wrote them into megatron's config (sapo_megatron.bridge.moe_layer_pattern,
            # one entry per layer); megatron's int shorthand never reaches a model the bridge built.
            assert isinstance(config.moe_layer_freq, list) and len(config.moe_layer_freq) == config.num_layers, (
                f"moe_layer_freq={config.moe_layer_freq!r}: expected the bridge's list of {config.num_layers} layers"
            )
            pattern = [int(bool(x)) for x in config.moe_layer_freq]
        if not any(pattern):
            raise ValueError("routing record / replay needs a model with MoE layers; this one has none")
        if config.context_parallel_size > 1:
            raise ValueError(
                "routing record / replay with parallel.context > 1 is not supported: context parallelism reorders "
                "the sequence across ranks"
            )
        if config.moe_router_fusion:
            raise ValueError("routing record / replay needs moe_router_fusion=False (the fused kernel has no hook)")
        if config.moe_router_load_balancing_type == "sinkhorn":
            raise ValueError("routing record / replay does not cover sinkhorn routing (it bypasses the top-k hook)")
        self.config = config
        self._moe_index = {layer: sum(pattern[:layer]) for layer in range(len(pattern)) if pattern[layer]}
        self.num_moe_layers = sum(pattern)
        self.topk = config.moe_router_topk
        self.num_experts = config.num_moe_experts
        # Recorded ids are kept in the smallest dtype that holds them (uint8 up to 256 experts).
        self.record_dtype = routing_dtype(self.num_experts)
        self.sequence_parallel = bool(config.sequence_parallel)
        self.device = torch.device("cpu")

    def check_entropy_supported(self) -> None:
        if self.config.moe_router_score_function != "softmax":
            raise ValueError(
                "router entropy is the entropy of the router's softmax over all experts; this model's router "
                f"scores with {self.config.moe_router_score_function!r}"
            )

    def router_entropy(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-token entropy (nats) ``[tokens]`` of the softmax over all routed experts, from the scores
        megatron's top-k hook receives: the router logits, or already their softmax with pre-softmax routing."""
        scores = scores.detach().float()
        if self.config.moe_router_pre_softmax:
            # xlogy: 0 log 0 = 0, an expert with probability 0 adds nothing.
            return -torch.special.xlogy(scores, scores).sum(dim=-1)
        return softmax_entropy(scores)

    # -- hooks ------------------------------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        return bool(self._saved)

    def install(self) -> "RoutingReplay":
        if self.installed:
            raise RuntimeError("RoutingReplay.install: already installed")
        LayerReplay = _layer_replay_class()
        for chunk in self.chunks:
            layers = []
            for router in self._routers[id(chunk)]:
                assert router.layer_number is not None, "a TopKRouter without its layer number"
                layer = LayerReplay(self, self._moe_index[router.layer_number - 1])
                self._saved.append((router, router.router_replay))
                router.router_replay = layer
                layers.append(layer)
                self.device = router.weight.device
            self._layers[id(chunk)] = layers
        if not self._saved:
            # A stage without MoE layers still takes part in the collectives of a pass.
            self._saved.append((None, None))
        return self

    def remove(self) -> None:
        for router, previous in self._saved:
            if router is not None:
                router.router_replay = previous
        self._saved.clear()
        self._layers.clear()

    def __enter__(self) -> "RoutingReplay":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- used by RoutingPass ------------------------------------------------------------------------------------
    def layers_of(self, chunk: torch.nn.Module) -> list:
        return self._layers.get(id(chunk), [])

    def clear_layer_state(self) -> None:
        for layers in self._layers.values():
            for layer in layers:
                layer.clear_indices()
                layer.micro_index = None

    def sequence_slice(self, seq_len: int) -> tuple[int, int]:
        """The positions this tensor-parallel rank routes (all of them without sequence parallelism)."""
        from megatron.core import parallel_state as mpu

        tp = mpu.get_tensor_model_parallel_world_size()
        if not self.sequence_parallel or tp == 1:
            return 0, seq_len
        assert seq_len % tp == 0, f"sequence length {seq_len} does not divide over {tp} TP ranks"
        step = seq_len // tp
        rank = mpu.get_tensor_model_parallel_rank()
        return rank * step, (rank + 1) * step

    def pass_(
        self,
        micro: list,
        layout,
        *,
        training: bool,
        record: bool,
        replay: Optional[Union[torch.Tensor, RoutingRecord]] = None,
        record_entropy: bool = False,
        positions: Optional[torch.Tensor] = None,
    ) -> RoutingPass:
        """A context for one schedule run over ``micro`` (this rank's micro-batches, laid out as ``layout``, a
        :class:`~sapo_megatron.actor.micro_batching.MicroBatchLayout`). ``replay`` is the batch's routing (dense
        or a record), already checked (:meth:`check`); ``record`` keeps the routing at ``positions`` (bool
        ``[batch, seq]``, see :meth:`RoutingPass.gather_record`);
        ``record_entropy`` also records each router's entropy per token (:meth:`RoutingPass.gather_entropy`)."""
        if not self.installed:
            raise RuntimeError("RoutingReplay: install() before running a routing pass")
        if record_entropy:
            self.check_entropy_supported()
        return RoutingPass(
            self,
            micro,
            layout,
            training=training,
            record=record,
            replay=replay,
            record_entropy=record_entropy,
            positions=positions,
        )

    def check(
        self, routing: Union[torch.Tensor, RoutingRecord], batch_size: int, seq_len: int, name: str = "replay_routing"
    ) -> Union[torch.Tensor, RoutingRecord]:
        if isinstance(routing, RoutingRecord):
            return check_record(routing, batch_size, seq_len, self.num_moe_layers, self.topk, self.num_experts, name)
        shape = (batch_size, seq_len, self.num_moe_layers, self.topk)
        check_routing(routing, name=name, num_experts=self.num_experts, shape=shape, whole_topk=True)
        return routing.detach().to("cpu", torch.int64)


class NullRoutingPass:
    """The routing context of a pass that neither records nor replays: every call is a no-op."""

    def before_forward(self, chunk: torch.nn.Module, mb) -> None:
        pass

    def __enter__(self) -> "NullRoutingPass":
        return self

    def __exit__(self, *exc) -> None:
        pass


NO_ROUTING = NullRoutingPass()


def open_routing_pass(
    policy,
    batch,
    micro: list,
    layout,
    *,
    training: bool,
    record: bool,
    replay: Optional[Union[torch.Tensor, RoutingRecord]],
    record_entropy: bool = False,
    positions: Optional[torch.Tensor] = None,
):
    """The routing context for one of ``policy``'s schedule runs over ``batch``.

    ``positions`` (bool ``[batch, seq]``, with ``record``): the positions whose routing the pass keeps, each at
    or before its row's last loss position (:func:`~sapo_megatron.routing_layout.replay_positions`); ``None``
    keeps every position (the dense result). The policy's :class:`RoutingReplay` is created and installed on
    first use (``policy._routing``), so a policy that never records or replays runs megatron's routers untouched.
    """
    if positions is not None and not record:
        raise ValueError("routing_positions is given but record_routing is off: the positions say what to record")
    if not record and not record_entropy and replay is None:
        return NO_ROUTING
    if policy._routing is None:
        policy._routing = RoutingReplay(policy.model).install()
    routing = policy._routing
    if replay is not None:
        replay = routing.check(replay, batch.size, batch.seq_len)
    if record:
        positions = check_positions(positions, batch.loss_mask) if positions is not None else (
            torch.ones(batch.size, batch.seq_len, dtype=torch.bool)
        )
    return routing.pass_(
        micro,
        layout,
        training=training,
        record=record,
        replay=replay,
        record_entropy=record_entropy,
        positions=positions,
    )
