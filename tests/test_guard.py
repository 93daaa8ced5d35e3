"""``xdsplane guard``: stores, limits file, the ext_authz and rate limit services, and two
guard processes sharing a real Redis that dies and comes back."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import struct_pb2
from harness import HOST, Proc, ProcessGroup, free_port, http_get, wait_until, xdsplane_argv

from xdsplane.config.errors import ConfigErrors
from xdsplane.guard.limits import parse_limits
from xdsplane.guard.service import GuardConfig, GuardService
from xdsplane.guard.store import MemoryStore, StoreUnavailable

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT

LIMITS = """\
domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: path
    value: /billing/invoices
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: path
    rate_limit: {unit: hour, requests_per_unit: 100}
  - key: client
    value: partner
    descriptors:
      - key: path
        rate_limit: {unit: hour, requests_per_unit: 3}
---
domain: shared
descriptors:
  - key: tenant
    rate_limit: {unit: hour, requests_per_unit: 3}
"""


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def check_request(claims: dict[str, Any] | None, key: str = "jwt_payload") -> Any:
    req = external_auth_pb2.CheckRequest()
    if claims is not None:
        s = struct_pb2.Struct()
        s.update({key: claims})
        req.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(s)
    return req


def rl_request(domain: str, *descriptors: list[tuple[str, str]], hits: int = 0) -> Any:
    req = rls_pb2.RateLimitRequest(domain=domain, hits_addend=hits)
    for entries in descriptors:
        d = req.descriptors.add()
        for k, v in entries:
            d.entries.add(key=k, value=v)
    return req


def denied(resp: Any) -> tuple[int, str, str]:
    """(HTTP status, x-guard-reason, body) of a denied CheckResponse."""
    assert resp.WhichOneof("http_response") == "denied_response", resp
    headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
    return resp.denied_response.status.code, headers["x-guard-reason"], resp.denied_response.body


def allowed(resp: Any) -> bool:
    return resp.status.code == 0 and resp.WhichOneof("http_response") == "ok_response"


class DownStore:
    name = "redis"

    async def claim(self, key: str, ttl_ms: int) -> bool:
        raise StoreUnavailable("down")

    async def hit(self, key: str, addend: int, ttl_ms: int) -> int:
        raise StoreUnavailable("down")

    def up(self) -> bool:
        return False

    async def close(self) -> None:
        pass


# -- stores -----------------------------------------------------------------------------------


async def test_memory_store_claim_once_until_expiry() -> None:
    clock = Clock(100.0)
    store = MemoryStore(clock)
    assert await store.claim("a", 1000)
    assert not await store.claim("a", 1000)
    assert await store.claim("b", 1000)
    clock.now += 0.999
    assert not await store.claim("a", 1000)
    clock.now += 0.002
    assert await store.claim("a", 1000)  # expired: a new first use
    clock.now += 10
    await store.claim("c", 10)
    assert len(store) == 1  # expired keys were swept


async def test_memory_store_counter_window() -> None:
    clock = Clock(0.0)
    store = MemoryStore(clock)
    assert [await store.hit("k", 1, 1000) for _ in range(3)] == [1, 2, 3]
    assert await store.hit("k", 5, 1000) == 8
    clock.now = 1.0
    assert await store.hit("k", 1, 1000) == 1


# -- limits file ------------------------------------------------------------------------------


def test_limits_match() -> None:
    limits = parse_limits(LIMITS, "limits.yaml")
    assert set(limits.domains) == {"edge", "shared"}
    exact = limits.match("edge", [("path", "/billing/invoices")])
    assert exact is not None and (exact.requests_per_unit, exact.unit) == (1, "second")
    any_path = limits.match("edge", [("path", "/other")])
    assert any_path is not None and any_path.unit == "hour" and any_path.requests_per_unit == 100
    nested = limits.match("edge", [("client", "partner"), ("path", "/x")])
    assert nested is not None and nested.requests_per_unit == 3
    assert nested.source == "limits.yaml:14"
    assert limits.match("edge", [("client", "partner")]) is None  # no rate_limit at that level
    assert limits.match("edge", [("client", "other"), ("path", "/x")]) is None
    assert limits.match("edge", [("unknown", "x")]) is None
    assert limits.match("nope", [("path", "/x")]) is None


def test_limits_errors_are_located() -> None:
    text = """\
domain: edge
descriptors:
  - key: path
    rate_limit: {unit: fortnight, requests_per_unit: -1}
  - key: path
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: user
    burst: 3
  - value: x
    rate_limit: {unit: second, requests_per_unit: 1}
