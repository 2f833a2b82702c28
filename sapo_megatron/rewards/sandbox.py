"""Contained reward scoring: a reward function that raises, hangs or crashes costs one reward, not the run.

Rewards run in a small pool of worker processes. Each item gets its own deadline from the moment it is
handed to a worker; a worker past its deadline is killed (SIGKILL: a hung sympy call or a C extension
ignores anything gentler) and replaced. Exceptions, timeouts, worker deaths and non-finite results all
score 0.0 and are counted in :class:`SandboxStats`, so a broken verifier shows up in the metrics instead
of as a stalled or dead run.

Workers are started with ``spawn`` by default: the trainer process holds threads, CUDA contexts and
process groups, none of which survive ``fork`` safely. The reward function therefore has to be picklable
(a module-level function or a ``functools.partial`` of one).
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

RewardFn = Callable[[str, str], float]

# Failure messages kept per score() call: enough to diagnose, bounded for the logs.
_MAX_FAILURE_SAMPLES = 5


@dataclass
class SandboxStats:
    """Counts for one :meth:`RewardSandbox.score` call; ``failure_samples`` holds the first few messages.

    ``n_errors`` counts exceptions, non-finite rewards and worker deaths; ``n_timeouts`` counts items
    whose worker was killed at the deadline. Every failed item scores 0.0. A result that is not a
    number (``None``, a string, a list) is an error too.
    """

    n_items: int = 0
    n_errors: int = 0
    n_timeouts: int = 0
    n_worker_restarts: int = 0
    failure_samples: tuple[str, ...] = ()


class RewardSandbox:
    """Scores ``(response, ground_truth)`` pairs with ``fn`` in worker processes, each call time-bounded.

    Use as a context manager (or call :meth:`close`): workers are processes and must be stopped.
    A reward function that cannot even be loaded in a worker (an import error in its module) is a
    configuration error: the first :meth:`score` call raises ``ValueError`` rather than scoring
    everything 0.
    """

    def __init__(
        self,
        fn: RewardFn,
        *,
        timeout_s: float,
        max_workers: int,
        start_method: str = "spawn",
        startup_timeout_s: float = 120.0,
    ):
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"RewardSandbox timeout_s={timeout_s!r}: must be a finite number of seconds > 0")
        if max_workers < 1:
            raise ValueError(f"RewardSandbox max_workers={max_workers!r}: must be >= 1")
        try:
            self._fn_bytes = pickle.dumps(fn)
        except Exception as exc:
            raise ValueError(
                f"reward function {fn!r} cannot be sent to a worker process ({exc}); "
                "define it at module level (or wrap one in functools.partial)"
            ) from exc
        self.timeout_s = float(timeout_s)
        self.max_workers = max_workers
        self.startup_timeout_s = startup_timeout_s
        self._context = multiprocessing.get_context(start_method)
        self._workers: list[_Worker] = []
        self._closed = False
        for _ in range(max_workers):
            self._workers.append(self._start_worker())

    # ------------------------------------------------------------------------------------------------
    def score(self, items: list[tuple[str, str]]) -> tuple[list[float], SandboxStats]:
        """Rewards in the order of ``items``; failures score 0.0 and are counted in the stats."""
        if self._closed:
            raise RuntimeError("RewardSandbox.score() called after close()")
        batch = _Batch(items)
        try:
            while batch.pending or any(w.index is not None for w in self._workers):
                self._dispatch(batch)
                self._collect(batch)
                self._enforce_deadlines(batch)
        except BaseException:
            # Interrupted mid-batch (Ctrl-C, a start-up failure): results still in flight would be read as
            # answers to the next batch's items, so the workers holding them go.
            for worker in list(self._workers):
                if worker.index is not None:
                    worker.stop(kill=True)
                    self._workers[self._workers.index(worker)] = self._start_worker()
            raise
        batch.stats.failure_samples = tuple(batch.failures)
        return batch.rewards, batch.stats

    def _dispatch(self, batch: _Batch) -> None:
        for worker in list(self._workers):
            if worker.ready and worker.index is None and batch.pending:
                index, (response, ground_truth) = batch.pending.popleft()
                try:
                    worker.send(index, response, ground_truth, deadline=time.monotonic() + self.timeout_s)
                except OSError:  # this idle worker died after its last item: the item goes to a new one
                    batch.pending.appendleft((index, (response, ground_truth)))
                    self._replace(worker, batch.stats)

    def _collect(self, batch: _Batch) -> None:
        waiting = [w for w in self._workers if not w.ready or w.index is not None]
        ready_conns = multiprocessing.connection.wait([w.conn for w in waiting], timeout=self._wait_seconds(waiting))
        for worker in waiting:
            if worker.conn not in ready_conns:
                continue
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                message = None
            if message is None:  # the process died (os._exit, segfault, out of memory)
                worker.process.join(timeout=1.0)  # reap it, so that its exit code is known
                if not worker.ready:
                    self._raise_startup_failure(f"the worker exited while starting (code {worker.process.exitcode})")
                batch.fail(worker.index, f"worker process died (exit code {worker.process.exitcode})")
                self._replace(worker, batch.stats)
            elif message[0] == "ready":
                worker.ready = True
            elif message[0] == "load_error":
                self._raise_startup_failure(message[1])
            else:
                kind, index, payload = message
                assert index == worker.index, (index, worker.index)
                worker.index = None
                if kind == "ok" and math.isfinite(payload):
                    batch.rewards[index] = payload
                else:
                    batch.fail(index, payload if kind == "error" else f"reward is not finite: {payload!r}")

    def _enforce_deadlines(self, batch: _Batch) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.index is not None and now >= worker.deadline:
                batch.stats.n_timeouts += 1
                batch.note(worker.index, f"no reward after {self.timeout_s:g} s")
                self._replace(worker, batch.stats)
            elif not worker.ready and now >= worker.started_at + self.startup_timeout_s:
                self._raise_startup_failure(f"not ready after {self.startup_timeout_s:g} s")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def __enter__(self) -> RewardSandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        # Safety net for a sandbox that was never closed; close() is the supported path.
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass

    # ------------------------------------------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(child_conn, self._fn_bytes), name="reward-sandbox-worker", daemon=True
        )
        process.start()
        # The parent's copy of the child's end must be closed, or a dead worker never reads as EOF.
        child_conn.close()
        return _Worker(process=process, conn=parent_conn, started_at=time.monotonic())

    def _replace(self, worker: _Worker, stats: SandboxStats) -> None:
        worker.stop(kill=True)
        self._workers[self._workers.index(worker)] = self._start_worker()
        stats.n_worker_restarts += 1

    def _wait_seconds(self, workers: list[_Worker]) -> float:
        now = time.monotonic()
        deadlines = [w.deadline for w in workers if w.index is not None]
        deadlines += [w.started_at + self.startup_timeout_s for w in workers if not w.ready]
        return max(0.0, min(deadlines) - now) if deadlines else 0.0

    def _raise_startup_failure(self, reason: str) -> None:
        self.close()
        raise ValueError(
            f"the reward function could not be loaded in a worker process: {reason}; "
            "check that its module imports cleanly on its own (python -c 'import <module>')"
        )


class _Batch:
    """The state of one score() call."""

    def __init__(self, items: list[tuple[str, str]]):
        self.pending = deque(enumerate(items))
        self.rewards = [0.0] * len(items)
        self.stats = SandboxStats(n_items=len(items))
        self.failures: list[str] = []

    def note(self, index: int, message: str) -> None:
        if len(self.failures) < _MAX_FAILURE_SAMPLES:
            self.failures.append(f"item {index}: {message}")

    def fail(self, index: int, message: str) -> None:
        self.stats.n_errors += 1
        self.note(index, message)


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    started_at: float
    ready: bool = False
    index: int | None = None  # the item being scored, None when idle
    deadline: float = math.inf

    def send(self, index: int, response: str, ground_truth: str, *, deadline: float) -> None:
        self.index, self.deadline = index, deadline
        self.conn.send((index, response, ground_truth))

    def stop(self, *, kill: bool = False) -> None:
        if not kill and self.process.is_alive():
            try:
                self.conn.send(None)
                self.process.join(timeout=2.0)
            except OSError:  # the worker already exited
                pass
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5.0)
        self.conn.close()


def _as_reward(value) -> float:
    """``value`` as a float, if it is a number (a Python or numpy number, a one-element tensor); a string that
    happens to parse (``"1.0"``) is a broken reward function, not a reward."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"reward is not a number: {value!r} ({type(value).__name__})")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"reward is not a number: {str(value)[:80]!r} ({type(value).__name__})") from None


def _worker_main(conn: multiprocessing.connection.Connection, fn_bytes: bytes) -> None:
    # Ctrl-C is for the trainer, which closes the sandbox; a worker dying of it first would read as a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        fn = pickle.loads(fn_bytes)
    except BaseException as exc:  # an import error in the reward's module, reported to the parent
        conn.send(("load_error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    while True:
        try:
            item = conn.recv()
        except EOFError:  # the parent is gone
            return
        if item is None:
            return
        index, response, ground_truth = item
        try:
            reward = _as_reward(fn(response, ground_truth))
        except Exception as exc:
            conn.send(("error", index, f"{type(exc).__name__}: {exc}"[:500]))
        else:
            conn.send(("ok", index, reward))
