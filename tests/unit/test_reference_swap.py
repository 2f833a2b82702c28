"""The reference policy's weight exchange on a plain torch module (no megatron): what is swapped, that swaps
are exact and undo themselves, and what is refused. The megatron actor's own checks are in
tests/distributed/test_reference_policy.py."""

from __future__ import annotations

import pytest
import torch

from sapo_megatron.actor import reference as reference_module
from sapo_megatron.actor.reference import ReferencePolicy


class Chunk(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(5, 7)
        self.norm = torch.nn.LayerNorm(7, dtype=torch.float64)  # another dtype in the same host store
        self.register_buffer("expert_bias", torch.zeros(3))  # persistent: part of the weights
        self.register_buffer("counter", torch.zeros(3), persistent=False)  # a running counter: not swapped


class FakePolicy:
    """What ReferencePolicy needs of MegatronPolicy: ``model`` (chunks) and ``compute_logprobs``."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = [Chunk(), Chunk()]
        self.calls = []

    def compute_logprobs(self, batch, **kwargs):
        self.calls.append(kwargs)
        return torch.cat([chunk.proj(batch).sum(-1) for chunk in self.model])


def state(policy) -> dict:
    return {f"{i}.{k}": v.clone() for i, chunk in enumerate(policy.model) for k, v in chunk.state_dict().items()}


def train(policy) -> None:
    with torch.no_grad():
        for chunk in policy.model:
            for tensor in [*chunk.parameters(), chunk.expert_bias]:
                tensor.add_(torch.randn_like(tensor))


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_swap_is_exact_and_passes_arguments_through(monkeypatch):
    monkeypatch.setattr(reference_module, "SWAP_PIECE_BYTES", 12)  # several pieces per tensor
    policy = FakePolicy()
    batch = torch.randn(4, 5)
    initial_state, initial = state(policy), policy.compute_logprobs(batch)
    reference = ReferencePolicy.capture(policy)
    assert reference.nbytes >= sum(v.numel() * v.element_size() for k, v in initial_state.items())
    assert not any("counter" in name for name in reference.names)
    assert sum("expert_bias" in name for name in reference.names) == 2
    train(policy)
    trained_state, trained = state(policy), policy.compute_logprobs(batch)
    assert not torch.equal(trained, initial)
    for _ in range(2):
        assert torch.equal(reference.compute_logprobs(batch, local=True), initial)
        assert policy.calls[-1] == {"local": True}
        assert_state_equal(state(policy), trained_state)
    with reference.swapped():
        assert_state_equal(state(policy), initial_state)
        with pytest.raises(RuntimeError, match="not re-entrant"):
            with reference.swapped():
                pass
        with pytest.raises(RuntimeError, match="inside swapped"):
            reference.recapture()
    assert_state_equal(state(policy), trained_state)
    reference.recapture()
    assert torch.equal(reference.compute_logprobs(batch), trained)


def test_weights_loaded_while_swapped_become_the_reference():
    """How a checkpoint restores the reference: load into the model inside swapped()."""
    policy = FakePolicy()
    batch = torch.randn(4, 5)
    reference = ReferencePolicy.capture(policy)
    train(policy)
    trained_state = state(policy)
    saved = FakePolicy()
    train(saved)
    with reference.swapped():
        for chunk, source in zip(policy.model, saved.model):
            chunk.load_state_dict(source.state_dict())
    assert_state_equal(state(policy), trained_state)
    assert torch.equal(reference.compute_logprobs(batch), saved.compute_logprobs(batch))


def test_a_failed_exchange_leaves_the_weights_as_they_were(monkeypatch):
    policy = FakePolicy()
    batch = torch.randn(4, 5)
    reference = ReferencePolicy.capture(policy)
    initial = policy.compute_logprobs(batch)
    train(policy)
    trained_state = state(policy)
    real, calls = reference_module._exchange_piece, []

    def failing(device_piece, host_piece):
        calls.append(1)
        if len(calls) == 5:
            raise MemoryError("out of device memory")
        real(device_piece, host_piece)

    monkeypatch.setattr(reference_module, "_exchange_piece", failing)
    with pytest.raises(MemoryError):
        reference.compute_logprobs(batch)
    assert_state_equal(state(policy), trained_state)
    monkeypatch.setattr(reference_module, "_exchange_piece", real)
    assert torch.equal(reference.compute_logprobs(batch), initial)


def test_offloaded_parameters_are_refused():
    policy = FakePolicy()
    reference = ReferencePolicy.capture(policy)
    storage = policy.model[0].proj.weight.untyped_storage()
    nbytes = storage.nbytes()
    storage.resize_(0)
    try:
        with pytest.raises(RuntimeError, match="offloaded"):
            reference.compute_logprobs(torch.randn(2, 5))
    finally:
        storage.resize_(nbytes)
