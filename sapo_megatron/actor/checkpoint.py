"""Save and resume the actor with megatron-core's distributed checkpoints (``dist_checkpointing``).

A checkpoint root holds one directory per saved step and a ``latest`` pointer::

    ckpt_root/
      latest                 "step_000010": the newest complete checkpoint, written last
      step_000010/
        meta.json            step, model_type, parallel layout, dtype, the HF directory it came from
        hf/                  config.json, tokenizer and generation config (no weights): conversion needs nothing else
        dist/                megatron dist-checkpoint: model shards, optimizer state, LR schedule, RNG, trainer state
        reference/           (runs with a KL term) the reference policy's shards, a model-only dist-checkpoint

A step is written into ``step_000010.tmp/``, every file is fsynced, and only then is it renamed to
``step_000010`` and ``latest`` replaced (write-to-temp, fsync, rename). A job killed at any point leaves
``latest`` naming a complete checkpoint; the next save removes the leftover ``*.tmp`` directory. Re-saving
the step ``latest`` names swaps the two directories in one atomic rename (``RENAME_EXCHANGE``), so that
step's directory is complete at every instant.

``meta.json`` carries a manifest of every file of the step (size and CRC32, see :func:`_file_digest` for
what is read), checked before megatron's loader opens anything: a truncated or damaged file is a
``ValueError`` naming the file and the checkpoint, not an opaque error from deep inside the loader.
Checkpoints written before the manifest existed load without the check.

What one checkpoint holds:

- the model: each chunk's ``sharded_state_dict`` (global tensor names and offsets, so dist_checkpointing
  reshards them into any TP / PP / EP layout on load);
- the optimizer: ``optimizer.sharded_state_dict``. The distributed optimizer is saved in megatron's
  ``dp_reshardable`` format (each rank writes its own buffer shard, no gather): it loads under a different
  data-parallel size but not under different TP / PP / EP sizes. The non-distributed optimizer's state is
  stored per parameter and reshards like the model;
- the LR / weight-decay schedule (``scheduler.state_dict()``);
- the RNG state of every rank (python, numpy, torch CPU / CUDA, megatron's model-parallel RNG tracker),
  restored only under the identical layout: other layouts have other per-rank random streams;
- ``trainer_state``: whatever the trainer passes (step, data position, ...), saved from rank 0;
- with ``reference=``: the frozen reference policy of the KL term (:mod:`sapo_megatron.actor.reference`),
  in ``reference/`` under the model's own names, so it reshards like the model. A resumed run's reference is
  its initial policy, which need not be the HF weights (a supervised warm-up runs before RL).

Every function here is a collective: all ranks call it with the same arguments.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.metadata
import io
import json
import logging
import os
import random
import re
import shutil
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from sapo_megatron import collectives

if TYPE_CHECKING:
    from sapo_megatron.actor.factory import Actor
    from sapo_megatron.actor.reference import ReferencePolicy

logger = logging.getLogger(__name__)

FORMAT = "sapo_megatron.dist_checkpoint"
FORMAT_VERSION = 1
LATEST_FILE = "latest"
META_FILE = "meta.json"
HF_SUBDIR = "hf"
DIST_SUBDIR = "dist"
REFERENCE_SUBDIR = "reference"
TMP_SUFFIX = ".tmp"
RANK_FILES_SUBDIR = "rank_files"
# Resharding over data parallelism without gathering the optimizer state anywhere (see the module docstring).
DISTRIBUTED_OPTIMIZER_SHARDING = "dp_reshardable"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
# Files of a HF model directory that are weights; everything else (config, tokenizer, generation config,
# chat template) is copied into the checkpoint.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
# The manifest's checksums (see _file_digest). Files up to FULL_CRC_MAX_BYTES are read whole; larger ones
# (the model / optimizer shards of a 30B run: several GB per rank) in SAMPLED_BLOCKS blocks of
# SAMPLED_BLOCK_BYTES spread evenly over the file, first and last block included.
FULL_CRC_MAX_BYTES = 64 << 20
SAMPLED_BLOCKS = 64
SAMPLED_BLOCK_BYTES = 1 << 20
# A dist-checkpoint shard file ``__<rank>_<index>.distcp``: digested by the rank that wrote it (its pages are
# still in that rank's cache), every other file by rank 0.
_SHARD_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointLayout:
    """The parallel layout a checkpoint was written under (and whether the optimizer was distributed)."""

    tensor: int
    pipeline: int
    virtual_pipeline: int
    expert: int
    expert_tensor: int
    context: int
    data: int
    world_size: int
    distributed_optimizer: bool

    @classmethod
    def current(cls, actor: "Actor") -> "CheckpointLayout":
        from megatron.core import parallel_state as mpu

        return cls(
            tensor=mpu.get_tensor_model_parallel_world_size(),
            pipeline=mpu.get_pipeline_model_parallel_world_size(),
            virtual_pipeline=mpu.get_virtual_pipeline_model_parallel_world_size() or 0,
            expert=mpu.get_expert_model_parallel_world_size(),
            expert_tensor=mpu.get_expert_tensor_parallel_world_size(),
            context=mpu.get_context_parallel_world_size(),
            data=mpu.get_data_parallel_world_size(),
            world_size=torch.distributed.get_world_size(),
            distributed_optimizer=uses_distributed_optimizer(actor),
        )

    @property
    def model_parallel(self) -> tuple[int, ...]:
        return (self.tensor, self.pipeline, self.virtual_pipeline, self.expert, self.expert_tensor, self.context)

    def describe(self) -> str:
        sizes = f"TP{self.tensor} x PP{self.pipeline}"
        if self.virtual_pipeline:
            sizes += f" (VPP{self.virtual_pipeline})"
        sizes += f" x EP{self.expert} (ETP{self.expert_tensor})"
        if self.context > 1:
            sizes += f" x CP{self.context}"
        optimizer = "distributed optimizer" if self.distributed_optimizer else "non-distributed optimizer"
        return f"{sizes} x DP{self.data} on {self.world_size} ranks, {optimizer}"


def uses_distributed_optimizer(actor: "Actor") -> bool:
    return bool(actor.ddp_chunks[0].ddp_config.use_distributed_optimizer)


# ----------------------------------------------------------------------------------------------------------
# Finding checkpoints (no process group needed)
# ----------------------------------------------------------------------------------------------------------


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True for one complete step directory (``meta.json`` of this format and a dist-checkpoint)."""
    path = Path(path)
    meta = path / META_FILE
    if not meta.is_file() or not (path / DIST_SUBDIR).is_dir():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def list_checkpoints(ckpt_root: str | os.PathLike) -> dict[int, Path]:
    """Complete step directories under ``ckpt_root`` by step (``*.tmp`` leftovers are not listed)."""
    root = Path(ckpt_root)
    found = {}
    if root.is_dir():
        for entry in root.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir():
                found[int(match.group(1))] = entry
    return dict(sorted(found.items()))


