"""The MoE routing record: the experts that some positions of a data-parallel share's rows went to, compactly.

A routing says, for a token position of a sequence and each MoE layer (MoE layers in model order, dense layers
skipped), which ``topk`` experts routed it. Positions are those of a
:class:`~sapo_megatron.actor.batch.TrainBatch`: the routing at position ``t`` is the one of the forward pass over
token ``t``, which produced the logits (and log-prob) at ``t``. Two layouts carry it:

- **dense**: an integer tensor ``[rows, seq, num_moe_layers, topk]``, ``-1`` (:data:`UNRECORDED`) where nothing was
  recorded. Simple, but at the Qwen3-30B-A3B recipe's size (2,048 sequences x 9,217 positions x 48 layers x top-8)
  one int32 tensor is 29 GB, most of it prompt positions, right padding and the sentinel's width.
  Only ever built for one micro-batch, one chunk of rows, or a small test batch.
- **record** (:class:`RoutingRecord`): only the recorded tokens, packed row after row, each with its position:
  ``experts [T, num_moe_layers, topk]`` in the smallest dtype that holds every expert id
  (:func:`routing_dtype`: uint8 up to 256 experts, int16 up to 32,768), ``positions [T]`` int32 and
  ``offsets [rows + 1]`` int64 (row ``b``'s tokens are ``offsets[b]:offsets[b + 1]``, positions ascending).
  Nothing is unrecorded inside a record, so uint8 needs no room for ``-1``: a position missing from its row is
  unrecorded. :meth:`RoutingRecord.dense` gives the dense layout back, bit for bit at the recorded positions.

Why a position per token, not one start per row (a row's span ``start .. start + count``): the sampled capture
(:func:`sample_positions`) keeps scattered tokens, which spans cannot describe. The position costs 4 bytes next to
the ``num_moe_layers x topk`` bytes of the token's experts (384 for Qwen3-30B-A3B: 1%).

Which positions a record holds is the producer's choice (a bool ``[rows, seq]`` mask):

- the **response positions** (the loss mask) when the record only feeds diagnostics: nothing reads another
  position's routing;
- :func:`replay_positions` (every position up to the row's last loss position, the prompt included) when the record
  is replayed: the prompt's routing shapes the hidden states the response positions attend to;
- :func:`sample_positions`: at most ``N`` of the response positions per data-parallel rank, chosen by a seeded hash of
  (global row index, position), so that every record built from the same mask holds the same tokens
  (``diagnostics.routing_sample_tokens``).

Next to a record the actor keeps each token's router entropy (:func:`softmax_entropy`); it is defined here so that
the actor's recording and the diagnostics compute the same number.

A dense routing is checked by :func:`check_routing`, for the diagnostics and for a replay alike.

Pure torch, no Megatron or vLLM: the actor, the rollout engines and the diagnostics all import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sapo_megatron.algorithms.inputs import as_valid_mask, check_tensor, shape_of

UNRECORDED = -1
POSITION_DTYPE = torch.int32
OFFSET_DTYPE = torch.int64
# Ids densified at once when a whole record is checked (:meth:`RoutingRecord.check_values`): 128 MiB as int64.
CHECK_CHUNK_IDS = 1 << 24

_UINT8_EXPERTS = 256
_INT16_EXPERTS = 1 << 15


def routing_dtype(num_experts: int) -> torch.dtype:
    """The compact dtype of expert ids ``0 .. num_experts - 1``: uint8 up to 256 experts, int16 up to 32,768."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r}: must be the (int >= 1) number of routed experts per layer")
    if num_experts <= _UINT8_EXPERTS:
        return torch.uint8
    if num_experts <= _INT16_EXPERTS:
        return torch.int16
    raise ValueError(
        f"num_experts={num_experts}: routing records hold expert ids as int16, which stops at {_INT16_EXPERTS} experts"
    )


