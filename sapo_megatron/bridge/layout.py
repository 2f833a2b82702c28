"""Declarative Megatron <-> Hugging Face weight maps, and the tensor algebra of each layout.

A :class:`WeightRule` says which Hugging Face tensors make up one megatron-core parameter and how
(:class:`Layout`). The rules are data; the functions below are the only code that interprets them, and the
same rules serve loading, HF export and weight sync to the rollout engines.

Templates use ``{layer}`` (global layer index, 0-based in both naming schemes) and ``{expert}`` (global
expert id in HF names; in megatron names the id local to the expert-parallel rank).

Tensor-parallel layouts (``full`` is the unsharded megatron tensor, sharded into ``size`` pieces):

- ``REPLICATED``: every rank holds ``full`` (norms, the router).
- ``COLUMN``: row blocks along dim 0 (vocab-parallel embedding / output layer, column-parallel linears).
- ``ROW``: column blocks along dim 1 (row-parallel linears).
- ``QKV``: q, k, v are interleaved per query group, ``[g0: q k v | g1: q k v | ...]``, then split along
  dim 0 (each rank gets whole query groups).
- ``GATE_UP``: ``[gate; up]`` stacked; rank r holds ``[gate_r; up_r]`` so SwiGLU works on each shard.

Expert rules shard over the expert-tensor-parallel group and are distributed over the expert-parallel
group (global expert = ep_rank * experts_per_rank + local expert).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

import torch


class Layout(str, enum.Enum):
    REPLICATED = "replicated"
    COLUMN = "column"
    ROW = "row"
    QKV = "qkv"
    GATE_UP = "gate_up"


@dataclass(frozen=True)
class WeightRule:
    megatron: str
    hf: tuple[str, ...]
    layout: Layout
    expert: bool = False
    # Which layers hold the parameter: all, MoE layers only, dense-MLP layers only, or only with qkv biases.
    when: str = "always"
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.escape(self.megatron)
        regex = regex.replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
        object.__setattr__(self, "pattern", re.compile(regex + "$"))
        assert len(self.hf) == {Layout.QKV: 3, Layout.GATE_UP: 2}.get(self.layout, 1), self
        assert self.when in ("always", "moe", "dense", "qkv_bias"), self


@dataclass(frozen=True)
class AttentionShape:
    """What the QKV layout needs to know about the attention block."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int


def _split_even(tensor: torch.Tensor, parts: int, dim: int) -> list[torch.Tensor]:
    if tensor.shape[dim] % parts:
        raise ValueError(f"cannot split dim {dim} of a {tuple(tensor.shape)} tensor into {parts} equal shards")
    return list(torch.chunk(tensor, parts, dim=dim))


def hf_to_megatron(layout: Layout, hf_tensors: list[torch.Tensor], attention: AttentionShape) -> torch.Tensor:
    """The full (unsharded) megatron tensor built from its HF tensors."""
    if layout is Layout.QKV:
        q, k, v = hf_tensors
        groups, head_dim = attention.num_query_groups, attention.head_dim
        q = q.reshape(groups, -1, *q.shape[1:])
        k = k.reshape(groups, head_dim, *k.shape[1:])
        v = v.reshape(groups, head_dim, *v.shape[1:])
        return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])
    if layout is Layout.GATE_UP:
        return torch.cat(hf_tensors, dim=0)
    (tensor,) = hf_tensors
    return tensor


def megatron_to_hf(layout: Layout, full: torch.Tensor, attention: AttentionShape) -> list[torch.Tensor]:
    """Inverse of :func:`hf_to_megatron`; the results are views of ``full`` where possible."""
    if layout is Layout.QKV:
        groups, head_dim = attention.num_query_groups, attention.head_dim
        q_per_group = attention.num_attention_heads // groups * head_dim
        grouped = full.reshape(groups, q_per_group + 2 * head_dim, *full.shape[1:])
        q, k, v = torch.split(grouped, [q_per_group, head_dim, head_dim], dim=1)
        return [t.reshape(-1, *full.shape[1:]) for t in (q, k, v)]
    if layout is Layout.GATE_UP:
        return list(torch.chunk(full, 2, dim=0))
    return [full]


def shard(layout: Layout, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's piece of ``full`` in a group of ``size`` ranks."""
    if size == 1 or layout is Layout.REPLICATED:
        return full
    if layout is Layout.ROW:
        return _split_even(full, size, 1)[rank]
    if layout is Layout.GATE_UP:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([_split_even(gate, size, 0)[rank], _split_even(up, size, 0)[rank]], dim=0)
    return _split_even(full, size, 0)[rank]


def unshard(layout: Layout, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from all ranks' pieces, in rank order."""
    if len(shards) == 1 or layout is Layout.REPLICATED:
        return shards[0]
    if layout is Layout.ROW:
        return torch.cat(shards, dim=1)
    if layout is Layout.GATE_UP:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)


def full_shape(layout: Layout, shard_shape: torch.Size | tuple[int, ...], size: int) -> tuple[int, ...]:
    """The unsharded shape, from one shard's shape."""
    shape = list(shard_shape)
    if size > 1 and layout is not Layout.REPLICATED:
        shape[1 if layout is Layout.ROW else 0] *= size
    return tuple(shape)
