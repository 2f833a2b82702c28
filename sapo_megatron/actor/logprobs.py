"""Per-token log-probs (and entropy) of target tokens from vocab-parallel logits.

With tensor parallelism Megatron's output layer leaves every TP rank with a contiguous slice of the
vocabulary: rank ``r`` of ``tp`` holds the logits of token ids ``[r * V/tp, (r + 1) * V/tp)``. Megatron's
layout is ``[seq, batch, vocab/tp]``; any leading shape works here (``GPTModel`` returns
``[batch, seq, vocab/tp]``), the last dimension is always the local vocabulary shard.

What is computed, with ``x = logits / temperature`` over the full (padded) vocabulary::

    lse        = log sum_j exp(x_j)                     (all-reduce of max and of sum-exp over TP)
    logprobs   = x_target - lse                         = log_softmax(x)[target]
    entropy    = lse - sum_j p_j x_j,  p = softmax(x)   (all-reduce of sum p*x over TP)

and the backward is closed form, per shard, with no communication::

    d logprobs / d x  = onehot(target) - p
    d entropy  / d x  = -p * (log p + entropy)
    d / d logits      = (d / d x) / temperature

The backward needs no collective because the upstream gradients are the same on every TP rank (Megatron
computes the loss redundantly on each of them), exactly as in megatron-core's
``tensor_parallel.vocab_parallel_cross_entropy``.

Why not megatron-core's function: for fp32 logits it overwrites its input with the softmax (the caller's
logits are gone after the call, so using them twice, e.g. for entropy as well, needs a full clone), for
bf16 logits it makes and keeps a full fp32 copy, it has no temperature or entropy, and it keeps a full
softmax alive from forward to backward. Here the forward streams over chunks of tokens and keeps only
the logits (a reference to the caller's tensor, not a copy) plus a few numbers per token; the backward
recomputes the softmax chunk by chunk. Peak extra memory is one or two chunk-sized fp32 buffers, plus the
gradient itself unless ``inplace_backward`` lets it reuse the logits' storage. The price is a second
``exp`` over the logits in backward.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from sapo_megatron import collectives

__all__ = ["vocab_parallel_logprobs", "default_chunk_size"]

# Elements of the local logits per chunk, by device type. The forward and the backward each allocate one
# chunk-sized buffer in the compute dtype (two with entropy) and reuse it for every chunk. On a CPU a
# chunk should stay cache-resident (1M fp32 elements = 4 MiB: ~7 rows of Qwen3's
# 151,936-token vocabulary; 1 to 12 rows measured equally fast, 32 rows slower). On a GPU each chunk is
# a handful of kernel launches, so chunks must be large enough to keep it busy; 16M fp32 elements are
# 64 MiB, small next to the [tokens, vocab/tp] logits themselves.
_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 24


def default_chunk_size(local_vocab: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk that ``vocab_parallel_logprobs`` uses when ``chunk_size`` is None."""
    elements = _CHUNK_ELEMENTS.get(torch.device(device).type, _CHUNK_ELEMENTS_ACCELERATOR)
    return max(1, elements // max(1, local_vocab))


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group: Optional[dist.ProcessGroup] = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: Optional[int] = None,
    inplace_backward: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-prob of ``target`` under ``softmax(logits / temperature)`` and optionally the entropy.

    Args:
        logits: ``[..., vocab/tp]`` this rank's vocabulary shard (Megatron: ``[seq, batch, vocab/tp]``).
            Any floating dtype; bf16/fp16/fp32 are computed in fp32, fp64 in fp64. Must be finite.
        target: ``[...]`` integer token ids in the *global* vocabulary ``[0, vocab)``, the same on all TP
            ranks; ``vocab = logits.shape[-1] * tp``. Ids outside this rank's shard are expected (standard
            vocab-parallel masking). Positions that are padding must still carry a valid id (e.g. 0) and be
            masked out of the loss by the caller.
        tp_group: the tensor-parallel group the vocabulary is split over (e.g.
            ``parallel_state.get_tensor_model_parallel_group()``); ``None`` means the logits hold the whole
            vocabulary.
        temperature: the sampling temperature; the distribution is ``softmax(logits / temperature)``, which
            is what vLLM's sampled-token logprobs refer to.
        with_entropy: also return the per-token entropy of that distribution.
        chunk_size: tokens processed at a time; ``None`` picks ``default_chunk_size(vocab/tp, device)``.
            It changes memory and speed, not the result (up to the summation order that torch's own
            multi-threaded reductions pick for a given shape).
        inplace_backward: write the gradient into the storage of ``logits`` instead of a new tensor (the
            same storage reuse megatron-core's cross entropy does). Only for logits that are an
            intermediate result nothing reads after backward (the output layer's output); ``logits`` then
            holds its gradient. Autograd's version check raises if another op saved ``logits`` for its own
            backward. Not allowed for leaf tensors: their ``.grad`` would alias their data.

    Returns:
        ``(logprobs, entropy)`` of shape ``target.shape`` in the compute dtype (fp32, or fp64 for fp64
        logits); ``entropy`` is ``None`` unless ``with_entropy``. Both are differentiable w.r.t. ``logits``;
        the gradient has the dtype of ``logits``.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")
    if (
        not isinstance(target, torch.Tensor)
        or target.is_floating_point()
        or target.is_complex()
        or target.dtype == torch.bool
    ):
        raise ValueError(f"target must be an integer tensor of token ids, got {getattr(target, 'dtype', type(target))}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the logits shape without its vocabulary dimension "
            f"{tuple(logits.shape[:-1])} (logits shape {tuple(logits.shape)})"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if inplace_backward and logits.requires_grad and logits.is_leaf:
        raise ValueError(
            "inplace_backward=True needs logits that are an intermediate result; for a leaf tensor its .grad "
            "would share storage with its data"
        )

    if tp_group is None:
        tp_rank, tp_size = 0, 1
    else:
        tp_rank, tp_size = dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)
        if tp_rank < 0:
            raise ValueError("this process is not a member of tp_group")
    local_vocab = logits.shape[-1]
    vocab = local_vocab * tp_size
    if target.numel() > 0:
        lo, hi = torch.aminmax(target)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"target ids must lie in [0, {vocab}) (vocab/tp={local_vocab} x tp={tp_size}), got ids in [{lo}, {hi}]"
            )
    if chunk_size is None:
        chunk_size = default_chunk_size(local_vocab, logits.device)

    # A view for contiguous logits (Megatron's are), so saving it for backward costs nothing.
    logits_2d = logits.reshape(-1, local_vocab)
    target_1d = target.reshape(-1)
    outputs = _VocabParallelLogprobs.apply(
        logits_2d,
        target_1d,
        tp_group if tp_size > 1 else None,
        tp_rank,
        float(temperature),
        bool(with_entropy),
        chunk_size,
        bool(inplace_backward),
    )
    if with_entropy:
        logprobs, entropy = outputs
        return logprobs.view(target.shape), entropy.view(target.shape)
    return outputs.view(target.shape), None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shifted_into(out: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, temperature: float) -> torch.Tensor:
    """``out = x / temperature - shift[:, None]`` computed in ``out``'s dtype; ``out`` must not alias ``x``."""
    if x.dtype != out.dtype:
        # Upcast by copying into the buffer: a mixed-dtype ``torch.sub(x, ..., out=out)`` allocates a
        # converted copy of ``x`` on every call, and ``torch.div(bf16, T, out=fp32)`` divides in bf16.
        out.copy_(x)
        if temperature != 1.0:
            out.div_(temperature)
    elif temperature == 1.0:
        return torch.sub(x, shift.unsqueeze(-1), out=out)
    else:
        torch.div(x, temperature, out=out)
    return out.sub_(shift.unsqueeze(-1))


def _scaled_max(x: torch.Tensor, temperature: float, cdtype: torch.dtype) -> torch.Tensor:
    # max(x / T) == max(x) / T exactly for T > 0 (rounding is monotone), so no scaled copy is needed.
    m = x.amax(dim=-1).to(cdtype)
    return m if temperature == 1.0 else m.div_(temperature)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, tp_rank, temperature, with_entropy, chunk_size, inplace_backward):
        n_tokens, local_vocab = logits.shape
        cdtype = _compute_dtype(logits.dtype)
        device = logits.device

        # Standard vocab-parallel masking: ids of other shards point at column 0 and contribute 0.
        local_target = target - tp_rank * local_vocab
        in_shard = (local_target >= 0) & (local_target < local_vocab)
        local_target = torch.where(in_shard, local_target, torch.zeros_like(local_target))
        rows = torch.arange(n_tokens, device=device)
        target_x = logits[rows, local_target].to(cdtype)
        if temperature != 1.0:
            target_x = target_x / temperature

        # Per token, relative to this shard's own max m: S = sum exp(x - m), W = sum exp(x - m) * (x - m).
        local_max = torch.empty(n_tokens, dtype=cdtype, device=device)
        sum_exp = torch.empty(n_tokens, dtype=cdtype, device=device)
        sum_exp_x = torch.empty(n_tokens, dtype=cdtype, device=device) if with_entropy else None
        # Chunk buffers are allocated once and reused: repeated large allocations would fragment a CPU heap.
        rows_per_chunk = min(chunk_size, n_tokens)
        y_buf = torch.empty(rows_per_chunk, local_vocab, dtype=cdtype, device=device)
        e_buf = torch.empty_like(y_buf) if with_entropy else None
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            x = logits[start:end]
            m = _scaled_max(x, temperature, cdtype)
            local_max[start:end] = m
            y = _shifted_into(y_buf[: end - start], x, m, temperature)
            if with_entropy:
                e = torch.exp(y, out=e_buf[: end - start])
                torch.sum(e, dim=-1, out=sum_exp[start:end])
                torch.sum(y.mul_(e), dim=-1, out=sum_exp_x[start:end])
            else:
                torch.sum(y.exp_(), dim=-1, out=sum_exp[start:end])
        del y_buf, e_buf

        # Move every shard to the global max M before summing over shards (one MAX and one SUM all-reduce,
        # both [tokens]-sized): with d = m - M, sum exp(x - M) = e^d S and
        # sum exp(x - M) (x - M) = e^d (W + d S). A shard far below M underflows to an exact 0 contribution.
        if tp_group is not None:
            global_max = local_max.clone()
            collectives.all_reduce(global_max, op=collectives.ReduceOp.MAX, group=tp_group)
            shift = local_max - global_max
            scale = torch.exp(shift)
            columns = [sum_exp * scale]
            if with_entropy:
                columns.append(scale * (sum_exp_x + shift * sum_exp))
            columns.append(torch.where(in_shard, target_x - global_max, torch.zeros_like(target_x)))
            stats = torch.stack(columns, dim=1)
            collectives.all_reduce(stats, op=collectives.ReduceOp.SUM, group=tp_group)
            sum_exp = stats[:, 0]
            sum_exp_x = stats[:, 1] if with_entropy else None
            target_shifted = stats[:, -1]
        else:
            global_max = local_max
            target_shifted = target_x - global_max

        log_sum_exp = torch.log(sum_exp)
        # (x_t - M) - log S rather than x_t - (M + log S): no cancellation against a large max.
        logprobs = target_shifted - log_sum_exp
        # Backward rebuilds p = exp(x - M) / S from M and 1/S, not from exp(x - lse): rounding M + log S
        # to the working precision would cost ~eps * |M| relative accuracy in p for large logits.
        inv_sum_exp = torch.reciprocal(sum_exp)
        if with_entropy:
            # mean_shifted = sum p (x - M): entropy = log S - mean_shifted, log p + entropy = (x - M) - mean_shifted.
            mean_shifted = sum_exp_x * inv_sum_exp
            entropy = log_sum_exp - mean_shifted
            ctx.save_for_backward(logits, local_target, in_shard, global_max, inv_sum_exp, mean_shifted)
        else:
            entropy = None
            ctx.save_for_backward(logits, local_target, in_shard, global_max, inv_sum_exp)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.inplace_backward = inplace_backward
        ctx.with_entropy = with_entropy
        ctx.set_materialize_grads(False)
        if with_entropy:
            return logprobs, entropy
        return logprobs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        grad_logprobs = grads[0]
        grad_entropy = grads[1] if ctx.with_entropy else None
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 8
        if ctx.with_entropy:
            logits, local_target, in_shard, global_max, inv_sum_exp, mean_shifted = ctx.saved_tensors
        else:
            logits, local_target, in_shard, global_max, inv_sum_exp = ctx.saved_tensors
        temperature = ctx.temperature
        chunk_size = ctx.chunk_size
        cdtype = global_max.dtype
        n_tokens = logits.shape[0]

        # With y = x - M and p = exp(y) / S, fold 1/T and 1/S into per-token coefficients:
        #   grad = (g_lp (onehot - p) - g_H p (log p + H)) / T = exp(y) * a + onehot * g_lp / T,
        #   a = -(g_lp + g_H (y - mean_shifted)) / (T S).
        if grad_logprobs is not None:
            g_lp = grad_logprobs.to(cdtype) / temperature
            onehot_coef = torch.where(in_shard, g_lp, torch.zeros_like(g_lp))
            lp_coef = g_lp * inv_sum_exp
        else:
            onehot_coef = lp_coef = None
        h_coef = grad_entropy.to(cdtype) * inv_sum_exp / temperature if grad_entropy is not None else None

        grad = logits if ctx.inplace_backward else torch.empty_like(logits)
        write_direct = grad.dtype == cdtype
        rows_per_chunk = min(chunk_size, n_tokens)
        y_buf = torch.empty(rows_per_chunk, logits.shape[1], dtype=cdtype, device=logits.device)
        e_buf = torch.empty_like(y_buf) if h_coef is not None else None
        chunk_rows = torch.arange(rows_per_chunk, device=logits.device)
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            rows = end - start
            # y = x - M, recomputed into a buffer of its own, so overwriting ``grad`` (which may be
            # ``logits``) below is safe.
            y = _shifted_into(y_buf[:rows], logits[start:end], global_max[start:end], temperature)
            if h_coef is not None:
                exp_y = torch.exp(y, out=e_buf[:rows])
                coef = y.sub_(mean_shifted[start:end].unsqueeze(-1)).mul_(-h_coef[start:end].unsqueeze(-1))
                if lp_coef is not None:
                    coef.sub_(lp_coef[start:end].unsqueeze(-1))
            else:
                exp_y = y.exp_()
                coef = -lp_coef[start:end].unsqueeze(-1)
            out = grad[start:end]
            if write_direct:
                torch.mul(exp_y, coef, out=out)
                target_buf = out
            else:
                # Finish in the compute dtype, round once into the (lower precision) gradient.
                target_buf = exp_y.mul_(coef)
            if onehot_coef is not None:
                target_buf[chunk_rows[:rows], local_target[start:end]] += onehot_coef[start:end].to(target_buf.dtype)
            if not write_direct:
                out.copy_(target_buf)
        return grad, None, None, None, None, None, None, None
