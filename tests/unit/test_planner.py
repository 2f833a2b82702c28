"""The launch / memory planner: closed-form parameter and state counts, layout refusals naming the key, the
groups, the recipes, the CLI, and docs/planner.md matching what the planner prints.

What megatron-core really allocates is checked in tests/distributed/test_planner_vs_megatron.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sapo_megatron.cli import main
from sapo_megatron.config import ConfigError, load_config
from sapo_megatron.planner import (
    GIB,
    QWEN3_30B_A3B,
    ModelShape,
    PlanError,
    attention_bytes_per_token,
    data_state_bytes,
    format_plan,
    make_plan,
    mlp_bytes_per_token,
    padding_bound,
    parallel_groups,
    resolve_model_shape,
    stage_layers,
    stage_params,
)

ROOT = Path(__file__).resolve().parents[2]
SAPO_RECIPE = str(ROOT / "recipes" / "qwen3_30b_a3b_sapo.yaml")
GRPO_RECIPE = str(ROOT / "recipes" / "qwen3_30b_a3b_grpo.yaml")

# The published Qwen3-30B-A3B config.json, reduced to the keys the planner reads (and a few it ignores).
QWEN3_30B_A3B_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
}

H, L, E, K, F, A, G, D, V = 2048, 48, 128, 8, 768, 32, 4, 128, 151936
# Closed forms: per layer, everything but the experts (input norm, qkv, q/k norms, output projection, MLP norm,
# router), and one expert (gate and up fused in fc1, down in fc2).
LAYER_DENSE = H + (A + 2 * G) * D * H + 2 * D + A * D * H + H + E * H
ONE_EXPERT = 3 * F * H


def _sapo_cfg(*overrides: str):
    return load_config(SAPO_RECIPE, list(overrides))


def test_preset_equals_the_published_config():
    shape = ModelShape.from_hf_config(QWEN3_30B_A3B_CONFIG, "config.json")
    assert {**shape.__dict__, "name": ""} == {**QWEN3_30B_A3B.__dict__, "name": ""}
    # The model card's 30.5B total / 3.3B activated parameters, exactly.
    assert shape.total_params == L * (LAYER_DENSE + E * ONE_EXPERT) + 2 * V * H + H == 30_532_122_624
    assert shape.active_params == L * (LAYER_DENSE + K * ONE_EXPERT) + 2 * V * H + H == 3_353_032_704


def test_transformers5_expert_key_and_layer_rule():
    config = dict(QWEN3_30B_A3B_CONFIG, num_experts=None, num_local_experts=128, decoder_sparse_step=2)
    config["mlp_only_layers"] = [1]
    shape = ModelShape.from_hf_config(config, "x")
    assert shape.num_experts == 128
    # transformers' rule: MoE where (i + 1) % step == 0 and i is not listed as MLP-only.
    assert shape.moe_layers[:4] == (False, False, False, True)
    with pytest.raises(PlanError, match="model_type"):
        ModelShape.from_hf_config(dict(QWEN3_30B_A3B_CONFIG, model_type="llama"), "x")


def test_model_shape_sources(tmp_path):
    cfg = _sapo_cfg()
    assert resolve_model_shape(cfg).num_experts == 128  # matched by the hf_path's name
    (tmp_path / "config.json").write_text(json.dumps(dict(QWEN3_30B_A3B_CONFIG, num_hidden_layers=24)))
    # A config.json wins over the name.
    assert resolve_model_shape(_sapo_cfg(f"model.hf_path={tmp_path}")).num_layers == 24
    assert resolve_model_shape(load_config(None, [])).name.startswith("tiny-qwen3-moe")
    with pytest.raises(PlanError, match="model.hf_path"):
        resolve_model_shape(_sapo_cfg("model.hf_path=/nonexistent/some-model"))
    assert resolve_model_shape(_sapo_cfg("model.hf_path=/x/y"), preset="qwen3-30b-a3b").num_layers == 48
    with pytest.raises(PlanError, match="--preset"):
        resolve_model_shape(cfg, preset="gpt-5")


def test_recipe_state_per_gpu_in_closed_form():
    plan = make_plan(_sapo_cfg())
    (state,) = plan.states
    # EP 8: 16 of the 128 experts per GPU; TP 1: every dense tensor whole; PP 1: embedding and output here.
    assert state.expert_params == L * 16 * ONE_EXPERT == 3_623_878_656
    assert state.dense_params == L * LAYER_DENSE + 2 * V * H + H == 1_541_093_376
    assert state.param_bytes == 2 * state.params  # bf16
    assert state.grad_bytes == 4 * state.params  # fp32 gradient buffers
    # Distributed optimizer: dense shards over DP 32, expert shards over expert-DP 32 / 8 = 4; 12 bytes each
    # (fp32 master copy of bf16 parameters + two Adam moments).
    assert (plan.layout.data, plan.layout.expert_data) == (32, 4)
    assert state.optimizer_elements == math.ceil(state.dense_params / 32) + math.ceil(state.expert_params / 4)
    assert state.optimizer_gpu_bytes == 12 * state.optimizer_elements
    assert state.optimizer_host_bytes == 0
    offloaded = make_plan(_sapo_cfg("optimizer.optimizer_cpu_offload=true")).states[0]
    assert (offloaded.optimizer_gpu_bytes, offloaded.optimizer_host_bytes) == (0, 16 * state.optimizer_elements)
    fp32 = make_plan(_sapo_cfg("model.params_dtype=float32")).states[0]
    assert fp32.optimizer_gpu_bytes == 8 * fp32.optimizer_elements  # fp32 parameters are their own master copy


def test_parameters_split_over_tp_pp_ep():
    whole = make_plan(
        _sapo_cfg("parallel.expert=1", "launch.nnodes=1", "launch.nproc_per_node=1", "rollout.num_engines=1")
    ).states
    assert len(whole) == 1 and whole[0].params == QWEN3_30B_A3B.total_params
    # EP 1: megatron keeps the experts in the dense buffer.
    assert whole[0].expert_params == 0
    split = make_plan(
        _sapo_cfg("parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=4", "parallel.expert=4",
                  "parallel.expert_tensor=2")
    )
    assert [len(s.layers) for s in stage_params(split.shape, split.cfg)] == [12] * 4
    per_layer_tp2 = H + (A + 2 * G) * D * H // 2 + 2 * D + A * D * H // 2 + H + E * H
    first, middle, last = split.states[0], split.states[1], split.states[3]
    assert middle.dense_params == 12 * per_layer_tp2
    assert first.dense_params == 12 * per_layer_tp2 + V // 2 * H
    assert last.dense_params == 12 * per_layer_tp2 + V // 2 * H + H
    # ETP 2: each expert's intermediate dimension is halved.
    assert middle.expert_params == 12 * (E // 4) * ONE_EXPERT // 2


def test_interleaved_stages_and_padding_bound():
    assert stage_layers(8, 2, 0) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert stage_layers(8, 2, 2) == [(0, 1, 4, 5), (2, 3, 6, 7)]
    assert padding_bound(10, 32, distributed_optimizer=True) == 63 * 10 + 127
    assert padding_bound(10, 3, distributed_optimizer=True) == 63 * 10 + 383  # lcm(3, 128) - 1
    assert padding_bound(10, 32, distributed_optimizer=False) == 0


def test_groups_follow_megatron_order():
    cfg = load_config(None, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.expert=2",
                             "parallel.expert_tensor=1", "launch.nproc_per_node=8"])  # fmt: skip
    groups = parallel_groups(cfg)
    assert groups["TP"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["PP"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["DP"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["EP"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["ETP"] == [[r] for r in range(8)]
    assert groups["EDP"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    for name, members in groups.items():
        assert sorted(r for g in members for r in g) == list(range(8)), name


def test_activation_formulas():
    cfg = _sapo_cfg()
    attention = 2 * (2 * H + (3 * A + 3 * G) * D) + 4 * A
    moe = 2 * (2 * H + K * (H + 3 * F + H)) + 8 * E
    assert attention_bytes_per_token(QWEN3_30B_A3B, cfg) == attention
    assert mlp_bytes_per_token(QWEN3_30B_A3B, cfg, moe=True) == moe
    plan = make_plan(cfg)
    (act,) = plan.activations
    tokens = 1024 + 8192 + 1
    assert act.tokens_per_micro_batch == tokens
    assert act.micro_batches == 128 * 16 // 4 // 32  # mini-batch / (DP x micro-batch size)
    logits = 2 * tokens * V * 2
    assert act.no_recompute == int(tokens * L * (attention + moe)) + logits
    assert act.recompute == int(tokens * L * 2 * H + tokens * (attention + moe)) + logits
    # Sequence + tensor parallelism divide every per-token term; a bigger micro-batch scales them.
    tp2 = _sapo_cfg("parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert_tensor=1")
    assert attention_bytes_per_token(QWEN3_30B_A3B, tp2) == attention / 2
    double = make_plan(_sapo_cfg("trainer.micro_batch_size=2")).activations[0]
    assert double.no_recompute == 2 * act.no_recompute
    # 1F1B: the first stage keeps PP micro-batches in flight, the last one.
    pp4 = make_plan(_sapo_cfg("parallel.pipeline=4")).activations
    assert [a.in_flight for a in pp4] == [4, 3, 2, 1]
    assert pp4[0].logits_bytes == 0 and pp4[-1].logits_bytes > 0


def test_recipe_fits_only_with_offload_and_recompute():
    plan = make_plan(_sapo_cfg())
    plan.check_fits()
    by_name = {s.name: s for s in plan.scenarios}
    budget = (80 - 6) * GIB
    assert by_name["configured"].peak <= budget
    assert by_name["no offload"].peak > budget  # the engine's 57 GiB of weights + KV next to the actor
    assert by_name["configured, recompute off"].peak > budget
    engine = plan.engine
    assert engine.weight_bytes == QWEN3_30B_A3B.total_params * 2
    assert engine.kv_bytes_per_token == 2 * L * G * D * 2
    assert engine.kv_tokens == 12 * GIB // engine.kv_bytes_per_token
    # The rollout phase: engine weights + KV cache, with the actor's state in host memory.
    assert by_name["configured"].rollout == engine.weight_bytes + engine.kv_cache_bytes


def test_grpo_recipe_is_the_sapo_recipe_with_another_loss():
    sapo, grpo = _sapo_cfg(), load_config(GRPO_RECIPE)
    for section in ("model", "parallel", "optimizer", "rollout", "data", "launch"):
        assert getattr(sapo, section) == getattr(grpo, section), section
    assert (sapo.algorithm.policy_loss, grpo.algorithm.policy_loss) == ("sapo", "clip")
    assert sapo.algorithm.num_mini_batches == grpo.algorithm.num_mini_batches == 4
    assert (sapo.algorithm.sapo.tau_pos, sapo.algorithm.sapo.tau_neg) == (1.0, 1.05)
    assert sapo.rollout.n_samples == 16 and sapo.algorithm.advantage == "grpo"
    assert sapo.data.train == "data/dapo_math_17k.jsonl" and sapo.data.validation == "data/aime_2024.jsonl"
    make_plan(grpo).check_fits()


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["parallel.tensor=8", "parallel.sequence_parallel=true"], "parallel.tensor"),  # 4 KV heads
        (["launch.nnodes=3", "parallel.expert=3", "rollout.num_engines=24", "data.prompts_per_step=96"], "parallel.expert"),  # 128 experts
        (["launch.nnodes=5", "parallel.pipeline=5", "rollout.num_engines=40"], "parallel.pipeline"),  # 48 layers
        (["parallel.tensor=2"], "parallel.sequence_parallel"),  # MoE under TP needs SP
        (["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=1", "parallel.expert_tensor=1"],
         "parallel.expert_tensor"),  # megatron would not reduce the expert replicas over TP
        (["rollout.engine_tensor_parallel=3"], "rollout.engine_tensor_parallel"),
        (["rollout.num_engines=33"], "rollout.num_engines"),
        (["rollout.mode=remote", "rollout.collect_routed_experts=false"], "launch.rollout_nnodes"),
        (["launch.rollout_nnodes=1"], "launch.rollout_nnodes"),
    ],
)  # fmt: skip
def test_layouts_that_cannot_run_are_refused_naming_the_key(overrides, key):
    # Config validation catches some before the planner does (PlanError is a ConfigError).
    with pytest.raises(ConfigError) as caught:
        make_plan(_sapo_cfg(*overrides))
    assert key in str(caught.value)


def test_world_size_that_does_not_divide_is_a_config_error():
    with pytest.raises(ConfigError, match="parallel"):
        _sapo_cfg("parallel.pipeline=3")


def test_memory_refusals_name_the_key():
    with pytest.raises(PlanError, match="launch.gpu_memory_gib=40"):
        make_plan(_sapo_cfg("launch.gpu_memory_gib=40")).check_fits()
    with pytest.raises(PlanError, match="these variants fit: .*phase offload"):
        make_plan(_sapo_cfg("optimizer.offload_params=false")).check_fits()
    with pytest.raises(PlanError, match="launch.host_memory_gib=256"):
        make_plan(_sapo_cfg("launch.host_memory_gib=256")).check_fits()
    with pytest.raises(ConfigError, match="launch.gpu_reserved_gib"):
        _sapo_cfg("launch.gpu_reserved_gib=90")


def test_remote_engines_get_their_own_nodes():
    urls = ",".join(f"http://r{n}:{8000 + i}" for n in (1, 2) for i in range(8))
    plan = make_plan(_sapo_cfg("rollout.mode=remote", "launch.rollout_nnodes=2", "rollout.num_engines=16",
                               f"rollout.server_urls={urls}", "rollout.collect_routed_experts=false",
                               "optimizer.offload_params=false", "optimizer.offload_grads=false",
                               "optimizer.offload_optimizer=false"))  # fmt: skip
    engines = plan.layout.engines
    assert [e["node"] for e in engines] == [4] * 8 + [5] * 8
    assert engines[0]["ranks"] == [32] and engines[-1]["gpus"] == [7]
    configured = plan.configured
    assert configured.rollout == configured.sync == 0  # nothing shares the actor's GPUs
    assert configured.rollout_gpu == plan.engine.weight_bytes + plan.engine.kv_cache_bytes
    plan.check_fits()
    assert not plan.warnings


def test_tiny_recipe_plans_on_cpu():
    plan = make_plan(load_config(str(ROOT / "recipes" / "tiny_cpu_sapo.yaml")))
    plan.check_fits()
    assert plan.states[0].params == plan.shape.total_params == 288_192
    assert "MiB" in format_plan(plan)


def test_cli_plan(capsys):
    assert main(["plan", SAPO_RECIPE]) == 0
    out = capsys.readouterr().out
    assert "EP    size 8, 4 group(s):" in out and "e31:gpu7" in out
    assert main(["plan", SAPO_RECIPE, "launch.gpu_memory_gib=40"]) == 2
    captured = capsys.readouterr()
    assert "peak per GPU" in captured.out  # the plan is still printed, so the refusal can be read against it
    assert "refused: launch.gpu_memory_gib=40" in captured.err
    assert main(["plan", SAPO_RECIPE, "parallel.tensor=8", "parallel.sequence_parallel=true"]) == 2
    assert "parallel.tensor=8" in capsys.readouterr().err
    assert main(["plan", SAPO_RECIPE, "parallel.tensor=3"]) == 2
    assert "config error" in capsys.readouterr().err


def test_docs_show_what_the_planner_prints():
    """docs/planner.md quotes the plan of the SAPO recipe verbatim; regenerate it when the planner changes."""
    doc = (ROOT / "docs" / "planner.md").read_text()
    printed = format_plan(make_plan(_sapo_cfg()))
    assert printed in doc


def test_engine_layouts_in_closed_form_and_the_suggestion_for_the_recipe():
    from sapo_megatron.planner import ENGINE_ACTIVATION_RESERVE_BYTES, engine_layouts

    cfg = _sapo_cfg()
    plan = make_plan(cfg)
    rows = {r["tp"]: r for r in engine_layouts(plan.shape, cfg, plan.budget_bytes)}
    total = plan.shape.total_params
    budget = (80 - 6) * GIB
    max_len = 1024 + 8192
    for tp in (1, 2, 4, 8):
        weights = math.ceil(total * 2 / tp)
        kv_per_token = 2 * L * math.ceil(G / tp) * D * 2  # K and V, bf16, KV heads replicated past TP 4
        kv = budget - weights - ENGINE_ACTIVATION_RESERVE_BYTES
        assert rows[tp]["weights"] == weights
        assert rows[tp]["kv"] == kv
        assert rows[tp]["sequences_per_gpu"] == kv // kv_per_token // max_len / tp
        assert rows[tp]["push_ingress"] == total * 2  # every worker receives the full tensors
    assert rows[1]["sequences_per_gpu"] == 15 and rows[2]["sequences_per_gpu"] == 49
    # 128 prompts x 16 samples over 32 GPUs = 64 per GPU; 32 in flight is the smallest TP 2 reaches.
    assert "suggested: engine TP 2 (the smallest with room for 32 full-length sequences per GPU; the batch gives " \
           "each engine GPU 64); configured: 1" in format_plan(plan)


def _small_data_case(**changes):
    args = dict(sequences=4, prompt_tokens=10, response_tokens=20, seq_len=9, num_moe_layers=3, topk=2,
                num_experts=8, record_rollout=True, record_old=True, replay=False, kl=True, num_mini_batches=2,
                micro_batch_size=1, dense_chunk_ids=108)  # fmt: skip
    return data_state_bytes(**{**args, **changes})


def test_data_state_by_hand():
    state = _small_data_case()
    # Lists: 40 bytes per prompt id, response id and log-prob (pointer + object), 40 per reward, 8 per finish
    # reason, a 64-byte list per row of the three token lists, five outer lists of 64 + 8 per row.
    assert state.rollout_lists == 40 * (10 + 20 + 20) + 40 * 4 + 8 * 4 + 64 * 3 * 4 + 5 * (64 + 8 * 4) == 3440
    # [4, 9]: tokens int64, mask bool, rollout / old / ref log-probs float32; advantages float32 [4].
    assert state.train_batch == 4 * 9 * (8 + 1 + 3 * 4) + 4 * 4 == 772
    # Diagnostics-only records hold the 20 response tokens: 3 layers x top-2 uint8 ids and an int32 position
    # each, and 5 int64 row offsets.
    assert state.record_tokens == 20
    assert state.routing_rollout == state.routing_old == 20 * (3 * 2 + 4) + 8 * 5 == 240
    assert state.routing_update == 10 * (3 * 2 + 4) + 8 * 3 == 124  # half the share: 10 tokens, 2 rows
    assert state.router_entropy == 4 * 4 * 9 * 3
    histograms = 8 * 540 + 4 * (540 + 5)  # 100 + 100 + 120 + 120 + 100 bins of int64, their float32 edges
    scalars = 160 * 3 * (2 * (2 + 1) + 6)  # per layer: 2 series per comparison (rollout vs old + 2 mini-batches) + 6
    assert state.diagnostics == histograms + 8 * 3 * 8 + scalars
    # The diagnostics densify 108 ids at a time = 2 rows of 9 x 3 x 2, at 33.6 bytes per dense id; rollout vs
    # old adds the changed-layer count (int64) and log-prob difference (float32) of the [4, 9] positions.
    assert state.diagnostics_transient == math.ceil(33.6 * 2 * 9 * 3 * 2) + 4 * 9 * (8 + 4) == 4061
    # GPU: tokens and labels int64, mask, old and ref log-probs of one row; its advantage; position ids; mask [9, 9].
    assert state.device_micro_batch == 9 * (8 + 8 + 1 + 4 + 4) + 4 + 8 * 9 + 81
    assert state.device == state.device_micro_batch + 2 * 432
    assert state.host_resident == 3440 + 772 + 240 + 240 + 124 + 432 + state.diagnostics
    assert state.host_peak == state.host_resident + state.diagnostics_transient

    # Replay needs every position up to the last loss position (prompt + response - 1 a row), and the routing
    # on the GPU.
    replay = _small_data_case(replay=True)
    assert replay.routing_old == (10 + 20 - 4) * (3 * 2 + 4) + 8 * 5
    assert replay.device_micro_batch == state.device_micro_batch + 4 * 9 * 3 * 2
    with pytest.raises(ValueError, match="replay"):
        _small_data_case(replay=True, routing_sample_tokens=8)
    # Sampled diagnostics: at most that many response tokens per record.
    sampled = _small_data_case(routing_sample_tokens=8)
    assert sampled.routing_old == 8 * 10 + 8 * 5 and sampled.routing_update == 4 * 10 + 8 * 3
    # Above 256 experts the ids take int16.
    assert _small_data_case(num_experts=512).routing_old == 20 * (3 * 2 * 2 + 4) + 8 * 5
    # The diagnostics' chunk is whole rows: one row at least, the share at most.
    assert _small_data_case(dense_chunk_ids=1).diagnostics_transient == math.ceil(33.6 * 54) + 432
    assert _small_data_case(dense_chunk_ids=10**9).diagnostics_transient == math.ceil(33.6 * 4 * 54) + 432
    # A dense model records nothing.
    dense = _small_data_case(num_moe_layers=0, topk=0)
    assert dense.routing_rollout == dense.routing_old == dense.routing_update == dense.router_entropy == 0
    assert dense.device_router_entropy == 0


def test_recipe_data_per_rank():
    plan = make_plan(_sapo_cfg())
    worst = plan.data
    b, s = 128 * 16 // 32, 1024 + 8192 + 1
    assert (worst.sequences, worst.seq_len) == (64, 9217)
    prompt, response = b * 1024, b * 8192
    assert worst.rollout_lists == 40 * (prompt + 2 * response) + 48 * b + 64 * 3 * b + 5 * (64 + 8 * b) == 44_582_720
    assert worst.train_batch == b * s * (8 + 1 + 4 + 4) + 4 * b == 10_028_352  # no KL: no reference log-probs
    # routing_replay off: both records hold the 524,288 response tokens: 48 layers x top-8 one-byte ids and an
    # int32 position each.
    record = response * (L * K + 4) + 8 * (b + 1)
    assert worst.routing_rollout == worst.routing_old == record == 203_424_264
    assert worst.routing_update == response // 4 * (L * K + 4) + 8 * (b // 4 + 1) == 50_856_072
    assert worst.router_entropy == 4 * b * s * L == 113_258_496
    # 5 histograms (540 bins), expert load [48, 128] float64, 16 per-layer series of 160-byte scalars.
    assert worst.diagnostics == 8 * 540 + 4 * 545 + 8 * L * E + 160 * L * (2 * (4 + 1) + 6) == 178_532
    assert worst.host_resident == 44_582_720 + 10_028_352 + 2 * 203_424_264 + 50_856_072 + 113_258_496 + 178_532
    # diagnostics.routing_stats densifies 2**24 ids at a time in whole rows: 4 rows of 9,217 x 48 x 8.
    assert worst.diagnostics_transient == math.ceil(33.6 * 4 * s * L * K) + b * s * 12 == 482_764_340
    assert worst.device_micro_batch == s * (8 + 8 + 1 + 4) + 4 + 8 * s + s * s == 85_220_386  # the mask: 85 MB
    # The old pass keeps its router entropy on the GPU per micro-batch, then assembles it there: twice.
    assert worst.device_router_entropy == 2 * 4 * b * s * L
    assert worst.device == worst.device_micro_batch + worst.device_router_entropy
    # Each of DP ranks holds 1/DP: 16 DP ranks hold twice the rows and records.
    dp16 = make_plan(_sapo_cfg("launch.nnodes=2", "rollout.num_engines=16")).data
    assert dp16.sequences == 2 * b and dp16.routing_old == 2 * response * (L * K + 4) + 8 * (2 * b + 1)
    # Sampled diagnostics shrink the records.
    sampled = make_plan(_sapo_cfg("diagnostics.routing_sample_tokens=65536"))
    assert sampled.data.routing_old == 65536 * (L * K + 4) + 8 * (b + 1) == 25_428_488
    assert "routing_old record: 65,536 sampled response tokens" in format_plan(sampled)
    # The plan's phases count it: the GPU micro-batch in train, the host peak of each GPU's rank in host/node.
    by_name = {sc.name: sc for sc in plan.scenarios}
    (state,), (act,), engine = plan.states, plan.activations, plan.engine
    pad = state.dense_padding_bound + state.expert_padding_bound
    params, grads = state.param_bytes + 2 * pad, state.grad_bytes + 4 * pad
    assert by_name["configured"].train == (
        params + grads + state.optimizer_gpu_bytes + act.recompute + worst.device_micro_batch
    )
    assert by_name["configured"].host_per_node == 8 * (
        params + state.optimizer_gpu_bytes + engine.weight_bytes + worst.host_peak
    )
    typical = plan.data_typical
    assert typical.routing_old == response // 4 * (L * K + 4) + 8 * (b + 1)
    assert typical.train_batch == worst.train_batch
    assert "routing_old record: 524,288 response tokens x (48 x 8 uint8 + int32)" in format_plan(plan)


def test_planner_follows_the_diagnostics_chunk():
    from sapo_megatron.diagnostics.routing_stats import DENSE_CHUNK_IDS

    assert _small_data_case(dense_chunk_ids=None) == _small_data_case(dense_chunk_ids=DENSE_CHUNK_IDS)
