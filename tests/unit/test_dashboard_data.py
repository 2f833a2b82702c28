"""Dashboard data loading, the RunLogger histogram / layout additions, and the HTTP endpoints."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from sapo_megatron.dashboard.data import (
    Dashboard,
    JsonlTail,
    RunData,
    assemble_layer_matrix,
    parse_histogram,
    read_run_config,
    run_labels,
    split_layer_keys,
)
from sapo_megatron.dashboard.example_runs import HISTOGRAM_NAMES, write_example_run
from sapo_megatron.dashboard.server import DashboardServer
from sapo_megatron.diagnostics.run_logger import (
    CUSTOM_SCALARS_LAYOUT,
    RunLogger,
    flatten_metrics,
    histogram_record,
    read_histograms,
    read_metrics,
    write_custom_scalars_layout,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    sapo = write_example_run(root / "sapo", num_steps=5, num_layers=3, num_mini_batches=2, seed=0)
    grpo = write_example_run(root / "grpo", policy_loss="clip", num_steps=4, num_layers=3, num_mini_batches=1, seed=1)
    return sapo, grpo


def texts(run: dict) -> str:
    return "\n".join(m["text"] for m in run["messages"])


# -- RunLogger additions ------------------------------------------------------------------------------------------


def test_histogram_record_bins_like_numpy_and_counts_what_falls_outside():
    values = torch.tensor([-5.0, 0.0, 0.5, 0.999, 1.0, 1.5, 2.0, 2.0, 7.0, float("nan"), float("inf")])
    record = histogram_record(3, "log_ratio/stable", values, [0.0, 1.0, 2.0])
    assert record == {
        "step": 3,
        "name": "log_ratio/stable",
        "edges": [0.0, 1.0, 2.0],
        # [0, 1) holds 0, 0.5, 0.999; [1, 2] holds 1, 1.5 and both 2s (the last bin includes its right edge)
        "counts": [3, 4],
        "underflow": 1,
        "overflow": 1,
        "nonfinite": 2,
    }


@pytest.mark.parametrize(
    "edges, match",
    [([1.0], ">= 2 values"), ([0.0, 0.0, 1.0], "strictly increasing"), ([0.0, float("nan")], "finite")],
)
def test_histogram_record_rejects_bad_edges(edges, match):
    with pytest.raises(ValueError, match=match):
        histogram_record(1, "x", torch.zeros(3), edges)


def test_log_histogram_writes_jsonl_and_tensorboard_and_resume_truncates_both(tmp_path):
    logger = RunLogger(tmp_path)
    for step in (1, 2, 3):
        logger.log(step, {"reward/mean": float(step)})
        logger.log_histogram(step, "ratio/adv_pos", torch.tensor([0.9, 1.0, 1.1, 5.0]), torch.tensor([0.5, 1.0, 1.5]))
    logger.log_histogram(4, "ratio/adv_neg", torch.tensor([]), [0.5, 1.5])  # empty: JSONL only
    logger.close()
    lines = (tmp_path / "histograms.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(line.endswith("}") for line in lines)
    first = json.loads(lines[0])
    assert first["counts"] == [1, 2] and first["overflow"] == 1 and first["edges"] == [0.5, 1.0, 1.5]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    histograms = events.Histograms("ratio/adv_pos")
    assert [h.step for h in histograms] == [1, 2, 3]
    assert histograms[0].histogram_value.num == 4
    # underflow bucket, the two bins, overflow bucket
    assert list(histograms[0].histogram_value.bucket) == [0, 1, 2, 1]

    with (tmp_path / "histograms.jsonl").open("a") as handle:
        handle.write('{"step": 9, "name": "torn')  # a killed run's last line
    RunLogger(tmp_path, resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert [(r["step"], r["name"]) for r in read_histograms(tmp_path)] == [(1, "ratio/adv_pos"), (2, "ratio/adv_pos")]


def test_flatten_metrics_names_per_layer_entries():
    flat = flatten_metrics(
        {"routing_changed_frac": torch.tensor([0.1, 0.25]), "routing_changed_frac_mean": torch.tensor(0.2), "n": 3},
        "routing/rollout_vs_old/",
    )
    assert flat == pytest.approx(
        {
            "routing/rollout_vs_old/routing_changed_frac/layer0": 0.1,
            "routing/rollout_vs_old/routing_changed_frac/layer1": 0.25,
            "routing/rollout_vs_old/routing_changed_frac_mean": 0.2,
            "routing/rollout_vs_old/n": 3.0,
        }
    )
    with pytest.raises(ValueError, match="only scalars and 1-d"):
        flatten_metrics({"expert_load": torch.zeros(2, 4)})


def test_custom_scalars_layout_is_written_and_every_chart_matches_logged_names(example_runs, tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    log_dir = write_custom_scalars_layout(tmp_path)
    layouts = []
    for path in log_dir.iterdir():
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "custom_scalars__config__":
                    layouts.append(layout_pb2.Layout.FromString(value.tensor.string_val[0]))
    assert len(layouts) == 1
    titles = {c.title: [chart.title for chart in c.chart] for c in layouts[0].category}
    assert titles == {category: list(charts) for category, charts in CUSTOM_SCALARS_LAYOUT.items()}

    # The layout's regexes are the contract with the metric names: each chart must find something in a
    # SAPO MoE run or a clipped-loss run.
    logged = set()
    for run in example_runs:
        for record in read_metrics(run):
            logged.update(record)
    for category, charts in CUSTOM_SCALARS_LAYOUT.items():
        for title, patterns in charts.items():
            assert any(re.match(p, key) for p in patterns for key in logged), f"{category} / {title} matches nothing"


# -- reading run directories ------------------------------------------------------------------------------------


def test_jsonl_tail_reads_increments_holds_back_a_torn_line_and_rereads_a_replaced_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = JsonlTail(path)
    tail.refresh()
    assert not tail.exists and tail.records == []

    path.write_bytes(b'{"step": 1}\n{"step": 2, "a"')
    tail.refresh()
    assert [r for _, r in tail.records] == [{"step": 1}] and tail.torn_bytes == len(b'{"step": 2, "a"')
    with path.open("ab") as handle:
        handle.write(b': 1.5}\nnot json\n')
    tail.refresh()
    assert [r for _, r in tail.records] == [{"step": 1}, {"step": 2, "a": 1.5}]
    assert tail.torn_bytes == 0 and tail.num_bad_lines == 1 and tail.bad_lines == [3]

    # RunLogger truncates on resume by writing a new file and renaming it over the old one.
    replacement = tmp_path / "metrics.jsonl.tmp"
    replacement.write_bytes(b'{"step": 1, "b": 2}\n')
    os.replace(replacement, path)
    generation = tail.generation
    tail.refresh()
    assert tail.generation != generation
    assert [r for _, r in tail.records] == [{"step": 1, "b": 2}] and tail.num_bad_lines == 0

    path.write_bytes(b"")  # shrunk in place
    tail.refresh()
    assert tail.records == [] and tail.exists


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def snapshot(path: Path, hist_step=None) -> dict:
    run = RunData(path, path.name)
    run.refresh()
    return run.snapshot(hist_step)


def test_missing_directory_and_empty_directory_are_errors_that_say_what_is_missing(tmp_path):
    missing = snapshot(tmp_path / "not_there")
    assert missing["status"] == "error" and "does not exist" in texts(missing) and missing["steps"] == []

    (tmp_path / "empty").mkdir()
    empty = snapshot(tmp_path / "empty")
    assert empty["status"] == "error"
    assert "metrics.jsonl is missing" in texts(empty) and "config.yaml is missing" in texts(empty)

    write(tmp_path / "a_file", "x")
    assert "is not a directory" in texts(snapshot(tmp_path / "a_file"))


def test_empty_metrics_file_is_a_warning_not_an_error(tmp_path):
    write(tmp_path / "run" / "metrics.jsonl", "")
    run = snapshot(tmp_path / "run")
    assert run["status"] == "warning" and "is empty" in texts(run) and run["num_steps"] == 0


def test_garbage_torn_lines_duplicates_and_non_numbers_are_reported_and_the_rest_is_shown(tmp_path):
    write(
        tmp_path / "run" / "metrics.jsonl",
        '{"step": 1, "reward/mean": 0.5, "loss/pg_loss": null}\n'
        "\x00\x01 garbage\n"
        '[1, 2, 3]\n'
        '{"reward/mean": 0.7}\n'
        '{"step": 2, "reward/mean": "high"}\n'
        '{"step": 2, "reward/mean": 0.75, "loss/pg_loss": NaN}\n'
        '{"step": 3, "rew',
    )
    run = snapshot(tmp_path / "run")
    assert run["status"] == "warning"
    assert run["steps"] == [1, 2]
    assert run["series"]["reward/mean"] == [0.5, 0.75]  # the last record of step 2 wins
    assert run["series"]["loss/pg_loss"] == [None, None]
    message = texts(run)
    assert "1 line(s) are not valid JSON" in message and "line 2" in message
    assert "the last line is incomplete" in message
    assert '2 record(s) have no integer "step"' in message
    assert "repeat an earlier step" in message
    assert "not numbers" in message and "'reward/mean' at step 2" in message


def test_only_garbage_is_an_error(tmp_path):
    write(tmp_path / "run" / "metrics.jsonl", "garbage\nmore garbage\n")
    run = snapshot(tmp_path / "run")
    assert run["status"] == "error" and "no readable step record" in texts(run)


def test_config_summary_and_config_problems(tmp_path):
    from sapo_megatron.config import load_config, save_config

    save_config(load_config(None, ["algorithm.sapo.tau_neg=1.3"]), tmp_path / "ok.yaml")
    summary, messages = read_run_config(tmp_path / "ok.yaml")
    assert messages == [] and summary["policy_loss"] == "sapo"
    assert (summary["tau_pos"], summary["tau_neg"], summary["eps_low"]) == (1.0, 1.3, 0.2)

    summary, messages = read_run_config(write(tmp_path / "bad.yaml", "algorithm: [unclosed\n"))
    assert summary is None and "cannot be read" in messages[0].text

    summary, messages = read_run_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    assert summary is None and "no 'algorithm' section" in messages[0].text

    summary, messages = read_run_config(
        write(tmp_path / "tau.yaml", "algorithm:\n  policy_loss: sapo\n  sapo: {tau_pos: -1, tau_neg: abc}\n")
    )
    assert summary["tau_pos"] is None and summary["tau_neg"] is None
    assert len(messages) == 2 and "algorithm.sapo.tau_neg is 'abc'" in messages[1].text

    # A clipped-loss run does not need SAPO's taus.
    clip = "algorithm:\n  policy_loss: clip\n  clip: {eps_low: 0.2, eps_high: 0.28}\n"
    summary, messages = read_run_config(write(tmp_path / "clip.yaml", clip))
    assert messages == [] and summary["eps_high"] == 0.28


def test_split_layer_keys_and_matrix_assembly_with_gaps():
    scalars, layered = split_layer_keys(
        ["routing/a/frac/layer0", "routing/a/frac/layer2", "routing/a/frac_mean", "reward/mean", "routing/b/x/layer1"]
    )
    assert scalars == ["reward/mean", "routing/a/frac_mean"]
    assert layered == {
        "routing/a/frac": {0: "routing/a/frac/layer0", 2: "routing/a/frac/layer2"},
        "routing/b/x": {1: "routing/b/x/layer1"},
    }
    rows = [
        {"routing/a/frac/layer0": 0.1, "routing/a/frac/layer2": 0.3},
        {"routing/a/frac/layer0": 0.15},  # layer 2 not logged at this step
    ]
    matrix = assemble_layer_matrix([5, 6], rows, layered["routing/a/frac"])
    assert matrix.steps == [5, 6] and matrix.layers == [0, 1, 2]
    # values[layer][step]; layer 1 was never logged
    assert matrix.values == [[0.1, 0.15], [None, None], [0.3, None]]


def test_histogram_parsing_and_step_selection(tmp_path):
    good = {"step": 2, "name": "ratio/adv_pos", "edges": [0, 1, 2], "counts": [3, 4], "overflow": 1}
    assert parse_histogram(good) == {
        "step": 2, "name": "ratio/adv_pos", "edges": [0.0, 1.0, 2.0], "counts": [3.0, 4.0],
        "underflow": 0.0, "overflow": 1.0, "nonfinite": 0.0,
    }
    for broken in (
        {**good, "counts": [1]},
        {**good, "edges": [0, 2, 1]},
        {**good, "counts": [1, -1]},
        {**good, "name": ""},
        {**good, "step": "2"},
        {**good, "edges": [0, None, 2]},
        [1, 2],
    ):
        assert parse_histogram(broken) is None, broken

    lines = [
        {"step": 1, "name": "h", "edges": [0, 1], "counts": [1]},
        {"step": 3, "name": "h", "edges": [0, 1], "counts": [3]},
        {"step": 2, "name": "g", "edges": [0, 1], "counts": [2]},
        {"step": 4, "name": "h", "edges": [1, 0], "counts": [9]},
    ]
    write(tmp_path / "run" / "metrics.jsonl", '{"step": 1}\n')
    write(tmp_path / "run" / "histograms.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    latest = snapshot(tmp_path / "run")
    assert {n: h["step"] for n, h in latest["histograms"].items()} == {"g": 2, "h": 3}
    assert latest["histogram_steps"] == [1, 2, 3]
    assert "1 record(s) are not histograms" in texts(latest) and "line 4" in texts(latest)
    at_two = snapshot(tmp_path / "run", hist_step=2)
    assert {n: h["step"] for n, h in at_two["histograms"].items()} == {"g": 2, "h": 1}
    assert snapshot(tmp_path / "run", hist_step=0)["histograms"] == {}


def test_two_runs_overlaid(example_runs):
    sapo, grpo = example_runs
    state = Dashboard([sapo, grpo]).state()
    first, second = state["runs"]
    assert (first["label"], second["label"]) == ("sapo", "grpo")
    assert (first["status"], second["status"]) == ("ok", "ok"), (first["messages"], second["messages"])
    assert first["steps"] == [1, 2, 3, 4, 5] and second["steps"] == [1, 2, 3, 4]
    assert first["config"]["policy_loss"] == "sapo" and second["config"]["policy_loss"] == "clip"
    for run in (first, second):
        assert len(run["series"]["reward/mean"]) == len(run["steps"])
        assert set(run["histograms"]) == set(HISTOGRAM_NAMES)
        heat = run["layers"]["routing/rollout_vs_old/routing_changed_frac"]
        assert heat["layers"] == [0, 1, 2] and all(len(row) == len(run["steps"]) for row in heat["values"])
        assert all(0 <= v <= 1 for row in heat["values"] for v in row)
        assert not any(key.endswith(tuple(f"/layer{i}" for i in range(3))) for key in run["series"])
    # SAPO logs gate metrics, the clipped loss its clipped fraction; neither has the other's.
    assert "ratio/mb0/gate_weight_mean" in first["series"] and "ratio/mb0/clip_frac" not in first["series"]
    assert "ratio/mb0/clip_frac" in second["series"] and "ratio/mb0/gate_weight_mean" not in second["series"]
    assert "routing/old_vs_mb1/routing_changed_frac_mean" in first["series"]
    sapo_hist = first["histograms"]["ratio/adv_pos"]
    assert len(sapo_hist["edges"]) == len(sapo_hist["counts"]) + 1


def test_dense_run_has_no_routing_and_state_is_strict_json(tmp_path):
    dense = write_example_run(tmp_path / "dense", moe=False, num_steps=2, num_mini_batches=1)
    with (dense / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "reward/mean": NaN, "x": Infinity}\n')
    version, body = Dashboard([dense]).state_json()
    state = json.loads(body, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in the state"))
    run = state["runs"][0]
    assert run["layers"] == {} and not any(k.startswith(("routing/", "attribution/")) for k in run["series"])
    assert run["series"]["reward/mean"][-1] is None and run["series"]["x"] == [None, None, None]
    assert "log_ratio/routing_changed" not in run["histograms"]


def test_state_version_changes_only_when_a_run_changes(tmp_path):
    write(tmp_path / "run" / "metrics.jsonl", '{"step": 1, "reward/mean": 0.1}\n')
    dashboard = Dashboard([tmp_path / "run"])
    v1, body1 = dashboard.state_json()
    assert dashboard.state_json() == (v1, body1)
    with (tmp_path / "run" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 2, "reward/mean": 0.2}\n')
    v2, body2 = dashboard.state_json()
    assert v2 != v1 and json.loads(body2)["runs"][0]["steps"] == [1, 2]
    assert dashboard.state_json(hist_step=1)[0] != v2


def test_run_labels_are_short_and_distinct():
    assert run_labels([Path("/r/a/sapo"), Path("/r/b/grpo")]) == ["sapo", "grpo"]
    assert run_labels([Path("/r/replay_on/run"), Path("/r/replay_off/run")]) == ["replay_on/run", "replay_off/run"]
    assert run_labels([Path("/r/x"), Path("/r/x")]) == ["r/x #1", "r/x #2"]


def test_one_run_that_breaks_the_reader_does_not_break_the_others(tmp_path, monkeypatch):
    write(tmp_path / "good" / "metrics.jsonl", '{"step": 1, "reward/mean": 0.1}\n')
    write(tmp_path / "bad" / "metrics.jsonl", '{"step": 1}\n')
    dashboard = Dashboard([tmp_path / "good", tmp_path / "bad"])
    bad = dashboard.runs[1]

    def explode():
        raise RuntimeError("boom")

    monkeypatch.setattr(bad, "refresh", explode)
    good_state, bad_state = dashboard.state()["runs"]
    assert good_state["status"] == "warning" and good_state["steps"] == [1]  # warning: no config.yaml
    assert bad_state["status"] == "error"
    assert "could not read this run" in texts(bad_state) and "boom" in texts(bad_state)


# -- HTTP ---------------------------------------------------------------------------------------------------------


def fetch(url: str, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_http_endpoints(example_runs, tmp_path):
    sapo, grpo = example_runs
    broken = write(tmp_path / "broken" / "metrics.jsonl", "{not json\n").parent
    with DashboardServer([sapo, grpo, broken, tmp_path / "missing"], port=0, poll_seconds=2) as server:
        assert server.url.startswith("http://127.0.0.1:") and not server.url.endswith(":0/")

        status, headers, page = fetch(server.url)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        html = page.decode()
        assert 'src="/static/plotly.min.js"' in html and "const POLL_MS = 2000;" in html
        for chart in ("chart-reward", "chart-ratio-var", "chart-mismatch", "heatmaps", "chart-hist-routing",
                      "chart-gate-pos", "chart-gate-neg"):
            assert f'id="{chart}"' in html
        assert "cdn" not in html.lower()

        status, headers, bundle = fetch(server.url + "static/plotly.min.js")
        assert status == 200 and headers["Content-Type"].startswith("application/javascript")
        assert len(bundle) > 1_000_000 and b"plotly" in bundle[:2000].lower()

        status, headers, body = fetch(server.url + "api/state")
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        state = json.loads(body)
        assert [r["label"] for r in state["runs"]] == ["sapo", "grpo", "broken", "missing"]
        assert [r["status"] for r in state["runs"]] == ["ok", "ok", "error", "error"]
        assert "not valid JSON" in texts(state["runs"][2]) and "does not exist" in texts(state["runs"][3])
        assert state["poll_seconds"] == 2

        status, _, body = fetch(server.url + "api/state", {"If-None-Match": headers["ETag"]})
        assert status == 304 and body == b""

        status, _, body = fetch(server.url + "api/state?hist_step=2")
        assert status == 200 and json.loads(body)["runs"][0]["histograms"]["ratio/adv_pos"]["step"] == 2

        status, _, body = fetch(server.url + "api/state?hist_step=abc")
        assert status == 400 and "hist_step" in json.loads(body)["error"]

        status, _, body = fetch(server.url + "nope")
        assert status == 404 and "no such page" in json.loads(body)["error"]


def test_cli_dashboard_arguments(tmp_path, capsys):
    from sapo_megatron.cli import build_parser, main

    args = build_parser().parse_args(["dashboard", "a", "b", "--port", "0", "--host", "0.0.0.0"])
    assert (args.run_dirs, args.port, args.host, args.refresh) == (["a", "b"], 0, "0.0.0.0", 3.0)
    assert build_parser().parse_args(["dashboard", "a"]).host == "127.0.0.1"
    assert main(["dashboard", str(tmp_path), "--port", "0", "--refresh", "0"]) == 2
    assert "--refresh=0.0: must be > 0" in capsys.readouterr().err
