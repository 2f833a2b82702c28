"""Assembles the trainable actor from a config: model shards -> megatron DDP -> (distributed) optimizer ->
LR schedule -> :class:`MegatronPolicy`.

Weights are loaded through the bridge *before* the chunks are wrapped in DDP: megatron's DDP re-points each
parameter's storage into its contiguous buffers, and the parameter objects stay the same, so the unwrapped
chunks kept in :class:`ActorModel` keep serving the bridge's export (weight sync, HF conversion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from sapo_megatron.actor.actor import MegatronPolicy
from sapo_megatron.actor.model import ActorModel, build_model, params_dtype_of
from sapo_megatron.actor.offload import check_optimizer_offload
from sapo_megatron.actor.packing import check_packing_environment
from sapo_megatron.algorithms import training_loss_from_config
from sapo_megatron.config import Config


@dataclass
class Actor:
    """Everything one rank holds of the trainable policy."""

    model: ActorModel  # unwrapped chunks + bridge (export, checkpoint names)
    ddp_chunks: list  # the same chunks wrapped in megatron's DistributedDataParallel
    optimizer: Any
    scheduler: Any
    policy: MegatronPolicy


def build_megatron_optimizer(cfg: Config, chunks: list, *, total_steps: int):
    """megatron-core's Adam (distributed when configured) and its LR / weight-decay schedule."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = cfg.optimizer
    dtype = params_dtype_of(cfg.model.params_dtype)
    optimizer_config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=opt.use_distributed_optimizer,
        # GPU only (HybridDeviceOptimizer): optimizer states and the step live on the host. The fraction
        # defaults to 0 (nothing offloaded) in megatron; the whole optimizer goes, which needs the
        # precision-aware optimizer (fp32 states beside bf16 parameters).
        optimizer_cpu_offload=opt.optimizer_cpu_offload,
        optimizer_offload_fraction=1.0 if opt.optimizer_cpu_offload else 0.0,
        use_precision_aware_optimizer=opt.optimizer_cpu_offload,
    )
    optimizer = get_megatron_optimizer(optimizer_config, chunks)
    # One scheduler step per optimizer step: steps x mini-batches in all.
    num_updates = max(1, total_steps * cfg.algorithm.num_mini_batches)
    warmup = min(opt.lr_warmup_steps, num_updates - 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=num_updates,
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=num_updates,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def wrap_in_ddp(cfg: Config, model: ActorModel) -> list:
    """megatron DDP around each chunk; gradients are reduced (and finalised) by the schedule, in fp32."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        # Megatron averages gradients over DP; MegatronLossScale multiplies it back out, in one place.
        average_in_collective=False,
    )
    ddp_chunks = [
        DistributedDataParallel(
            config=model.config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk of an interleaved pipeline buckets its gradients (megatron's convention).
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(model.chunks)
    ]
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp_chunks


def build_actor(
    cfg: Config,
    hf_dir,
    *,
    device: torch.device,
    total_steps: Optional[int] = None,
    load_weights: bool = True,
) -> Actor:
    """The actor of this rank; megatron's parallel state must already be initialised with ``cfg.parallel``."""
    # Before anything is built: megatron's own failure for a GPU-only option on CPU is cryptic.
    check_optimizer_offload(cfg.optimizer, device)
    if cfg.trainer.pack_sequences:
        check_packing_environment(device)
    overrides = {}
    if cfg.model.recompute_activations:
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    model = build_model(
        hf_dir,
        cfg.parallel,
        device=device,
        params_dtype=cfg.model.params_dtype,
        load_weights=load_weights,
        **overrides,
    )
    ddp_chunks = wrap_in_ddp(cfg, model)
    optimizer, scheduler = build_megatron_optimizer(cfg, ddp_chunks, total_steps=total_steps or cfg.trainer.steps)
    policy = MegatronPolicy(
        ddp_chunks,
        optimizer=optimizer,
        scheduler=scheduler,
        # Built once: the pipeline's loss function calls this object, and so do the pure-torch tests.
        loss=training_loss_from_config(cfg.algorithm, max_response_length=cfg.rollout.max_new_tokens),
        micro_batch_size=cfg.trainer.micro_batch_size,
        max_tokens_per_micro_batch=cfg.trainer.max_tokens_per_micro_batch,
        pack_sequences=cfg.trainer.pack_sequences,
        temperature=cfg.rollout.temperature,
        device=device,
        sequence_multiple=cfg.parallel.tensor if cfg.parallel.sequence_parallel else 1,
    )
    return Actor(model=model, ddp_chunks=ddp_chunks, optimizer=optimizer, scheduler=scheduler, policy=policy)
