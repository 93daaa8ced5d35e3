"""``xdsplane guard``: stores, limits file, the ext_authz and rate limit services, and two
guard processes sharing a real Redis that dies and comes back."""

from __future__ import annotations

import hashlib
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

from xdsplane import jwt, pki
from xdsplane.config.errors import ConfigErrors
from xdsplane.guard.limits import GuardLimits, parse_limits
from xdsplane.guard.service import MAX_HITS_ADDEND, GuardConfig, GuardService
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

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
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


class RecordingStore(MemoryStore):
    """A memory store that records the TTL each jti is claimed with."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.ttls: dict[str, int] = {}

    async def claim(self, key: str, ttl_ms: int) -> bool:
        self.ttls[key] = ttl_ms
        return await super().claim(key, ttl_ms)


async def test_a_jti_is_remembered_until_exp_plus_skew_past_the_old_300s_cap() -> None:
    """A one-hour token (its provider's max_lifetime is 1h, the guard's flags the defaults)
    replayed after five minutes, and just before it expires, is refused: the guard forgets
    it only when jwt_authn would no longer accept it (exp + 60 s skew)."""
    clock = Clock()
    store = RecordingStore(clock)  # on the same fake clock as the service
    policy = GuardLimits(token_max_lifetime=3600, token_clock_skew=60)  # from --policy
    svc = GuardService(store, policy, GuardConfig(), clock=clock)
    hour = {"jti": "hour", "sub": "a", "iss": "idp", "exp": clock.now + 3600}
    short = {"jti": "short", "sub": "a", "iss": "idp", "exp": clock.now + 10}
    assert allowed(await svc.check(check_request(hour)))
    assert allowed(await svc.check(check_request(short)))
    assert sorted(store.ttls.values()) == [70_000, 3_660_000]  # exp - now + skew
    clock.now += 301  # past the old --max-lifetime cap
    assert denied(await svc.check(check_request(hour)))[1] == "replay"
    clock.now = hour["exp"] + 59  # jwt_authn still accepts it (60 s skew)
    assert denied(await svc.check(check_request(hour)))[1] == "replay"
    clock.now = hour["exp"] + 61  # forgotten only now, when jwt_authn refuses it anyway
    assert denied(await svc.check(check_request(hour)))[1] == "expired"


async def test_a_token_without_exp_or_living_past_max_lifetime_is_refused() -> None:
    """Neither can be remembered for as long as it is accepted: refused, not forgotten early.
    A policy's providers raise the bounds to their max_lifetime and clock_skew."""
    clock = Clock()
    store = RecordingStore(clock)
    svc = GuardService(store, None, GuardConfig(max_lifetime=300, clock_skew=60), clock=clock)
    no_exp = {"jti": "no-exp", "sub": "a", "iss": "idp"}
    assert denied(await svc.check(check_request(no_exp)))[:2] == (403, "no_exp")
    day = {"jti": "day", "sub": "a", "iss": "idp", "exp": clock.now + 86_400}
    status, reason, body = denied(await svc.check(check_request(day)))
    assert (status, reason) == (403, "lifetime_too_long") and "300s" in body
    # up to max_lifetime + skew ahead (an issuer whose clock runs ahead): accepted
    edge = {"jti": "edge", "sub": "a", "iss": "idp", "exp": clock.now + 360}
    assert allowed(await svc.check(check_request(edge)))
    assert not store.ttls.keys() - {k for k in store.ttls if store.ttls[k] == 420_000}
    # the policy's providers (xdsplane guard --policy): max_lifetime 1d, clock_skew 2m
    svc.limits = GuardLimits(token_max_lifetime=86_400, token_clock_skew=120)
    assert allowed(await svc.check(check_request(day)))
    assert max(store.ttls.values()) == (86_400 + 120) * 1000
    clock.now = day["exp"] + 119
    assert denied(await svc.check(check_request(day)))[1] == "replay"


