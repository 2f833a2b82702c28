"""Trainer ranks of the server failure tests: EP2 over 2 ranks, 3 real `vllm serve` servers A, B, C, faults injected.

Usage: worker_server_failures.py OUT_DIR HF_DIR URL_A,URL_B,URL_C PID_A,PID_B,PID_C SYNC_TIMEOUT_S

Three scenarios, in this order (each needs the servers the earlier ones left alive):

1. ``mid-transfer``: fleet {A, B} at version 1; during the push of version 2, after rank 0's 4th bucket message,
   B's whole process group gets SIGKILL (the trainer ranks are sending, A and B receiving).
2. ``not-started``: fleet {A, C} at version 2; a push whose ``/start_weight_update`` fails on A (a session left
   open there). ``after-commit``: then, during the push of version 3, when rank 0 enters the last
   exchange of the push (engines report their loads) it waits 5 s, so that A has loaded, then kills C.
3. ``rendezvous``: fleet {A} alone, with A told to join the group at a port where nothing listens (what a
   wrong ``rollout.sync_host`` or a firewall does to a server); last, because A's own attempt outlives it.

Rank 0 writes OUT_DIR/result.pt: ``{"ranks": [per-rank {scenario: {"error", "seconds", "refused",
"refused_seconds"}}], "driver": {scenario: what rank 0 read from A after the failure}}``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
from worker_weight_sync import megatron_logprobs, perturb  # noqa: E402

PROMPT = [72, 101, 108, 108, 111, 33, 40, 41]
SAMPLING = dict(n=2, max_new_tokens=10, temperature=1.0, top_p=1.0, seed=5)
# Small buckets, so that the tiny model's push is dozens of messages and a kill lands inside the transfer.
BUCKET_BYTES = 64 * 1024


def main(out_dir: str, hf_dir: str, urls: str, pids: str, sync_timeout_s: str) -> None:
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.model import build_model
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed
    from sapo_megatron.bridge.sync import WeightSyncError
    from sapo_megatron.config import load_config
    from sapo_megatron.launch import free_port
    from sapo_megatron.rollout.server_fleet import ServerFleet
    from sapo_megatron.rollout.servers import ServerClient

    a, b, c = urls.split(",")
    pid = dict(zip((a, b, c), map(int, pids.split(","))))
    root = Path(__file__).parents[2]
    cfg = load_config(root / "recipes" / "tiny_cpu_sapo.yaml", [
        "launch.nproc_per_node=2", "parallel.expert=2", "rollout.mode=remote", f"rollout.server_urls={a},{b}",
        "rollout.sync_host=127.0.0.1", "rollout.collect_routed_experts=false", "rollout.max_new_tokens=10",
        f"rollout.sync_timeout_s={sync_timeout_s}", f"trainer.run_dir={out_dir}",
    ]).validate()

    def config_for(*servers: str):
        return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, server_urls=",".join(servers)))

    def kill(url: str) -> None:
        os.killpg(pid[url], signal.SIGKILL)  # the API server, its engine core and its worker

    with MegatronCpuCompat("cpu"):
        placement = init_distributed(cfg.parallel, "cpu", seed=1234)
        rank = placement.rank
        driver = rank == 0
        model = build_model(hf_dir, cfg.parallel, device="cpu")
        mine: dict = {}
        seen: dict = {}

        def build(*servers: str) -> ServerFleet:
            fleet = ServerFleet.build(model, hf_dir, config_for(*servers), run_dir=Path(out_dir), device="cpu",
                                      collect_routed_experts=False)
            fleet.weight_sync.bucket_bytes = BUCKET_BYTES
            return fleet

        def failing_push(label: str, fleet: ServerFleet, version: int) -> None:
            start = time.monotonic()
            try:
                fleet.push(model.chunks, version)
                mine[label] = {"error": None}
            except WeightSyncError as exc:
                mine[label] = {"error": str(exc), "seconds": time.monotonic() - start}
            # The trainer must not go on: the next push is refused at once, on every rank.
            start = time.monotonic()
            try:
                fleet.push(model.chunks, version + 1)
                mine[label]["refused"] = None
            except WeightSyncError as exc:
                mine[label]["refused"] = str(exc)
            mine[label]["refused_seconds"] = time.monotonic() - start

        def sample(url: str) -> dict:
            with ServerClient(url) as client:
                samples = client.generate(PROMPT, **SAMPLING)
                return {
                    "weight_version": client.weight_version(), "is_paused": client.is_paused(),
                    "response_ids": [s.response_ids for s in samples], "logprobs": [s.logprobs for s in samples],
                    "spans": sorted({span.version for s in samples for span in s.weight_spans}),
                }

        # -- 1. a server killed while the trainer ranks send -----------------------------------------------------
        fleet = build(a, b)
        perturb(model, seed=1)
        fleet.push(model.chunks, 1)
        if driver:
            seen["before"] = sample(a)
        perturb(model, seed=2)
        group = fleet.weight_sync.transport.group
        send = group.send
        sends = [0]

        def send_then_kill(tensor, dst, tag):
            sends[0] += 1
            if sends[0] == 4:
                kill(b)
                time.sleep(1.0)  # B's sockets are closed before the next message
            return send(tensor, dst, tag)

        if driver:
            group.send = send_then_kill
        failing_push("mid-transfer", fleet, 2)
        group.send = send
        if driver:
            mine["mid-transfer"]["sends_before_kill"] = 4
            seen["mid-transfer"] = sample(a)
        fleet.close()

        # -- 2. a push that cannot start, then a server killed after the engines committed to load -------------
        fleet = build(a, c)
        fleet.push(model.chunks, 2)
        if driver:
            # A weight-update session left open on A: the fleet's own /start_weight_update then fails there.
            ServerClient(a).start_weight_update()
        try:
            fleet.push(model.chunks, 3)
            mine["not-started"] = {"error": None}
        except WeightSyncError as exc:
            mine["not-started"] = {"error": str(exc)}
        if driver:
            ServerClient(a).finish_weight_update(None)  # closes that session, keeping A's label
            seen["not-started"] = {u: (ServerClient(u).weight_version(), ServerClient(u).is_paused()) for u in (a, c)}
        perturb(model, seed=3)
        group = fleet.weight_sync.transport.group
        gather = group.all_gather_object
        gathers = [0]

        def gather_then_kill(obj):
            gathers[0] += 1
            if gathers[0] == 3:  # metadata, transfer outcome, then the engines' load results
                time.sleep(5.0)  # every engine has passed the outcome exchange and loaded
                kill(c)
            return gather(obj)

        if driver:
            group.all_gather_object = gather_then_kill
        failing_push("after-commit", fleet, 3)
        group.all_gather_object = gather
        after = sample(a) if driver else None
        # What A serves must be what its label says: score its samples with the trainer's weights (version 3).
        box = [after]
        torch.distributed.broadcast_object_list(box, src=0)
        sequences = [PROMPT + r for r in box[0]["response_ids"]]
        scored = megatron_logprobs(model, sequences)
        if driver:
            after["megatron"] = None if scored is None else [lp[len(PROMPT) - 1:].tolist() for lp in scored]
            seen["after-commit"] = after
        fleet.close()

        # -- 3. a server that cannot reach the rendezvous --------------------------------------------------------
        unreachable = free_port()
        original = ServerClient.init_weight_transfer_engine

        def misdirected(client, info):
            return original(client, {**info, "port": unreachable})

        if driver:
            ServerClient.init_weight_transfer_engine = misdirected
        start = time.monotonic()
        try:
            build(a)
            mine["rendezvous"] = {"error": None}
        except RuntimeError as exc:
            mine["rendezvous"] = {"error": str(exc), "seconds": time.monotonic() - start}
        ServerClient.init_weight_transfer_engine = original

        gathered = [None] * placement.world_size
        torch.distributed.all_gather_object(gathered, mine)
        if driver:
            torch.save({"ranks": gathered, "driver": seen, "urls": [a, b, c]}, Path(out_dir) / "result.pt")
        destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
