"""Trains the tiny Qwen3-MoE actor for a few steps with checkpoints, the way the trainer does, and records
everything a resumed run must reproduce.

Usage: worker_checkpoint.py HF_DIR OUT_DIR TASKS_JSON
TASKS_JSON is a list of tasks, run in order over the same ranks (each builds its own layout):

  {"name": ..., "kind": "train", "layout": "tp1-pp1-ep2-etp1-alltoall[-nodistopt]", "root": CKPT_ROOT,
   "steps": 4, "save_at": [2], "load": false, "die_saving_at": null}
      Runs steps 1..steps (from the loaded step + 1 when "load"), saving at the "save_at" steps. With
      "die_saving_at" the process then saves that step and SIGKILLs itself after every file of it is written
      and fsynced, just before the step directory is published.
  {"name": ..., "kind": "train", "layout": ..., "load": {"root": OTHER_ROOT}, "steps": 3}
      Loads a checkpoint saved under another layout and trains on from it.
  {"name": ..., "kind": "refused", "layout": ..., "load": {"root": OTHER_ROOT}}
      Expects load_checkpoint to refuse the optimizer state; then loads the weights alone.
Every task runs on the CPU (gloo) unless it says "device": "cuda" (one job uses one device type).

Each rank writes OUT_DIR/<name>/rank<r>.pt: per step the metrics, the random draws every rank made from
python / numpy / torch / megatron's tracker (so every rank's RNG restore is checked, not only rank 0's), the
trainer state, and on rank 0 the full HF weights after the step (and right after a load).

Every step trains on a batch that rank 0 draws and broadcasts, as the trainer's rollout is, and the LR
schedule warms up and decays: a resume that missed the optimizer moments, the Adam step counter or the
schedule would give different weights; one that missed any rank's RNG, different draws.
"""

import json
import multiprocessing
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu_sapo.yaml"
SEED = 1
TOTAL_STEPS = 4
NUM_ROWS = 8
SEQ_LEN = 13
MICRO_BATCH_SIZE = 3
OVERRIDES = [
    "optimizer.lr=1.0e-2",
    "optimizer.min_lr=1.0e-3",
    "optimizer.adam_eps=1.0e-1",
    "optimizer.clip_grad=0.05",
    "optimizer.weight_decay=0.01",
    "optimizer.lr_warmup_steps=1",
    "optimizer.lr_decay_style=linear",
    "algorithm.num_mini_batches=1",
    f"trainer.micro_batch_size={MICRO_BATCH_SIZE}",
    "rollout.temperature=1.0",
]


def parse_layout(text: str):
    """``tp2-pp1-ep2-etp1-alltoall`` (data parallelism takes the remaining ranks), ``-nodistopt`` for megatron's
    non-distributed optimizer."""
    from sapo_megatron.config import ParallelConfig

    tp, pp, ep, etp, dispatcher, *flags = text.split("-")
    tensor = int(tp.removeprefix("tp"))
    parallel = ParallelConfig(
        tensor=tensor,
        pipeline=int(pp.removeprefix("pp")),
        expert=int(ep.removeprefix("ep")),
        expert_tensor=int(etp.removeprefix("etp")),
        sequence_parallel=tensor > 1,
        moe_token_dispatcher=dispatcher,
    )
    return parallel, "nodistopt" not in flags


def config_for(layout: str):
    import dataclasses

    from sapo_megatron.config import load_config

    parallel, distributed_optimizer = parse_layout(layout)
    base = load_config(RECIPE, OVERRIDES)
    return dataclasses.replace(
        base,
        parallel=parallel,
        optimizer=dataclasses.replace(base.optimizer, use_distributed_optimizer=distributed_optimizer),
    )


def draw_batch(step: int, pad_id: int):
    """Rank 0's rollout stand-in: uneven prompt / response lengths, advantages of both signs, and an
    off-policy offset for logprobs_old, broadcast so every rank holds the batch. Drawn from a generator of
    the step (the data position), so that a run resumed under another layout, whose RNG streams cannot be
    restored, still trains on the same batches; the RNG restore is checked by :func:`draw_everywhere`."""
    from sapo_megatron.actor.batch import TrainBatch

    payload = [None]
    if torch.distributed.get_rank() == 0:
        generator = torch.Generator().manual_seed(1000 + step)
        tokens = torch.full((NUM_ROWS, SEQ_LEN), pad_id, dtype=torch.long)
        loss_mask = torch.zeros(NUM_ROWS, SEQ_LEN, dtype=torch.bool)
        for row in range(NUM_ROWS):
            n_prompt = int(torch.randint(1, 6, (), generator=generator))
            n_response = int(torch.randint(1, SEQ_LEN - n_prompt + 1, (), generator=generator))
            tokens[row, : n_prompt + n_response] = torch.randint(0, 256, (n_prompt + n_response,), generator=generator)
            loss_mask[row, n_prompt - 1 : n_prompt - 1 + n_response] = True
        advantages = torch.randn(NUM_ROWS, generator=generator)
        noise = 0.35 * torch.randn(NUM_ROWS, SEQ_LEN, generator=generator)
        payload = [(tokens, loss_mask, advantages, noise)]
    torch.distributed.broadcast_object_list(payload, src=0)
    tokens, loss_mask, advantages, noise = payload[0]
    return TrainBatch(tokens=tokens, loss_mask=loss_mask, advantages=advantages), noise


