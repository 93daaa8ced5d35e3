"""The guard's HTTP/1.1 ext_authz front (xdsplane/guard/httpfront.py) against hostile input,
on a real socket (127.0.0.1, a free port): oversized and malformed heads, bodies with and
without Content-Length, pipelined requests, slow and idle connections, garbage; each bad
request gets its status and closes only its own connection, and the server keeps serving.
Time is a fake clock the tests move (the sweep that closes slow and idle connections is
called directly): nothing waits on wall time.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from test_guard import pki_dir

from xdsplane import pki
from xdsplane.guard import httpfront
from xdsplane.guard.httpfront import Connection, Front, claims_of, parse_head, server_context
from xdsplane.guard.service import GuardService
from xdsplane.guard.store import MemoryStore
from xdsplane.guard.tls import CallerCheck

NOW = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def request(
    path: str = "/xdsplane-check/replay/x", claims: dict[str, Any] | None = None, extra: str = ""
) -> bytes:
    head = f"GET {path} HTTP/1.1\r\nhost: guard\r\ncontent-length: 0\r\n"
    if claims is not None:
        head += f"x-xdsplane-jwt-payload: {json.dumps(claims)}\r\n"
    return (head + extra + "\r\n").encode()


def token(jti: str, sub: str = "alice") -> dict[str, Any]:
    return {"iss": "https://idp", "sub": sub, "jti": jti, "exp": NOW + 120}


class Server:
    def __init__(self, front: Front, server: asyncio.Server, clock: Clock) -> None:
        self.front, self.server, self.clock = front, server, clock
        self.port = server.sockets[0].getsockname()[1]

    async def open(
        self, ctx: ssl.SSLContext | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, ssl=ctx)

    async def ask(self, data: bytes) -> bytes:
        """One connection: ``data`` sent, everything read until the server closes."""
        reader, writer = await self.open()
        writer.write(data)
        writer.write_eof()
        out = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        return out


async def serve(caller: Any = None, ctx: ssl.SSLContext | None = None) -> Server:
    svc = GuardService(MemoryStore(), None, clock=lambda: NOW)
    clock = Clock()
    front = Front(svc, CollectorRegistry(), caller)
    front.clock = clock
    server = await asyncio.get_running_loop().create_server(front.protocol, "127.0.0.1", 0, ssl=ctx)
    return Server(front, server, clock)


@pytest.fixture
async def srv() -> AsyncIterator[Server]:
    s = await serve()
    yield s
    s.server.close()


def statuses(data: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def reasons(data: bytes) -> list[str]:
    return [
        line.split(b":", 1)[1].strip().decode()
        for line in data.split(b"\r\n")
        if line.lower().startswith(b"guard_reason:")
    ]


async def test_pipelined_requests_answered_in_order(srv: Server) -> None:
    same = request(claims=token("j-pipe"))
    other = request(claims=token("j-other"))
    out = await srv.ask(same + same + other + request("/xdsplane-check/revocation/y", token("j")))
    assert statuses(out) == [200, 403, 200, 200], out
    assert reasons(out) == ["ok", "replay", "ok", "not_revoked"], out
    assert b"x-guard-reason: replay" in out
    assert b"j-pipe" not in out  # the jti never, only its hash
    assert out.count(b"jti_sha256: ") == 4


async def test_no_content_length_and_a_body_skipped(srv: Server) -> None:
    bare = b"GET /xdsplane-check/revocation/ HTTP/1.1\r\nhost: g\r\n\r\n"
    body = b"GET /xdsplane-check/revocation/ HTTP/1.1\r\ncontent-length: 5\r\n\r\nGET /"
    out = await srv.ask(bare + body + request("/xdsplane-check/revocation/"))
    assert statuses(out) == [200, 200, 200], out


async def test_a_client_path_or_unknown_prefix_chooses_no_mode(srv: Server) -> None:
    # Only Envoy's prefix names a mode: anything else is refused, never guessed.
    for path in ("/replay/x", "/xdsplane-check/introspection/x", "/xdsplane-check/replayx"):
        out = await srv.ask(request(path, token("j-" + path)))
        assert statuses(out) == [403], (path, out)
        assert reasons(out) == ["unknown_mode"], out


async def test_no_payload_refused_on_replay_garbage_payload_too(srv: Server) -> None:
    out = await srv.ask(request() + request(extra="x-xdsplane-jwt-payload: {not json\r\n"))
    assert reasons(out) == ["no_jwt_payload", "no_jwt_payload"], out
    assert claims_of(b"[1]") is None and claims_of(b"\xff") is None


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400, "request_line"),
        (b"GET /x HTTP/2.0\r\n\r\n", 400, "request_line"),
        (b"GET  /x HTTP/1.1\r\n\r\n", 400, "request_line"),
        (b"GET /x HTTP/1.1\r\nno colon\r\n\r\n", 400, "header_line"),
        (b"GET /x HTTP/1.1\r\nhost : g\r\n\r\n", 400, "header_line"),
        (b"GET /x HTTP/1.1\r\nhost: g\r\n folded\r\n\r\n", 400, "header_line"),
        (b"GET /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", 400, "transfer_encoding"),
        (b"GET /x HTTP/1.1\r\ncontent-length: -1\r\n\r\n", 400, "content_length"),
        (
            b"GET /x HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            400,
            "content_length",
        ),
        (b"GET /x HTTP/1.1\r\ncontent-length: 99999999\r\n\r\n", 400, "body_too_large"),
        (b"GET /x HTTP/1.1\r\n" + b"a: b\r\n" * 100 + b"\r\n", 431, "too_many_headers"),
        (b"GET /x HTTP/1.1\r\nbig: " + b"a" * 70000, 431, "head_too_large"),
    ],
)
async def test_bad_requests_get_their_status_and_the_server_lives(
    srv: Server, data: bytes, status: int, reason: str
) -> None:
    # a good request first on the same connection: answered, then the bad one closes it
    out = await srv.ask(request("/xdsplane-check/revocation/") + data + request())
    assert statuses(out) == [200, status], out
    assert f"x-guard-reason: {reason}".encode() in out
    assert out.endswith(b"\n") and b"connection: close" in out
    counted = srv.front.metrics.bad.labels(reason)._value.get()
    assert counted >= 1
    again = await srv.ask(request("/xdsplane-check/revocation/"))
    assert statuses(again) == [200]


async def test_a_slow_head_is_timed_out_and_an_idle_connection_closed(srv: Server) -> None:
    reader, writer = await srv.open()
    writer.write(b"GET /xdsplane-check/revocation/ HTTP/1.1\r\nhost: g")  # never finished
    await writer.drain()
    # the server has read the part: it counts from then
    for _ in range(200):  # poll (at most 2 s): the server has read the part
        if any(c.head_since is not None for c in srv.front.conns):
            break
        await asyncio.sleep(0.01)
    assert any(c.head_since is not None for c in srv.front.conns), "the part was never read"
    srv.front.sweep()
    assert len(srv.front.conns) == 1  # not yet
    srv.clock.t += httpfront.HEAD_SECONDS + 1
    srv.front.sweep()
    out = await asyncio.wait_for(reader.read(), 30)
    assert statuses(out) == [408] and b"head_timeout" in out
    writer.close()

    reader, writer = await srv.open()
    writer.write(request("/xdsplane-check/revocation/"))
    await reader.readuntil(b"\r\n\r\n")
    srv.clock.t += httpfront.IDLE_SECONDS - 1
    srv.front.sweep()
    assert not reader.at_eof()
    srv.clock.t += 2
    srv.front.sweep()
    assert await asyncio.wait_for(reader.read(), 30) == b""  # closed by the server
    writer.close()


async def test_connection_close_and_http_1_0_close_after_the_answer(srv: Server) -> None:
    out = await srv.ask(
        request("/xdsplane-check/revocation/", extra="connection: close\r\n")
        + request("/xdsplane-check/revocation/")
    )
    assert statuses(out) == [200], out  # the second request is never read
    old = b"GET /xdsplane-check/revocation/ HTTP/1.0\r\n\r\n"
    assert statuses(await srv.ask(old + old)) == [200]


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        self.out = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return None

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_a_check_past_envoys_deadline_is_shed_undecided() -> None:
    conn, transport, clock = fake_connection()
    front = conn.front
    late = request(claims=token("j-late"), extra="x-envoy-expected-rq-timeout-ms: 250\r\n")
    conn.data_received(late)
    clock.t += 1.0  # the loop was late: Envoy has given up by the time it is decided
    await settle()
    assert statuses(transport.out) == [504] and b"deadline" in transport.out
    assert front.metrics.shed._value.get() == 1
    # the jti was not spent: a first use in time is still a first use
    conn.data_received(request(claims=token("j-late")))
    await settle()
    assert statuses(transport.out) == [504, 200], transport.out


def test_parse_head_reads_what_envoy_sets() -> None:
    head = (
        b"POST /xdsplane-check/revocation/a/b?c=d HTTP/1.1\r\nHost: g\r\n"
        b"X-Xdsplane-Client-Cert: -----BEGIN%20CERT\r\nx-envoy-expected-rq-timeout-ms: 250\r\n"
        b"Connection: close\r\ncontent-length: 3"
    )
    req, length = parse_head(head)
    assert (req.mode, req.cert, req.deadline_ms, req.close, length) == (
        "revocation",
        b"-----BEGIN%20CERT",
        250,
        True,
        3,
    )


async def test_mtls_front_requires_a_client_certificate_with_the_san(tmp_path: Path) -> None:
    certs = pki_dir(tmp_path)
    caller = CallerCheck([pki.GUARD_CLIENT_URI], CollectorRegistry())
    ctx = server_context(
        str(certs / "guard.crt"), str(certs / "guard.key"), str(certs / "service-ca.crt")
    )
    s = await serve(caller.allows_der, ctx)
    try:

        def client(name: str | None) -> ssl.SSLContext:
            c = ssl.create_default_context(cafile=str(certs / "service-ca.crt"))
            c.check_hostname = False
            if name is not None:
                c.load_cert_chain(str(certs / f"{name}.crt"), str(certs / f"{name}.key"))
            return c

        reader, writer = await s.open(client("guard-client"))
        writer.write(request("/xdsplane-check/revocation/"))
        assert statuses(await reader.readuntil(b"\r\n\r\n")) == [200]
        writer.close()
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            reader, writer = await s.open(client(None))
            writer.write(request("/xdsplane-check/revocation/"))
            await reader.readuntil(b"\r\n\r\n")
    finally:
        s.server.close()


def fake_connection() -> tuple[Connection, Any, Clock]:
    svc = GuardService(MemoryStore(), None, clock=lambda: NOW)
    clock = Clock()
    front = Front(svc, CollectorRegistry())
    front.clock = clock
    conn = Connection(front)
    transport: Any = FakeTransport()
    conn.connection_made(transport)
    return conn, transport, clock


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_requests_trickling_in_byte_by_byte_are_read_whole() -> None:
    conn, transport, _ = fake_connection()
    data = request("/xdsplane-check/revocation/a", extra="content-length: 3\r\n")[:-2]
    data = data.replace(b"content-length: 0\r\n", b"") + b"\r\nabc" + request(claims=token("b"))
    for i in range(len(data)):
        conn.data_received(data[i : i + 1])
    await settle()
    assert statuses(transport.out) == [200, 200], transport.out
    assert reasons(transport.out) == ["not_revoked", "ok"]
    assert conn.head_since is None and not conn.buf and conn.scanned == 0


async def test_a_body_that_never_completes_is_timed_out() -> None:
    conn, transport, clock = fake_connection()
    head = b"GET /xdsplane-check/revocation/ HTTP/1.1\r\ncontent-length: 100\r\n\r\nab"
    conn.data_received(head)
    await settle()
    assert statuses(transport.out) == [200]  # decided at once: the body is not read
    clock.t += httpfront.HEAD_SECONDS + 1
    conn.front.sweep()
    assert statuses(transport.out) == [200, 408] and transport.closed