"""
    with pytest.raises(ConfigErrors) as e:
        parse_limits(text, "l.yaml")
    lines = [str(x) for x in e.value.errors]
    assert any(x.startswith("l.yaml:4:") and "`unit` must be one of" in x for x in lines), lines
    assert any(x.startswith("l.yaml:4:") and "requests_per_unit" in x for x in lines), lines
    assert any(x.startswith("l.yaml:5:") and "defined twice" in x for x in lines), lines
    assert any(x.startswith("l.yaml:8:5: unknown key 'burst'") for x in lines), lines
    assert any(x.startswith("l.yaml:9:") and "`key` must be" in x for x in lines), lines
    with pytest.raises(ConfigErrors) as e:
        parse_limits("domain: [x\n", "bad.yaml")
    assert str(e.value.errors[0]).startswith("bad.yaml:"), e.value.errors
    with pytest.raises(ConfigErrors) as e:
        parse_limits(LIMITS + "---\n" + LIMITS.split("---\n")[1], "dup.yaml")
    assert "domain 'shared' is defined twice" in str(e.value)


# -- ext_authz logic --------------------------------------------------------------------------


async def test_replay_refused_and_token_without_jti_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    svc = GuardService(MemoryStore(clock), None, GuardConfig(), clock=clock)
    claims = {"jti": "t-1", "sub": "alice", "iss": "https://idp", "exp": clock.now + 60}
    claims["secret_claim"] = "do-not-log-me"
    assert allowed(await svc.check(check_request(claims)))
    status, reason, body = denied(await svc.check(check_request(claims)))
    assert (status, reason) == (403, "replay") and "already used" in body
    # the same jti from another issuer is another token
    assert allowed(await svc.check(check_request({**claims, "iss": "https://other"})))
    no_jti = {k: v for k, v in claims.items() if k != "jti"}
    status, reason, body = denied(await svc.check(check_request(no_jti)))
    assert (status, reason) == (403, "no_jti") and "no jti" in body
    status, reason, _ = denied(await svc.check(check_request(None)))
    assert (status, reason) == (403, "no_jwt_payload")
    status, reason, _ = denied(await svc.check(check_request(claims, key="other")))
    assert reason == "no_jwt_payload"
    expired = {**claims, "jti": "t-2", "exp": clock.now - 61}
    assert denied(await svc.check(check_request(expired)))[1] == "expired"
    # within jwt_authn's 60 s clock skew: accepted once, remembered
    skewed = {**claims, "jti": "t-3", "exp": clock.now - 30}
    assert allowed(await svc.check(check_request(skewed)))
    assert denied(await svc.check(check_request(skewed)))[1] == "replay"
    logged = capsys.readouterr()
    text = logged.out + logged.err
    assert "do-not-log-me" not in text
    labels = {"api": "authz", "result": "deny", "reason": "replay"}
    assert svc.metrics.registry.get_sample_value("xdsplane_guard_decisions_total", labels) == 2


async def test_jti_ttl_is_exp_capped_by_max_lifetime() -> None:
    clock = Clock()
    # the store runs on the same fake clock as the service here
    svc = GuardService(MemoryStore(clock), None, GuardConfig(max_lifetime=300), clock=clock)
    long_lived = {"jti": "long", "sub": "a", "exp": clock.now + 3600}
    short = {"jti": "short", "sub": "a", "exp": clock.now + 10}
    assert allowed(await svc.check(check_request(long_lived)))
    assert allowed(await svc.check(check_request(short)))
    clock.now += 69  # exp + 60 s skew not yet passed
    assert denied(await svc.check(check_request(short)))[1] == "replay"
    clock.now += 2  # short's window (exp + skew) is over: forgotten; jwt_authn rejects it now
    assert denied(await svc.check(check_request(short)))[1] == "expired"
    assert denied(await svc.check(check_request(long_lived)))[1] == "replay"
    clock.now += 300  # the cap: remembered 300 s, not an hour
    assert allowed(await svc.check(check_request(long_lived)))


async def test_store_down_fails_closed_or_open() -> None:
    claims = {"jti": "x", "sub": "bob", "exp": time.time() + 60}
    closed = GuardService(DownStore(), parse_limits(LIMITS, "l.yaml"))
    status, reason, _ = denied(await closed.check(check_request(claims)))
    assert (status, reason) == (503, "store_unavailable")
    r = await closed.should_rate_limit(rl_request("edge", [("remote_address", "1.2.3.4")]))
    assert r.overall_code == OVER
    opened = GuardService(DownStore(), parse_limits(LIMITS, "l.yaml"), GuardConfig(fail_open=True))
    assert allowed(await opened.check(check_request(claims)))
    r = await opened.should_rate_limit(rl_request("edge", [("remote_address", "1.2.3.4")]))
    assert r.overall_code == OK
    sample = closed.metrics.registry.get_sample_value
    labels = {"backend": "redis", "op": "claim", "error": "unavailable"}
    assert sample("xdsplane_guard_backend_errors_total", labels) == 1
    assert sample("xdsplane_guard_backend_up", {"backend": "redis"}) == 0


# -- rate limit logic -------------------------------------------------------------------------


async def test_rate_limit_fixed_window() -> None:
    clock = Clock(1_700_000_020.0)  # 20 s before a minute boundary
    svc = GuardService(MemoryStore(clock), parse_limits(LIMITS, "l.yaml"), clock=clock)
    ip = [("remote_address", "10.0.0.1")]
    other = [("remote_address", "10.0.0.2")]
    codes = []
    for _ in range(3):
        r = await svc.should_rate_limit(rl_request("edge", ip))
        codes.append(r.overall_code)
    assert codes == [OK, OK, OVER]
    st = r.statuses[0]
    assert st.current_limit.requests_per_unit == 2
    assert st.current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.MINUTE
    assert st.limit_remaining == 0
    assert st.duration_until_reset.seconds == 20
    # per value: another address has its own counter; both descriptors are answered
    r = await svc.should_rate_limit(rl_request("edge", other, ip))
    assert r.overall_code == OVER and [s.code for s in r.statuses] == [OK, OVER]
    assert r.statuses[0].limit_remaining == 1
    # unknown descriptors and domains are not limited and carry no limit
    r = await svc.should_rate_limit(rl_request("edge", [("nothing", "x")]))
    assert r.overall_code == OK and not r.statuses[0].HasField("current_limit")
    r = await svc.should_rate_limit(rl_request("elsewhere", ip))
    assert r.overall_code == OK
    clock.now += 20  # the next window
    r = await svc.should_rate_limit(rl_request("edge", ip))
    assert r.overall_code == OK and r.statuses[0].limit_remaining == 1
    # hits_addend counts several requests at once
    r = await svc.should_rate_limit(
        rl_request("edge", [("client", "partner"), ("path", "/a")], hits=4)
    )
    assert r.overall_code == OVER


# -- processes sharing a real Redis -----------------------------------------------------------


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(
                "redis-server is missing: .ci/run installs it (apt-get install redis-server)"
            )
        pytest.skip("no redis-server (apt-get install redis-server)")
    return binary


class Redis:
    def __init__(self, procs: ProcessGroup, tmp: Path) -> None:
        self.port = free_port()
        argv = [redis_binary(), "--port", str(self.port), "--bind", HOST]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(tmp), "--daemonize", "no"]
        self.proc = procs.spawn("redis", argv)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> Redis:
        self.proc.start()
        wait_until(self._ping, 10, what="redis PING")
        return self

    def _ping(self) -> bool:
        import socket

        self.proc.ensure_alive()
        with socket.create_connection((HOST, self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")


class Guard:
    def __init__(self, procs: ProcessGroup, name: str, *args: str) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        argv = xdsplane_argv(
            "guard",
            "--address",
            f"{HOST}:{self.port}",
            "--admin-address",
            f"{HOST}:{self.admin_port}",
            "--log-format",
            "json",
            *args,
        )
        self.proc: Proc = procs.spawn(name, argv)
        self.channel: grpc.Channel | None = None

    def launch(self) -> Guard:
        self.proc.start()
        return self

    def ready(self) -> Guard:
        wait_until(self._healthy, 20, what=f"{self.proc.name} /healthz")
        self.channel = grpc.insecure_channel(f"{HOST}:{self.port}")
        self.authz = external_auth_pb2_grpc.AuthorizationStub(self.channel)
        self.rls = rls_pb2_grpc.RateLimitServiceStub(self.channel)
        return self

    def _healthy(self) -> bool:
        self.proc.ensure_alive()
        return http_get(self.admin_port, "/healthz").status == 200

    def health(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(http_get(self.admin_port, "/healthz").body)
        return data

    def metrics(self) -> str:
        return http_get(self.admin_port, "/metrics").text

    def check(self, claims: dict[str, Any]) -> Any:
        return self.authz.Check(check_request(claims), timeout=5)

    def limit(self, domain: str, entries: list[tuple[str, str]]) -> Any:
        return self.rls.ShouldRateLimit(rl_request(domain, entries), timeout=5)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()


@pytest.fixture
def guards(procs: ProcessGroup, tmp_path: Path) -> Iterator[tuple[Redis, Guard, Guard]]:
    redis = Redis(procs, tmp_path).start()
    limits = tmp_path / "limits.yaml"
    limits.write_text(LIMITS, encoding="utf-8")
    common = ["--redis", redis.url, "--limits", str(limits)]
    closed = Guard(procs, "guard-closed", *common)
    opened = Guard(procs, "guard-open", *common, "--fail-open")
    closed.launch()
    opened.launch()  # both import at once
    closed.ready()
    opened.ready()
    yield redis, closed, opened
    closed.close()
    opened.close()


def test_two_guards_share_redis_and_survive_its_restart(
    guards: tuple[Redis, Guard, Guard],
) -> None:
    redis, a, b = guards
    run = f"{os.getpid()}-{time.monotonic_ns()}"
    exp = time.time() + 120

    # a jti accepted at one guard is refused at the other
    token = {"jti": f"j1-{run}", "sub": "alice", "iss": "idp", "exp": exp}
    assert allowed(a.check(token))
    assert denied(b.check(token))[:2] == (403, "replay")
    assert denied(a.check(token))[:2] == (403, "replay")
    status, reason, body = denied(a.check({"sub": "alice", "exp": exp}))
    assert (status, reason) == (403, "no_jti") and body

    # one counter for both: 3 per hour for this tenant (away from an hour boundary)
    if time.time() % 3600 > 3590:
        time.sleep(3600 - time.time() % 3600 + 0.1)
    tenant = [("tenant", run)]
    codes = [g.limit("shared", tenant).overall_code for g in (a, b, a, b)]
    assert codes == [OK, OK, OK, OVER]
    last = b.limit("shared", tenant)
    assert last.statuses[0].current_limit.requests_per_unit == 3
    assert last.statuses[0].limit_remaining == 0

    # Redis dies: the fail-closed guard denies, the fail-open guard allows
    redis.proc.kill()
    fresh = {"jti": f"j2-{run}", "sub": "bob", "iss": "idp", "exp": exp}
    status, reason, _ = denied(a.check(fresh))
    assert (status, reason) == (503, "store_unavailable")
    assert allowed(b.check(fresh))
    assert a.limit("shared", [("tenant", f"other-{run}")]).overall_code == OVER
    assert b.limit("shared", [("tenant", f"other-{run}")]).overall_code == OK
    assert a.health()["backend_up"] is False
    assert 'xdsplane_guard_backend_errors_total{backend="redis"' in a.metrics()
    assert 'reason="store_unavailable",result="deny"' in a.metrics()
    assert 'reason="fail_open",result="allow"' in b.metrics()

    # Redis comes back (empty, no persistence): both guards recover without a restart
    redis.start()
    after = {"jti": f"j3-{run}", "sub": "carol", "iss": "idp", "exp": exp}
    wait_until(lambda: allowed(a.check(after)), 10, what="fail-closed guard recovers")

    def reconnected(g: Guard) -> bool:  # a fail-open guard allows either way: ask /healthz
        g.limit("shared", [("tenant", f"probe-{run}")])
        return bool(g.health()["backend_up"])

    wait_until(lambda: reconnected(b), 10, what="fail-open guard reconnects")
    assert denied(b.check(after))[1] == "replay"  # shared again, through Redis
    tenant2 = [("tenant", f"again-{run}")]
    codes = [g.limit("shared", tenant2).overall_code for g in (b, a, b, a)]
    assert codes == [OK, OK, OK, OVER]
    assert a.health()["backend_up"] is True
    assert a.proc.alive() and b.proc.alive()
    assert a.proc.starts == 1 and b.proc.starts == 1


def test_guard_refuses_a_bad_limits_file(procs: ProcessGroup, tmp_path: Path) -> None:
    bad = tmp_path / "limits.yaml"
    bad.write_text("domain: edge\ndescriptors:\n  - key: ip\n    rate_limit: {unit: day}\n")
    g = Guard(procs, "guard-bad", "--limits", str(bad))
    g.proc.start()
    assert g.proc.wait(30) == 1
    log = g.proc.tail()
    assert f"{bad}:4:" in log and "`unit` must be one of" in log
