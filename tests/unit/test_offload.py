"""Phase offload (sapo_megatron.actor.offload) on the real megatron actor, one process and two.

The worker trains a fresh actor for two SAPO steps twice, once plain and once with a full offload / reload
between the steps; everything the offloaded run measured comes back in its record. The model is a wider
tiny Qwen3-MoE (~39 MB of fp32 parameters) so that the freed memory stands out of the process's RSS.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sapo_megatron.launch import run_torchrun

WORKER = Path(__file__).resolve().parents[1] / "distributed" / "worker_offload.py"
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    from sapo_megatron.models.tiny import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(hidden_size=256, moe_intermediate_size=384, num_experts=16)
    return build_tiny_model(spec, cache_dir=tmp_path_factory.mktemp("wide-model-cache"))


@pytest.fixture(scope="module")
def offload_runs(wide_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("offload-runs")
    done: set[int] = set()
    jobs = {1: ["dp"], 2: ["dp", "ep2"]}

    def results_for(nproc: int) -> Path:
        if nproc not in done:
            args = [str(WORKER), out / f"np{nproc}", wide_model_dir, "cpu", *jobs[nproc]]
            run_torchrun(list(map(str, args)), nproc, timeout=JOB_TIMEOUT_S).check()
            done.add(nproc)
        return out / f"np{nproc}"

    return results_for


def _records(run_dir: Path, layout: str, nproc: int) -> list[dict]:
    paths = sorted((run_dir / layout).glob("rank*.pt"))
    assert len(paths) == nproc
    return [torch.load(path) for path in paths]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", [(1, "dp"), (2, "dp"), (2, "ep2")])
def test_offload_frees_storage_and_restores_bit_identically(offload_runs, nproc, layout):
    for record in _records(offload_runs(nproc), layout, nproc):
        checks = record["offloaded"]["checks"]
        # While offloaded every parameter, gradient buffer view and optimizer tensor holds zero bytes.
        assert set(checks["offloaded_param_bytes"]) == {0}
        assert set(checks["offloaded_grad_bytes"]) == {0}
        assert set(checks["offloaded_optimizer_bytes"]) == {0}
        assert all(set(sizes) == {0} for sizes in checks["offloaded_bucket_bytes"])
        if layout == "ep2":
            assert checks["num_expert_parallel_buffers"] > 0
        # fp32 params and grads: one DDP buffer each, the parameters plus megatron's bucket padding. The fp32
        # main params are views into the parameters (counted there), so the optimizer's share is Adam's state.
        report = checks["report"]
        assert report["params"] == report["grads"]
        assert checks["param_bytes"] <= report["params"] <= 1.01 * checks["param_bytes"]
        assert report["optimizer"] == checks["adam_state_bytes"] > 0
        freed = sum(report.values())
        dropped = checks["memory_before"] - checks["memory_after"]
        print(f"\n{layout} np{nproc}: offloaded {freed / 2**20:.1f} MiB in {checks['storages']} storages; RSS "
              f"{checks['memory_before'] / 2**20:.1f} -> {checks['memory_after'] / 2**20:.1f} MiB "
              f"(-{dropped / 2**20:.1f}), after reload {checks['memory_reloaded'] / 2**20:.1f} MiB")
        # The CPU store is a file, so resident memory really goes down (glibc pages returned to the OS).
        assert dropped > 0.5 * freed
        assert checks["same_objects"] and checks["params_view_buffer"]
        assert checks["params_restored"] and checks["optimizer_restored"] and checks["grads_zero"]
        # Offloading the optimizer alone frees Adam's moments and leaves the parameters in place.
        assert set(checks["partial_moment_bytes"]) == {0}
        assert 0 not in checks["partial_param_bytes"]
        assert set(checks["partial_report"]) == {"optimizer"} and checks["partial_restored"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", [(1, "dp"), (2, "dp"), (2, "ep2")])
def test_step_after_reload_is_bit_identical_to_a_step_without_offload(offload_runs, nproc, layout):
    for record in _records(offload_runs(nproc), layout, nproc):
        plain, offloaded = record["plain"], record["offloaded"]
        assert plain["metrics"] == offloaded["metrics"]
        # The second step really moved the weights (an offload that lost the update would also compare equal
        # to a run whose update did nothing).
        assert plain["metrics"][1]["grad_norm"] > 0
        assert sorted(plain["weights"]) == sorted(offloaded["weights"])
        for name, tensor in plain["weights"].items():
            assert torch.equal(tensor, offloaded["weights"][name]), name
        assert len(plain["optimizer"]) == len(offloaded["optimizer"]) > 0
        assert all(torch.equal(a, b) for a, b in zip(plain["optimizer"], offloaded["optimizer"]))


@pytest.mark.gpu
@pytest.mark.distributed
def test_offload_on_gpu_frees_device_memory(wide_model_dir, tmp_path):
    out = tmp_path / "gpu"
    run_torchrun([str(WORKER), str(out), str(wide_model_dir), "cuda", "dp"], 1, timeout=JOB_TIMEOUT_S).check()
    (record,) = _records(out, "dp", 1)
    checks = record["offloaded"]["checks"]
    freed = sum(checks["report"].values())
    # torch.cuda.memory_allocated counts the live device blocks (sizes rounded up to the allocator granule).
    assert checks["memory_before"] - checks["memory_after"] >= freed
    assert checks["params_restored"] and checks["optimizer_restored"]
    assert record["plain"]["metrics"] == record["offloaded"]["metrics"]


def test_optimizer_cpu_offload_is_refused_on_cpu():
    from sapo_megatron.actor.offload import check_optimizer_offload
    from sapo_megatron.config import ConfigError, OptimizerConfig, load_config

    with pytest.raises(ConfigError, match="optimizer_cpu_offload=true with trainer.device=cpu"):
        load_config(None, ["trainer.device=cpu", "optimizer.optimizer_cpu_offload=true"])
    # trainer.device=auto resolves at run time: the actor checks the resolved device.
    with pytest.raises(ValueError, match="HybridDeviceOptimizer, which needs a CUDA device"):
        check_optimizer_offload(OptimizerConfig(optimizer_cpu_offload=True), torch.device("cpu"))
    check_optimizer_offload(OptimizerConfig(optimizer_cpu_offload=True), torch.device("cuda", 0))
    check_optimizer_offload(OptimizerConfig(offload_optimizer=True), torch.device("cpu"))
