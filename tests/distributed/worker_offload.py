"""Phase offload of the real megatron actor: storages freed, values back, and the next step unchanged.

Usage: worker_offload.py OUT_DIR HF_DIR DEVICE LAYOUT [LAYOUT ...]
A layout is ``dp`` (data parallelism over all ranks) or ``ep2`` (experts split over 2 ranks, so they live in
DDP's expert-parallel buffers); both use the distributed optimizer. For each layout every rank writes
``OUT_DIR/<layout>/rank<r>.pt`` with
  plain / offloaded: {"metrics": [step 1, step 2], "weights": HF name -> tensor after step 2,
                      "optimizer": sorted list of optimizer state tensors after step 2}
  checks: the measurements of the offloaded run (see ``offload_cycle``).
The two runs take the same two SAPO steps on a fresh actor; the offloaded one offloads everything between
them (and, before that, the optimizer alone).
"""

import contextlib
import gc
import os
import sys
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu_sapo.yaml"


def config_for(layout: str, world_size: int, device: str):
    from sapo_megatron.config import load_config

    expert = 2 if layout == "ep2" else 1
    return load_config(
        RECIPE,
        [
            "trainer.micro_batch_size=2",
            f"trainer.device={device}",
            f"parallel.expert={expert}",
            f"launch.nproc_per_node={world_size}",
            "optimizer.use_distributed_optimizer=true",
            "optimizer.lr=0.01",
        ],
    )


def make_batch():
    from sapo_megatron.actor.batch import TrainBatch

    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 256, (6, 10), generator=generator)
    loss_mask = torch.zeros(6, 10, dtype=torch.bool)
    loss_mask[:, 3:9] = True
    return TrainBatch(tokens=tokens, loss_mask=loss_mask, advantages=torch.randn(6, generator=generator))


def optimizer_tensors(actor) -> list[torch.Tensor]:
    """Main params and Adam moments, in a fixed order."""
    out = []
    for sub in actor.optimizer.chained_optimizers:
        for group in sub.optimizer.param_groups:
            for param in group["params"]:
                out.append(param)
                state = sub.optimizer.state.get(param, {})
                out.extend(state[key] for key in sorted(state) if isinstance(state[key], torch.Tensor))
    return out


def grad_tensors(actor) -> list[torch.Tensor]:
    return [p.main_grad for chunk in actor.ddp_chunks for p in chunk.parameters()]


def moment_tensors(actor) -> list[torch.Tensor]:
    return [
        state[key]
        for sub in actor.optimizer.chained_optimizers
        for state in sub.optimizer.state.values()
        for key in ("exp_avg", "exp_avg_sq")
    ]


def nbytes(tensors) -> list[int]:
    return [t.untyped_storage().nbytes() for t in tensors]


