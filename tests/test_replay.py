"""JWT replay protection live: ``guard:`` + ``replay_protection:`` in the policy, a real
Envoy, ``xdsplane guard`` (memory store) and an upstream.

The tests share one gateway and leave it as they found it (any order); the test that
stops the guard has a gateway of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    HOST,
    TEST_SECONDS,
    EchoUpstream,
    Envoy,
    XdsServer,
    free_port,
    wait_until,
    write_atomic,
)
from test_guard import Guard, pki_dir
from test_jwt import Gateway
from tls_helpers import attach_to_report, process_group

from xdsplane import jwt, pki
from xdsplane.policy.translate import guard as guard_tr

POLICY = """\
nodes: ["edge-*"]
guard:
  address: "{guard}"
  fail_open: {fail_open}
  timeout: 500ms
  tls: {{certificate: guard-client, ca: service-ca, sni: guard, subject_alt_names: [guard]}}
secrets:
  guard-client: {{certificate: ../certs/guard-client.crt, private_key: ../certs/guard-client.key}}
  service-ca: {{ca: ../certs/service-ca.crt}}
jwt_providers:
  idp:
    issuer: {issuer}
    audiences: [billing]
    jwks_file: ../keys/jwks.json
    max_lifetime: 300s
listeners:
  - name: http
    address: 127.0.0.1:{port}
    hosts:
      - name: api
        domains: ["*"]
        routes:
          - {{name: healthz, path: /healthz, direct_response: {{status: 200, body: "ok"}}}}
          - {{name: reusable, prefix: /reusable/, jwt: idp, upstream: echo}}
          - {{name: once, prefix: /, jwt: idp, replay_protection: true, upstream: echo}}
upstreams:
  echo: {{endpoints: ["127.0.0.1:{upstream}"]}}
