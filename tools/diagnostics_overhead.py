#!/usr/bin/env python
"""The cost of the per-step diagnostics as a share of the step, from a run's own timings.

The trainer times the diagnostics (mismatch, ratio quantiles, routing change, variance attribution,
histograms) separately from rollout, old log-probs, update and sync in every step, so the ratio
``time/diagnostics / time/step`` is measured in the same run and on the same machine load as its baseline.
Target: at most 5% of the step time.

    python tools/diagnostics_overhead.py runs/tiny_cpu_sapo [more run dirs]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sapo_megatron.diagnostics.run_logger import read_metrics  # noqa: E402

TARGET = 0.05


def overhead(run_dir: Path) -> dict[str, float]:
    records = [r for r in read_metrics(run_dir) if r.get("time/step") and r.get("time/diagnostics") is not None]
    if not records:
        raise SystemExit(f"{run_dir}: no step with time/step and time/diagnostics in metrics.jsonl")
    shares = sorted(r["time/diagnostics"] / r["time/step"] for r in records)
    total = sum(r["time/diagnostics"] for r in records) / sum(r["time/step"] for r in records)
    return {
        "steps": len(records),
        "share_of_total_time": total,
        "median_step_share": statistics.median(shares),
        "p90_step_share": shares[int(0.9 * (len(shares) - 1))],
        "median_diagnostics_s": statistics.median(r["time/diagnostics"] for r in records),
        "median_step_s": statistics.median(r["time/step"] for r in records),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    worst = 0.0
    for run_dir in args.run_dirs:
        result = overhead(run_dir)
        worst = max(worst, result["share_of_total_time"])
        print(
            f"{run_dir}: {result['steps']} steps; diagnostics = {result['share_of_total_time']:.2%} of the total "
            f"step time (median step {result['median_step_share']:.2%}, p90 {result['p90_step_share']:.2%}; "
            f"median {result['median_diagnostics_s'] * 1000:.0f} ms of {result['median_step_s']:.2f} s)"
        )
    print(f"target <= {TARGET:.0%}: {'met' if worst <= TARGET else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
