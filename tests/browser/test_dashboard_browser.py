"""The dashboard page in a real headless Chromium: every chart renders, a screenshot is produced, broken runs
are named on the page.

Chromium is driven through its command line only: ``--dump-dom`` prints the DOM after the page's scripts ran
(``--virtual-time-budget`` lets timers and fetches finish first) and ``--screenshot`` writes a PNG. Install the
browser with ``tools/install_browser.sh``; without a chromium binary the test is skipped.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sapo_megatron.dashboard.example_runs import write_example_run
from sapo_megatron.dashboard.server import DashboardServer
from sapo_megatron.diagnostics.run_logger import RunLogger

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = next((path for path in map(shutil.which, BROWSERS) if path), None)

# Charts drawn from the runs' data: each must hold a plotly SVG with at least one trace.
DATA_CHARTS = (
    "chart-reward",
    "chart-loss",
    "chart-ratio-var",
    "chart-mismatch",
    "chart-gate-activity",
    "chart-routing-summary",
    "chart-attribution",
    "chart-hist-routing",
    "chart-gate-pos",
    "chart-gate-neg",
    "chart-hist-mismatch",
    "chart-time",
    "chart-custom",
    "chart-heatmap-0",
    "chart-heatmap-1",
)
WINDOW = (1400, 4200)

VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class ChartScanner(HTMLParser):
    """Collects, for every element with an id of interest, the classes of all elements inside it."""

    def __init__(self, ids):
        super().__init__()
        self.ids = set(ids)
        self.inside: dict[str, set[str]] = {}
        self._stack: list[str | None] = []

    def _classes(self, attrs) -> list[str]:
        return (dict(attrs).get("class") or "").split()

    def handle_starttag(self, tag, attrs):
        for open_id in filter(None, self._stack):
            self.inside[open_id].update(self._classes(attrs))
        element_id = dict(attrs).get("id")
        tracked = element_id if element_id in self.ids else None
        if tracked:
            self.inside.setdefault(tracked, set())
        if tag not in VOID_TAGS:
            self._stack.append(tracked)

    def handle_startendtag(self, tag, attrs):
        for open_id in filter(None, self._stack):
            self.inside[open_id].update(self._classes(attrs))

    def handle_endtag(self, tag):
        if tag not in VOID_TAGS and self._stack:
            self._stack.pop()


def require_chromium() -> None:
    if CHROMIUM is None:
        pytest.skip("no chromium binary found (looked for: " + ", ".join(BROWSERS) + "); run tools/install_browser.sh")


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM,
        "--headless",
        # Containers and CI runners often run as root, where Chromium's sandbox cannot start.
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        # Virtual time runs the page's timers and waits for its fetches, so the first poll and the drawing
        # finish before the DOM is dumped; it does not wait 12 real seconds.
        "--virtual-time-budget=12000",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    require_chromium()
    root = tmp_path_factory.mktemp("browser")
    sapo = write_example_run(root / "sapo", num_steps=6, seed=0)
    grpo = write_example_run(root / "grpo", policy_loss="clip", num_steps=6, seed=1)
    torn = root / "torn"
    torn.mkdir()
    (torn / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.4}\ngarbage\n{"step": 2, "rew')
    empty = root / "empty"
    empty.mkdir()
    with DashboardServer([sapo, grpo, torn, empty], port=0, poll_seconds=3) as server:
        dump = chromium("--dump-dom", server.url, profile=root / "profile-dom")
        screenshot = root / "dashboard.png"
        shot = chromium(f"--screenshot={screenshot}", server.url, profile=root / "profile-shot")
    assert dump.returncode == 0, dump.stderr[-3000:]
    assert shot.returncode == 0, shot.stderr[-3000:]
    return {"dom": dump.stdout, "screenshot": screenshot}


def test_every_chart_renders_a_plotly_svg(page):
    dom = page["dom"]
    assert 'data-renders="' in dom, "the page never finished a render: " + dom[:2000]
    scanner = ChartScanner(DATA_CHARTS + ("chart-heatmap-2", "chart-heatmap-3", "banner"))
    scanner.feed(dom)
    for chart in DATA_CHARTS:
        classes = scanner.inside.get(chart, set())
        assert "main-svg" in classes, f"{chart} holds no plotly SVG"
        assert "trace" in classes or "hm" in classes, f"{chart} was drawn without data"
    for chart in ("chart-heatmap-0", "chart-heatmap-1"):
        assert "heatmaplayer" in scanner.inside[chart]
    # Runs without routing data get an empty chart with a note, not a missing one.
    for chart in ("chart-heatmap-2", "chart-heatmap-3"):
        assert "main-svg" in scanner.inside[chart]
    assert "no per-layer routing metrics" in dom
    assert 'id="banner" class="banner hidden"' in dom, "the page shows an error banner"


def test_broken_runs_are_named_with_their_problem(page):
    dom = page["dom"]
    assert 'Warning in run "torn": metrics.jsonl: 1 line(s) are not valid JSON' in dom
    assert 'Warning in run "torn": metrics.jsonl: the last line is incomplete' in dom
    assert 'Warning in run "torn": config.yaml is missing' in dom
    assert 'Error in run "empty": metrics.jsonl is missing' in dom
    # The healthy runs are still shown next to the broken ones.
    assert 'data-status="ok"' in dom
    assert "sapo (τ_pos=1, τ_neg=1.05)" in dom and "clip (ε_low=0.2, ε_high=0.2)" in dom


def test_screenshot_is_a_real_png_of_the_page(page):
    data = page["screenshot"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == WINDOW
    assert len(data) > 100_000, f"a {len(data)}-byte screenshot of a page full of charts is suspiciously small"
    from PIL import Image

    with Image.open(page["screenshot"]) as image:
        colors = image.convert("RGB").resize((350, 1050)).getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 200, "the screenshot is (nearly) blank"


def _chart(dom: str, chart_id: str) -> str:
    """The DOM of one chart's div (up to the next chart's div)."""
    start = dom.index(f'id="{chart_id}"')
    end = dom.find(' id="chart-', start + 1)
    return dom[start : end if end > 0 else len(dom)]


def _line_colors(chart: str) -> list[str]:
    """The stroke colour of every line trace drawn in the chart, in drawing order (legend samples excluded:
    only the traces' paths keep their stroke width when zoomed)."""
    trace_path = r'class="js-line"[^>]*?style="vector-effect: non-scaling-stroke;[^"]*?stroke: (rgb\([^)]*\))'
    return re.findall(trace_path, chart)


def _tick_values(chart: str, axis_class: str) -> list[float]:
    pattern = rf'class="{axis_class}"><text[^>]*data-unformatted="([^"]+)"'
    return [float(v.replace("\u2212", "-").replace("−", "-")) for v in re.findall(pattern, chart)]


RUN_COLORS = {"rgb(31, 119, 180)", "rgb(214, 39, 40)"}  # page.html's COLORS[0], COLORS[1]


@pytest.fixture(scope="module")
def single_run_page(tmp_path_factory):
    require_chromium()
    root = tmp_path_factory.mktemp("browser-single")
    sapo = write_example_run(root / "sapo", num_steps=6, seed=0)
    with DashboardServer([sapo], port=0, poll_seconds=3) as server:
        dump = chromium("--dump-dom", server.url, profile=root / "profile-dom")
        screenshot = root / "dashboard-one-run.png"
        shot = chromium(f"--screenshot={screenshot}", server.url, profile=root / "profile-shot")
    assert dump.returncode == 0 and shot.returncode == 0, dump.stderr[-3000:] + shot.stderr[-3000:]
    return {"dom": dump.stdout, "screenshot": screenshot}


def test_one_run_draws_each_series_in_its_own_colour(single_run_page):
    dom = single_run_page["dom"]
    for chart_id, series in (("chart-loss", 3), ("chart-ratio-var", 4), ("chart-mismatch", 2), ("chart-time", 5)):
        colors = _line_colors(_chart(dom, chart_id))
        assert len(colors) == series, f"{chart_id}: {colors}"
        assert len(set(colors)) == series, f"{chart_id}: series share a colour: {colors}"


def test_several_runs_are_told_apart_by_colour(page):
    for chart_id in ("chart-loss", "chart-mismatch", "chart-time"):
        colors = _line_colors(_chart(page["dom"], chart_id))
        # Each trace has its run's colour (sapo, grpo), the series of one run differ by dash.
        assert set(colors) == RUN_COLORS, f"{chart_id}: {colors}"


def test_loss_and_grad_norm_have_their_own_axes(single_run_page):
    loss = _chart(single_run_page["dom"], "chart-loss")
    assert 'class="ytitle"' in loss and ">loss</text>" in loss
    assert 'class="y2title"' in loss and ">grad norm</text>" in loss
    left, right = _tick_values(loss, "ytick"), _tick_values(loss, "y2tick")
    # The example run's loss is within +-1 and its gradient norm ~1-5: each axis spans its own series.
    assert min(left) < 0 < max(left) <= 1
    assert min(right) == 0 and max(right) > 2
    gate = _chart(single_run_page["dom"], "chart-gate-activity")
    assert ">mean gate weight</text>" in gate and ">fraction of tokens</text>" in gate
    assert min(_tick_values(gate, "y2tick")) == 0


def test_fraction_scales_start_at_zero(single_run_page):
    dom = single_run_page["dom"]
    heatmap = _chart(dom, "chart-heatmap-0")
    colorbar_ticks = [float(v) for v in re.findall(r'class="ycb\w*tick"><text[^>]*data-unformatted="([^"]+)"', heatmap)]
    assert colorbar_ticks and min(colorbar_ticks) == 0
    assert min(_tick_values(_chart(dom, "chart-routing-summary"), "ytick")) == 0


def test_one_run_screenshot_is_a_real_png(single_run_page):
    data = single_run_page["screenshot"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == WINDOW


def test_page_follows_a_run_that_is_being_written(tmp_path):
    require_chromium()
    logger = RunLogger(tmp_path / "live")
    stop = threading.Event()

    def train():
        step = 0
        while not stop.is_set():
            step += 1
            logger.log(step, {"reward/mean": 0.01 * step, "routing/rollout_vs_old/routing_changed_frac/layer0": 0.1})
            # Faster than the page redraws, so every poll after a redraw finds new steps.
            time.sleep(0.02)

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        with DashboardServer([tmp_path / "live"], port=0, poll_seconds=1) as server:
            dump = chromium("--dump-dom", server.url, profile=tmp_path / "profile")
    finally:
        stop.set()
        trainer.join()
        logger.close()
    assert dump.returncode == 0, dump.stderr[-3000:]
    renders = int(re.search(r'data-renders="(\d+)"', dump.stdout).group(1))
    assert renders >= 2, "the page drew once and never picked up the new steps"
    assert 'id="banner" class="banner hidden"' in dump.stdout
