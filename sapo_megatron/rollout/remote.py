"""Remote rollout: the vLLM engine in a process of its own, outside the trainer's torch.distributed job.

The trainer ranks and the engine process form one standalone :class:`~sapo_megatron.bridge.sync.SyncGroup`
(gloo on CPU, NCCL on GPU; the engine is its last rank). Every exchange is a round of
``all_gather_object`` over that group, so all trainer ranks take part in each one at the same point of the
step, and the engine learns what to do from the driver's (trainer rank 0's) entry:

* ``("generate", prompt_ids, kwargs)``: the engine samples; the next round carries its ``RolloutBatch`` (or
  the error it raised) to every trainer rank.
* ``("sync", version)``: the engine joins the next :meth:`WeightSync.push` as its receiver.
* ``("stop",)``: the engine process closes the engine and exits.

On one machine (the CPU demo, a test) the engine process is started here with ``multiprocessing`` (spawn);
on a cluster the same :func:`serve` runs on the rollout nodes (see ``slurm/``).
"""

from __future__ import annotations

import multiprocessing
import traceback
from typing import Any, Optional, Sequence

from sapo_megatron.config import RolloutConfig


class RemoteEngineError(RuntimeError):
    """The remote engine failed a request; the message carries its traceback."""


def serve(
    model_dir: str,
    rollout: dict,
    host: str,
    port: int,
    num_trainer_ranks: int,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    collect_routed_experts: bool = False,
) -> None:
    """The engine process: builds the engine, joins the group as its last rank, and answers until stopped."""
    from sapo_megatron.bridge.sync import SyncGroup, WeightReceiver
    from sapo_megatron.rollout.engine import RolloutEngine

    config = RolloutConfig(**rollout)
    engine = RolloutEngine(model_dir, config, device=device, dtype=dtype, collect_routed_experts=collect_routed_experts)
    backend = "nccl" if device == "cuda" else "gloo"
    group = SyncGroup.connect(
        host, port, rank=num_trainer_ranks, world_size=num_trainer_ranks + 1, backend=backend
    )
    receiver = WeightReceiver(engine, group)
    try:
        while True:
            command = group.all_gather_object(None)[0]
            if command[0] == "generate":
                _, prompt_ids, kwargs = command
                try:
                    answer: Any = engine.generate(prompt_ids, **kwargs)
                except Exception:  # the trainer raises it; the engine keeps serving
                    answer = RemoteEngineError(traceback.format_exc())
                group.all_gather_object(answer)
            elif command[0] == "sync":
                try:
                    receiver.receive()
                except Exception:
                    pass  # WeightSync.push raises the same error on every trainer rank
            elif command[0] == "stop":
                return
            else:
                raise RuntimeError(f"remote engine: unknown command {command[0]!r}")
    finally:
        engine.close()


class RemoteEngineClient:
    """The trainer ranks' side: every method is a collective over all trainer ranks (and the engine)."""

    def __init__(self, group, process: Optional[multiprocessing.Process] = None):
        self.group = group
        self.process = process
        self.weight_version = 0

    @classmethod
    def start(
        cls,
        model_dir: str,
        rollout: RolloutConfig,
        *,
        rank: int,
        world_size: int,
        host: str,
        port: int,
        device: str = "cpu",
        dtype: str = "float32",
        collect_routed_experts: bool = False,
    ) -> "RemoteEngineClient":
        """Rank 0 starts the engine process on this machine; every trainer rank then joins the group."""
        import dataclasses

        from sapo_megatron.bridge.sync import SyncGroup

        process = None
        if rank == 0:
            context = multiprocessing.get_context("spawn")
            process = context.Process(
                target=serve,
                args=(str(model_dir), dataclasses.asdict(rollout), host, port, world_size),
                kwargs=dict(device=device, dtype=dtype, collect_routed_experts=collect_routed_experts),
                name="sapo-rollout-engine",
                daemon=True,
            )
            process.start()
        backend = "nccl" if device == "cuda" else "gloo"
        group = SyncGroup.connect(host, port, rank=rank, world_size=world_size + 1, backend=backend)
        return cls(group, process)

    def generate(self, prompt_ids: Optional[Sequence[Sequence[int]]], **kwargs):
        """The driver passes the prompts, the other ranks ``None``; every rank gets the ``RolloutBatch``."""
        command = ("generate", [list(p) for p in prompt_ids], kwargs) if self.group.rank == 0 else None
        self.group.all_gather_object(command)
        answer = self.group.all_gather_object(None)[-1]
        if isinstance(answer, RemoteEngineError):
            raise answer
        return answer

    def push(self, weight_sync, model_chunks, version: int):
        """Tells the engine to receive, then pushes the weights (:meth:`WeightSync.push`)."""
        self.group.all_gather_object(("sync", version) if self.group.rank == 0 else None)
        stats = weight_sync.push(model_chunks, version)
        self.weight_version = version
        return stats

    def close(self) -> None:
        try:
            self.group.all_gather_object(("stop",) if self.group.rank == 0 else None)
        finally:
            if self.process is not None:
                self.process.join(timeout=60)
                if self.process.is_alive():
                    self.process.kill()
