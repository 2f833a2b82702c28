"""SIGKILL inside checkpoint saves: a parent forks a writer per trial and kills it mid-save.

Usage: worker_checkpoint_kill.py HF_DIR OUT_DIR write|verify CONFIG_JSON

``write`` (a plain process: the imports are done once, then every child forks before any thread or process
group exists, since a fork of an initialised gloo rank deadlocks): a first child saves the reference
(uninterrupted) checkpoints of every state under OUT_DIR/reference and measures a save. Then each trial forks
a writer in its own process group (a SIGKILL also takes megatron's writer helpers); it starts a one-rank gloo
group, builds the tiny actor, trains one step (the optimizer state must exist) and saves the states of
``SEQUENCE`` one after the other into its own root, appending ``saving k`` / ``saved k`` to a log. The parent
kills it
  * "timed" trials: a seeded random delay after the writer announced the seeded target save, spread over the
    whole measured duration of a save (early: the dist-checkpoint files; late: fsync, rename, ``latest``);
  * "event" trials: just before the n-th file-system operation of the target save's publishing (an fsync of
    a directory, the pointer file written, a rename, the atomic exchange, a directory removal), for every n
    until the save completes: every gap between two of those operations is hit exactly once.
OUT_DIR/trials.json records each trial (what was announced before the kill, where it landed).

``verify`` (a fresh process, under torchrun): for every trial loads the checkpoint root, checks that it is the step ``latest``
names, that no completed save was lost, that every model and optimizer tensor equals that step's state bit
for bit, and trains one more step, which must equal the same step after loading the reference checkpoint
(metrics, learning rate, RNG draws, weights). Writes OUT_DIR/verified.json.

State k is a function of k alone (:func:`set_state`): weights, Adam moments, the trainer state, and the RNGs.
"""

import json
import os
import queue
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import worker_checkpoint as wc  # noqa: E402

LAYOUT = "tp1-pp1-ep1-etp1-alltoall"
# The saves each writer makes, in order: the second save of step 2 re-saves the step ``latest`` names.
SEQUENCE = [1, 2, 2, 3]
GARBAGE_STATE = 999


def set_state(actor, k: int) -> None:
    """Weights, Adam moments, RNG streams: a function of ``k`` only."""
    from megatron.core import tensor_parallel

    generator = torch.Generator().manual_seed(k)
    with torch.no_grad():
        for param in parameters(actor):
            param.copy_(0.02 * torch.randn(param.shape, generator=generator))
        for tensor in optimizer_tensors(actor):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) * 1e-3)
    random.seed(k)
    np.random.seed(k)
    torch.manual_seed(k)
    tensor_parallel.model_parallel_cuda_manual_seed(k)


def trainer_state_of(k: int) -> dict:
    return {"step": k, "data_position": 8 * k, "rewards": [float(k)]}


def parameters(actor) -> list[torch.Tensor]:
    return [p for chunk in actor.model.chunks for p in chunk.parameters()]


def optimizer_tensors(actor) -> list[torch.Tensor]:
    parts = getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
    out = []
    for part in parts:
        for state in part.optimizer.state.values():
            for key in sorted(state):
                if key != "step" and isinstance(state[key], torch.Tensor) and state[key].is_floating_point():
                    out.append(state[key])
    assert out, "the optimizer has no state yet"
    return out


def snapshot(actor) -> list[torch.Tensor]:
    return [t.detach().clone() for t in parameters(actor) + optimizer_tensors(actor)]


class _Proxy:
    """A module whose chosen functions are replaced (the checkpoint module's ``os`` and ``shutil``)."""

    def __init__(self, module, **overrides):
        self._module, self._overrides = module, overrides

    def __getattr__(self, name):
        return self._overrides.get(name) or getattr(self._module, name)


