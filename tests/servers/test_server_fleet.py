"""Real ``vllm serve`` servers of the tiny model, driven over HTTP by ServerClient / ServerPool (vLLM on CPU).

Two servers start once for the module (concurrently) and are stopped at its end, also when a test fails.
The last test kills them, so it stays last.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from sapo_megatron.models.tiny import TinyModelSpec, build_tiny_model  # noqa: E402
from sapo_megatron.rollout.engine import RolloutBatch  # noqa: E402
from sapo_megatron.rollout.servers import (  # noqa: E402
    GENERATE_ENDPOINT,
    NoServerLeft,
    ServerClient,
    ServerError,
    ServerPool,
    ServerProcess,
    WeightInfo,
    start_servers,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# vLLM's CPU attention kernels need head_dim >= 32.
SPEC = TinyModelSpec(head_dim=32)
KV_CACHE_BYTES = 128 << 20
MAX_MODEL_LEN = 512
# Prompts of different lengths, with a repeated prompt (common in GRPO data: it must get different samples).
PROMPTS = [
    [72, 101, 108, 108, 111],
    [40, 41, 42],
    [72, 101, 108, 108, 111],
    [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
    [200],
    [33, 34, 35, 36, 37, 38],
    [100, 90, 80, 70],
    [5, 6],
]
SAMPLING = dict(n=4, max_new_tokens=32, temperature=0.8, top_p=0.9, seed=7)
LOGPROB_TOL = 1e-6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(SPEC, cache_dir=tmp_path_factory.mktemp("tiny-model-head32"))


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("server-logs")
    procs = start_servers(
        model_dir, 2, log_dir=log_dir, timeout_s=420, dtype="float32", max_model_len=MAX_MODEL_LEN,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
    )
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop(grace_s=10)


@pytest.fixture(scope="module")
def urls(servers) -> list[str]:
    return [s.url for s in servers]


@pytest.fixture(scope="module")
def two_server_batch(urls) -> tuple[RolloutBatch, list[int]]:
    with ServerPool(urls) as pool:
        batch = pool.generate(PROMPTS, **SAMPLING)
        return batch, list(pool.samples_per_server)


def differences(a: RolloutBatch, b: RolloutBatch) -> tuple[int, int, float]:
    """(rows whose tokens differ, rows whose finish reason differs, max |log-prob diff| over rows with equal
    tokens)."""
    assert len(a) == len(b)
    token_rows = sum(x != y for x, y in zip(a.response_ids, b.response_ids))
    finish_rows = sum(x != y for x, y in zip(a.finish_reasons, b.finish_reasons))
    lp_diff = max(
        (abs(p - q) for ra, rb, la, lb in zip(a.response_ids, b.response_ids, a.logprobs_rollout, b.logprobs_rollout)
         if ra == rb for p, q in zip(la, lb)),
        default=0.0,
    )
    return token_rows, finish_rows, lp_diff


def assert_same_samples(a: RolloutBatch, b: RolloutBatch, what: str) -> None:
    token_rows, finish_rows, lp_diff = differences(a, b)
    assert (token_rows, finish_rows) == (0, 0), (
        f"{what}: {token_rows} of {len(a)} samples have other tokens, {finish_rows} another finish reason"
    )
    assert lp_diff <= LOGPROB_TOL, f"{what}: log-probs differ by up to {lp_diff:.3e}"
    print(f"{what}: {len(a)} samples, tokens and finish reasons equal, max |log-prob diff| {lp_diff:.2e}")


def assert_prompt_major(batch: RolloutBatch, prompts: list[list[int]], n: int) -> None:
    assert len(batch) == len(prompts) * n
    assert batch.prompt_index == [i for i in range(len(prompts)) for _ in range(n)]
    assert batch.prompt_ids == [p for p in prompts for _ in range(n)]
    assert batch.routed_experts is None
    assert set(batch.finish_reasons) <= {"eos", "length"}
    for resp, lps in zip(batch.response_ids, batch.logprobs_rollout):
        assert 1 <= len(resp) <= SAMPLING["max_new_tokens"] and len(lps) == len(resp)
        assert all(lp <= 0.0 for lp in lps)


# --------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)  # includes the module's server start (~100 s on 2 busy cores, 260 s seen under heavy load)
def test_two_servers_give_the_samples_of_one_server(urls, two_server_batch):
    batch, per_server = two_server_batch
    assert_prompt_major(batch, PROMPTS, SAMPLING["n"])
    assert batch.weight_version == 0
    # Both servers took part, and every sample is counted once.
    assert sum(per_server) == len(batch) and min(per_server) > 0
    # The repeated prompt (0 and 2) gets its own samples: the per-prompt seed depends on its index.
    n = SAMPLING["n"]
    assert batch.response_ids[0:n] != batch.response_ids[2 * n : 3 * n]
    # Both finish reasons occur (the tiny model's EOS comes up now and then), so both are compared below.
    assert set(batch.finish_reasons) == {"eos", "length"}
    print(f"finish reasons: {batch.finish_reasons.count('eos')} eos, {batch.finish_reasons.count('length')} length")

    with ServerPool(urls[:1]) as one:
        alone = one.generate(PROMPTS, **SAMPLING)
        assert one.samples_per_server == [len(batch)]
    assert_same_samples(batch, alone, "2 servers vs 1 server")
    # Same seed, same servers, same samples; another seed, other samples.
    with ServerPool(urls[::-1]) as reversed_pool:
        again = reversed_pool.generate(PROMPTS, **SAMPLING)
        other = reversed_pool.generate(PROMPTS, **{**SAMPLING, "seed": 8})
    assert_same_samples(batch, again, "2 servers, listed in the other order")
    assert other.response_ids != batch.response_ids


REFERENCE_SCRIPT = r"""
import json, sys
from sapo_megatron.config import RolloutConfig
from sapo_megatron.rollout.engine import RolloutEngine

