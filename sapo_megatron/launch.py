"""Starting multi-process jobs on one machine: torchrun under a timeout, on a free port, cleaned up.

Used by the CLI (``launch.nproc_per_node > 1``) and by the distributed tests. Every child runs with
``OMP_NUM_THREADS=1`` unless the caller says otherwise: on a small CPU machine several ranks each
spawning a full OpenMP pool oversubscribe the cores and slow the job down by integer factors.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from sapo_megatron.config import Config, ConfigError, save_config


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LaunchResult:
    returncode: int
    output: str
    timed_out: bool

    def check(self) -> "LaunchResult":
        if self.timed_out:
            raise TimeoutError(f"distributed job timed out; its output:\n{self.output[-8000:]}")
        if self.returncode != 0:
            raise RuntimeError(f"distributed job failed with exit code {self.returncode}; its output:\n{self.output[-8000:]}")
        return self


def torchrun_command(target: Sequence[str], nproc: int, port: int) -> list[str]:
    """``target`` is ``["-m", "pkg.module", *args]`` or ``["path/to/script.py", *args]``."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone" if port == 0 else f"--master-port={port}",
        f"--nproc-per-node={nproc}",
        "--nnodes=1",
    ]
    if port:
        cmd.append("--master-addr=127.0.0.1")
    if target and target[0] == "-m":
        cmd.append("--module")
        target = list(target[1:])
    return cmd + list(target)


def run_torchrun(
    target: Sequence[str],
    nproc: int,
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    capture: bool = True,
    port_retries: int = 3,
    die_with_parent: bool = False,
) -> LaunchResult:
    """Runs ``nproc`` ranks of ``target`` and waits at most ``timeout`` seconds.

    The job runs in its own process group; on timeout the whole group is killed, so no rank is left
    behind holding a port or a gloo rendezvous. The rendezvous port is picked free but bound later by
    torchrun, so another job may take it in between: a start that fails with "address already in use"
    is retried on a fresh port (only when the output is captured, which is how it is recognised).
    ``die_with_parent``: torchrun is killed when the calling process dies, even by SIGKILL (Linux), and its
    ranks then stop by themselves (see :func:`exit_when_orphaned`).
    """
    child_env = dict(os.environ)
    child_env.setdefault("OMP_NUM_THREADS", "1")
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        child_env.update(env)
    deadline = time.monotonic() + timeout
    for attempt in range(port_retries + 1):
        result = _run_once(
            target, nproc, max(1.0, deadline - time.monotonic()), child_env, cwd, capture, die_with_parent
        )
        if not (capture and result.returncode != 0 and _port_taken(result.output)) or attempt == port_retries:
            return result
    return result


def _port_taken(output: str) -> bool:
    return "EADDRINUSE" in output or "Address already in use" in output or "address already in use" in output


def _run_once(target, nproc, timeout, child_env, cwd, capture, die_with_parent) -> LaunchResult:
    cmd = torchrun_command(target, nproc, free_port())
    proc = subprocess.Popen(
        cmd,
        env=child_env,
        cwd=cwd,
        preexec_fn=_kill_me_with_parent if die_with_parent else None,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return LaunchResult(proc.returncode, out or "", False)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        return LaunchResult(-9, out or "", True)
    except BaseException:
        _kill_group(proc)
        proc.communicate()
        raise


def _kill_me_with_parent() -> None:
    """In the child between fork and exec: SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG)."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the ranks' own orphan check still ends them


def exit_when_orphaned(poll_seconds: float = 1.0) -> None:
    """Ends this process when its parent (torchrun) is gone, from a daemon thread.

    A launcher killed with SIGKILL cannot stop its ranks; without this they would hang in their next
    collective forever, holding ports and memory.
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="exit-when-orphaned", daemon=True).start()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def check_launch(cfg: Config, env) -> None:
    """Refuses a trainer rank that the launch put in the wrong place: a rollout node (which serves vLLM), or a
    torchrun world that is not the actor's (launch.nnodes x launch.nproc_per_node ranks)."""
    role = env.get("SAPO_NODE_ROLE", "actor")
    if role != "actor":
        raise ConfigError(
            f"SAPO_NODE_ROLE={role}: this node runs the rollout servers (`sapo-megatron serve`), not trainer ranks; "
            "start the trainer's torchrun on the actor nodes only"
        )
    if "WORLD_SIZE" in env and int(env["WORLD_SIZE"]) != cfg.launch.world_size:
        raise ConfigError(
            f"torchrun started WORLD_SIZE={env['WORLD_SIZE']} ranks, but launch.nnodes={cfg.launch.nnodes} x "
            f"launch.nproc_per_node={cfg.launch.nproc_per_node} = {cfg.launch.world_size}: the trainer's torchrun "
            "must span exactly the actor's nodes (rollout nodes run `sapo-megatron serve`)"
        )


def launch_ranks(cfg: Config, *, verbose: bool = False) -> Optional[dict]:
    """Starts ``launch.nproc_per_node`` ranks of this trainer with torchrun on this node and waits.

    The ranks inherit this terminal and each sends library output to its own log file (``verbose``: not)."""
    if cfg.launch.nnodes > 1:
        raise ConfigError("launch.nnodes > 1: start the ranks with torchrun/srun (see slurm/), not from here")
    run_dir = Path(cfg.trainer.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    save_config(cfg, config_path)
    result = run_torchrun(
        ["-m", "sapo_megatron.trainer", str(config_path), *(["--verbose"] if verbose else [])],
        cfg.launch.nproc_per_node,
        timeout=7 * 24 * 3600,
        capture=False,
        die_with_parent=True,
    )
    if result.returncode != 0:
        logs = "" if verbose else f"; each rank's full log, library output included, is in {run_dir / 'logs'}"
        raise RuntimeError(f"the training ranks exited with code {result.returncode}{logs}")
    summary_path = run_dir / "summary.json"
    return json.loads(summary_path.read_text()) if summary_path.exists() else {}

