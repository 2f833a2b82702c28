"""Weights into real `vllm serve` servers through vLLM's HTTP weight-update API and our `sapo_reshard` backend.

Two CPU servers of the tiny model, started with `--weight-transfer-config {"backend": "sapo_reshard"}`, and two
trainer ranks (EP2) that push perturbed Megatron weights into both: the servers then sample with exactly the
weights Megatron scores with; a refused push leaves both on the old version; and a server that cannot load
our plugin does not start.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sapo_megatron.launch import run_torchrun

pytest.importorskip("vllm")

from sapo_megatron.rollout.servers import ServerError, ServerProcess, start_servers  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.distributed]

HERE = Path(__file__).parent
BACKEND = ["--weight-transfer-config", json.dumps({"backend": "sapo_reshard"})]
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("server-push")
    servers = start_servers(tiny_model_dir, 2, log_dir=out / "servers", kv_cache_memory_bytes=128 * 1024**2,
                            extra_args=BACKEND, timeout_s=600)
    try:
        urls = ",".join(s.url for s in servers)
        run_torchrun([str(HERE / "worker_server_push.py"), str(out), str(tiny_model_dir), urls], 2,
                     timeout=600).check()
    finally:
        for server in servers:
            server.stop()
    return torch.load(out / "result.pt")


def _max_diff(rollout: dict, megatron: list) -> float:
    return max(abs(a - b) for x, y in zip(rollout["logprobs_rollout"], megatron) for a, b in zip(x, y))


def test_both_servers_sample_with_the_pushed_weights(results):
    megatron = [r for r in results if r["v1"]["megatron"] is not None]
    assert megatron, "no rank scored the sequences"
    for label in ("v1", "v2"):
        rollout = results[0][label]
        assert rollout["weight_version"] == int(label[1])
        assert results[0]["versions"][label] == {u: int(label[1]) for u in results[0]["versions"][label]}
        # 4 prompts x 2 samples over two servers: every server generated.
        assert sum(rollout["samples_per_engine"]) == 8 and min(rollout["samples_per_engine"]) > 0
        scored = [r[label]["megatron"] for r in results if r[label]["megatron"] is not None][0]
        assert _max_diff(rollout, scored) <= TOL, label
    assert results[0]["v1"]["response_ids"] != results[0]["v2"]["response_ids"]


def test_a_refused_push_leaves_every_server_on_the_old_version(results):
    for r in results:
        message = r["errors"]["nan"]
        assert "non-finite" in message and "model.norm.weight" in message
    assert results[0]["versions"]["after-nan"] == {u: 1 for u in results[0]["versions"]["after-nan"]}
    # Same weights, same seed: the same samples as before the refused push.
    assert results[0]["after-nan"]["response_ids"] == results[0]["v1"]["response_ids"]
    assert results[0]["after-nan"]["weight_version"] == 1


def test_the_backend_reaches_the_server_only_through_the_vllm_plugin_entry_point(tiny_model_dir, tmp_path):
    """With vLLM's plugin allow-list naming another plugin, ours is not loaded and the server refuses the backend:
    what makes `sapo_reshard` exist inside a server process is the `vllm.general_plugins` entry point."""
    server = ServerProcess(tiny_model_dir, log_path=tmp_path / "server.log", kv_cache_memory_bytes=64 * 1024**2,
                           extra_args=BACKEND, env={"VLLM_PLUGINS": "lora_filesystem_resolver"})
    with pytest.raises(ServerError, match="exited with code 1 before it was ready"):
        server.start().wait_ready(timeout_s=300)
    server.stop()
    assert "Invalid weight transfer backend: sapo_reshard" in (tmp_path / "server.log").read_text()
