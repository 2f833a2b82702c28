"""Packed sequences (``trainer.pack_sequences``): the pure parts, on CPU.

The packing plan (``cu_seqlens``, position ids, the rounding tail), the index maps between a micro-batch's
``[rows, width]`` and its packed row (a bit-exact round trip, the unpacking's gradient), the token order that
routing record / replay rely on, the packed token-budget grouping, and the config checks. The model call itself
needs Transformer Engine (tests/distributed/test_packed_sequences.py runs it on CPU through a reference THD
attention, and on a GPU with TE).
"""

from __future__ import annotations

import pytest
import torch

from sapo_megatron.actor.micro_batching import MicroBatchLayout, group_by_token_budget, padded_tokens, row_lengths
from sapo_megatron.actor.packing import SequencePacking, check_packing_environment
from sapo_megatron.config import ConfigError, load_config


def test_plan_cu_seqlens_position_ids_and_tail():
    p = SequencePacking.plan([3, 1, 4], width=5, multiple=4)
    assert (p.num_tokens, p.total, p.tail) == (8, 8, 0)
    assert p.seq_lengths == (3, 1, 4) and p.max_seqlen == 4
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0, 3, 4, 8]
    assert p.position_ids.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert p.index.tolist() == [0, 1, 2, 5, 10, 11, 12, 13]

    # Rounded up for sequence parallelism: the tail is one more sequence, so cu_seqlens ends at the packed length.
    q = SequencePacking.plan([3, 1, 4], width=5, multiple=6)
    assert (q.total, q.tail) == (12, 4)
    assert q.seq_lengths == (3, 1, 4, 4) and q.cu_seqlens.tolist() == [0, 3, 4, 8, 12]
    assert q.position_ids.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 0, 1, 2, 3]
    assert int(q.cu_seqlens[-1]) == q.total == q.position_ids.numel()

    r = SequencePacking.plan([7], width=7, multiple=2)
    assert r.seq_lengths == (7, 1) and r.max_seqlen == 7


def test_plan_refuses_impossible_layouts():
    with pytest.raises(ValueError, match="in \\[1, width=4\\]"):
        SequencePacking.plan([5], width=4)
    with pytest.raises(ValueError, match="in \\[1, width=4\\]"):
        SequencePacking.plan([0, 2], width=4)
    with pytest.raises(ValueError, match="at least one row"):
        SequencePacking.plan([], width=4)
    with pytest.raises(ValueError, match="total=3 < the 4 tokens"):
        SequencePacking(lengths=(2, 2), width=2, total=3)


@pytest.mark.parametrize("multiple", [1, 2, 8])
def test_pack_unpack_round_trip_is_bit_exact(multiple):
    generator = torch.Generator().manual_seed(5)
    lengths = [9, 1, 4, 9, 2]
    p = SequencePacking.plan(lengths, width=9, multiple=multiple)
    keep = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    for values in (
        torch.randn(5, 9, generator=generator, dtype=torch.float32),
        torch.randn(5, 9, 3, 2, generator=generator, dtype=torch.float64),
        torch.randint(0, 1000, (5, 9), generator=generator),
        torch.rand(5, 9, generator=generator) > 0.5,
    ):
        packed = p.pack(values, fill=0)
        assert packed.shape == (p.total, *values.shape[2:]) and packed.dtype == values.dtype
        # The real tokens are the kept positions in row-major order; the tail holds the fill.
        assert torch.equal(packed[: p.num_tokens], values[keep])
        assert bool((packed[p.num_tokens :] == 0).all())
        back = p.unpack(packed, fill=0)
        assert torch.equal(back[keep], values[keep])
        assert bool((back[~keep] == 0).all())