def find_checkpoint(ckpt_root: str | os.PathLike, step: Optional[int] = None) -> Optional[Path]:
    """The step directory to load: ``step``'s, else the one ``latest`` names; ``None`` when there is none yet.

    ``ckpt_root`` may also be a step directory itself. A root that does not exist (or is empty) holds no
    checkpoint; anything else that is not a checkpoint is a ``ValueError`` saying what was found.
    """
    root = Path(ckpt_root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"checkpoint path {str(root)!r} is a file, not a checkpoint directory")
    if is_checkpoint_dir(root):
        found_step = read_meta(root)["step"]
        if step is not None and step != found_step:
            raise ValueError(f"{str(root)!r} is the checkpoint of step {found_step}, not of step {step}")
        return root
    if not root.is_dir():
        if step is not None:
            raise ValueError(f"no checkpoint of step {step}: {str(root)!r} does not exist")
        return None
    steps = list_checkpoints(root)
    if step is not None:
        if step not in steps:
            available = ", ".join(map(str, steps)) or "none"
            raise ValueError(f"no checkpoint of step {step} under {str(root)!r} (available steps: {available})")
        return _checked(steps[step])
    latest = root / LATEST_FILE
    if latest.is_file():
        name = latest.read_text().strip()
        target = root / name
        if not _STEP_DIR.match(name) or not target.is_dir():
            raise ValueError(
                f"{str(latest)!r} names {name!r}, which is not a checkpoint directory under {str(root)!r}; "
                f"steps present: {', '.join(map(str, steps)) or 'none'}"
            )
        return _checked(target)
    if steps:
        raise ValueError(
            f"{str(root)!r} holds step directories ({', '.join(map(str, steps))}) but no {LATEST_FILE!r} "
            f"pointer; pass the step to load explicitly"
        )
    leftovers = [p.name for p in root.iterdir() if not p.name.endswith(TMP_SUFFIX)]
    if leftovers:
        raise ValueError(
            f"{str(root)!r} is not a checkpoint directory: no {LATEST_FILE!r} pointer, no step_NNNNNN "
            f"directories, no {META_FILE}; it holds {sorted(leftovers)[:5]}"
        )
    return None