"""


@dataclass
class Replay:
    gw: Gateway
    guard: Guard
    upstream: int
    certs: Path

    def write_policy(self, fail_open: bool, guard_port: int | None = None) -> None:
        text = POLICY.format(
            guard=f"{HOST}:{guard_port or self.guard.port}",
            fail_open="true" if fail_open else "false",
            issuer=jwt.DEFAULT_ISSUER,
            port=self.gw.port,
            upstream=self.upstream,
        )
        write_atomic(self.gw.folder / "edge.yaml", text)


@contextlib.contextmanager
def replay_gateway(root: Path, max_seconds: float) -> Iterator[Replay]:
    """A guard (memory store), xdsplane serve and Envoy on POLICY, with free ports; each
    process is killed by its watchdog after ``max_seconds`` if nothing stopped it."""
    folder = root / "policy"
    folder.mkdir()
    key = jwt.new_key()
    pki.write_atomic(root / "keys" / "jwks.json", jwt.jwks(key))
    certs = pki_dir(root)
    echo = EchoUpstream()
    port = free_port()
    try:
        with process_group(root / "logs", max_seconds=max_seconds) as group:
            guard = Guard(group, "guard", certs=certs).launch().ready()
            server = XdsServer(group, folder)
            envoy = Envoy(group, root, "edge-1", server.xds_address)
            gw = Gateway(folder, port, key, envoy, server, group)
            r = Replay(gw, guard, echo.port, certs)
            r.write_policy(fail_open=False)
            server.start()
            envoy.start()
            wait_until(lambda: r.gw.get("/healthz").status == 200, 20, what="the gateway answers")
            yield r
            guard.close()
    finally:
        echo.close()


# The module's tests share one gateway: 4 tests, ~10 s together here; 10 minutes covers
# a machine many times slower (start-up included) before the watchdog kills them.
MODULE_SECONDS = 600.0


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replay]:
    with replay_gateway(tmp_path_factory.mktemp("replay"), MODULE_SECONDS) as r:
        yield r


@pytest.fixture
def own_replay(tmp_path: Path) -> Iterator[Replay]:
    """A gateway of its own, for a test that stops the guard (the shared one must live)."""
    with replay_gateway(tmp_path, TEST_SECONDS) as r:
        yield r


@pytest.fixture(autouse=True)
def _report(request: pytest.FixtureRequest) -> None:
    for name in ("replay", "own_replay"):
        if name in request.fixturenames:
            attach_to_report(request, request.getfixturevalue(name).gw.group)


@pytest.mark.envoy
def test_a_token_is_accepted_once(replay: Replay) -> None:
    gw = replay.gw
    token = gw.token()
    first = gw.get("/billing/invoices", token)
    assert first.status == 200, (first.status, first.text)
    again = gw.get("/billing/invoices", token)
    assert again.status == 403, (again.status, again.text)
    assert again.headers.get("x-guard-reason") == "replay"
    fresh = gw.get("/billing/invoices", gw.token())
    assert fresh.status == 200, (fresh.status, fresh.text)
    # Envoy asked the guard over mutual TLS (the guard serves nothing else)
    assert gw.envoy.stat("cluster.xdsplane-guard.ssl.handshake") >= 1
    assert replay.guard.health()["grpc"] == "mtls"


@pytest.mark.envoy
def test_a_token_without_exp_is_refused(replay: Replay) -> None:
    """It could be replayed for ever: jwt_authn refuses it (xdsplane sets require_expiration
    on every provider), and the guard would too (no_exp)."""
    gw = replay.gw
    claims = jwt.claims("alice")
    del claims["exp"]
    r = gw.get("/billing/invoices", jwt.sign(gw.key, claims))
    assert r.status == 401, (r.status, r.text)


@pytest.mark.envoy
def test_a_route_without_replay_protection_accepts_a_token_twice(replay: Replay) -> None:
    gw = replay.gw
    token = gw.token()
    for _ in range(2):
        r = gw.get("/reusable/x", token)
        assert r.status == 200, (r.status, r.text)
    assert gw.get("/reusable/x").status == 401  # jwt: still applies
    assert gw.get("/billing/x").status == 401  # no token: jwt_authn refuses before the guard


@pytest.mark.envoy
def test_envoy_does_not_talk_to_a_guard_without_the_guard_san(replay: Replay) -> None:
    """Another process at the guard's address, with a service-ca certificate that does not
    name `guard` (the edge's own), would answer OK to every replay: Envoy refuses its
    certificate (guard.tls.subject_alt_names) and fails closed."""
    gw = replay.gw
    used = gw.token()
    assert gw.get("/billing/x", used).status == 200  # remembered by the real guard
    c = replay.certs
    rogue = Guard(
        gw.group,
        "rogue-guard",
        *("--tls-cert", str(c / "edge.crt"), "--tls-key", str(c / "edge.key")),
        *("--client-ca", str(c / "service-ca.crt"), "--client-san", pki.GUARD_CLIENT_URI),
    )
    rogue.launch().ready()
    stat = "cluster.xdsplane-guard.ssl.fail_verify_san"
    before = gw.envoy.stat(stat)
    try:
        replay.write_policy(fail_open=False, guard_port=rogue.port)
        wait_until(
            lambda: gw.get("/billing/x", gw.token()).status == 403 and gw.envoy.stat(stat) > before,
            20,
            what="Envoy tries the rogue guard and refuses its certificate",
        )
        replayed = gw.get("/billing/x", used)
        assert replayed.status == 403, (replayed.status, replayed.text)
        assert "xdsplane_guard_decisions_total{" not in rogue.metrics()  # never asked
    finally:
        replay.write_policy(fail_open=False)
        rogue.proc.stop()
    wait_until(
        lambda: gw.get("/billing/x", gw.token()).status == 200, 20, what="the real guard again"
    )
    assert gw.get("/billing/x", used).status == 403  # still remembered there


@pytest.mark.envoy
def test_envoy_spreads_checks_over_several_connections_to_the_guard(replay: Replay) -> None:
    """The guard's address is listed CONNECTIONS times in its cluster: Envoy keeps a
    connection to each (one Envoy thread here) and sends Checks round robin, so that with
    `xdsplane guard --workers N` the kernel (SO_REUSEPORT) can hand them to different
    workers (it spreads connections, not requests)."""
    gw = replay.gw
    assert guard_tr.CONNECTIONS > 1
    assert gw.envoy.stat("cluster.xdsplane-guard.membership_total") == guard_tr.CONNECTIONS
    for _ in range(3 * guard_tr.CONNECTIONS):
        r = gw.get("/billing/x", gw.token())
        assert r.status == 200, (r.status, r.text)
    wait_until(
        lambda: gw.envoy.stat("cluster.xdsplane-guard.upstream_cx_active") >= guard_tr.CONNECTIONS,
        20,
        what=f"{guard_tr.CONNECTIONS} connections from Envoy to the guard",
    )


@pytest.mark.envoy
def test_guard_down_fails_closed_then_open(own_replay: Replay) -> None:
    replay = own_replay
    gw = replay.gw
    replay.guard.proc.stop()
    down = gw.get("/billing/invoices", gw.token())
    assert down.status == 403, (down.status, down.text)  # ext_authz status_on_error default
    assert gw.get("/reusable/x", gw.token()).status == 200  # ext_authz disabled there
    replay.write_policy(fail_open=True)
    wait_until(
        lambda: gw.get("/billing/invoices", gw.token()).status == 200,
        20,
        what="fail_open: true lets requests through with the guard down",
    )
    token = gw.token()  # nothing remembers it now: a replay passes too
    assert gw.get("/billing/invoices", token).status == 200
    assert gw.get("/billing/invoices", token).status == 200