def draw_everywhere(device: torch.device) -> list[float]:
    """One number from each RNG this rank owns, megatron's model-parallel stream included (on a GPU it
    forks the CUDA generator, which is then drawn from too)."""
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = float(torch.rand((), device=device))
    draws = [random.random(), float(np.random.rand()), float(torch.rand(())), tracked]
    if device.type == "cuda":
        draws.append(float(torch.rand((), device=device)))
    return draws


def hf_weights(actor) -> dict | None:
    from sapo_megatron.actor.model import export_hf_weights

    rank0 = torch.distributed.get_rank() == 0
    weights = {}
    for name, tensor in export_hf_weights(actor.model):
        if rank0:
            weights[name] = tensor.detach().to("cpu", copy=True)
    return weights if rank0 else None


def train_step(actor, step: int, trainer_state: dict) -> dict:
    batch, noise = draw_batch(step, pad_id=256)
    logprobs = actor.policy.compute_logprobs(batch).logprobs
    batch = batch.with_(logprobs_old=torch.where(batch.loss_mask, logprobs + noise, torch.zeros(())))
    metrics = actor.policy.train_mini_batch(batch).scalars()
    trainer_state["step"] = step
    trainer_state["data_position"] += NUM_ROWS
    trainer_state["rewards"].append(float(batch.advantages.sum()))
    draws = draw_everywhere(actor.model.device)
    return {"metrics": metrics, "draws": draws, "weights": hf_weights(actor), "lr": lr_of(actor)}


def lr_of(actor) -> float:
    return float(actor.optimizer.param_groups[0]["lr"])


def run_task(task: dict, hf_dir: str, out_dir: Path) -> None:
    from sapo_megatron.actor import checkpoint
    from sapo_megatron.actor.factory import build_actor
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed

    cfg = config_for(task["layout"])
    device = torch.device(task.get("device", "cpu"))
    placement = init_distributed(cfg.parallel, device, seed=SEED)
    # The same seeds on every rank for what the trainer seeds; megatron has already forked its own streams.
    random.seed(SEED)
    np.random.seed(SEED)
    actor = build_actor(cfg, hf_dir, device=device, total_steps=TOTAL_STEPS)
    record: dict = {"rank": placement.rank, "steps": {}}
    target = out_dir / task["name"]
    target.mkdir(parents=True, exist_ok=True)
    trainer_state: dict = {"step": 0, "data_position": 0, "rewards": []}
    load = task.get("load")

    if task["kind"] == "refused":
        try:
            checkpoint.load_checkpoint(actor, load["root"])
        except ValueError as exc:
            record["refusal"] = str(exc)
        loaded = checkpoint.load_checkpoint(actor, load["root"], load_optimizer=False)
        record["loaded"] = loaded
        record["weights_after_load"] = hf_weights(actor)
    else:
        start = 0
        if load:
            root = task["root"] if load is True else load["root"]
            loaded = checkpoint.load_checkpoint(actor, root)
            assert loaded is not None, f"no checkpoint under {root}"
            start, trainer_state = loaded
            record["loaded"] = (start, json.loads(json.dumps(trainer_state)))
            record["weights_after_load"] = hf_weights(actor)
        for step in range(start + 1, task["steps"] + 1):
            record["steps"][step] = train_step(actor, step, trainer_state)
            if step in task.get("save_at", ()):
                checkpoint.save_checkpoint(actor, task["root"], step, trainer_state, keep_last=task.get("keep_last"))
        record["trainer_state"] = trainer_state
    torch.save(record, target / f"rank{placement.rank}.pt")

    if task.get("die_saving_at"):

        def killed_before_publishing(*args, **kwargs):
            # megatron's checkpoint writer keeps a multiprocessing Manager; a SIGKILLed parent would orphan it
            # (and the pipe the launcher reads). It holds nothing of the checkpoint, so end it first.
            for child in multiprocessing.active_children():
                child.kill()
                child.join()
            print("SIGKILL before publishing", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        checkpoint._publish = killed_before_publishing
        checkpoint.save_checkpoint(actor, task["root"], task["die_saving_at"], trainer_state)
        raise AssertionError("unreachable: the save above kills this process")
    if task.get("save_final"):
        checkpoint.save_checkpoint(actor, task["root"], task["steps"], trainer_state, keep_last=task.get("keep_last"))
    del actor
    destroy_distributed(keep_process_group=True)


def main(hf_dir: str, out_dir: str, tasks_json: str) -> None:
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.parallel import destroy_distributed

    tasks = json.loads(Path(tasks_json).read_text())
    (device,) = {task.get("device", "cpu") for task in tasks}
    # Does nothing on a GPU.
    with MegatronCpuCompat(device):
        for task in tasks:
            run_task(task, hf_dir, Path(out_dir))
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
