"""The Megatron-core actor: forward-only log-probs and policy-loss updates through Megatron's schedules.

Every rank holds the whole rollout batch (it is small next to the model); each data-parallel rank takes its
contiguous slice, splits it into micro-batches (``trainer.micro_batch_size`` rows each, or by the token budget
``trainer.max_tokens_per_micro_batch``: :mod:`sapo_megatron.actor.micro_batching`) and hands them to
``get_forward_backward_func()``. The policy loss runs inside the schedule's loss function on the last
pipeline stage, on the vocab-parallel logits (the full vocabulary is never gathered). Losses are normalised
by the global token / sequence counts of the mini-batch, and :mod:`sapo_megatron.actor.loss_adapter` undoes
Megatron's own averaging, so the update equals the algorithm core's loss on the whole mini-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from sapo_megatron import collectives
from sapo_megatron.actor.batch import TrainBatch
from sapo_megatron.actor.logprobs import vocab_parallel_logprobs
from sapo_megatron.actor.loss_adapter import MegatronLossScale
from sapo_megatron.actor.micro_batching import MicroBatchLayout, group_by_token_budget, round_up, row_lengths
from sapo_megatron.actor.model import causal_mask
from sapo_megatron.actor.packing import SequencePacking, check_packing_supported, packed_seq_params
from sapo_megatron.actor.routing_replay import open_routing_pass
from sapo_megatron.algorithms import reduce_metrics
from sapo_megatron.algorithms.loss import TrainingLoss
from sapo_megatron.routing_layout import RoutingRecord


@dataclass
class ForwardPass:
    """What :meth:`MegatronPolicy.compute_logprobs` returns; what it was not asked for is ``None``.

    ``logprobs`` (and ``entropy``) ``[B, S]``; ``routing``: a
    :class:`~sapo_megatron.routing_layout.RoutingRecord` of the requested positions, or the dense int32
    ``[B, S, layers, topk]``; ``router_entropy`` float32 ``[B, S, layers]`` (nats)."""

    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    routing: Any = None
    router_entropy: Optional[torch.Tensor] = None


@dataclass
class UpdateResult:
    """What :meth:`MegatronPolicy.train_mini_batch` returns.

    ``losses``: the step's loss and its terms (``loss``, ``pg_loss``, and ``kl_loss`` / ``entropy_loss`` when
    the loss has them), each the mini-batch's value summed over micro-batches and ranks, plus ``grad_norm``
    (before clipping) and ``update_skipped``. ``metrics``: the policy loss's own statistics, reduced exactly
    over micro-batches and ranks (ratio moments, gate or clip fractions, ``kl_mean``...). ``routing`` and
    ``logprobs`` (the update forward's ``[B, S]``) when asked for."""

    losses: dict[str, float]
    metrics: dict[str, float]
    routing: Any = None
    logprobs: Optional[torch.Tensor] = None

    def scalars(self) -> dict[str, float]:
        """Every number of the step in one dict (tests compare them across layouts)."""
        return {**self.metrics, **self.losses}


class MegatronPolicy:
    """Runs micro-batches of a :class:`TrainBatch` through Megatron's forward/backward schedule.

    It owns no model construction: ``model`` is the list of (DDP-wrapped) model chunks of this rank,
    ``optimizer`` / ``scheduler`` are megatron-core's. ``loss`` is the algorithm core's
    :class:`~sapo_megatron.algorithms.loss.TrainingLoss` (policy loss, KL to the reference, entropy bonus),
    built once from the config; the pipeline's loss function calls it on each micro-batch and nothing else.
    ``policy_loss``, ``kl_coef``, ``kl_estimator``, ``entropy_coef`` and ``reduction`` read through to it.

    ``max_tokens_per_micro_batch > 0`` forms micro-batches by padded tokens instead of ``micro_batch_size``
    rows (first-fit decreasing, each padded only to its own longest row); losses, gradients and metrics are
    those of the fixed split up to fp32 summation order. Per-position outputs then hold 0 (log-probs,
    entropy, router entropy) or -1 (routing) after each row's last loss position: those positions predict
    right padding, and no loss, metric or diagnostic reads them.

    ``pack_sequences`` (with a token budget; Transformer Engine attention, so a GPU) lays each micro-batch's
    rows end to end in one row with megatron-core's THD ``packed_seq_params`` instead of padding them to the
    longest (:mod:`sapo_megatron.actor.packing`); the budget then counts packed tokens. The per-token outputs
    are unpacked to the micro-batch's ``[rows, width]`` before the loss, so results and routing records have
    the same layout as without packing.
    """

    def __init__(
        self,
        model: list,
        *,
        optimizer=None,
        scheduler=None,
        loss: Optional[TrainingLoss] = None,
        micro_batch_size: int,
        temperature: float = 1.0,
        device: torch.device | str = "cpu",
        sequence_multiple: int = 1,
        max_tokens_per_micro_batch: int = 0,
        pack_sequences: bool = False,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size}: must be >= 1")
        if max_tokens_per_micro_batch < 0:
            raise ValueError(
                f"max_tokens_per_micro_batch={max_tokens_per_micro_batch}: must be >= 0 (0 = micro_batch_size rows)"
            )
        if pack_sequences and not max_tokens_per_micro_batch:
            raise ValueError(
                "pack_sequences=True needs max_tokens_per_micro_batch > 0: packed rows are grouped by a token budget"
            )
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss = loss
        self.micro_batch_size = micro_batch_size
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.pack_sequences = pack_sequences
        self._packing_checked = False
        self.temperature = temperature
        self.device = torch.device(device)
        # With sequence parallelism the sequence is split across TP ranks, so its length must divide.
        self.sequence_multiple = sequence_multiple
        # MoE routing record / replay hooks, installed on first use (sapo_megatron.actor.routing_replay).
        self._routing = None

    # -- the loss's settings, read from the one loss object ------------------------------------------------
    @property
    def policy_loss(self) -> Optional[Callable]:
        return None if self.loss is None else self.loss.policy_loss

    @policy_loss.setter
    def policy_loss(self, policy_loss: Callable) -> None:
        # Swaps the policy term only (the supervised warm-up's NLL); KL and entropy settings stay. To run
        # without them, assign a whole TrainingLoss to ``self.loss`` instead.
        if self.loss is None:
            raise ValueError("MegatronPolicy.policy_loss: no loss to change; assign a TrainingLoss to .loss")
        self.loss = replace(self.loss, policy_loss=policy_loss)

    @property
    def kl_coef(self) -> float:
        return 0.0 if self.loss is None else self.loss.kl_coef

    @property
    def kl_estimator(self) -> Optional[str]:
        return None if self.loss is None else self.loss.kl_estimator

    @property
    def entropy_coef(self) -> float:
        return 0.0 if self.loss is None else self.loss.entropy_coef

    @property
    def reduction(self) -> Optional[str]:
        return None if self.loss is None else self.loss.reduction

    # -- parallel layout -----------------------------------------------------------------------------------
    @staticmethod
    def _mpu():
        from megatron.core import parallel_state

        return parallel_state

    def _dp(self) -> tuple[int, int]:
        mpu = self._mpu()
        return mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()

    def _local_micro_batches(self, batch: TrainBatch, *, local: bool = False) -> tuple[list[TrainBatch], MicroBatchLayout]:
        """This data-parallel rank's micro-batches of ``batch`` and where their rows and positions come from.

        ``local=False``: ``batch`` is the whole batch, the same on every rank; each data-parallel rank takes its
        contiguous slice. ``local=True``: ``batch`` is already this rank's share (each rank holds different
        rows); with fixed micro-batches every rank pads to the largest share's rows and width, so that the
        micro-batches, and the results, are those of the whole batch split over the ranks."""
        dp_rank, dp_size = self._dp()
        budget = self.max_tokens_per_micro_batch
        # A pass takes its replay routing as an argument: the batch's records do not ride in the micro-batches.
        batch = batch.without_routing()
        if local:
            multiple = 1 if budget else self.micro_batch_size
            rows_needed, width_needed = batch.size + (-batch.size) % multiple, batch.seq_len
            if not budget:
                rows_needed, width_needed = self._max_over_data_parallel(rows_needed, width_needed)
            padded = batch.padded_to_multiple(rows_needed) if batch.size < rows_needed else batch
            padded = padded.widened(width_needed).with_seq_len_multiple(self.sequence_multiple)
            per_rank, local_batch = padded.size, padded
        else:
            rows_multiple = dp_size if budget else dp_size * self.micro_batch_size
            padded = batch.padded_to_multiple(rows_multiple).with_seq_len_multiple(self.sequence_multiple)
            per_rank = padded.size // dp_size
            local_batch = padded.select(slice(dp_rank * per_rank, (dp_rank + 1) * per_rank))
        packing = None
        if not budget:
            starts = range(0, per_rank, self.micro_batch_size)
            rows = [torch.arange(i, i + self.micro_batch_size) for i in starts]
            micro = [local_batch.select(slice(i, i + self.micro_batch_size)) for i in starts]
            widths = [padded.seq_len] * len(micro)
        else:
            self._check_token_budget_layout()
            lengths = row_lengths(local_batch.loss_mask).tolist()
            grouping = dict(multiple=self.sequence_multiple, packed=self.pack_sequences)
            groups = group_by_token_budget(lengths, budget, **grouping)
            (count,) = self._max_over_data_parallel(len(groups))
            if count != len(groups):
                groups = group_by_token_budget(lengths, budget, num_groups=count, **grouping)
            rows = [torch.tensor(group, dtype=torch.int64) for group in groups]
            if self.pack_sequences:
                # Only the packed row is rounded for sequence parallelism; the host-side [rows, width] layout
                # of a micro-batch is its longest row.
                widths = [max(lengths[i] for i in group) for group in groups]
                packing = tuple(
                    SequencePacking.plan([lengths[i] for i in group], width, self.sequence_multiple)
                    for group, width in zip(groups, widths)
                )
            else:
                widths = [round_up(max(lengths[i] for i in group), self.sequence_multiple) for group in groups]
            micro = [local_batch.select(index).narrowed(width) for index, width in zip(rows, widths)]
        layout = MicroBatchLayout(
            rows=tuple(rows), widths=tuple(widths), padded_size=padded.size, num_local=per_rank, width=padded.seq_len,
            local=local, packing=packing,
        )
        return micro, layout

    def _max_over_data_parallel(self, *values: int) -> tuple[int, ...]:
        # Every rank of a schedule runs the same number of micro-batches; the pipeline and tensor-parallel
        # peers of a rank hold the same rows, so agreeing over the data-parallel group is enough.
        return self._over_data_parallel(values, collectives.ReduceOp.MAX)

    def _over_data_parallel(self, values, op) -> tuple[int, ...]:
        """Integers reduced with ``op`` over the data-parallel group (one collective for all of them)."""
        _, dp_size = self._dp()
        if dp_size == 1:
            return tuple(int(v) for v in values)
        tensor = torch.tensor(list(values), dtype=torch.int64, device=self._collective_device())
        collectives.all_reduce(tensor, op=op, group=self._mpu().get_data_parallel_group())
        return tuple(int(v) for v in tensor.tolist())

    def _collective_device(self) -> torch.device:
        # NCCL groups take CUDA tensors; gloo takes CPU tensors.
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _check_token_budget_layout(self) -> None:
        from megatron.core.utils import get_model_config

        mpu = self._mpu()
        config = get_model_config(self.model[0])
        dispatcher = getattr(config, "moe_token_dispatcher_type", None)
        # The expert groups span data-parallel ranks when they are larger than the tensor-parallel group.
        experts_span_data = (
            mpu.get_expert_tensor_and_model_parallel_world_size() > mpu.get_tensor_model_parallel_world_size()
        )
        if config.num_moe_experts and dispatcher == "allgather" and experts_span_data:
            # Those ranks hold different rows, so with a token budget their micro-batches differ in size, and
            # the allgather dispatcher gathers equal-sized blocks (megatron rejects the combination).
            raise ValueError(
                "trainer.max_tokens_per_micro_batch > 0 with experts split over data-parallel ranks (parallel.expert "
                "x parallel.expert_tensor > parallel.tensor) needs parallel.moe_token_dispatcher=alltoall: the "
                "allgather dispatcher cannot take micro-batches of different sizes on those ranks"
            )
        if getattr(config, "context_parallel_size", 1) > 1:
            raise ValueError("trainer.max_tokens_per_micro_batch > 0 with parallel.context > 1 is not supported")
        if self.pack_sequences and not self._packing_checked:
            # Once: the model's attention does not change between passes.
            check_packing_supported(self.model)
            self._packing_checked = True

    @staticmethod
    def _packing_of(micro: list[TrainBatch], layout: MicroBatchLayout) -> dict[int, SequencePacking]:
        """Each micro-batch's packing by ``id`` (what the forward step gets from the data iterator); empty
        without packed sequences."""
        if layout.packing is None:
            return {}
        return {id(mb): packing for mb, packing in zip(micro, layout.packing)}

    def _data_iterators(self, micro: list[TrainBatch]):
        # Interleaved pipelines take one iterator per model chunk, each yielding the same micro-batches.
        if len(self.model) > 1:
            return [iter(micro) for _ in self.model]
        return iter(micro)

    def _run_schedule(
        self, micro: list[TrainBatch], layout: MicroBatchLayout, forward_step, *, forward_only: bool
    ) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_model_config

        fb = get_forward_backward_func()
        config = get_model_config(self.model[0])
        # Pipeline stages post receive buffers of shape [seq_length, micro_batch_size, hidden] unless megatron
        # exchanges each activation's shape first (variable_seq_lengths), which token-budget micro-batches need.
        # Set for every token-budget run (not only non-uniform ones) so that all stages agree without a collective.
        variable = bool(self.max_tokens_per_micro_batch) and self._mpu().get_pipeline_model_parallel_world_size() > 1
        saved = config.variable_seq_lengths
        config.variable_seq_lengths = saved or variable
        # A packed micro-batch reaches the model as one row of its packed length.
        micro_batch_size, seq_length = layout.model_shapes()[0]
        try:
            return fb(
                forward_step_func=forward_step,
                data_iterator=self._data_iterators(micro),
                model=self.model if len(self.model) > 1 else self.model[0],
                num_microbatches=len(micro),
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=forward_only,
            )
        finally:
            config.variable_seq_lengths = saved

    # -- the model call ------------------------------------------------------------------------------------
    def _logits(self, model, mb: TrainBatch, packing: Optional[SequencePacking] = None) -> torch.Tensor:
        if packing is not None:
            tokens = packing.pack(mb.tokens).unsqueeze(0).to(self.device)
            position_ids = packing.position_ids.unsqueeze(0).to(self.device)
            # No mask: THD attention keeps each token inside its cu_seqlens segment (TE's padding-causal mask).
            return model(tokens, position_ids, None, packed_seq_params=packed_seq_params(packing, self.device))
        seq = mb.seq_len
        tokens = mb.tokens.to(self.device)
        position_ids = torch.arange(seq, device=self.device).unsqueeze(0).expand_as(tokens)
        # An explicit mask: megatron-core builds its default causal mask on "cuda".
        return model(tokens, position_ids, causal_mask(seq, self.device))

    def _token_logprobs(
        self,
        logits: torch.Tensor,
        mb: TrainBatch,
        with_entropy: bool,
        *,
        training: bool = False,
        packing: Optional[SequencePacking] = None,
    ):
        mpu = self._mpu()
        tp_group = mpu.get_tensor_model_parallel_group() if mpu.get_tensor_model_parallel_world_size() > 1 else None
        labels = mb.labels if packing is None else packing.pack(mb.labels).unsqueeze(0)
        # GPTModel returns [b, s, v/tp] ([1, packed, v/tp] when packed); the log-probs come back as [b, s].
        logprobs, entropy = vocab_parallel_logprobs(
            logits,
            labels.to(logits.device),
            tp_group=tp_group,
            temperature=self.temperature,
            with_entropy=with_entropy,
            # The logits are not used after the loss: backward may reuse their storage (far less memory).
            inplace_backward=training,
        )
        if packing is not None:
            # Back to the micro-batch's [rows, width]: the loss, the metrics and the outputs never see the packing.
            logprobs = packing.unpack(logprobs[0])
            entropy = None if entropy is None else packing.unpack(entropy[0])
        return logprobs, entropy

    # -- forward only: logprobs_old / reference log-probs -------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(
        self,
        batch: TrainBatch,
        *,
        with_entropy: bool = False,
        record_routing: bool = False,
        routing_positions: Optional[torch.Tensor] = None,
        replay_routing: Optional[torch.Tensor | RoutingRecord] = None,
        record_router_entropy: bool = False,
        local: bool = False,
    ):
        """Per-position log-probs [B, S] (and entropy) of ``batch.tokens`` under the current weights.

        Every rank returns the full result: computed on the last pipeline stage, broadcast over the
        pipeline group, gathered over data-parallel ranks. With ``local=True`` ``batch`` is this data-parallel
        rank's share (the ranks hold different rows) and so is the result: nothing is gathered. ``record_routing`` appends the MoE routing of the
        pass: with ``routing_positions`` (bool ``[B, S]``, each at or before its row's last loss position) a
        :class:`~sapo_megatron.routing_layout.RoutingRecord` of those positions, kept per micro-batch; without,
        int32 ``[B, S, num_moe_layers, topk]`` (every position: for small batches). ``replay_routing`` (a
        record, or the dense layout with ``-1`` = route normally) forces the routers' expert choice (see
        :mod:`sapo_megatron.actor.routing_replay`).
        ``record_router_entropy`` appends each MoE router's per-token entropy (nats) of its softmax over all
        experts, float32 ``[B, S, num_moe_layers]``.
        Returns a :class:`ForwardPass`.
        """
        micro, layout = self._local_micro_batches(batch, local=local)
        routing = open_routing_pass(
            self,
            batch,
            micro,
            layout,
            training=False,
            record=record_routing,
            replay=replay_routing,
            record_entropy=record_router_entropy,
            positions=routing_positions,
        )

        packings = self._packing_of(micro, layout)

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            packing = packings.get(id(mb))
            routing.before_forward(model, mb)
            logits = self._logits(model, mb, packing)

            def loss_func(output):
                lp, ent = self._token_logprobs(output, mb, with_entropy, packing=packing)
                out = {"logprobs": lp.float().cpu()}
                if ent is not None:
                    out["entropy"] = ent.float().cpu()
                return torch.zeros((), device=output.device), out

            return logits, loss_func

        for m in self.model:
            m.eval()
        with routing:
            outputs = self._run_schedule(micro, layout, forward_step, forward_only=True)
        for m in self.model:
            m.train()
        result = ForwardPass(logprobs=self._gather_token_outputs(outputs, "logprobs", layout, batch))
        if with_entropy:
            result.entropy = self._gather_token_outputs(outputs, "entropy", layout, batch)
        if record_routing:
            result.routing = self._routing_result(routing, batch, routing_positions)
        if record_router_entropy:
            result.router_entropy = self._beyond_loss_filled(
                routing.gather_entropy(batch.size, batch.seq_len), batch, 0.0
            )
        return result

    def _routing_result(self, routing, batch: TrainBatch, positions: Optional[torch.Tensor]):
        """The pass's recorded routing: a record of ``positions``, or (without) the dense layout."""
        if positions is not None:
            return routing.gather_record(batch.size)
        return self._beyond_loss_filled(routing.gather(batch.size, batch.seq_len), batch, -1)

    def _beyond_loss_filled(self, values: torch.Tensor, batch: TrainBatch, fill) -> torch.Tensor:
        """``values`` [B, S, ...] with ``fill`` after each row's last loss position, under a token budget:
        there the positions were cut from the micro-batch, or predict padding with a truncated label."""
        if not self.max_tokens_per_micro_batch:
            return values
        # row_lengths is the last loss position + 2; positions up to the last loss position are kept.
        keep = torch.arange(batch.seq_len)[None, :] < (row_lengths(batch.loss_mask) - 1)[:, None]
        keep = keep.reshape(*keep.shape, *([1] * (values.dim() - 2)))
        return torch.where(keep, values, torch.full((), fill, dtype=values.dtype))

    def _gather_token_outputs(
        self, outputs: list, key: str, layout: MicroBatchLayout, batch: TrainBatch
    ) -> torch.Tensor:
        """``[B, S]`` values that the last pipeline stage's loss function returned per micro-batch, on every
        rank, in the batch's row order: broadcast over the pipeline group, gathered over data-parallel ranks,
        padding cut off."""
        mpu = self._mpu()
        # The full width, which sequence parallelism may have padded beyond batch.seq_len: every rank of the
        # broadcast below must post a buffer of the last stage's shape.
        if mpu.is_pipeline_last_stage(ignore_virtual=True):
            local = layout.assemble([o[key] for o in outputs]).float()
        else:
            local = torch.empty(layout.num_local, layout.width, dtype=torch.float32)
        if mpu.get_pipeline_model_parallel_world_size() > 1:
            src = mpu.get_pipeline_model_parallel_last_rank()
            collectives.broadcast(local, src=src, group=mpu.get_pipeline_model_parallel_group())
        _, dp_size = self._dp()
        if dp_size > 1 and not layout.local:
            local = torch.cat(collectives.all_gather(local, group=mpu.get_data_parallel_group()), dim=0)
        return self._beyond_loss_filled(local[: batch.size, : batch.seq_len], batch, 0.0)

    # -- one optimizer step on a mini-batch ---------------------------------------------------------------
    def train_mini_batch(
        self,
        batch: TrainBatch,
        *,
        record_routing: bool = False,
        routing_positions: Optional[torch.Tensor] = None,
        replay_routing: Optional[torch.Tensor | RoutingRecord] = None,
        return_logprobs: bool = False,
        local: bool = False,
        loss: Optional[TrainingLoss] = None,
        advance_schedule: bool = True,
    ):
        """One optimizer step with the policy loss on ``batch`` (a mini-batch). Returns an :class:`UpdateResult`.

        ``loss``: this step's loss instead of the policy's own (the supervised warm-up's NLL);
        ``advance_schedule=False``: the LR scheduler does not count the step (steps outside the RL schedule).

        ``local=True``: ``batch`` is this data-parallel rank's share of the mini-batch (the loss is normalised
        by the counts summed over the ranks, so the step equals the whole mini-batch's); the per-token
        results are this share's.

        ``replay_routing`` (a :class:`~sapo_megatron.routing_layout.RoutingRecord`, or int32
        ``[B, S, num_moe_layers, topk]`` with ``-1`` = route normally) forces the routers' expert choice in the
        update's forward (and any recomputation); ``record_routing`` adds the routing the update used (a record
        of ``routing_positions`` when given, as in :meth:`compute_logprobs`); ``return_logprobs`` adds the
        per-token log-probs [B, S] of the update's forward (before the step: the ``logprobs`` of the ratio the
        loss saw). See :class:`UpdateResult`.
        """
        if batch.logprobs_old is None:
            raise ValueError("train_mini_batch needs batch.logprobs_old (run compute_logprobs first)")
        loss = self.loss if loss is None else loss
        if loss is None or self.optimizer is None:
            raise ValueError("train_mini_batch needs a loss (MegatronPolicy(loss=...) or loss=) and an optimizer")
        if loss.needs_reference and batch.logprobs_ref is None:
            raise ValueError("algorithm.kl_coef > 0 needs batch.logprobs_ref (the reference model's log-probs)")
        num_global_tokens, num_global_seqs = batch.num_valid_tokens(), batch.num_valid_sequences()
        if local:
            num_global_tokens, num_global_seqs = self._over_data_parallel(
                (num_global_tokens, num_global_seqs), collectives.ReduceOp.SUM
            )
        if num_global_tokens == 0:
            raise ValueError("the mini-batch has no response tokens (all-zero loss mask); nothing to train on")
        micro, layout = self._local_micro_batches(batch, local=local)
        routing = open_routing_pass(
            self,
            batch,
            micro,
            layout,
            training=True,
            record=record_routing,
            replay=replay_routing,
            positions=routing_positions,
        )
        _, dp_size = self._dp()
        scale = MegatronLossScale(num_microbatches=len(micro), data_parallel_size=dp_size)
        need_entropy = loss.needs_entropy
        counts = dict(num_global_tokens=num_global_tokens, num_global_seqs=num_global_seqs)

        packings = self._packing_of(micro, layout)

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            packing = packings.get(id(mb))
            routing.before_forward(model, mb)
            logits = self._logits(model, mb, packing)
            return logits, partial(self._loss_func, loss, mb, need_entropy, counts, scale, return_logprobs, packing)

        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        with routing:
            outputs = self._run_schedule(micro, layout, forward_step, forward_only=False)
        update_ok, grad_norm, _ = self.optimizer.step()
        if self.scheduler is not None and update_ok and advance_schedule:
            self.scheduler.step(increment=1)
        metrics, losses = self._reduce_metrics(outputs)
        losses["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        losses["update_skipped"] = 0.0 if update_ok else 1.0
        result = UpdateResult(losses=losses, metrics=metrics)
        if record_routing:
            result.routing = self._routing_result(routing, batch, routing_positions)
        if return_logprobs:
            result.logprobs = self._gather_token_outputs(outputs, "logprobs", layout, batch)
        return result

    def _loss_func(
        self,
        loss: TrainingLoss,
        mb: TrainBatch,
        need_entropy: bool,
        counts: dict,
        scale: MegatronLossScale,
        return_logprobs: bool,
        packing: Optional[SequencePacking],
        logits,
    ):
        logprobs, entropy = self._token_logprobs(logits, mb, need_entropy, training=True, packing=packing)
        device = logprobs.device
        # The reference's log-probs enter only through the KL term; without kl_coef > 0 they are not needed.
        use_ref = loss.needs_reference and mb.logprobs_ref is not None
        out = loss(
            logprobs,
            mb.logprobs_old.to(device),
            mb.advantages.to(device),
            mb.loss_mask.to(device),
            logprobs_ref=mb.logprobs_ref.to(device) if use_ref else None,
            entropy=entropy if need_entropy else None,
            # The behaviour-policy correction: constants on the policy-gradient term (None: unweighted).
            rollout_weights=None if mb.rollout_weights is None else mb.rollout_weights.to(device),
            **counts,
        )
        # Loss shares (normalised by global counts) add up over micro-batches and ranks.
        reported = {
            "metrics": {k: v.detach().cpu() for k, v in out.metrics.items()},
            "shares": {k: v.detach().double().cpu() for k, v in out.shares.items()},
        }
        if return_logprobs:
            reported["logprobs"] = logprobs.detach().float().cpu()
        return scale.to_megatron(out.loss), reported

    def _reduce_metrics(self, outputs: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
        """Exact cross-micro-batch and cross-rank reduction (the algorithm core's declared reductions): the
        loss's metrics, and the loss shares summed."""
        mpu = self._mpu()
        local = None
        if outputs:
            local = {
                "metrics": reduce_metrics([o["metrics"] for o in outputs]),
                "shares": {k: sum(o["shares"][k] for o in outputs) for k in outputs[0]["shares"]},
            }
        # Only the last pipeline stage ran the loss; share its result with the whole pipeline group.
        if mpu.get_pipeline_model_parallel_world_size() > 1:
            local = collectives.broadcast_object(
                local, src=mpu.get_pipeline_model_parallel_last_rank(), group=mpu.get_pipeline_model_parallel_group()
            )
        parts = [local]
        if mpu.get_data_parallel_world_size() > 1:
            parts = collectives.all_gather_object(local, group=mpu.get_data_parallel_group())
        merged = reduce_metrics([p["metrics"] for p in parts])
        metrics = {k: float(v) for k, v in merged.items()}
        losses = {key: float(sum(p["shares"][key] for p in parts)) for key in parts[0]["shares"]}
        return metrics, losses
