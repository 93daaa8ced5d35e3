"""The demo billing service the sample gateway routes to: echoes what it received as JSON.

It shows what Envoy forwarded: the path, the identity headers (x-forwarded-client-cert and
friends) and which instance answered.
"""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SHOWN_HEADERS = ("host", "x-forwarded-client-cert", "x-forwarded-proto", "x-request-id")


class _Handler(BaseHTTPRequestHandler):
    server_version = "billing-demo"
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: without TCP_NODELAY the body waits for the peer's
    # delayed ACK (40 ms per kept-alive request).
    disable_nagle_algorithm = True

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
                "peer_certificate": _peer(self.connection),
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


@dataclass(frozen=True)
class TlsFiles:
    """Serve TLS with this certificate; with ``client_ca``, require client certificates."""

    certificate: str
    private_key: str
    client_ca: str | None = None


class _TlsServer(ThreadingHTTPServer):
    context: ssl.SSLContext

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        sock.settimeout(10)
        return self.context.wrap_socket(sock, server_side=True), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # failed handshakes are the peer's problem; keep serving


def _peer(conn: Any) -> str | None:
    """The subject of the client certificate on this connection (who called: Envoy)."""
    getpeercert = getattr(conn, "getpeercert", None)
    if getpeercert is None:
        return None
    cert = getpeercert()
    if not cert:
        return None
    return ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)


def start(
    host: str, port: int, name: str = "billing", tls: TlsFiles | None = None
) -> ThreadingHTTPServer:
    """Start the demo service in a daemon thread; returns the server (call shutdown())."""
    if tls is None:
        server = ThreadingHTTPServer((host, port), _Handler)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(tls.certificate, tls.private_key)
        if tls.client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(tls.client_ca)
        server = _TlsServer((host, port), _Handler)
        server.context = ctx
    server.daemon_threads = True
    server.service_name = name  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, name=f"demo-{name}", daemon=True).start()
    return server
