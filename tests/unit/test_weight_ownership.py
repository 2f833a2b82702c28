"""Which copy of a replicated weight piece a push sends: a hash of its names, the same on every rank, spread
over the copies (docs/benchmarks.md: one replica sending everything makes its links the bottleneck)."""

from __future__ import annotations

import collections

from sapo_megatron.bridge.qwen3_moe import _owner


def _names(layers: int = 48) -> list[tuple[str, ...]]:
    names = [("model.embed_tokens.weight",), ("model.norm.weight",), ("lm_head.weight",)]
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        names += [(f"{prefix}.input_layernorm.weight",), (f"{prefix}.post_attention_layernorm.weight",),
                  (f"{prefix}.self_attn.q_norm.weight",), (f"{prefix}.self_attn.k_norm.weight",),
                  (f"{prefix}.self_attn.o_proj.weight",), (f"{prefix}.mlp.gate.weight",),
                  (f"{prefix}.self_attn.q_proj.weight", f"{prefix}.self_attn.k_proj.weight",
                   f"{prefix}.self_attn.v_proj.weight")]
    return names


def test_one_copy_owns_each_piece_and_it_does_not_depend_on_who_asks():
    for copies in (1, 2, 4, 32):
        owners = [_owner(n, copies, "dp") for n in _names()]
        assert all(0 <= o < copies for o in owners)
        assert owners == [_owner(n, copies, "dp") for n in _names()]  # deterministic: every rank agrees
    assert {_owner(n, 1, "dp") for n in _names()} == {0}


def test_the_pieces_spread_over_the_copies():
    names = _names()
    for copies in (2, 4, 8):
        counts = collections.Counter(_owner(n, copies, "dp") for n in names)
        assert sorted(counts) == list(range(copies))
        # 339 pieces: each copy owns within a third of its fair share (a fixed hash; the numbers are exact).
        fair = len(names) / copies
        assert all(abs(c - fair) < fair / 3 for c in counts.values()), counts


def test_tensor_and_data_parallel_choices_are_independent():
    names = _names()
    pairs = collections.Counter((_owner(n, 2, "tp"), _owner(n, 2, "dp")) for n in names)
    assert len(pairs) == 4  # not every piece owned by the same (tp, dp) corner
