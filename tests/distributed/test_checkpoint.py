"""Checkpoints of the megatron actor: kill-and-resume is bit-identical, a killed save never corrupts the
``latest`` checkpoint, other layouts reshard (or are refused with both layouts named), bad paths are errors.

Four gloo jobs over the tiny Qwen3-MoE (see worker_checkpoint.py), shared by the tests:
  train-1  (1 process)  steps 1..4, saves at 2, then is SIGKILLed while saving step 4
  train-2  (2 processes) EP2 x DP2 with the distributed optimizer: steps 1..4, saves at 2;
                         TP2 with the non-distributed optimizer and plain DP2 (distributed): steps 1..3, save at 2
  resume-2 (2 processes) resumes EP2 x DP2 from step 2; tries the EP2 checkpoint under TP2
  resume-1 (1 process)  resumes train-1 from step 2 and saves step 4 again; loads the TP2 and DP2 checkpoints
and, on a machine with a GPU, train-gpu / resume-gpu: the one-process kill-and-resume on CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sapo_megatron.actor.checkpoint import FORMAT, find_checkpoint, list_checkpoints, save_checkpoint
from sapo_megatron.launch import run_torchrun

HERE = Path(__file__).parent
JOB_TIMEOUT_S = 300
EP2 = "tp1-pp1-ep2-etp1-alltoall"
TP2_NODISTOPT = "tp2-pp1-ep1-etp2-alltoall-nodistopt"
# Data parallelism over all ranks: DP1 in one process, DP2 in two.
PLAIN = "tp1-pp1-ep1-etp1-alltoall"


def _jobs(root: Path) -> dict:
    ckpt = root / "ckpt"
    return {
        "train-1": (1, [
            {"name": "single", "kind": "train", "layout": PLAIN, "root": str(ckpt / "single"), "steps": 4,
             "save_at": [2], "die_saving_at": 4},
        ]),
        "train-2": (2, [
            {"name": "ep2", "kind": "train", "layout": EP2, "root": str(ckpt / "ep2"), "steps": 4, "save_at": [2]},
            {"name": "tp2", "kind": "train", "layout": TP2_NODISTOPT, "root": str(ckpt / "tp2"), "steps": 3,
             "save_at": [2]},
            {"name": "dp2", "kind": "train", "layout": PLAIN, "root": str(ckpt / "dp2"), "steps": 3, "save_at": [2]},
        ]),
        "resume-2": (2, [
            {"name": "ep2-resumed", "kind": "train", "layout": EP2, "root": str(ckpt / "ep2"), "steps": 4,
             "load": True},
            {"name": "ep2-into-tp2", "kind": "refused", "layout": "tp2-pp1-ep1-etp2-alltoall",
             "load": {"root": str(ckpt / "ep2")}},
        ]),
        "resume-1": (1, [
            {"name": "single-resumed", "kind": "train", "layout": PLAIN, "root": str(ckpt / "single"), "steps": 4,
             "load": True, "save_final": True, "keep_last": 1},
            {"name": "tp2-into-tp1", "kind": "train", "layout": "tp1-pp1-ep1-etp1-alltoall-nodistopt",
             "load": {"root": str(ckpt / "tp2")}, "steps": 3},
            {"name": "dp2-into-dp1", "kind": "train", "layout": PLAIN, "load": {"root": str(ckpt / "dp2")}, "steps": 3},
        ]),
        # The same kill-and-resume on one GPU (NCCL, CUDA RNG, megatron's CUDA tracker).
        "train-gpu": (1, [
            {"name": "gpu", "kind": "train", "layout": PLAIN, "root": str(ckpt / "gpu"), "steps": 4, "save_at": [2],
             "device": "cuda"},
        ]),
        "resume-gpu": (1, [
            {"name": "gpu-resumed", "kind": "train", "layout": PLAIN, "root": str(ckpt / "gpu"), "steps": 4,
             "load": True, "device": "cuda"},
        ]),
    }  # fmt: skip


DEPENDS = {"resume-2": ["train-2"], "resume-1": ["train-1", "train-2"], "resume-gpu": ["train-gpu"]}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Runs each job at most once per module, its prerequisites first; returns the job's launch result."""
    root = tmp_path_factory.mktemp("checkpoint-runs")
    jobs = _jobs(root)
    results: dict = {}

    def run(job: str):
        if job not in results:
            for before in DEPENDS.get(job, []):
                run(before)
            nproc, tasks = jobs[job]
            tasks_file = root / f"{job}.json"
            tasks_file.write_text(json.dumps(tasks))
            result = run_torchrun(
                [str(HERE / "worker_checkpoint.py"), str(tiny_model_dir), str(root / "records"), str(tasks_file)],
                nproc,
                timeout=JOB_TIMEOUT_S,
            )
            if job != "train-1":
                result.check()
            # What a resume would find right after this job (later jobs change the roots).
            results[job] = (result, _listing(root / "ckpt" / "single"))
        return results[job]

    run.root = root
    return run


