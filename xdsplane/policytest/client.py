"""The run's HTTP client: Python's ``ssl`` and ``http.client``, one fresh connection per
request, the SNI and Host of the case, a client certificate of the run when asked.

Envoy's stand-in server certificate is verified against the run's CA; its names are not
checked against the SNI (the pipeline has already checked that it covers each host).
"""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

TIMEOUT = 10.0
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no HTTP answer (refused, reset, handshake failed)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str = ""


class _TlsConnection(http.client.HTTPConnection):
    def __init__(self, port: int, ctx: ssl.SSLContext, sni: str, timeout: float) -> None:
        super().__init__("127.0.0.1", port, timeout=timeout)
        self.ctx = ctx
        self.sni = sni

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self.timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self.ctx.wrap_socket(raw, server_hostname=self.sni or None)


def tls_context(ca: Path, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(str(ca))
    ctx.set_alpn_protocols(["http/1.1"])
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


class Session:
    """The connection of one case: its repeats reuse it (keep-alive), so that a burst such
    as a rate-limit case lands within the limit's window; a connection the server closed
    (or that failed) is opened again for the next request."""

    def __init__(
        self, port: int, ctx: ssl.SSLContext | None, sni: str, timeout: float = TIMEOUT
    ) -> None:
        self.port, self.ctx, self.sni, self.timeout = port, ctx, sni, timeout
        self.conn: http.client.HTTPConnection | None = None

    def _open(self) -> http.client.HTTPConnection:
        if self.ctx is None:
            return http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        return _TlsConnection(self.port, self.ctx, self.sni, self.timeout)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def send(self, method: str, path: str, headers: Mapping[str, str], last: bool) -> Answer:
        conn = self.conn = self.conn or self._open()
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in {**headers, **({"Connection": "close"} if last else {})}.items():
                conn.putheader(k, v)
            conn.endheaders()
            r = conn.getresponse()
            out: dict[str, str] = {}
            for k, v in r.getheaders():
                k = k.lower()
                out[k] = f"{out[k]}, {v}" if k in out else v
            body = r.read()
            if r.will_close or last:
                self.close()
            return Answer(r.status, out, body[:MAX_BODY])
        except TimeoutError:
            self.close()
            return Answer(None, error=f"no answer within {self.timeout:g}s")
        except ssl.SSLError as e:
            self.close()
            return Answer(None, error=f"TLS: {e.reason or e}")
        except (OSError, http.client.HTTPException) as e:
            self.close()
            return Answer(None, error=f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