def _checked(step_dir: Path) -> Path:
    if not is_checkpoint_dir(step_dir):
        meta = step_dir / META_FILE
        reason = f"no {META_FILE} of {FORMAT} or no {DIST_SUBDIR}/"
        if meta.is_file():
            try:
                json.loads(meta.read_text())
            except (OSError, ValueError) as exc:
                reason = f"{str(meta)!r} is unreadable ({type(exc).__name__}: {exc}): damaged or truncated"
        raise ValueError(f"{str(step_dir)!r} is not a complete checkpoint ({reason})")
    return step_dir


def read_meta(step_dir: str | os.PathLike) -> dict:
    path = Path(step_dir) / META_FILE
    if not path.is_file():
        raise ValueError(f"{str(step_dir)!r} is not a checkpoint directory (no {META_FILE})")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{str(path)!r} is damaged or truncated: {exc}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a {FORMAT} checkpoint (format={meta.get('format')!r})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has format version {meta['version']}; this code reads up to version {FORMAT_VERSION}"
        )
    return meta


# ----------------------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "torch_cpu": torch.get_rng_state(),
        "tracker": {name: s.clone() for name, s in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# ----------------------------------------------------------------------------------------------------------
# The state dict
# ----------------------------------------------------------------------------------------------------------


def model_sharded_state_dict(chunks: list) -> dict:
    """The model chunks' sharded state dicts, nested the way megatron-LM nests them (tensor names are global)."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{index}": chunk.sharded_state_dict() for index, chunk in enumerate(chunks)}


def _optimizers_without_state(optimizer) -> list:
    """The distributed optimizers in ``optimizer`` whose torch optimizer has not allocated its state yet.

    torch's Adam creates its per-parameter state (and step counter) on the first step; megatron's
    DistributedOptimizer without apex / Transformer Engine reads the step counter from that state to describe
    itself, so it cannot be saved or loaded into before it exists.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [
        part
        for part in parts
        if isinstance(part, DistributedOptimizer)
        and len(part.optimizer.state) == 0
        and any(group["params"] for group in part.optimizer.param_groups)
    ]


def _sharded_state_dict(actor: "Actor", *, is_loading: bool, optimizer: bool, rng: bool) -> dict:
    from megatron.core.dist_checkpointing import ShardedObject

    state = model_sharded_state_dict(actor.model.chunks)
    if optimizer:
        if is_loading:
            for part in _optimizers_without_state(actor.optimizer):
                # megatron's own way to allocate the state: one step with zero gradients. Everything it
                # touches (moments, step counter, weights under weight decay) is overwritten by the load.
                part._init_optimizer_states_with_dummy_values()
        state["optimizer"] = actor.optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading, metadata={"distrib_optim_sharding_type": DISTRIBUTED_OPTIMIZER_SHARDING}
        )
        if actor.scheduler is not None:
            state["scheduler"] = actor.scheduler.state_dict()
    if rng:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        # One object per global rank: each rank's streams differ (TP / EP ranks fork megatron's tracker).
        state["rng"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return state


def _check_trainer_state(trainer_state: dict) -> None:
    """dist_checkpointing reads its common file back with ``torch.load(weights_only=True)``: refuse now what
    could not be read at resume time."""
    if not isinstance(trainer_state, dict):
        raise ValueError(f"trainer_state must be a dict, got {type(trainer_state).__name__}")
    buffer = io.BytesIO()
    torch.save(trainer_state, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as exc:
        raise ValueError(
            "trainer_state must hold only JSON-like values (dict, list, tuple, str, int, float, bool, None) and "
            f"tensors; it could not be read back safely: {exc}"
        ) from None


# ----------------------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------------------


def save_checkpoint(
    actor: "Actor",
    ckpt_root: str | os.PathLike,
    step: int,
    trainer_state: dict,
    *,
    keep_last: Optional[int] = None,
    hf_dir: str | os.PathLike | None = None,
    reference: Optional["ReferencePolicy"] = None,
    rank_files: Optional[dict[str, bytes]] = None,
) -> Path:
    """Saves model, optimizer, LR schedule, every rank's RNG state and ``trainer_state`` as ``step``.

    A collective: every rank calls it. ``trainer_state`` must be the same on every rank (rank 0's copy is
    written) and hold JSON-like values and tensors. ``keep_last`` keeps that many newest step directories
    (``None``: all). ``hf_dir`` is the model's HF directory, whose config and tokenizer files are copied
    (default: the directory the bridge read the config from). ``reference`` (the KL term's reference policy)
    is saved beside the model. ``rank_files`` (name -> bytes) are this rank's own files, written into
    ``rank_files/`` of the step before it is published and covered by its manifest (what differs between ranks,
    such as a data-parallel share's rollouts generated ahead; names must differ between ranks;
    :func:`read_rank_file` reads one back). Returns the step directory.
    """
    if step < 0:
        raise ValueError(f"step={step}: must be >= 0")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: must be >= 1 (or None to keep every checkpoint)")
    _check_trainer_state(trainer_state)
    if _optimizers_without_state(actor.optimizer):
        raise ValueError(
            f"save_checkpoint(step={step}) before the first optimizer step: the optimizer state does not exist "
            "yet; save after a training step (the weights alone are the HF model the run started from)"
        )
    from megatron.core import dist_checkpointing

    source_hf_dir = _source_hf_dir(actor, hf_dir)
    root = Path(ckpt_root)
    final = root / step_dir_name(step)
    tmp = root / (final.name + TMP_SUFFIX)
    rank = torch.distributed.get_rank()
    started = time.perf_counter()

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        # Leftovers of a job killed while saving; only one job writes a checkpoint root.
        for stale in root.glob("step_*" + TMP_SUFFIX):
            shutil.rmtree(stale)
        (tmp / DIST_SUBDIR).mkdir(parents=True)
        if reference is not None:
            (tmp / REFERENCE_SUBDIR).mkdir()
    collectives.barrier()

    layout = CheckpointLayout.current(actor)
    state = _sharded_state_dict(actor, is_loading=False, optimizer=True, rng=True)
    state["trainer_state"] = trainer_state
    dist_checkpointing.save(state, str(tmp / DIST_SUBDIR), async_sharded_save=False)
    if reference is not None:
        # Saved from the model while it holds the reference: the shards get the model's names and offsets.
        with reference.swapped():
            reference_state = model_sharded_state_dict(actor.model.chunks)
            dist_checkpointing.save(reference_state, str(tmp / REFERENCE_SUBDIR), async_sharded_save=False)
    mine = {}
    for name, data in (rank_files or {}).items():
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"rank_files: {name!r} is not a plain file name")
        # Every rank may create it: the step's directory exists since the barrier above.
        (tmp / RANK_FILES_SUBDIR).mkdir(exist_ok=True)
        _write_file(tmp / RANK_FILES_SUBDIR / name, data)
        mine[f"{RANK_FILES_SUBDIR}/{name}"] = _file_digest(tmp / RANK_FILES_SUBDIR / name)
    collectives.barrier()
    manifest = _digest_dist_files(tmp, rank, torch.distributed.get_world_size())
    manifest.update(_merged_on_rank0(mine, rank, torch.distributed.get_world_size()))
    if reference is not None:
        manifest.update(_digest_dist_files(tmp, rank, torch.distributed.get_world_size(), REFERENCE_SUBDIR))

    if rank == 0:
        _write_hf_files(actor, source_hf_dir, tmp / HF_SUBDIR)
        for path in sorted((tmp / HF_SUBDIR).iterdir()):
            manifest[f"{HF_SUBDIR}/{path.name}"] = _file_digest(path)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": step,
            "model_type": actor.model.bridge.hf_config.model_type,
            "params_dtype": str(actor.model.bridge.dtype).removeprefix("torch."),
            "layer_spec": "transformer_engine" if actor.model.bridge.use_te else "local",
            "hf_dir": str(source_hf_dir.resolve()) if source_hf_dir is not None else None,
            "layout": asdict(layout),
            "optimizer_sharding": DISTRIBUTED_OPTIMIZER_SHARDING if layout.distributed_optimizer else "model_space",
            "reference": reference is not None,
            "megatron_core": _megatron_version(),
            "saved_unix_time": time.time(),
            "manifest": dict(sorted(manifest.items())),
        }
        _write_file(tmp / META_FILE, json.dumps(meta, indent=2) + "\n")
        _fsync_tree(tmp)
        _publish(root, tmp, final)
        if keep_last is not None:
            _prune(root, keep=keep_last, protect=final)
    collectives.barrier()
    logger.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - started)
    return final


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Makes the fully written ``tmp`` the step directory, then points ``latest`` at it."""
    if final.exists():
        latest = root / LATEST_FILE
        names_final = latest.is_file() and latest.read_text().strip() == final.name
        if names_final and _exchange(tmp, final):
            # ``latest`` names this step: one atomic swap, so its directory is complete at every instant
            # (new or old contents); the old contents, now under the temp name, are never loaded.
            shutil.rmtree(tmp)
        else:
            # A complete directory of the same step: set it aside first so the rename below stays a single
            # atomic step. Where ``latest`` names it and the filesystem cannot swap (no RENAME_EXCHANGE, e.g.
            # some network filesystems), ``latest`` first falls back to the newest other step, so that a kill
            # between the two renames leaves it naming a complete checkpoint.
            if names_final:
                others = [path for path in list_checkpoints(root).values() if path != final]
                if others:
                    pointer = root / (LATEST_FILE + TMP_SUFFIX)
                    _write_file(pointer, others[-1].name + "\n")
                    os.replace(pointer, latest)
                    _fsync_dir(root)
            old = final.with_name(final.name + ".old" + TMP_SUFFIX)
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    pointer = root / (LATEST_FILE + TMP_SUFFIX)
    _write_file(pointer, final.name + "\n")
    os.replace(pointer, root / LATEST_FILE)
    _fsync_dir(root)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps the paths ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or filesystem does not support it (nothing was changed then)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"renameat2(RENAME_EXCHANGE) of {str(a)!r} and {str(b)!r}: {os.strerror(code)}")


def _prune(root: Path, *, keep: int, protect: Path) -> None:
    steps = list_checkpoints(root)
    for step, path in list(steps.items())[:-keep]:
        if path == protect:
            continue
        # Renamed first: a partly deleted directory must never look like a checkpoint.
        doomed = path.with_name(path.name + ".deleting" + TMP_SUFFIX)
        os.replace(path, doomed)
        shutil.rmtree(doomed)
        logger.info("removed checkpoint of step %d (keep_last=%d)", step, keep)


def _source_hf_dir(actor: "Actor", hf_dir: str | os.PathLike | None) -> Optional[Path]:
    if hf_dir is not None:
        path = Path(hf_dir)
        if not (path / "config.json").is_file():
            raise ValueError(f"hf_dir={str(path)!r} is not a Hugging Face model directory (no config.json)")
        return path
    # transformers records the directory a config was read from.
    name = getattr(actor.model.bridge.hf_config, "_name_or_path", "") or ""
    path = Path(name) if name else None
    return path if path is not None and (path / "config.json").is_file() else None


def _write_hf_files(actor: "Actor", source: Optional[Path], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if source is None:
        logger.warning("the model's HF directory is unknown: the checkpoint gets config.json but no tokenizer files")
        actor.model.bridge.hf_config.save_pretrained(str(out))
        return
    for entry in sorted(source.iterdir()):
        if entry.is_file() and not entry.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(entry, out / entry.name)


def _write_file(path: Path, text: str | bytes) -> None:
    with open(path, "wb" if isinstance(text, bytes) else "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _file_digest(path: Path) -> dict:
    """Size and CRC32 of one file. Every byte is read for files up to ``FULL_CRC_MAX_BYTES``; larger files
    get a CRC32 of ``SAMPLED_BLOCKS`` blocks of ``SAMPLED_BLOCK_BYTES`` at evenly spaced offsets (first and
    last block included).

    Why sampled: a 30B run's model and optimizer shards are several GB per rank, and a full CRC of them at
    every save and load would cost seconds to minutes of reading. The size check catches every truncation
    (the common damage: a copy or a disk that ran out of space); the sampled CRC catches damage that spans
    blocks (a zeroed or overwritten range, a file swapped for another of the same size), and every flipped
    byte in files up to 64 MiB (metadata, common state, the hf/ files, and every shard of small models).
    """
    size = path.stat().st_size
    crc = 0
    with open(path, "rb") as handle:
        if size <= FULL_CRC_MAX_BYTES:
            for chunk in iter(lambda: handle.read(SAMPLED_BLOCK_BYTES), b""):
                crc = zlib.crc32(chunk, crc)
            return {"size": size, "crc32": crc, "crc32_of": "all"}
        last = size - SAMPLED_BLOCK_BYTES
        for index in range(SAMPLED_BLOCKS):
            handle.seek(last * index // (SAMPLED_BLOCKS - 1))
            crc = zlib.crc32(handle.read(SAMPLED_BLOCK_BYTES), crc)
    return {"size": size, "crc32": crc, "crc32_of": f"{SAMPLED_BLOCKS}x{SAMPLED_BLOCK_BYTES}B"}


def _file_owner(name: str, world_size: int) -> int:
    match = _SHARD_FILE.match(name)
    return int(match.group(1)) % world_size if match else 0


def read_rank_file(step_dir: str | os.PathLike, name: str) -> Optional[bytes]:
    """The bytes a rank saved as ``name`` through ``save_checkpoint(..., rank_files=...)``, or None."""
    path = Path(step_dir) / RANK_FILES_SUBDIR / name
    return path.read_bytes() if path.is_file() else None


def _digest_dist_files(step_dir: Path, rank: int, world_size: int, subdir: str = DIST_SUBDIR) -> dict[str, dict]:
    """The manifest entries of ``step_dir/subdir`` (a dist-checkpoint); a collective: each rank digests the
    shards it wrote, and rank 0 receives them all (other ranks get an empty dict)."""
    dist_dir = step_dir / subdir
    mine = {
        f"{subdir}/{path.name}": _file_digest(path)
        for path in sorted(dist_dir.iterdir())
        if path.is_file() and _file_owner(path.name, world_size) == rank
    }
    return _merged_on_rank0(mine, rank, world_size)


def _merged_on_rank0(mine: dict[str, dict], rank: int, world_size: int) -> dict[str, dict]:
    """Every rank's manifest entries on rank 0 (others get an empty dict); a collective."""
    parts = collectives.all_gather_object(mine) if world_size > 1 else [mine]
    if rank != 0:
        return {}
    return {name: digest for part in parts for name, digest in part.items()}


