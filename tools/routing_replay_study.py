"""Routing replay study: does replaying MoE routing in the update reduce the importance-ratio variance, and
what does it do to reward?

    python tools/routing_replay_study.py [--out runs/routing_study] [--steps 120] [--seed 0]
                                         [--figures docs/figures] [--skip-training] [--only NAME ...]
                                         [--set KEY=VALUE ...]
    python tools/routing_replay_study.py --out runs/routing_seeds --across STUDY_DIR STUDY_DIR ...

Four runs with the same seed and settings, each into ``<out>/<name>``, one after the other (each in its
own ``sapo-megatron train`` process, so a crash in one is reported and the others still run):

  dense        the dense control of the same width (``model.dense=true``): no routing at all
  moe_off      the MoE, routers choose freely in every pass (``algorithm.routing_replay=off``)
  moe_old      the update replays the routing recorded in the old-logprob recompute (``routing_replay=old``)
  moe_rollout  the old-logprob recompute and the update replay the rollout engine's routing
               (``routing_replay=rollout``)

Then it reads each run's ``metrics.jsonl`` and writes ``<out>/table.md`` (also printed) and three PNGs into
``--figures``: held-out reward per step, the last mini-batch's ratio spread per step, and the fraction of
tokens whose routing changed per step (with the variance share those tokens carry). ``--skip-training`` only
re-analyses existing run directories; ``--only`` trains a subset (all four are analysed); ``--set`` adds
overrides for every run (a smoke run: ``--steps 2 --set trainer.sft_warmup_steps=2``). ``--across`` trains
nothing and summarises several study directories (one per seed, say) as mean [min, max] per config, with a
plot of their held-out reward curves.

The settings are passed as explicit overrides on top of ``--recipe`` so that the study does not move when
the demo recipe is re-tuned. The last mini-batch is the one that is furthest off-policy (earlier
mini-batches' optimizer steps have already moved the weights), so it is where the update ratio spreads and
where routing changes between the old-logprob pass and the update.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO_ROOT / "recipes" / "tiny_cpu_sapo.yaml"

# The study's own settings: everything the comparison depends on, so that a re-tuned recipe does not
# change it. Two mini-batches: with one, the update's forward sees the old weights and replay changes
# nothing but nondeterminism.
BASE_OVERRIDES = (
    "data.train=toy:reverse",
    "reward.fn=toy_exact",
    "algorithm.policy_loss=sapo",
    "algorithm.advantage=grpo",
    "algorithm.num_mini_batches=2",
    "rollout.n_samples=8",
    "rollout.max_new_tokens=8",
    "rollout.temperature=1.0",
    "data.prompts_per_step=16",
    "trainer.micro_batch_size=32",
    "trainer.sft_warmup_steps=90",
    "trainer.sft_lr=3e-3",
    "optimizer.lr=5e-4",
    "trainer.eval_interval=20",
    "trainer.save_interval=0",
    "trainer.resume=false",
)


@dataclass(frozen=True)
class StudyConfig:
    name: str
    label: str
    overrides: tuple[str, ...]


# Override values are parsed as YAML 1.1, where a bare `off` is the boolean false: quote it.
REPLAY_OFF = "algorithm.routing_replay='off'"
CONFIGS = (
    StudyConfig("dense", "dense control", ("model.dense=true", REPLAY_OFF)),
    StudyConfig("moe_off", "MoE, replay off", (REPLAY_OFF, "rollout.collect_routed_experts=true")),
    StudyConfig("moe_old", "MoE, replay old", ("algorithm.routing_replay=old", "rollout.collect_routed_experts=true")),
    StudyConfig(
        "moe_rollout",
        "MoE, replay rollout",
        ("algorithm.routing_replay=rollout", "rollout.collect_routed_experts=true"),
    ),
)
CONFIG_NAMES = tuple(c.name for c in CONFIGS)
STATUS_FILE = "study_status.json"


def run_overrides(
    config: StudyConfig, *, run_dir: Path, steps: int, seed: int, extra: Sequence[str] = ()
) -> list[str]:
    """The run's overrides. ``extra`` (the same for every config) wins over the study's base settings; the
    config's own knobs (replay mode, dense) come last, so that the four runs always differ in them."""
    seeds = (f"trainer.seed={seed}", f"data.seed={seed}", f"rollout.seed={seed}")
    return [*BASE_OVERRIDES, *seeds, f"trainer.steps={steps}", f"trainer.run_dir={run_dir}", *extra, *config.overrides]


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def train_config(
    config: StudyConfig, *, out: Path, recipe: Path, steps: int, seed: int, timeout_s: float, extra: Sequence[str] = ()
) -> dict:
    """Trains one config in a fresh process (its own process group, killed whole on timeout).

    The run directory is emptied first: the study compares runs started from scratch, and a leftover
    ``metrics.jsonl`` would be appended to.
    """
    run_dir = out / config.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    command = [
        sys.executable, "-m", "sapo_megatron.cli", "train", str(recipe.resolve()),
        *run_overrides(config, run_dir=run_dir, steps=steps, seed=seed, extra=extra),
    ]
    log_path = out / f"{config.name}.log"
    print(f"[study] {config.name}: training ({steps} steps), log {log_path}", flush=True)
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = None
        except KeyboardInterrupt:
            # The run has its own session, so Ctrl-C does not reach it: end it (and its workers) here.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    status = {
        "name": config.name,
        "returncode": returncode,
        "timed_out": returncode is None,
        "wall_seconds": time.perf_counter() - started,
        "command": command,
        "log": str(log_path),
    }
    (run_dir / STATUS_FILE).write_text(json.dumps(status, indent=2) + "\n")
    if returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        what = "timed out" if returncode is None else f"exited with code {returncode}"
        print(f"[study] {config.name} {what}; last lines of {log_path}:", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr, flush=True)
    else:
        print(f"[study] {config.name}: done in {status['wall_seconds']:.0f} s", flush=True)
    return status