def test_unpack_gradient_lands_on_the_packed_tokens():
    p = SequencePacking.plan([2, 3], width=3, multiple=4)  # 5 tokens + 3 tail
    packed = torch.randn(p.total, requires_grad=True)
    weights = torch.arange(1.0, 7.0).reshape(2, 3)
    (p.unpack(packed, fill=0.0) * weights).sum().backward()
    # Each real token gets the weight of the entry it lands on; position 2 of row 0 and the tail get nothing.
    assert packed.grad.tolist() == [1.0, 2.0, 4.0, 5.0, 6.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_locate_slices_cover_the_real_tokens_in_packed_order(tp):
    lengths = [5, 1, 3, 6]
    p = SequencePacking.plan(lengths, width=6, multiple=tp)
    step = p.total // tp
    rows, positions, reals = [], [], []
    for rank in range(tp):
        real, r, pos = p.locate(rank * step, (rank + 1) * step)
        assert real.shape == (step,) and int(real.sum()) == r.numel() == pos.numel()
        rows.append(r), positions.append(pos), reals.append(real)
    rows, positions = torch.cat(rows), torch.cat(positions)
    assert torch.equal(torch.cat(reals), torch.arange(p.total) < p.num_tokens)
    assert torch.equal(rows * 6 + positions, p.index)
    expected = [(r, t) for r, n in enumerate(lengths) for t in range(n)]
    assert list(zip(rows.tolist(), positions.tolist())) == expected


def test_routing_token_order_maps_packed_order_to_rows_and_positions():
    """What routing record / replay rely on: megatron routes a packed micro-batch in packed order ([s, b], b = 1),
    which visits the kept positions row after row, the order a RoutingRecord stores them in."""
    generator = torch.Generator().manual_seed(11)
    lengths = [6, 2, 5]
    rows, width, layers, topk = 3, 6, 2, 2
    p = SequencePacking.plan(lengths, width, multiple=4)
    # A routing per (row, position), as a dense replay holds it, with -1 beyond each row's length.
    routing = torch.randint(0, 8, (rows, width, layers, topk), generator=generator)
    inside = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    routing[~inside] = -1
    # Replay: the packed routing is what each router gets for its token; the rounding tail routes freely.
    packed = p.pack(routing, fill=-1)
    for t in range(p.num_tokens):
        row, pos = int(p.index[t]) // width, int(p.index[t]) % width
        assert torch.equal(packed[t], routing[row, pos])
    assert bool((packed[p.num_tokens :] == -1).all())
    # Record: keeping a packed token where the packed keep mask is set gives the record's (row, position) order.
    keep = inside & (torch.rand(rows, width, generator=generator) > 0.4)
    kept_packed = packed[p.pack(keep, fill=False)]
    assert torch.equal(kept_packed, routing[keep])
    # Under sequence parallelism (TP 2) each rank records its slice; the slots of its kept tokens in the micro-batch's
    # record are the running count over the packed keep mask.
    keep_packed = p.pack(keep, fill=False)
    slots_all = keep_packed.cumsum(0) - 1
    record = torch.full((int(keep.sum()), layers, topk), -1)
    for rank in range(2):
        start, stop = rank * p.total // 2, (rank + 1) * p.total // 2
        mine = keep_packed[start:stop]
        record[slots_all[start:stop][mine]] = packed[start:stop][mine]
    assert torch.equal(record, routing[keep])


def test_packed_grouping_counts_the_sum_of_lengths():
    lengths = [10, 3, 4, 10, 2, 6]
    # Padded to the longest, the 6-wide group takes three rows (18) and the fourth does not fit; packed, the four
    # short rows cost 15 together.
    assert group_by_token_budget(lengths, 20) == [[0, 3], [1, 2, 5], [4]]
    assert group_by_token_budget(lengths, 20, packed=True) == [[0, 3], [1, 2, 4, 5]]
    assert padded_tokens([1, 2, 4, 5], lengths, packed=True) == 15
    assert padded_tokens([1, 2, 4, 5], lengths, multiple=4, packed=True) == 16
    # A short row still joins a group that turned a longer one away (bin packing, not consecutive runs).
    assert group_by_token_budget([6, 5, 4, 1], 10, packed=True) == [[0, 2], [1, 3]]
    assert group_by_token_budget([6, 5, 4, 1], 11, packed=True) == [[0, 1], [2, 3]]
    # Rounding for sequence parallelism counts: 5 + 4 = 9 -> 12 > 10 with multiple 4.
    assert group_by_token_budget([5, 4], 10, packed=True) == [[0, 1]]
    assert group_by_token_budget([5, 4], 10, multiple=4, packed=True) == [[0], [1]]


@pytest.mark.parametrize("seed", range(5))
def test_packed_grouping_holds_the_budget_and_splits_to_a_count(seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = (torch.randint(1, 40, (23,), generator=generator)).tolist()
    budget, multiple = 64, 2
    groups = group_by_token_budget(lengths, budget, multiple=multiple, packed=True)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) == 1 or padded_tokens(group, lengths, multiple, packed=True) <= budget
    for num_groups in (len(groups), len(groups) + 3, len(lengths)):
        split = group_by_token_budget(lengths, budget, multiple=multiple, packed=True, num_groups=num_groups)
        assert len(split) == num_groups
        assert sorted(i for g in split for i in g) == list(range(len(lengths)))
        assert all(len(g) == 1 or padded_tokens(g, lengths, multiple, packed=True) <= budget for g in split)


def test_layout_model_shapes_are_packed_rows():
    rows = (torch.tensor([0, 2]), torch.tensor([1]))
    packing = (SequencePacking.plan([4, 2], 4, multiple=4), SequencePacking.plan([3], 3, multiple=4))
    layout = MicroBatchLayout(rows=rows, widths=(4, 3), padded_size=3, num_local=3, width=5, packing=packing)
    assert layout.model_shapes() == [(1, 8), (1, 4)] and not layout.uniform
    plain = MicroBatchLayout(rows=rows, widths=(4, 3), padded_size=3, num_local=3, width=5)
    assert plain.model_shapes() == [(2, 4), (1, 3)]
    with pytest.raises(AssertionError):
        MicroBatchLayout(rows=rows, widths=(4, 4), padded_size=3, num_local=3, width=5, packing=packing)


def test_lengths_come_from_the_loss_mask():
    """The actor packs each row's kept length: up to the token after its last loss position."""
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, 2:5] = True  # last loss position 4 -> 6 tokens
    mask[1, 0] = True  # -> 2 tokens
    assert row_lengths(mask).tolist() == [6, 2, 1]


