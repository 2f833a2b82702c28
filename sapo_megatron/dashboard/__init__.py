"""Live diagnostics dashboard over run directories: `sapo-megatron dashboard RUN_DIR [RUN_DIR ...]`.

:mod:`.data` reads run directories (incrementally, tolerating runs that are still being written or are
broken), :mod:`.server` serves the page and its JSON endpoint with the standard library's HTTP server, and
``page.html`` draws the charts with the plotly.js bundle shipped inside the plotly package. The run-directory
format is documented in docs/diagnostics.md, "Run directory and dashboard".
"""

from sapo_megatron.dashboard.data import Dashboard, RunData
from sapo_megatron.dashboard.server import DashboardServer

__all__ = ["Dashboard", "DashboardServer", "RunData"]