# ----------------------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RunData:
    name: str
    label: str
    records: list[dict]
    status: Optional[dict]

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every record with a finite value for ``key``, in step order, last record wins."""
        by_step: dict[int, float] = {}
        for record in self.records:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                by_step[int(record["step"])] = float(value)
        return sorted(by_step.items())

    def train_series(self, key: str) -> list[tuple[int, float]]:
        """Only the RL steps (step >= 1): step 0 is the validation before the first update."""
        return [(s, v) for s, v in self.series(key) if s >= 1]

    @property
    def last_mini_batch(self) -> Optional[int]:
        indices = {int(m.group(1)) for r in self.records for k in r for m in [MB_KEY.match(k)] if m}
        return max(indices) if indices else None

    @property
    def state(self) -> str:
        if self.status is not None and self.status.get("timed_out"):
            return "timed out"
        if self.status is not None and self.status.get("returncode") not in (0, None):
            return f"crashed (exit {self.status['returncode']})"
        if not self.records:
            return "no metrics"
        return "ok"


MB_KEY = re.compile(r"^ratio/mb(\d+)/")


def read_run(run_dir: Path, *, name: str, label: str) -> RunData:
    from sapo_megatron.diagnostics.run_logger import read_metrics

    metrics_path = run_dir / "metrics.jsonl"
    records = read_metrics(run_dir) if metrics_path.exists() else []
    records = [r for r in records if isinstance(r.get("step"), int)]
    status_path = run_dir / STATUS_FILE
    status = json.loads(status_path.read_text()) if status_path.exists() else None
    return RunData(name=name, label=label, records=records, status=status)


def read_study(out: Path, configs: Sequence[StudyConfig] = CONFIGS) -> list[RunData]:
    return [read_run(out / c.name, name=c.name, label=c.label) for c in configs]


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------


def mean_of(points: list[tuple[int, float]]) -> Optional[float]:
    return sum(v for _, v in points) / len(points) if points else None


def _mb_key(run: RunData, template: str) -> Optional[str]:
    k = run.last_mini_batch
    return None if k is None else template.format(k=k)


def _mean_metric(template: str) -> Callable[[RunData], Optional[float]]:
    """Mean over the RL steps of a metric; ``{k}`` in the name is the run's last mini-batch."""

    def value(run: RunData) -> Optional[float]:
        key = _mb_key(run, template) if "{k}" in template else template
        return None if key is None else mean_of(run.train_series(key))

    return value


