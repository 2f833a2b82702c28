"""Per-step metrics and histograms to TensorBoard event files and to JSONL files in the run directory.

The JSONL files are the run's machine-readable record (the dashboard and the tests read them):
``metrics.jsonl`` holds one line per step, ``histograms.jsonl`` one line per (step, histogram name). Each line
is written whole and flushed, so a killed run leaves only complete lines (at worst one torn last line, which
readers skip). On resume, lines of steps after the checkpoint are dropped from both files so that the record
has each step once. The format is documented in docs/diagnostics.md, "Run directory and dashboard".
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: the dashboard imports this module's file names and
# readers, and reading a run directory should not pay for importing torch.

METRICS_FILE = "metrics.jsonl"
HISTOGRAMS_FILE = "histograms.jsonl"
TENSORBOARD_DIR = "tensorboard"

# TensorBoard custom-scalars layout: category -> chart title -> tag regexes (anchored, matched against the
# scalar names RunLogger.log writes). The dashboard draws the same groups; regexes instead of literal names so
# that one layout fits any number of mini-batches and layers, and runs without routing or gate metrics.
CUSTOM_SCALARS_LAYOUT: dict[str, dict[str, list[str]]] = {
    "reward and loss": {
        "reward (train mean, validation mean)": [r"^reward/.*$"],
        "policy loss": [r"^loss/.*$"],
    },
    "importance ratio r = pi / pi_old": {
        "Var_i of log r, mean over sequences (per mini-batch)": [r"^ratio/mb\d+/log_ratio_seq_var_mean$"],
        "SAPO bound tau^2 Var_i / 4 (per mini-batch)": [r"^ratio/mb\d+/log_ratio_seq_var_bound_mean$"],
        "ratio mean and std": [r"^ratio/mb\d+/ratio_(mean|std)$"],
        "ratio min and max": [r"^ratio/mb\d+/ratio_(min|max)$"],
        "SAPO gate: mean f(r), mean weight, fraction with weight < 1/2": [
            r"^ratio/mb\d+/gate_(mean|weight_mean|weight_below_half_frac)$"
        ],
        "clipped fraction (clip / dual_clip / gspo / cispo)": [r"^ratio/mb\d+/(dual_)?clip_frac$"],
    },
    "train/rollout mismatch (delta = logprobs_old - logprobs_rollout)": {
        "KL(pi_rollout || pi_old) k3 and chi^2": [r"^mismatch/mismatch_(kl_k3|chi2)$"],
        "mean delta, mean |delta|, max |delta|": [r"^mismatch/mismatch_(mean|abs_mean|abs_max)$"],
        "fraction of tokens beyond 2x / 5x": [r"^mismatch/mismatch_frac_above_ln[25]$"],
        "log PPL_rollout - log PPL_old (mean over sequences)": [r"^mismatch/mismatch_seq_log_ppl_diff$"],
    },
    "MoE routing": {
        "changed (token, layer) pairs, all layers": [r"^routing/[^/]+/routing_changed_frac_mean$"],
        "tokens with >= 1 changed layer": [r"^routing/[^/]+/routing_token_changed_frac$"],
        "changed fraction per layer, rollout vs old": [r"^routing/rollout_vs_old/routing_changed_frac/layer\d+$"],
        "changed fraction per layer, old vs update": [r"^routing/old_vs_mb\d+/routing_changed_frac/layer\d+$"],
        "top-k overlap, all layers": [r"^routing/[^/]+/routing_overlap_mean$"],
        "tokens without a recorded routing": [r"^routing/[^/]+/routing_unrecorded_frac$"],
        "router entropy per layer (nats, old-logprob pass)": [r"^routing/router_entropy/layer\d+$"],
        "router entropy, mean over layers": [r"^routing/router_entropy_mean$"],
        "expert load imbalance, mean over layers (max/mean, CV)": [
            r"^routing/expert_load/load_(max_over_mean|cv)_mean$"
        ],
        "expert load entropy per layer (1 = balanced)": [r"^routing/expert_load/load_entropy_norm/layer\d+$"],
    },
    "routing-induced variance": {
        "share of variance vs share of tokens, routing-changed tokens": [
            r"^attribution/[^/]+/(var_share_changed|changed_token_frac)$"
        ],
        "eta^2, within-sequence share": [r"^attribution/[^/]+/(eta2|seq_var_share_changed|within_seq_frac)$"],
    },
    "time": {
        "seconds per phase": [r"^time/.*$"],
    },
}


class RunLogger:
    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int = 0):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / METRICS_FILE
        self.histograms_path = self.run_dir / HISTOGRAMS_FILE
        self._truncate_after(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(
            str(self.run_dir / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step else None
        )
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._histograms = open(self.histograms_path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        for path in (self.jsonl_path, self.histograms_path):
            if not path.exists():
                continue
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line of a killed run
                if isinstance(record, dict) and int(record.get("step", 0)) <= step:
                    kept.append(line)
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
            os.replace(tmp, path)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        clean = {}
        for key, value in metrics.items():
            value = float(value)
            clean[key] = value if math.isfinite(value) else None
            if math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        self._writer.flush()

    def log_histogram(self, step: int, name: str, values: torch.Tensor, edges: torch.Tensor | Sequence[float]) -> dict:
        """Histogram of ``values`` over the bins ``edges`` to ``histograms.jsonl`` and TensorBoard; returns the record.

        See :func:`histogram_record` for the bin convention and the out-of-range counts. The TensorBoard
        histogram has the same bins plus one bucket each for the values below and above the range.
        """
        return self.log_histogram_summary(histogram_summary(step, name, values, edges))

    def log_histogram_summary(self, summary: dict) -> dict:
        """Logs a :func:`histogram_summary` (of one rank's values, or merged over ranks); returns the record."""
        record = {key: summary[key] for key in HISTOGRAM_RECORD_KEYS}
        self._histograms.write(json.dumps(record) + "\n")
        self._histograms.flush()
        if summary["num"] > 0:
            # TensorBoard bucket i holds (limit[i-1], limit[i]]: an underflow bucket ending at edges[0] and an
            # overflow bucket ending at the maximum keep every finite value in the histogram.
            limits = [record["edges"][0], *record["edges"][1:], max(summary["max"], record["edges"][-1])]
            counts = [record["underflow"], *record["counts"], record["overflow"]]
            self._writer.add_histogram_raw(
                record["name"],
                min=summary["min"],
                max=summary["max"],
                num=summary["num"],
                sum=summary["sum"],
                sum_squares=summary["sum_squares"],
                bucket_limits=limits,
                bucket_counts=counts,
                global_step=record["step"],
            )
            self._writer.flush()
        return record

    def close(self) -> None:
        self._writer.close()
        self._jsonl.close()
        self._histograms.close()


HISTOGRAM_RECORD_KEYS = ("step", "name", "edges", "counts", "underflow", "overflow", "nonfinite")


def histogram_summary(step: int, name: str, values: torch.Tensor, edges: torch.Tensor | Sequence[float]) -> dict:
    """:func:`histogram_record` plus the finite values' ``num``, ``sum``, ``sum_squares``, ``min`` and ``max``
    (TensorBoard's histogram fields): everything that :func:`merge_histogram_summaries` adds over ranks."""
    import torch

    values = torch.as_tensor(values).detach().reshape(-1).to("cpu", torch.float64)
    summary = histogram_record(step, name, values, edges)
    finite = values[torch.isfinite(values)]
    empty = finite.numel() == 0
    summary.update(
        num=int(finite.numel()),
        sum=float(finite.sum()),
        sum_squares=float(finite.square().sum()),
        min=math.inf if empty else float(finite.min()),
        max=-math.inf if empty else float(finite.max()),
    )
    return summary


def merge_histogram_summaries(parts: Sequence[dict]) -> dict:
    """One :func:`histogram_summary` of the values of all ``parts`` (same step, name and edges): counts and
    sums add, extremes combine. One part is returned as it is."""
    if not parts:
        raise ValueError("merge_histogram_summaries needs at least one summary")
    first = parts[0]
    if len(parts) == 1:
        return dict(first)
    for part in parts[1:]:
        if (part["step"], part["name"], part["edges"]) != (first["step"], first["name"], first["edges"]):
            raise ValueError(
                f"cannot merge histogram {part['name']!r} (step {part['step']}) into {first['name']!r} "
                f"(step {first['step']}): step, name and edges must be the same"
            )
    merged = {key: first[key] for key in ("step", "name", "edges")}
    merged["counts"] = [sum(column) for column in zip(*(p["counts"] for p in parts))]
    for key in ("underflow", "overflow", "nonfinite", "num", "sum", "sum_squares"):
        merged[key] = sum(p[key] for p in parts)
    merged["min"] = min(p["min"] for p in parts)
    merged["max"] = max(p["max"] for p in parts)
    return merged


def histogram_record(step: int, name: str, values: torch.Tensor, edges: torch.Tensor | Sequence[float]) -> dict:
    """``{"step", "name", "edges", "counts", "underflow", "overflow", "nonfinite"}`` for one histogram line.

    ``counts[i]`` counts the values ``v`` with ``edges[i] <= v < edges[i + 1]``; the last bin also holds
    ``v == edges[-1]`` (NumPy's convention). Finite values below ``edges[0]`` / above ``edges[-1]`` are counted
    in ``underflow`` / ``overflow`` and NaN / inf in ``nonfinite``, so no value is silently lost.
    ``values`` may have any shape and live on any device; ``edges`` is a strictly increasing 1-d sequence of at
    least two finite numbers.
    """
    import torch

    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"step={step!r}: must be an int")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r}: must be a non-empty string such as 'log_ratio/stable'")
    edges_t = torch.as_tensor(edges, dtype=torch.float64).detach().to("cpu")
    if edges_t.dim() != 1 or edges_t.numel() < 2:
        raise ValueError(f"edges of histogram {name!r} must be 1-d with >= 2 values, got shape {tuple(edges_t.shape)}")
    if not bool(torch.isfinite(edges_t).all()) or not bool((edges_t[1:] > edges_t[:-1]).all()):
        raise ValueError(f"edges of histogram {name!r} must be finite and strictly increasing, got {edges_t.tolist()}")
    values_t = torch.as_tensor(values).detach().reshape(-1).to("cpu", torch.float64)
    finite_mask = torch.isfinite(values_t)
    finite = values_t[finite_mask]
    num_bins = edges_t.numel() - 1
    bin_index = torch.searchsorted(edges_t, finite, right=True) - 1
    bin_index = torch.where(finite == edges_t[-1], num_bins - 1, bin_index)
    in_range = (bin_index >= 0) & (bin_index < num_bins)
    counts = torch.bincount(bin_index[in_range], minlength=num_bins)
    return {
        "step": step,
        "name": name,
        "edges": edges_t.tolist(),
        "counts": [int(c) for c in counts.tolist()],
        "underflow": int((finite < edges_t[0]).sum()),
        "overflow": int((finite > edges_t[-1]).sum()),
        "nonfinite": int((~finite_mask).sum()),
    }


