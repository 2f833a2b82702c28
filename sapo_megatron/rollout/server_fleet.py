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

Failures (docs/rollout.md has the table, with what each test shows). ``rollout.sync_timeout_s`` bounds the group:
forming it (a server that does not join fails :meth:`ServerFleet.build` on every rank, naming the server and
the address it was told to reach) and every wait inside a push. A push that fails raises
:class:`~sapo_megatron.bridge.sync.WeightSyncError` on every trainer rank with one message that names each
server and what it holds afterwards, read from the server: a failure before the engines' outcome exchange
loads nothing anywhere; a server that loaded before the push failed elsewhere is labelled with the new version
(``/weight_info`` and the samples' version spans stay true); a server whose weights are in doubt stays paused.
Live servers in no doubt are resumed. After a server died, a transport error or a doubt, the fleet refuses
every later push: the group cannot make one version current on every server again.

On one machine (the CPU demo, tests) with ``rollout.server_urls`` empty, the driver starts
``rollout.num_engines`` servers itself on 127.0.0.1; on a cluster ``slurm/train_disaggregated.sbatch`` starts
them on the rollout nodes and passes their routable URLs.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch

from sapo_megatron import collectives
from sapo_megatron.bridge.sync import SyncGroup, WeightSync, WeightSyncError
from sapo_megatron.launch import free_port
from sapo_megatron.rollout.engine import read_eos_token_ids
from sapo_megatron.rollout.fleet import RolloutFleet
from sapo_megatron.rollout.servers import ServerPool, ServerUnreachable, start_servers
from sapo_megatron.rollout.weight_transfer import BACKEND, UNUSABLE


def _broadcast(obj: Any) -> Any:
    """The driver's (trainer rank 0's) ``obj`` on every trainer rank."""
    return collectives.broadcast_object(obj, src=0)


class _Failure:
    """An error on the driver, carried to every trainer rank so that all raise together."""

    def __init__(self, kind: type, message: str) -> None:
        self.kind, self.message = kind, message

    def raise_(self):
        raise self.kind(self.message)


def _start_threads(calls: dict[str, Any], outcomes: dict[str, BaseException | None]) -> list[threading.Thread]:
    """Starts ``url -> callable`` concurrently; each thread records in ``outcomes[url]`` the exception its call
    raised, or None, when the call ends (so a caller that stops waiting still sees the ones that did end)."""

    def run(url: str, call) -> None:
        try:
            call()
            outcomes[url] = None
        except BaseException as exc:  # reported by the caller, with the server's name
            outcomes[url] = exc

    threads = [threading.Thread(target=run, args=(u, c), name=f"server-rpc {u}", daemon=True) for u, c in calls.items()]
    for t in threads:
        t.start()
    return threads


def _join_threads(threads: list[threading.Thread], timeout_s: float | None) -> None:
    """Waits for every thread, at most ``timeout_s`` in all (None: until each ends, which every HTTP call's own
    timeout bounds)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


def _brief(error: BaseException | str, limit: int = 400) -> str:
    """One line of an error for a message that lists several (server replies can carry whole tracebacks, and
    torch.distributed's errors a C++ stack after their message)."""
    text = str(error).split("Exception raised from")[0].split(" This is typically caused by")[0]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _join_failure_message(error, errors, address, timeout_s, members, urls, replies, sync_host) -> str:
    """Why the weight-transfer group did not form: who did not join, the address they were told to reach, and
    what each server's /init_weight_transfer_engine call said."""
    missing = getattr(error, "missing", None)
    if missing:
        who = list(dict.fromkeys(members[r] if r < len(members) else f"rank {r}" for r in missing))
        head = f"{', '.join(who)} did not join it"
    else:
        first = error if error is not None else next(e for e in errors if e)
        head = _brief(first)
    lines = [
        f"the weight-transfer group at {address} did not form within {timeout_s:g} s (rollout.sync_timeout_s): "
        f"{head}.",
        f"Every server was told to reach trainer rank 0 at {address}: rollout.sync_host "
        f"({sync_host!r}; empty means this node's name) must be an address of trainer rank 0's node that the rollout "
        "nodes can reach, with that port open to them; a server that died or hung cannot join either.",
        "The servers' /init_weight_transfer_engine replies:",
    ]
    for url in urls:
        if url not in replies:
            state = f"no reply within {_REPLY_GRACE_S:g} s after the trainer gave up"
        elif replies[url] is None:
            state = "joined"
        else:
            state = _brief(replies[url])
        lines.append(f"  {url}: {state}")
    return "\n".join(lines)


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
        # Why no push can succeed any more (same text on every rank), or None; see push().
        self.broken: str | None = None

    @property
    def is_driver(self) -> bool:
        return self.pool is not None

    @classmethod
    def build(cls, model, hf_dir, cfg, *, run_dir: Path, device: str, collect_routed_experts: bool) -> "ServerFleet":
        """Every trainer rank: reach (or, on one node without ``server_urls``, start) the servers, and join the
        weight-transfer group with them."""
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
        timeout_s = rollout.sync_timeout_s
        address = f"{host}:{port}"
        members: list[str] = [f"trainer rank {r}" for r in range(world)]  # group rank -> who
        replies: dict[str, BaseException | None] = {}  # driver: url -> its /init_weight_transfer_engine outcome
        if rank == 0:
            for url, count in zip(urls, workers):
                members += [url] * count
            for client in pool.clients:
                # A failed push's /update_weights ends within the group's timeout (its receive gives up then);
                # the HTTP limit must leave it that long, or a live server would look dead.
                client.weight_update_timeout_s = max(client.weight_update_timeout_s, timeout_s + _HTTP_MARGIN_S)
            first = world
            calls = {}
            for url, client, count in zip(urls, pool.clients, workers):
                info = {"host": host, "port": port, "rank": first, "world_size": size, "num_engines": sum(workers),
                        "expert_load": rollout.cpu_expert_load, "backend": backend, "timeout_s": timeout_s}
                calls[url] = (lambda c=client, info=info: c.init_weight_transfer_engine(info))
                first += count
            # The servers join the group from inside their HTTP call; run them while this rank joins too.
            waiters = _start_threads(calls, replies)
        group = error = None
        try:
            group = SyncGroup.connect(host, port, rank=rank, world_size=size, backend=backend, timeout_s=timeout_s)
        except Exception as exc:  # every rank takes part in the exchange below, so that all raise together
            error = exc
        errors = collectives.all_gather_object(None if error is None else str(error))
        failure = None
        if rank == 0:
            # After a failed rendezvous a server's own attempt may still be running (a client of the store retries
            # for up to twice the timeout): what it said by then is reported, the rest is named as silent.
            grace = None if not any(errors) else _REPLY_GRACE_S
            _join_threads(waiters, grace)
            replies = dict(replies)  # a snapshot: a call still running may add its reply meanwhile
            failed = {u: e for u, e in replies.items() if e is not None}
            if any(errors):
                failure = _Failure(RuntimeError, _join_failure_message(
                    error, errors, address, timeout_s, members, urls, replies, rollout.sync_host))
            elif failed:
                failure = _Failure(RuntimeError, "weight-transfer set-up failed on " + "; ".join(
                    f"{u}: {e}" for u, e in failed.items()))
        failure = _broadcast(failure)
        if failure is not None:
            failure.raise_()
        sync = WeightSync.remote(model, group, num_engines=sum(workers))
        return cls(urls=urls, weight_sync=sync, pool=pool, processes=processes, config=rollout)

    # -- generation -------------------------------------------------------------------------------------------

    def _generation(self, prompt_ids, *, n: int, seed: int, prompt_indices=None, **sampling: Any):
        """The share's leader (the driver when no share is set) requests the share's samples from the servers
        (the local part) and hands them to its peers; the per-server counts and any failure are exchanged over
        the whole job, so every rank returns or raises from the same call (the collective part)."""
        share = self.share
        leads = self.is_driver if share is None else share.is_leader
        prompts = [list(p) for p in prompt_ids]

        def local_part():
            if not leads:
                return None
            cfg = self.config
            kwargs = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
            kwargs.update(sampling)
            try:
                pool = self._generation_pool()
                batch = pool.generate(prompts, n=n, seed=seed, prompt_indices=prompt_indices, **kwargs)
                return batch, list(pool.samples_per_server)
            except Exception as exc:
                return _Failure(type(exc) if isinstance(exc, RuntimeError) else RuntimeError,
                                f"remote rollout failed: {type(exc).__name__}: {exc}")

        return local_part, self._collect

    def _collect(self, outcome):
        share = self.share
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
            self._leader_pool = ServerPool(self.urls, eos_token_ids=self._eos_token_ids)
        return self._leader_pool

    def set_share(self, share) -> None:
        """Also hands the EOS ids the driver's pool checks samples against to the other shares' leaders."""
        super().set_share(share)
        eos = self.pool.clients[0].eos_token_ids if self.pool is not None else None
        self._eos_token_ids = _broadcast(eos)

    # -- weights ----------------------------------------------------------------------------------------------

    def push(self, model_chunks, version: int):
        """Every trainer rank: makes ``version`` every server's weights, or raises :class:`WeightSyncError` with the
        same message on every rank (see the module docstring for what each server holds then). After a failure
        that leaves the weight-transfer group unusable (a server died, a wait timed out) or a server in doubt,
        every later push raises at once: the fleet cannot make one version current on every server again."""
        self.wait_idle()
        if self.broken is not None:
            # Every rank holds the same reason (from the driver's broadcast), so all refuse without talking.
            raise WeightSyncError(f"weight sync to version {version} refused: {self.broken}")
        failure = None
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
        replies: dict[str, BaseException | None] = {}
        if self.is_driver:
            calls = {c.url: (lambda c=c: c.update_weights({"version": version})) for c in self.pool.clients}
            threads = _start_threads(calls, replies)
        stats, error = None, None
        try:
            stats = self.weight_sync.push(model_chunks, version)
        except Exception as exc:
            # Transport errors and timeouts too (a server died mid-push): every rank must reach the exchange below,
            # or the ranks that did would wait there for the others.
            error = exc
        trainer_errors = collectives.all_gather_object(
            None if error is None else (isinstance(error, WeightSyncError), _brief(error, 1000)))
        outcome = None
        if self.is_driver:
            _join_threads(threads, None)  # each call is bounded by the client's weight_update_timeout_s
            keep_paused: list[str] = []
            if any(trainer_errors) or any(e is not None for e in replies.values()):
                try:
                    outcome = self._after_failed_push(version, trainer_errors, replies, keep_paused)
                except Exception as exc:  # still tell the other ranks, who wait in the broadcast below
                    outcome = {"message": f"weight sync to version {version} failed ({trainer_errors}); reading "
                                          f"the servers' states then failed too: {exc!r}", "broken": True}
                    keep_paused += [c.url for c in self.pool.clients]
            else:
                try:
                    for client in self.pool.clients:
                        client.finish_weight_update(version)
                        client.reset_prefix_cache()
                    versions = self.pool.versions()
                    wrong = {u: v for u, v in versions.items() if v != version}
                    if wrong:
                        raise WeightSyncError(f"after the push of version {version} the servers report {wrong}")
                except Exception as exc:
                    outcome = {"message": f"weight sync to version {version}: {exc}", "broken": False}
            self._resume_quietly(keep_paused)
        outcome = _broadcast(outcome)
        if outcome is not None:
            if outcome["broken"]:
                self.broken = outcome["message"]
            raise WeightSyncError(outcome["message"]) from error
        return stats

    def _after_failed_push(self, version: int, trainer_errors: list, replies: dict, keep_paused: list[str]) -> dict:
        """The driver, after a push that failed somewhere: each server's state, read rather than assumed, with
        its label made true (a server that loaded the version is labelled with it), and whether the fleet can go
        on. Servers whose weights are in doubt are added to ``keep_paused`` so that they serve nothing."""
        states, dead = [], []
        doubt = False
        for client in self.pool.clients:
            url = client.url
            reply = replies.get(url)
            if url in replies and reply is None:
                # Its /update_weights returned: it received, checked and loaded the whole version before the push
                # failed elsewhere. Labelling it keeps /weight_info and the samples' version spans true.
                try:
                    client.finish_weight_update(version)
                    client.reset_prefix_cache()
                    states.append(f"{url}: loaded version {version} before the failure and serves it "
                                  f"(/weight_info says {version})")
                except Exception as exc:
                    doubt = True
                    keep_paused.append(url)
                    states.append(f"{url}: loaded version {version}, but labelling it failed ({_brief(exc)}): left "
                                  "paused, since its /weight_info does not name the weights it holds")
            elif not client.health():
                dead.append(url)
                states.append(f"{url}: died during the push (no answer on /health; /update_weights: {_brief(reply)})")
            elif UNUSABLE in str(reply):
                doubt = True
                keep_paused.append(url)
                states.append(f"{url}: its load failed inside vLLM, so its weights may mix versions: left paused; "
                              f"restart it ({_brief(reply)})")
            elif isinstance(reply, ServerUnreachable):
                doubt = True
                keep_paused.append(url)
                states.append(f"{url}: gave no answer to /update_weights, so whether it loaded version {version} is "
                              f"unknown: left paused ({_brief(reply)})")
            else:
                # Its backend raises only when it loaded nothing (or, above, when vLLM's load broke).
                try:
                    served = f"serves version {client.weight_version()}"
                except Exception as exc:
                    served = f"its /weight_info failed ({_brief(exc)})"
                states.append(f"{url}: did not load version {version}; it {served} ({_brief(reply)})")
        causes = [text for item in trainer_errors if item for text in item[1:]]
        # A WeightSyncError is a failure all members of the group raised together; anything else (a closed
        # connection, a timeout) leaves the group unusable.
        transport = any(item and not item[0] for item in trainer_errors)
        head = f"weight sync to version {version} failed"
        if dead:
            head += f": rollout server(s) {', '.join(dead)} died during the push"
        cause = causes[0] if causes else "the trainer ranks finished, but a server's /update_weights failed"
        message = f"{head} ({cause}).\nServers after the failure:\n  " + "\n  ".join(states)
        broken = bool(dead) or transport or doubt
        if broken:
            why = ("the weight-transfer group lost a member" if dead else
                   "the weight-transfer group is in an unknown state after a transport error or timeout" if transport
                   else "a server's weights are in doubt")
            message += (f"\n{why[0].upper()}{why[1:]}: no later push can make one version current on every server, so "
                        "this fleet refuses every further push. Restart the run: it resumes from the last checkpoint "
                        "with a fresh fleet.")
        return {"message": message, "broken": broken}

    def _resume_quietly(self, keep_paused: list[str] = ()) -> None:
        for client in self.pool.clients:
            if client.url in keep_paused or client.url in self.pool.dead:
                continue
            try:
                client.resume()
            except Exception:  # the failure being reported matters more; a dead server is named there
                pass

    def pause(self, mode="wait") -> None:
        if self.is_driver:
            self.pool.pause(mode)

    def resume(self) -> None:
        if self.is_driver:
            self.pool.resume()

    def close(self) -> None:
        self.wait_idle()
        for pool in (self.pool, getattr(self, "_leader_pool", None)):
            if pool is not None:
                pool.close()
        for process in self.processes:
            process.stop()
        self.weight_sync = None


# Servers on rollout nodes start with the job (a 30B model loads in minutes); the trainer waits this long.
SERVER_WAIT_S = 1800.0
# Beyond the group's timeout, for the HTTP calls that run inside the group (a server's reply after its own wait).
_HTTP_MARGIN_S = 60.0
# After a failed rendezvous, how long the driver still waits for the servers' replies, to quote them.
_REPLY_GRACE_S = 10.0


def _wait_for_servers(pool, timeout_s: float) -> None:
    """Until every server's /health answers; a message every 30 s, an error naming the missing ones."""
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