def _final_val(run: RunData) -> Optional[float]:
    points = run.series("reward/val_mean")
    return points[-1][1] if points else None


def _best_val(run: RunData) -> Optional[str]:
    points = run.series("reward/val_mean")
    if not points:
        return None
    step, value = max(points, key=lambda p: (p[1], -p[0]))  # the earliest step reaching the best value
    return f"{value:.3f} (step {step})"


def _start_val(run: RunData) -> Optional[float]:
    points = [(s, v) for s, v in run.series("reward/val_mean") if s == 0]
    return points[0][1] if points else None


TRAIN_REWARD_TAIL = 20


def _pooled_share(run: RunData) -> Optional[float]:
    """sum over steps of SS_changed / sum of SS_total (old vs last mini-batch): high-variance steps weigh more."""
    changed = _mb_key(run, "attribution/old_vs_mb{k}/ss_changed")
    total = _mb_key(run, "attribution/old_vs_mb{k}/ss_total")
    if changed is None or total is None:
        return None
    ss_changed, ss_total = dict(run.train_series(changed)), dict(run.train_series(total))
    steps = ss_changed.keys() & ss_total.keys()
    denominator = sum(ss_total[s] for s in steps)
    return sum(ss_changed[s] for s in steps) / denominator if steps and denominator > 0 else None


def _train_reward_tail(run: RunData) -> Optional[float]:
    return mean_of(run.train_series("reward/mean")[-TRAIN_REWARD_TAIL:])


# Metric names; ``{k}`` is the run's last mini-batch.
RATIO_STD = "ratio/mb{k}/ratio_std"
LOG_RATIO_VAR = "ratio/mb{k}/log_ratio_seq_var_mean"
CHANGED_IN_UPDATE = "routing/old_vs_mb{k}/routing_token_changed_frac"
CHANGED_ROLLOUT_VS_OLD = "routing/rollout_vs_old/routing_token_changed_frac"
VAR_SHARE_CHANGED = "attribution/old_vs_mb{k}/var_share_changed"

# (row label, value function, format). Means are over the RL steps 1..N of each run.
ROWS: tuple[tuple[str, Callable[[RunData], object], str], ...] = (
    ("run", lambda r: r.state, "text"),
    ("RL steps logged", lambda r: len(r.train_series("reward/mean")), "int"),
    ("held-out reward, after warm-up (step 0)", _start_val, "reward"),
    ("held-out reward, final", _final_val, "reward"),
    ("held-out reward, best", _best_val, "text"),
    (f"train reward, mean of last {TRAIN_REWARD_TAIL} steps", _train_reward_tail, "reward"),
    ("train/rollout mismatch `mismatch_abs_mean`", _mean_metric("mismatch/mismatch_abs_mean"), "sci"),
    ("train/rollout mismatch `mismatch_kl_k3`", _mean_metric("mismatch/mismatch_kl_k3"), "sci"),
    ("ratio std, last mini-batch", _mean_metric(RATIO_STD), "sci"),
    ("Var_i of log r, last mini-batch (`log_ratio_seq_var_mean`)", _mean_metric(LOG_RATIO_VAR), "sci"),
    ("tokens with routing changed, old vs last mini-batch", _mean_metric(CHANGED_IN_UPDATE), "frac"),
    ("tokens with routing changed, rollout vs old", _mean_metric(CHANGED_ROLLOUT_VS_OLD), "frac"),
    ("share of log r variance on routing-changed tokens (`var_share_changed`)", _mean_metric(VAR_SHARE_CHANGED), "frac"),
    ("same, pooled over steps (sum SS_changed / sum SS_total)", _pooled_share, "frac"),
    ("SAPO gate weight mean, last mini-batch", _mean_metric("ratio/mb{k}/gate_weight_mean"), "fixed6"),
    (
        "fraction softly suppressed (gate weight < 1/2), last mini-batch",
        _mean_metric("ratio/mb{k}/gate_weight_below_half_frac"),
        "sci",
    ),
    ("step time, mean (s)", _mean_metric("time/step"), "seconds"),
    ("  of which update (s)", _mean_metric("time/update"), "seconds"),
    ("wall time of the run incl. start-up and warm-up (s)", lambda r: (r.status or {}).get("wall_seconds"), "seconds"),
)


