"""The status page: a small HTTP server on 127.0.0.1 next to the supervisor.

Routes (GET only):

* ``/`` -- the page (``static/index.html``; ``app.js`` and ``style.css`` beside it; no
  external resources: charts are inline SVG drawn by ``app.js``);
* ``/api/status`` -- the supervisor's :meth:`~.supervisor.Supervisor.status` plus
  ``extra`` (the pipeline's summary-so-far);
* ``/api/series?since=T`` -- ``{series: [[t, v], ...]}`` (points after wall time ``T``);
* ``/api/events?since=SEQ`` -- events after sequence number ``SEQ``;
* ``/metrics`` -- the supervisor's own Prometheus metrics.

Example::

    >>> srv = StatusServer(lambda: {"phase": "running"}, SeriesStore(), EventLog(None))
    >>> srv.start().url.startswith("http://127.0.0.1:")          # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import math
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from monolith_py.observe.metrics import CONTENT_TYPE_LATEST, render
from monolith_py.observe.timeseries import SeriesStore
from monolith_py.supervisor.events import EventLog

__all__ = ["StatusServer", "STATIC_FILES"]

STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                "/index.html": ("index.html", "text/html; charset=utf-8"),
                "/app.js": ("app.js", "application/javascript; charset=utf-8"),
                "/style.css": ("style.css", "text/css; charset=utf-8")}


def _static(name: str) -> bytes:
    return (resources.files("monolith_py.supervisor") / "static" / name).read_bytes()


class StatusServer:
    """Serve the status page for ``status`` (a callable returning a JSON-able dict)."""

    def __init__(self, status: Callable[[], dict[str, Any]], series: SeriesStore,
                 events: EventLog, host: str = "127.0.0.1", port: int = 0) -> None:
        self._status = status
        self._series = series
        self._events = events
        self._files = {path: (_static(name), ctype) for path, (name, ctype)
                       in STATIC_FILES.items()}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                return

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                outer._handle(self)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="status",
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://{host}:{port}/"

    def start(self) -> StatusServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        parsed = urllib.parse.urlsplit(req.path)
        q = urllib.parse.parse_qs(parsed.query)
        try:
            if parsed.path in self._files:
                body, ctype = self._files[parsed.path]
            elif parsed.path == "/api/status":
                body, ctype = _json(self._status()), "application/json"
            elif parsed.path == "/api/series":
                since = _float(q.get("since", [""])[0])
                body, ctype = _json(self._series.to_json(since=since)), "application/json"
            elif parsed.path == "/api/events":
                seq = int(_float(q.get("since", ["0"])[0]) or 0)
                body, ctype = _json(self._events.events(seq)), "application/json"
            elif parsed.path == "/metrics":
                body, ctype = render(), CONTENT_TYPE_LATEST
            else:
                req.send_error(404, "not found")
                return
        except Exception as exc:  # a status page must not take the supervisor down
            req.send_error(500, f"{type(exc).__name__}")
            return
        req.send_response(200)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.send_header("Cache-Control", "no-store")
        req.end_headers()
        try:
            req.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


def _clean(obj: Any) -> Any:
    """Non-finite floats become ``null`` (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _json(obj: Any) -> bytes:
    return json.dumps(_clean(obj), default=str, allow_nan=False).encode()


def _float(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if v == v and abs(v) != float("inf") else None