def _listing(root: Path) -> dict:
    if not root.is_dir():
        return {}
    latest = root / "latest"
    tmp_dirs = root.glob("*.tmp")
    written = [p.name for p in tmp_dirs if (p / "meta.json").is_file() and (p / "dist/metadata.json").is_file()]
    return {
        "entries": sorted(p.name for p in root.iterdir()),
        "latest": latest.read_text().strip() if latest.is_file() else None,
        "found": find_checkpoint(root).name,
        "fully_written_tmp": sorted(written),
    }


def _records(runs, name: str) -> list[dict]:
    paths = sorted((runs.root / "records" / name).glob("rank*.pt"))
    assert paths, f"no records of {name}"
    return [torch.load(path, weights_only=False) for path in paths]


def _assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "original, resumed, jobs",
    [
        pytest.param("single", "single-resumed", ["train-1", "resume-1"], id="one-process"),
        pytest.param("ep2", "ep2-resumed", ["train-2", "resume-2"], id="ep2-dp2-distributed-optimizer"),
        pytest.param("gpu", "gpu-resumed", ["train-gpu", "resume-gpu"], id="one-gpu", marks=pytest.mark.gpu),
    ],
)
def test_resume_is_bit_identical(runs, original, resumed, jobs):
    for job in jobs:
        runs(job)
    uninterrupted, continued = _records(runs, original), _records(runs, resumed)
    assert len(uninterrupted) == len(continued) == (2 if original == "ep2" else 1)
    state = uninterrupted[0]["trainer_state"]
    assert continued[0]["loaded"] == (2, {"step": 2, "data_position": 16, "rewards": state["rewards"][:2]})
    _assert_same_weights(uninterrupted[0]["steps"][2]["weights"], continued[0]["weights_after_load"], "after load")
    for rank, (a, b) in enumerate(zip(uninterrupted, continued)):
        assert sorted(b["steps"]) == [3, 4]
        assert b["trainer_state"] == a["trainer_state"]
        for step in (3, 4):
            # Exact equality: float metrics, learning rate, and one draw from each RNG of every rank.
            assert b["steps"][step]["metrics"] == a["steps"][step]["metrics"], (rank, step)
            assert b["steps"][step]["lr"] == a["steps"][step]["lr"], (rank, step)
            assert b["steps"][step]["draws"] == a["steps"][step]["draws"], (rank, step)
    first = uninterrupted[0]["steps"]
    # The schedule moves (warm-up then linear decay) and the weights change every step: nothing compared is
    # constant.
    assert first[2]["lr"] != first[3]["lr"] != first[4]["lr"]
    for step in (3, 4):
        now, before = first[step]["weights"], first[step - 1]["weights"]
        assert all(not torch.equal(now[n], before[n]) for n in now), f"step {step} left some weights unchanged"
        _assert_same_weights(first[step]["weights"], continued[0]["steps"][step]["weights"], f"step {step}")


@pytest.mark.distributed
@pytest.mark.slow
def test_kill_while_saving_leaves_latest_complete(runs):
    killed, after_kill = runs("train-1")
    assert killed.returncode != 0 and not killed.timed_out
    assert "SIGKILL before publishing" in killed.output
    # Every file of step 4 was written and fsynced, but the job died before publishing it.
    assert after_kill == {
        "entries": ["latest", "step_000002", "step_000004.tmp"],
        "latest": "step_000002",
        "found": "step_000002",
        "fully_written_tmp": ["step_000004.tmp"],
    }

    _, after_resume = runs("resume-1")
    assert _records(runs, "single-resumed")[0]["loaded"][0] == 2
    # The resumed run saved step 4 with keep_last=1: the leftover is gone and step 2 was pruned.
    assert after_resume == {
        "entries": ["latest", "step_000004"],
        "latest": "step_000004",
        "found": "step_000004",
        "fully_written_tmp": [],
    }


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "source, target",
    [("tp2", "tp2-into-tp1"), ("dp2", "dp2-into-dp1")],
    ids=["tp2-to-tp1-nondistributed-optimizer", "dp2-to-dp1-distributed-optimizer"],
)
def test_other_layout_reshards_weights_and_optimizer(runs, source, target):
    runs("resume-1")
    (saved, *_), (loaded,) = _records(runs, source), _records(runs, target)
    assert loaded["loaded"][0] == 2
    _assert_same_weights(saved["steps"][2]["weights"], loaded["weights_after_load"], "after resharding")
    # Step 3 under the new layout: the same batch, the same optimizer moments and schedule. Only the
    # reduction order of the sharded matmuls differs, so the update agrees to float rounding, far below
    # the update itself (a fresh Adam would take a step of a different size).
    a, b = saved["steps"][3], loaded["steps"][3]
    assert a["lr"] == b["lr"]
    assert b["metrics"]["loss"] == pytest.approx(a["metrics"]["loss"], rel=1e-6)
    assert b["metrics"]["grad_norm"] == pytest.approx(a["metrics"]["grad_norm"], rel=1e-5)
    before = saved["steps"][2]["weights"]
    update = max((a["weights"][n] - before[n]).abs().max().item() for n in before)
    mismatch = max((a["weights"][n] - b["weights"][n]).abs().max().item() for n in before)
    assert update > 1e-5 and mismatch < 1e-7, (update, mismatch)


