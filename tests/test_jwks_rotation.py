"""JWKS rotation through ECDS: a new key set reaches a real Envoy with no listener drain.

The jwt_authn filter's configuration (the providers with their key sets) is the ECDS
resource ``envoy.filters.http.jwt_authn``; the Listener only names it. Rewriting the JWKS
file must therefore change that resource alone: Envoy accepts tokens of the new key (and
refuses the old one once it is gone) on new and on already open connections, while its
listener counters (modified, in-place updated, draining filter chains) stay where they were.
Run over SotW and delta. Also: a malformed JWKS is refused with its file:line and the last
good key set keeps serving; a listener change that comes with a configuration change, and a
listener that names the configuration again after dropping it, do not wait for Envoy's
initial fetch timeout; a restarted control plane resends nothing.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from harness import (
    HOST,
    EchoUpstream,
    Envoy,
    ProcessGroup,
    Response,
    XdsServer,
    bearer,
    exchange,
    free_port,
    holds_for,
    wait_until,
)

from xdsplane import cli, jwt, pki
from xdsplane.pipeline import FolderLoader
from xdsplane.policy.translate import jwt as jwt_translate
from xdsplane.types import ResourceType

pytestmark = [pytest.mark.envoy]  # conftest: skipped without Envoy 1.40, failed in CI

POLICY = """\
jwt_providers:
  idp:
    issuer: https://idp.example.com
    audiences: [billing]
    jwks_file: ../keys/jwks.json
    forward_claims: {{sub: x-jwt-sub}}
listeners:
  - name: http
    address: 127.0.0.1:{port}
    hosts:
      - name: api
        domains: ["*"]
        routes:
          - {{name: healthz, path: /healthz, direct_response: {{status: 200, body: "ok"}}}}
          - {{name: api, prefix: /, jwt: idp, upstream: echo}}
upstreams:
  echo: {{endpoints: ["127.0.0.1:{upstream}"]}}
"""

ECDS_NAME = jwt_translate.FILTER
# Envoy's counters for an HTTP filter configured over ECDS.
ECDS_STATS = f"extension_config_discovery.http_filter.{ECDS_NAME}"
LISTENER_STATS = (
    r"^listener_manager\.(listener_added|listener_modified|listener_removed"
    r"|listener_in_place_updated|total_filter_chains_draining|total_listeners_draining"
    r"|total_listeners_warming|lds\.update_success)$"
)


class KeepAlive:
    """One downstream HTTP/1.1 connection that is never reopened: a request after the peer
    closed it fails instead of silently connecting again."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection(HOST, port, timeout=5)
        self.conn.connect()
        self.conn.auto_open = 0  # type: ignore[attr-defined]
        self.local = self.conn.sock.getsockname()

    def get(self, path: str, token: str) -> Response:
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        r = self.conn.getresponse()
        body = r.read()
        headers = {k.lower(): v for k, v in r.getheaders()}
        assert self.conn.sock is not None, "the connection was closed"
        assert self.conn.sock.getsockname() == self.local
        return Response(r.status, body, headers)

    def close(self) -> None:
        self.conn.close()


@dataclass
class Gateway:
    root: Path
    folder: Path
    port: int
    envoy: Envoy
    server: XdsServer
    group: ProcessGroup

    @property
    def jwks_path(self) -> Path:
        return self.root / "keys" / "jwks.json"

    def get(self, path: str, token: str | None = None) -> Response:
        return exchange(http.client.HTTPConnection(HOST, self.port, timeout=5), path, bearer(token))

    def listener_state(self) -> tuple[str, str]:
        """Envoy's active listener ``http``: its version and when it was last updated."""
        dump = self.envoy.config_dump("dynamic_listeners")
        (found,) = [c for c in dump.get("configs", []) if c["name"] == "http"]
        active = found["active_state"]
        return active["version_info"], active["last_updated"]

    def ecds_config(self) -> str:
        """The jwt_authn configuration Envoy holds from ECDS, as JSON text."""
        dump = self.envoy.config_dump("ecds_filters")
        configs = [
            c for c in dump.get("configs", []) if c.get("ecds_filter", {}).get("name") == ECDS_NAME
        ]
        assert len(configs) == 1, dump
        return json.dumps(configs[0])


