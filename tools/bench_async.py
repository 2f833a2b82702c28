"""Asynchronous vs synchronous RL on the CPU demo: wall time to a held-out reward, same seeds, same code.

    python tools/bench_async.py [--steps 500] [--mode remote|colocated] [--target 0.6] [--out DIR]

Runs the demo recipe (``recipes/tiny_cpu_sapo.yaml``) twice, one after the other on the same machine:
``rollout.max_staleness=0`` (each batch generated with the weights it is trained from) and
``rollout.max_staleness=1`` (the next batch generated while the actor trains; every sample one version
stale), everything else equal. Both runs set torch's threads per phase the same way (``trainer.TorchThreads``).
The clock is each run's ``time/elapsed``: seconds since its RL loop began (after the supervised warm-up, which
both runs share exactly), at each held-out evaluation (every ``trainer.eval_interval`` steps, 256 prompts).

``--mode remote`` (default): the engine is a ``vllm serve`` process of its own (``rollout.mode=remote``), so
generation and training run in separate processes, one core each when they overlap. Servers cannot return
routed experts on CPU, so both runs set ``rollout.collect_routed_experts=false``. ``--mode colocated`` keeps the
engine in the trainer's process (its generation then runs in a thread beside the actor's: both are mostly
Python at the demo's size, so they contend for the interpreter; docs/benchmarks.md has the numbers).

Prints, per run, its held-out rewards and times, then::

    time to held-out reward 0.6, async / sync: X.XX
    final held-out reward: sync X.XXX, async X.XXX (async - sync: +X.XXX)

(``n/a`` when a run never reaches the target).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_cpu_sapo.yaml"


def run(name: str, out: Path, steps: int, mode: str, staleness: int, extra: list[str]) -> list[tuple[int, float, float]]:
    run_dir = out / name
    overrides = [f"trainer.run_dir={run_dir}", f"trainer.steps={steps}", "trainer.save_interval=0",
                 f"rollout.max_staleness={staleness}", *extra]
    if mode == "remote":
        overrides += ["rollout.mode=remote", "rollout.collect_routed_experts=false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", TOKENIZERS_PARALLELISM="false")
    # The demo's own thread setting: no OMP_NUM_THREADS, so torch may use every core where the phase allows.
    env.pop("OMP_NUM_THREADS", None)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sapo_megatron.cli", "train", str(RECIPE), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"[{name}] failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["reward/val_mean"], r["time/elapsed"]) for r in records if "reward/val_mean" in r]
    steps_time = [r["time/step"] for r in records if "time/step" in r]
    print(f"[{name}] {len(steps_time)} steps, {time.perf_counter() - started:.0f} s in all, RL loop "
          f"{evals[-1][2]:.0f} s, mean step {sum(steps_time) / len(steps_time):.3f} s", flush=True)
    print(f"[{name}] held-out reward by step (seconds): "
          + ", ".join(f"{s}: {v:.3f} ({t:.0f})" for s, v, t in evals), flush=True)
    return evals


def time_to(evals: list[tuple[int, float, float]], target: float) -> float | None:
    return next((t for _, v, t in evals if v >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--mode", choices=("remote", "colocated"), default="remote")
    parser.add_argument("--target", type=float, default=0.6)
    parser.add_argument("--out", default=None, help="where the two runs go (default: a new temporary directory)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="for both runs (e.g. a policy loss)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_async_{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    sync = run("sync", out, args.steps, args.mode, 0, args.overrides)
    asynchronous = run("async", out, args.steps, args.mode, 1, args.overrides)
    t_sync, t_async = time_to(sync, args.target), time_to(asynchronous, args.target)
    ratio = f"{t_async / t_sync:.2f}" if t_sync and t_async else "n/a"
    print(f"time to held-out reward {args.target:g}, async / sync: {ratio}"
          + ("" if t_sync and t_async else f" (sync reached it: {t_sync is not None}, async: {t_async is not None})"))
    final_sync, final_async = sync[-1][1], asynchronous[-1][1]
    print(f"final held-out reward: sync {final_sync:.3f}, async {final_async:.3f} "
          f"(async - sync: {final_async - final_sync:+.3f})")


if __name__ == "__main__":
    main()