args = json.loads(sys.argv[1])
config = RolloutConfig(kv_cache_memory_bytes=args["kv_cache_memory_bytes"], seed=0)
engine = RolloutEngine(args["model_dir"], config, device="cpu", dtype="float32", max_model_len=args["max_model_len"],
                       collect_routed_experts=False)
batch = engine.generate(args["prompts"], collect_routed_experts=False, **args["sampling"])
with open(args["out"], "w") as f:
    json.dump({k: getattr(batch, k) for k in ("prompt_ids", "response_ids", "logprobs_rollout", "finish_reasons",
                                             "prompt_index", "weight_version")}, f)
engine.close()
"""


@pytest.mark.timeout(300)
def test_servers_agree_with_the_in_process_engine(model_dir, two_server_batch, tmp_path):
    # In a clean process: the in-process engine sets vLLM's process-wide mode (VLLM_ENABLE_V1_MULTIPROCESSING=0).
    out = tmp_path / "engine_batch.json"
    args = dict(model_dir=str(model_dir), prompts=PROMPTS, sampling=SAMPLING, kv_cache_memory_bytes=KV_CACHE_BYTES,
                max_model_len=MAX_MODEL_LEN, out=str(out))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    proc = subprocess.run([sys.executable, "-c", REFERENCE_SCRIPT, json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"the in-process engine failed:\n{proc.stderr[-6000:]}"
    engine_batch = RolloutBatch(**json.loads(out.read_text()))
    batch, _ = two_server_batch
    assert engine_batch.prompt_index == batch.prompt_index and engine_batch.prompt_ids == batch.prompt_ids
    assert_same_samples(batch, engine_batch, "2 servers vs the in-process RolloutEngine")


# --------------------------------------------------------------------------------------------------------
# Control endpoints and errors
# --------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_pause_keep_holds_requests_until_resume_and_weight_info_answers(urls):
    request = dict(n=2, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=5)
    with ServerClient(urls[0], generate_timeout_s=60) as client, ThreadPoolExecutor(1) as executor:
        assert client.weight_info() == WeightInfo(weight_version="0")
        assert client.weight_version() == 0
        assert client.get_world_size() == 1
        assert client.is_paused() is False
        expected = client.generate([1, 2, 3], **request)

        client.pause(mode="keep")
        try:
            assert client.is_paused() is True
            held = executor.submit(client.generate, [1, 2, 3], **request)
            time.sleep(2.0)
            assert not held.done(), "a paused server (mode='keep') answered a generation request"
        finally:
            client.resume()
        assert client.is_paused() is False
        assert held.result(timeout=60) == expected

    with ServerPool(urls) as pool:
        assert pool.versions() == {urls[0]: 0, urls[1]: 0}
        assert pool.weight_version() == 0
        pool.pause(mode="keep")
        try:
            assert pool.is_paused() == {urls[0]: True, urls[1]: True}
        finally:
            pool.resume()
        assert pool.is_paused() == {urls[0]: False, urls[1]: False}
        # Servers on different versions refuse to roll out together.
        pool.clients[1].update_weight_version(3)
        try:
            assert pool.versions() == {urls[0]: 0, urls[1]: 3}
            with pytest.raises(RuntimeError, match="different weight versions") as err:
                pool.generate(PROMPTS[:1], **SAMPLING)
            assert urls[0] in str(err.value) and urls[1] in str(err.value)
        finally:
            pool.clients[1].update_weight_version(0)
        assert pool.dead == {}


@pytest.mark.timeout(120)
def test_a_bad_request_names_the_server_and_the_reason(urls):
    with ServerClient(urls[0]) as client:
        with pytest.raises(ServerError) as err:
            client.generate([1, 2, 320], n=1, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    assert err.value.status == 400 and err.value.url == urls[0] and err.value.endpoint == GENERATE_ENDPOINT
    assert f"{urls[0]}{GENERATE_ENDPOINT}" in str(err.value)
    assert "Token id 320 is out of vocabulary" in str(err.value)

    with ServerPool(urls) as pool:
        # Paused servers (mode="keep") hold the good prompts' requests; the last prompt is rejected when it is sent.
        prompts = [[1 + i, 2, 3] for i in range(12)] + [[5, 320]]
        pool.pause(mode="keep")
        try:
            with pytest.raises(ServerError) as err:
                pool.generate(prompts, **SAMPLING)
            failed_at = time.monotonic()
            # The failed rollout aborted its held requests on the servers: no thread of it is left waiting.
            while any(t.name.startswith("rollout-server") for t in threading.enumerate()):
                assert time.monotonic() - failed_at < 2.0, "requests of a failed rollout are still running"
                time.sleep(0.02)
        finally:
            pool.resume()
        assert str(err.value).startswith(f"vLLM server {err.value.url}{GENERATE_ENDPOINT}: prompt 12: request failed")
        assert err.value.url in urls and "Token id 320 is out of vocabulary" in str(err.value)
        # A rejected request says nothing about the server's health, and the servers still serve.
        assert pool.dead == {}
        assert len(pool.generate(PROMPTS[:2], **SAMPLING)) == 2 * SAMPLING["n"]
        with pytest.raises(ValueError, match="max_new_tokens"):
            pool.generate([[1, 2]], **{**SAMPLING, "max_new_tokens": 0})


class ScriptedServer(ServerProcess):
    """A ServerProcess whose process is a short script: the start-up error paths without a vLLM start."""

    def __init__(self, *args, script: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.script = script

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.script]


@pytest.mark.timeout(60)
def test_a_server_that_cannot_start_names_its_url_and_log(model_dir, tmp_path):
    crashing = ScriptedServer(model_dir, log_path=tmp_path / "crash.log",
                              script="import sys; print('ValueError: no such architecture'); sys.exit(3)")
    with crashing, pytest.raises(ServerError) as err:
        crashing.wait_ready(timeout_s=30)
    message = str(err.value)
    assert crashing.url in message and "exited with code 3" in message
    assert "ValueError: no such architecture" in message and str(tmp_path / "crash.log") in message

    hanging = ScriptedServer(model_dir, log_path=tmp_path / "hang.log",
                             script="import time; print('loading', flush=True); time.sleep(600)")
    with hanging, pytest.raises(ServerError) as err:
        hanging.wait_ready(timeout_s=2)
    assert hanging.url in str(err.value) and "not ready after 2 s" in str(err.value) and "loading" in str(err.value)
    assert not hanging.is_running()


# --------------------------------------------------------------------------------------------------------
# Failures (kills the module's servers: keep last)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_server_killed_mid_rollout_is_replaced_and_both_killed_is_an_error(servers, urls, caplog):
    prompts = [[(31 * i + k) % 250 + 1 for k in range(3 + i % 5)] for i in range(16)]
    sampling = dict(n=4, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=11)
    with ServerPool(urls[:1]) as one:
        reference = one.generate(prompts, **sampling)

    # Server 1 holds the requests it is given (paused with mode="keep"), so the kill finds it with requests in
    # flight whatever the machine's load; server 0 generates meanwhile.
    pool = ServerPool(urls, max_inflight_per_server=2)
    pool.clients[1].pause(mode="keep")
    victim = servers[1]

    def kill_once_server_0_has_answered() -> None:
        deadline = time.monotonic() + 120
        while pool.samples_per_server[0] < 2 * sampling["n"] and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(victim.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_once_server_0_has_answered, daemon=True)
    with caplog.at_level(logging.WARNING, logger="sapo_megatron.rollout.servers"):
        killer.start()
        batch = pool.generate(prompts, **sampling)
        killer.join(timeout=10)

    assert list(pool.dead) == [urls[1]]
    assert any(urls[1] in r.getMessage() and "dead" in r.getMessage() for r in caplog.records)
    # Every sample is there: the prompts server 1 held were re-sent to server 0, and they are the samples that
    # server 0 alone generates for those prompts and seeds.
    assert len(batch) == len(prompts) * sampling["n"]
    assert pool.samples_per_server == [len(batch), 0]
    assert batch.prompt_index == reference.prompt_index
    assert_same_samples(batch, reference, "rollout with server 1 killed vs server 0 alone")

    os.kill(servers[0].pid, signal.SIGKILL)
    with pytest.raises(NoServerLeft) as err:
        pool.generate(prompts[:2], **sampling)
    assert set(err.value.errors) == set(urls) and "no rollout server is left" in str(err.value)
    assert f"{urls[0]}: vLLM server {urls[0]}/weight_info: connection failed" in str(err.value)
    assert f"{urls[1]}: vLLM server {urls[1]}{GENERATE_ENDPOINT}: connection failed" in str(err.value)
    with ServerPool(urls) as fresh, pytest.raises(NoServerLeft) as err:
        fresh.generate(prompts[:2], **sampling)
    assert set(err.value.errors) == set(urls) and set(fresh.dead) == set(urls)
    pool.close()