@pytest.fixture(params=[False, True], ids=["sotw", "delta"])
def gateway(
    request: pytest.FixtureRequest, tmp_path: Path, procs: ProcessGroup
) -> Iterator[Gateway]:
    folder = tmp_path / "policy"
    folder.mkdir()
    pki.write_atomic(tmp_path / "keys" / "jwks.json", jwt.jwks(KEYS.a))
    echo = EchoUpstream()
    port = free_port()
    (folder / "edge.yaml").write_text(POLICY.format(port=port, upstream=echo.port))
    try:
        server = XdsServer(procs, folder).start()
        envoy = Envoy(procs, tmp_path, "edge-1", server.xds_address, delta=request.param)
        gw = Gateway(tmp_path, folder, port, envoy.start(), server, procs)
        wait_until(lambda: gw.get("/healthz").status == 200, 20, what="the gateway answers")
        yield gw
    finally:
        echo.close()


@dataclass(frozen=True)
class _Keys:
    a: ec.EllipticCurvePrivateKey
    b: ec.EllipticCurvePrivateKey


KEYS = _Keys(jwt.new_key(), jwt.new_key())


def token(key: ec.EllipticCurvePrivateKey, sub: str = "alice") -> str:
    return jwt.sign(key, jwt.claims(sub))


def ecds_reloads(envoy: Envoy) -> int:
    return envoy.stat(f"{ECDS_STATS}.config_reload")


@pytest.mark.envoy
def test_jwks_rotation_goes_over_ecds_without_touching_the_listener(gateway: Gateway) -> None:
    envoy = gateway.envoy
    token_a, token_b = token(KEYS.a, "alice"), token(KEYS.b, "bob")
    assert gateway.get("/billing/x", token_a).status == 200
    assert gateway.get("/billing/x", token_b).status == 401
    # Envoy took the filter's configuration from ECDS, with key A in it.
    held = gateway.ecds_config()
    assert jwt.kid(KEYS.a) in held and jwt.kid(KEYS.b) not in held
    # A connection opened before the rotation, used once.
    keep = KeepAlive(gateway.port)
    try:
        assert keep.get("/billing/x", token_a).status == 200
        listeners_before = envoy.stats(LISTENER_STATS)
        state_before = gateway.listener_state()
        reloads_before = ecds_reloads(envoy)
        lds_before = gateway.server.type_status("edge-1", "LDS")

        # Only key B from now on (a real rotation would publish both first).
        pki.write_atomic(gateway.jwks_path, jwt.jwks(KEYS.b))
        wait_until(
            lambda: gateway.get("/billing/x", token_b).status == 200,
            20,
            what="a token signed with the new key is accepted",
        )
        assert gateway.get("/billing/x", token_a).status == 401  # key A is gone

        # The open connection was neither closed nor drained, and its next requests see
        # the new key set: the filter configuration applies per request.
        r = keep.get("/billing/x", token_b)
        assert r.status == 200, (r.status, r.text)
        assert json.loads(r.body)["x-jwt-sub"] == "bob"
        assert r.headers.get("connection", "").lower() != "close"
        r = keep.get("/billing/x", token_a)
        assert r.status == 401, (r.status, r.text)
        assert keep.get("/billing/x", token_b).status == 200

        # The change went over ECDS ...
        assert ecds_reloads(envoy) == reloads_before + 1
        assert envoy.stat(f"{ECDS_STATS}.config_fail") == 0
        held = gateway.ecds_config()
        assert jwt.kid(KEYS.b) in held and jwt.kid(KEYS.a) not in held
        ecds = gateway.server.type_status("edge-1", "ECDS")
        assert ecds["nacks"] == 0 and ecds["acked_version"] == ecds["sent_version"], ecds
        # ... and the listener was not touched: no LDS update, no modification, no drain.
        assert envoy.stats(LISTENER_STATS) == listeners_before
        assert listeners_before["listener_manager.total_filter_chains_draining"] == 0
        assert gateway.listener_state() == state_before
        lds_after = gateway.server.type_status("edge-1", "LDS")
        assert lds_after["sent_version"] == lds_before["sent_version"]
        assert lds_after["responses"] == lds_before["responses"]
    finally:
        keep.close()