def test_config_refuses_packing_without_budget_gpu_or_with_context_parallel():
    with pytest.raises(ConfigError, match="trainer.pack_sequences=true with trainer.max_tokens_per_micro_batch=0"):
        load_config(None, ["trainer.pack_sequences=true", "trainer.device=cuda"])
    with pytest.raises(ConfigError, match="trainer.pack_sequences=true with trainer.device=cpu"):
        load_config(
            None, ["trainer.pack_sequences=true", "trainer.device=cpu", "trainer.max_tokens_per_micro_batch=4096"]
        )
    with pytest.raises(ConfigError, match="trainer.pack_sequences=true with parallel.context=2"):
        load_config(
            None,
            [
                "trainer.pack_sequences=true",
                "trainer.device=cuda",
                "trainer.max_tokens_per_micro_batch=4096",
                "parallel.context=2",
                "launch.nproc_per_node=2",
            ],
        )
    cfg = load_config(
        None, ["trainer.pack_sequences=true", "trainer.device=cuda", "trainer.max_tokens_per_micro_batch=4096"]
    )
    assert cfg.trainer.pack_sequences and not load_config().trainer.pack_sequences


def test_packing_environment_needs_a_cuda_device():
    with pytest.raises(ConfigError, match="trainer.pack_sequences=true on device 'cpu'"):
        check_packing_environment(torch.device("cpu"))
