"""MoE routing record and replay in the megatron actor (sapo_megatron.actor.routing_replay), against transformers.

Real megatron-core over gloo. Four jobs: the transformers reference (1 process, never imports megatron),
then the actor on 1 process (plain and with activation recomputation), 2 processes (EP2 with DP2, PP2,
TP2 with sequence parallelism) and 4 processes (TP2-SP x EP2 x DP2). Each actor job runs the sequence
described in worker_routing_replay.py for every layout; every rank returns the full batch's routing.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sapo_megatron.launch import run_torchrun

HERE = Path(__file__).parent
JOB_TIMEOUT_S = 300
JOBS = {
    1: ["tp1-pp1-ep1", "tp1-pp1-ep1-recompute"],
    2: ["tp1-pp1-ep2", "tp1-pp2-ep1", "tp2-pp1-ep1"],
    4: ["tp2-pp1-ep2"],
}
LAYOUTS = [(nproc, layout) for nproc, layouts in JOBS.items() for layout in layouts]
# Megatron and transformers logits differ by ~1e-6 in fp32; a top-k whose k-th and (k+1)-th router
# logits are closer than this may legitimately differ and is left out of the comparison.
TIE_MARGIN = 1e-4
# Log-probs of magnitude ~6 (fp32 spacing 4.8e-7): megatron vs transformers measured 4.8e-7 in every pass and
# layout (natural, forced, perturbed, replayed after the perturbation); router entropy 3.5e-7.
LOGPROB_ATOL = 2e-6
ENTROPY_ATOL = 1e-6
# Forcing the experts recorded before the perturbation moves transformers' log-probs by 0.023 at most.
REPLAY_EFFECT = 1e-2


def _launch(script: str, args: list, nproc: int) -> None:
    run_torchrun([str(HERE / script), *map(str, args)], nproc, timeout=JOB_TIMEOUT_S).check()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("routing-reference") / "reference.pt"
    _launch("worker_routing_hf.py", [out, tiny_model_dir], 1)
    return torch.load(out)


@pytest.fixture(scope="module")
def actor_runs(tiny_model_dir, reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("routing-runs")
    reference_file = out / "reference.pt"
    torch.save(reference, reference_file)
    done: set[int] = set()

    def records(nproc: int, layout: str) -> list[dict]:
        if nproc not in done:
            _launch("worker_routing_replay.py", [out, tiny_model_dir, reference_file, *JOBS[nproc]], nproc)
            done.add(nproc)
        paths = sorted((out / layout).glob("rank*.pt"))
        assert len(paths) == nproc
        # The runs hold RoutingRecords (a dataclass of tensors), which weights-only loading refuses.
        return [torch.load(path, weights_only=False) for path in paths]

    return records


def _sets(routing: torch.Tensor) -> torch.Tensor:
    return routing.long().sort(dim=-1).values


def _decided(router_logits: torch.Tensor, topk: int) -> torch.Tensor:
    """[B, S, layers]: True where the top-k is not within TIE_MARGIN of a tie."""
    top = router_logits.topk(topk + 1, dim=-1).values
    return (top[..., topk - 1] - top[..., topk]) > TIE_MARGIN


def _assert_same_experts(routing, expected, router_logits, *, max_undecided=0.05):
    assert routing.shape == expected.shape and routing.dtype == torch.int32
    decided = _decided(router_logits, expected.shape[-1])
    assert decided.float().mean() >= 1 - max_undecided
    same = (_sets(routing) == _sets(expected)).all(dim=-1)
    assert bool(same[decided].all()), f"{int((~same & decided).sum())} decided (token, layer) top-k sets differ"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", LAYOUTS)
def test_recorded_routing_equals_the_hf_router_top_k(reference, actor_runs, nproc, layout):
    natural = reference["natural"]
    for record in actor_runs(nproc, layout):
        # Every rank returns the whole batch's routing, [batch, seq, MoE layers, topk], in TrainBatch alignment.
        _assert_same_experts(record["r_natural"], natural["routing"], natural["logits"])
        torch.testing.assert_close(
            record["lp_natural"][:, :-1], natural["logprobs"][:, :-1], rtol=0, atol=LOGPROB_ATOL
        )


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", LAYOUTS)
def test_recorded_router_entropy_equals_the_hf_router_softmax_entropy(reference, actor_runs, nproc, layout):
    logits = reference["natural"]["logits"].double()  # [B, S, layers, experts], transformers' router logits
    expected = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    # Not a constant: the check below could not pass with a uniform (log E) or one-hot (0) stand-in.
    assert float(expected.std()) > 1e-3 and float(expected.max()) < math.log(logits.shape[-1]) - 1e-3
    for record in actor_runs(nproc, layout):
        entropy = record["ent_natural"]
        assert entropy.dtype == torch.float32 and entropy.shape == expected.shape
        torch.testing.assert_close(entropy.double(), expected, rtol=0, atol=ENTROPY_ATOL)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", LAYOUTS)
def test_replaying_a_given_routing_is_honoured(reference, actor_runs, nproc, layout):
    forced, natural = reference["forced"], reference["natural"]
    given = reference["forced_routing"]
    for record in actor_runs(nproc, layout):
        # Where the given routing has experts they are used as given (order included); where it holds -1 the
        # routers choose, downstream of the forced positions, as transformers' router does.
        replayed = given[..., 0] >= 0
        assert bool(replayed.any()) and bool((~replayed).any())
        assert torch.equal(record["r_forced"][replayed], given[replayed])
        _assert_same_experts(record["r_forced"], forced["routing"], forced["logits"])
        # The log-probs are those of transformers' model with its gates forced to the same experts...
        torch.testing.assert_close(record["lp_forced"][:, :-1], forced["logprobs"][:, :-1], rtol=0, atol=LOGPROB_ATOL)
        # ...and far from the natural routing's, so the forcing really reached the experts.
        assert (record["lp_forced"] - record["lp_natural"])[:, :-1].abs().max() > 1e-2


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", LAYOUTS)
def test_replay_after_the_router_weights_changed_equals_transformers_forced_to_the_recorded_experts(
    reference, actor_runs, nproc, layout
):
    """The routing recorded under the initial router weights, replayed after every router weight changed,
    gives transformers' log-probs with the same changed weights and its gates forced to those experts; with
    the routers free (no replay) both models route differently and give other log-probs."""
    natural, perturbed, replayed = reference["natural"], reference["perturbed"], reference["replayed"]
    # The reference is not trivial: the perturbation flips the top-k of some (token, layer) pairs, and
    # forcing the old experts moves transformers' log-probs far beyond the tolerance below.
    flips = (_sets(perturbed["routing"]) != _sets(natural["routing"])).any(dim=-1)
    assert 0 < int(flips.sum()) < flips.numel()
    assert float((replayed["logprobs"] - perturbed["logprobs"])[:, :-1].abs().max()) > REPLAY_EFFECT
    for record in actor_runs(nproc, layout):
        # What is replayed is the actor's own record, which equals transformers' routing everywhere here, so
        # both models are forced to the same experts.
        assert torch.equal(_sets(record["r_natural"]), _sets(natural["routing"]))
        # The same perturbation reached both models: free, they route alike and agree.
        _assert_same_experts(record["r_perturbed"], perturbed["routing"], perturbed["logits"])
        torch.testing.assert_close(
            record["lp_perturbed"][:, :-1], perturbed["logprobs"][:, :-1], rtol=0, atol=LOGPROB_ATOL
        )
        # Replayed: transformers forced to the recorded experts, with the changed gate weights.
        torch.testing.assert_close(
            record["lp_replayed_0"][:, :-1], replayed["logprobs"][:, :-1], rtol=0, atol=LOGPROB_ATOL
        )
        # An ignored replay would have given the free routing's log-probs.
        assert float((record["lp_replayed_0"] - record["lp_perturbed"])[:, :-1].abs().max()) > REPLAY_EFFECT


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", LAYOUTS)
def test_replay_routes_identically_after_the_router_weights_changed(actor_runs, nproc, layout):
    for record in actor_runs(nproc, layout):
        natural = _sets(record["r_natural"])
        # The perturbation (and step 1) changed some tokens' experts, not all of them...
        for key in ("r_perturbed", "r_free"):
            flips = (_sets(record[key]) != natural).any(dim=-1)
            assert 0 < int(flips.sum()) < flips.numel(), key
        # ...yet the replayed passes, forward-only and training, use exactly the recorded experts.
        assert torch.equal(record["r_replayed"], record["r_natural"])
        positions = record["replay_positions"]
        assert record["rec_train_2"] == _record(record["r_natural"], positions, record["num_experts"])
        # Without replay the training pass records what a forward pass on the same weights routes.
        assert torch.equal(record["r_train_1"], record["r_perturbed"])


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", LAYOUTS)
def test_training_pass_computes_its_loss_under_the_replayed_routing(actor_runs, nproc, layout):
    for record in actor_runs(nproc, layout):
        # The update's loss is the policy loss of the log-probs a forward pass with the same routing gives.
        # Measured within 8.6e-8.
        assert record["metrics_1"]["loss"] == pytest.approx(record["loss_expected_1"], rel=0, abs=1e-6)
        assert record["metrics_2"]["loss"] == pytest.approx(record["loss_expected_2"], rel=0, abs=1e-6)
        # With the routers free the same update would have had another loss.
        assert abs(record["loss_free_2"] - record["loss_expected_2"]) > 1e-3


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", LAYOUTS)
def test_a_routing_record_holds_the_recorded_positions_and_replays_as_the_dense_routing(actor_runs, nproc, layout):
    """A pass given the positions to keep returns a compact RoutingRecord of exactly the dense routing there, on
    every rank; replaying a record of every position is replaying the dense tensor, bit for bit."""
    for record in actor_runs(nproc, layout):
        positions = record["replay_positions"]
        compact = record["rec_perturbed"]
        assert compact.experts.dtype == torch.uint8 and compact.rows == positions.shape[0]
        assert torch.equal(compact.positions_mask(positions.shape[1]), positions)
        assert compact == _record(record["r_perturbed"], positions, record["num_experts"])
        assert torch.equal(record["lp_replayed_rec"], record["lp_replayed_0"])


def _record(dense: torch.Tensor, positions: torch.Tensor, num_experts: int):
    from sapo_megatron.routing_layout import RoutingRecord

    return RoutingRecord.from_dense(dense, positions, num_experts)


@pytest.mark.distributed
@pytest.mark.slow
def test_recomputation_replays_the_forward_routing(actor_runs):
    """Full activation recomputation re-runs the routers in backward: the gradients must not change."""
    (plain,) = actor_runs(1, "tp1-pp1-ep1")
    (recompute,) = actor_runs(1, "tp1-pp1-ep1-recompute")
    for key in ("metrics_1", "metrics_2"):
        assert plain[key] == recompute[key]
    for key in ("r_train_1", "lp_replayed", "lp_free"):
        assert torch.equal(plain[key], recompute[key]), key
    assert plain["rec_train_2"] == recompute["rec_train_2"]


# -- in-process: layout conversion and validation (no megatron process needed) ---------------------------------


def test_rollout_routing_lands_on_train_batch_positions():
    from sapo_megatron.actor.batch import collate_sequences
    from sapo_megatron.actor.routing_replay import rollout_routing_to_train

    prompts, responses = [[5, 6, 7], [8]], [[1, 2], [3, 4, 9]]
    tokens, mask, _ = collate_sequences(prompts, responses, pad_id=0, seq_len=6)
    # The engine's layout: one row per token fed through the model (all but the last sampled token).
    routed = [
        torch.tensor([[[0, 1]], [[1, 2]], [[2, 3]], [[3, 4]]], dtype=torch.int32),  # 3 + 2 - 1 tokens
        torch.tensor([[[4, 5]], [[5, 6]], [[6, 7]]], dtype=torch.int32),  # 1 + 3 - 1 tokens
    ]
    routing = rollout_routing_to_train(routed, tokens.shape[1])
    assert routing.shape == (2, 6, 1, 2) and routing.dtype == torch.int32
    assert torch.equal(routing[0, :4], routed[0]) and torch.equal(routing[1, :3], routed[1])
    # The last sampled token and the padding have no engine routing.
    assert bool((routing[0, 4:] == -1).all()) and bool((routing[1, 3:] == -1).all())
    # Every position inside the loss mask has one: the logits at t come from tokens <= t, all routed.
    assert bool((routing[..., 0, 0][mask] >= 0).all())
    with pytest.raises(ValueError, match="more than seq_len=3"):
        rollout_routing_to_train(routed, 3)
    with pytest.raises(ValueError, match=r"routed_experts\[1\] has shape"):
        rollout_routing_to_train([routed[0], torch.zeros(3, 2, 2, dtype=torch.int32)], 6)


def test_replay_routing_is_checked():
    # The replay's check: the one of the diagnostics, over every position, plus the exact shape and whole top-ks.
    from functools import partial

    from sapo_megatron.routing_layout import check_routing

    check = partial(check_routing, name="r", num_experts=4, whole_topk=True)
    good = torch.tensor([[[[0, 3]], [[-1, -1]]]])  # [1, 2, 1, 2]
    valid, recorded = check(good, shape=(1, 2, 1, 2))
    assert valid.all() and recorded.flatten().tolist() == [True, False]
    with pytest.raises(ValueError, match="expected .* = \\(1, 3, 1, 2\\)"):
        check(good, shape=(1, 3, 1, 2))
    with pytest.raises(ValueError, match="integer expert ids"):
        check(good.float())
    with pytest.raises(ValueError, match="mix -1 with expert ids"):
        check(torch.tensor([[[[0, -1]], [[1, 2]]]]))
    with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
        check(torch.tensor([[[[0, 4]], [[1, 2]]]]))
    with pytest.raises(ValueError, match="repeats an expert"):
        check(torch.tensor([[[[2, 2]], [[1, 2]]]]))


def test_routing_replay_config():
    from sapo_megatron.config import ConfigError, load_config

    assert load_config(None).algorithm.routing_replay == "off"
    assert load_config(None, ["algorithm.routing_replay=rollout"]).algorithm.routing_replay == "rollout"
    with pytest.raises(ConfigError, match="not allowed; use one of 'off', 'old', 'rollout'"):
        load_config(None, ["algorithm.routing_replay=always"])
    with pytest.raises(ConfigError, match="dense control has no MoE routing"):
        load_config(None, ["algorithm.routing_replay=old", "model.dense=true"])
    with pytest.raises(ConfigError, match="does not support context parallelism"):
        load_config(None, ["algorithm.routing_replay=old", "parallel.context=2", "launch.nproc_per_node=2"])


def test_router_entropy_metric_is_the_mean_over_valid_tokens_per_layer():
    from sapo_megatron.diagnostics.run_logger import flatten_metrics
    from sapo_megatron.diagnostics.step import router_entropy_metrics

    entropy = torch.tensor([[[1.0, 2.0], [3.0, 5.0], [9.0, 9.0]], [[0.5, 4.0], [7.0, 7.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    metrics = flatten_metrics(router_entropy_metrics(entropy, mask), "routing/")
    assert metrics == {
        "routing/router_entropy/layer0": pytest.approx(4.5 / 3),
        "routing/router_entropy/layer1": pytest.approx(11.0 / 3),
        "routing/router_entropy_mean": pytest.approx(15.5 / 6),
    }
