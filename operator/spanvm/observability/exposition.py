"""The /metrics + /healthz HTTP server of the operator and the agent, and build_info.

prometheus_client serves the text format; `_created` series (one per counter and histogram,
a timestamp no dashboard uses) are turned off before any metric is made. /healthz answers
200 while the process's `healthy()` callback says so and 503 with its reason otherwise.
"""

import platform
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Info, disable_created_metrics, make_wsgi_app
from prometheus_client.registry import REGISTRY, CollectorRegistry

import spanvm

disable_created_metrics()  # type: ignore[no-untyped-call]

BUILD_INFO = Info("spanvm_build", "The spanvm build: version and Python.")
BUILD_INFO.info({"version": spanvm.__version__, "python": platform.python_version()})

Health = Callable[[], tuple[bool, str]]
StartResponse = Callable[[str, list[tuple[str, str]]], object]
Environ = dict[str, object]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """A slow scrape (the operator's gauges read the API) must not hold up a probe."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes and probes every few seconds are not worth a log line."""


def app(health: Health, registry: CollectorRegistry = REGISTRY) -> Callable[..., Iterable[bytes]]:
    """A WSGI app: /healthz from `health`, everything else prometheus_client's metrics."""
    metrics = make_wsgi_app(registry)

    def serve(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok, reason = health()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [(reason or "ok").encode() + b"\n"]
        body: Iterable[bytes] = metrics(environ, start_response)
        return body

    return serve


def serve(port: int, health: Health, host: str = "") -> WSGIServer:
    """Serve /metrics and /healthz on host:port from a daemon thread; returns the server."""
    server = make_server(
        host, port, app(health), server_class=_ThreadingServer, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