def flatten_metrics(
    metrics: Mapping[str, torch.Tensor | float], prefix: str = "", *, index: str = "layer"
) -> dict[str, float]:
    """Scalars as ``prefix + name``; 1-d tensors as ``prefix + name + "/" + index + str(i)``, one key per entry.

    The run directory's scalar naming (docs/diagnostics.md), and the only flattener of the package: a per-layer
    vector such as ``routing_changed_frac`` [layers] becomes ``.../routing_changed_frac/layer0``, ``.../layer1``,
    ...; a vector indexed by something else passes ``index`` (the variance attribution's per-group vectors,
    indexed by changed-layer count: ``index=""`` gives ``.../0``, ``.../1``). Tensors with more than one
    dimension (e.g. the expert load [layers, experts]) are rejected: pick a per-layer summary of them, or log
    them as a histogram.
    """
    import torch

    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(value, torch.Tensor):
            # A Python number keeps its float64 digits (torch.as_tensor would round it to float32).
            out[prefix + name] = float(value)
            continue
        tensor = value.detach()
        if tensor.dim() == 0:
            out[prefix + name] = float(tensor)
        elif tensor.dim() == 1:
            for position, entry in enumerate(tensor.to("cpu", torch.float64).tolist()):
                out[f"{prefix}{name}/{index}{position}"] = entry
        else:
            raise ValueError(
                f"metric {prefix + name!r} has shape {tuple(tensor.shape)}; only scalars and 1-d vectors can be "
                f"logged (summarise a matrix per layer, or log it as a histogram)"
            )
    return out


def write_custom_scalars_layout(run_dir: str | os.PathLike) -> Path:
    """Writes :data:`CUSTOM_SCALARS_LAYOUT` into the run's TensorBoard directory; returns that directory.

    Call once when a run starts (again on resume is harmless). TensorBoard's "Custom Scalars" tab then shows
    the metrics grouped as the dashboard groups them.
    """
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(run_dir) / TENSORBOARD_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    layout = {
        category: {title: ["Multiline", list(tags)] for title, tags in charts.items()}
        for category, charts in CUSTOM_SCALARS_LAYOUT.items()
    }
    # A writer of its own (a separate event file in the same directory): add_custom_scalars may be called
    # only once per writer, and the layout must not depend on whether a RunLogger is open.
    writer = SummaryWriter(str(log_dir), filename_suffix=".layout")
    try:
        writer.add_custom_scalars(layout)
    finally:
        writer.close()
    return log_dir


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_histograms(run_dir: str | os.PathLike) -> list[dict]:
    """The complete lines of ``histograms.jsonl`` (``[]`` when the file does not exist); torn lines are skipped."""
    path = Path(run_dir) / HISTOGRAMS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
