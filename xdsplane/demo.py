"""The demo billing service the sample gateway routes to: echoes what it received as JSON.

It shows what Envoy forwarded: the path, the identity headers (x-forwarded-client-cert and
friends) and which instance answered.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SHOWN_HEADERS = ("host", "x-forwarded-client-cert", "x-forwarded-proto", "x-request-id")


class _Handler(BaseHTTPRequestHandler):
    server_version = "billing-demo"
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(min(length, 1 << 20))
        body = json.dumps(
            {
                "service": getattr(self.server, "service_name", "billing"),
                "method": self.command,
                "path": self.path,
                "headers": {h: self.headers[h] for h in SHOWN_HEADERS if h in self.headers},
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        return


def start(host: str, port: int, name: str = "billing") -> ThreadingHTTPServer:
    """Start the demo service in a daemon thread; returns the server (call shutdown())."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    server.service_name = name  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, name=f"demo-{name}", daemon=True).start()
    return server
