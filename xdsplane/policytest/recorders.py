"""Recorders: one small HTTP server per upstream cluster, answering 200 to every request and
writing down which upstream got it, with which method, path and headers.

A recorder for a cluster that speaks TLS serves a certificate of the run's CA carrying the
names the cluster checks (its SNI and exact SAN matchers); when Envoy presents a client
certificate there, the recorder requires one chaining to the run's CA (mutual TLS) and
notes its URI SANs.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MAX_BODY = 1024 * 1024


@dataclass(frozen=True)
class Record:
    upstream: str
    method: str
    path: str
    headers: dict[str, str]
    client_uris: tuple[str, ...] = ()


@dataclass
class Log:
    """Every request any recorder received, in order."""

    records: list[Record] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, r: Record) -> None:
        with self.lock:
            self.records.append(r)

    def since(self, mark: int) -> list[Record]:
        with self.lock:
            return self.records[mark:]

    def mark(self) -> int:
        with self.lock:
            return len(self.records)


def _peer_uris(sock: Any) -> tuple[str, ...]:
    getpeercert = getattr(sock, "getpeercert", None)
    cert = getpeercert() if getpeercert is not None else None
    if not cert:
        return ()
    return tuple(v for k, v in cert.get("subjectAltName", ()) if k == "URI")


def _handler(name: str, log: Log) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def _record(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if 0 < length <= MAX_BODY:
                self.rfile.read(length)
            headers: dict[str, str] = {}
            for k, v in self.headers.items():
                k = k.lower()
                headers[k] = f"{headers[k]}, {v}" if k in headers else v
            log.add(Record(name, self.command, self.path, headers, _peer_uris(self.connection)))
            body = f"recorded by xdsplane test: upstream {name}\n".encode()
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _record

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs in the request's thread, not in the accepting one.
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                with contextlib.suppress(OSError):
                    request.close()
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that goes away mid-answer is not an error of the run


class Recorder:
    def __init__(
        self,
        name: str,
        log: Log,
        cert: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
    ) -> None:
        self.name = name
        self.server = _Server(("127.0.0.1", 0), _handler(name, log))
        if cert is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
            ctx.set_alpn_protocols(["http/1.1"])
            if client_ca is not None:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(str(client_ca))
            self.server.tls = ctx
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"recorder-{name}",
            daemon=True,
        )

    def start(self) -> Recorder:
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
