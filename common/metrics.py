"""Prometheus metrics: each program keeps its own registry (several can share a test process) and serves it
over HTTP when given --metrics-listen."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


def serve_metrics(registry: CollectorRegistry, listen: str) -> int:
    """Serve `registry` at http://listen/metrics; returns the bound port (listen may end in :0)."""
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
    return server.server_address[1]
