"""Megatron dist-checkpoint -> Hugging Face directory, in one process.

A checkpoint written by :func:`sapo_megatron.actor.checkpoint.save_checkpoint` under any TP / PP / EP
layout is converted without the cluster that wrote it:

1. the model is built unsharded (world size 1) through the bridge from the checkpoint's own ``hf/``
   config, with no weights loaded;
2. dist_checkpointing loads the saved shards into it (the global tensor names and offsets in the
   checkpoint let it reassemble any layout; the optimizer state is not read);
3. the bridge exports it tensor by tensor into safetensors shards of at most ``max_shard_bytes``, so at
   most one shard is held next to the model, never a second copy of it;
4. config.json, the tokenizer files and generation_config.json come from the checkpoint's ``hf/``.

The result is written into a temporary sibling directory and renamed into place, so an interrupted
conversion never leaves a half-written model behind. ``tools/convert_to_hf.py`` and
``sapo-megatron convert`` are thin command lines over :func:`convert_checkpoint`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from sapo_megatron.bridge import SUPPORTED_MODEL_TYPES
from sapo_megatron.config import ParallelConfig

# torch, megatron-core and the actor are imported inside the functions that convert: the CLI imports this module
# for its arguments, and a bad path fails before paying for them.

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(text: str | int) -> int:
    """Bytes from ``400000``, ``500MB``, ``5GiB`` (decimal units, or binary with an ``i``)."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(text)
        if match is None:
            raise ValueError(f"{text!r} is not a size; write e.g. 400000, 500MB or 5GiB")
        number, unit = match.group(1), (match.group(2) or "").lower()
        scale = _UNITS[unit[:1]]
        if "i" in unit:
            scale = 1024 ** {"k": 1, "m": 2, "g": 3, "t": 4}[unit[0]]
        size = int(float(number) * scale)
    if size <= 0:
        raise ValueError(f"shard size {text!r}: must be > 0 bytes")
    return size


def check_convertible(ckpt_dir: str | os.PathLike, step: Optional[int] = None) -> tuple[Path, dict]:
    """The step directory to convert and its meta, or a ``ValueError`` saying why there is none.

    Needs neither megatron nor a process group, so bad input fails in well under a second.
    """
    from sapo_megatron.actor.checkpoint import HF_SUBDIR, find_checkpoint, read_meta  # torch (module comment)

    path = Path(ckpt_dir)
    if not path.exists():
        raise ValueError(f"checkpoint directory {str(path)!r} does not exist")
    step_dir = find_checkpoint(path, step)
    if step_dir is None:
        raise ValueError(
            f"{str(path)!r} holds no checkpoint: give a checkpoint root (with a 'latest' pointer) or one "
            "step_NNNNNN directory written by save_checkpoint"
        )
    meta = read_meta(step_dir)
    if meta["model_type"] not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{str(step_dir)!r} holds a {meta['model_type']!r} model; conversion supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not (step_dir / HF_SUBDIR / "config.json").is_file():
        raise ValueError(f"{str(step_dir)!r} has no {HF_SUBDIR}/config.json: the checkpoint is incomplete")
    return step_dir, meta


def _prepare_output(out_dir: Path) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"output directory {str(out_dir)!r} exists and is not empty; choose a new path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.converting-", dir=out_dir.parent))


