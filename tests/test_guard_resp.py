"""The guard's own Redis pipe (``xdsplane/guard/resp.py``), which carries every Check's
jti claim and revocation lookup: RESP2 and RESP3 replies parsed whole or not at all, replies
matched to their batches in order however the bytes arrive, and a Redis that stops
answering (SIGSTOP, the socket still open) failing the batches in flight within the
store's timeout, after which the store opens a new connection by itself."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from harness import ProcessGroup
from redis.exceptions import ResponseError
from test_guard import Redis

from xdsplane.guard.resp import INCOMPLETE, PUSH, Pipe, pack, parse
from xdsplane.guard.store import RedisStore, StoreUnavailable

REPLIES: list[tuple[bytes, Any]] = [
    (b"+OK\r\n", b"OK"),
    (b"$-1\r\n", None),  # RESP2 nil: SET NX that lost
    (b"_\r\n", None),  # RESP3 null
    (b":42\r\n", 42),
    (b"(12345678901234567890\r\n", 12345678901234567890),
    (b"#t\r\n", True),
    (b",1.5\r\n", 1.5),
    (b"$5\r\nab\r\nc\r\n", b"ab\r\nc"),  # a bulk string holding CRLF
    (b"=7\r\ntxt:abc\r\n", b"abc"),
    (b"*3\r\n$1\r\na\r\n$-1\r\n_\r\n", [b"a", None, None]),  # MGET
    (b"*0\r\n", []),
    (b"~1\r\n:1\r\n", [1]),
    (b"%1\r\n+k\r\n:2\r\n", {b"k": 2}),
    (b"|1\r\n+ttl\r\n:3\r\n+OK\r\n", b"OK"),  # an attribute, then its reply
]


@pytest.mark.parametrize(("data", "value"), REPLIES)
def test_each_reply_is_parsed_whole_or_not_at_all(data: bytes, value: Any) -> None:
    assert parse(data + b"+next\r\n", 0) == (value, len(data))
    for cut in range(len(data)):  # any prefix: incomplete, position unchanged
        assert parse(data[:cut], 0) == (INCOMPLETE, 0), (data, cut)


def test_error_replies_are_returned_not_raised() -> None:
    for data in (b"-WRONGTYPE Operation against a key\r\n", b"!9\r\nERR nope.\r\n"):
        value, after = parse(data, 0)
        assert isinstance(value, ResponseError) and after == len(data)
    assert "WRONGTYPE" in str(parse(b"-WRONGTYPE x\r\n", 0)[0])


def test_a_push_is_told_apart_and_garbage_is_refused() -> None:
    assert parse(b">2\r\n+invalidate\r\n*0\r\n", 0)[0] is PUSH
    with pytest.raises(ValueError, match="not a RESP reply"):
        parse(b"?what\r\n", 0)


def test_commands_are_packed_as_arrays_of_bulk_strings() -> None:
    assert pack((b"SET", "k", b"1", b"NX", b"PX", 60000)) == (
        b"*6\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n$2\r\nNX\r\n$2\r\nPX\r\n$5\r\n60000\r\n"
    )


class Writer:
    """A stream writer that keeps what is written."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True


async def test_replies_split_across_reads_go_to_their_batches_in_order() -> None:
    reader = asyncio.StreamReader()
    writer = Writer()
    pipe = Pipe(reader, writer, timeout=30)  # type: ignore[arg-type]
    first = pipe.send([(b"MGET", b"a", b"b"), (b"SET", b"j", b"1", b"NX", b"PX", 1)])
    second = pipe.send([(b"SET", b"j", b"1", b"NX", b"PX", 1)])
    assert writer.data.count(b"*") == 3  # 3 commands written at once, no reply awaited
    wire = b"*2\r\n$3\r\nrv1\r\n$-1\r\n+OK\r\n>1\r\n+push\r\n$-1\r\n"
    for i in range(len(wire)):  # one byte per read
        reader.feed_data(wire[i : i + 1])
        await asyncio.sleep(0)
    assert await asyncio.wait_for(first, 10) == [[b"rv1", None], b"OK"]
    assert await asyncio.wait_for(second, 10) == [None]
    pipe.close()
    assert writer.closed


async def test_a_reply_nobody_asked_for_closes_the_pipe() -> None:
    reader = asyncio.StreamReader()
    pipe = Pipe(reader, Writer(), timeout=30)  # type: ignore[arg-type]
    reader.feed_data(b"+OK\r\n")
    for _ in range(100):
        if not pipe.open:
            break
        await asyncio.sleep(0)
    assert not pipe.open
    with pytest.raises(Exception, match="closed"):
        await pipe.send([(b"PING",)])


@pytest.fixture
def redis(procs: ProcessGroup, tmp_path: Path) -> Redis:
    return Redis(procs, tmp_path).start()


async def test_a_redis_that_stops_answering_fails_within_the_timeout_then_recovers(
    redis: Redis,
) -> None:
    errors: list[tuple[str, str]] = []
    store = RedisStore(
        redis.url, timeout=0.3, backoff=0.1, on_error=lambda op, e: errors.append((op, e))
    )
    try:
        assert await store.claim("before", 60_000) is True
        os.kill(redis.proc.pid, signal.SIGSTOP)  # the socket stays open; nothing answers
        try:
            # Generous ceiling (a loaded machine): the store's own bound is 0.3 s.
            outcome = await asyncio.wait_for(
                asyncio.gather(
                    store.claim("during", 60_000), store.get_many(["rv"]), return_exceptions=True
                ),
                30,
            )
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        assert all(isinstance(o, StoreUnavailable) for o in outcome), outcome
        assert "no reply from Redis" in str(outcome[0])
        assert errors == [("pipeline", "TimeoutError")]
        assert store.up() is False

        async def claim_after() -> bool | None:
            try:
                return await store.claim("after", 60_000)
            except StoreUnavailable:
                return None

        for _ in range(300):  # a new connection once the backoff has passed
            if await claim_after():
                break
            await asyncio.sleep(0.05)
        assert store.up() is True
        assert await store.claim("before", 60_000) is False  # remembered by Redis
    finally:
        await store.close()


async def test_redis_py_still_hands_over_its_streams(redis: Redis) -> None:
    """The pipe takes its stream from a connection redis-py opened (connect, TLS, AUTH,
    SELECT): a redis-py whose asyncio Connection stops keeping them where the store looks
    would fail every Check (store unavailable), so it fails here first."""
    store = RedisStore(redis.url)
    try:
        conn = await store._client.connection_pool.get_connection()
        assert isinstance(conn._reader, asyncio.StreamReader)
        assert isinstance(conn._writer, asyncio.StreamWriter)
        await store._client.connection_pool.release(conn)
    finally:
        await store.close()