async def test_hits_addend_above_the_bound_is_refused_and_counts_nothing() -> None:
    """A caller asking the guard to count a victim's whole budget at once is refused: the
    descriptors come back OVER_LIMIT and the victim's counter does not move."""
    clock = Clock(1_700_000_020.0)
    limits = parse_limits(
        "domain: d\ndescriptors:\n  - key: user\n"
        "    rate_limit: {unit: hour, requests_per_unit: 1000}\n",
        "l.yaml",
    )
    svc = GuardService(MemoryStore(clock), limits, clock=clock)
    victim = [("user", "victim")]
    r = await svc.should_rate_limit(rl_request("d", victim, hits=1000))
    assert r.overall_code == OVER and [st.code for st in r.statuses] == [OVER]
    r = await svc.should_rate_limit(rl_request("d", victim, hits=MAX_HITS_ADDEND + 1))
    assert r.overall_code == OVER
    ok = await svc.should_rate_limit(rl_request("d", victim))
    assert ok.overall_code == OK and ok.statuses[0].limit_remaining == 999
    # up to the bound counts as asked
    r = await svc.should_rate_limit(rl_request("d", victim, hits=MAX_HITS_ADDEND))
    assert r.overall_code == OK and r.statuses[0].limit_remaining == 999 - MAX_HITS_ADDEND
    labels = {"api": "ratelimit", "result": "over_limit", "reason": "bad_hits_addend"}
    assert svc.metrics.registry.get_sample_value("xdsplane_guard_decisions_total", labels) == 2


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
    # the first store call of a Check is the revocation lookup (xdsplane revoke)
    labels = {"backend": "redis", "op": "revoked", "error": "unavailable"}
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
    def __init__(self, procs: ProcessGroup, tmp: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        argv = [redis_binary(), "--port", str(self.port), "--bind", HOST]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(tmp), "--daemonize", "no"]
        if password is not None:
            # In a config file, not in argv (where ps would show it).
            conf = tmp / f"redis-{self.port}.conf"
            conf.write_text(f"requirepass {password}\n", encoding="utf-8")
            conf.chmod(0o600)
            argv = [argv[0], str(conf), *argv[1:]]
        self.proc = procs.spawn("redis", argv)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> Redis:
        self.proc.start()
        wait_until(self._ping, 10, what="redis PING")
        return self

    def _ping(self) -> bool:
        self.proc.ensure_alive()
        return self.command("PING") in ("PONG", "NOAUTH Authentication required.")

    def command(self, *words: str) -> Any:
        """One Redis command over a raw socket (AUTH first when the server has a password):
        the reply as str, int or None."""
        import socket

        def encode(args: tuple[str, ...]) -> bytes:
            out = f"*{len(args)}\r\n"
            for a in args:
                out += f"${len(a.encode())}\r\n{a}\r\n"
            return out.encode()

        with socket.create_connection((HOST, self.port), timeout=2) as s:
            f = s.makefile("rb")
            if self.password is not None and words[0] != "PING":
                s.sendall(encode(("AUTH", self.password)))
                assert f.readline().startswith(b"+OK")
            s.sendall(encode(words))
            line = f.readline().decode().rstrip("\r\n")
            if line[0] in "+-":
                return line[1:]
            if line[0] == ":":
                return int(line[1:])
            if line == "$-1":
                return None
            return f.readline().decode().rstrip("\r\n")


def guard_tls_args(certs: Path) -> list[str]:
    """The flags of a guard serving mTLS to Envoy's guard-client certificate only."""
    return [
        *("--tls-cert", str(certs / "guard.crt"), "--tls-key", str(certs / "guard.key")),
        *("--client-ca", str(certs / "service-ca.crt"), "--client-san", pki.GUARD_CLIENT_URI),
    ]


def client_credentials(certs: Path, name: str | None = "guard-client") -> grpc.ChannelCredentials:
    """A gRPC client trusting service-ca, presenting ``name``'s certificate (None: none)."""
    ca = (certs / "service-ca.crt").read_bytes()
    if name is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=(certs / f"{name}.key").read_bytes(),
        certificate_chain=(certs / f"{name}.crt").read_bytes(),
    )


def guard_channel(port: int, certs: Path | None, name: str | None = "guard-client") -> Any:
    if certs is None:
        return grpc.insecure_channel(f"{HOST}:{port}")
    return grpc.secure_channel(
        f"{HOST}:{port}",
        client_credentials(certs, name),
        options=[("grpc.ssl_target_name_override", "guard")],
    )


def pki_dir(tmp: Path) -> Path:
    """``xdsplane certs init`` output (guard.crt, guard-client.crt, edge-1.crt, ...) plus
    ``rogue-guard-client``: the guard-client SAN from a CA the guard does not trust, and
    ``lookalike``: a service-ca client certificate whose SANs spell the guard-client
    identity otherwise."""
    certs = tmp / "certs"
    pki.init(certs)
    pki.issue(certs, "rogue-ca", None, days=30)
    pki.issue(
        certs, "rogue-guard-client", "rogue-ca", uris=[pki.GUARD_CLIENT_URI], usage=["client"]
    )
    pki.issue(
        certs,
        "lookalike",
        "service-ca",
        dns=["guard-client", "spiffe-xdsplane-guard-client"],
        uris=[
            pki.GUARD_CLIENT_URI + "/",
            "SPIFFE://xdsplane/guard-client",
            pki.GUARD_CLIENT_URI.replace("guard-client", "guard-client-2"),
        ],
        usage=["client"],
    )
    return certs


