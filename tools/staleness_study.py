"""SAPO vs GRPO-clip under bounded staleness on the CPU demo: held-out reward and the loss's gate statistics at
``rollout.max_staleness`` k = 0, 1, 2, 4.

    python tools/staleness_study.py [--losses sapo,grpo] [--staleness 0,1,2,4] [--steps 500] [--parallel 1]
                                    [--out DIR] [KEY=VALUE ...]

Each cell is one run of the demo recipe (``recipes/tiny_cpu_sapo.yaml``, or ``recipes/tiny_cpu_grpo.yaml`` for
GRPO-clip: the same model, data, seeds, warm-up, optimizer and schedule, only the policy loss differs) with
``rollout.max_staleness=k``, the engine in a ``vllm serve`` process of its own (``rollout.mode=remote``, as
asynchronous runs require; ``rollout.collect_routed_experts=false``, which servers need on CPU), at the same
seeds. An asynchronous run's samples depend on its step numbers and seeds only, never on timing, so the cells can
run side by side (``--parallel``) and still give the numbers a run alone gives. A cell whose run directory already
holds a finished run (``summary.json``) is read, not run again.

Prints one markdown row per cell: the held-out reward (256 prompts, one sample each: standard error ~0.03) at
the start of RL, its best and its final value; the training reward over the last 50 steps; and, over every step's
last mini-batch (the most off-policy of the four), the mean importance ratio's spread (``ratio_std``), SAPO's gate
(``gate_weight_mean``: the mean weight the soft gate puts on a token's gradient, 1 on-policy;
``gate_weight_below_half_frac``: tokens whose weight fell below one half) or GRPO's clipped fraction
(``clip_frac``), and the rollout-vs-old mismatch (``mismatch_abs_mean``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"sapo": REPO / "recipes" / "tiny_cpu_sapo.yaml", "grpo": REPO / "recipes" / "tiny_cpu_grpo.yaml"}


def run_cell(out: Path, loss: str, k: int, steps: int, extra: list[str]) -> Path:
    run_dir = out / f"{loss}_k{k}"
    if (run_dir / "summary.json").exists():
        return run_dir
    overrides = [f"trainer.run_dir={run_dir}", f"trainer.steps={steps}", "trainer.save_interval=0",
                 f"rollout.max_staleness={k}", "rollout.mode=remote", "rollout.collect_routed_experts=false", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, "-m", "sapo_megatron.cli", "train", str(RECIPES[loss]), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{run_dir.name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"[{run_dir.name}] done", flush=True)
    return run_dir


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def row(run_dir: Path, loss: str, k: int) -> str:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["reward/val_mean"] for r in records if "reward/val_mean" in r]
    steps = [r for r in records if "reward/mean" in r]
    last = [r["reward/mean"] for r in steps[-50:]]
    last_mb = max(int(key.split("/")[1][2:]) for key in steps[0] if key.startswith("ratio/mb"))
    stat = lambda name: mean([r[f"ratio/mb{last_mb}/{name}"] for r in steps if f"ratio/mb{last_mb}/{name}" in r])
    gate = (f"gradient weight {stat('gate_weight_mean'):.3f}, below 1/2 {stat('gate_weight_below_half_frac'):.4f}"
            if loss == "sapo" else f"clipped {stat('clip_frac'):.4f}")
    mismatch = mean([r["mismatch/mismatch_abs_mean"] for r in steps if "mismatch/mismatch_abs_mean" in r])
    return (f"| {loss} | {k} | {evals[0]:.3f} | {max(evals):.3f} | {evals[-1]:.3f} | {mean(last):.3f} | "
            f"{stat('ratio_std'):.4f} | {gate} | {mismatch:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", default="sapo,grpo")
    parser.add_argument("--staleness", default="0,1,2,4")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--parallel", type=int, default=1, help="cells run at once")
    parser.add_argument("--out", default=str(REPO / "runs" / "staleness_study"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="for every cell (e.g. seeds)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = [(loss, int(k)) for loss in args.losses.split(",") for k in args.staleness.split(",")]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        dirs = list(pool.map(lambda cell: run_cell(out, *cell, args.steps, args.overrides), cells))
    print("| loss | k | held-out at start | best | final | train reward, last 50 steps | ratio std, last "
          "mini-batch | gate / clip, last mini-batch | rollout-vs-old mismatch |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for (loss, k), run_dir in zip(cells, dirs):
        print(row(run_dir, loss, k))


if __name__ == "__main__":
    main()
