"""The actor's batch: token ids with per-position masks, aligned the way Megatron's loss is.

Position ``t`` of every [batch, seq] tensor refers to predicting ``tokens[:, t + 1]`` from the prefix
``tokens[:, :t + 1]`` (the logits at ``t``); ``loss_mask[:, t]`` is True when ``tokens[:, t + 1]`` is a
response token. The last position never predicts anything.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Sequence

import torch


ROUTING_FIELDS = ("routing_rollout", "routing_old")


@dataclass
class TrainBatch:
    tokens: torch.Tensor  # [B, S] int64
    loss_mask: torch.Tensor  # [B, S] bool
    advantages: torch.Tensor  # [B] float32 (one advantage per sequence)
    logprobs_old: Optional[torch.Tensor] = None  # [B, S]
    logprobs_rollout: Optional[torch.Tensor] = None  # [B, S]
    logprobs_ref: Optional[torch.Tensor] = None  # [B, S]
    # The behaviour-policy correction's per-token weights (algorithms.rollout_correction), multiplied into each
    # token's policy-gradient term; None: unweighted.
    rollout_weights: Optional[torch.Tensor] = None  # [B, S]
    # The rows' routing records (sapo_megatron.routing_layout.RoutingRecord, one row per sequence): what the
    # rollout engine routed and what the old-logprob pass routed. select() slices them with the rows; the
    # actor's own padding and narrowing drop them (a pass takes its replay routing as an argument).
    routing_rollout: Any = None
    routing_old: Any = None

    def __post_init__(self):
        if self.tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(self.tokens.shape)}")
        shape = tuple(self.tokens.shape)
        if tuple(self.loss_mask.shape) != shape:
            raise ValueError(f"loss_mask shape {tuple(self.loss_mask.shape)} != tokens shape {shape}")
        if tuple(self.advantages.shape) != shape[:1]:
            raise ValueError(f"advantages must be [batch]={shape[:1]}, got {tuple(self.advantages.shape)}")
        for name in ("logprobs_old", "logprobs_rollout", "logprobs_ref", "rollout_weights"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} shape {tuple(value.shape)} != tokens shape {shape}")
        for name in ROUTING_FIELDS:
            record = getattr(self, name)
            if record is not None and record.rows != shape[0]:
                raise ValueError(f"{name} holds {record.rows} rows, the batch {shape[0]}")
        self.loss_mask = self.loss_mask.bool()

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def labels(self) -> torch.Tensor:
        """``labels[:, t] = tokens[:, t + 1]``; the last position gets token 0 and is never in the mask."""
        labels = torch.zeros_like(self.tokens)
        labels[:, :-1] = self.tokens[:, 1:]
        return labels

    def select(self, index) -> "TrainBatch":
        """The rows ``index`` (a slice or a 1-d index tensor), routing records included."""
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                kwargs[f.name] = None
            elif f.name in ROUTING_FIELDS:
                kwargs[f.name] = value.select(index)
            else:
                kwargs[f.name] = value[index]
        return TrainBatch(**kwargs)

    def without_routing(self) -> "TrainBatch":
        return replace(self, **{name: None for name in ROUTING_FIELDS})

    def with_(self, **changes) -> "TrainBatch":
        return replace(self, **changes)

    def num_valid_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def num_valid_sequences(self) -> int:
        return int(self.loss_mask.any(dim=1).sum())

    def padded_to_multiple(self, multiple: int) -> "TrainBatch":
        """Appends fully masked copies of row 0 so the batch size divides evenly; they add nothing to any loss."""
        extra = (-self.size) % multiple
        if extra == 0:
            return self
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in ROUTING_FIELDS:
                kwargs[f.name] = None
                continue
            pad = value[:1].expand(extra, *value.shape[1:]).clone()
            if f.name == "loss_mask":
                pad.zero_()
            if f.name == "advantages":
                pad.zero_()
            kwargs[f.name] = torch.cat([value, pad], dim=0)
        return TrainBatch(**kwargs)

    def narrowed(self, width: int) -> "TrainBatch":
        """The first ``width`` positions of every [B, S] tensor (a token-budget micro-batch drops the right
        padding it does not need; causal attention leaves the kept positions' logits unchanged)."""
        if not 1 <= width <= self.seq_len:
            raise ValueError(f"width={width}: must be in [1, {self.seq_len}]")
        if width == self.seq_len:
            return self
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ROUTING_FIELDS:
                kwargs[f.name] = None
            else:
                kwargs[f.name] = value if value is None or f.name == "advantages" else value[:, :width]
        return TrainBatch(**kwargs)

    def with_seq_len_multiple(self, multiple: int) -> "TrainBatch":
        """Right-pads every [B, S] tensor so S divides ``multiple``; padded positions are masked out."""
        return self.widened(self.seq_len + (-self.seq_len) % multiple)

    def widened(self, width: int) -> "TrainBatch":
        """Right-pads every [B, S] tensor to ``width`` positions (token 0, masked out); ``width >= seq_len``."""
        if width < self.seq_len:
            raise ValueError(f"widened({width}): the batch is already {self.seq_len} positions wide")
        extra = width - self.seq_len
        if extra == 0:
            return self
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ROUTING_FIELDS:
                kwargs[f.name] = None
            elif value is None or f.name == "advantages":
                kwargs[f.name] = value
            else:
                kwargs[f.name] = torch.nn.functional.pad(value, (0, extra))
        return TrainBatch(**kwargs)


def collate_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
    seq_len: Optional[int] = None,
    response_logprobs: Optional[Sequence[Sequence[float]]] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Right-padded ``prompt + response`` tokens, the response loss mask, and aligned rollout log-probs.

    ``response_logprobs[i][j]`` is the log-prob of response token ``j``, which sits at token position
    ``len(prompt) + j`` and is predicted at position ``len(prompt) + j - 1``.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the first response token is predicted from it)")
    width = max(lengths) if seq_len is None else seq_len
    if max(lengths) > width:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit seq_len={width}")
    batch = len(prompts)
    tokens = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.bool)
    logprobs = torch.zeros((batch, width), dtype=torch.float32) if response_logprobs is not None else None
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        n_prompt, n_resp = len(prompt), len(response)
        tokens[i, :n_prompt] = torch.as_tensor(list(prompt), dtype=torch.long)
        if n_resp:
            tokens[i, n_prompt : n_prompt + n_resp] = torch.as_tensor(list(response), dtype=torch.long)
            mask[i, n_prompt - 1 : n_prompt - 1 + n_resp] = True
            if logprobs is not None:
                if len(response_logprobs[i]) != n_resp:
                    raise ValueError(
                        f"sequence {i}: {len(response_logprobs[i])} rollout log-probs for {n_resp} response tokens"
                    )
                logprobs[i, n_prompt - 1 : n_prompt - 1 + n_resp] = torch.as_tensor(
                    list(response_logprobs[i]), dtype=torch.float32
                )
    return tokens, mask, logprobs