def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def token_slots(offsets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The token indices of ``rows`` (int64 row indices, in that order) in a record with these ``offsets``."""
    starts = offsets[rows]
    counts = offsets[rows + 1] - starts
    into = _exclusive_cumsum(counts)
    total = int(into[-1])
    return torch.repeat_interleave(starts - into[:-1], counts, output_size=total) + torch.arange(total)


def _check_mask(mask: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool [rows, seq] tensor, got {shape}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got dtype {mask.dtype}")
    return mask


def check_routing(
    routing,
    mask=None,
    *,
    name: str = "routing",
    num_experts: Optional[int] = None,
    shape: Optional[tuple[int, int, int, int]] = None,
    whole_topk: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates a dense routing ``[batch, seq, layers, topk]`` of integer expert ids at the valid positions of
    ``mask`` (bool or 0/1 ``[batch, seq]``; every position when ``None``); returns ``(valid [batch, seq],
    recorded [batch, seq, layers])``, ``recorded`` true where a valid token's ``topk`` ids in that layer are all
    ``>= 0``.

    Ids are ``>= 0``, below ``num_experts`` when it is given, and distinct within a recorded top-k; ``-1``
    (:data:`UNRECORDED`) marks a (token, layer) without a routing, and one ``-1`` makes the whole top-k unrecorded.
    ``whole_topk`` (a replay, which replays a top-k whole or routes the token itself) refuses a top-k that mixes
    ``-1`` with ids; ``shape`` is the exact shape the caller needs. One device synchronisation for all value
    checks; masked positions are not checked. The diagnostics and the actor's routing replay both check here.
    """
    routing = check_tensor(routing, name)
    if routing.dim() != 4:
        raise ValueError(f"{name} must be [batch, seq, layers, topk] expert ids, got shape {shape_of(routing)}")
    if routing.dtype == torch.bool or routing.is_floating_point() or routing.is_complex():
        raise ValueError(f"{name} must hold integer expert ids, got dtype {routing.dtype}; convert with .long()")
    if shape is not None and shape_of(routing) != tuple(shape):
        raise ValueError(
            f"{name} has shape {shape_of(routing)}; expected [batch, seq, num_moe_layers, topk] = {tuple(shape)}"
        )
    if routing.shape[2] == 0 or routing.shape[3] == 0:
        raise ValueError(f"{name} has shape {shape_of(routing)}; it needs at least one layer and topk >= 1")
    if mask is None:
        valid = torch.ones(routing.shape[:2], dtype=torch.bool, device=routing.device)
    else:
        valid = as_valid_mask(mask, shape_of(routing)[:2], shape_name=f"{name}[..., 0, 0]")
    routing = routing.long()
    slot_valid = valid[:, :, None, None]
    unrecorded = routing == UNRECORDED
    recorded = valid[:, :, None] & (routing >= 0).all(dim=-1)
    ordered = routing.sort(dim=-1).values
    # A top-k set has distinct experts; a repeated id would make |A & B| count one expert twice.
    duplicate = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(dim=-1) & recorded
    checks = [((routing < UNRECORDED) & slot_valid).sum(), duplicate.sum()]
    if num_experts is not None:
        checks.append(((routing >= num_experts) & slot_valid).sum())
    if whole_topk:
        checks.append((valid[:, :, None] & unrecorded.any(dim=-1) & ~unrecorded.all(dim=-1)).sum())
    counts = torch.stack(checks).tolist()
    if counts[0]:
        raise ValueError(
            f"{name} holds {counts[0]} id(s) below -1 at valid positions; expert ids are >= 0, and -1 marks "
            f"an unrecorded routing"
        )
    if counts[1]:
        raise ValueError(
            f"{name} repeats an expert within the top-k of {counts[1]} (token, layer) pair(s); each top-k must "
            f"hold distinct experts (check the routing capture)"
        )
    if num_experts is not None and counts[2]:
        raise ValueError(
            f"{name} holds {counts[2]} id(s) >= num_experts={num_experts}, outside [0, {num_experts}); expert ids "
            f"index the model's routed experts"
        )
    if whole_topk and counts[-1]:
        raise ValueError(
            f"{name}: {counts[-1]} (token, layer) entries mix -1 with expert ids; a replayed top-k is either fully "
            f"given or fully -1 (route normally)"
        )
    return valid, recorded


@dataclass(frozen=True, eq=False)
class RoutingRecord:
    """The routing of some positions of ``rows`` sequences, packed (see the module docstring).

    ``experts`` ``[T, num_moe_layers, topk]`` in :func:`routing_dtype` ``(num_experts)``; ``positions`` ``[T]`` int32,
    strictly ascending within a row; ``offsets`` ``[rows + 1]`` int64 from 0 to ``T``. Token ``j`` of row ``b``
    (``offsets[b] <= j < offsets[b + 1]``) is position ``positions[j]`` of sequence ``b``. The ids of a token are in
    the order their producer gave them (the actor: the router's; vLLM: ascending); consumers compare sets.
    Construction checks the layout; :meth:`check_values` checks the ids.
    """

    experts: torch.Tensor
    positions: torch.Tensor
    offsets: torch.Tensor
    num_experts: int

    def __post_init__(self) -> None:
        dtype = routing_dtype(self.num_experts)
        experts, positions, offsets = self.experts, self.positions, self.offsets
        if not all(isinstance(t, torch.Tensor) for t in (experts, positions, offsets)):
            raise ValueError("RoutingRecord: experts, positions and offsets must be tensors")
        if experts.dim() != 3 or experts.shape[1] == 0 or experts.shape[2] == 0:
            raise ValueError(
                f"RoutingRecord.experts must be [tokens, num_moe_layers, topk] with layers and topk >= 1, "
                f"got shape {tuple(experts.shape)}"
            )
        if experts.dtype != dtype:
            raise ValueError(
                f"RoutingRecord.experts has dtype {experts.dtype}; {self.num_experts} experts are held as {dtype}"
            )
        tokens = experts.shape[0]
        if positions.dtype != POSITION_DTYPE or tuple(positions.shape) != (tokens,):
            raise ValueError(
                f"RoutingRecord.positions must be {POSITION_DTYPE} [{tokens}], got {positions.dtype} "
                f"{tuple(positions.shape)}"
            )
        if offsets.dtype != OFFSET_DTYPE or offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError(
                f"RoutingRecord.offsets must be int64 [rows + 1], got {offsets.dtype} {tuple(offsets.shape)}"
            )
        if int(offsets[0]) != 0 or int(offsets[-1]) != tokens or bool((offsets.diff() < 0).any()):
            raise ValueError(f"RoutingRecord.offsets must rise from 0 to the {tokens} tokens")
        if tokens:
            if int(positions.min()) < 0:
                raise ValueError("RoutingRecord.positions must be >= 0")
            row_start = torch.zeros(tokens, dtype=torch.bool, device=positions.device)
            row_start[offsets[:-1][offsets[:-1] < tokens]] = True
            rising = positions[1:] > positions[:-1]
            if not bool((rising | row_start[1:]).all()):
                raise ValueError("RoutingRecord.positions must rise strictly within each row")

    # -- shape ------------------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def topk(self) -> int:
        return self.experts.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of the three tensors: ``T x layers x topk x itemsize + 4 T + 8 (rows + 1)``."""
        return sum(t.numel() * t.element_size() for t in (self.experts, self.positions, self.offsets))

    def counts(self) -> torch.Tensor:
        """Recorded tokens per row, int64 ``[rows]``."""
        return self.offsets.diff()

    def row_index(self) -> torch.Tensor:
        """The row of every token, int64 ``[T]``."""
        return torch.repeat_interleave(torch.arange(self.rows, device=self.offsets.device), self.counts())

    def __repr__(self) -> str:
        return (
            f"RoutingRecord(rows={self.rows}, tokens={self.num_tokens}, layers={self.num_layers}, topk={self.topk}, "
            f"num_experts={self.num_experts}, dtype={self.experts.dtype}, nbytes={self.nbytes})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingRecord):
            return NotImplemented
        return (
            self.num_experts == other.num_experts
            and torch.equal(self.offsets, other.offsets)
            and torch.equal(self.positions, other.positions)
            and self.experts.shape == other.experts.shape
            and torch.equal(self.experts, other.experts)
        )

    __hash__ = None  # type: ignore[assignment]

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def empty(cls, rows: int, num_layers: int, topk: int, num_experts: int) -> "RoutingRecord":
        return cls(
            torch.empty((0, num_layers, topk), dtype=routing_dtype(num_experts)),
            torch.empty(0, dtype=POSITION_DTYPE),
            torch.zeros(rows + 1, dtype=OFFSET_DTYPE),
            num_experts,
        )

    @classmethod
    def from_dense(cls, dense: torch.Tensor, positions: torch.Tensor, num_experts: int) -> "RoutingRecord":
        """The ``positions`` (bool ``[rows, seq]``) of a dense routing ``[rows, seq, layers, topk]``; each of them
        must hold ``topk`` ids in ``[0, num_experts)``."""
        if not isinstance(dense, torch.Tensor) or dense.dim() != 4:
            raise ValueError("from_dense: the routing must be a [rows, seq, num_moe_layers, topk] tensor")
        if dense.dtype == torch.bool or dense.is_floating_point() or dense.is_complex():
            raise ValueError(f"from_dense: the routing must hold integer expert ids, got dtype {dense.dtype}")
        positions = _check_mask(positions, "from_dense(positions)")
        if tuple(positions.shape) != tuple(dense.shape[:2]):
            raise ValueError(
                f"from_dense: positions has shape {tuple(positions.shape)}, the routing "
                f"{tuple(dense.shape[:2])} rows x seq"
            )
        dtype = routing_dtype(num_experts)
        kept = dense[positions.to(dense.device)]
        outside = int(((kept < 0) | (kept >= num_experts)).sum())
        if outside:
            raise ValueError(
                f"from_dense: {outside} id(s) at the given positions are outside [0, {num_experts}) (-1 = unrecorded "
                "cannot be recorded; leave such positions out of positions)"
            )
        return cls(
            kept.to(dtype).cpu(),
            positions.nonzero()[:, 1].to(POSITION_DTYPE).cpu(),
            _exclusive_cumsum(positions.sum(dim=1).to(OFFSET_DTYPE)).cpu(),
            num_experts,
        )

    @classmethod
    def from_sequences(
        cls, per_row: Sequence[torch.Tensor], positions: Optional[torch.Tensor], num_experts: int
    ) -> "RoutingRecord":
        """One row per tensor of ``per_row`` (``[n_i, layers, topk]``, row ``t`` = position ``t``: a rollout
        engine's routed experts), keeping ``positions`` (bool ``[rows, seq]``; ``None`` = all ``n_i`` of each).
        Every kept position must be one the engine routed (``< n_i``); ids must lie in ``[0, num_experts)``."""
        if len(per_row) == 0:
            raise ValueError("from_sequences: no rows")
        first = per_row[0]
        if not isinstance(first, torch.Tensor) or first.dim() != 3:
            raise ValueError(
                f"from_sequences: row 0 must be a [tokens, layers, topk] tensor, got {type(first).__name__}"
            )
        layers, topk = first.shape[1:]
        if positions is not None:
            positions = _check_mask(positions, "from_sequences(positions)")
            if positions.shape[0] != len(per_row):
                raise ValueError(
                    f"from_sequences: positions has {positions.shape[0]} rows for {len(per_row)} sequences"
                )
        dtype = routing_dtype(num_experts)
        experts, kept_positions, counts = [], [], []
        for i, routed in enumerate(per_row):
            if not isinstance(routed, torch.Tensor) or routed.dim() != 3 or tuple(routed.shape[1:]) != (layers, topk):
                shape = tuple(routed.shape) if isinstance(routed, torch.Tensor) else type(routed).__name__
                raise ValueError(
                    f"from_sequences: row {i} has shape {shape}; every row needs [tokens, {layers}, {topk}]"
                )
            if routed.dtype == torch.bool or routed.is_floating_point() or routed.is_complex():
                raise ValueError(f"from_sequences: row {i} must hold integer expert ids, got dtype {routed.dtype}")
            if positions is None:
                index = torch.arange(routed.shape[0])
            else:
                index = positions[i].nonzero()[:, 0]
                if index.numel() and int(index[-1]) >= routed.shape[0]:
                    raise ValueError(
                        f"from_sequences: row {i} keeps position {int(index[-1])}, but its routing covers only "
                        f"{routed.shape[0]} positions"
                    )
            experts.append(routed[index.to(routed.device)].cpu())
            kept_positions.append(index.to(POSITION_DTYPE))
            counts.append(index.numel())
        kept = torch.cat(experts)
        if kept.numel():
            low, high = int(kept.min()), int(kept.max())
            if low < 0 or high >= num_experts:
                raise ValueError(f"from_sequences: expert ids span [{low}, {high}], outside [0, {num_experts})")
        return cls(
            kept.to(dtype),
            torch.cat(kept_positions),
            _exclusive_cumsum(torch.tensor(counts, dtype=OFFSET_DTYPE)),
            num_experts,
        )

    @staticmethod
    def concat(records: Sequence["RoutingRecord"]) -> "RoutingRecord":
        """The rows of ``records`` one after another (same layers, topk and number of experts)."""
        if len(records) == 0:
            raise ValueError("RoutingRecord.concat: no records")
        first = records[0]
        for r in records:
            if (r.num_layers, r.topk, r.num_experts) != (first.num_layers, first.topk, first.num_experts):
                raise ValueError(
                    "RoutingRecord.concat: records differ in layers, topk or number of experts: "
                    f"{(r.num_layers, r.topk, r.num_experts)} vs {(first.num_layers, first.topk, first.num_experts)}"
                )
        if len(records) == 1:
            return first
        starts = _exclusive_cumsum(torch.tensor([r.num_tokens for r in records], dtype=OFFSET_DTYPE))
        offsets = torch.cat([records[0].offsets[:1]] + [r.offsets[1:] + s for r, s in zip(records, starts)])
        return RoutingRecord(
            torch.cat([r.experts for r in records]),
            torch.cat([r.positions for r in records]),
            offsets,
            first.num_experts,
        )

    # -- selection ----------------------------------------------------------------------------------------------
    def _row_indices(self, rows) -> torch.Tensor:
        """``rows`` (an int, a slice, a sequence or a 1-d int / bool tensor) as int64 row indices."""
        if isinstance(rows, int):
            rows = [rows]
        index = torch.arange(self.rows)[rows] if not isinstance(rows, torch.Tensor) else rows
        if index.dtype == torch.bool:
            if tuple(index.shape) != (self.rows,):
                raise ValueError(f"select: a bool row mask needs {self.rows} entries, got {tuple(index.shape)}")
            index = index.nonzero()[:, 0]
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1).cpu()
        if index.numel() and (int(index.min()) < -self.rows or int(index.max()) >= self.rows):
            raise ValueError(f"select: row indices outside the record's {self.rows} rows")
        return index % max(self.rows, 1)

    def token_index(self, rows) -> torch.Tensor:
        """The token indices of ``rows`` (in the given row order), int64; what :meth:`select` copies."""
        return token_slots(self.offsets.cpu(), self._row_indices(rows))

    def select(self, rows) -> "RoutingRecord":
        """A record of ``rows`` (an int, a slice, a sequence or a 1-d tensor of indices, repeats allowed, or a bool
        row mask), in that order; a copy."""
        index = self._row_indices(rows)
        offsets = self.offsets.cpu()
        counts = offsets[index + 1] - offsets[index]
        tokens = self.token_index(index).to(self.experts.device)
        return RoutingRecord(
            self.experts.index_select(0, tokens),
            self.positions.index_select(0, tokens),
            _exclusive_cumsum(counts).to(self.offsets.device),
            self.num_experts,
        )

    def restricted(self, positions: torch.Tensor) -> "RoutingRecord":
        """Only the tokens whose (row, position) is true in ``positions`` (bool ``[rows, width]``; positions at or
        past ``width`` are dropped)."""
        positions = _check_mask(positions, "restricted(positions)")
        if positions.shape[0] != self.rows:
            raise ValueError(f"restricted: positions has {positions.shape[0]} rows, the record {self.rows}")
        return self._keep(self._in_mask(positions))

    def truncated(self, width: int) -> "RoutingRecord":
        """Only the tokens at positions ``< width``."""
        keep = self.positions < width
        return self if bool(keep.all()) else self._keep(keep)

    def _in_mask(self, positions: torch.Tensor) -> torch.Tensor:
        inside = self.positions.long() < positions.shape[1]
        keep = torch.zeros(self.num_tokens, dtype=torch.bool, device=self.positions.device)
        rows = self.row_index()[inside]
        keep[inside] = positions.to(self.positions.device)[rows, self.positions.long()[inside]]
        return keep

    def _keep(self, keep: torch.Tensor) -> "RoutingRecord":
        per_row = torch.zeros(self.rows, dtype=OFFSET_DTYPE, device=self.offsets.device)
        per_row.index_add_(0, self.row_index()[keep], torch.ones(int(keep.sum()), dtype=OFFSET_DTYPE))
        return RoutingRecord(self.experts[keep], self.positions[keep], _exclusive_cumsum(per_row), self.num_experts)

    # -- views ---------------------------------------------------------------------------------------------------
    def positions_mask(self, width: int) -> torch.Tensor:
        """The recorded positions as bool ``[rows, width]``; every recorded position must be ``< width``."""
        self._check_width(width)
        mask = torch.zeros(self.rows, width, dtype=torch.bool)
        mask[self.row_index().cpu(), self.positions.long().cpu()] = True
        return mask

    def dense(self, width: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """The dense routing ``[rows, width, layers, topk]`` in ``dtype`` (signed), ``-1`` where nothing is recorded.

        Its size is the dense layout's: call it for a micro-batch or a chunk of rows, never for a whole share."""
        if dtype.is_floating_point or dtype in (torch.bool, torch.uint8) or dtype.is_complex:
            raise ValueError(f"dense(dtype={dtype}): needs a signed integer dtype to hold -1 (unrecorded)")
        self._check_width(width)
        out = torch.full(
            (self.rows, width, self.num_layers, self.topk), UNRECORDED, dtype=dtype, device=self.experts.device
        )
        out[self.row_index().to(out.device), self.positions.long().to(out.device)] = self.experts.to(dtype)
        return out

    def _check_width(self, width: int) -> None:
        if self.num_tokens and int(self.positions.max()) >= width:
            raise ValueError(f"the record holds position {int(self.positions.max())}, outside a width of {width}")

    # -- checks ----------------------------------------------------------------------------------------------
    def check_values(self, name: str = "routing") -> None:
        """Raises ``ValueError`` unless every token holds ``topk`` distinct ids in ``[0, num_experts)``."""
        chunk = max(1, CHECK_CHUNK_IDS // (self.num_layers * self.topk))
        for start in range(0, self.num_tokens, chunk):
            ids = self.experts[start : start + chunk].long()
            bad = int(((ids < 0) | (ids >= self.num_experts)).sum())
            if bad:
                raise ValueError(f"{name}: {bad} ids outside [0, {self.num_experts})")
            ordered = ids.sort(dim=-1).values
            repeated = int((ordered[..., 1:] == ordered[..., :-1]).any(-1).sum())
            if repeated:
                raise ValueError(f"{name}: {repeated} (token, layer) entries repeat an expert within the top-k")


# -- which positions a record holds -----------------------------------------------------------------------------


def replay_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Every position up to and including each row's last loss position, bool ``[rows, seq]``: what a routing
    replay needs (a row without loss positions needs none)."""
    loss_mask = _check_mask(loss_mask, "loss_mask")
    width = loss_mask.shape[1]
    if width == 0:
        return loss_mask.clone()
    # 1 + the index of the last loss position, 0 for a row without one.
    after_last = (loss_mask.to(torch.int64) * torch.arange(1, width + 1)).amax(dim=1)
    return torch.arange(width)[None, :] < after_last[:, None]


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for ``x`` in ``[0, 2^32)`` without leaving int64 (each partial product stays < 2^48)."""
    low = (x & 0xFFFF) * c
    high = (((x >> 16) * c) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32, C. Wellons): every input bit reaches every output bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_key(seed: int, step: int, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The sampling priority of (global row index, position) pairs, int64 in ``[0, 2^32)``: a hash of
    ``(seed, step, row, position)`` that depends on nothing else."""
    key = torch.full_like(rows, int(_mix32(torch.tensor(seed & _MASK32))), dtype=torch.int64)
    for part in (torch.full_like(key, step & _MASK32), rows.to(torch.int64), positions.to(torch.int64)):
        key = _mix32(key ^ (part & _MASK32))
    return key


def sample_positions(
    loss_mask: torch.Tensor, row_ids: torch.Tensor, max_tokens: int, *, seed: int, step: int = 0
) -> torch.Tensor:
    """At most ``max_tokens`` of the loss positions of ``loss_mask`` (bool ``[rows, seq]``, a data-parallel rank's
    share), bool ``[rows, seq]``; ``max_tokens=0`` keeps them all.

    The kept ones are those with the smallest :func:`sample_key` of ``(seed, step, row_ids[b], position)``
    (``row_ids``: the global row index of each share row), ties in row-major order: a uniform sample without
    replacement that does not depend on which pass records it, so the rollout record, the old pass's record and the
    update's records of a step, all built with this mask, pair the same tokens.
    """
    loss_mask = _check_mask(loss_mask, "loss_mask")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens={max_tokens!r}: must be an int >= 0 (0 = every loss position)")
    row_ids = torch.as_tensor(row_ids, dtype=torch.int64)
    if tuple(row_ids.shape) != (loss_mask.shape[0],):
        raise ValueError(f"row_ids has shape {tuple(row_ids.shape)}; give one global row index per row of loss_mask")
    candidates = loss_mask.nonzero()
    if max_tokens == 0 or candidates.shape[0] <= max_tokens:
        return loss_mask.clone()
    key = sample_key(seed, step, row_ids[candidates[:, 0]], candidates[:, 1])
    chosen = candidates[torch.argsort(key, stable=True)[:max_tokens]]
    out = torch.zeros_like(loss_mask)
    out[chosen[:, 0], chosen[:, 1]] = True
    return out


# -- router entropy -------------------------------------------------------------------------------------------


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` over the last dim, ``0 log 0 = 0``: an expert with a ``-inf`` logit
    adds nothing (its ``0 * -inf`` would be NaN). No checks: callers pass valid rows."""
    log_probs = torch.log_softmax(logits, dim=-1)
    return distribution_entropy(log_probs.exp(), log_probs)


def distribution_entropy(probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """``-sum p log p`` over the last dim from both forms of a distribution, ``0 log 0 = 0``."""
    return -torch.where(probs > 0, probs * log_probs, 0.0).sum(dim=-1)
