"""Fault injection on checkpoints: SIGKILL at seeded random moments and at every gap between the file-system
operations of a save; damaged and truncated files.

One writer process forks a one-rank writer per trial and kills it inside a save (worker_checkpoint_kill.py);
a fresh process then loads every trial's checkpoint root. Each writer saves the states of steps 1, 2, 2 (the
step ``latest`` names, saved again), 3; state k is a function of k alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sapo_megatron.actor.checkpoint import _exchange, find_checkpoint, load_checkpoint, verify_manifest
from sapo_megatron.launch import run_torchrun

HERE = Path(__file__).parent
SEED = 20261207
TIMED_TRIALS = 20
# The saves of the writer's sequence [1, 2, 2, 3] whose every operation is interrupted: the first save of
# step 2 (a checkpoint of step 1 exists) and its re-save (``latest`` names the directory being replaced).
EVENT_SAVES = [1, 2]
JOB_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def killed(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint-kills")
    for name in ("a", "b"):
        (out / name).mkdir()
    if not _exchange(out / "a", out / "b"):
        # The trials assert the exact operations of a re-save, which differ without the atomic swap.
        pytest.skip(f"the filesystem of {out} has no renameat2(RENAME_EXCHANGE)")
    config = json.dumps({"seed": SEED, "timed_trials": TIMED_TRIALS, "event_saves": EVENT_SAVES})
    worker = str(HERE / "worker_checkpoint_kill.py")
    write = subprocess.run(
        [sys.executable, worker, str(tiny_model_dir), str(out), "write", config],
        capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )  # fmt: skip
    assert write.returncode == 0, write.stdout[-4000:] + write.stderr[-4000:]
    run_torchrun([worker, str(tiny_model_dir), str(out), "verify", config], 1, timeout=JOB_TIMEOUT_S).check()
    trials = json.loads((out / "trials.json").read_text())["trials"]
    verified = json.loads((out / "verified.json").read_text())
    return out, trials, verified


@pytest.mark.distributed
@pytest.mark.slow
def test_sigkill_anywhere_in_a_save_leaves_the_last_complete_checkpoint_loadable_and_resumable(killed):
    _, trials, verified = killed
    timed = [t for t in trials if t["kind"] == "timed"]
    events = [t for t in trials if t["kind"] == "event"]
    assert len(timed) == TIMED_TRIALS and len(events) == 13
    outcomes = {"nothing saved yet": 0, "previous step": 0, "the step being saved": 0, "not killed": 0}
    for trial, result in zip(trials, verified):
        assert result["root"] == trial["root"]
        where = f"{trial['root']}: {trial['log']}"
        if result["loaded_step"] is None:
            # Killed inside the very first save: nothing to resume from, and no leftover counts as a checkpoint.
            assert trial["last_saved"] is None and result["latest"] is None, where
            outcomes["nothing saved yet"] += 1
            continue
        # What loads is exactly what ``latest`` names, never a leftover, and no completed save is lost.
        assert result["latest"] == f"step_{result['loaded_step']:06d}", where
        assert result["loaded_step"] in (trial["last_saved"], trial["saving_when_killed"]), where
        assert result["loaded_step"] >= trial["last_saved"], where
        # Every weight and Adam moment bit for bit, the trainer state, and the next step (metrics, learning
        # rate, one draw from every RNG, weights) equal to the next step after the uninterrupted save.
        assert result["tensors"] == 147 and result["tensors_equal"] and result["trainer_state_ok"], where
        assert result["next_step_equal"] == {"metrics": True, "lr": True, "draws": True, "weights": True}, where
        if not trial["killed"]:
            outcomes["not killed"] += 1
        elif result["loaded_step"] == trial["saving_when_killed"] and trial["last_saved"] != trial["saving_when_killed"]:
            outcomes["the step being saved"] += 1
        else:
            outcomes["previous step"] += 1
    print(f"\n{len(trials)} trials: {outcomes}")

    for trial, result in zip(events, verified[len(timed) :]):
        done = [line.removeprefix("do ") for line in trial["log"] if line.startswith("do ")]
        published = "os.replace latest" in done
        if trial["killed"]:
            # Exact: the step being saved loads once ``latest`` was replaced, the previous one before that.
            expected = trial["saving_when_killed"] if published else trial["last_saved"]
            assert result["loaded_step"] == expected, trial["log"]
    # Every gap between two operations of the publishing was hit, in this order (ROOT: the trial's root): the
    # first save of step 2, then its re-save, where ``latest`` names the directory being replaced.
    killed_before = {
        save: [
            line.removeprefix("killed before ").replace(Path(t["root"]).name, "ROOT")
            for t in events if t["save_index"] == save
            for line in t["log"] if line.startswith("killed before")
        ]
        for save in EVENT_SAVES
    }  # fmt: skip
    publish = ["_fsync_dir ROOT", "_write_file latest.tmp", "os.replace latest", "_fsync_dir ROOT"]
    assert killed_before == {
        1: ["os.replace step_000002", *publish],
        2: ["_exchange step_000002", "shutil.rmtree step_000002.tmp", *publish],
    }
    # Each save ran to its end once every gap had been tried.
    assert [t["killed"] for t in events] == [True] * 5 + [False] + [True] * 6 + [False]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_checkpoint_without_a_manifest_still_loads(killed):
    out, trials, verified = killed
    (legacy,) = [r for t, r in zip(trials, verified) if t["kind"] == "legacy"]
    assert "manifest" not in json.loads((out / "legacy" / "step_000003" / "meta.json").read_text())
    assert legacy["loaded_step"] == 3 and legacy["tensors_equal"] and legacy["trainer_state_ok"]


def _copy(out: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(out / "reference", root)
    return root


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_file_is_an_error_naming_it_before_megatron_reads_anything(killed, tmp_path, damage):
    out, *_ = killed
    root = _copy(out, tmp_path)
    step = root / "step_000003"
    meta = json.loads((step / "meta.json").read_text())
    shards = sorted(name for name in meta["manifest"] if name.endswith(".distcp"))
    assert shards and all(meta["manifest"][n]["crc32_of"] == "all" for n in meta["manifest"])
    victim = step / shards[0]
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
        expected = f"is truncated: {len(data) // 2} bytes, {len(data)} were written"
    elif damage == "flip":
        data[len(data) // 3] ^= 0xFF  # one byte in the middle of a tensor's bytes: the size is unchanged
        victim.write_bytes(bytes(data))
        expected = "is damaged: its CRC32 (all) differs from the one written"
    else:
        victim.unlink()
        expected = "is missing"
    assert verify_manifest(step) == [f"{str(victim)!r} {expected}"]
    # load_checkpoint checks the files before it touches the actor (there is none here) or megatron's loader.
    with pytest.raises(ValueError) as error:
        load_checkpoint(None, root)
    message = str(error.value)
    assert message.startswith(f"checkpoint {str(step)!r} is damaged and was not loaded: {str(victim)!r}")
    assert "steps present: 1, 2, 3" in message
    # The other steps are untouched and still check out.
    assert verify_manifest(root / "step_000002") == []


@pytest.mark.distributed
@pytest.mark.slow
def test_damaged_metadata_and_config_files_are_named_too(killed, tmp_path):
    out, *_ = killed
    root = _copy(out, tmp_path)
    step = root / "step_000003"
    (step / "dist" / ".metadata").write_bytes(b"\0" * (step / "dist" / ".metadata").stat().st_size)
    config = step / "hf" / "config.json"
    config.write_text(config.read_text() + " ")
    problems = verify_manifest(step)
    assert problems == [
        f"{str(step / 'dist' / '.metadata')!r} is damaged: its CRC32 (all) differs from the one written",
        f"{str(config)!r} is longer than written: {config.stat().st_size} bytes, {config.stat().st_size - 1} were written",
    ]
    # A truncated meta.json: the step is not a checkpoint, and the error says which file is unreadable.
    meta = root / "step_000002" / "meta.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(ValueError, match=r"step_000002' is not a complete checkpoint \('.*meta.json' is unreadable"):
        find_checkpoint(root, 2)
