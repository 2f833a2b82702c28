"""Conversion against an independent reference: a Hugging Face directory written by transformers itself
(``save_pretrained`` of a randomly initialised Qwen3-MoE whose shape no other test uses, see
worker_convert_independent.py), loaded by the actor under TP2 x PP2 x EP2 (4 processes, sequence
parallelism), saved as a dist-checkpoint and converted back with ``sapo-megatron convert``. The result must
hold exactly the original files' tensors, bit for bit. The bridge's own export plays no part, so a naming or
layout error in the bridge rules cannot cancel out between load and export: the loaded model's logits are
checked against transformers' on the original files (the load direction is right), and the round trip
gives those files back bit for bit (the export is its exact inverse).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sapo_megatron.launch import run_torchrun

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
WORKER = str(HERE / "worker_convert_independent.py")
JOB_TIMEOUT_S = 300
LAYOUT = "tp2-pp2-ep2-etp1-alltoall"
# The loaded model (TP2 x PP2 x EP2) vs transformers on the original files: measured 1.1e-6 at logits up to 1.8.
LOGITS_ATOL = 3e-6


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    assert files, f"no safetensors in {directory}"
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        shard = load_file(path)
        assert not set(shard) & set(tensors), f"{path.name} repeats a tensor"
        tensors.update(shard)
    return tensors


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert-independent")
    original, converted, checkpoints = root / "original", root / "converted", root / "checkpoints"
    run_torchrun([WORKER, "write", str(original)], 1, timeout=JOB_TIMEOUT_S).check()
    run_torchrun([WORKER, "save", str(original), str(checkpoints), LAYOUT], 4, timeout=JOB_TIMEOUT_S).check()
    result = subprocess.run(
        [sys.executable, "-m", "sapo_megatron.cli", "convert", str(checkpoints), str(converted)],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return original, converted


@pytest.mark.distributed
@pytest.mark.slow
def test_the_reference_is_the_shape_it_claims(round_trip):
    from transformers import AutoConfig

    original, _ = round_trip
    config = AutoConfig.from_pretrained(original)
    assert (config.num_hidden_layers, config.num_experts, config.num_experts_per_tok) == (4, 6, 3)
    assert config.head_dim * config.num_attention_heads != config.hidden_size
    assert not config.norm_topk_prob and not config.tie_word_embeddings
    names = set(_tensors(original))
    # transformers writes per-expert tensors, and a dense MLP for layers 0 and 2.
    assert "model.layers.1.mlp.experts.5.down_proj.weight" in names and "model.layers.1.mlp.gate.weight" in names
    assert "model.layers.2.mlp.gate_proj.weight" in names
    assert not any(n.startswith("model.layers.2.mlp.experts.") for n in names)
    # embedding, final norm, head; 8 attention and norm tensors per layer; 3 dense MLP ones; router + 6 x 3.
    assert len(names) == 3 + 4 * 8 + 2 * 3 + 2 * (1 + 6 * 3)


@pytest.mark.distributed
@pytest.mark.slow
def test_round_trip_through_tp2_pp2_ep2_is_bit_identical_to_the_transformers_files(round_trip):
    original, converted = round_trip
    expected, got = _tensors(original), _tensors(converted)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype == torch.float32, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), f"{name} differs from transformers' file"
    assert json.loads((converted / "config.json").read_text()) == json.loads((original / "config.json").read_text())


@pytest.mark.distributed
@pytest.mark.slow
def test_the_loaded_model_computes_transformers_logits(round_trip):
    """A load that put a tensor in the wrong place (e.g. swapped q / k, experts out of order) and an export
    that undid it would still round-trip: the loaded model's forward pass tells them apart."""
    original, _ = round_trip
    expected = torch.load(f"{original}.logits.pt")["logits"]
    logits = torch.load(f"{original.parent / 'checkpoints'}.logits.pt")["logits"]
    assert logits.shape == expected.shape == (4, 11, 384)
    assert float(expected.abs().max()) > 0.5  # not a degenerate model: the logits carry the weights
    torch.testing.assert_close(logits, expected, rtol=0, atol=LOGITS_ATOL)
