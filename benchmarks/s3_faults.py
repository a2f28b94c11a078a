"""A loopback HTTP proxy in front of an S3 endpoint that answers a share of requests with a fault: what a
flaky object store does to every process of a run (benchmarks/faults.py s3).

Faults, drawn per request from a seeded generator at --rate:
  500        InternalError, nothing forwarded
  503        ServiceUnavailable, nothing forwarded
  slowdown   503 SlowDown (S3's request-rate throttle), nothing forwarded
  reset-read the request is forwarded, then the response is cut halfway through its body (TCP reset)
  reset-write the upload is cut halfway through the request body (TCP reset), nothing forwarded
Every other request is forwarded unchanged. `counts` says how many of each the run received.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERRORS = {"500": (500, "InternalError", "We encountered an internal error. Please try again."),
          "503": (503, "ServiceUnavailable", "Please reduce your request rate."),
          "slowdown": (503, "SlowDown", "Please reduce your request rate.")}
KINDS = (*ERRORS, "reset-read", "reset-write")
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultProxy:
    """with FaultProxy(upstream_url, rate, seed) as proxy: point clients at proxy.url."""

    def __init__(self, upstream: str, rate: float, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> None:
        if not 0 <= rate <= 1 or not set(kinds) <= set(KINDS):
            raise ValueError(f"rate must be in [0, 1] and kinds among {KINDS}")
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rate, self.kinds = rate, kinds
        self.counts: Counter = Counter()
        self._rng, self._lock = random.Random(seed), threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def draw(self, method: str, has_body: bool) -> str | None:
        """The fault for one request (None: forward it), counted."""
        with self._lock:
            kind = None
            if self._rng.random() < self.rate:
                able = [k for k in self.kinds if (k != "reset-read" or method == "GET")
                        and (k != "reset-write" or has_body)]
                kind = self._rng.choice(able) if able else None
            self.counts[kind or "forwarded"] += 1
            return kind


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _reset(self) -> None:
        """Close the client's connection with a TCP reset (SO_LINGER 0), as a dropped connection does."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
                if limit is not None and len(out) >= limit:
                    return bytes(out)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n if limit is None else min(n, limit))

    def _proxy(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        has_body = length > 0 or self.headers.get("Transfer-Encoding", "").lower() == "chunked"
        kind = proxy.draw(self.command, has_body)
        if kind == "reset-write":
            self._body(limit=max(1, length // 2))
            self._reset()
            return
        body = self._body() if has_body else b""
        if kind in ERRORS:
            status, code, message = ERRORS[kind]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                   f"</Message><Resource>{self.path}</Resource></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)
            return
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=300)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if has_body:
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body if has_body else None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            resp_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP | {"content-length"}]
        finally:
            conn.close()
        self.send_response(resp.status, resp.reason)
        for k, v in resp_headers:
            self.send_header(k, v)
        declared = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", declared or "0")
        self.end_headers()
        if self.command == "HEAD":
            return
        if kind == "reset-read" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._reset()
            return
        self.wfile.write(data)
