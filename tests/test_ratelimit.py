"""Rate limits live: ``rate_limit`` (local, per identity), upstream ``limits`` (circuit
breakers), and ``global_rate_limit`` shared by two Envoys through two ``xdsplane guard``
processes on one real Redis, which is killed and started again mid-run.

Two module-scoped gateways: ``local`` (xdsplane serve + one Envoy + upstreams) and
``shared`` (xdsplane serve with two node groups, two Envoys, two guards reading the same
policy folder, one redis-server). The ``shared`` tests run in order: the last one kills
Redis.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.extensions.filters.http.ratelimit.v3.rate_limit_pb2 import RateLimit
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from harness import (
    HOST,
    TEST_SECONDS,
    EchoUpstream,
    Envoy,
    ProcessGroup,
    Response,
    ThreadedHttpServer,
    XdsServer,
    bearer,
    exchange,
    free_port,
    send_body,
    wait_until,
    write_atomic,
)
from test_guard import Guard, Redis, pki_dir
from tls_helpers import attach_to_report, client_context, https_get, make_pki, process_group

from xdsplane import jwt, pki
from xdsplane.config.errors import ConfigErrors
from xdsplane.guard.policy import limits_from_policy
from xdsplane.pipeline import FolderLoader
from xdsplane.types import ResourceType

OTHER_HOST = "127.0.0.2"  # a second client address on loopback (Linux routes 127/8 to lo)


def get(
    port: int, path: str, token: str | None = None, source: str = HOST, timeout: float = 5
) -> Response:
    """One GET from ``source`` (a loopback address), with a bearer token when given."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout, source_address=(source, 0))
    return exchange(conn, path, bearer(token))


def token(key: ec.EllipticCurvePrivateKey, sub: str) -> str:
    return jwt.sign(key, jwt.claims(sub))


class SlowUpstream(ThreadedHttpServer):
    """Holds every request until ``release()`` (at most 20 s), then answers 200."""

    def __init__(self) -> None:
        self.release_event = threading.Event()
        self.arrived = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.arrived += 1
                outer.release_event.wait(20)
                send_body(self, b"slow\n", None)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler)

    def release(self) -> None:
        self.release_event.set()

    def close(self) -> None:
        self.release()
        super().close()


# -- policy: the guard's view -----------------------------------------------------------------