def offload_cycle(actor, device: torch.device) -> dict:
    """Optimizer-only offload, then everything; returns what was measured (storages, RSS / device memory)."""
    from sapo_megatron.actor.offload import ActorOffloader, rss_bytes

    params = [p for chunk in actor.ddp_chunks for p in chunk.parameters()]
    identity = [id(p) for p in params]
    before = {
        "params": [p.detach().clone() for p in params],
        "optimizer": [t.detach().clone() for t in optimizer_tensors(actor)],
    }
    offloader = ActorOffloader(actor)
    checks = {}

    # The optimizer alone: Adam's moments go, the parameters (which the fp32 main params view) stay.
    report = offloader.offload(params=False, grads=False, optimizer=True)
    checks["partial_report"] = dict(report.bytes)
    checks["partial_moment_bytes"] = nbytes(moment_tensors(actor))
    checks["partial_param_bytes"] = nbytes(params)
    offloader.reload()
    checks["partial_restored"] = all(
        torch.equal(a, b) for a, b in zip(before["optimizer"], optimizer_tensors(actor))
    )

    gc.collect()
    memory_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    report = offloader.offload(params=True, grads=True, optimizer=True)
    memory_after = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    checks["report"] = dict(report.bytes)
    checks["storages"] = report.storages
    checks["memory_before"], checks["memory_after"] = memory_before, memory_after
    checks["offloaded_param_bytes"] = nbytes(params)
    checks["offloaded_grad_bytes"] = nbytes(grad_tensors(actor))
    checks["offloaded_optimizer_bytes"] = nbytes(optimizer_tensors(actor))
    checks["offloaded_bucket_bytes"] = [
        nbytes([buffer.grad_data] + ([buffer.param_data] if buffer.param_data is not None else []))
        for chunk in actor.ddp_chunks
        for buffer in list(chunk.buffers) + list(chunk.expert_parallel_buffers)
    ]
    checks["num_expert_parallel_buffers"] = sum(len(chunk.expert_parallel_buffers) for chunk in actor.ddp_chunks)
    checks["param_bytes"] = sum(p.numel() * p.element_size() for p in params)
    checks["adam_state_bytes"] = sum(
        value.numel() * value.element_size()
        for sub in actor.optimizer.chained_optimizers
        for state in sub.optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
    offloader.reload()
    checks["memory_reloaded"] = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()

    params_after = [p for chunk in actor.ddp_chunks for p in chunk.parameters()]
    checks["same_objects"] = [id(p) for p in params_after] == identity
    checks["params_restored"] = all(torch.equal(a, b) for a, b in zip(before["params"], params_after))
    checks["optimizer_restored"] = all(
        torch.equal(a, b) for a, b in zip(before["optimizer"], optimizer_tensors(actor))
    )
    checks["grads_zero"] = all(bool((g == 0).all()) for g in grad_tensors(actor))
    # The parameters are views into the DDP buffer again (the distributed optimizer's layout).
    checks["params_view_buffer"] = all(
        p.untyped_storage().data_ptr() == buffer.param_data.untyped_storage().data_ptr()
        for chunk in actor.ddp_chunks
        for buffer in list(chunk.buffers) + list(chunk.expert_parallel_buffers)
        for p in buffer.params
    )
    return checks


def run(cfg, hf_dir: str, device: torch.device, *, offload: bool) -> dict:
    from sapo_megatron.actor.factory import build_actor
    from sapo_megatron.actor.model import export_hf_weights

    actor = build_actor(cfg, hf_dir, device=device)
    batch = make_batch()
    logprobs = actor.policy.compute_logprobs(batch).logprobs
    # Off-policy by a fixed amount, so that the SAPO gate is not at r = 1.
    batch = batch.with_(logprobs_old=logprobs + 0.2 * batch.loss_mask)
    record = {"metrics": [actor.policy.train_mini_batch(batch).scalars()]}
    if offload:
        record["checks"] = offload_cycle(actor, device)
    record["metrics"].append(actor.policy.train_mini_batch(batch).scalars())
    record["weights"] = {name: tensor.detach().cpu().clone() for name, tensor in export_hf_weights(actor.model)}
    record["optimizer"] = [t.detach().cpu().clone() for t in optimizer_tensors(actor)]
    del actor
    gc.collect()
    return record


def main(out_dir: str, hf_dir: str, device_name: str, *layouts: str) -> None:
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device_name)
    with MegatronCpuCompat("cpu") if device.type == "cpu" else contextlib.nullcontext():
        for layout in layouts:
            cfg = config_for(layout, world_size, device_name)
            placement = init_distributed(cfg.parallel, device_name, seed=1234)
            if device.type == "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
            result = {
                "plain": run(cfg, hf_dir, device, offload=False),
                "offloaded": run(cfg, hf_dir, device, offload=True),
            }
            target = Path(out_dir) / layout
            target.mkdir(parents=True, exist_ok=True)
            torch.save(result, target / f"rank{placement.rank}.pt")
            destroy_distributed(keep_process_group=True)
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
