"""Packed sequences: a token-budget micro-batch's rows concatenated into one row, for megatron-core's THD attention.

With ``trainer.pack_sequences`` (GPU, Transformer Engine) a micro-batch of ``rows`` sequences is not padded to its
longest row: row ``i``'s first ``lengths[i]`` tokens (its kept length, :func:`~sapo_megatron.actor.micro_batching.
row_lengths`) are laid end to end, in the micro-batch's row order, into one row ``[1, total]``, and megatron-core's
GPTModel gets ``packed_seq_params`` (``qkv_format="thd"``, ``cu_seqlens``): Transformer Engine's attention keeps
every token inside its own sequence, and RoPE restarts at position 0 at every sequence start (megatron applies it
per ``cu_seqlens`` segment; the position ids passed along restart too, which only a learned absolute position
embedding would read). Nothing else in the model mixes tokens, so each kept position's logits are those of the
padded micro-batch, up to the attention kernel's rounding.

``total`` is the tokens rounded up to ``multiple`` (sequence parallelism scatters the packed row over the
tensor-parallel ranks, so it must divide by their number). The rounding tokens form one more sequence of their own
at the end (token 0, labels 0), so that ``cu_seqlens[-1] == total`` as megatron's THD RoPE and TE's kernels
expect, and no real sequence attends to them.

The packed order of the real tokens is the micro-batch's row-major order restricted to the kept positions:
row 0's positions ``0..lengths[0]-1``, then row 1's, and so on. Megatron's routers see a packed micro-batch as
``total x 1`` tokens in exactly that order (``[s, b]`` with ``b = 1``), which is what routing record and replay
map through (:meth:`SequencePacking.pack`, :meth:`SequencePacking.locate`).

Pure torch; megatron-core is imported only by :func:`packed_seq_params` (the GPU path).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

from sapo_megatron.config import ConfigError


@dataclass(frozen=True)
class SequencePacking:
    """How one micro-batch ``[rows, width]`` becomes one packed row ``[total]`` and back.

    ``lengths[i]``: the positions of row ``i`` that are packed (``1 <= lengths[i] <= width``); ``total``: the packed
    row's length, ``sum(lengths)`` plus the rounding tail."""

    lengths: tuple[int, ...]
    width: int
    total: int

    def __post_init__(self):
        if not self.lengths:
            raise ValueError("SequencePacking: a micro-batch needs at least one row")
        if any(not 1 <= n <= self.width for n in self.lengths):
            raise ValueError(f"SequencePacking: every length must be in [1, width={self.width}], got {self.lengths}")
        if self.total < self.num_tokens:
            raise ValueError(f"SequencePacking: total={self.total} < the {self.num_tokens} tokens packed")

    @classmethod
    def plan(cls, lengths: Sequence[int], width: int, multiple: int = 1) -> "SequencePacking":
        """Rows of ``lengths`` packed back to back, the row rounded up to a multiple of ``multiple``."""
        if multiple < 1:
            raise ValueError(f"multiple={multiple}: must be >= 1")
        lengths = tuple(int(n) for n in lengths)
        tokens = sum(lengths)
        return cls(lengths=lengths, width=int(width), total=tokens + (-tokens) % multiple)

    # -- sizes ------------------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        """Real tokens: the packed row's first ``num_tokens`` positions; the rest is the rounding tail."""
        return sum(self.lengths)

    @property
    def tail(self) -> int:
        return self.total - self.num_tokens

    @property
    def seq_lengths(self) -> tuple[int, ...]:
        """The sequences attention sees: every row, then the rounding tail as a sequence of its own (if any)."""
        return self.lengths + ((self.tail,) if self.tail else ())

    @property
    def max_seqlen(self) -> int:
        return max(self.seq_lengths)

    # -- what the model gets ----------------------------------------------------------------------------------
    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 ``[len(seq_lengths) + 1]``: sequence ``j`` is packed positions ``cu[j]..cu[j+1]-1``."""
        out = torch.zeros(len(self.seq_lengths) + 1, dtype=torch.int32)
        out[1:] = torch.tensor(self.seq_lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
        return out

    @cached_property
    def position_ids(self) -> torch.Tensor:
        """int64 ``[total]``: each sequence's positions from 0 (the tail's too)."""
        return torch.cat([torch.arange(n, dtype=torch.int64) for n in self.seq_lengths])

    @cached_property
    def index(self) -> torch.Tensor:
        """int64 ``[num_tokens]``: packed position ``p`` holds micro-batch entry ``index[p]`` of the flattened
        ``[rows, width]`` layout (``row * width + position``)."""
        return torch.cat(
            [row * self.width + torch.arange(n, dtype=torch.int64) for row, n in enumerate(self.lengths)]
        )

    # -- layout conversions -----------------------------------------------------------------------------------
    def pack(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """``values`` ``[rows, width, *tail]`` -> ``[total, *tail]``; the rounding tail holds ``fill``."""
        rest = tuple(values.shape[2:])
        if tuple(values.shape[:2]) != (self.rows, self.width):
            raise ValueError(f"pack: values of shape {tuple(values.shape)}, expected [{self.rows}, {self.width}, ...]")
        flat = values.reshape(self.rows * self.width, *rest)
        index = self.index.to(values.device)
        if not self.tail:
            return flat.index_select(0, index)
        out = torch.full((self.total, *rest), fill, dtype=values.dtype, device=values.device)
        out[: self.num_tokens] = flat.index_select(0, index)
        return out

    def unpack(self, packed: torch.Tensor, fill=0) -> torch.Tensor:
        """``packed`` ``[total, *tail]`` -> ``[rows, width, *tail]``; positions past a row's length hold ``fill``.
        Differentiable: the gradient of each packed token is the gradient of the entry it lands on (the tail gets 0)."""
        rest = tuple(packed.shape[1:])
        if packed.shape[0] != self.total:
            raise ValueError(f"unpack: {packed.shape[0]} packed tokens, expected {self.total}")
        out = torch.full((self.rows * self.width, *rest), fill, dtype=packed.dtype, device=packed.device)
        out = out.index_copy(0, self.index.to(packed.device), packed[: self.num_tokens])
        return out.reshape(self.rows, self.width, *rest)

    def locate(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where the packed positions ``start..stop-1`` (one tensor-parallel rank's slice under sequence
        parallelism) come from: ``(real, rows, positions)``, ``real`` bool ``[stop - start]`` (False in the
        rounding tail), ``rows`` / ``positions`` int64 of the real ones, in packed order."""
        if not 0 <= start <= stop <= self.total:
            raise ValueError(f"locate({start}, {stop}): outside the {self.total} packed positions")
        real = torch.arange(start, stop) < self.num_tokens
        flat = self.index[start : min(stop, self.num_tokens)]
        return real, flat // self.width, flat % self.width


