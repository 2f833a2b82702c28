"""Bad inputs to the policy losses: clear errors at valid positions, silence (and no NaN) at masked ones."""

from __future__ import annotations

import pytest
import torch

from sapo_megatron.algorithms import get_policy_loss
from sapo_megatron.config import POLICY_LOSSES, REDUCTIONS

F64 = torch.float64
NAN, INF = float("nan"), float("inf")

HYPER = {
    "sapo": {},
    "clip": {},
    "dual_clip": {},
    "gspo": {"eps_low": 0.05, "eps_high": 0.08},
    "cispo": {"eps_low": 0.3, "eps_high": 0.2},
}


def batch():
    gen = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    logprobs_old = -torch.rand(4, 4, generator=gen, dtype=F64) - 0.1
    logprobs = logprobs_old + 0.3 * torch.randn(4, 4, generator=gen, dtype=F64)
    advantages = torch.tensor([1.0, -0.5, 0.7, -1.5], dtype=F64)
    return logprobs, logprobs_old, advantages, mask


def loss_and_grad(name, logprobs, logprobs_old, advantages, mask, **kwargs):
    leaf = logprobs.clone().requires_grad_(True)
    loss, metrics = get_policy_loss(name)(leaf, logprobs_old, advantages, mask, **HYPER[name], **kwargs)
    loss.backward()
    return loss, leaf.grad, metrics


@pytest.mark.parametrize("name", POLICY_LOSSES)
@pytest.mark.parametrize("tensor", ["logprobs", "logprobs_old", "advantages"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_at_valid_positions_raises(name, tensor, bad):
    logprobs, logprobs_old, advantages, mask = batch()
    per_token = advantages[:, None].expand(4, 4).clone()
    tensors = {"logprobs": logprobs, "logprobs_old": logprobs_old, "advantages": per_token}
    tensors[tensor][0, 1] = bad
    tensors[tensor][1, 0] = bad
    tensors[tensor][2, 2] = bad  # masked: not counted
    with pytest.raises(ValueError, match=f"^{tensor} has 2 NaN/inf value\\(s\\) at valid \\(mask=1\\) positions"):
        get_policy_loss(name)(tensors["logprobs"], tensors["logprobs_old"], tensors["advantages"], mask, **HYPER[name])


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_non_finite_per_sequence_advantage_of_a_valid_sequence_raises(name):
    logprobs, logprobs_old, advantages, mask = batch()
    advantages[3] = NAN
    with pytest.raises(ValueError, match="advantages has 1 NaN/inf"):
        get_policy_loss(name)(logprobs, logprobs_old, advantages, mask, **HYPER[name])


@pytest.mark.parametrize("name", POLICY_LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_at_masked_positions_is_ignored(name, reduction):
    logprobs, logprobs_old, advantages, mask = batch()
    clean_loss, clean_grad, _ = loss_and_grad(name, logprobs, logprobs_old, advantages, mask, reduction=reduction,
                                              norm_length=4)
    dirty_lp, dirty_old = logprobs.clone(), logprobs_old.clone()
    dirty_lp[~mask] = NAN
    dirty_old[0, 3], dirty_old[1, 2], dirty_old[1, 3] = -INF, INF, NAN
    dirty_adv = advantages.clone()
    dirty_adv[2] = NAN  # the fully masked sequence
    loss, grad, metrics = loss_and_grad(name, dirty_lp, dirty_old, dirty_adv, mask, reduction=reduction, norm_length=4)
    assert loss.item() == clean_loss.item()
    assert bool(torch.isfinite(grad).all())
    torch.testing.assert_close(grad, clean_grad, rtol=0, atol=0)
    assert bool((grad[~mask] == 0).all())
    assert all(bool(torch.isfinite(value)) for key, value in metrics.items() if key not in ("ratio_min", "ratio_max"))

    per_token = dirty_adv[:, None].expand(4, 4).clone()
    per_token[~mask] = NAN
    loss_tok, grad_tok, _ = loss_and_grad(
        name, dirty_lp, dirty_old, per_token, mask, reduction=reduction, norm_length=4
    )
    assert loss_tok.item() == clean_loss.item()
    torch.testing.assert_close(grad_tok, clean_grad, rtol=0, atol=0)


@pytest.mark.parametrize("name", POLICY_LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("counts", [{}, {"num_global_tokens": 0, "num_global_seqs": 0}])
def test_all_zero_mask_gives_zero_loss_and_zero_gradients(name, reduction, counts):
    logprobs, logprobs_old, advantages, _ = batch()
    mask = torch.zeros(4, 4)
    leaf = logprobs.clone().requires_grad_(True)
    loss, metrics = get_policy_loss(name)(
        leaf, logprobs_old, advantages, mask, reduction=reduction, norm_length=4, **HYPER[name], **counts
    )
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert bool((leaf.grad == 0).all())
    assert metrics["num_tokens"].item() == 0 and metrics["ratio_mean"].item() == 0
    # identities of min / max, so that reduce_metrics ignores an empty micro-batch
    assert metrics["ratio_min"].item() == INF and metrics["ratio_max"].item() == -INF


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_shape_mismatches_raise_and_name_the_shapes(name):
    logprobs, logprobs_old, advantages, mask = batch()
    fn = get_policy_loss(name)
    with pytest.raises(ValueError, match=r"logprobs_old has shape \(4, 3\) but logprobs has shape \(4, 4\)"):
        fn(logprobs, logprobs_old[:, :3], advantages, mask)
    with pytest.raises(ValueError, match=r"mask has shape \(4, 5\) but logprobs has shape \(4, 4\)"):
        fn(logprobs, logprobs_old, advantages, torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\); expected \[batch\]=\(4,\)"):
        fn(logprobs, logprobs_old, advantages[:3], mask)
    with pytest.raises(ValueError, match=r"logprobs must be \[batch, seq\], got shape \(16,\)"):
        fn(logprobs.reshape(-1), logprobs_old.reshape(-1), advantages, mask.reshape(-1))
    with pytest.raises(ValueError, match="mask must be boolean or hold only 0 and 1"):
        fn(logprobs, logprobs_old, advantages, mask * 2.0)
    with pytest.raises(ValueError, match="logprobs_old must be a torch.Tensor, got list"):
        fn(logprobs, logprobs_old.tolist(), advantages, mask)
    with pytest.raises(ValueError, match="logprobs must be a floating-point tensor"):
        fn(logprobs.long(), logprobs_old, advantages, mask)


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_bfloat16_logprobs_are_computed_in_float32(name):
    logprobs, logprobs_old, advantages, mask = batch()
    leaf = logprobs.to(torch.bfloat16).requires_grad_(True)
    loss, metrics = get_policy_loss(name)(
        leaf, logprobs_old.to(torch.bfloat16), advantages.float(), mask, **HYPER[name]
    )
    loss.backward()
    assert loss.dtype == torch.float32 and metrics["ratio_mean"].dtype == torch.float32
    assert leaf.grad.dtype == torch.bfloat16 and bool(torch.isfinite(leaf.grad).all())
    reference, _ = get_policy_loss(name)(
        leaf.detach().double(), logprobs_old.to(torch.bfloat16).double(), advantages, mask, **HYPER[name]
    )
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)


def test_logprobs_old_is_a_constant():
    logprobs, logprobs_old, advantages, mask = batch()
    old = logprobs_old.clone().requires_grad_(True)
    loss, _ = get_policy_loss("sapo")(logprobs.clone().requires_grad_(True), old, advantages, mask)
    loss.backward()
    assert old.grad is None