@pytest.mark.envoy
def test_a_malformed_jwks_keeps_the_last_good_key_set(gateway: Gateway) -> None:
    envoy = gateway.envoy
    token_a = token(KEYS.a)
    assert gateway.get("/billing/x", token_a).status == 200
    reloads_before = ecds_reloads(envoy)
    failures_before = gateway.server.status()["reload"]["failures"]
    policy = gateway.folder / "edge.yaml"
    line = next(
        i for i, text in enumerate(policy.read_text().splitlines(), 1) if "jwks_file:" in text
    )

    pki.write_atomic(gateway.jwks_path, b'{"keys": []}')

    def reported() -> str | None:
        errors = gateway.server.status()["reload"]["errors"]
        return errors[0] if errors else None

    error = wait_until(reported, 10, what="/status reports the bad JWKS")
    assert error.startswith(f"{policy}:{line}:"), error
    assert "jwt provider 'idp'" in error and "jwks.json" in error, error
    assert gateway.server.status()["reload"]["failures"] > failures_before
    # Envoy is sent nothing and key A keeps working.
    holds_for(
        lambda: (
            gateway.get("/billing/x", token_a).status == 200
            and ecds_reloads(envoy) == reloads_before
        ),
        1.0,
        what="key A still accepted, no ECDS update",
    )
    # A good key set is served again and clears the error.
    pki.write_atomic(gateway.jwks_path, jwt.jwks(KEYS.b))
    wait_until(
        lambda: gateway.get("/billing/x", token(KEYS.b)).status == 200, 20, what="key B served"
    )
    assert gateway.server.status()["reload"]["errors"] == []


@pytest.mark.envoy
def test_a_changed_listener_keeps_its_filter_configuration(gateway: Gateway) -> None:
    """A listener update that also changes the ECDS resource (forwarded claims: the header
    filter in the Listener and the provider in ECDS) does not leave the new listener warming
    for the configuration: Envoy hands it what its subscription holds."""
    envoy = gateway.envoy
    token_a = token(KEYS.a, "carol")
    assert json.loads(gateway.get("/billing/x", token_a).body)["x-jwt-sub"] == "carol"
    modified = envoy.stat("listener_manager.listener_modified")
    policy = gateway.folder / "edge.yaml"
    pki.write_atomic(
        policy,
        policy.read_text().replace("{sub: x-jwt-sub}", "{sub: x-user}").encode(),
    )

    def forwarded() -> bool:
        r = gateway.get("/billing/x", token_a)
        return r.status == 200 and json.loads(r.body).get("x-user") == "carol"

    wait_until(forwarded, 10, what="the new claim header is forwarded")
    assert envoy.stat("listener_manager.listener_modified") == modified + 1
    wait_until(
        lambda: envoy.stat("listener_manager.total_listeners_warming") == 0,
        5,
        what="no listener left warming",
    )
    assert "x-jwt-sub" not in json.loads(gateway.get("/billing/x", token_a).body)


@pytest.mark.envoy
def test_jwt_routes_dropped_and_added_again(gateway: Gateway) -> None:
    """The last JWT route goes (the filter leaves the listener, the ECDS resource leaves the
    snapshot), then comes back: the listener that names the configuration again is answered
    at once, not after Envoy's 15 s initial fetch timeout."""
    envoy = gateway.envoy
    policy = gateway.folder / "edge.yaml"
    with_jwt = policy.read_text()
    without = with_jwt.replace("jwt: idp, ", "").split("listeners:")[1]
    pki.write_atomic(policy, ("listeners:" + without).encode())
    wait_until(lambda: gateway.get("/billing/x").status == 200, 10, what="no token needed any more")
    # The old listener drains (1 s here) and Envoy drops the subscription with it.
    wait_until(
        lambda: ECDS_NAME not in envoy.admin("/config_dump?resource=ecds_filters").text,
        10,
        what="Envoy drops the filter configuration",
    )
    pki.write_atomic(policy, with_jwt.encode())
    wait_until(lambda: gateway.get("/billing/x").status == 401, 8, what="tokens required again")
    assert gateway.get("/billing/x", token(KEYS.a)).status == 200
    assert envoy.stat("listener_manager.total_listeners_warming") == 0
    ecds = gateway.server.type_status("edge-1", "ECDS")
    assert ecds["nacks"] == 0, ecds


