"""Process groups for the actor: torch.distributed (gloo on CPU, nccl on GPU) and megatron's parallel state.

``init_distributed`` reads the rendezvous from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); a script started without torchrun runs as a single
process. The layout is checked against the world size before any group is created, so a wrong layout is a
``ValueError`` naming the ``parallel.*`` field, not a hang or an assertion deep inside megatron.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
from sapo_megatron.config import ParallelConfig
from sapo_megatron.device import resolve_device


@dataclass(frozen=True)
class ParallelLayout:
    """The sizes and this process's place in them, as initialised."""

    device: torch.device
    rank: int
    world_size: int
    tensor: int
    pipeline: int
    virtual_pipeline: int
    expert: int
    expert_tensor: int
    context: int
    data: int


def check_layout(parallel: ParallelConfig, world_size: int, device: str | torch.device) -> int:
    """Validates ``parallel`` for ``world_size`` ranks on ``device`` and returns the data-parallel size."""
    parallel.validate("parallel")
    data = parallel.data_parallel_size(world_size, "parallel")
    if parallel.tensor > 1 and parallel.expert == 1 and parallel.expert_tensor_size != parallel.tensor:
        # megatron-core 0.16.1 marks experts as expert-parallel only when EP > 1; otherwise their grads are
        # reduced over data parallelism alone, yet with sequence parallelism each TP rank's replica of an
        # expert sees different tokens. Forward passes agree, updates silently diverge.
        raise ValueError(
            f"parallel.expert_tensor={parallel.expert_tensor_size} with parallel.tensor={parallel.tensor} and "
            f"parallel.expert=1 gives wrong expert gradients in megatron-core (replicas are not reduced over "
            f"TP); set parallel.expert_tensor={parallel.tensor} or use parallel.expert > 1"
        )
    if resolve_device(device).type == "cpu":
        if parallel.expert_tensor_size > 1 and parallel.expert > 1 and parallel.moe_token_dispatcher == "alltoall":
            # Each expert-TP rank then receives a different number of routed tokens, and megatron
            # all-gathers them with uneven sizes, which gloo rejects.
            raise ValueError(
                f"parallel.expert_tensor={parallel.expert_tensor_size} with parallel.expert={parallel.expert} and "
                "parallel.moe_token_dispatcher='alltoall' needs all-gathers of uneven sizes, which gloo (CPU) "
                "cannot do; use expert_tensor=1 or moe_token_dispatcher='allgather'"
            )
        if parallel.context > 1:
            raise ValueError(
                f"parallel.context={parallel.context}: context parallelism needs Transformer Engine's attention, "
                "which does not run on CPU; use context=1"
            )
    return data


def init_distributed(
    parallel: ParallelConfig,
    device: str | torch.device,
    *,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> ParallelLayout:
    """Initialises torch.distributed (if not yet) and megatron's model-parallel groups, and seeds its RNGs.

    On CPU, megatron needs :class:`~sapo_megatron.actor.cpu_compat.MegatronCpuCompat` installed before this
    call (its RNG seeding already goes through ``torch.cuda``).
    """
    from megatron.core import parallel_state, tensor_parallel

    resolved = resolve_device(device)
    if resolved.type == "cpu" and MegatronCpuCompat.active_instance() is None:
        raise RuntimeError(
            "megatron-core on CPU needs the compatibility layer: MegatronCpuCompat('cpu').install() first"
        )
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron's parallel state is already initialised; call destroy_distributed() first")

    if torch.distributed.is_initialized():
        world_size = torch.distributed.get_world_size()
    else:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    data = check_layout(parallel, world_size, resolved)

    if not torch.distributed.is_initialized():
        _init_process_group(resolved, world_size, timeout_minutes)

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline or None,
        context_parallel_size=parallel.context,
        expert_model_parallel_size=parallel.expert,
        expert_tensor_parallel_size=parallel.expert_tensor_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    # Different streams per TP / EP rank (weight init, dropout), the same one across data parallelism.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelLayout(
        device=resolved,
        rank=torch.distributed.get_rank(),
        world_size=world_size,
        tensor=parallel.tensor,
        pipeline=parallel.pipeline,
        virtual_pipeline=parallel.virtual_pipeline,
        expert=parallel.expert,
        expert_tensor=parallel.expert_tensor_size,
        context=parallel.context,
        data=data,
    )


def _init_process_group(device: torch.device, world_size: int, timeout_minutes: int) -> None:
    timeout = timedelta(minutes=timeout_minutes)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
        return
    if world_size != 1:
        raise ValueError(
            f"WORLD_SIZE={world_size} but no RANK/MASTER_ADDR in the environment: start the job with torchrun "
            "(sapo_megatron.launch.run_torchrun)"
        )
    # A lone process still needs a store; a private one avoids clashing with anything on a fixed port.
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)


def destroy_distributed(*, keep_process_group: bool = False) -> None:
    """Tears down megatron's parallel state and (unless ``keep_process_group``) torch.distributed.

    Keeping the process group lets one job initialise several layouts in turn over the same ranks.
    """
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if not keep_process_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
