"""The megatron-core actor model against transformers, across parallel layouts, and the bridge's round trip.

Real megatron-core over gloo. Four jobs, each shared by several checks:
  transformers reference (1 process, never imports megatron) -> megatron 1 process -> 2 processes -> 4.
Each megatron job builds every listed layout in turn, runs a forward pass over the same tokens with both
MoE token dispatchers, and exports the HF weights once per layout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sapo_megatron.launch import run_torchrun

HERE = Path(__file__).parent
JOB_TIMEOUT_S = 240

SINGLE = ["tp1-pp1-ep1-etp1-alltoall", "tp1-pp1-ep1-etp1-allgather"]
TWO_RANKS = [
    f"{sizes}-{dispatcher}"
    for sizes in ("tp2-pp1-ep1-etp2", "tp1-pp2-ep1-etp1", "tp1-pp1-ep2-etp1", "tp2-pp1-ep2-etp1")
    for dispatcher in ("alltoall", "allgather")
]
FOUR_RANKS = ["tp2-pp2-ep2-etp1-alltoall", "tp2-pp2-ep2-etp1-allgather", "tp2-pp1-ep2-etp2-allgather"]
GLOO_CANNOT = {
    "tp2-pp1-ep2-etp2-alltoall": (
        "expert-TP 2 x EP 2 with the alltoall dispatcher: each expert-TP rank receives a different number of "
        "routed tokens and megatron all-gathers them with uneven sizes, which gloo rejects "
        "(ProcessGroupGloo::allgather: invalid tensor size); covered with the allgather dispatcher"
    )
}


def _launch(script: str, args: list, nproc: int) -> None:
    run_torchrun([str(HERE / script), *map(str, args)], nproc, timeout=JOB_TIMEOUT_S).check()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf-reference") / "reference.pt"
    _launch("worker_model_hf_reference.py", [out, tiny_model_dir], 1)
    return out


@pytest.fixture(scope="module")
def megatron_runs(tiny_model_dir, reference, tmp_path_factory):
    """Runs the three megatron jobs lazily, each at most once per module."""
    out = tmp_path_factory.mktemp("megatron-runs")
    done: set[int] = set()
    jobs = {1: SINGLE, 2: TWO_RANKS, 4: FOUR_RANKS}

    def results_for(nproc: int) -> Path:
        if nproc not in done:
            _launch("worker_model_parity.py", [out, tiny_model_dir, reference, *jobs[nproc]], nproc)
            done.add(nproc)
        return out

    return results_for


def _nproc_of(layout: str) -> int:
    """The job that runs ``layout``; for bare sizes (``tp2-pp1-ep2-etp1``) the job that exports them."""
    jobs = ((1, SINGLE), (2, TWO_RANKS), (4, FOUR_RANKS))
    return next(n for n, layouts in jobs for name in layouts if name == layout or name.startswith(layout + "-"))


def _last_stage_logits(run_dir: Path, layout: str) -> list[torch.Tensor]:
    results = [torch.load(path) for path in sorted((run_dir / layout).glob("rank*.pt"))]
    assert len(results) == _nproc_of(layout)
    logits = [r["logits"] for r in results if r["logits"] is not None]
    pipeline = int(layout.split("-")[1].removeprefix("pp"))
    assert len(logits) == len(results) // pipeline, "every rank of the last pipeline stage returns logits"
    return logits


def _next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t), [B, S-1], from full-vocabulary logits."""
    return torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", SINGLE)
def test_single_process_matches_transformers(reference, megatron_runs, layout):
    ref = torch.load(reference)
    (logits,) = _last_stage_logits(megatron_runs(1), layout)
    assert logits.shape == ref["logits"].shape and logits.dtype == torch.float32
    logprobs = _next_token_logprobs(logits, ref["input_ids"])
    logprobs_hf = _next_token_logprobs(ref["logits"], ref["input_ids"])
    # Measured: log-probs 1.3e-7, logits 2.4e-7 (logits up to 0.6, fp32 spacing 6e-8).
    torch.testing.assert_close(logprobs, logprobs_hf, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", TWO_RANKS + FOUR_RANKS + sorted(GLOO_CANNOT))
def test_parallel_layout_matches_single_process(reference, megatron_runs, layout):
    if layout in GLOO_CANNOT:
        pytest.skip(GLOO_CANNOT[layout])
    input_ids = torch.load(reference)["input_ids"]
    dispatcher = layout.rsplit("-", 1)[1]
    (single,) = _last_stage_logits(megatron_runs(1), f"tp1-pp1-ep1-etp1-{dispatcher}")
    for logits in _last_stage_logits(megatron_runs(_nproc_of(layout)), layout):
        if layout.startswith("tp1-pp2-ep1-"):
            # Pipeline stages alone change no reduction: the same operations in the same order.
            assert torch.equal(logits, single)
        # Measured: logits 2.7e-7 (TP changes the order of the attention / MLP reductions; PP alone is
        # bit-identical), log-probs 1.2e-7.
        torch.testing.assert_close(logits, single, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            _next_token_logprobs(logits, input_ids), _next_token_logprobs(single, input_ids), rtol=0, atol=1e-6
        )


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "sizes", ["tp1-pp1-ep1-etp1", "tp2-pp1-ep2-etp1", "tp1-pp2-ep1-etp1", "tp2-pp1-ep1-etp2", "tp2-pp2-ep2-etp1"]
)
def test_export_round_trip_is_bit_identical(tiny_model_dir, megatron_runs, sizes):
    original = load_file(Path(tiny_model_dir) / "model.safetensors")
    nproc = _nproc_of(sizes)
    paths = sorted((megatron_runs(nproc) / f"export-{sizes}").glob("rank*.pt"))
    assert len(paths) == nproc
    for path in paths:
        exported = torch.load(path)
        assert sorted(exported) == sorted(original), f"{path.name}: exported names differ from the checkpoint"
        for name, tensor in original.items():
            assert exported[name].dtype == tensor.dtype and exported[name].shape == tensor.shape, name
            assert torch.equal(exported[name], tensor), f"{path.name}: {name} differs"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("sizes", ["tp1-pp1-ep1-etp1", "tp1-pp2-ep1-etp1", "tp2-pp2-ep2-etp1"])