def format_value(value: object, kind: str) -> str:
    if value is None:
        return "—"
    if kind in ("text",):
        return str(value)
    if kind == "int":
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if kind == "reward":
        return f"{value:.3f}"
    if kind == "seconds":
        return f"{value:.1f}"
    if kind == "fixed6":
        return f"{value:.6f}"
    if kind == "frac":
        return "0" if value == 0 else (f"{value:.2e}" if abs(value) < 1e-3 else f"{value:.4f}")
    if kind == "sci":
        return "0" if value == 0 else f"{value:.3e}"
    raise ValueError(f"unknown format {kind!r}")


def study_table(runs: Sequence[RunData]) -> str:
    """A markdown table: one row per metric, one column per config ("—" where a run has no such metric)."""
    header = "| metric | " + " | ".join(f"{r.label} (`{r.name}`)" for r in runs) + " |"
    lines = [header, "|---|" + "---:|" * len(runs)]
    for label, fn, kind in ROWS:
        lines.append(f"| {label} | " + " | ".join(format_value(fn(r), kind) for r in runs) + " |")
    return "\n".join(lines) + "\n"


# Rows of the across-seeds table: (label, value function, format); each cell is the mean over the study
# directories and, in brackets, the min and max.
ACROSS_ROWS: tuple[tuple[str, Callable[[RunData], Optional[float]], str], ...] = (
    ("held-out reward, final", _final_val, "reward"),
    ("held-out reward, best", lambda r: max((v for _, v in r.series("reward/val_mean")), default=None), "reward"),
    (f"train reward, mean of last {TRAIN_REWARD_TAIL} steps", _train_reward_tail, "reward"),
    ("ratio std, last mini-batch", _mean_metric(RATIO_STD), "sci"),
    ("Var_i of log r, last mini-batch", _mean_metric(LOG_RATIO_VAR), "sci"),
    ("tokens with routing changed, old vs last mini-batch", _mean_metric(CHANGED_IN_UPDATE), "frac"),
    ("tokens with routing changed, rollout vs old", _mean_metric(CHANGED_ROLLOUT_VS_OLD), "frac"),
    ("`var_share_changed`, old vs last mini-batch", _mean_metric(VAR_SHARE_CHANGED), "frac"),
    ("same, pooled over steps", _pooled_share, "frac"),
)