class Guard:
    """``xdsplane guard`` on free ports: with ``certs`` (a ``pki.init`` folder) it serves
    mTLS to the guard-client certificate and the test's client presents it; without, it
    runs with ``--insecure`` (plaintext)."""

    def __init__(
        self, procs: ProcessGroup, name: str, *args: str, certs: Path | None = None
    ) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.certs = certs
        security = guard_tls_args(certs) if certs is not None else ["--insecure"]
        argv = xdsplane_argv(
            "guard",
            "--address",
            f"{HOST}:{self.port}",
            "--admin-address",
            f"{HOST}:{self.admin_port}",
            "--log-format",
            "json",
            *security,
            *args,
        )
        self.proc: Proc = procs.spawn(name, argv)
        self.channel: grpc.Channel | None = None

    def launch(self) -> Guard:
        self.proc.start()
        return self

    def ready(self) -> Guard:
        wait_until(self._healthy, 20, what=f"{self.proc.name} /healthz")
        self.channel = guard_channel(self.port, self.certs)
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
    certs = pki_dir(tmp_path)
    common = ["--redis", redis.url, "--limits", str(limits)]
    closed = Guard(procs, "guard-closed", *common, certs=certs)
    opened = Guard(procs, "guard-open", *common, "--fail-open", certs=certs)
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


# -- who may call the guard (mTLS) -------------------------------------------------------------


def _call_fails(channel: Any, claims: dict[str, Any]) -> grpc.StatusCode:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    try:
        stub.Check(check_request(claims), timeout=5)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    finally:
        channel.close()
    raise AssertionError("the guard answered a caller it should have refused")


