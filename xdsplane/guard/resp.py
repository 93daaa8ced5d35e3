"""A lean pipe to Redis for the guard's hot commands (the jti ``SET NX`` and the revocation
``MGET`` of every Check).

redis-py's asyncio client spends ~150 µs of CPU on one Check's pipeline (a connection from
the pool, a Pipeline object, its reply parser awaiting each line, a task for the timeout);
the same two commands written as RESP and their replies parsed from one read cost ~25 µs
(BENCHMARKS.md section 10, second pass). ``Pipe`` writes each batch of commands as it
comes, without waiting for earlier replies (Redis answers in order), and one reader task
matches the replies to the batches in order.

The connection itself (TCP or TLS, ``AUTH``, ``SELECT``) is opened by redis-py, from the
same URL and options as the rest of the store; ``Pipe`` then owns its stream. A batch not
answered within ``timeout``, a connection that closes or a reply that cannot be parsed
fails every batch in flight and closes the pipe (the store opens a new one later).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

READ_SIZE = 65536
INCOMPLETE = object()  # parse(): the buffer does not hold the whole reply yet


def pack(args: Sequence[bytes | str | int]) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        data = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


PUSH = object()  # parse(): an out-of-band RESP3 push (not the reply to a command)


def parse(buf: bytes | bytearray, pos: int) -> tuple[Any, int]:
    """The RESP2 or RESP3 reply at ``pos`` and the position after it; ``(INCOMPLETE,
    pos)`` when the buffer ends before it does, ``(PUSH, after)`` for a RESP3 push. An
    error reply is returned (not raised) as a ``ResponseError``, as redis-py's pipelines
    do with ``raise_on_error=False``. (redis-py negotiates RESP3 when the server has it.)"""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return INCOMPLETE, pos
    kind, line, after = buf[pos], buf[pos + 1 : end], end + 2
    if kind == 43:  # + simple string
        return bytes(line), after
    if kind == 45:  # - error
        return ResponseError(bytes(line).decode("utf-8", "replace")), after
    if kind == 58 or kind == 40:  # : integer, ( big number
        return int(line), after
    if kind == 95:  # _ null (RESP3)
        return None, after
    if kind == 35:  # # boolean (RESP3)
        return line == b"t", after
    if kind == 44:  # , double (RESP3)
        return float(line), after
    if kind in (36, 61, 33):  # $ bulk string, = verbatim string, ! bulk error
        n = int(line)
        if n < 0:
            return None, after
        if len(buf) < after + n + 2:
            return INCOMPLETE, pos
        data = bytes(buf[after : after + n])
        if kind == 33:
            return ResponseError(data.decode("utf-8", "replace")), after + n + 2
        return (data[4:] if kind == 61 else data), after + n + 2
    if kind in (42, 126, 62, 37, 124):  # * array, ~ set, > push, % map, | attribute
        n = int(line)
        if n < 0:
            return None, after
        items = []
        for _ in range(n * 2 if kind in (37, 124) else n):
            item, after = parse(buf, after)
            if item is INCOMPLETE:
                return INCOMPLETE, pos
            items.append(item)
        if kind == 62:
            return PUSH, after
        if kind == 124:  # attributes describe the reply that follows: skipped
            reply, after = parse(buf, after)
            return (INCOMPLETE, pos) if reply is INCOMPLETE else (reply, after)
        if kind == 37:
            return dict(zip(items[::2], items[1::2], strict=True)), after
        return items, after
    raise ValueError(f"not a RESP reply: type byte {kind!r}")


class Pipe:
    """Batches of commands on one connection; each ``send`` answers with its replies."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.timeout = timeout
        self.open = True
        # In order of sending: [replies still expected, replies so far, future, timer].
        self._waiting: deque[list[Any]] = deque()
        self._buf = bytearray()
        self._task = asyncio.get_running_loop().create_task(self._read())

    def send(self, commands: Sequence[Sequence[bytes | str | int]]) -> asyncio.Future[list[Any]]:
        """Write ``commands`` now; a future of their replies, in order."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self.open:
            future.set_exception(RedisConnectionError("the Redis pipe is closed"))
            return future
        timer = loop.call_later(self.timeout, self._timed_out)
        self._waiting.append([len(commands), [], future, timer])
        self._writer.write(b"".join(pack(c) for c in commands))
        return future

    def _timed_out(self) -> None:
        self.close(RedisTimeoutError(f"no reply from Redis within {self.timeout:g} s"))

    async def _read(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    raise RedisConnectionError("Connection closed by server.")
                self._received(data)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # OSError, a reply that is not RESP
            self.close(e)

    def _received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        waiting = self._waiting
        while pos < len(buf):
            value, after = parse(buf, pos)
            if value is INCOMPLETE:
                break
            pos = after
            if value is PUSH:
                continue
            if not waiting:
                raise RedisConnectionError("Redis sent a reply nobody asked for")
            head = waiting[0]
            head[1].append(value)
            head[0] -= 1
            if head[0] == 0:
                waiting.popleft()
                head[3].cancel()
                if not head[2].done():
                    head[2].set_result(head[1])
        if pos:
            del buf[:pos]

    def close(self, error: BaseException | None = None) -> None:
        """Fail every batch in flight with ``error`` and close the connection."""
        if not self.open:
            return
        self.open = False
        failure = error or RedisConnectionError("the Redis pipe was closed")
        while self._waiting:
            _n, _replies, future, timer = self._waiting.popleft()
            timer.cancel()
            if not future.done():
                future.set_exception(failure)
        if asyncio.current_task() is not self._task:
            self._task.cancel()
        with contextlib.suppress(Exception):
            self._writer.close()
