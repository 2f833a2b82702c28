"""`sapo-megatron convert`: a dist-checkpoint saved under TP2 x PP2 x EP2 (4 processes, expert_tensor=1,
sequence parallelism) becomes a Hugging Face directory whose weights are bit-identical to the trained
model's unsharded export and whose transformers logits match megatron's.

Three processes in turn: the 4-rank training job (worker_checkpoint_convert.py train), the conversion
(the CLI, one process), transformers on the result (worker_checkpoint_convert.py transformers, never
imports megatron). Bad input is checked in this process: it fails before megatron is imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sapo_megatron.actor.checkpoint import FORMAT
from sapo_megatron.cli import main as cli_main
from sapo_megatron.convert import parse_size
from sapo_megatron.launch import run_torchrun

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
JOB_TIMEOUT_S = 300
LAYOUT = "tp2-pp2-ep2-etp1-alltoall"
# Below a third of the tiny model (1.2 MB in fp32): the export is split over several files plus an index.
MAX_SHARD_BYTES = 400_000


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert-trained")
    script = str(HERE / "worker_checkpoint_convert.py")
    run_torchrun([script, "train", str(tiny_model_dir), str(out), LAYOUT], 4, timeout=JOB_TIMEOUT_S).check()
    return out


@pytest.fixture(scope="module")
def converted(trained):
    out = trained / "hf"
    command = [sys.executable, "-m", "sapo_megatron.cli", "convert", str(trained / "checkpoints"), str(out)]
    result = subprocess.run(
        command + ["--max-shard-bytes", str(MAX_SHARD_BYTES)],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"wrote {out}" in result.stdout
    return out


def _load_sharded(directory: Path) -> tuple[dict, dict]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = {}
    for name in sorted(set(index["weight_map"].values())):
        shard = load_file(directory / name)
        assert all(index["weight_map"][key] == name for key in shard), name
        tensors.update(shard)
    return tensors, index


@pytest.mark.distributed
@pytest.mark.slow
def test_converted_weights_equal_the_unsharded_export(tiny_model_dir, trained, converted):
    exported = load_file(trained / "exported.safetensors")
    weights, index = _load_sharded(converted)
    assert sorted(weights) == sorted(exported)
    for name, tensor in exported.items():
        assert weights[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(weights[name], tensor), f"{name} differs from the trained model's export"
    files = sorted(p.name for p in converted.glob("*.safetensors"))
    assert len(files) == 3 and files == sorted(set(index["weight_map"].values()))
    assert all((converted / name).stat().st_size <= MAX_SHARD_BYTES + 10_000 for name in files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in exported.values())
    # The model that was converted is the trained one, not the initial weights.
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert sorted(initial) == sorted(exported)
    assert all(not torch.equal(initial[name], exported[name]) for name in initial)


@pytest.mark.distributed
@pytest.mark.slow
def test_converted_directory_loads_in_transformers(tiny_model_dir, trained, converted):
    from transformers import AutoTokenizer, GenerationConfig

    reference = trained / "megatron_logits.pt"
    logits_file = trained / "transformers_logits.pt"
    script = str(HERE / "worker_checkpoint_convert.py")
    job = [script, "transformers", str(converted), str(logits_file), str(reference)]
    run_torchrun(job, 1, timeout=JOB_TIMEOUT_S).check()
    megatron = torch.load(reference)["logits"]
    hf = torch.load(logits_file)["logits"]
    assert hf.shape == megatron.shape == (4, 11, 320)
    # Measured 3.3e-7 (logits up to 0.67; megatron under TP2 x PP2 x EP2).
    torch.testing.assert_close(hf, megatron, rtol=0, atol=1e-6)

    source = Path(tiny_model_dir)
    assert (converted / "config.json").read_text() == (source / "config.json").read_text()
    text = "reverse: abc<|endoftext|>"
    assert AutoTokenizer.from_pretrained(converted)(text) == AutoTokenizer.from_pretrained(source)(text)
    assert GenerationConfig.from_pretrained(converted) == GenerationConfig.from_pretrained(source)


def _fake_checkpoint(root: Path, tiny_model_dir, **meta_changes) -> Path:
    """A checkpoint root that passes every check up to the point where megatron would load it."""
    step_dir = root / "step_000003"
    (step_dir / "dist").mkdir(parents=True)
    (step_dir / "hf").mkdir()
    (step_dir / "hf" / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    meta = {"format": FORMAT, "version": 1, "step": 3, "model_type": "qwen3_moe", "layer_spec": "local"}
    (step_dir / "meta.json").write_text(json.dumps({**meta, **meta_changes}))
    (root / "latest").write_text("step_000003\n")
    return root


def _convert(args: list[str], capsys) -> tuple[int, str]:
    code = cli_main(["convert", *map(str, args)])
    return code, capsys.readouterr().err


def test_convert_refuses_bad_input(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _convert([tmp_path / "missing", out], capsys)
    assert code == 2 and "checkpoint directory" in err and "does not exist" in err
    # A Hugging Face model directory is not a checkpoint.
    code, err = _convert([tiny_model_dir, out], capsys)
    assert code == 2 and "is not a checkpoint directory" in err
    (tmp_path / "empty").mkdir()
    code, err = _convert([tmp_path / "empty", out], capsys)
    assert code == 2 and "holds no checkpoint" in err

    llama = _fake_checkpoint(tmp_path / "llama", tiny_model_dir, model_type="llama")
    code, err = _convert([llama, out], capsys)
    assert code == 2 and "holds a 'llama' model; conversion supports qwen3_moe" in err
    te = _fake_checkpoint(tmp_path / "te", tiny_model_dir, layer_spec="transformer_engine")
    code, err = _convert([te, out], capsys)
    assert code == 2 and "Transformer Engine's layer spec" in err and "--device cuda" in err

    good = _fake_checkpoint(tmp_path / "good", tiny_model_dir)
    code, err = _convert([good, out, "--step", 5], capsys)
    assert code == 2 and "no checkpoint of step 5" in err and "available steps: 3" in err
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, err = _convert([good, out], capsys)
    assert code == 2 and "exists and is not empty" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # Nothing was left next to the output either.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "good", "llama", "out", "te"]


def test_convert_tool_script_has_the_cli_arguments(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), str(tmp_path / "nope"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "convert_to_hf: error: checkpoint directory" in result.stderr and "does not exist" in result.stderr


def test_parse_size():
    assert parse_size("400000") == 400_000
    assert parse_size("500MB") == 500 * 1000**2
    assert parse_size("5GiB") == 5 * 1024**3
    assert parse_size("1.5kb") == 1500
    for bad in ("", "12 parsecs", "0", "-3MB"):
        with pytest.raises(ValueError):
            parse_size(bad)