def verify_manifest(step_dir: str | os.PathLike, meta: Optional[dict] = None, *, rank: int = 0, world_size: int = 1) -> list[str]:
    """What is wrong with the files of ``step_dir`` according to its manifest (empty: nothing, or no
    manifest: a checkpoint written before manifests). This rank checks its share of the files (``rank``
    of ``world_size``; the defaults check all of them)."""
    step_dir = Path(step_dir)
    meta = read_meta(step_dir) if meta is None else meta
    problems = []
    for index, (name, expected) in enumerate(sorted((meta.get("manifest") or {}).items())):
        if index % world_size != rank:
            continue
        path = step_dir / name
        if not path.is_file():
            problems.append(f"{str(path)!r} is missing")
            continue
        size = path.stat().st_size
        if size != expected["size"]:
            what = "truncated" if size < expected["size"] else "longer than written"
            problems.append(f"{str(path)!r} is {what}: {size} bytes, {expected['size']} were written")
            continue
        if _file_digest(path)["crc32"] != expected["crc32"]:
            problems.append(f"{str(path)!r} is damaged: its CRC32 ({expected['crc32_of']}) differs from the one written")
    return problems


def _check_files(step_dir: Path, meta: dict) -> None:
    """Raises on every rank the same ``ValueError`` when any rank found a damaged file (a collective)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    problems = verify_manifest(step_dir, meta, rank=rank, world_size=world)
    if world > 1:
        problems = [p for part in collectives.all_gather_object(problems) for p in part]
    if problems:
        shown = "; ".join(sorted(problems)[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(
            f"checkpoint {str(step_dir)!r} is damaged and was not loaded: {shown}. Load an earlier step "
            f"(load_checkpoint(..., step=N); steps present: "
            f"{', '.join(map(str, list_checkpoints(step_dir.parent))) or 'none'})"
        )
    if "manifest" not in meta:
        logger.info("%s has no file manifest (written before manifests); its files are not checked", step_dir)


def _megatron_version() -> str:
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------------


def load_checkpoint(
    actor: "Actor",
    ckpt_root: str | os.PathLike,
    step: Optional[int] = None,
    *,
    load_optimizer: bool = True,
    reference: Optional["ReferencePolicy"] = None,
) -> Optional[tuple[int, dict]]:
    """Restores the actor from ``step`` (default: the ``latest`` one) and returns ``(step, trainer_state)``;
    ``None`` when ``ckpt_root`` holds no checkpoint yet. A collective: every rank calls it.

    Under the layout it was saved with, everything comes back, RNG included, and training continues
    bit-identically. Under another layout the model weights are resharded by dist_checkpointing, and so is
    the optimizer state when its format allows it (non-distributed optimizer: any layout; distributed
    optimizer: another data-parallel size only); the RNG state is then left as seeded. Anything else is a
    ``ValueError`` naming both layouts; ``load_optimizer=False`` loads only the weights and keeps the fresh
    optimizer and LR schedule. ``reference`` (a captured :class:`ReferencePolicy` of this actor) gets the
    saved reference policy, resharded like the model; a checkpoint saved without one leaves it as captured
    (with a warning).
    """
    from megatron.core import dist_checkpointing

    step_dir = find_checkpoint(ckpt_root, step)
    if step_dir is None:
        return None
    meta = read_meta(step_dir)
    _check_files(step_dir, meta)
    _check_model(actor, meta, step_dir)
    saved = CheckpointLayout(**meta["layout"])
    current = CheckpointLayout.current(actor)
    same_layout = saved == current
    if load_optimizer:
        _check_optimizer_layout(saved, current, step_dir)
    if not same_layout:
        logger.warning(
            "loading %s, saved under %s, into %s: weights%s are resharded; RNG state is not restored",
            step_dir,
            saved.describe(),
            current.describe(),
            " and optimizer state" if load_optimizer else "",
        )
    started = time.perf_counter()
    with torch.no_grad():
        request = _sharded_state_dict(actor, is_loading=True, optimizer=load_optimizer, rng=same_layout)
        loaded = dist_checkpointing.load(request, str(step_dir / DIST_SUBDIR))
        chunks = actor.model.chunks
        if len(chunks) == 1:
            chunks[0].load_state_dict(loaded["model"], strict=True)
        else:
            for index, chunk in enumerate(chunks):
                chunk.load_state_dict(loaded[f"model{index}"], strict=True)
        if load_optimizer:
            actor.optimizer.load_state_dict(loaded["optimizer"])
            _restore_adam_steps(actor.optimizer, loaded["optimizer"])
            if actor.scheduler is not None:
                # megatron's scheduler loads by *advancing* its step counter by the saved one
                # (``step(increment=num_steps)``): from anything but a fresh scheduler that would overshoot.
                actor.scheduler.num_steps = 0
                actor.scheduler.load_state_dict(loaded["scheduler"])
        else:
            # Low-precision parameters: the optimizer's fp32 main copies must follow the loaded weights.
            actor.optimizer.reload_model_params()
        if reference is not None:
            _load_reference(actor, reference, meta, step_dir)
    if same_layout:
        _set_rng_state(loaded["rng"])
    collectives.barrier()
    logger.info("loaded checkpoint %s in %.1f s", step_dir, time.perf_counter() - started)
    return int(meta["step"]), loaded["trainer_state"]


def _load_reference(actor: "Actor", reference: "ReferencePolicy", meta: dict, step_dir: Path) -> None:
    from megatron.core import dist_checkpointing

    if not meta.get("reference"):
        logger.warning(
            "%s was saved without a reference policy (a run without a KL term): the reference stays the "
            "weights it was captured from, not necessarily the run's initial policy",
            step_dir,
        )
        return
    chunks = actor.model.chunks
    # Loaded into the model while it holds the reference; leaving swapped() moves them into the reference.
    with reference.swapped():
        loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), str(step_dir / REFERENCE_SUBDIR))
        if len(chunks) == 1:
            chunks[0].load_state_dict(loaded["model"], strict=True)
        else:
            for index, chunk in enumerate(chunks):
                chunk.load_state_dict(loaded[f"model{index}"], strict=True)


def _restore_adam_steps(optimizer, loaded: Any) -> None:
    """Gives every parameter of a distributed optimizer its own Adam step counter, set to the saved step.

    With torch's Adam (no apex / Transformer Engine), megatron-core 0.16.1's distributed optimizer loads
    the step counter wrongly in two ways: ``load_state_dict`` puts one shared tensor into every parameter's
    state (torch's Adam increments each parameter's counter in place, so a shared one would advance once per
    parameter per step), and the ``dp_reshardable`` loader then copies into it the counter the optimizer
    held when the load request was built. The saved step is in the param groups of the loaded state.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [loaded] if len(parts) == 1 else [loaded[index] for index in range(len(parts))]
    for part, state in zip(parts, states):
        if not isinstance(part, DistributedOptimizer):
            continue
        steps = {group["step"] for group in state["optimizer"]["param_groups"] if "step" in group}
        if not steps:
            continue  # fused Adam keeps its step in the param groups, which load_state_dict restored
        assert len(steps) == 1, f"param groups disagree on the optimizer step: {sorted(steps)}"
        step = float(steps.pop())
        for param_state in part.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = torch.full_like(param_state["step"], step)