def across_table(studies: Sequence[Sequence[RunData]]) -> str:
    """Mean [min, max] of each config's summary values over several study directories (e.g. seeds)."""
    configs = [(r.name, r.label) for r in studies[0]]
    header = "| metric | " + " | ".join(f"{label} (`{name}`)" for name, label in configs) + " |"
    lines = [header, "|---|" + "---:|" * len(configs)]
    for label, fn, kind in ACROSS_ROWS:
        cells = []
        for i in range(len(configs)):
            values = [v for runs in studies if runs[i].state == "ok" for v in [fn(runs[i])] if v is not None]
            if not values:
                cells.append("—")
                continue
            mean = sum(values) / len(values)
            low, high = (format_value(v, kind) for v in (min(values), max(values)))
            cells.append(f"{format_value(mean, kind)} [{low}, {high}] (n={len(values)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The plots
# ----------------------------------------------------------------------------------------------------------

FIGURE_NAMES = ("routing_study_reward.png", "routing_study_ratio_std.png", "routing_study_routing_changed.png")
COLORS = {"dense": "tab:gray", "moe_off": "tab:red", "moe_old": "tab:blue", "moe_rollout": "tab:green"}
# Distinct line styles, so that configs with identical values (all zero, say) stay visible on top of each other.
STYLES = {"dense": "-", "moe_off": "-", "moe_old": "--", "moe_rollout": ":"}


def _rolling(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    out = []
    for i in range(len(points)):
        part = points[max(0, i - window + 1) : i + 1]
        out.append((points[i][0], sum(v for _, v in part) / len(part)))
    return out


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def _plot(ax, run: RunData, points, **kwargs) -> bool:
    if not points:
        return False
    xs, ys = zip(*points)
    kwargs.setdefault("linestyle", STYLES.get(run.name, "-"))
    kwargs.setdefault("label", run.label)
    ax.plot(xs, ys, color=COLORS.get(run.name), **kwargs)
    return True


def plot_study(runs: Sequence[RunData], figures: Path, *, title_suffix: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [figures / name for name in FIGURE_NAMES]

    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(12, 4))
    for run in runs:
        _plot(ax_val, run, run.series("reward/val_mean"), marker="o")
        _plot(ax_train, run, _rolling(run.train_series("reward/mean"), 10))
    ax_val.set_title("held-out reward (64 prompts, 1 sample, fixed seed)" + title_suffix)
    ax_train.set_title("train reward, rolling mean over 10 steps" + title_suffix)
    for ax in (ax_val, ax_train):
        ax.set_xlabel("RL step")
        ax.set_ylabel("mean reward")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    _save(fig, paths[0])

    fig, (ax_std, ax_var) = plt.subplots(1, 2, figsize=(12, 4))
    for run in runs:
        std_key = _mb_key(run, RATIO_STD)
        var_key = _mb_key(run, LOG_RATIO_VAR)
        if std_key:
            _plot(ax_std, run, run.train_series(std_key), alpha=0.85)
        if var_key:
            _plot(ax_var, run, [(s, v) for s, v in run.train_series(var_key) if v > 0], alpha=0.85)
    ax_std.set_title("ratio std, last mini-batch" + title_suffix)
    ax_var.set_title("Var_i of log r (mean over sequences), last mini-batch" + title_suffix)
    ax_var.set_yscale("log")
    for ax in (ax_std, ax_var):
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, paths[1])

    fig, (ax_upd, ax_roll, ax_share) = plt.subplots(1, 3, figsize=(18, 4.5))
    for run in runs:
        key = _mb_key(run, CHANGED_IN_UPDATE)
        if key:
            _plot(ax_upd, run, run.train_series(key), alpha=0.85)
        _plot(ax_roll, run, run.train_series(CHANGED_ROLLOUT_VS_OLD), alpha=0.85)
        # Per step: the share of the log-ratio sum of squares on routing-changed tokens against their share
        # of the tokens. Points above the diagonal: the variance is concentrated on those tokens.
        frac_key = _mb_key(run, "attribution/old_vs_mb{k}/changed_token_frac")
        share_key = _mb_key(run, VAR_SHARE_CHANGED)
        if frac_key and share_key:
            share = dict(run.train_series(share_key))
            points = [(f, share[s]) for s, f in run.train_series(frac_key) if s in share and f > 0]
            if points:
                xs, ys = zip(*points)
                ax_share.scatter(xs, ys, s=12, color=COLORS.get(run.name), label=f"{run.label} ({len(points)} steps)")
    ax_upd.set_title("tokens with routing changed: old pass vs last mini-batch" + title_suffix)
    ax_roll.set_title("tokens with routing changed: rollout (vLLM) vs old pass" + title_suffix)
    ax_share.set_title("log r variance share on routing-changed tokens" + title_suffix)
    for ax in (ax_upd, ax_roll):
        ax.set_xlabel("RL step")
        ax.set_ylabel("fraction of response tokens")
    ax_share.set_xlabel("fraction of tokens with routing changed")
    ax_share.set_ylabel("var_share_changed")
    ax_share.axline((0, 0), slope=1, color="black", linewidth=0.8, linestyle="--", label="no concentration (y = x)")
    ax_share.set_xlim(left=0)
    ax_share.set_ylim(-0.02, 1.02)
    for ax in (ax_upd, ax_roll, ax_share):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no routing metrics", ha="center", va="center", transform=ax.transAxes)
    _save(fig, paths[2])
    return paths


ACROSS_FIGURE_NAME = "routing_study_reward_seeds.png"


def plot_across(studies: Sequence[Sequence[RunData]], path: Path) -> Path:
    """Held-out reward per step of each config: every study directory thin, their mean thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(studies[0]):
        curves = [dict(runs[i].series("reward/val_mean")) for runs in studies if runs[i].state == "ok"]
        for curve in curves:
            _plot(ax, run, sorted(curve.items()), alpha=0.25, linewidth=0.8, label=None)
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        mean = [(s, sum(c[s] for c in curves) / len(curves)) for s in steps]
        if mean:
            xs, ys = zip(*mean)
            ax.plot(xs, ys, color=COLORS.get(run.name), linestyle=STYLES.get(run.name, "-"), marker="o",
                    linewidth=2, label=f"{run.label} (mean of {len(curves)})")
    ax.set_title("held-out reward: mean over seeds (thick), each seed (thin)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def analyse(out: Path, figures: Path, configs: Sequence[StudyConfig] = CONFIGS) -> str:
    runs = read_study(out, configs)
    table = study_table(runs)
    (out / "table.md").write_text(table, encoding="utf-8")
    paths = plot_study(runs, figures)
    print(table, flush=True)
    print(f"[study] table: {out / 'table.md'}; figures: {', '.join(str(p) for p in paths)}", flush=True)
    return table


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("runs/routing_study"), help="one run directory per config below it"
    )
    parser.add_argument("--steps", type=int, default=120, help="RL steps per run (after the supervised warm-up)")
    parser.add_argument("--seed", type=int, default=0, help="trainer.seed, data.seed and rollout.seed of every run")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="base recipe under the study's overrides")
    parser.add_argument("--figures", type=Path, default=REPO_ROOT / "docs" / "figures", help="where the PNGs go")
    parser.add_argument("--skip-training", action="store_true", help="only re-analyse the existing run directories")
    parser.add_argument("--only", nargs="+", choices=CONFIG_NAMES, help="train only these configs (all are analysed)")
    parser.add_argument(
        "--set", dest="extra", nargs="+", default=[], metavar="KEY=VALUE",
        help="extra overrides for every config, after the study's own (trainer.sft_warmup_steps=2: a smoke run)",
    )
    parser.add_argument(
        "--across", nargs="+", type=Path, metavar="STUDY_DIR",
        help="no training: summarise several study directories (e.g. one per seed) into <out>/across_seeds.md",
    )
    parser.add_argument("--timeout-min", type=float, default=240.0, help="per-run wall-clock limit in minutes")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps={args.steps}: must be >= 1")

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.across:
        studies = [read_study(d) for d in args.across]
        table = across_table(studies)
        (out / "across_seeds.md").write_text(table, encoding="utf-8")
        figure = plot_across(studies, args.figures / ACROSS_FIGURE_NAME)
        print(table, flush=True)
        print(f"[study] table: {out / 'across_seeds.md'}; figure: {figure}", flush=True)
        return 0
    failed = []
    if not args.skip_training:
        for config in CONFIGS:
            if args.only and config.name not in args.only:
                continue
            status = train_config(
                config, out=out, recipe=args.recipe, steps=args.steps, seed=args.seed,
                timeout_s=args.timeout_min * 60, extra=args.extra,
            )
            if status["returncode"] != 0:
                failed.append(config.name)
    analyse(out, args.figures)
    if failed:
        print(f"[study] failed runs: {', '.join(failed)} (see their logs in {out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