def install_event_hooks(checkpoint, log, kill_before: dict) -> None:
    """Counts the file-system operations of a save's publishing (renames, ``latest``) and kills this process
    before the chosen one (the timed trials cover the long part before it: the files being written).

    ``kill_before``: {"save": index into SEQUENCE, "event": n}; ``log`` gets the name of each operation."""
    import shutil

    state = {"save": -1, "event": 0, "publishing": False}
    real_save, real_publish = checkpoint.save_checkpoint, checkpoint._publish

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            if state["save"] == kill_before["save"] and state["publishing"]:
                # The operation and its path (a rename's or a swap's destination).
                what = f"{name} {Path(args[-1] if name in ('os.replace', '_exchange') else args[0]).name}"
                if state["event"] == kill_before["event"]:
                    log(f"killed before {what}")
                    os.killpg(0, signal.SIGKILL)
                log(f"do {what}")
                state["event"] += 1
            return fn(*args, **kwargs)

        return wrapper

    def save(*args, **kwargs):
        state["save"] += 1
        state["event"] = 0
        return real_save(*args, **kwargs)

    def publish(*args, **kwargs):
        state["publishing"] = True
        try:
            return real_publish(*args, **kwargs)
        finally:
            state["publishing"] = False

    checkpoint.save_checkpoint = save
    checkpoint._publish = publish
    for name in ("_write_file", "_fsync_dir", "_exchange"):
        setattr(checkpoint, name, counted(name, getattr(checkpoint, name)))
    checkpoint.os = _Proxy(os, replace=counted("os.replace", os.replace))
    checkpoint.shutil = _Proxy(shutil, rmtree=counted("shutil.rmtree", shutil.rmtree))


def build(hf_dir: str):
    """A one-rank gloo job with the tiny actor, after one training step (the optimizer state exists)."""
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.factory import build_actor
    from sapo_megatron.actor.parallel import init_distributed
    from sapo_megatron.launch import free_port

    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
    MegatronCpuCompat("cpu").install()
    # megatron's writer collects its results through a queue of a *spawned* multiprocessing Manager, created on
    # a process's first save: a fresh interpreter that re-imports this script, seconds per writer on two busy
    # cores. The saves here are synchronous (the results are put and read in this process), so an in-process
    # queue carries the same results.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()
    cfg = wc.config_for(LAYOUT)
    init_distributed(cfg.parallel, "cpu", seed=wc.SEED)
    actor = build_actor(cfg, hf_dir, device=torch.device("cpu"), total_steps=wc.TOTAL_STEPS)
    wc.train_step(actor, 1, {"step": 0, "data_position": 0, "rewards": []})
    return actor


def writer(hf_dir: str, root: Path, log_path: Path, kill_before) -> None:
    """The forked child: saves SEQUENCE into ``root``; never returns."""
    from sapo_megatron.actor import checkpoint

    try:
        os.setsid()  # the parent kills the whole group: this writer and any helper it starts
        actor = build(hf_dir)

        def log(line: str) -> None:
            with open(log_path, "a") as handle:
                handle.write(line + "\n")

        if kill_before is not None:
            install_event_hooks(checkpoint, log, kill_before)
        for k in SEQUENCE:
            set_state(actor, k)
            log(f"saving {k}")
            checkpoint.save_checkpoint(actor, root, k, trainer_state_of(k))
            log(f"saved {k}")
        log("done")
        os._exit(0)
    except BaseException as exc:  # anything else is a failure of the test itself
        print(f"writer failed: {type(exc).__name__}: {exc}", flush=True)
        os._exit(3)


def wait_for_save(log_path: Path, save_index: int, pid: int) -> None:
    """Until the writer announced the start of save ``save_index`` of SEQUENCE."""
    while True:
        if log_path.exists():
            lines = log_path.read_text().splitlines()
            if sum(line.startswith("saving ") for line in lines) > save_index:
                return
        ended, status = os.waitpid(pid, os.WNOHANG)
        if ended:
            raise AssertionError(f"the writer ended (status {status}) before save {save_index}: {log_path.read_text()}")
        time.sleep(0.0005)


