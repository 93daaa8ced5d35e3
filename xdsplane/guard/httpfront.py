"""The guard's HTTP/1.1 ext_authz front (``guard.transport: http``; ``xdsplane guard
--http-address``): Envoy's ext_authz ``http_service`` asks it instead of the gRPC ``Check``,
at about a quarter of gRPC's CPU per request (BENCHMARKS.md section 10).

One ``asyncio.Protocol`` per kept-alive connection; no framework. What a check request
carries (set by Envoy, see ``xdsplane.policy.translate.guard``):

- the path: ``/xdsplane-check/<mode>`` then the client's path, the mode (``replay``,
  ``revocation``) a per-route ``path_prefix``;
- ``x-xdsplane-jwt-payload``: the verified JWT payload as JSON (jwt_authn's metadata), and
  ``x-xdsplane-client-cert``: the client certificate, URL-encoded PEM; Envoy adds both to
  the check request only (``headers_to_add``), and a client's own copies never reach here
  (not in ``allowed_headers``);
- ``x-envoy-expected-rq-timeout-ms``: Envoy's deadline; a request still unanswered past it
  is shed (Envoy has given up on it) before it spends a token's one use.

The answer: ``200`` (allowed) or the decision's status with ``x-guard-reason`` and a
one-line body, and on both the access log's ``guard_reason`` and ``jti_sha256`` as headers
(Envoy's ``dynamic_metadata_from_headers`` makes them metadata; they never reach the
client or the upstream). The decision is decide.py's, shared with the gRPC ``Check``.

Hostile input never kills the server: a request head over ``MAX_HEAD`` bytes or
``MAX_HEADERS`` lines gets 431, anything malformed (request line, header line, chunked or
bad ``Content-Length``, a body over ``MAX_BODY``) 400, a head not complete within
``HEAD_SECONDS`` 408; each closes its connection. An idle kept-alive connection is closed
after ``IDLE_SECONDS``. Pipelined requests are answered in order.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from xdsplane import logs
from xdsplane.guard.decide import REPLAY, REVOCATION, Ask, Decider, Outcome, challenge_of
from xdsplane.names import (
    GUARD_HTTP_CERT_HEADER,
    GUARD_HTTP_PATH,
    GUARD_HTTP_PAYLOAD_HEADER,
    GUARD_REASON_KEY,
    JTI_HASH_KEY,
)

MAX_HEAD = 65536  # bytes of request line and headers (a JWT payload and a certificate fit)
MAX_HEADERS = 64  # header lines (Envoy sends ~8)
MAX_BODY = 65536  # a body is read and ignored (Envoy sends none: with_request_body unset)
MAX_PIPELINE = 32  # requests of one connection awaiting their answer; then reading pauses
HEAD_SECONDS = 10.0  # a request head started must be complete within this
IDLE_SECONDS = 300.0  # a kept-alive connection with nothing to do is closed after this
SWEEP_SECONDS = 1.0

REASON_HEADER = "x-guard-reason"
_MODES = {REPLAY.encode(): REPLAY, REVOCATION.encode(): REVOCATION}
_PREFIX = GUARD_HTTP_PATH.encode()
_PAYLOAD = GUARD_HTTP_PAYLOAD_HEADER.encode()
_CERT = GUARD_HTTP_CERT_HEADER.encode()
_DEADLINE = b"x-envoy-expected-rq-timeout-ms"
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_STATUS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    408: "Request Timeout",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Request:
    """What the front reads of one check request."""

    __slots__ = ("cert", "close", "deadline_ms", "mode", "payload")

    def __init__(self) -> None:
        self.mode = ""
        self.payload = b""
        self.cert = b""
        self.deadline_ms = 0
        self.close = False


def parse_head(head: bytes) -> tuple[Request, int]:
    """The request of ``head`` (request line and headers, without the blank line) and its
    body's length; raises BadRequest."""
    lines = head.split(b"\r\n")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(431, "too_many_headers")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1]:
        raise BadRequest(400, "request_line")
    req = Request()
    req.close = parts[2] == b"HTTP/1.0"
    path = parts[1]
    if path.startswith(_PREFIX):
        segment = path[len(_PREFIX) :].split(b"/", 1)[0].split(b"?", 1)[0]
        req.mode = _MODES.get(segment, "")
    length: int | None = None
    for line in lines[1:]:
        colon = line.find(b":")
        if colon <= 0 or not _TOKEN.issuperset(line[:colon]):
            raise BadRequest(400, "header_line")  # also obs-fold and a space before ":"
        name = line[:colon].lower()
        value = line[colon + 1 :].strip(b" \t")
        if name == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise BadRequest(400, "content_length")
            length = int(value)
        elif name == b"transfer-encoding":
            raise BadRequest(400, "transfer_encoding")
        elif name == _PAYLOAD:
            req.payload = value
        elif name == _CERT:
            req.cert = value
        elif name == _DEADLINE:
            req.deadline_ms = int(value) if value.isdigit() and len(value) < 10 else 0
        elif name == b"connection":
            token = value.lower()
            if token == b"close":
                req.close = True
            elif token == b"keep-alive":
                req.close = False
    if length is not None and length > MAX_BODY:
        raise BadRequest(400, "body_too_large")
    return req, length or 0