def _check_model(actor: "Actor", meta: dict, step_dir: Path) -> None:
    bridge = actor.model.bridge
    if meta["model_type"] != bridge.hf_config.model_type:
        raise ValueError(
            f"{str(step_dir)!r} holds a {meta['model_type']!r} model; the actor is {bridge.hf_config.model_type!r}"
        )
    dtype = str(bridge.dtype).removeprefix("torch.")
    if meta["params_dtype"] != dtype:
        raise ValueError(
            f"{str(step_dir)!r} was saved with model.params_dtype={meta['params_dtype']}; the actor uses {dtype}"
        )


def _check_optimizer_layout(saved: CheckpointLayout, current: CheckpointLayout, step_dir: Path) -> None:
    hint = "; pass load_optimizer=False to load the weights alone (fresh optimizer state and LR schedule)"
    if saved.distributed_optimizer != current.distributed_optimizer:
        raise ValueError(
            f"{str(step_dir)!r} was saved under {saved.describe()} and cannot restore the optimizer of "
            f"{current.describe()}: the two optimizers store their state differently{hint}"
        )
    if saved.distributed_optimizer and saved.model_parallel != current.model_parallel:
        raise ValueError(
            f"{str(step_dir)!r} was saved under {saved.describe()} and cannot restore the optimizer of "
            f"{current.describe()}: megatron's {DISTRIBUTED_OPTIMIZER_SHARDING!r} distributed-optimizer format "
            f"reshards over data parallelism only, not over TP / PP / EP sizes{hint}"
        )


__all__ = [
    "CheckpointLayout",
    "model_sharded_state_dict",
    "find_checkpoint",
    "is_checkpoint_dir",
    "list_checkpoints",
    "load_checkpoint",
    "read_meta",
    "save_checkpoint",
    "verify_manifest",
]