@pytest.mark.envoy
def test_a_restarted_control_plane_does_not_resend_the_configuration(gateway: Gateway) -> None:
    """Envoy reconnects claiming the ECDS version it holds (SotW ``version_info``, delta
    ``initial_resource_versions``): it is sent nothing, and a later rotation still arrives."""
    envoy, server = gateway.envoy, gateway.server
    reloads = ecds_reloads(envoy)
    assert server.kill() is not None  # SIGKILL: no grace period
    wait_until(lambda: not envoy.connected(), 10, what="Envoy sees the server gone")
    server.start()
    wait_until(envoy.connected, 30, what="Envoy reconnects")
    wait_until(lambda: "ECDS" in server.stream("edge-1")["types"], 10, what="ECDS resubscribed")
    holds_for(lambda: ecds_reloads(envoy) == reloads, 0.5, what="no ECDS update")
    assert server.type_status("edge-1", "ECDS")["responses"] == 0
    assert gateway.get("/billing/x", token(KEYS.a)).status == 200
    pki.write_atomic(gateway.jwks_path, jwt.jwks(KEYS.b))
    wait_until(
        lambda: gateway.get("/billing/x", token(KEYS.b)).status == 200, 20, what="key B served"
    )
    assert ecds_reloads(envoy) == reloads + 1


def test_a_new_jwks_changes_only_the_ecds_resource(tmp_path: Path) -> None:
    """No Envoy needed: the served Listener bytes are identical across a JWKS change."""
    folder = tmp_path / "policy"
    folder.mkdir()
    jwks = tmp_path / "keys" / "jwks.json"
    pki.write_atomic(jwks, jwt.jwks(KEYS.a))
    (folder / "edge.yaml").write_text(POLICY.format(port=free_port(), upstream=free_port()))
    loader = FolderLoader(folder)
    first = loader.load().groups[0].snapshot
    pki.write_atomic(jwks, jwt.jwks(KEYS.b))
    second = loader.load().groups[0].snapshot
    for rtype in (ResourceType.LISTENER, ResourceType.ROUTE, ResourceType.CLUSTER):
        assert second.versions[rtype] == first.versions[rtype], rtype.short
        for name, r in first.of(rtype).items():
            after = second.of(rtype)[name].message.SerializeToString(deterministic=True)
            assert after == r.message.SerializeToString(deterministic=True), name
    assert second.versions[ResourceType.EXTENSION] != first.versions[ResourceType.EXTENSION]
    (ext,) = second.of(ResourceType.EXTENSION).values()
    assert ext.name == ECDS_NAME
    assert jwt.kid(KEYS.b) in str(ext.message) and jwt.kid(KEYS.a) not in str(ext.message)
    # The listener names the configuration instead of holding it.
    (lst,) = second.of(ResourceType.LISTENER).values()
    assert jwt.kid(KEYS.b) not in str(lst.message)


def test_diff_shows_a_rotation_as_an_ecds_change_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The review step says what Envoy will get: one changed ECDS resource, nothing else."""
    folders = []
    for name, key in (("old", KEYS.a), ("new", KEYS.b)):
        (tmp_path / name / "policy").mkdir(parents=True)
        (tmp_path / name / "policy" / "edge.yaml").write_text(POLICY.format(port=1, upstream=2))
        pki.write_atomic(tmp_path / name / "keys" / "jwks.json", jwt.jwks(key))
        folders.append(str(tmp_path / name / "policy"))
    assert cli.main(["diff", *folders]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "nodes *:"
    assert out[1].startswith(f"  ~ ECDS {ECDS_NAME}  (")
    assert out[2].strip().startswith("typed_config.providers.idp.local_jwks.inline_string: ")
    assert out[-1] == "1 changed, 0 added, 0 removed"