def claims_of(payload: bytes) -> dict[str, Any] | None:
    """The JSON object of the payload header; None when absent or not an object."""
    if not payload:
        return None
    try:
        value = json.loads(payload)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return value if isinstance(value, dict) else None


def _headers(fields: list[tuple[str, str]]) -> bytes:
    # Values come from decisions and hashes: printable ASCII, no CR/LF (checked anyway).
    return b"".join(
        f"{k}: {v}\r\n".encode("latin-1", "replace")
        for k, v in fields
        if "\r" not in v and "\n" not in v
    )


def response(
    status: int, fields: list[tuple[str, str]], body: str = "", close: bool = False
) -> bytes:
    data = body.encode()
    head = f"HTTP/1.1 {status} {_STATUS.get(status, 'Status')}\r\n".encode()
    extra = b"connection: close\r\n" if close else b""
    length = f"content-length: {len(data)}\r\n\r\n".encode()
    return head + _headers(fields) + extra + length + data


def answer(outcome: Outcome, close: bool = False) -> bytes:
    """The check response of a decision: 200, or the refusal's status, reason and body;
    the access log's metadata as headers either way."""
    decision = outcome.decision
    meta = [(k, v) for k, v in outcome.metadata.items() if k in (GUARD_REASON_KEY, JTI_HASH_KEY)]
    if decision.allowed:
        return response(200, meta, close=close)
    fields = [(REASON_HEADER, decision.reason), ("content-type", "text/plain"), *meta]
    challenge = challenge_of(decision)
    if challenge is not None:
        fields.append(("www-authenticate", challenge))
    return response(decision.status, fields, f"{decision.message}\n", close)


class FrontMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.bad = Counter(
            "xdsplane_guard_http_bad_requests",
            "HTTP front: requests refused before any decision, by reason (request_line, "
            "header_line, too_many_headers, head_too_large, head_timeout, content_length, "
            "transfer_encoding, body_too_large)",
            ["reason"],
            registry=registry,
        )
        self.shed = Counter(
            "xdsplane_guard_http_shed",
            "HTTP front: requests answered 504 undecided, past Envoy's deadline",
            registry=registry,
        )


