"""bf16 fidelity: megatron-core vs transformers vs vLLM log-probs in bf16, on the same weights and tokens.

Each model runs in its own process (worker_bf16_fidelity.py): transformers in fp32 and bf16 (never imports
megatron), megatron-core on one process in bf16 (the actor's path: local spec, Float16Module, fp32 attention
softmax and router), vLLM's CPU engine in bf16. Two models: the tiny test model (random init, logits < 1)
and a "sharp" one (wider, scaled so that logits reach ~5 and routing is decisive, as after training).

What the numbers show (docs/actor.md, "bf16 fidelity"):
* megatron's bf16 forward is as far from the fp32 model as transformers' own bf16 forward is: the bf16 error
  is the precision's, not a misplaced cast in the megatron path;
* where every MoE layer routed every token of the prefix to the same experts in both models, their logits
  differ by about one bf16 spacing of the largest logit; the large differences (several times that) all come
  after a token whose top-k differs between the two bf16 models: bf16 rounding of the router input flips
  near-tied experts, and the flipped token then feeds every later position through attention.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sapo_megatron.launch import run_torchrun

HERE = Path(__file__).parent
WORKER = str(HERE / "worker_bf16_fidelity.py")
JOB_TIMEOUT_S = 300
SHAPES = {"tiny": (8, 48), "sharp": (4, 64)}  # (batch, seq)
# Asserted bounds, each a margin over the value measured on this CPU (in the comment; docs/actor.md).
BOUNDS = {
    "tiny": {
        "lp_megatron_vs_hf": 1e-2,  # 4.4e-3
        "logits_megatron_vs_hf": 0.06,  # 0.030 (max |logit| 0.70)
        "lp_vllm_vs_hf": 1e-2,  # 3.9e-3
    },
    "sharp": {
        "lp_megatron_vs_hf": 0.3,  # 0.142
        "logits_megatron_vs_hf": 0.8,  # 0.383 (max |logit| 5.4)
        "lp_vllm_vs_hf": 0.3,  # 0.139
    },
}
# Where the routing of the whole prefix agrees, megatron's and transformers' bf16 logits differ by at most this
# many bf16 spacings of the largest logit (measured 1.25 tiny, 1.5 sharp); after a flip by up to 7.7 / 12.3.
SAME_ROUTING_SPACINGS = 3.0
# megatron's bf16 error against the fp32 model, relative to transformers' own bf16 error (measured: logits
# 1.04 tiny, 0.98 sharp; log-probs 1.48 tiny, 0.98 sharp).
LOGITS_ERROR_RATIO = 1.25
LOGPROBS_ERROR_RATIO = 2.0


def _run(args: list, nproc: int = 1) -> None:
    run_torchrun([WORKER, *map(str, args)], nproc, timeout=JOB_TIMEOUT_S).check()


@pytest.fixture(scope="module", params=sorted(SHAPES))
def runs(request, tiny_model_dir, tmp_path_factory):
    pytest.importorskip("vllm")
    name = request.param
    out = tmp_path_factory.mktemp(f"bf16-{name}")
    model_dir = tiny_model_dir
    if name == "sharp":
        model_dir = out / "model"
        _run(["make", model_dir, tiny_model_dir])
    _run(["hf", model_dir, out / "hf.pt", *SHAPES[name]])
    _run(["megatron", model_dir, out / "megatron.pt", out / "hf.pt"])
    _run(["vllm", model_dir, out / "vllm.pt", out / "hf.pt"])
    hf = torch.load(out / "hf.pt")
    return name, hf, torch.load(out / "megatron.pt"), torch.load(out / "vllm.pt")


def _logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]


def _same_prefix_routing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, S]: True where every token <= t was routed to the same experts in every layer by both."""
    same = (a == b).all(dim=-1).all(dim=-1)
    return same.int().cumprod(dim=-1).bool()


def _bf16_spacing(x: float) -> float:
    """The distance between consecutive bf16 numbers at magnitude x (8 significant bits)."""
    return 2.0 ** (torch.tensor(x).abs().log2().floor().item() - 7)


