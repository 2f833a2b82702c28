"""The remote rollout fleet: ``vllm serve`` servers on rollout nodes, behind the same seam as colocated engines.

Generation: the driver (trainer rank 0) spreads each rollout over the servers with
:class:`~sapo_megatron.rollout.servers.ServerPool` (least outstanding work, a dead server's prompts re-sent to
the others) and shares the batch with the other trainer ranks.

Weights: vLLM's RL interface end to end. At start-up the driver calls ``/init_weight_transfer_engine`` on every
server with our ``sapo_reshard`` backend's rendezvous (``rollout.sync_host`` and a port), and every trainer rank
joins the same standalone gloo group: trainer ranks first, then one rank per server. A push is

1. ``/pause?mode=wait`` and ``/start_weight_update`` on every server (the driver; if any fails, every trainer
   rank raises before a byte moves),
2. ``/update_weights {"version": v}`` on every server, each in a thread of the driver, while every trainer rank
   sends its owned pieces (:meth:`~sapo_megatron.bridge.sync.WeightSync.push`): inside each server's worker the
   backend receives, checks and loads them; nothing loads unless every engine received everything,
3. ``/finish_weight_update`` with the version, ``/reset_prefix_cache``, and a check that ``/weight_info`` of
   every server names ``v``; then ``/resume``.

A push that fails before the transfer leaves every server on its previous version (the trainer ranks raise
:class:`~sapo_megatron.bridge.sync.WeightSyncError` naming the cause); the servers are resumed either way.

On one machine (the CPU demo, tests) with ``rollout.server_urls`` empty, the driver starts
``rollout.num_engines`` servers itself on 127.0.0.1; on a cluster ``slurm/train_disaggregated.sbatch`` starts
them on the rollout nodes and passes their routable URLs.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import torch

from sapo_megatron import collectives
from sapo_megatron.rollout.engine import read_eos_token_ids
from sapo_megatron.rollout.fleet import RolloutFleet
from sapo_megatron.rollout.weight_transfer import BACKEND


def _broadcast(obj: Any) -> Any:
    """The driver's (trainer rank 0's) ``obj`` on every trainer rank."""
    return collectives.broadcast_object(obj, src=0)


class _Failure:
    """An error on the driver, carried to every trainer rank so that all raise together."""

    def __init__(self, kind: type, message: str) -> None:
        self.kind, self.message = kind, message

    def raise_(self):
        raise self.kind(self.message)


def _threads(calls: dict[str, Any]) -> dict[str, BaseException | None]:
    """Runs ``url -> callable`` concurrently; returns url -> the exception it raised (or None)."""
    errors: dict[str, BaseException | None] = {}

    def run(url: str, call) -> None:
        try:
            call()
            errors[url] = None
        except BaseException as exc:  # reported by the caller, with the server's name
            errors[url] = exc

    threads = [threading.Thread(target=run, args=(u, c), name=f"server-rpc {u}", daemon=True) for u, c in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


class ServerFleet(RolloutFleet):
    """``vllm serve`` servers as the rollout fleet (see the module docstring). Build it with :meth:`build`."""

    def __init__(self, *, urls: list[str], weight_sync, pool=None, processes=(), config=None) -> None:
        self.urls = urls
        self.num_engines = len(urls)
        self.weight_sync = weight_sync
        self.pool = pool  # driver only
        self.processes = list(processes)  # servers this fleet started (driver, single node)
        self.config = config
        self.samples_per_engine = [0] * len(urls)

    @property
    def is_driver(self) -> bool:
        return self.pool is not None

    @classmethod
    def build(cls, model, hf_dir, cfg, *, run_dir: Path, device: str, collect_routed_experts: bool) -> "ServerFleet":
        """Every trainer rank: reach (or, on one node without ``server_urls``, start) the servers, and join the
        weight-transfer group with them."""
        from sapo_megatron.bridge.sync import SyncGroup, WeightSync
        from sapo_megatron.launch import free_port
        from sapo_megatron.rollout.servers import ServerPool, start_servers

        del collect_routed_experts  # remote servers return no routing yet (checked by Config.validate)
        rank, world = collectives.rank(), collectives.world_size()
        rollout = cfg.rollout
        urls, processes, failure = rollout.urls, [], None
        local = not urls
        if rank == 0 and local:
            try:
                processes = start_servers(
                    hf_dir, cfg.engines(), log_dir=Path(run_dir) / "servers", dtype=cfg.model.params_dtype,
                    kv_cache_memory_bytes=rollout.kv_cache_memory_bytes, seed=rollout.seed,
                    extra_args=["--weight-transfer-config", json.dumps({"backend": BACKEND}),
                                "--tensor-parallel-size", str(rollout.engine_tensor_parallel)],
                )
                urls = [p.url for p in processes]
            except Exception as exc:
                failure = _Failure(RuntimeError, f"could not start the local rollout servers: {exc}")
        urls = _broadcast(failure or urls)
        if isinstance(urls, _Failure):
            urls.raise_()
        host = rollout.sync_host or ("127.0.0.1" if local else socket.getfqdn())
        port = _broadcast(free_port() if rank == 0 else None)
        backend = "nccl" if device == "cuda" else "gloo"
        init = {}
        pool = failure = workers = None
        if rank == 0:
            try:
                pool = ServerPool(urls, eos_token_ids=read_eos_token_ids(hf_dir))
                if not local:
                    _wait_for_servers(pool, SERVER_WAIT_S)
                # Every worker of a server (tensor parallel > 1) is a rank of the weight-transfer group.
                workers = [c.get_world_size(include_dp=False) for c in pool.clients]
            except Exception as exc:
                failure = _Failure(RuntimeError, str(exc))
        workers = _broadcast(failure if failure is not None else workers)
        if isinstance(workers, _Failure):
            workers.raise_()
        size = world + sum(workers)
        if rank == 0:
            first = world
            for url, client, count in zip(urls, pool.clients, workers):
                info = {"host": host, "port": port, "rank": first, "world_size": size, "num_engines": sum(workers),
                        "expert_load": rollout.cpu_expert_load, "backend": backend}
                init[url] = (lambda c=client, info=info: c.init_weight_transfer_engine(info))
                first += count
            # The servers join the group from inside their HTTP call; run them while this rank joins too.
            holder: dict = {}
            waiter = threading.Thread(target=lambda: holder.update(errors=_threads(init)), daemon=True)
            waiter.start()
        group = SyncGroup.connect(host, port, rank=rank, world_size=size, backend=backend)
        failure = None
        if rank == 0:
            waiter.join()
            failed = {u: e for u, e in holder["errors"].items() if e is not None}
            if failed:
                failure = _Failure(RuntimeError, "weight-transfer set-up failed on " + "; ".join(
                    f"{u}: {e}" for u, e in failed.items()))
        failure = _broadcast(failure)
        if failure is not None:
            failure.raise_()
        sync = WeightSync.remote(model, group, num_engines=sum(workers))
        return cls(urls=urls, weight_sync=sync, pool=pool, processes=processes, config=rollout)

    # -- generation -------------------------------------------------------------------------------------------

    def generate(self, prompt_ids, *, n: int, seed: int, prompt_indices=None, **sampling: Any):
        """The share's leader (the driver when no share is set) requests the share's samples from the servers
        and hands them to its peers; the per-server counts and any failure are exchanged over the whole job, so
        every rank returns or raises from the same call."""
        share = self.share
        leads = self.is_driver if share is None else share.is_leader
        outcome = None
        if leads:
            cfg = self.config
            kwargs = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
            kwargs.update(sampling)
            try:
                pool = self._generation_pool()
                batch = pool.generate([list(p) for p in prompt_ids], n=n, seed=seed, prompt_indices=prompt_indices,
                                      **kwargs)
                outcome = (batch, list(pool.samples_per_server))
            except Exception as exc:
                outcome = _Failure(type(exc) if isinstance(exc, RuntimeError) else RuntimeError,
                                   f"remote rollout failed: {type(exc).__name__}: {exc}")
        counts: list = []
        if share is None:
            outcome = _broadcast(outcome)
        else:
            outcome = share.from_leader(outcome)
            summary = outcome if isinstance(outcome, _Failure) else (outcome[1] if share.is_leader else None)
            counts = collectives.all_gather_object(summary)
            failures = [c for c in counts if isinstance(c, _Failure)]
            if failures and not isinstance(outcome, _Failure):
                outcome = failures[0]
        if isinstance(outcome, _Failure):
            outcome.raise_()
        batch = outcome[0]
        if share is None:
            self.samples_per_engine = outcome[1]
        else:
            per_leader = [c for c in counts if c is not None]
            self.samples_per_engine = [sum(column) for column in zip(*per_leader)]
        return batch

    def _generation_pool(self):
        """The driver's pool, or, on another share's leader, its own pool over the same servers (each leader
        spreads its share's prompts by its own count of outstanding work)."""
        if self.pool is not None:
            return self.pool
        if getattr(self, "_leader_pool", None) is None:
            from sapo_megatron.rollout.servers import ServerPool

            self._leader_pool = ServerPool(self.urls, eos_token_ids=self._eos_token_ids)
        return self._leader_pool

    def set_share(self, share) -> None:
        """Also hands the EOS ids the driver's pool checks samples against to the other shares' leaders."""
        super().set_share(share)
        eos = self.pool.clients[0].eos_token_ids if self.pool is not None else None
        self._eos_token_ids = _broadcast(eos)

    # -- weights ----------------------------------------------------------------------------------------------

    def push(self, model_chunks, version: int):
        from sapo_megatron.bridge.sync import WeightSyncError

        failure = None
        updates: dict = {}
        if self.is_driver:
            try:
                if self.pool.dead:
                    # Every server is a rank of the weight-transfer group; without one no push can complete.
                    raise RuntimeError(
                        "rollout server(s) died: " + "; ".join(f"{u} ({e})" for u, e in self.pool.dead.items())
                        + ". Restart the run: it resumes from the last checkpoint with a fresh fleet"
                    )
                self.pool.pause("wait")
                for client in self.pool.clients:
                    client.start_weight_update()
            except Exception as exc:
                failure = _Failure(WeightSyncError, f"weight sync to version {version} could not start: {exc}. "
                                                    "Nothing was sent; the servers keep their weights")
                self._resume_quietly()
        failure = _broadcast(failure)
        if failure is not None:
            failure.raise_()
        if self.is_driver:
            calls = {c.url: (lambda c=c: c.update_weights({"version": version})) for c in self.pool.clients}
            updates["thread"] = threading.Thread(target=lambda: updates.update(errors=_threads(calls)), daemon=True)
            updates["thread"].start()
        stats, error = None, None
        try:
            stats = self.weight_sync.push(model_chunks, version)
        except WeightSyncError as exc:
            error = exc
        failure = None
        if self.is_driver:
            updates["thread"].join()
            http = {u: e for u, e in updates["errors"].items() if e is not None}
            try:
                if error is None and http:
                    raise WeightSyncError(f"weight sync to version {version}: " + "; ".join(
                        f"{u}: {e}" for u, e in http.items()))
                if error is None:
                    for client in self.pool.clients:
                        client.finish_weight_update(version)
                        client.reset_prefix_cache()
                    versions = self.pool.versions()
                    wrong = {u: v for u, v in versions.items() if v != version}
                    if wrong:
                        raise WeightSyncError(f"after the push of version {version} the servers report {wrong}")
            except Exception as exc:
                failure = _Failure(WeightSyncError, str(exc))
            self._resume_quietly()
        failure = _broadcast(failure)
        if error is not None:
            raise error
        if failure is not None:
            failure.raise_()
        return stats

    def _resume_quietly(self) -> None:
        try:
            self.pool.resume()
        except Exception:  # the failure being reported matters more; a dead server is named there
            pass

    def pause(self, mode="wait") -> None:
        if self.is_driver:
            self.pool.pause(mode)

    def resume(self) -> None:
        if self.is_driver:
            self.pool.resume()

    def close(self) -> None:
        for pool in (self.pool, getattr(self, "_leader_pool", None)):
            if pool is not None:
                pool.close()
        for process in self.processes:
            process.stop()
        self.weight_sync = None


# Servers on rollout nodes start with the job (a 30B model loads in minutes); the trainer waits this long.
SERVER_WAIT_S = 1800.0


def _wait_for_servers(pool, timeout_s: float) -> None:
    """Until every server's /health answers; a message every 30 s, an error naming the missing ones."""
    import time

    start = time.monotonic()
    said = start
    while True:
        missing = [c.url for c in pool.clients if not c.health()]
        if not missing:
            return
        now = time.monotonic()
        if now - start > timeout_s:
            raise RuntimeError(
                f"rollout servers not answering /health after {timeout_s:.0f} s: {', '.join(missing)} "
                "(see their logs under <run_dir>/servers on the rollout nodes)"
            )
        if now - said > 30:
            print(f"[rollout] waiting for {len(missing)} of {len(pool.clients)} server(s): {', '.join(missing[:4])}",
                  flush=True)
            said = now
        time.sleep(2.0)


__all__ = ["ServerFleet"]