def packed_seq_params(packing: SequencePacking, device: torch.device):
    """megatron-core's ``PackedSeqParams`` for one packed row: THD format, ``cu_seqlens`` int32 on ``device``.

    No sequence has padding inside it (the rounding tail is a sequence of its own), so the ``*_padded`` offsets
    equal the plain ones. They are given explicitly (as verl does) so that every reader agrees: megatron's THD RoPE
    uses the padded offsets when present, TE >= 1.10 takes them as the tokens' layout."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = packing.cu_seqlens.to(device)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu,
        cu_seqlens_kv_padded=cu,
        max_seqlen_q=packing.max_seqlen,
        max_seqlen_kv=packing.max_seqlen,
    )


def check_packing_environment(device: torch.device | str) -> None:
    """``trainer.pack_sequences`` on this rank, before anything is built: a CUDA device and Transformer Engine
    installed (the model then gets TE's layer spec, whose attention takes ``cu_seqlens``)."""
    if torch.device(device).type != "cuda":
        raise ConfigError(
            f"trainer.pack_sequences=true on device {str(device)!r}: packed sequences need Transformer Engine's "
            "attention, which runs on a CUDA GPU only; set trainer.pack_sequences=false (the token budget alone still "
            "cuts each micro-batch's padding to its longest row)"
        )
    if importlib.util.find_spec("transformer_engine") is None:
        raise ConfigError(
            "trainer.pack_sequences=true but transformer_engine is not installed: megatron-core's own attention "
            "cannot take packed sequences; install the GPU stack (SAPO_STACK=gpu bash tools/setup_env.sh) or set "
            "trainer.pack_sequences=false"
        )


def check_packing_supported(chunks: Sequence[torch.nn.Module]) -> None:
    """Refuses a model whose attention cannot take packed (THD) sequences.

    megatron-core's local ``DotProductAttention`` (the CPU layer spec) asserts ``packed_seq_params is None``;
    Transformer Engine's ``TEDotProductAttention`` (the GPU spec) takes ``cu_seqlens``. The check runs before the
    first packed pass, so the user sees the setting to change instead of megatron's assertion inside a forward."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    for chunk in chunks:
        for module in chunk.modules():
            # Exactly megatron's class: a subclass may add THD support (TE's does not derive from it).
            if type(module) is DotProductAttention:
                raise ValueError(
                    "trainer.pack_sequences=true needs Transformer Engine's attention (TEDotProductAttention, the layer "
                    "spec used on a CUDA device with transformer_engine installed); this model uses megatron-core's "
                    "local DotProductAttention, which cannot take packed sequences. Set trainer.pack_sequences=false "
                    "(token-budget micro-batches still cut the padding to each micro-batch's longest row)"
                )
        config = getattr(_unwrap(chunk), "config", None)
        if config is not None and getattr(config, "context_parallel_size", 1) > 1:
            raise ValueError(
                "trainer.pack_sequences=true with parallel.context > 1 is not supported: context parallelism would "
                "split every packed sequence into 2 x context chunks (verl's layout); use parallel.context=1"
            )


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk
