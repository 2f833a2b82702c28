"""The weight-transfer group's bounds, without vLLM: processes that join `SyncGroup.connect` on one machine.

A rank that never arrives makes the others raise `SyncGroupJoinError` naming it within the timeout (instead of
gloo's 30-minute default); a rank told an address where nothing listens gives up too; and once formed, a wait
on a silent peer fails within the same timeout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from sapo_megatron.launch import free_port

pytestmark = [pytest.mark.distributed]

TIMEOUT_S = 4.0

MEMBER = """
import json, sys, time
import torch
from sapo_megatron.bridge.sync import SyncGroup, SyncGroupJoinError
port, rank, size, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
start = time.monotonic()
out = {"rank": rank}
try:
    group = SyncGroup.connect("127.0.0.1", port, rank=rank, world_size=size, timeout_s=%(timeout)r)
    out["joined"] = time.monotonic() - start
    if mode == "silent-peer" and rank == 0:
        start = time.monotonic()
        try:
            group.recv(torch.empty(4), 1, 0).wait()  # rank 1 is alive but never sends
        except RuntimeError as exc:
            out["recv_error"] = str(exc).splitlines()[0]
        out["recv_seconds"] = time.monotonic() - start
    elif mode == "silent-peer":
        time.sleep(%(timeout)r + 6)
except SyncGroupJoinError as exc:
    out.update(error=str(exc), missing=exc.missing, address=exc.address)
out["seconds"] = time.monotonic() - start
print("RESULT " + json.dumps(out), flush=True)
""" % {"timeout": TIMEOUT_S}


def _members(ports: list[int], size: int, mode: str) -> list[dict]:
    procs = [
        subprocess.Popen([sys.executable, "-c", MEMBER, str(port), str(rank), str(size), mode],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={"OMP_NUM_THREADS": "1",
                                                                                             **_env()})
        for rank, port in enumerate(ports)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    return results


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def test_a_rank_that_never_arrives_is_named_by_the_others_within_the_timeout():
    port = free_port()
    # Rank 2 is told a port where nothing listens: it never reaches the others' rendezvous.
    start = time.monotonic()
    results = _members([port, port, free_port()], 3, "join")
    elapsed = time.monotonic() - start
    for r in results[:2]:
        assert r["address"] == f"127.0.0.1:{port}"
        assert f"the sync group at 127.0.0.1:{port} did not form within 4 s" in r["error"]
        assert r["seconds"] < TIMEOUT_S + 3
    # Rank 0 holds the rendezvous store, so it always reads who arrived (the server fleet reports its view);
    # another rank may find the store gone once rank 0 has given up.
    assert results[0]["missing"] == [2]
    assert "rank(s) 2 of 3 did not arrive" in results[0]["error"]
    assert results[1]["missing"] in ([2], None)
    lost = results[2]
    assert lost["missing"] == [2] and "rank 2 could not reach the sync group's rendezvous" in lost["error"]
    # A client of the store retries once after its first timeout: about twice the timeout, never minutes.
    assert lost["seconds"] < 2 * TIMEOUT_S + 5
    assert "Exception raised from" not in lost["error"]  # the C++ stack trace stays out of the message
    assert elapsed < 60


def test_a_wait_on_a_silent_member_fails_within_the_timeout():
    port = free_port()
    results = _members([port, port], 2, "silent-peer")
    assert all("joined" in r for r in results), results
    assert "Timed out" in results[0]["recv_error"]
    assert TIMEOUT_S - 0.5 < results[0]["recv_seconds"] < TIMEOUT_S + 3


@pytest.mark.parametrize("value", ["0", "-5", "inf", "nan"])
def test_the_configured_timeout_must_be_a_finite_positive_number(value):
    from sapo_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"rollout\.sync_timeout_s=.*must be a finite number of seconds > 0"):
        load_config(None, [f"rollout.sync_timeout_s={value}"])
    assert load_config(None, []).rollout.sync_timeout_s == 300.0
    assert load_config(None, ["rollout.sync_timeout_s=20"]).rollout.sync_timeout_s == 20.0
