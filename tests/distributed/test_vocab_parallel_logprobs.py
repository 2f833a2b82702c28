"""Vocab-parallel log-probs / entropy over megatron-core's tensor-parallel group (gloo, real parallel_state).

The sharded results and the gradient w.r.t. each rank's logits shard must equal the single-rank
full-vocabulary computation and the float64 closed form; the log-probs and their gradient must also equal
megatron-core's own ``tensor_parallel.vocab_parallel_cross_entropy`` on the same shards.
"""

import os

import pytest
import torch

from sapo_megatron.actor.logprobs import vocab_parallel_logprobs
from sapo_megatron.launch import run_torchrun

WORKER = os.path.join(os.path.dirname(__file__), "worker_logprobs.py")

# Tolerances per dtype of the logits: fp64 tight; fp32 and bf16 are computed in fp32.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=1e-6, atol=1e-6),
}


def _single_rank(inputs, dtype, temperature, with_entropy):
    x = inputs["logits"].detach().to(dtype).clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, inputs["target"], temperature=temperature, with_entropy=with_entropy)
    loss = (lp * inputs["grad_logprobs"].to(lp.dtype)).sum()
    if with_entropy:
        loss = loss + (ent * inputs["grad_entropy"].to(ent.dtype)).sum()
    loss.backward()
    return lp.detach(), None if ent is None else ent.detach(), x.grad


def _float64_closed_form(inputs, dtype, temperature, with_entropy):
    """log_softmax / entropy / (g_lp (onehot - p) - g_H p (log p + H)) / T on the full vocabulary."""
    logits = inputs["logits"].to(dtype).double()
    target = inputs["target"]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    onehot = torch.nn.functional.one_hot(target, logits.shape[-1]).double()
    grad = inputs["grad_logprobs"].unsqueeze(-1) * (onehot - p)
    if with_entropy:
        grad = grad - inputs["grad_entropy"].unsqueeze(-1) * p * (logp + entropy.unsqueeze(-1))
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), entropy, grad / temperature


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_logprobs_entropy_and_gradients_equal_single_rank(tmp_path, tp):
    run_torchrun([WORKER, str(tmp_path)], tp, timeout=180).check()
    inputs = torch.load(tmp_path / "inputs.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(tp)]
    assert [r["tp_size"] for r in ranks] == [tp] * tp
    assert [r["tp_rank"] for r in ranks] == list(range(tp))
    vocab = inputs["logits"].shape[-1]
    local = vocab // tp
    # Targets fall in every shard, so every rank sees ids inside and outside its own shard.
    assert set((inputs["target"] // local).flatten().tolist()) == set(range(tp))

    for name in ranks[0]["cases"]:
        case = ranks[0][name]
        dtype, temperature, with_entropy = case["dtype"], case["temperature"], case["with_entropy"]
        ref_lp, ref_ent, ref_grad = _single_rank(inputs, dtype, temperature, with_entropy)
        f64_lp, f64_ent, f64_grad = _float64_closed_form(inputs, dtype, temperature, with_entropy)
        # fp64 cases are also held to the float64 closed form; fp32 ones are within an ulp of their own
        # logits' scale (up to 1e3 here) of it, which the unit tests check, and equal to the single rank.
        exact = dtype == torch.float64
        tol = TOL[dtype]
        for rank in ranks:
            out = rank[name]
            # After the all-reduces every rank holds the same per-token values, bit for bit.
            assert torch.equal(out["logprobs"], ranks[0][name]["logprobs"]), name
            torch.testing.assert_close(out["logprobs"], ref_lp, **tol, msg=name)
            if exact:
                torch.testing.assert_close(out["logprobs"], f64_lp, **tol, msg=name)
            if with_entropy:
                assert torch.equal(out["entropy"], ranks[0][name]["entropy"]), name
                torch.testing.assert_close(out["entropy"], ref_ent, **tol, msg=name)
                if exact:
                    torch.testing.assert_close(out["entropy"], f64_ent, **tol, msg=name)
            else:
                assert out["entropy"] is None
            shard = slice(rank["tp_rank"] * local, (rank["tp_rank"] + 1) * local)
            assert out["grad"].dtype == dtype and out["grad"].shape == (*inputs["target"].shape, local)
            if dtype == torch.bfloat16:
                # Both are the fp32 gradient rounded once to bf16; allow one bf16 rounding step.
                torch.testing.assert_close(out["grad"], ref_grad[..., shard], rtol=2**-7, atol=1e-6, msg=name)
            else:
                torch.testing.assert_close(out["grad"], ref_grad[..., shard], **tol, msg=name)
                if exact:
                    torch.testing.assert_close(out["grad"], f64_grad[..., shard], **tol, msg=name)

    # megatron-core's vocab_parallel_cross_entropy on the same shards: same log-probs and gradient.
    ours = "fp32-T1-logprobs"
    for rank in ranks:
        torch.testing.assert_close(rank["megatron"]["logprobs"], rank[ours]["logprobs"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rank["megatron"]["grad"], rank[ours]["grad"], rtol=1e-6, atol=1e-6)