def convert_checkpoint(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    step: Optional[int] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    device: str = "cpu",
) -> Path:
    """Writes the checkpoint in ``ckpt_dir`` (a checkpoint root: its ``latest`` step, or ``step``; or one
    step directory) as a Hugging Face model directory ``out_dir``. Runs in this process, alone.
    """
    import torch

    from sapo_megatron.actor.checkpoint import HF_SUBDIR  # torch (module comment)

    step_dir, meta = check_convertible(ckpt_dir, step)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be > 0")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: use 'cpu' or 'cuda'")
    if meta.get("layer_spec") == "transformer_engine" and device != "cuda":
        raise ValueError(
            f"{str(step_dir)!r} was saved with Transformer Engine's layer spec, whose parameter names the CPU "
            "(local) spec does not share; convert it with --device cuda where transformer-engine is installed"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        raise ValueError("conversion runs in one process of its own: start it without torchrun / a process group")
    out = Path(out_dir)
    tmp = _prepare_output(out)
    try:
        _convert_into(step_dir, meta, tmp, max_shard_bytes=max_shard_bytes, device=device)
        _copy_hf_files(step_dir / HF_SUBDIR, tmp)
        _set_default_permissions(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _convert_into(step_dir: Path, meta: dict, out: Path, *, max_shard_bytes: int, device: str) -> None:
    import torch
    from megatron.core import dist_checkpointing

    # torch and megatron-core (module comment).
    from sapo_megatron.actor.checkpoint import DIST_SUBDIR, HF_SUBDIR, model_sharded_state_dict
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.model import build_model
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed

    compat = MegatronCpuCompat(device)
    installed_here = compat.enabled and MegatronCpuCompat.active_instance() is None
    if installed_here:
        compat.install()
    try:
        parallel = ParallelConfig()
        init_distributed(parallel, device, seed=0)
        try:
            model = build_model(
                step_dir / HF_SUBDIR,
                parallel,
                device=device,
                params_dtype=meta["params_dtype"],
                load_weights=False,
            )
            with torch.no_grad():
                request = model_sharded_state_dict(model.chunks)
                loaded = dist_checkpointing.load(request, str(step_dir / DIST_SUBDIR))
                (chunk,) = model.chunks
                chunk.load_state_dict(loaded["model"], strict=True)
            del loaded, request
            model.bridge.save_weights(model.chunks, out, max_shard_bytes=max_shard_bytes)
        finally:
            destroy_distributed()
    finally:
        if installed_here:
            compat.remove()


def _set_default_permissions(directory: Path) -> None:
    """mkdtemp creates the directory private (0700) and safetensors writes 0600 files; the result should
    be as readable as any file the user creates."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for entry in directory.iterdir():
        os.chmod(entry, 0o666 & ~umask)


def _copy_hf_files(hf_dir: Path, out: Path) -> None:
    """config.json as saved (the bridge's copy is replaced by the original), tokenizer files, and a
    generation_config.json (derived from config.json when the source model had none)."""
    for entry in sorted(hf_dir.iterdir()):
        if entry.is_file():
            shutil.copy2(entry, out / entry.name)
    if not (out / "generation_config.json").is_file():
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(hf_dir))).save_pretrained(str(out))


# ----------------------------------------------------------------------------------------------------------
# Command line (shared by `sapo-megatron convert` and tools/convert_to_hf.py)
# ----------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "ckpt_dir",
        metavar="CKPT_DIR",
        help="a checkpoint root (<run_dir>/checkpoints: converts the 'latest' step) or one step_NNNNNN directory",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face directory to create (new or empty)")
    parser.add_argument("--step", type=int, default=None, help="the step to convert from a checkpoint root")
    parser.add_argument(
        "--max-shard-bytes",
        type=parse_size,
        default=DEFAULT_MAX_SHARD_BYTES,
        help="largest safetensors shard, e.g. 5GiB (default) or 500MB",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the unsharded model is built (cuda: needed for Transformer Engine checkpoints)",
    )
    return parser


def run(args: argparse.Namespace, prog: str) -> int:
    started = time.perf_counter()
    try:
        out = convert_checkpoint(
            args.ckpt_dir, args.out_dir, step=args.step, max_shard_bytes=args.max_shard_bytes, device=args.device
        )
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    files = sorted(p.name for p in out.glob("*.safetensors"))
    size = sum((out / name).stat().st_size for name in files)
    seconds = time.perf_counter() - started
    print(f"wrote {out} ({len(files)} safetensors file(s), {size / 1e6:.1f} MB) in {seconds:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="convert_to_hf", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv), parser.prog)


if __name__ == "__main__":
    sys.exit(main())