def test_guard_limits_come_from_the_policy(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_bytes(jwt.jwks(jwt.new_key()))
    (tmp_path / "a.yaml").write_text(
        SHARED_POLICY.format(node="edge-a", guard="127.0.0.1:1", port=1001, upstream=9)
    )
    (tmp_path / "b.yaml").write_text(
        SHARED_POLICY.format(node="edge-b", guard="127.0.0.1:2", port=1002, upstream=9)
    )
    limits = limits_from_policy(tmp_path)
    shared = limits.match("xdsplane", [("route", "http/api/shared"), ("jwt_sub", "alice")])
    assert shared is not None
    assert (shared.requests_per_unit, shared.unit) == (4, "hour")
    assert shared.source == f"{tmp_path / 'a.yaml'}:19"
    assert limits.match("xdsplane", [("route", "http/api/shared")]) is None
    assert limits.match("xdsplane", [("route", "http/api/once"), ("jwt_sub", "a")]) is None
    # the same route id with another limit in another node group: refused, located
    (tmp_path / "b.yaml").write_text(
        SHARED_POLICY.format(node="edge-b", guard="127.0.0.1:2", port=1002, upstream=9).replace(
            "requests: 4, per: 1h", "requests: 5, per: 1h"
        )
    )
    with pytest.raises(ConfigErrors) as e:
        limits_from_policy(tmp_path)
    assert [str(x) for x in e.value.errors] == [
        f"{tmp_path / 'b.yaml'}:19:13: route http/api/shared has another global_rate_limit at "
        f"{tmp_path / 'a.yaml'}:19 (one route id, one limit)"
    ]


def test_a_guard_edit_rebuilds_a_listener_with_only_global_limits(tmp_path: Path) -> None:
    """The translation cache keys such a listener on the guard too (fail_open is in it)."""
    (tmp_path / "jwks.json").write_bytes(jwt.jwks(jwt.new_key()))
    pki_dir(tmp_path)
    text = SHARED_POLICY.format(node="edge-a", guard="127.0.0.1:1", port=1001, upstream=9)
    text = text.replace("replay_protection: true, ", "")  # global limits only
    policy = tmp_path / "policy" / "a.yaml"
    write_atomic(policy, text)
    loader = FolderLoader(policy.parent)

    def failure_mode_deny() -> bool:
        group = loader.load().group("edge-a")
        assert group is not None
        listener = group.resources[ResourceType.LISTENER]["http"].message
        hcm = hcm_pb2.HttpConnectionManager()
        listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
        (found,) = [f for f in hcm.http_filters if f.name == "envoy.filters.http.ratelimit"]
        config = RateLimit()
        found.typed_config.Unpack(config)
        return bool(config.failure_mode_deny)

    assert failure_mode_deny() is True
    write_atomic(policy, text.replace("fail_open: false", "fail_open: true"))
    assert failure_mode_deny() is False


def test_guard_reloads_policy_limits_on_change_and_sighup(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    folder = tmp_path / "policy"
    (tmp_path / "jwks.json").write_bytes(jwt.jwks(jwt.new_key()))
    text = SHARED_POLICY.format(node="edge-a", guard="127.0.0.1:1", port=1001, upstream=9)
    write_atomic(folder / "a.yaml", text)
    g = Guard(procs, "guard", "--policy", str(folder)).launch().ready()
    descriptor = [("route", "http/api/shared"), ("jwt_sub", "alice")]

    def limit() -> int:
        r = g.limit("xdsplane", descriptor)
        return int(r.statuses[0].current_limit.requests_per_unit)

    try:
        assert limit() == 4
        assert g.health()["rules"] == 2
        write_atomic(
            folder / "a.yaml", text.replace("requests: 4, per: 1h", "requests: 9, per: 1h")
        )
        wait_until(lambda: limit() == 9, 10, what="the guard reloads the changed policy")
        # a broken edit is refused: the last good limits stay, the guard keeps serving
        write_atomic(folder / "a.yaml", text.replace("requests: 4,", "requests: many,"))
        wait_until(lambda: "limits not reloaded" in g.proc.tail(), 10, what="reload refused")
        assert limit() == 9 and g.proc.alive()
        assert f"{folder / 'a.yaml'}:19:" in g.proc.tail()
        # the reload state (xdsplane.reload) in /healthz and the metrics
        state = g.health()["limits_reload"]
        assert state["failures"] >= 1 and state["successes"] >= 1, state
        assert state["errors"] and state["errors"][0].startswith(f"{folder / 'a.yaml'}:19:")
        metrics = g.metrics()
        assert 'xdsplane_guard_limits_reloads_total{result="failure"}' in metrics
        assert 'xdsplane_guard_limits_reloads_total{result="success"}' in metrics
        # SIGHUP reloads too (a file whose stamp did not change, e.g. a restored backup)
        write_atomic(folder / "a.yaml", text)
        wait_until(lambda: limit() == 4, 10, what="the fixed policy is loaded again")
        before = g.proc.tail(200).count("limits reloaded")
        g.proc.send(signal.SIGHUP)
        wait_until(
            lambda: g.proc.tail(200).count("limits reloaded") > before, 10, what="SIGHUP reload"
        )
    finally:
        g.close()


def test_guard_refuses_a_bad_policy_at_startup(procs: ProcessGroup, tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_bytes(jwt.jwks(jwt.new_key()))
    folder = tmp_path / "policy"
    text = SHARED_POLICY.format(node="edge-a", guard="127.0.0.1:1", port=1001, upstream=9)
    write_atomic(folder / "a.yaml", text.replace("per: 1h", "per: 2h"))
    g = Guard(procs, "guard-bad", "--policy", str(folder))
    g.proc.start()
    assert g.proc.wait(30) == 1
    log = g.proc.tail()
    assert f"{folder / 'a.yaml'}:19:" in log and "per must be 1s, 1m or 1h" in log, log
    assert "not starting" in log


# -- one Envoy: local limits and circuit breakers ---------------------------------------------

LOCAL_POLICY = """\
nodes: ["edge-*"]
jwt_providers:
  idp:
    issuer: {issuer}
    audiences: [billing]
    jwks_file: ../keys/jwks.json
listeners:
  - name: http
    address: 127.0.0.1:{port}
    hosts:
      - name: api
        domains: ["*"]
        routes:
          - {{name: healthz, path: /healthz, direct_response: {{status: 200, body: "ok"}}}}
          - name: by-sub
            prefix: /sub/
            jwt: idp
            rate_limit: {{requests: 3, per: 1h, by: jwt_sub}}
            upstream: echo
          - name: by-address
            prefix: /addr/
            rate_limit: {{requests: 2, per: 1h, by: source_address}}
            upstream: echo
          - {{name: unlimited, prefix: /free/, upstream: echo}}
          - {{name: slow, prefix: /slow/, upstream: slow, timeout: 30s}}
  - name: https
    address: 127.0.0.1:{tls_port}
    tls: {{}}
    hosts:
      - name: billing
        domains: [billing.example.com]
        certificate: edge-server
        client_certificate: optional
        client_ca: client-ca
        routes:
          - name: by-cert
            prefix: /
            rate_limit: {{requests: 2, per: 1h, by: client_certificate}}
            upstream: echo
secrets:
  edge-server: {{certificate: ../certs/edge.crt, private_key: ../certs/edge.key}}
  client-ca: {{ca: ../certs/client-ca.crt}}
upstreams:
  echo: {{endpoints: ["127.0.0.1:{echo}"]}}
  slow:
    endpoints: ["127.0.0.1:{slow}"]
    limits: {{max_connections: 1, max_pending_requests: 1, max_requests: 1}}
"""


@dataclass
class Local:
    port: int
    tls_port: int
    certs: Path
    key: ec.EllipticCurvePrivateKey
    envoy: Envoy
    slow: SlowUpstream
    group: ProcessGroup
    policy: Path
    text: str


@contextlib.contextmanager
def local_edge(root: Path, max_seconds: float) -> Iterator[Local]:
    """xdsplane serve and one Envoy on LOCAL_POLICY (free ports); watchdog ``max_seconds``."""
    folder = root / "policy"
    key = jwt.new_key()
    pki.write_atomic(root / "keys" / "jwks.json", jwt.jwks(key))
    certs = make_pki(root / "certs")
    echo, slow = EchoUpstream(), SlowUpstream()
    port, tls_port = free_port(), free_port()
    text = LOCAL_POLICY.format(
        issuer=jwt.DEFAULT_ISSUER, port=port, tls_port=tls_port, echo=echo.port, slow=slow.port
    )
    write_atomic(folder / "edge.yaml", text)
    try:
        with process_group(root / "logs", max_seconds=max_seconds) as group:
            server = XdsServer(group, folder).start()
            envoy = Envoy(group, root, "edge-1", server.xds_address).start()
            wait_until(lambda: get(port, "/healthz").status == 200, 20, what="gateway answers")
            yield Local(port, tls_port, certs, key, envoy, slow, group, folder / "edge.yaml", text)
    finally:
        echo.close()
        slow.close()


# Each module-scoped group below is shared by 4 or 5 tests, ~15 s together here; 10 minutes
# covers a machine many times slower (start-up included) before the watchdog kills them.
MODULE_SECONDS = 600.0


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Local]:
    with local_edge(tmp_path_factory.mktemp("ratelimit-local"), MODULE_SECONDS) as edge:
        yield edge


@pytest.fixture
def own_local(tmp_path: Path) -> Iterator[Local]:
    """An edge of its own, for a test that edits the policy (the shared one stays as is)."""
    with local_edge(tmp_path, TEST_SECONDS) as edge:
        yield edge


@pytest.fixture(autouse=True)
def _report(request: pytest.FixtureRequest) -> None:
    for name in ("local", "own_local", "shared", "own_shared"):
        if name in request.fixturenames:
            attach_to_report(request, request.getfixturevalue(name).group)


@pytest.mark.envoy
def test_local_limit_is_per_jwt_subject_with_rate_limit_headers(local: Local) -> None:
    alice = token(local.key, "alice")
    for i in range(3):
        r = get(local.port, "/sub/x", alice)
        assert r.status == 200, (i, r.status, r.text)
        assert r.headers["x-ratelimit-limit"] == "3", r.headers
        assert r.headers["x-ratelimit-remaining"] == str(2 - i), r.headers
    over = get(local.port, "/sub/x", token(local.key, "alice"))  # a new token, same sub
    assert over.status == 429, (over.status, over.text)
    assert over.headers["x-ratelimit-limit"] == "3"
    assert over.headers["x-ratelimit-remaining"] == "0"
    assert int(over.headers["x-ratelimit-reset"]) > 0
    # another subject has its own budget; the route without a limit is not limited
    assert get(local.port, "/sub/x", token(local.key, "bob")).status == 200
    for _ in range(5):
        assert get(local.port, "/free/x").status == 200
    # Envoy counts per route (stat prefix: the route's name)
    assert local.envoy.stat("api.by-sub.http_local_rate_limit.rate_limited") == 1


@pytest.mark.envoy
def test_local_limit_by_source_address(local: Local) -> None:
    for _ in range(2):
        assert get(local.port, "/addr/x").status == 200
    assert get(local.port, "/addr/x").status == 429
    assert get(local.port, "/addr/x", source=OTHER_HOST).status == 200  # another client
    assert get(local.port, "/addr/x", source=OTHER_HOST).status == 200
    assert get(local.port, "/addr/x", source=OTHER_HOST).status == 429


@pytest.mark.envoy
def test_local_limit_by_client_certificate(local: Local) -> None:
    """Each client certificate (its URI SAN) has its own budget; no certificate: one shared
    budget for the anonymous."""

    def status(cert: str | None) -> int:
        ctx = client_context(local.certs, cert)
        answer, _ = https_get(local.tls_port, ctx, "billing.example.com", "/x")
        return answer.status

    assert [status("alice") for _ in range(3)] == [200, 200, 429]
    assert [status("bob") for _ in range(3)] == [200, 200, 429]  # another SAN
    assert [status(None) for _ in range(3)] == [200, 200, 429]
    assert local.envoy.stat("billing.by-cert.http_local_rate_limit.rate_limited") == 3


@pytest.mark.envoy
def test_upstream_circuit_breakers_take_effect(local: Local) -> None:
    """max_requests 1, max_pending_requests 1: a third concurrent request fails fast."""
    results: dict[int, Response] = {}

    def send(i: int) -> None:
        results[i] = get(local.port, f"/slow/{i}", timeout=25)

    first = threading.Thread(target=send, args=(1,))
    first.start()
    wait_until(lambda: local.slow.arrived == 1, 10, what="the first request is upstream")
    second = threading.Thread(target=send, args=(2,))
    second.start()
    wait_until(
        lambda: local.envoy.stat("cluster.slow.upstream_rq_pending_active") == 1,
        10,
        what="the second request waits for a connection",
    )
    try:
        third = get(local.port, "/slow/3")
        assert third.status == 503, (third.status, third.text)
        assert third.headers.get("x-envoy-overloaded") == "true", third.headers
        assert local.envoy.stat("cluster.slow.upstream_rq_pending_overflow") == 1
        assert local.slow.arrived == 1  # the breaker held them back, not the upstream
    finally:
        local.slow.release()
        first.join(30)
        second.join(30)
    assert results[1].status == 200 and results[2].status == 200, results


@pytest.mark.envoy
def test_a_limit_edit_reaches_envoy_over_rds_only(own_local: Local) -> None:
    """It rewrites the policy: on an edge of its own."""
    local = own_local
    envoy = local.envoy
    lds = envoy.stat("listener_manager.lds.update_success")
    rds = envoy.stat("http.http.rds.http.update_success")
    edited = local.text.replace("requests: 2, per: 1h, by: source_address", "requests: 4, per: 1h")
    assert edited != local.text
    write_atomic(local.policy, edited)
    wait_until(lambda: envoy.stat("http.http.rds.http.update_success") > rds, 10, what="RDS update")
    source = "127.0.0.3"
    assert [get(local.port, "/addr/x", source=source).status for _ in range(5)] == 4 * [200] + [429]
    assert envoy.stat("listener_manager.lds.update_success") == lds  # no listener change


# -- two Envoys, two guards, one Redis --------------------------------------------------------

SHARED_POLICY = """\
nodes: ["{node}"]
guard: {{address: "{guard}", fail_open: false, timeout: 1s, tls: {{certificate: gc, ca: sca}}}}
jwt_providers:
  idp:
    issuer: https://idp.example.com
    audiences: [billing]
    jwks_file: ../jwks.json
    max_lifetime: 300s
listeners:
  - name: http
    address: 127.0.0.1:{port}
    hosts:
      - name: api
        domains: ["*"]
        routes:
          - {{name: healthz, path: /healthz, direct_response: {{status: 200, body: "ok"}}}}
          - {{name: once, prefix: /once/, jwt: idp, replay_protection: true, upstream: echo}}
          - name: shared
            global_rate_limit: {{requests: 4, per: 1h, by: jwt_sub}}
            prefix: /shared/
            jwt: idp
            upstream: echo
upstreams:
  echo: {{endpoints: ["127.0.0.1:{upstream}"]}}
secrets:
  gc: {{certificate: ../certs/guard-client.crt, private_key: ../certs/guard-client.key}}
  sca: {{ca: ../certs/service-ca.crt}}
"""


@dataclass
class Edge:
    port: int
    envoy: Envoy
    guard: Guard


@dataclass
class Shared:
    key: ec.EllipticCurvePrivateKey
    redis: Redis
    a: Edge  # its guard fails closed when Redis is down
    b: Edge  # its guard fails open (--fail-open)
    group: ProcessGroup
    run: str = field(default_factory=lambda: f"{os.getpid()}-{time.monotonic_ns()}")

    def sub(self, name: str) -> str:
        return f"{name}-{self.run}"


@contextlib.contextmanager
def shared_edges(root: Path, max_seconds: float) -> Iterator[Shared]:
    """Redis, two guards (a fails closed, b open), xdsplane serve and two Envoys on
    SHARED_POLICY (free ports); watchdog ``max_seconds``."""
    folder = root / "policy"
    key = jwt.new_key()
    pki.write_atomic(root / "jwks.json", jwt.jwks(key))
    certs = pki_dir(root)
    echo = EchoUpstream()
    try:
        with process_group(root / "logs", max_seconds=max_seconds) as group:
            redis = Redis(group, root).start()
            common = ["--redis", redis.url, "--policy", str(folder)]
            guard_a = Guard(group, "guard-a", *common, certs=certs)
            guard_b = Guard(group, "guard-b", *common, "--fail-open", certs=certs)
            ports = {"a": free_port(), "b": free_port()}
            for name, g in (("a", guard_a), ("b", guard_b)):
                text = SHARED_POLICY.format(
                    node=f"edge-{name}",
                    guard=f"{HOST}:{g.port}",
                    port=ports[name],
                    upstream=echo.port,
                )
                write_atomic(folder / f"{name}.yaml", text)
            server = XdsServer(group, folder).launch()
            guard_a.launch()
            guard_b.launch()
            server.wait_ready()
            guard_a.ready()
            guard_b.ready()
            envoy_a = Envoy(group, root, "edge-a", server.xds_address).start()
            envoy_b = Envoy(group, root, "edge-b", server.xds_address).start()
            for p in ports.values():
                wait_until(lambda p=p: get(p, "/healthz").status == 200, 20, what="edge answers")
            yield Shared(
                key,
                redis,
                Edge(ports["a"], envoy_a, guard_a),
                Edge(ports["b"], envoy_b, guard_b),
                group,
            )
            guard_a.close()
            guard_b.close()
    finally:
        echo.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    with shared_edges(tmp_path_factory.mktemp("ratelimit-shared"), MODULE_SECONDS) as edges:
        yield edges


@pytest.fixture
def own_shared(tmp_path: Path) -> Iterator[Shared]:
    """Processes of its own, for a test that stops Redis or a guard."""
    with shared_edges(tmp_path, TEST_SECONDS) as edges:
        yield edges


def _away_from_the_hour() -> None:
    """The global limit counts per clock hour: do not straddle its end."""
    if time.time() % 3600 > 3590:
        time.sleep(3600 - time.time() % 3600 + 0.1)


@pytest.mark.envoy
def test_a_token_used_at_one_envoy_is_refused_at_the_other(shared: Shared) -> None:
    t = token(shared.key, shared.sub("alice"))
    first = get(shared.a.port, "/once/x", t)
    assert first.status == 200, (first.status, first.text)
    again = get(shared.b.port, "/once/x", t)
    assert again.status == 403, (again.status, again.text)
    assert again.headers.get("x-guard-reason") == "replay"
    assert get(shared.b.port, "/once/x", token(shared.key, shared.sub("alice"))).status == 200


@pytest.mark.envoy
def test_a_global_limit_is_shared_by_both_envoys(shared: Shared) -> None:
    _away_from_the_hour()
    carol = shared.sub("carol")
    statuses = [
        get(e.port, "/shared/x", token(shared.key, carol)).status for e in 2 * [shared.a, shared.b]
    ]
    assert statuses == [200, 200, 200, 200]
    for edge in (shared.a, shared.b):
        over = get(edge.port, "/shared/x", token(shared.key, carol))
        assert over.status == 429, (over.status, over.text)
        assert over.headers["x-ratelimit-limit"].startswith("4"), over.headers
        assert over.headers["x-ratelimit-remaining"] == "0"
    # per identity: another subject still has its budget, at either Envoy
    dave = shared.sub("dave")
    assert get(shared.a.port, "/shared/x", token(shared.key, dave)).status == 200
    assert get(shared.b.port, "/shared/x", token(shared.key, dave)).status == 200
    assert shared.a.envoy.stat("cluster.echo.ratelimit.over_limit") >= 1


@pytest.mark.envoy
def test_redis_killed_fail_closed_denies_fail_open_allows_then_both_recover(
    own_shared: Shared,
) -> None:
    shared = own_shared
    _away_from_the_hour()
    a, b, redis = shared.a, shared.b, shared.redis
    redis.proc.kill()

    # fail closed (guard-a): the replay check answers 503, the global limit 429
    once = get(a.port, "/once/x", token(shared.key, shared.sub("erin")))
    assert once.status == 503, (once.status, once.text)
    assert once.headers.get("x-guard-reason") == "store_unavailable"
    limited = get(a.port, "/shared/x", token(shared.key, shared.sub("erin")))
    assert limited.status == 429, (limited.status, limited.text)
    # fail open (guard-b): both pass
    t = token(shared.key, shared.sub("frank"))
    assert get(b.port, "/once/x", t).status == 200
    assert get(b.port, "/shared/x", token(shared.key, shared.sub("frank"))).status == 200
    assert a.guard.health()["backend_up"] is False

    # Redis comes back on the same port: both recover, nothing restarted
    redis.start()
    wait_until(
        lambda: get(a.port, "/once/x", token(shared.key, shared.sub("gina"))).status == 200,
        15,
        what="the fail-closed side allows again",
    )
    # The fail-open side answers 200 whether or not it reaches Redis: it has recovered only
    # when its store says so (its next request went to Redis). Until then a request through
    # it would pass uncounted, and the counts below would be one short.
    probe = iter(range(1_000_000))
    wait_until(
        lambda: (
            get(b.port, "/once/x", token(shared.key, shared.sub(f"probe-{next(probe)}"))).status
            == 200
            and b.guard.health()["backend_up"] is True
        ),
        15,
        what="the fail-open side reaches Redis again",
    )
    gina = shared.sub("gina-limit")
    statuses = [get(e.port, "/shared/x", token(shared.key, gina)).status for e in 2 * [b, a]]
    assert statuses == [200, 200, 200, 200]
    assert get(b.port, "/shared/x", token(shared.key, gina)).status == 429  # b counts again
    assert get(a.port, "/shared/x", token(shared.key, gina)).status == 429
    shared_token = token(shared.key, shared.sub("hank"))
    assert get(b.port, "/once/x", shared_token).status == 200
    assert get(a.port, "/once/x", shared_token).status == 403  # b writes to Redis again
    for proc in (a.guard.proc, b.guard.proc, a.envoy.proc, b.envoy.proc):
        assert proc.alive() and proc.starts == 1, proc.name
    assert redis.proc.starts == 2


@pytest.mark.envoy
def test_guard_unreachable_fails_closed_by_the_policy(own_shared: Shared) -> None:
    """guard.fail_open: false -> the ratelimit filter's failure_mode_deny: Envoy refuses.
    It stops guard a: on processes of its own."""
    shared = own_shared
    shared.a.guard.proc.stop()
    r = get(shared.a.port, "/shared/x", token(shared.key, shared.sub("ivan")))
    assert r.status == 500, (r.status, r.text)
    assert get(shared.a.port, "/once/x", token(shared.key, shared.sub("ivan"))).status == 403
    assert get(shared.a.port, "/healthz").status == 200  # routes without the guard still work
    assert shared.a.envoy.stat("cluster.echo.ratelimit.error") >= 1
