"""The dashboard's HTTP server: the page, the plotly.js bundle and one JSON endpoint, standard library only.

Routes:

* ``GET /``: the page (``page.html``); it polls ``/api/state`` every ``poll_seconds`` and redraws on change.
* ``GET /static/plotly.min.js``: the plotly.js bundle that ships inside the plotly Python package, so the
  page works without internet access.
* ``GET /api/state?hist_step=N``: every run's status, messages, config summary, scalar series, per-layer
  matrices and histograms (those of the latest step <= N; without N the latest). Answers carry an ETag, so an
  unchanged state costs a 304.

Problems with a run are reported in its messages, never as an HTTP error. The server binds to 127.0.0.1 by
default: run directories can hold anything the trainer logged, so exposing them is the user's explicit choice.
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Iterable, Optional
from urllib.parse import parse_qs, urlsplit

from sapo_megatron.dashboard.data import Dashboard

PLOTLY_PATH = "/static/plotly.min.js"


def _page_template() -> str:
    return resources.files("sapo_megatron.dashboard").joinpath("page.html").read_text(encoding="utf-8")


def _plotly_bundle() -> bytes:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs().encode("utf-8")


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        # Polling every few seconds would flood the terminal; errors still reach log_error.
        pass

    def _send(self, status: int, body: bytes, content_type: str, headers: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload, allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", {"Cache-Control": "no-cache"})

    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self):  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        try:
            if url.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8", {"Cache-Control": "no-cache"})
            elif url.path == PLOTLY_PATH:
                self._send(
                    HTTPStatus.OK,
                    self.server.plotly_js(),
                    "application/javascript; charset=utf-8",
                    {"Cache-Control": "max-age=86400"},
                )
            elif url.path == "/api/state":
                self._state(parse_qs(url.query))
            elif url.path == "/favicon.ico":
                self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
            else:
                self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {url.path}"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away mid-answer (page reload); nothing to tell it
        except Exception as exc:  # noqa: BLE001 - the page shows this message instead of a blank 500
            self.log_error("dashboard: %r while answering %s", exc, self.path)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"dashboard server error: {exc!r}"})

    def _state(self, query: dict[str, list[str]]) -> None:
        raw = (query.get("hist_step") or ["latest"])[-1]
        if raw in ("", "latest"):
            hist_step = None
        else:
            try:
                hist_step = int(raw)
            except ValueError:
                message = f"hist_step={raw!r}: expected an integer or 'latest'"
                self._send_json(HTTPStatus.BAD_REQUEST, {"error": message})
                return
        version, body = self.server.dashboard.state_json(hist_step)
        etag = f'"{version}"'
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if self.headers.get("If-None-Match") == etag:
            self.send_response(HTTPStatus.NOT_MODIFIED)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send(HTTPStatus.OK, body, "application/json; charset=utf-8", headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Rebinding the port of a dashboard that was just stopped should work at once.
    allow_reuse_address = True

    def __init__(self, address, dashboard: Dashboard, page: bytes):
        super().__init__(address, _Handler)
        self.dashboard = dashboard
        self.page = page
        self._plotly: Optional[bytes] = None
        self._plotly_lock = threading.Lock()

    def plotly_js(self) -> bytes:
        # Loaded on first request: the bundle is a few MB and tests of the JSON endpoint never need it.
        with self._plotly_lock:
            if self._plotly is None:
                self._plotly = _plotly_bundle()
            return self._plotly


class DashboardServer:
    """Serves a :class:`Dashboard` over HTTP; ``port=0`` picks a free port (see :attr:`url`)."""

    def __init__(
        self,
        run_dirs: Iterable[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        poll_seconds: float = 3.0,
    ):
        self.dashboard = Dashboard(run_dirs, poll_seconds=poll_seconds)
        page = _page_template().replace("__POLL_MS__", str(int(round(poll_seconds * 1000))))
        self._server = _Server((host, port), self.dashboard, page.encode("utf-8"))
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        # A wildcard bind is reachable on loopback; print that rather than an address a browser cannot open.
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{shown}:{port}/"

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.5)

    def start(self) -> "DashboardServer":
        """Serves from a background (daemon) thread; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="sapo-dashboard", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> "DashboardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