def test_guard_serves_only_the_guard_client_certificate(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """No client certificate, the right SAN from another CA, the edge node's own service-ca
    certificate and look-alike spellings of the SAN: each is refused, and none of them can
    burn a token id or a rate limit budget the real caller then needs."""
    certs = pki_dir(tmp_path)
    limits = tmp_path / "limits.yaml"
    limits.write_text(LIMITS, encoding="utf-8")
    g = Guard(procs, "guard", "--limits", str(limits), certs=certs).launch().ready()
    try:
        victim = {"jti": "victim", "sub": "alice", "iss": "idp", "exp": time.time() + 120}
        assert _call_fails(guard_channel(g.port, certs, None), victim) in (
            grpc.StatusCode.UNAVAILABLE,  # the TLS handshake fails: no certificate
            grpc.StatusCode.UNAUTHENTICATED,
        )
        assert _call_fails(guard_channel(g.port, certs, "rogue-guard-client"), victim) in (
            grpc.StatusCode.UNAVAILABLE,  # a CA the guard does not trust
            grpc.StatusCode.UNAUTHENTICATED,
        )
        for name in ("edge-1", "lookalike"):  # service-ca, but not the guard-client SAN
            code = _call_fails(guard_channel(g.port, certs, name), victim)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (name, code)
        wrong = guard_channel(g.port, certs, "edge-1")
        rls = rls_pb2_grpc.RateLimitServiceStub(wrong)
        tenant = [("tenant", "victim")]
        with pytest.raises(grpc.RpcError) as refused:
            rls.ShouldRateLimit(rl_request("shared", tenant, hits=3), timeout=5)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        wrong.close()
        # the real caller: its token and budget are untouched
        assert allowed(g.check(victim))
        assert denied(g.check(victim))[1] == "replay"
        r = g.limit("shared", tenant)
        assert r.overall_code == OK and r.statuses[0].limit_remaining == 2
        refusals = [
            json.loads(line)
            for line in g.proc.tail(400).splitlines()
            if "guard caller refused" in line
        ]
        assert [r["reason"] for r in refusals] == 3 * ["client_san"], refusals
        assert "URI:spiffe://xdsplane/node/edge-1" in refusals[0]["sans"]
        metric = 'xdsplane_guard_callers_refused_total{reason="client_san"} 3.0'
        assert metric in g.metrics()
        # the two refused handshakes are logged too (by gRPC core, with the TLS reason)
        log = output(g.proc)
        assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in log, log
        assert "CERTIFICATE_VERIFY_FAILED" in log, log
    finally:
        g.close()


def output(proc: Proc, lines: int = 400) -> str:
    """What the process wrote (the harness's own ``--- start: ARGV`` lines left out)."""
    return "\n".join(x for x in proc.tail(lines).splitlines() if not x.startswith("--- "))


def _start_fails(procs: ProcessGroup, name: str, *args: str) -> str:
    """Run ``xdsplane guard ARGS`` (no implicit --insecure): it must exit 1; its output."""
    argv = xdsplane_argv("guard", "--log-format", "json", *args)
    proc = procs.spawn(name, argv).start()
    assert proc.wait(30) == 1, proc.tail()
    return output(proc)


def test_guard_refuses_to_start_plaintext_or_with_a_public_admin_port(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    certs = pki_dir(tmp_path)
    tls = guard_tls_args(certs)
    grpc_port, admin_port = free_port(), free_port()
    where = ["--address", f"{HOST}:{grpc_port}", "--admin-address", f"{HOST}:{admin_port}"]
    out = _start_fails(procs, "plain", *where)
    assert "plaintext" in out and "--insecure" in out and "not starting" in out
    out = _start_fails(procs, "partial", *where, *tls[:4])  # no --client-ca / --client-san
    assert "--client-ca" in out
    out = _start_fails(procs, "no-san", *where, *tls[:6])
    assert "--client-san is required" in out
    public = ["--address", f"{HOST}:{grpc_port}", "--admin-address", f"0.0.0.0:{admin_port}"]
    out = _start_fails(procs, "public-admin", *public, *tls)
    assert "keep it on loopback" in out
    # --insecure: it serves plaintext, and says so in /healthz
    g = Guard(procs, "insecure").launch().ready()
    try:
        health = g.health()
        assert health["grpc"] == "plaintext" and health["insecure"] is True
        assert allowed(g.check({"jti": "x", "iss": "i", "exp": time.time() + 60}))
    finally:
        g.close()


def test_guard_admin_refuses_a_rebound_host_and_sends_security_headers(
    procs: ProcessGroup,
) -> None:
    """The guard's admin HTTP gets serve's hardening: a page on evil.example that a DNS
    rebinding points at 127.0.0.1 gets 421, and every answer carries the security headers."""
    g = Guard(procs, "admin").launch().ready()
    try:
        for path in ("/healthz", "/metrics", "/nothing"):
            refused = http_get(g.admin_port, path, host=f"evil.example:{g.admin_port}")
            assert refused.status == 421, (path, refused.status)
            assert "rate" not in refused.text and "backend" not in refused.text
        ok = http_get(g.admin_port, "/healthz", host=f"127.0.0.1:{g.admin_port}")
        assert ok.status == 200
        for r in (ok, refused):
            assert r.headers.get("x-frame-options") == "DENY"
            assert r.headers.get("x-content-type-options") == "nosniff"
            assert "default-src 'none'" in r.headers.get("content-security-policy", "")
    finally:
        g.close()


# -- Redis with a password ----------------------------------------------------------------------


GUARD_POLICY = """\
guard: {address: "127.0.0.1:1"}
jwt_providers:
  idp: {issuer: idp, audiences: [api], jwks_file: jwks.json, max_lifetime: 1h}
listeners:
  - name: http
    address: 127.0.0.1:1
    hosts:
      - name: api
        domains: ["*"]
        routes:
          - {name: once, prefix: /, jwt: idp, replay_protection: true, upstream: api}
upstreams:
  api: {endpoints: ["127.0.0.1:2"]}
"""


def test_guard_authenticates_to_redis_with_a_password_file(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """redis-server --requirepass: the guard authenticates from --redis-password-file; a
    wrong or missing password stops it with a clear error that never shows the password.
    A jti is kept in Redis until exp + skew (PTTL), well past the old 300 s cap."""
    password = "pw-" + os.urandom(12).hex()
    redis = Redis(procs, tmp_path, password=password).start()
    certs = pki_dir(tmp_path)
    secret = tmp_path / "redis-password"
    secret.write_text(password + "\n", encoding="utf-8")
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-" + password + "\n", encoding="utf-8")
    out = _start_fails(
        procs, "wrong", "--insecure", "--redis", redis.url, "--redis-password-file", str(wrong)
    )
    assert "authentication failed" in out and str(wrong) in out, out
    assert password not in out
    out = _start_fails(procs, "none", "--insecure", "--redis", redis.url)
    assert "authentication failed" in out and "no password given" in out, out
    in_url = redis.url.replace("redis://", f"redis://:{password}@")
    out = _start_fails(
        procs, "both", "--insecure", "--redis", in_url, "--redis-password-file", str(secret)
    )
    assert password not in out and ":***@" in out, out

    folder = tmp_path / "policy"  # its provider's max_lifetime (1h) is what the guard allows
    folder.mkdir()
    (folder / "jwks.json").write_bytes(jwt.jwks(jwt.new_key()))
    (folder / "edge.yaml").write_text(GUARD_POLICY, encoding="utf-8")
    g = (
        Guard(
            procs,
            "guard",
            *("--redis", redis.url, "--redis-password-file", str(secret)),
            *("--policy", str(folder)),
            certs=certs,
        )
        .launch()
        .ready()
    )
    try:
        now = time.time()
        token = {"jti": "hour-long", "sub": "alice", "iss": "idp", "exp": now + 3600}
        assert allowed(g.check(token))
        assert denied(g.check(token))[1] == "replay"
        digest = hashlib.sha256(b"idp\0hour-long").hexdigest()
        pttl = redis.command("PTTL", f"xdsplane:guard:jti:{digest}")
        assert isinstance(pttl, int)
        left = (token["exp"] + 60 - time.time()) * 1000  # exp + jwt_authn's 60 s skew
        assert left - 1000 <= pttl <= left + 1000, (pttl, left)
        assert pttl > 3_000_000  # not the old 300 s cap (--max-lifetime's default)
        assert g.health()["backend_up"] is True
        assert password not in output(g.proc)
    finally:
        g.close()
    # a password in the URL works too, and is never shown
    g2 = Guard(procs, "guard-url", "--redis", in_url, "--max-lifetime", "3600").launch().ready()
    try:
        assert allowed(g2.check({**token, "jti": "other"}))
        log = output(g2.proc)
        assert password not in log and ":***@" in log, log
    finally:
        g2.close()


def _served_serial(port: int, certs: Path) -> int:
    """The serial of the certificate a new TLS connection to the guard gets."""
    import socket
    import ssl

    from cryptography import x509

    ctx = ssl.create_default_context(cafile=str(certs / "service-ca.crt"))
    ctx.load_cert_chain(str(certs / "guard-client.crt"), str(certs / "guard-client.key"))
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="guard") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_guard_certificate_rotation_reaches_new_connections(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """``xdsplane certs rotate guard``: new connections get the new certificate without a
    restart; an open channel keeps working."""
    certs = pki_dir(tmp_path)
    g = Guard(procs, "guard", certs=certs).launch().ready()
    try:
        before = _served_serial(g.port, certs)
        assert before == pki.load_cert(certs / "guard.crt").serial_number
        pki.rotate(certs, "guard")
        after = pki.load_cert(certs / "guard.crt").serial_number
        wait_until(lambda: _served_serial(g.port, certs) == after, 15, what="new certificate")
        assert allowed(g.check({"jti": "r", "iss": "i", "exp": time.time() + 60}))
        assert g.proc.starts == 1
    finally:
        g.close()


def test_claims_are_read_as_message_to_dict_reads_them() -> None:
    """The guard reads jwt_authn's payload with its own Value walk (service.json_value, for
    speed): the same dict as json_format.MessageToDict, numbers as floats, nested objects
    and lists, null; an infinite number refused the same way."""
    from google.protobuf import json_format, struct_pb2

    from xdsplane.guard.service import json_value

    payload = {
        "iss": "idp",
        "jti": "j-1",
        "exp": 1796458703,
        "nbf": 1.5,
        "admin": False,
        "aud": ["a", "b", 3, None, {"x": [True]}],
        "cnf": {"x5t#S256": "abc", "deep": {"n": -2}},
        "none": None,
        "empty": {},
        "list": [],
    }
    s = struct_pb2.Struct()
    s.update(payload)
    value = struct_pb2.Value(struct_value=s)
    assert json_value(value) == json_format.MessageToDict(value) == payload
    assert isinstance(json_value(value)["exp"], float)
    assert json_value(struct_pb2.Value()) is json_format.MessageToDict(struct_pb2.Value())
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError):
            json_format.MessageToDict(struct_pb2.Value(number_value=bad))
        with pytest.raises(ValueError):
            json_value(struct_pb2.Value(number_value=bad))
