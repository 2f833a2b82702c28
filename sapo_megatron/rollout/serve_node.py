"""``sapo-megatron serve``: the rollout servers of one rollout node of a disaggregated job.

``slurm/train_disaggregated.sbatch`` runs it once on every rollout node. It starts
``launch.nproc_per_node / rollout.engine_tensor_parallel`` vLLM servers (:class:`ServerProcess`: the same flags
the trainer's local servers get, the ``sapo_reshard`` weight-transfer backend, each on its own GPUs) bound to
this node's routable name at ``base_port``, ``base_port + 1``, ...; waits until all answer, prints their URLs,
and keeps them running until it is stopped (SIGTERM or SIGINT), then stops them. The sbatch script derives
the same URLs (node name and port) for the trainer's ``rollout.server_urls``.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path

from sapo_megatron.config import Config, ConfigError
from sapo_megatron.models import resolve_model_dir
from sapo_megatron.rollout.servers import ServerProcess
from sapo_megatron.rollout.weight_transfer import BACKEND


def server_urls(hosts: list[str], per_node: int, base_port: int) -> list[str]:
    """The URLs of every server of a job: ``per_node`` servers on each host, ports from ``base_port``."""
    return [f"http://{host}:{base_port + i}" for host in hosts for i in range(per_node)]


def serve_node(cfg: Config, *, host: str | None = None, base_port: int = 8000, ready_timeout_s: float = 1800.0) -> int:
    rollout, launch = cfg.rollout, cfg.launch
    tp = rollout.engine_tensor_parallel
    if launch.nproc_per_node % tp:
        raise ConfigError(
            f"rollout.engine_tensor_parallel={tp} does not divide launch.nproc_per_node={launch.nproc_per_node} "
            "(the GPUs of a rollout node)"
        )
    host = host or socket.getfqdn()
    model_dir = resolve_model_dir(cfg)
    log_dir = Path(cfg.trainer.run_dir) / "servers"
    servers = []
    for i in range(launch.nproc_per_node // tp):
        gpus = ",".join(str(g) for g in range(i * tp, (i + 1) * tp))
        servers.append(ServerProcess(
            model_dir, log_path=log_dir / f"{host}-{i}.log", host=host, port=base_port + i,
            dtype=cfg.model.params_dtype, kv_cache_memory_bytes=rollout.kv_cache_memory_bytes, seed=rollout.seed,
            extra_args=["--tensor-parallel-size", str(tp), "--weight-transfer-config", json.dumps({"backend": BACKEND})],
            env={"CUDA_VISIBLE_DEVICES": gpus},
        ))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(ready_timeout_s)
        print("[serve] ready: " + ",".join(s.url for s in servers), flush=True)
        while not stop.wait(5.0):
            dead = [s.url for s in servers if not s.is_running()]
            if dead:
                print(f"[serve] server(s) exited: {', '.join(dead)}; see {log_dir}", flush=True)
                return 1
        return 0
    finally:
        for server in servers:
            server.stop()