def test_saved_checkpoint_is_bit_identical(tiny_model_dir, megatron_runs, sizes):
    import json

    from transformers import AutoConfig

    original = load_file(Path(tiny_model_dir) / "model.safetensors")
    saved_dir = megatron_runs(_nproc_of(sizes)) / f"saved-{sizes}"
    index = json.loads((saved_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and sorted(p.name for p in saved_dir.glob("*.safetensors")) == files
    saved = {}
    for name in files:
        shard = load_file(saved_dir / name)
        assert all(index["weight_map"][key] == name for key in shard)
        saved.update(shard)
    assert sorted(saved) == sorted(original)
    assert all(torch.equal(saved[key], original[key]) for key in original)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    configs = [AutoConfig.from_pretrained(path).to_dict() for path in (saved_dir, tiny_model_dir)]
    for config in configs:
        config.pop("_name_or_path")
    assert configs[0] == configs[1]


def test_layouts_that_cannot_run_correctly_are_refused_up_front():
    from sapo_megatron.actor.parallel import check_layout
    from sapo_megatron.config import ParallelConfig

    parallel = ParallelConfig(tensor=2, expert=2, expert_tensor=2, sequence_parallel=True)
    with pytest.raises(ValueError, match="parallel.expert_tensor=2 .* gloo"):
        check_layout(parallel, 4, "cpu")
    # TP 2 with whole experts replicated on both TP ranks: megatron would not reduce their gradients over TP.
    with pytest.raises(ValueError, match="set parallel.expert_tensor=2 or use parallel.expert > 1"):
        check_layout(ParallelConfig(tensor=2, expert=1, expert_tensor=1, sequence_parallel=True), 2, "cuda")
    allgather = ParallelConfig(tensor=2, expert=2, expert_tensor=2, moe_token_dispatcher="allgather")
    assert check_layout(allgather, 4, "cpu") == 2
    with pytest.raises(ValueError, match="does not divide the world size 4"):
        check_layout(ParallelConfig(tensor=2, pipeline=2, context=2), 4, "cpu")


# Qwen3-30B-A3B's published config.json (transformers 4 format: rope_theta at the top level).
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def test_qwen3_30b_a3b_translates_on_paper():
    from transformers import Qwen3MoeConfig

    from sapo_megatron.actor.model import plan_model
    from sapo_megatron.config import ParallelConfig

    hf_config = Qwen3MoeConfig.from_dict(QWEN3_30B_A3B)
    layout = ParallelConfig(tensor=4, pipeline=4, expert=8, sequence_parallel=True)
    bridge = plan_model(hf_config, layout, device="cpu", params_dtype="bfloat16")
    config = bridge.config
    assert (config.num_layers, config.hidden_size) == (48, 2048)
    assert (config.num_attention_heads, config.num_query_groups) == (32, 4)
    # head_dim 128 != hidden / heads = 64: kv_channels has to come from the config, not be derived.
    assert config.kv_channels == 128
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (128, 8, 768)
    assert config.moe_layer_freq == [1] * 48 and config.moe_router_pre_softmax is False
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size) == (4, 4)
    assert (config.expert_model_parallel_size, config.sequence_parallel) == (8, True)
    assert config.params_dtype == torch.bfloat16 and config.layernorm_epsilon == 1e-6
    assert bridge.rope_theta == 1e6 and bridge._get_gptmodel_args()["vocab_size"] == 151936
    names = bridge.hf_weight_names()
    # 3 un-layered + 48 x (2 norms + q k v o + q/k norms + router + 128 experts x 3).
    assert len(names) == len(set(names)) == 3 + 48 * (9 + 128 * 3)
    assert "model.layers.47.mlp.experts.127.down_proj.weight" in names
    with pytest.raises(ValueError, match="num_key_value_heads 4 is not divisible by parallel.tensor=8"):
        plan_model(hf_config, ParallelConfig(tensor=8, sequence_parallel=True), device="cpu")
    with pytest.raises(ValueError, match="parallel.sequence_parallel=true"):
        plan_model(hf_config, ParallelConfig(tensor=2), device="cpu")


@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
def test_weight_names_cover_the_tiny_checkpoint_exactly(tiny_model_dir, tmp_path, dense):
    from sapo_megatron.actor.model import plan_model
    from sapo_megatron.config import ParallelConfig
    from sapo_megatron.models.tiny import TinyModelSpec, build_tiny_model

    hf_dir = build_tiny_model(TinyModelSpec(dense=True), cache_dir=tmp_path) if dense else tiny_model_dir
    bridge = plan_model(hf_dir, ParallelConfig(), device="cpu")
    assert bridge.moe_layer_pattern() == [0 if dense else 1] * 2
    on_disk = load_file(Path(hf_dir) / "model.safetensors")
    assert sorted(bridge.hf_weight_names()) == sorted(on_disk)
