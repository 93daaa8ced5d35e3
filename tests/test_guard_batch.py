"""The Redis store's pipelining (``RedisStore(batch=True)``, the default) against a real
redis-server: calls made together share one pipeline, and each still means what it means
alone (SET NX is atomic: of many claims of one jti in one pipeline exactly one wins), a
reply goes to its own caller, and a Redis that is gone fails every waiting call."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from harness import ProcessGroup
from test_guard import Redis

from xdsplane.guard.resp import Pipe
from xdsplane.guard.store import RedisStore, StoreUnavailable


@pytest.fixture
def redis(procs: ProcessGroup, tmp_path: Path) -> Redis:
    return Redis(procs, tmp_path).start()


class Counting(RedisStore):
    """Counts the pipelines sent (one write of commands per loop turn)."""

    flushes = 0

    def _send(self, pipe: Pipe, batch: list) -> None:  # type: ignore[type-arg]
        self.flushes += 1
        super()._send(pipe, batch)


async def test_a_jti_claimed_many_times_at_once_is_won_once(redis: Redis) -> None:
    store = Counting(redis.url)
    try:
        wins = await asyncio.gather(*(store.claim("jti-race", 60_000) for _ in range(50)))
        assert sum(wins) == 1
        assert store.flushes == 1  # all 50 in one pipeline
        assert await store.claim("jti-race", 60_000) is False  # and remembered
    finally:
        await store.close()


async def test_replies_go_to_their_callers(redis: Redis) -> None:
    store = Counting(redis.url)
    try:
        await store.put("rv:a", b"revoked-a", 60_000)
        await store.put("rv:c", b"revoked-c", 60_000)
        results = await asyncio.gather(
            store.get_many(["rv:a", "rv:b"]),
            store.claim("fresh-1", 60_000),
            store.get_many(["rv:c"]),
            store.claim("fresh-1", 60_000),
            store.get_many(["rv:b", "rv:c", "rv:a"]),
        )
        assert results == [
            [b"revoked-a", None],
            True,
            [b"revoked-c"],
            False,
            [None, b"revoked-c", b"revoked-a"],
        ]
        assert store.flushes == 1
        # A claim expires as its TTL says, batched or not.
        ttl = int(redis.command("PTTL", "fresh-1"))
        assert 0 < ttl <= 60_000
    finally:
        await store.close()


async def test_a_lone_call_and_a_dead_redis(redis: Redis) -> None:
    store = RedisStore(redis.url)
    try:
        assert await store.claim("alone", 60_000) is True
        redis.proc.kill()
        outcomes = await asyncio.gather(
            store.claim("x", 60_000), store.get_many(["y"]), return_exceptions=True
        )
        assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
        assert store.up() is False
        # Within the backoff, calls fail at once without queuing.
        with pytest.raises(StoreUnavailable, match="down"):
            await store.claim("z", 60_000)
    finally:
        await store.close()


async def test_a_check_is_one_round_trip_and_a_revoked_token_keeps_its_first_use(
    redis: Redis,
) -> None:
    """A Check's revocation lookup (MGET) and jti claim (SET NX) go to Redis together, one
    pipeline; a token refused as revoked has its jti released again, so once unrevoked its
    first use is still a first use (as when the claim was made only after the lookup)."""
    import time

    from test_guard import allowed, check_request, denied

    from xdsplane import jwt
    from xdsplane.guard import revoke as rv
    from xdsplane.guard.service import GuardConfig, GuardService

    store = Counting(redis.url)
    svc = GuardService(store, None, GuardConfig())
    prefix = GuardConfig().key_prefix
    try:
        alice = jwt.claims("alice", now=time.time(), ttl=60)
        assert allowed(await svc.check(check_request(alice)))
        assert store.flushes == 1  # one round trip, not two in a row
        assert denied(await svc.check(check_request(alice)))[:2] == (403, "replay")
        assert store.flushes == 2

        await rv.put(store, prefix, rv.entry("sub", "mallory", None, "stolen"), time.time())
        mallory = jwt.claims("mallory", now=time.time(), ttl=60)
        assert denied(await svc.check(check_request(mallory)))[:2] == (403, "revoked_sub")
        assert await rv.remove(store, prefix, "sub", "mallory")
        assert allowed(await svc.check(check_request(mallory)))  # still its first use
        assert denied(await svc.check(check_request(mallory)))[:2] == (403, "replay")
    finally:
        await store.close()
