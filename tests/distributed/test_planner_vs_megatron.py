"""The planner's numbers against what megatron-core really allocates, for the tiny Qwen3-MoE on CPU (gloo).

Each job builds the model for several layouts in turn (``init_distributed`` + ``build_model``), wraps it in
megatron's DDP and builds megatron's distributed optimizer through ``actor.factory`` exactly as the trainer does,
takes one optimizer step so that Adam's states exist, and reports what every rank holds. This file is also that
job's worker script (``python test_planner_vs_megatron.py OUT_DIR HF_DIR LAYOUT ...``).

What must agree, and how closely:
* parameter counts, dense and expert, per rank: exactly;
* the elements the distributed optimizer owns (its fp32 shards), summed over a shard group: exactly (the
  shards partition the replica's parameters); per rank at most the padded buffer / group size;
* Adam's moments: exactly 8 bytes per optimizer element, and the fp32 master copy: 4 bytes per element for
  bf16 parameters and none for fp32 parameters (the shard is a view of the parameter buffer);
* the DDP parameter / gradient buffers: the planner counts parameter elements, megatron aligns each parameter
  to 64 elements and the buffer's end to lcm(DP, 128), so allocated - planned lies in [0, padding_bound] for
  each buffer: the tolerance is that alignment and nothing else (a few thousand elements here, about 1% of the
  tiny model; at most ~0.002% of a Qwen3-30B-A3B rank);
* every process group of each rank is one of the planner's groups, and for 32-rank layouts megatron's own
  ``RankGenerator`` gives the same groups as the planner.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sapo_megatron.config import load_config
from sapo_megatron.launch import run_torchrun

pytestmark = pytest.mark.distributed

JOB_TIMEOUT_S = 300
SINGLE = ["tp1-pp1-ep1-etp1-float32", "tp1-pp1-ep1-etp1-bfloat16"]
TWO_RANKS = [
    "tp1-pp1-ep1-etp1-float32",  # DP 2: every shard group of 2
    "tp1-pp1-ep2-etp1-bfloat16",  # EP 2: an expert buffer, expert-DP 1, bf16 master copies
    "tp2-pp1-ep1-etp2-float32",  # TP 2 with sequence parallelism
    "tp1-pp2-ep1-etp1-float32",  # PP 2: embedding on one stage, output layer on the other
]
# (tensor, pipeline, expert, expert_tensor, world): layouts checked against megatron's RankGenerator.
GENERATOR_LAYOUTS = [(1, 1, 8, 1, 32), (2, 2, 4, 1, 32), (2, 1, 8, 2, 32), (4, 2, 2, 2, 32), (1, 4, 8, 1, 32)]
GROUP_NAMES = ("TP", "PP", "DP", "EP", "ETP", "EDP")


def _overrides(layout: str, world: int, hf_dir) -> list[str]:
    tp, pp, ep, etp, dtype = layout.split("-")
    tensor = int(tp.removeprefix("tp"))
    return [
        f"model.hf_path={hf_dir}",
        f"model.params_dtype={dtype}",
        f"parallel.tensor={tensor}",
        f"parallel.pipeline={int(pp.removeprefix('pp'))}",
        f"parallel.expert={int(ep.removeprefix('ep'))}",
        f"parallel.expert_tensor={int(etp.removeprefix('etp'))}",
        f"parallel.sequence_parallel={str(tensor > 1).lower()}",
        f"launch.nproc_per_node={world}",
        "trainer.device=cpu",
    ]


# ----------------------------------------------------------------------------------------------------------
# Worker (runs under torchrun)
# ----------------------------------------------------------------------------------------------------------


def _buffer_report(buffers) -> dict:
    report = {"numel": 0, "params": 0, "param_bytes": 0, "grad_bytes": 0, "count": len(buffers)}
    for buffer in buffers:
        report["numel"] += buffer.numel
        report["params"] += sum(p.numel() for p in buffer.params)
        if buffer.param_data is not None:
            report["param_bytes"] += buffer.param_data.numel() * buffer.param_data.element_size()
        report["grad_bytes"] += buffer.grad_data.numel() * buffer.grad_data.element_size()
    return report


def _optimizer_report(optimizer, ddp_chunks) -> dict:
    buffer_storages = {
        buffer.param_data.untyped_storage().data_ptr()
        for chunk in ddp_chunks
        for buffer in chunk.buffers + chunk.expert_parallel_buffers
        if buffer.param_data is not None
    }
    report = {kind: {"elements": 0, "moment_bytes": 0, "master_bytes": 0} for kind in ("dense", "expert")}
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = sub.optimizer
        for group in inner.param_groups:
            kind = report["expert" if group["is_expert_parallel"] else "dense"]
            for main_param in group["params"]:
                kind["elements"] += main_param.numel()
                state = inner.state[main_param]
                kind["moment_bytes"] += sum(
                    state[name].numel() * state[name].element_size() for name in ("exp_avg", "exp_avg_sq")
                )
                # A view into the DDP parameter buffer costs nothing; anything else is an fp32 master copy.
                if main_param.untyped_storage().data_ptr() not in buffer_storages:
                    kind["master_bytes"] += main_param.numel() * main_param.element_size()
    return report


def _one_step(ddp_chunks, optimizer, vocab_size: int, seq_len: int) -> None:
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from sapo_megatron.actor.model import causal_mask

    generator = torch.Generator().manual_seed(0)
    micro_batches = [torch.randint(0, vocab_size, (2, seq_len), generator=generator) for _ in range(2)]
    position_ids = torch.arange(seq_len).expand(2, seq_len)
    mask = causal_mask(seq_len, torch.device("cpu"))

    def forward_step(data_iterator, model):
        output = model(next(data_iterator), position_ids, mask)

        def loss_func(output_tensor):
            loss = output_tensor.float().square().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=ddp_chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_len,
        micro_batch_size=2,
        forward_only=False,
    )
    update_successful, _, _ = optimizer.step()
    assert update_successful, "megatron skipped the optimizer step"


def _groups_report() -> dict:
    import torch
    from megatron.core import parallel_state as mpu

    groups = {
        "TP": mpu.get_tensor_model_parallel_group(),
        "PP": mpu.get_pipeline_model_parallel_group(),
        "DP": mpu.get_data_parallel_group(),
        "EP": mpu.get_expert_model_parallel_group(),
        "ETP": mpu.get_expert_tensor_parallel_group(),
        "EDP": mpu.get_expert_data_parallel_group(),
    }
    return {name: torch.distributed.get_process_group_ranks(group) for name, group in groups.items()}


def _rank_generator_groups() -> list:
    from megatron.core.parallel_state import RankGenerator

    out = []
    for tensor, pipeline, expert, expert_tensor, world in GENERATOR_LAYOUTS:
        data = world // (tensor * pipeline)
        expert_data = world // (expert * expert_tensor * pipeline)
        dense = RankGenerator(tp=tensor, ep=1, dp=data, pp=pipeline, cp=1, order="tp-cp-ep-dp-pp")
        experts = RankGenerator(tp=expert_tensor, ep=expert, dp=expert_data, pp=pipeline, cp=1, order="tp-cp-ep-dp-pp")
        groups = {
            "TP": dense.get_ranks("tp"),
            "PP": dense.get_ranks("pp"),
            "DP": dense.get_ranks("dp"),
            "EP": experts.get_ranks("ep"),
            "ETP": experts.get_ranks("tp"),
            "EDP": experts.get_ranks("dp"),
        }
        out.append({"layout": [tensor, pipeline, expert, expert_tensor, world], "groups": groups})
    return out


def worker_main(out_dir: str, hf_dir: str, *layouts: str) -> None:
    import torch
    from megatron.core import parallel_state as mpu

    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.factory import build_megatron_optimizer, wrap_in_ddp
    from sapo_megatron.actor.model import build_model
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed

    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    out = Path(out_dir)
    with MegatronCpuCompat("cpu"):
        for layout in layouts:
            cfg = load_config(None, _overrides(layout, world, hf_dir))
            placement = init_distributed(cfg.parallel, "cpu", seed=1234)
            model = build_model(hf_dir, cfg.parallel, device="cpu", params_dtype=cfg.model.params_dtype)
            dense = sum(p.numel() for c in model.chunks for p in c.parameters() if getattr(p, "allreduce", True))
            expert = sum(p.numel() for c in model.chunks for p in c.parameters() if not getattr(p, "allreduce", True))
            ddp_chunks = wrap_in_ddp(cfg, model)
            optimizer, _ = build_megatron_optimizer(cfg, ddp_chunks, total_steps=1)
            _one_step(ddp_chunks, optimizer, model.bridge.hf_config.vocab_size, seq_len=8)
            report = {
                "layout": layout,
                "rank": placement.rank,
                "pp_rank": mpu.get_pipeline_model_parallel_rank(),
                "dense_params": dense,
                "expert_params": expert,
                "dense_buffer": _buffer_report([b for c in ddp_chunks for b in c.buffers]),
                "expert_buffer": _buffer_report([b for c in ddp_chunks for b in c.expert_parallel_buffers]),
                "optimizer": _optimizer_report(optimizer, ddp_chunks),
                "groups": _groups_report(),
            }
            target = out / layout
            target.mkdir(parents=True, exist_ok=True)
            (target / f"rank{placement.rank}.json").write_text(json.dumps(report))
            del optimizer, ddp_chunks, model
            destroy_distributed(keep_process_group=True)
        if torch.distributed.get_rank() == 0:
            (out / "rank_generator.json").write_text(json.dumps(_rank_generator_groups()))
    destroy_distributed()


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def megatron_reports(tiny_model_dir, tmp_path_factory):
    """{(world, layout): [report of rank 0, rank 1, ...]}, from one job per world size."""
    reports = {}
    for world, layouts in ((1, SINGLE), (2, TWO_RANKS)):
        out = tmp_path_factory.mktemp(f"planner-vs-megatron-{world}")
        run_torchrun([__file__, str(out), str(tiny_model_dir), *layouts], world, timeout=JOB_TIMEOUT_S).check()
        for layout in layouts:
            ranks = [json.loads((out / layout / f"rank{r}.json").read_text()) for r in range(world)]
            reports[(world, layout)] = ranks
        reports[("generator", world)] = json.loads((out / "rank_generator.json").read_text())
    return reports


def _plan(layout: str, world: int, hf_dir):
    from sapo_megatron.planner import make_plan

    return make_plan(load_config(None, _overrides(layout, world, hf_dir)))


CASES = [(1, layout) for layout in SINGLE] + [(2, layout) for layout in TWO_RANKS]


@pytest.mark.parametrize("world,layout", CASES, ids=[f"{w}x-{layout}" for w, layout in CASES])
def test_parameter_counts_are_exact(megatron_reports, tiny_model_dir, world, layout):
    plan = _plan(layout, world, tiny_model_dir)
    for report in megatron_reports[(world, layout)]:
        state = plan.states[report["pp_rank"]]
        assert (report["dense_params"], report["expert_params"]) == (state.dense_params, state.expert_params)
        assert report["dense_buffer"]["params"] == state.dense_params
        assert report["expert_buffer"]["params"] == state.expert_params


@pytest.mark.parametrize("world,layout", CASES, ids=[f"{w}x-{layout}" for w, layout in CASES])
def test_buffers_match_up_to_alignment_padding(megatron_reports, tiny_model_dir, world, layout):
    from sapo_megatron.planner import DTYPE_BYTES, GRAD_BYTES

    plan = _plan(layout, world, tiny_model_dir)
    param_size = DTYPE_BYTES[plan.cfg.model.params_dtype]
    for report in megatron_reports[(world, layout)]:
        state = plan.states[report["pp_rank"]]
        for kind, planned, bound in (
            ("dense_buffer", state.dense_params, state.dense_padding_bound),
            ("expert_buffer", state.expert_params, state.expert_padding_bound),
        ):
            buffer = report[kind]
            assert 0 <= buffer["numel"] - planned <= bound, (kind, buffer, planned, bound)
            assert buffer["grad_bytes"] == buffer["numel"] * GRAD_BYTES
            # The distributed optimizer re-points every parameter into the buffer: no second copy.
            assert buffer["param_bytes"] == buffer["numel"] * param_size
        allocated_grads = report["dense_buffer"]["grad_bytes"] + report["expert_buffer"]["grad_bytes"]
        padding = state.dense_padding_bound + state.expert_padding_bound
        assert state.grad_bytes <= allocated_grads <= state.grad_bytes + GRAD_BYTES * padding


@pytest.mark.parametrize("world,layout", CASES, ids=[f"{w}x-{layout}" for w, layout in CASES])
def test_optimizer_states_match(megatron_reports, tiny_model_dir, world, layout):
    from sapo_megatron.planner import ADAM_MOMENT_BYTES, MASTER_COPY_BYTES

    plan = _plan(layout, world, tiny_model_dir)
    reports = megatron_reports[(world, layout)]
    master_per_element = MASTER_COPY_BYTES if plan.cfg.model.params_dtype != "float32" else 0
    for report in reports:
        state = plan.states[report["pp_rank"]]
        optimizer = report["optimizer"]
        elements = optimizer["dense"]["elements"] + optimizer["expert"]["elements"]
        moments = optimizer["dense"]["moment_bytes"] + optimizer["expert"]["moment_bytes"]
        masters = optimizer["dense"]["master_bytes"] + optimizer["expert"]["master_bytes"]
        assert moments == ADAM_MOMENT_BYTES * elements
        assert masters == master_per_element * elements
        # A rank's shard is its slice of the padded buffer: at most numel / group of real parameters.
        dense_cap = -(-report["dense_buffer"]["numel"] // (plan.layout.data * plan.layout.context))
        expert_cap = -(-report["expert_buffer"]["numel"] // plan.layout.expert_data)
        assert optimizer["dense"]["elements"] <= dense_cap and optimizer["expert"]["elements"] <= expert_cap
        if plan.layout.data == 1 and plan.layout.expert_data == 1:
            assert elements == state.optimizer_elements
            assert state.optimizer_gpu_bytes == moments + masters
    # Over a shard group the shards partition the replica: the sums are exact.
    for kind, group_name, planned_of in (
        ("dense", "DP", lambda s: s.dense_params),
        ("expert", "EDP", lambda s: s.expert_params),
    ):
        by_rank = {r["rank"]: r for r in reports}
        for group in {tuple(r["groups"][group_name]) for r in reports}:
            members = [by_rank[rank] for rank in group]
            assert len({m["pp_rank"] for m in members}) == 1
            total = sum(m["optimizer"][kind]["elements"] for m in members)
            assert total == planned_of(plan.states[members[0]["pp_rank"]]), (kind, group)


@pytest.mark.parametrize("world,layout", CASES, ids=[f"{w}x-{layout}" for w, layout in CASES])
def test_process_groups_match(megatron_reports, tiny_model_dir, world, layout):
    plan = _plan(layout, world, tiny_model_dir)
    for report in megatron_reports[(world, layout)]:
        for name in GROUP_NAMES:
            assert report["groups"][name] in plan.layout.groups[name], (name, report["groups"][name])


def test_groups_match_megatron_rank_generator(megatron_reports):
    from sapo_megatron.planner import parallel_groups

    for case in megatron_reports[("generator", 1)]:
        tensor, pipeline, expert, expert_tensor, world = case["layout"]
        cfg = load_config(
            None,
            [
                f"parallel.tensor={tensor}",
                f"parallel.pipeline={pipeline}",
                f"parallel.expert={expert}",
                f"parallel.expert_tensor={expert_tensor}",
                f"launch.nproc_per_node={world}",
                # Whole prompt groups on every data-parallel rank (up to 32 of them here).
                f"data.prompts_per_step={world}",
            ],
        )
        planned = parallel_groups(cfg)
        for name in GROUP_NAMES:
            assert sorted(map(sorted, case["groups"][name])) == planned[name], (case["layout"], name)


if __name__ == "__main__":
    worker_main(*sys.argv[1:])
