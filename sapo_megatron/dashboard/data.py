"""Reading run directories for the dashboard: incremental, and tolerant of runs that are live or broken.

A run directory is read on every poll of the page, possibly while the trainer appends to it, so:

* JSONL files are read from where the previous read stopped (:class:`JsonlTail`); a file that was replaced
  (``RunLogger`` truncates on resume with an atomic rename) or shrank is read again from the start;
* an unterminated last line is not parsed yet (the writer may be in the middle of it) and is reported;
* every problem (no directory, no ``metrics.jsonl``, garbage lines, no or bad ``config.yaml``) becomes a
  message on the run, never an exception: one broken run must not hide the others or the page.

Everything returned by :meth:`Dashboard.state` is plain JSON (NaN and inf become ``null``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from sapo_megatron.diagnostics.run_logger import HISTOGRAMS_FILE, METRICS_FILE

CONFIG_FILE = "config.yaml"

# `<prefix>/layer<i>`: one entry of a per-layer vector (RunLogger's flattening of [layers] tensors).
LAYER_KEY = re.compile(r"^(?P<prefix>.+)/layer(?P<index>\d+)$")

# Line numbers quoted in a message; the count is always exact.
_MAX_QUOTED_LINES = 5


@dataclass(frozen=True)
class Message:
    level: str  # "error": nothing of the run can be shown; "warning": shown, but something is off
    text: str

    def to_json(self) -> dict:
        return {"level": self.level, "text": self.text}


def _number(value: Any) -> Optional[float]:
    """A finite float, or None for null / NaN / inf / anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _integer(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _quote_lines(numbers: list[int], total: int) -> str:
    quoted = numbers[:_MAX_QUOTED_LINES]
    shown = ", ".join(str(n) for n in quoted)
    if total == 1:
        return f"line {shown}"
    return f"lines {shown}{', ...' if total > len(quoted) else ''}"


class JsonlTail:
    """The complete, parsed lines of a JSONL file that may still be growing.

    ``records`` holds ``(line_number, object)`` of every line that parsed; ``bad_lines`` the numbers of lines
    that did not (1-based). ``torn_bytes`` is the length of an unterminated last line, which is kept back
    until its newline arrives. ``generation`` changes whenever the records were rebuilt from the start.
    """

    def __init__(self, path: Path):
        self.path = path
        self.exists = False
        self.error: Optional[str] = None
        self.generation = 0
        self._reset(None)

    def _reset(self, identity) -> None:
        self._identity = identity
        self._offset = 0
        self._pending = b""
        self._line_number = 0
        self.records: list[tuple[int, Any]] = []
        self.bad_lines: list[int] = []
        self.num_bad_lines = 0
        self.generation += 1

    @property
    def torn_bytes(self) -> int:
        return len(self._pending)

    @property
    def size(self) -> int:
        return self._offset

    def version(self) -> tuple:
        return (self.exists, self.error, self.generation, self._offset)

    def refresh(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            if self.exists or self.records:
                self._reset(None)
            self.exists, self.error = False, None
            return
        except OSError as exc:
            self.exists, self.error = True, f"cannot read {self.path.name}: {exc}"
            return
        self.exists, self.error = True, None
        identity = (stat.st_dev, stat.st_ino)
        if identity != self._identity or stat.st_size < self._offset:
            self._reset(identity)
        if stat.st_size == self._offset:
            return
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read(stat.st_size - self._offset)
        except OSError as exc:
            self.error = f"cannot read {self.path.name}: {exc}"
            return
        self._offset += len(chunk)
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()  # b"" when the chunk ends with a newline
        for raw in lines:
            self._line_number += 1
            if not raw.strip():
                continue
            try:
                self.records.append((self._line_number, json.loads(raw)))
            except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
                self.num_bad_lines += 1
                if len(self.bad_lines) < _MAX_QUOTED_LINES:
                    self.bad_lines.append(self._line_number)


def _jsonl_messages(tail: JsonlTail) -> list[Message]:
    name = tail.path.name
    out = []
    if tail.num_bad_lines:
        out.append(
            Message(
                "warning",
                f"{name}: {tail.num_bad_lines} line(s) are not valid JSON and were skipped "
                f"({_quote_lines(tail.bad_lines, tail.num_bad_lines)})",
            )
        )
    if tail.torn_bytes:
        out.append(
            Message(
                "warning",
                f"{name}: the last line is incomplete ({tail.torn_bytes} bytes without a newline): the run is "
                f"writing it, or was killed in the middle of it; it is skipped",
            )
        )
    return out


@dataclass
class LayerMatrix:
    """A per-layer metric over steps: ``values[layer][j]`` at ``steps[j]`` (None where not logged)."""

    steps: list[int]
    layers: list[int]
    values: list[list[Optional[float]]]

    def to_json(self) -> dict:
        return {"steps": self.steps, "layers": self.layers, "values": self.values}


def split_layer_keys(keys: Iterable[str]) -> tuple[list[str], dict[str, dict[int, str]]]:
    """Scalar keys, and per-layer keys grouped by prefix: ``{prefix: {layer index: key}}``."""
    scalars, layered = [], {}
    for key in keys:
        match = LAYER_KEY.match(key)
        if match:
            layered.setdefault(match["prefix"], {})[int(match["index"])] = key
        else:
            scalars.append(key)
    return sorted(scalars), {prefix: layered[prefix] for prefix in sorted(layered)}


def assemble_layer_matrix(
    steps: list[int], rows: list[dict[str, Optional[float]]], layer_keys: dict[int, str]
) -> LayerMatrix:
    """The [layer x step] matrix of one per-layer metric; layers are 0 .. max index (missing ones all None)."""
    layers = list(range(max(layer_keys) + 1)) if layer_keys else []
    values = [[row.get(layer_keys[layer]) if layer in layer_keys else None for row in rows] for layer in layers]
    return LayerMatrix(steps=list(steps), layers=layers, values=values)


def read_run_config(path: Path) -> tuple[Optional[dict], list[Message]]:
    """The dashboard's view of ``config.yaml``: policy loss and its hyperparameters, plus any problems.

    Returns ``(summary, messages)``; ``summary`` is None when the file is missing or unreadable, and a key is
    None when that value is missing or invalid (the gate curve needs ``tau_pos`` / ``tau_neg`` for SAPO and
    ``eps_low`` / ``eps_high`` for the clipped losses).
    """
    if not path.exists():
        return None, [
            Message(
                "warning",
                f"{CONFIG_FILE} is missing: the policy loss and its taus / clip range are unknown, so no gate "
                f"curve is drawn for this run",
            )
        ]
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, [Message("warning", f"{CONFIG_FILE} cannot be read ({first_line}); no gate curve for this run")]
    if not isinstance(loaded, dict) or not isinstance(loaded.get("algorithm"), dict):
        return None, [
            Message("warning", f"{CONFIG_FILE} has no 'algorithm' section; the policy loss is unknown, no gate curve")
        ]
    algorithm = loaded["algorithm"]
    messages = []
    policy_loss = algorithm.get("policy_loss")
    if not isinstance(policy_loss, str):
        messages.append(Message("warning", f"{CONFIG_FILE}: algorithm.policy_loss is missing; no gate curve"))
        policy_loss = None
    needed = {
        "sapo": [("sapo", "tau_pos"), ("sapo", "tau_neg")],
        "clip": [("clip", "eps_low"), ("clip", "eps_high")],
        "dual_clip": [("clip", "eps_low"), ("clip", "eps_high"), ("clip", "dual_clip_c")],
    }.get(policy_loss, [])
    summary: dict[str, Any] = {"policy_loss": policy_loss}
    for section, key in [("sapo", "tau_pos"), ("sapo", "tau_neg"), ("clip", "eps_low"), ("clip", "eps_high"),
                         ("clip", "dual_clip_c")]:
        block = algorithm.get(section)
        raw = block.get(key) if isinstance(block, dict) else None
        value = _number(raw)
        if value is not None and value <= 0:
            value = None
        summary[key] = value
        if value is None and (section, key) in needed:
            messages.append(
                Message(
                    "warning",
                    f"{CONFIG_FILE}: algorithm.{section}.{key} is {raw!r}, not a positive number; no gate curve "
                    f"for this run",
                )
            )
    return summary, messages


class RunData:
    """One run directory as the dashboard sees it; :meth:`refresh` re-reads what changed."""

    def __init__(self, path: str | os.PathLike, label: str):
        self.path = Path(path)
        self.label = label
        self._metrics = JsonlTail(self.path / METRICS_FILE)
        self._histograms = JsonlTail(self.path / HISTOGRAMS_FILE)
        self._config_key: Optional[tuple] = None
        self._config: Optional[dict] = None
        self._config_messages: list[Message] = []
        self._derived_key: Optional[tuple] = None
        self._dir_message: Optional[Message] = None
        self._scalars: dict[str, Any] = {}
        self._metrics_messages: list[Message] = []
        self._hist_key: Optional[tuple] = None
        self._hists: dict[str, dict[int, dict]] = {}
        self._hist_messages: list[Message] = []

    # -- reading ---------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        if not self.path.exists():
            self._dir_message = Message("error", f"the run directory {self.path} does not exist (yet)")
        elif not self.path.is_dir():
            self._dir_message = Message("error", f"{self.path} is not a directory")
        else:
            self._dir_message = None
        self._metrics.refresh()
        self._histograms.refresh()
        self._refresh_config()
        if self._derived_key != self._metrics.version():
            self._rebuild_metrics()
            self._derived_key = self._metrics.version()
        if self._hist_key != self._histograms.version():
            self._rebuild_histograms()
            self._hist_key = self._histograms.version()

    def safe_refresh(self) -> None:
        """:meth:`refresh`, turning an unexpected failure into an error message on the run."""
        try:
            self.refresh()
        except Exception as exc:  # noqa: BLE001 - a run that breaks the reader must not break the page
            self._dir_message = Message("error", f"the dashboard could not read this run: {exc!r}")

    def version(self) -> tuple:
        return (self._dir_message, self._metrics.version(), self._histograms.version(), self._config_key)

    def _refresh_config(self) -> None:
        path = self.path / CONFIG_FILE
        try:
            stat = path.stat()
            key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except OSError:
            key = None
        if key == self._config_key and self._config_key is not None:
            return
        self._config_key = key
        if self._dir_message is not None:
            self._config, self._config_messages = None, []
        else:
            self._config, self._config_messages = read_run_config(path)

    def _rebuild_metrics(self) -> None:
        messages: list[Message] = []
        tail = self._metrics
        by_step: dict[int, dict[str, Optional[float]]] = {}
        no_step: list[int] = []
        num_no_step = 0
        duplicates = 0
        non_numeric = 0
        non_numeric_example = ""
        for line_number, record in tail.records:
            step = _integer(record.get("step")) if isinstance(record, dict) else None
            if step is None:
                num_no_step += 1
                if len(no_step) < _MAX_QUOTED_LINES:
                    no_step.append(line_number)
                continue
            row: dict[str, Optional[float]] = {}
            for key, value in record.items():
                if key == "step":
                    continue
                number = _number(value)
                # null is how RunLogger records NaN / inf; anything else that is not a number is malformed.
                if number is None and value is not None and not isinstance(value, float):
                    non_numeric += 1
                    non_numeric_example = non_numeric_example or f"{key!r} at step {step}"
                row[str(key)] = number
            if step in by_step:
                duplicates += 1
            by_step[step] = row  # the last record of a step wins, as after a resume

        if tail.error:
            messages.append(Message("error", tail.error))
        elif not tail.exists:
            messages.append(
                Message(
                    "error",
                    f"{METRICS_FILE} is missing: no step has been logged yet, or this is not a run directory",
                )
            )
        elif not by_step:
            if tail.size == 0 and not tail.torn_bytes:
                messages.append(Message("warning", f"{METRICS_FILE} is empty: no step has been logged yet"))
            else:
                messages.append(Message("error", f"{METRICS_FILE} holds no readable step record"))
        messages.extend(_jsonl_messages(tail))
        if num_no_step:
            messages.append(
                Message(
                    "warning",
                    f"{METRICS_FILE}: {num_no_step} record(s) have no integer \"step\" and were skipped "
                    f"({_quote_lines(no_step, num_no_step)})",
                )
            )
        if duplicates:
            messages.append(
                Message(
                    "warning",
                    f"{METRICS_FILE}: {duplicates} record(s) repeat an earlier step (a resume without "
                    f"truncation?); the last record of each step is shown",
                )
            )
        if non_numeric:
            messages.append(
                Message(
                    "warning",
                    f"{METRICS_FILE}: {non_numeric} value(s) are not numbers and are shown as gaps "
                    f"(e.g. {non_numeric_example})",
                )
            )

        steps = sorted(by_step)
        rows = [by_step[step] for step in steps]
        keys = set()
        for row in rows:
            keys.update(row)
        scalar_keys, layered = split_layer_keys(keys)
        self._scalars = {
            "steps": steps,
            "series": {key: [row.get(key) for row in rows] for key in scalar_keys},
            "layers": {
                prefix: assemble_layer_matrix(steps, rows, layer_keys).to_json()
                for prefix, layer_keys in layered.items()
            },
        }
        self._metrics_messages = messages

    def _rebuild_histograms(self) -> None:
        tail = self._histograms
        hists: dict[str, dict[int, dict]] = {}
        invalid: list[int] = []
        num_invalid = 0
        for line_number, record in tail.records:
            parsed = parse_histogram(record)
            if parsed is None:
                num_invalid += 1
                if len(invalid) < _MAX_QUOTED_LINES:
                    invalid.append(line_number)
                continue
            hists.setdefault(parsed["name"], {})[parsed["step"]] = parsed
        messages = []
        if tail.error:
            messages.append(Message("warning", tail.error))
        messages.extend(_jsonl_messages(tail))
        if num_invalid:
            messages.append(
                Message(
                    "warning",
                    f"{HISTOGRAMS_FILE}: {num_invalid} record(s) are not histograms of the form "
                    f'{{"step", "name", "edges", "counts"}} and were skipped ({_quote_lines(invalid, num_invalid)})',
                )
            )
        self._hists = hists
        self._hist_messages = messages

    # -- views -----------------------------------------------------------------------------------------------

    def messages(self) -> list[Message]:
        if self._dir_message is not None:
            return [self._dir_message]
        return [*self._metrics_messages, *self._config_messages, *self._hist_messages]

    def histograms_at(self, step: Optional[int]) -> dict[str, dict]:
        """Per name, the histogram of the latest step <= ``step`` (the latest of all when ``step`` is None)."""
        out = {}
        for name, by_step in sorted(self._hists.items()):
            candidates = [s for s in by_step if step is None or s <= step]
            if candidates:
                out[name] = by_step[max(candidates)]
        return out

    def histogram_steps(self) -> list[int]:
        return sorted({s for by_step in self._hists.values() for s in by_step})

    def snapshot(self, hist_step: Optional[int] = None) -> dict:
        messages = self.messages()
        levels = {m.level for m in messages}
        steps = self._scalars.get("steps", []) if self._dir_message is None else []
        return {
            "label": self.label,
            "path": str(self.path),
            "status": "error" if "error" in levels else "warning" if "warning" in levels else "ok",
            "messages": [m.to_json() for m in messages],
            "config": self._config,
            "num_steps": len(steps),
            "last_step": steps[-1] if steps else None,
            "steps": steps,
            "series": self._scalars.get("series", {}) if self._dir_message is None else {},
            "layers": self._scalars.get("layers", {}) if self._dir_message is None else {},
            "histogram_steps": self.histogram_steps() if self._dir_message is None else [],
            "histograms": self.histograms_at(hist_step) if self._dir_message is None else {},
        }


def parse_histogram(record: Any) -> Optional[dict]:
    """A validated histogram record (counts as floats, out-of-range counts default to 0), or None if malformed."""
    if not isinstance(record, dict):
        return None
    step = _integer(record.get("step"))
    name = record.get("name")
    edges, counts = record.get("edges"), record.get("counts")
    if step is None or not isinstance(name, str) or not name:
        return None
    if not isinstance(edges, list) or not isinstance(counts, list) or len(edges) < 2 or len(counts) != len(edges) - 1:
        return None
    edges_f = [_number(e) for e in edges]
    counts_f = [_number(c) for c in counts]
    if any(e is None for e in edges_f) or any(c is None or c < 0 for c in counts_f):
        return None
    if any(b <= a for a, b in zip(edges_f, edges_f[1:])):
        return None
    extra = {}
    for key in ("underflow", "overflow", "nonfinite"):
        value = _number(record.get(key, 0))
        extra[key] = value if value is not None and value >= 0 else 0.0
    return {"step": step, "name": name, "edges": edges_f, "counts": counts_f, **extra}


def run_labels(paths: list[Path]) -> list[str]:
    """Short, distinct names for runs: the directory name, with parents added only where names collide."""
    parts = [p.resolve().relative_to(p.resolve().anchor).parts for p in paths]
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(pp[-d:]) if pp else str(p) for pp, d, p in zip(parts, depth, paths)]
        clashes = {lab for lab in labels if labels.count(lab) > 1}
        if not clashes:
            return labels
        grew = False
        for i, lab in enumerate(labels):
            if lab in clashes and depth[i] < len(parts[i]):
                depth[i] += 1
                grew = True
        if not grew:
            return [f"{lab} #{i + 1}" if lab in clashes else lab for i, lab in enumerate(labels)]


class Dashboard:
    """The runs shown on one page, and the JSON state the page polls (thread-safe)."""

    def __init__(self, run_dirs: Iterable[str | os.PathLike], *, poll_seconds: float = 3.0):
        paths = [Path(p) for p in run_dirs]
        if not paths:
            raise ValueError("the dashboard needs at least one run directory")
        if not poll_seconds > 0:
            raise ValueError(f"poll_seconds={poll_seconds!r}: must be > 0")
        self.poll_seconds = float(poll_seconds)
        self.runs = [RunData(path, label) for path, label in zip(paths, run_labels(paths))]
        self._lock = threading.Lock()
        self._cache: tuple[Optional[tuple], str, bytes] = (None, "", b"")

    def state_json(self, hist_step: Optional[int] = None) -> tuple[str, bytes]:
        """``(version, body)``: the state as UTF-8 JSON, and a tag that changes whenever the body does."""
        with self._lock:
            for run in self.runs:
                run.safe_refresh()
            key = (tuple(run.version() for run in self.runs), hist_step)
            if key != self._cache[0]:
                version = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
                state = {
                    "version": version,
                    "poll_seconds": self.poll_seconds,
                    "hist_step": hist_step,
                    "runs": [dict(index=i, **run.snapshot(hist_step)) for i, run in enumerate(self.runs)],
                }
                body = json.dumps(state, allow_nan=False, separators=(",", ":")).encode("utf-8")
                self._cache = (key, version, body)
            return self._cache[1], self._cache[2]

    def state(self, hist_step: Optional[int] = None) -> dict:
        return json.loads(self.state_json(hist_step)[1])
