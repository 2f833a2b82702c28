"""Worker for test_vocab_parallel_logprobs.py: vocab-sharded log-probs / entropy over megatron-core's TP group.

Run by torchrun with N processes: ``worker_logprobs.py OUT_DIR``. Tensor parallelism spans all processes.
Every rank builds the same full-vocabulary inputs, keeps its vocabulary shard, and writes
``OUT_DIR/rank{r}.pt`` with its outputs and the gradient w.r.t. its shard; rank 0 also writes the full
inputs (``OUT_DIR/inputs.pt``) so that the parent test can compute the single-rank reference.
"""

import os
import sys

import torch
import torch.distributed as dist

SEQ, BATCH, VOCAB = 5, 2, 48  # VOCAB divisible by 2 and 4

# (name, dtype, temperature, with_entropy, inplace_backward)
CASES = [
    ("fp64-T1-entropy", torch.float64, 1.0, True, False),
    ("fp64-T0.7-entropy", torch.float64, 0.7, True, False),
    ("fp32-T1-logprobs", torch.float32, 1.0, False, False),
    ("fp32-T1.3-entropy", torch.float32, 1.3, True, False),
    ("fp32-T0.7-entropy-inplace", torch.float32, 0.7, True, True),
    ("bf16-T1-entropy", torch.bfloat16, 1.0, True, False),
]


def make_inputs(tp_size):
    """Full logits [seq, batch, vocab] (float64) with the hard cases placed on purpose, targets, upstream grads."""
    gen = torch.Generator().manual_seed(20240607)
    local = VOCAB // tp_size
    logits = 3.0 * torch.randn(SEQ, BATCH, VOCAB, generator=gen, dtype=torch.float64)
    # The global max sits in the last shard.
    logits[0, 0, -local:] += 40.0
    # Every shard but the first is ~300 below it: their exp(m_r - M) underflows in fp32, and the target
    # lies in such a shard (log-prob ~ -300).
    logits[1, 0, local:] -= 300.0
    # Large common offset: only the max-subtraction keeps exp finite.
    logits[2, 1] += 1e3
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=gen)
    target[1, 0] = VOCAB - 1
    target[0, 1] = 0
    target[3, 0] = local  # first id of the second shard
    target[3, 1] = local - 1  # last id of the first shard
    grad_logprobs = torch.randn(SEQ, BATCH, generator=gen, dtype=torch.float64)
    grad_entropy = torch.randn(SEQ, BATCH, generator=gen, dtype=torch.float64)
    return logits, target, grad_logprobs, grad_entropy


def main(out_dir):
    dist.init_process_group("gloo")
    from megatron.core import parallel_state, tensor_parallel

    world = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    from sapo_megatron.actor.logprobs import vocab_parallel_logprobs

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    assert tp_size == world
    local = VOCAB // tp_size
    shard = slice(tp_rank * local, (tp_rank + 1) * local)
    logits, target, grad_lp, grad_ent = make_inputs(tp_size)

    results = {"tp_size": tp_size, "tp_rank": tp_rank, "cases": [case[0] for case in CASES]}
    for name, dtype, temperature, with_entropy, inplace in CASES:
        leaf = logits[..., shard].to(dtype).clone().requires_grad_()
        # inplace_backward needs an intermediate tensor, as the output layer's output is.
        x = leaf * 1.0 if inplace else leaf
        lp, ent = vocab_parallel_logprobs(
            x,
            target,
            tp_group=tp_group,
            temperature=temperature,
            with_entropy=with_entropy,
            chunk_size=3,
            inplace_backward=inplace,
        )
        loss = (lp * grad_lp.to(lp.dtype)).sum()
        if with_entropy:
            loss = loss + (ent * grad_ent.to(ent.dtype)).sum()
        (grad,) = torch.autograd.grad(loss, x)
        results[name] = {
            "dtype": dtype,
            "temperature": temperature,
            "with_entropy": with_entropy,
            "inplace": inplace,
            "logprobs": lp.detach(),
            "entropy": None if ent is None else ent.detach(),
            "grad": grad.detach().clone(),
        }

    # megatron-core's own vocab-parallel cross entropy on the same shards (fp32, T = 1): -logprobs, and
    # its gradient of sum(g * logprobs).
    leaf = logits[..., shard].float().clone().requires_grad_()
    x = leaf * 1.0  # it overwrites its input with the softmax
    stock_lp = -tensor_parallel.vocab_parallel_cross_entropy(x, target)
    (stock_grad,) = torch.autograd.grad((stock_lp * grad_lp.float()).sum(), x)
    results["megatron"] = {"logprobs": stock_lp.detach(), "grad": stock_grad.detach().clone()}

    torch.save(results, os.path.join(out_dir, f"rank{tp_rank}.pt"))
    if dist.get_rank() == 0:
        torch.save(
            {"logits": logits, "target": target, "grad_logprobs": grad_lp, "grad_entropy": grad_ent},
            os.path.join(out_dir, "inputs.pt"),
        )
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