def _stats(hf: dict, megatron: dict, vllm: dict) -> dict:
    ids = hf["input_ids"]
    fp32, bf16 = hf["fp32"], hf["bf16"]
    lp = {name: _logprobs(run["logits"], ids) for name, run in (("fp32", fp32), ("bf16", bf16), ("mg", megatron))}
    same = _same_prefix_routing(megatron["routing"], bf16["routing"])
    logit_diff = (megatron["logits"] - bf16["logits"]).abs().amax(dim=-1)
    spacing = _bf16_spacing(float(fp32["logits"].abs().max()))
    return {
        "max_logit": float(fp32["logits"].abs().max()),
        "lp_megatron_vs_hf": float((lp["mg"] - lp["bf16"]).abs().max()),
        "logits_megatron_vs_hf": float(logit_diff.max()),
        "lp_megatron_vs_fp32": float((lp["mg"] - lp["fp32"]).abs().max()),
        "lp_hf_vs_fp32": float((lp["bf16"] - lp["fp32"]).abs().max()),
        "logits_megatron_vs_fp32": float((megatron["logits"] - fp32["logits"]).abs().max()),
        "logits_hf_vs_fp32": float((bf16["logits"] - fp32["logits"]).abs().max()),
        "lp_vllm_vs_hf": float((vllm["logprobs"] - lp["bf16"]).abs().max()),
        "lp_vllm_vs_fp32": float((vllm["logprobs"] - lp["fp32"]).abs().max()),
        "flipped_token_layers_megatron_vs_hf": int((megatron["routing"] != bf16["routing"]).any(-1).sum()),
        "flipped_token_layers_hf_bf16_vs_fp32": int((bf16["routing"] != fp32["routing"]).any(-1).sum()),
        "token_layers": int(bf16["routing"][..., 0].numel()),
        "same_routing_positions": int(same.sum()),
        "same_routing_logits_spacings": float(logit_diff[same].max()) / spacing,
        "after_flip_logits_spacings": float(logit_diff[~same].max()) / spacing if bool((~same).any()) else 0.0,
    }


@pytest.mark.distributed
@pytest.mark.vllm
@pytest.mark.slow
def test_bf16_megatron_transformers_and_vllm_agree_within_the_bounds(runs):
    name, hf, megatron, vllm = runs
    stats = _stats(hf, megatron, vllm)
    for key, bound in BOUNDS[name].items():
        assert stats[key] <= bound, f"{name}: {key} = {stats[key]:.3g} > {bound} ({stats})"


@pytest.mark.distributed
@pytest.mark.vllm
@pytest.mark.slow
def test_megatron_bf16_is_as_close_to_fp32_as_transformers_bf16(runs):
    name, hf, megatron, vllm = runs
    stats = _stats(hf, megatron, vllm)
    assert stats["logits_megatron_vs_fp32"] <= LOGITS_ERROR_RATIO * stats["logits_hf_vs_fp32"], stats
    assert stats["lp_megatron_vs_fp32"] <= LOGPROBS_ERROR_RATIO * stats["lp_hf_vs_fp32"], stats


@pytest.mark.distributed
@pytest.mark.vllm
@pytest.mark.slow
def test_the_large_bf16_differences_follow_routing_flips(runs):
    name, hf, megatron, vllm = runs
    stats = _stats(hf, megatron, vllm)
    # bf16 flips some near-tied top-k choices, in transformers (against its fp32 self) as in megatron.
    assert stats["flipped_token_layers_hf_bf16_vs_fp32"] > 0 and stats["flipped_token_layers_megatron_vs_hf"] > 0
    assert 0 < stats["same_routing_positions"] < hf["input_ids"].numel()
    # Same experts for the whole prefix: about one bf16 rounding apart. The differences beyond that are all
    # at positions after a flip.
    assert stats["same_routing_logits_spacings"] <= SAME_ROUTING_SPACINGS, stats
    assert stats["after_flip_logits_spacings"] > SAME_ROUTING_SPACINGS, stats
