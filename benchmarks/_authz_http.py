"""Allow-all ext_authz servers over plain HTTP/1.1 (Envoy's ext_authz ``http_service``): the
floor of a lean Python authz front, for ``bench_guard.py --backends ...,http-echo,http-redis``.

    python benchmarks/_authz_http.py --address H:P --admin-address H:P [--redis URL]

The counterpart of ``_authz_echo.py`` (the grpc.aio floor) without gRPC: one
``asyncio.Protocol`` per connection, kept alive, parsing the request line and headers and
skipping a ``Content-Length`` body, then answering ``200`` with ``Content-Length: 0``. No
framework, no task or future per request, no log, no metrics.

With ``--redis URL`` (``http-redis``) each request also costs one Redis ``SET jti:<jti> 1
NX PX 60000``, the jti taken from the ``x-xdsplane-jwt-payload`` header (what Envoy adds to
the check request with ``guard.transport: http``: the verified payload, JSON), on one
connection to
Redis: every command that arrives in one event-loop iteration goes out in one write, the
replies are matched in order. ``OK`` -> 200; already set -> 403 ``already used`` (so that
``bench_guard.py`` can check that a replay is refused); no payload or no jti -> 403; Redis
unreachable -> 503 (fail closed). This is what the store adds to the floor, not a guard:
no revocation, no rate limit, no certificate, no log (BENCHMARKS.md section 10, "the HTTP
ext_authz floor").

``--admin-address`` answers ``200`` to anything (``/healthz`` for the benchmark's wait).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
USED = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 12\r\n\r\nalready used"
NO_KEY = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\nno jti"
DOWN = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 11\r\n\r\nstore down\n"
BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
PAYLOAD = b"\r\nx-xdsplane-jwt-payload:"
LENGTH = b"\r\ncontent-length:"
TTL_MS = b"60000"
MAX_HEAD = 65536

Reply = Callable[[bytes], None]


def jti_of(payload: bytes) -> bytes | None:
    """The ``jti`` claim of a JSON payload, or None."""
    try:
        claims = json.loads(payload)
    except ValueError:
        return None
    jti = claims.get("jti") if isinstance(claims, dict) else None
    return jti.encode() if isinstance(jti, str) and jti else None


class RedisPipe(asyncio.Protocol):
    """One connection to Redis; ``set_nx`` queues a command, the batch of one loop
    iteration is written once (``call_soon``), replies answer the callbacks in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.waiting: deque[Callable[[bool | None], None]] = deque()
        self.buf = b""
        self.loop = asyncio.get_running_loop()
        self.flush_due = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def set_nx(self, key: bytes, done: Callable[[bool | None], None]) -> None:
        """``done(True)``: set now; ``done(False)``: was set; ``done(None)``: no store."""
        if self.transport is None or self.transport.is_closing():
            done(None)
            return
        self.out.append(
            b"*6\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1\r\n1\r\n$2\r\nNX\r\n$2\r\nPX\r\n$5\r\n%s\r\n"
            % (len(key), key, TTL_MS)
        )
        self.waiting.append(done)
        if not self.flush_due:
            self.flush_due = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_due = False
        if self.transport is not None and self.out:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            kind = buf[pos]
            # SET NX PX answers +OK, or a null ($-1 in RESP2, _ in RESP3), or an -error
            result = True if kind == 43 else (None if kind == 45 else False)
            pos = end + 2
            if self.waiting:
                self.waiting.popleft()(result)
        self.buf = buf[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        while self.waiting:
            self.waiting.popleft()(None)


class AuthzHttp(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection from Envoy's ext_authz (or the benchmark)."""

    def __init__(self, store: RedisPipe | None) -> None:
        self.store = store
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        # Answers in request order: a slot per request still waiting for Redis (Envoy sends
        # one request at a time per connection; this only matters to a pipelining client).
        self.slots: deque[list[bytes]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._send(BAD)
                    self._close()
                    buf = b""
                break
            lower = buf[: end + 2].lower()
            length = 0
            at = lower.find(LENGTH)
            if at >= 0:
                try:
                    length = int(lower[at + len(LENGTH) : lower.index(b"\r\n", at + 2)])
                except ValueError:
                    length = -1
            if length < 0 or b"\r\ntransfer-encoding:" in lower:
                self._send(BAD)  # no chunked bodies here (Envoy sends none to ext_authz)
                self._close()
                buf = b""
                break
            if len(buf) < end + 4 + length:
                break
            self._handle(buf, lower)
            buf = buf[end + 4 + length :]
        self.buf = buf

    def _handle(self, raw: bytes, lower: bytes) -> None:
        close = b"\r\nconnection: close" in lower
        if self.store is None:
            self._answer(OK, close)
            return
        jti = None
        at = lower.find(PAYLOAD)
        if at >= 0:
            start = at + len(PAYLOAD)
            jti = jti_of(raw[start : lower.index(b"\r\n", start)].strip())
        if jti is None:
            self._answer(NO_KEY, close)
            return
        slot = [b""]
        self.slots.append(slot)

        def done(fresh: bool | None) -> None:
            slot[0] = OK if fresh else (USED if fresh is False else DOWN)
            while self.slots and self.slots[0][0]:
                self._send(self.slots.popleft()[0])
            if close and not self.slots:
                self._close()

        self.store.set_nx(b"jti:" + jti, done)

    def _answer(self, data: bytes, close: bool) -> None:
        if self.slots:  # behind a request still waiting for Redis
            self.slots.append([data])
            return
        self._send(data)
        if close:
            self._close()

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--address", required=True)
    ap.add_argument("--admin-address", required=True)
    ap.add_argument("--redis", help="redis://HOST:PORT: one SET NX per request (http-redis)")
    args, _ = ap.parse_known_args()
    loop = asyncio.get_running_loop()
    store = None
    if args.redis:
        url = urlsplit(args.redis)
        _, store = await loop.create_connection(RedisPipe, url.hostname, url.port or 6379)
    host, port = args.address.rsplit(":", 1)
    server = await loop.create_server(lambda: AuthzHttp(store), host, int(port))
    ahost, aport = args.admin_address.rsplit(":", 1)
    admin = await loop.create_server(lambda: AuthzHttp(None), ahost, int(aport))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()
    admin.close()


if __name__ == "__main__":
    asyncio.run(main())
