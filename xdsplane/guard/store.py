"""Where the guard keeps what it has seen: token ids (jti) and rate limit counters.

Two backends with one async interface:

- ``MemoryStore``: a dict in this process, for a single gateway (and the unit tests);
- ``RedisStore``: one Redis shared by several guards, so that a jti used at one guard is
  refused at every other and a counter counts the requests of all of them. ``claim`` is one
  atomic ``SET key 1 NX PX ttl``; ``hit`` is ``INCRBY`` + ``PEXPIRE`` in one MULTI/EXEC.
  With ``batch`` (the default), the ``claim`` and ``get_many`` calls made within one turn of
  the event loop (Checks in flight together) go to Redis as one pipeline: one round trip
  and one write for all of them (each command still atomic on its own), on a connection
  of their own written and read by ``resp.Pipe`` (redis-py's machinery cost ~150 µs of CPU
  per Check); the other calls go through redis-py.

A backend that cannot answer raises ``StoreUnavailable``; the service decides what that
means (fail closed or open). The Redis store needs no restart when Redis comes back: every
call after a short back-off tries again on a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import math
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from xdsplane.guard.resp import Pipe


class StoreUnavailable(Exception):
    """The backend could not answer (connection refused or lost, timeout, error reply)."""


class StoreAuthError(Exception):
    """Redis refused the guard's credentials (no password, or the wrong one)."""


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and errors)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable redis URL>"
    if password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class Store(Protocol):
    name: str

    async def claim(self, key: str, ttl_ms: int) -> bool:
        """Record ``key`` for ``ttl_ms``; True when it was not there (first use)."""
        ...

    async def hit(self, key: str, addend: int, ttl_ms: int) -> int:
        """Add ``addend`` to the counter ``key`` (created with ``ttl_ms``); the new count."""
        ...

    async def put(self, key: str, value: bytes, ttl_ms: int | None) -> None:
        """Set ``key`` to ``value`` for ``ttl_ms`` (None: no expiry)."""
        ...

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """The values of ``keys`` (None where absent or expired), in one round trip."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove ``key``; True when it was there."""
        ...

    async def scan(self, prefix: str) -> list[bytes]:
        """The values of the live keys starting with ``prefix``."""
        ...

    def up(self) -> bool:
        """Whether the last call to the backend succeeded (for /healthz and metrics)."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """Keys with expiry in a dict; expired keys are swept as time passes (bounded memory)."""

    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._values: dict[str, tuple[int, float]] = {}  # key -> (value, expires at)
        self._expiries: list[tuple[float, str]] = []  # heap; stale entries skipped
        self._blobs: dict[str, tuple[bytes, float]] = {}  # key -> (value, expires at)

    def _sweep(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            _at, key = heapq.heappop(self._expiries)
            held = self._values.get(key)
            if held is not None and held[1] <= now:
                del self._values[key]

    def _live(self, key: str, now: float) -> tuple[int, float] | None:
        held = self._values.get(key)
        if held is None or held[1] <= now:
            return None
        return held

    def _set(self, key: str, value: int, expires: float) -> None:
        self._values[key] = (value, expires)
        heapq.heappush(self._expiries, (expires, key))

    async def claim(self, key: str, ttl_ms: int) -> bool:
        now = self._clock()
        self._sweep(now)
        if self._live(key, now) is not None:
            return False
        self._set(key, 1, now + ttl_ms / 1000)
        return True

    async def hit(self, key: str, addend: int, ttl_ms: int) -> int:
        now = self._clock()
        self._sweep(now)
        held = self._live(key, now)
        if held is None:
            self._set(key, addend, now + ttl_ms / 1000)
            return addend
        count = held[0] + addend
        self._values[key] = (count, held[1])
        return count

    async def put(self, key: str, value: bytes, ttl_ms: int | None) -> None:
        self._blobs[key] = (value, math.inf if ttl_ms is None else self._clock() + ttl_ms / 1000)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        now = self._clock()
        out: list[bytes | None] = []
        for key in keys:
            held = self._blobs.get(key)
            out.append(held[0] if held is not None and held[1] > now else None)
        return out

    async def delete(self, key: str) -> bool:
        held = self._blobs.pop(key, None)
        return held is not None and held[1] > self._clock()

    async def scan(self, prefix: str) -> list[bytes]:
        now = self._clock()
        for key in [k for k, (_v, at) in self._blobs.items() if at <= now]:
            del self._blobs[key]
        return [v for k, (v, _at) in self._blobs.items() if k.startswith(prefix)]

    def up(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._values)

    async def close(self) -> None:
        self._values.clear()
        self._expiries.clear()


class RedisStore:
    """A shared Redis (``redis://host:port/db``), through ``redis.asyncio``.

    Each call is bounded by ``timeout`` seconds. After a failure, calls fail at once for
    ``backoff`` seconds (so a dead Redis costs no time per request), then the next call
    tries again on a new connection: the store recovers by itself when Redis returns.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        timeout: float = 0.5,
        backoff: float = 0.2,
        on_error: Callable[[str, str], None] | None = None,
        password: str | None = None,
        batch: bool = True,
    ) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = redact_url(url)  # what logs and errors show: never the password
        self.timeout = timeout
        self.backoff = backoff
        self._on_error = on_error
        extra: dict[str, Any] = {} if password is None else {"password": password}
        self._client: Any = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # no hidden retries: the service decides
            health_check_interval=0,
            **extra,
        )
        self._up = True
        self._retry_at = 0.0
        self.batch = batch
        # Calls waiting for the next pipeline: (op, command, future of its reply).
        self._pending: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flushing: set[asyncio.Task[None]] = set()
        # The batches' own connection (resp.Pipe), opened by redis-py and then written to
        # and read from directly; None until the first batch, and again after a failure.
        self._pipe: Pipe | None = None
        self._pipe_conn: Any = None
        self._pipe_lock = asyncio.Lock()

    def up(self) -> bool:
        return self._up

    async def _queued(self, op: str, command: tuple[Any, ...]) -> Any:
        """``command`` sent in the pipeline of this loop turn; its reply."""
        if not self._up and time.monotonic() < self._retry_at:
            raise StoreUnavailable(f"redis {self.url}: down (retrying shortly)")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush_now)  # after the callbacks already due this turn
        self._pending.append((op, command, future))
        return await future

    def _flush_now(self) -> None:
        batch, self._pending = self._pending, []
        pipe = self._pipe
        if pipe is not None and pipe.open:  # the usual case: written now, no task
            self._send(pipe, batch)
            return
        task = asyncio.get_running_loop().create_task(self._open_then_send(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _open_then_send(
        self, batch: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]]
    ) -> None:
        from redis.exceptions import RedisError

        try:
            if not self._up and time.monotonic() < self._retry_at:
                raise StoreUnavailable(f"redis {self.url}: down (retrying shortly)")
            pipe = await asyncio.wait_for(self._open_pipe(), self.timeout * 2)
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(_batch_op(batch), e, None)
            _fail_all(batch, StoreUnavailable(f"redis {self.url}: {_describe(e)}"))
            return
        except StoreUnavailable as e:
            _fail_all(batch, e)
            return
        except BaseException as e:  # cancelled at shutdown: nobody is left waiting
            _fail_all(batch, StoreUnavailable(f"redis {self.url}: {e!r}"))
            raise
        self._send(pipe, batch)

    async def _open_pipe(self) -> Pipe:
        """The batches' connection, opened (connect, TLS, AUTH, SELECT) by redis-py's pool
        from the store's URL and options, then kept out of the pool."""
        async with self._pipe_lock:
            if self._pipe is not None and self._pipe.open:
                return self._pipe
            conn = await self._client.connection_pool.get_connection()
            # redis-py's asyncio Connection keeps its streams here (redis 8.2, pinned in
            # constraints.txt); tests/test_guard_batch.py fails if that changes.
            reader, writer = conn._reader, conn._writer
            if reader is None or writer is None:
                raise OSError("redis-py gave a connection without streams")
            self._pipe, self._pipe_conn = Pipe(reader, writer, self.timeout), conn
            return self._pipe

    def _send(
        self, pipe: Pipe, batch: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]]
    ) -> None:
        commands: list[tuple[Any, ...]] = []
        for _op, command, _future in batch:
            if command[0] == "claim":
                commands.append((b"SET", command[1], b"1", b"NX", b"PX", max(1, command[2])))
            else:
                commands.append((b"MGET", *command[1]))
        pipe.send(commands).add_done_callback(functools.partial(self._answered, batch, pipe))

    def _answered(
        self,
        batch: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]],
        pipe: Pipe,
        replies: asyncio.Future[list[Any]],
    ) -> None:
        error = (
            replies.exception()
            if not replies.cancelled()
            else StoreUnavailable(f"redis {self.url}: cancelled")
        )
        if error is not None:
            self._failed(_batch_op(batch), error, pipe)
            _fail_all(batch, StoreUnavailable(f"redis {self.url}: {_describe(error)}"))
            return
        self._up = True
        for (_op, _command, future), reply in zip(batch, replies.result(), strict=True):
            if future.done():  # the Check was cancelled (deadline)
                continue
            if isinstance(reply, Exception):
                future.set_exception(StoreUnavailable(f"redis {self.url}: {_describe(reply)}"))
            else:
                future.set_result(reply)

    def _failed(self, op: str, error: BaseException, pipe: Pipe | None) -> None:
        """The store is down for ``backoff``; ``pipe``, the one that failed (None: none was
        opened), is dropped if still current (the next batch opens a new one)."""
        self._up = False
        self._retry_at = time.monotonic() + self.backoff
        if self._on_error is not None:
            self._on_error(op, type(error).__name__)
        if pipe is not None and pipe is self._pipe:
            self._drop_pipe(error)

    def _drop_pipe(self, error: BaseException | None = None) -> None:
        pipe, conn = self._pipe, self._pipe_conn
        self._pipe = self._pipe_conn = None
        if pipe is not None:
            pipe.close(error)
        if conn is not None:  # back to the pool, disconnected (it reconnects when used)
            task = asyncio.get_running_loop().create_task(self._give_back(conn))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

    async def _give_back(self, conn: Any) -> None:
        with contextlib.suppress(Exception):  # best effort: it is broken or closing anyway
            await conn.disconnect()
        with contextlib.suppress(Exception):
            await self._client.connection_pool.release(conn)

    async def _call(self, op: str, fn: Callable[[], Any]) -> Any:
        from redis.exceptions import RedisError

        now = time.monotonic()
        if not self._up and now < self._retry_at:
            raise StoreUnavailable(f"redis {self.url}: down (retrying shortly)")
        try:
            result = await asyncio.wait_for(fn(), self.timeout * 2)
        except (RedisError, OSError, TimeoutError) as e:
            self._up = False
            self._retry_at = time.monotonic() + self.backoff
            if self._on_error is not None:
                self._on_error(op, type(e).__name__)
            # The broken connections are dropped; the next call opens new ones.
            await self._reset()
            raise StoreUnavailable(f"redis {self.url}: {_describe(e)}") from None
        self._up = True
        return result

    async def _reset(self) -> None:
        self._drop_pipe()
        pool = getattr(self._client, "connection_pool", None)
        if pool is not None:
            # Best effort: the connections are broken anyway.
            with contextlib.suppress(Exception):
                await pool.disconnect(inuse_connections=True)

    async def claim(self, key: str, ttl_ms: int) -> bool:
        if self.batch:
            return bool(await self._queued("claim", ("claim", key, ttl_ms)))

        async def run() -> Any:
            return await self._client.set(key, b"1", nx=True, px=max(1, ttl_ms))

        return bool(await self._call("claim", run))

    async def hit(self, key: str, addend: int, ttl_ms: int) -> int:
        async def run() -> Any:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.incrby(key, addend)
                pipe.pexpire(key, max(1, ttl_ms))
                return await pipe.execute()

        results = await self._call("hit", run)
        return int(results[0])

    async def put(self, key: str, value: bytes, ttl_ms: int | None) -> None:
        async def run() -> Any:
            if ttl_ms is None:
                return await self._client.set(key, value)
            return await self._client.set(key, value, px=max(1, ttl_ms))

        await self._call("put", run)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        if self.batch:
            return list(await self._queued("get", ("get", keys)))

        async def run() -> Any:
            return await self._client.mget(keys)

        return list(await self._call("get", run))

    async def delete(self, key: str) -> bool:
        async def run() -> Any:
            return await self._client.delete(key)

        return bool(await self._call("delete", run))

    async def scan(self, prefix: str) -> list[bytes]:
        async def run() -> Any:
            keys = [k async for k in self._client.scan_iter(match=_glob(prefix) + "*")]
            return await self._client.mget(keys) if keys else []

        return [v for v in await self._call("scan", run) if v is not None]

    async def ping(self) -> bool:
        try:
            await self._call("ping", self._client.ping)
        except StoreUnavailable:
            return False
        return True

    async def check_auth(self) -> None:
        """Raise StoreAuthError when Redis refuses the credentials; a Redis that cannot be
        reached is not an error here (the guard starts and fails closed or open)."""
        from redis.exceptions import RedisError

        try:
            await asyncio.wait_for(self._client.ping(), self.timeout * 2)
        except (RedisError, OSError, TimeoutError) as e:
            await self._reset()
            if _is_auth_error(e):
                raise StoreAuthError(f"redis {self.url}: {_describe(e)}") from None

    async def close(self) -> None:
        self._drop_pipe()
        for task in list(self._flushing):
            with contextlib.suppress(BaseException):
                await task
        await self._client.aclose()


def _batch_op(batch: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]]) -> str:
    """The metrics' ``op`` of a batch: its one operation, or ``pipeline`` when mixed."""
    ops = {op for op, _c, _f in batch}
    return ops.pop() if len(ops) == 1 else "pipeline"


def _fail_all(
    batch: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]], error: StoreUnavailable
) -> None:
    for _op, _command, future in batch:
        if not future.done():
            future.set_exception(StoreUnavailable(str(error)))


def _glob(text: str) -> str:
    """``text`` with Redis' glob characters escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _is_auth_error(e: BaseException) -> bool:
    from redis.exceptions import AuthenticationError

    text = str(e)
    return isinstance(e, AuthenticationError) or "NOAUTH" in text or "WRONGPASS" in text


def _describe(e: BaseException) -> str:
    """An error's type and text (Redis never puts the password in them), with Redis'
    authentication errors said plainly."""
    text = str(e)[:200]
    if _is_auth_error(e):
        return f"authentication failed ({type(e).__name__}: {text})"
    return f"{type(e).__name__}: {text}"