def reap_group(pid: int) -> None:
    """Whatever the writer started and left behind (its process group): an orphan holding this process's
    output pipe open would keep the test waiting."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_trial(hf_dir, root: Path, log_path: Path, *, save_index: int, delay: float | None, kill_before) -> dict:
    pid = os.fork()
    if pid == 0:
        writer(hf_dir, root, log_path, kill_before)
    if delay is not None:
        wait_for_save(log_path, save_index, pid)
        time.sleep(delay)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    reap_group(pid)
    lines = log_path.read_text().splitlines()
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert killed or lines[-1] == "done", f"writer exit status {status}: {lines}"
    saved = [int(line.split()[1]) for line in lines if line.startswith("saved ")]
    saving = [int(line.split()[1]) for line in lines if line.startswith("saving ")]
    return {
        "root": str(root),
        "killed": killed,
        "last_saved": saved[-1] if saved else None,
        "saving_when_killed": saving[-1] if killed and len(saving) > len(saved) else None,
        "killed_before": next((line for line in lines if line.startswith("killed before")), None),
        "log": lines,
    }


def measure_save(actor, root: Path) -> dict:
    """Seconds of one save from its start, and when its publishing (rename, ``latest``) starts."""
    from sapo_megatron.actor import checkpoint

    marks = {}
    real_publish = checkpoint._publish

    def publish(*args):
        marks["publish"] = time.perf_counter()
        return real_publish(*args)

    checkpoint._publish = publish
    try:
        set_state(actor, 1)
        start = time.perf_counter()
        checkpoint.save_checkpoint(actor, root, 1, trainer_state_of(1))
        end = time.perf_counter()
    finally:
        checkpoint._publish = real_publish
    return {"total": end - start, "publish": marks["publish"] - start}


def reference(hf_dir: str, out: Path) -> None:
    """The forked child that saves the uninterrupted checkpoints and times a save."""
    from sapo_megatron.actor import checkpoint

    try:
        os.setsid()
        actor = build(hf_dir)
        for k in sorted(set(SEQUENCE)):
            set_state(actor, k)
            checkpoint.save_checkpoint(actor, out / "reference", k, trainer_state_of(k))
        timings = [measure_save(actor, out / "timing") for _ in range(3)]
        (out / "timing.json").write_text(json.dumps(min(timings, key=lambda t: t["total"])))
        os._exit(0)
    except BaseException as exc:
        print(f"reference failed: {type(exc).__name__}: {exc}", flush=True)
        os._exit(3)


def write(hf_dir: str, out: Path, config: dict) -> None:
    pid = os.fork()
    if pid == 0:
        reference(hf_dir, out)
    _, status = os.waitpid(pid, 0)
    reap_group(pid)
    assert status == 0, f"the reference writer failed (status {status})"
    timing = json.loads((out / "timing.json").read_text())
    # A checkpoint written before manifests existed: the reference with the manifest taken out of meta.json.
    shutil.copytree(out / "reference", out / "legacy")
    for meta_path in (out / "legacy").glob("step_*/meta.json"):
        meta = json.loads(meta_path.read_text())
        del meta["manifest"]
        meta_path.write_text(json.dumps(meta))
    rng = random.Random(config["seed"])
    trials = []
    for t in range(config["timed_trials"]):
        save_index = rng.randrange(len(SEQUENCE))
        # Half spread over the whole save, half over its last part (fsync, rename, exchange, ``latest``).
        if t % 2 == 0:
            delay = rng.uniform(0.0, 1.1 * timing["total"])
        else:
            delay = rng.uniform(0.9 * timing["publish"], 1.05 * timing["total"])
        trial = run_trial(hf_dir, out / f"timed{t:02d}", out / f"timed{t:02d}.log", save_index=save_index,
                          delay=delay, kill_before=None)
        trials.append({"kind": "timed", "save_index": save_index, "delay": delay, **trial})
    for save_index in config["event_saves"]:
        event = 0
        while True:
            name = f"event-s{save_index}-e{event:02d}"
            trial = run_trial(hf_dir, out / name, out / f"{name}.log", save_index=save_index, delay=None,
                              kill_before={"save": save_index, "event": event})
            trials.append({"kind": "event", "save_index": save_index, "event": event, **trial})
            if not trial["killed"]:
                break  # the save had fewer operations than ``event``: every gap was hit
            event += 1
    trials.append({"kind": "legacy", "root": str(out / "legacy"), "last_saved": max(SEQUENCE), "killed": False,
                   "saving_when_killed": None, "log": []})
    (out / "trials.json").write_text(json.dumps({"timing": timing, "trials": trials}, indent=1))
    print(f"{len(trials)} trials written; save {timing['total']:.3f} s, publish at {timing['publish']:.3f} s",
          flush=True)


def step_after(actor) -> dict:
    """One training step on a fixed batch, from whatever state the actor holds."""
    record = wc.train_step(actor, 7, {"step": 0, "data_position": 0, "rewards": []})
    return {"metrics": record["metrics"], "lr": record["lr"], "draws": record["draws"], "weights": record["weights"]}


def verify(hf_dir: str, out: Path) -> None:
    from sapo_megatron.actor import checkpoint

    actor = build(hf_dir)
    trials = json.loads((out / "trials.json").read_text())["trials"]
    reference = {}
    for k in sorted(set(SEQUENCE)):
        set_state(actor, GARBAGE_STATE)
        assert checkpoint.load_checkpoint(actor, out / "reference", k)[0] == k
        reference[k] = step_after(actor)
    results = []
    for trial in trials:
        root = Path(trial["root"])
        latest = root / "latest"
        set_state(actor, GARBAGE_STATE)  # a tensor the load missed would keep this state
        loaded = checkpoint.load_checkpoint(actor, root)
        result = {"root": str(root), "latest": latest.read_text().strip() if latest.exists() else None,
                  "leftovers": sorted(p.name for p in root.iterdir() if p.name.endswith(".tmp"))}
        if loaded is None:
            result["loaded_step"] = None
        else:
            step, trainer_state = loaded
            after_load = snapshot(actor)
            set_state(actor, step)
            expected = snapshot(actor)
            result["loaded_step"] = step
            result["trainer_state_ok"] = trainer_state == trainer_state_of(step)
            result["tensors"] = len(expected)
            result["tensors_equal"] = all(torch.equal(a, b) for a, b in zip(after_load, expected))
            checkpoint.load_checkpoint(actor, root)  # set_state above changed the RNGs: load again
            after = step_after(actor)
            ref = reference[step]
            # The step after the load, field by field, against the step after loading the uninterrupted save.
            result["next_step_equal"] = {
                "metrics": after["metrics"] == ref["metrics"],
                "lr": after["lr"] == ref["lr"],
                "draws": after["draws"] == ref["draws"],
                "weights": sorted(after["weights"]) == sorted(ref["weights"])
                and all(torch.equal(after["weights"][n], ref["weights"][n]) for n in ref["weights"]),
            }
        results.append(result)
    (out / "verified.json").write_text(json.dumps(results, indent=1))
    print(f"{len(results)} trials verified", flush=True)


def main(hf_dir: str, out_dir: str, mode: str, config_json: str) -> None:
    import megatron.core  # noqa: F401  (imported once, before the children fork)

    import sapo_megatron.actor.checkpoint  # noqa: F401
    import sapo_megatron.actor.factory  # noqa: F401

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mode == "write":
        write(hf_dir, out, json.loads(config_json))
    else:
        verify(hf_dir, out)
        from sapo_megatron.actor.parallel import destroy_distributed

        destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