class Front:
    """The server side: the decider, the metrics, the open connections (swept for slow
    heads and idle connections), and an optional check of the caller's certificate."""

    def __init__(
        self,
        decider: Decider,
        registry: CollectorRegistry,
        caller: Callable[[bytes, str], bool] | None = None,
    ) -> None:
        self.decider = decider
        self.metrics = FrontMetrics(registry)
        self.caller = caller
        self.conns: set[Connection] = set()
        self.log = logs.get("xdsplane.guard")
        self.clock = time.monotonic

    def protocol(self) -> Connection:
        return Connection(self)

    def sweep(self) -> None:
        now = self.clock()
        for conn in list(self.conns):
            conn.expire(now)

    async def sweeping(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(SWEEP_SECONDS)
            self.sweep()


class Connection(asyncio.Protocol):
    """One kept-alive connection: requests parsed as they arrive, decided concurrently,
    answered in order."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.buf = bytearray()
        self.scanned = 0  # bytes of buf searched for the end of a head, in vain
        self.skip = 0  # body bytes still to discard
        self.transport: asyncio.Transport | None = None
        self.slots: deque[list[bytes | None]] = deque()  # [answer or None, close-after]
        self.last = front.clock()
        self.head_since: float | None = None
        self.paused = False
        self.closing = False

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.front.caller is not None:
            sslobj = transport.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            peer = str(transport.get_extra_info("peername"))
            if not der or not self.front.caller(der, peer):
                transport.abort()
                return
        self.front.conns.add(self)

    def eof_received(self) -> bool | None:
        """The client sent all it will: answer what it asked, then close (True keeps the
        transport open for those answers)."""
        self.closing = True
        if self.slots:
            self.slots.append([b"", b"close"])  # after the last answer: close
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.conns.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last = now = self.front.clock()
        buf = self.buf
        buf += data  # a bytearray: a head trickling in byte by byte costs no copies
        pos = 0
        while pos < len(buf):
            if self.skip:  # a body, discarded
                dropped = min(self.skip, len(buf) - pos)
                self.skip -= dropped
                pos += dropped
                continue
            # from where the last search stopped (each byte is searched once, however
            # slowly a head arrives), never past MAX_HEAD
            end = buf.find(b"\r\n\r\n", max(pos, self.scanned - 3), pos + MAX_HEAD + 4)
            if end < 0:
                if len(buf) - pos > MAX_HEAD:
                    self._bad(BadRequest(431, "head_too_large"))
                    return
                self.scanned = len(buf)
                break
            self.scanned = 0
            try:
                req, self.skip = parse_head(bytes(buf[pos:end]))
            except BadRequest as e:
                self._bad(e)
                return
            pos = end + 4
            self._dispatch(req, now)
            if req.close:
                self.closing = True
                pos = len(buf)
        del buf[:pos]
        self.scanned = max(0, self.scanned - pos)
        # a request under way (a head or a body incomplete) must complete in HEAD_SECONDS
        if buf or self.skip:
            if self.head_since is None:
                self.head_since = now
        else:
            self.head_since = None
        if len(self.slots) >= MAX_PIPELINE and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    # -- requests -------------------------------------------------------------------------

    def _dispatch(self, req: Request, arrived: float) -> None:
        slot: list[bytes | None] = [None, b"close" if req.close else None]
        self.slots.append(slot)
        ask = Ask(req.mode, claims_of(req.payload), req.cert.decode("latin-1"))
        task = asyncio.ensure_future(self._decide(ask, req.deadline_ms, arrived))
        task.add_done_callback(lambda t: self._done(slot, t, bool(req.close)))

    async def _decide(self, ask: Ask, deadline_ms: int, arrived: float) -> bytes | None:
        if deadline_ms and (self.front.clock() - arrived) * 1000 > deadline_ms:
            self.front.metrics.shed.inc()
            return None
        return answer(await self.front.decider.authorize(ask))

    def _done(
        self, slot: list[bytes | None], task: asyncio.Future[bytes | None], close: bool
    ) -> None:
        if task.cancelled():
            data = response(503, [(REASON_HEADER, "cancelled")], close=True)
        elif task.exception() is not None:
            self.front.log.error("http check failed", error=repr(task.exception()))
            data = response(503, [(REASON_HEADER, "internal_error")], "internal error\n", True)
        else:
            found = task.result()
            data = found or response(504, [(REASON_HEADER, "deadline")], "too late\n", close)
        slot[0] = data
        self._flush()

    def _flush(self) -> None:
        while self.slots and self.slots[0][0] is not None:
            data, close = self.slots.popleft()
            if self.transport is None:
                continue
            assert data is not None
            if data:
                self.transport.write(data)
            if close is not None:
                self.transport.close()
                self.transport = None
        self.last = self.front.clock()
        if self.paused and len(self.slots) < MAX_PIPELINE // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def _bad(self, error: BadRequest) -> None:
        """Answered once every earlier request is, then the connection closes."""
        self.front.metrics.bad.labels(error.reason).inc()
        self.closing = True
        self.buf.clear()
        body = f"bad request: {error.reason}\n"
        self.slots.append(
            [response(error.status, [(REASON_HEADER, error.reason)], body, True), b""]
        )
        self._flush()

    def expire(self, now: float) -> None:
        """Called by the sweep: close a head started too long ago, or an idle connection."""
        if self.transport is None or self.closing:
            return
        if self.head_since is not None and now - self.head_since > HEAD_SECONDS:
            self._bad(BadRequest(408, "head_timeout"))
        elif not self.slots and not self.buf and now - self.last > IDLE_SECONDS:
            self.transport.close()
            self.transport = None


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """TLS 1.2+, the guard's certificate, a client certificate chaining to ``ca`` required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