@pytest.mark.distributed
@pytest.mark.slow
def test_distributed_optimizer_under_other_model_parallel_sizes_is_refused(runs):
    runs("resume-2")
    saved = _records(runs, "ep2")[0]
    for record in _records(runs, "ep2-into-tp2"):
        message = record["refusal"]
        assert "TP1 x PP1 x EP2 (ETP1) x DP2 on 2 ranks, distributed optimizer" in message
        assert "TP2 x PP1 x EP1 (ETP2) x DP1 on 2 ranks, distributed optimizer" in message
        assert "load_optimizer=False" in message
        assert record["loaded"][0] == 2
    # load_optimizer=False: the weights alone, resharded from EP2 to TP2.
    weights = _records(runs, "ep2-into-tp2")[0]["weights_after_load"]
    _assert_same_weights(saved["steps"][2]["weights"], weights, "weights")


# -- paths, without a process group ----------------------------------------------------------------------


def _fake_step(root: Path, step: int, **meta) -> Path:
    path = root / f"step_{step:06d}"
    (path / "dist").mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"format": FORMAT, "version": 1, "step": step, **meta}))
    return path


def test_find_checkpoint_follows_latest_and_ignores_half_written_saves(tmp_path):
    two, four = _fake_step(tmp_path, 2), _fake_step(tmp_path, 4)
    (tmp_path / "latest").write_text("step_000002\n")
    # A save killed half-way: its temp directory and a half-written pointer, never read.
    (tmp_path / "step_000006.tmp" / "dist").mkdir(parents=True)
    (tmp_path / "latest.tmp").write_text("step_0000")
    assert find_checkpoint(tmp_path) == two
    assert find_checkpoint(tmp_path, 4) == four
    assert find_checkpoint(four) == four  # a step directory itself
    assert list_checkpoints(tmp_path) == {2: two, 4: four}
    with pytest.raises(ValueError, match=r"no checkpoint of step 6 .* \(available steps: 2, 4\)"):
        find_checkpoint(tmp_path, 6)
    with pytest.raises(ValueError, match="is the checkpoint of step 4, not of step 2"):
        find_checkpoint(four, 2)


def test_find_checkpoint_errors(tmp_path):
    # A new run: nothing saved yet is not an error...
    assert find_checkpoint(tmp_path / "missing") is None
    assert find_checkpoint(tmp_path) is None
    # ...but asking for a step that cannot be there is.
    with pytest.raises(ValueError, match="no checkpoint of step 3: .* does not exist"):
        find_checkpoint(tmp_path / "missing", 3)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a checkpoint directory: no 'latest' pointer"):
        find_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        find_checkpoint(tmp_path / "config.json")
    root = tmp_path / "root"
    _fake_step(root, 2)
    (root / "latest").write_text("step_000009\n")
    with pytest.raises(ValueError, match="names 'step_000009', which is not a checkpoint directory"):
        find_checkpoint(root)
    (root / "latest").unlink()
    with pytest.raises(ValueError, match="no 'latest' pointer; pass the step"):
        find_checkpoint(root)
    # A step directory whose meta.json is not ours does not count as complete.
    (root / "step_000002" / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        find_checkpoint(root, 2)


def test_save_checkpoint_refuses_bad_arguments_before_touching_the_actor(tmp_path):
    with pytest.raises(ValueError, match="trainer_state must hold only JSON-like values"):
        save_checkpoint(None, tmp_path, 1, {"data": object()})
    with pytest.raises(ValueError, match="keep_last=0"):
        save_checkpoint(None, tmp_path, 1, {}, keep_last=0)
    with pytest.raises(ValueError, match="trainer_state must be a dict"):
        save_checkpoint(None, tmp_path, 1, [1, 2])
    assert not any(tmp_path.iterdir())
