"""The guard's Redis keys expire when they should, in a real redis-server (not the memory
store): a jti is kept until jwt_authn would no longer accept its token (exp + clock skew),
and a rate-limit counter lives until its window ends (plus one second), whatever the hits.

An attacker gains from a key that expires early (a token replayed while still accepted, a
fresh budget inside the window) and from one that never expires (Redis filled with keys).
Each test reads PTTL from Redis itself. The bounds allow 2 s for the time between the
guard's clock reading and the PTTL (a busy machine); the windows are seconds to an hour.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from harness import ProcessGroup, wait_until
from test_guard import LIMITS, OK, OVER, Redis, allowed, check_request, denied, rl_request

from xdsplane.guard.limits import counter_key, parse_limits
from xdsplane.guard.service import GuardConfig, GuardService
from xdsplane.guard.store import RedisStore

SLACK_MS = 2000  # the guard's clock reading -> PTTL, on a busy machine
PREFIX = "xdsplane:guard:"


@pytest.fixture
def redis(procs: ProcessGroup, tmp_path: Path) -> Redis:
    return Redis(procs, tmp_path).start()


@pytest.fixture
async def store(redis: Redis) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis.url)
    yield s
    await s.close()


def jti_key(issuer: str, jti: str) -> str:
    return f"{PREFIX}jti:" + hashlib.sha256(f"{issuer}\0{jti}".encode()).hexdigest()


def pttl(redis: Redis, key: str) -> int:
    """Milliseconds left (-2: no such key, -1: no expiry)."""
    value = redis.command("PTTL", key)
    assert isinstance(value, int), value
    return value


def near(value: int, expected_ms: float) -> bool:
    return expected_ms - SLACK_MS <= value <= expected_ms + SLACK_MS


async def test_a_jti_lives_in_redis_until_exp_plus_skew(redis: Redis, store: RedisStore) -> None:
    svc = GuardService(store, None, GuardConfig(max_lifetime=3600, clock_skew=60))
    now = time.time()
    tokens: dict[str, dict[str, Any]] = {
        "ten-seconds": {"jti": "ten-seconds", "iss": "idp", "sub": "a", "exp": now + 10},
        "half-hour": {"jti": "half-hour", "iss": "idp", "sub": "a", "exp": now + 1800},
        # expired 57 s ago: jwt_authn (60 s skew) still accepts it, for about 3 s
        "in-the-skew": {"jti": "in-the-skew", "iss": "idp", "sub": "a", "exp": now - 57},
    }
    for claims in tokens.values():
        assert allowed(await svc.check(check_request(claims)))
    for name, claims in tokens.items():
        left = pttl(redis, jti_key("idp", name))
        expected = (claims["exp"] + 60 - time.time()) * 1000
        assert near(left, expected), (name, left, expected)
    # The replay is refused, and it does not push the expiry out (SET NX: no rewrite).
    before = pttl(redis, jti_key("idp", "half-hour"))
    assert denied(await svc.check(check_request(tokens["half-hour"])))[1] == "replay"
    assert pttl(redis, jti_key("idp", "half-hour")) <= before
    # Redis itself forgets the one in the skew when jwt_authn stops accepting it ...
    wait_until(
        lambda: pttl(redis, jti_key("idp", "in-the-skew")) == -2,
        10,
        what="the jti key expires in Redis",
    )
    # ... and the guard refuses that token as expired, not as a first use.
    assert denied(await svc.check(check_request(tokens["in-the-skew"])))[1] == "expired"
    # Another issuer's token with the same jti is another key, with its own lifetime.
    other = {**tokens["ten-seconds"], "iss": "other-idp"}
    assert allowed(await svc.check(check_request(other)))
    expected = (other["exp"] + 60 - time.time()) * 1000
    assert near(pttl(redis, jti_key("other-idp", "ten-seconds")), expected)


def away_from_the_minute() -> None:
    """The counters below live in minute (and second) windows: do not straddle a minute's end."""
    wait_until(lambda: time.time() % 60 < 50, 15, what="a minute with 10 s left")


async def test_a_counter_lives_in_redis_until_its_window_ends(
    redis: Redis, store: RedisStore
) -> None:
    limits = parse_limits(LIMITS, "l.yaml")
    svc = GuardService(store, limits)
    away_from_the_minute()
    ip = [("remote_address", "10.0.0.1")]  # 2 per minute
    hour = [("path", "/anything")]  # 100 per hour
    second = [("path", "/billing/invoices")]  # 1 per second
    checks = [(ip, 60), (hour, 3600), (second, 1)]
    now = time.time()
    r = await svc.should_rate_limit(rl_request("edge", ip, hour, second))
    assert r.overall_code == OK, r
    keys = {}
    for entries, seconds in checks:
        limit = limits.match("edge", entries)
        assert limit is not None and limit.seconds == seconds
        key = PREFIX + counter_key("edge", entries, limit, int(now // seconds))
        keys[seconds] = key
        assert redis.command("GET", key) == "1", key
        # the window's end, plus the second the guard adds (a late hit still finds it)
        expected = (math.floor(now / seconds + 1) * seconds - now) * 1000 + 1000
        left = pttl(redis, key)
        assert near(left, expected), (seconds, left, expected)
        assert left <= seconds * 1000 + 1000, (seconds, left)  # never past the window
    # Every hit sets the expiry again, anchored at the window's end: it never moves out.
    first = pttl(redis, keys[60])
    r = await svc.should_rate_limit(rl_request("edge", ip))
    assert r.overall_code == OK and redis.command("GET", keys[60]) == "2"
    assert pttl(redis, keys[60]) <= first + 5  # +5: the guard rounds up to the millisecond
    r = await svc.should_rate_limit(rl_request("edge", ip))
    assert r.overall_code == OVER
    # The one-second window's counter is gone from Redis within about two seconds.
    wait_until(lambda: pttl(redis, keys[1]) == -2, 10, what="the 1 s counter expires in Redis")
    assert pttl(redis, keys[3600]) > 0 and pttl(redis, keys[60]) > 0
