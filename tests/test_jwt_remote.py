"""A JWT provider's key set from a remote JWKS URL (``jwks_uri``): the policy keys, the
translation, and a real Envoy fetching the set from JWKS servers this test runs.

The gateway has three providers, each with its own signing key and its own JWKS server on
127.0.0.1: ``plain`` (http://), ``secure`` (https://, certificate from the CA the policy
names in ``ca``), ``untrusted`` (https://, certificate from another CA) and ``misnamed``
(https://, certificate from that CA but for another name): Envoy must refuse the last two
servers, so even a token signed by the key they serve is refused.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import json_format
from harness import (
    HOST,
    Envoy,
    ProcessGroup,
    ThreadedHttpServer,
    Upstream,
    XdsServer,
    bearer,
    exchange,
    free_port,
    send_body,
    wait_until,
)
from tls_helpers import attach_to_report, process_group

from xdsplane import jwt, pki
from xdsplane.config.errors import ConfigErrors
from xdsplane.pipeline import FolderLoader
from xdsplane.policy.translate import jwt as jwt_translate
from xdsplane.types import ResourceType

POLICY = """\
nodes: ["edge-*"]
jwt_providers:
  plain:
    issuer: https://idp.example.com
    audiences: [billing]
    jwks_uri: http://127.0.0.1:{plain}/.well-known/jwks.json
    jwks_cache: 1h
    jwks_timeout: 2s
  secure:
    issuer: https://idp.example.com
    audiences: [billing]
    jwks_uri: https://127.0.0.1:{secure}/.well-known/jwks.json
    ca: jwks-ca
  untrusted:
    issuer: https://idp.example.com
    audiences: [billing]
    jwks_uri: https://127.0.0.1:{untrusted}/.well-known/jwks.json
    ca: jwks-ca
  rotating:
    issuer: https://idp.example.com
    audiences: [billing]
    jwks_uri: http://127.0.0.1:{rotating}/jwks
    jwks_cache: 2s
  misnamed:
    issuer: https://idp.example.com
    audiences: [billing]
    jwks_uri: https://127.0.0.1:{misnamed}/.well-known/jwks.json
    ca: jwks-ca
secrets:
  jwks-ca: {{ca: ../pki/jwks-ca.crt}}
listeners:
  - name: http
    address: 127.0.0.1:{port}
    hosts:
      - name: api
        domains: ["*"]
        routes:
          - {{name: healthz, path: /healthz, direct_response: {{status: 200, body: "ok"}}}}
          - {{name: plain, prefix: /plain/, jwt: plain, upstream: app}}
          - {{name: secure, prefix: /secure/, jwt: secure, upstream: app}}
          - {{name: untrusted, prefix: /untrusted/, jwt: untrusted, upstream: app}}
          - {{name: misnamed, prefix: /misnamed/, jwt: misnamed, upstream: app}}
          - {{name: rotating, prefix: /rotating/, jwt: rotating, upstream: app}}
upstreams:
  app: {{endpoints: ["127.0.0.1:{upstream}"]}}
"""


class JwksServer(ThreadedHttpServer):
    """Serves a key set (``jwks``, replaceable) at any path and counts the GETs; https when
    given a context."""

    def __init__(self, jwks: bytes, tls: ssl.SSLContext | None = None) -> None:
        self.fetches: list[str] = []
        self.jwks = jwks
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.fetches.append(self.path)
                send_body(self, outer.jwks, "application/json")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler, tls=tls)


def server_context(certs: Path, name: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / f"{name}.crt", certs / f"{name}.key")
    return ctx


@dataclass
class Gateway:
    port: int
    envoy: Envoy
    group: ProcessGroup
    keys: dict[str, ec.EllipticCurvePrivateKey]
    servers: dict[str, JwksServer] = field(default_factory=dict)

    def get(self, path: str, token: str | None = None) -> tuple[int, str]:
        r = exchange(http.client.HTTPConnection(HOST, self.port, timeout=5), path, bearer(token))
        return r.status, r.body.decode(errors="replace")

    def token(self, provider: str) -> str:
        return jwt.sign(self.keys[provider], jwt.claims("alice"))


# The module's processes serve 16 tests, ~60 s together on a busy 2-core machine; 10 minutes
# covers a machine many times slower (start-up included) before the watchdog kills them.
MODULE_SECONDS = 600.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("jwtremote")
    certs = root / "pki"
    pki.issue(certs, "jwks-ca", None, days=30)
    pki.issue(certs, "jwks", "jwks-ca", dns=["127.0.0.1"], usage=["server"])
    pki.issue(certs, "rogue-ca", None, days=30)
    pki.issue(certs, "rogue", "rogue-ca", dns=["127.0.0.1"], usage=["server"])
    pki.issue(certs, "other", "jwks-ca", dns=["other.example.com"], usage=["server"])
    keys = {n: jwt.new_key() for n in ("plain", "secure", "untrusted", "misnamed", "rotating")}
    servers = {
        "plain": JwksServer(jwt.jwks(keys["plain"])),
        "secure": JwksServer(jwt.jwks(keys["secure"]), server_context(certs, "jwks")),
        "untrusted": JwksServer(jwt.jwks(keys["untrusted"]), server_context(certs, "rogue")),
        "misnamed": JwksServer(jwt.jwks(keys["misnamed"]), server_context(certs, "other")),
        "rotating": JwksServer(jwt.jwks(keys["rotating"])),
    }
    app = Upstream("app")
    folder = root / "policy"
    folder.mkdir()
    port = free_port()
    (folder / "edge.yaml").write_text(
        POLICY.format(port=port, upstream=app.port, **{n: s.port for n, s in servers.items()})
    )
    try:
        with process_group(root / "logs", max_seconds=MODULE_SECONDS) as group:
            server = XdsServer(group, folder).start()
            envoy = Envoy(group, root, "edge-1", server.xds_address).start()
            gw = Gateway(port, envoy, group, keys, servers)
            wait_until(lambda: gw.get("/healthz")[0] == 200, 20, what="the gateway answers")
            yield gw
    finally:
        app.close()
        for s in servers.values():
            s.close()


@pytest.fixture(autouse=True)
def _report(request: pytest.FixtureRequest) -> None:
    if "gateway" in request.fixturenames:
        attach_to_report(request, request.getfixturevalue("gateway").group)


@pytest.mark.envoy
@pytest.mark.parametrize("provider", ["plain", "secure"])
def test_envoy_fetches_the_remote_key_set_and_checks_tokens_with_it(
    gateway: Gateway, provider: str
) -> None:
    server = gateway.servers[provider]
    wait_until(lambda: server.fetches, 20, what=f"Envoy fetches the {provider} JWKS")
    assert server.fetches[0] == "/.well-known/jwks.json"
    path = f"/{provider}/x"
    token = gateway.token(provider)
    # The fetch is asynchronous: the first request may race it. Poll, bounded.
    wait_until(lambda: gateway.get(path, token)[0] == 200, 10, what="the served key is used")
    assert gateway.get(path, jwt.sign(jwt.new_key(), jwt.claims("alice")))[0] == 401
    other = "secure" if provider == "plain" else "plain"
    assert gateway.get(path, gateway.token(other))[0] == 401  # another provider's key
    assert gateway.get(path)[0] == 401


@pytest.mark.envoy
@pytest.mark.parametrize(
    ("provider", "failure"),
    [("untrusted", "fail_verify_error"), ("misnamed", "fail_verify_san")],
)
def test_a_jwks_server_not_vouched_for_is_not_trusted(
    gateway: Gateway, provider: str, failure: str
) -> None:
    """A certificate from another CA, or from the right CA for another name: Envoy drops
    the connection, never fetches, and the provider's tokens are refused."""
    stat = f"cluster.xdsplane-jwks-{provider}.ssl.{failure}"
    wait_until(lambda: gateway.envoy.stat(stat) > 0, 20, what=stat)
    assert gateway.servers[provider].fetches == []
    assert gateway.get(f"/{provider}/x", gateway.token(provider))[0] == 401


@pytest.mark.envoy
def test_a_rotated_remote_key_set_is_used_once_the_cache_expires(gateway: Gateway) -> None:
    """jwks_cache 2s: a new set at the URL reaches Envoy on its next fetch, with no push."""
    server = gateway.servers["rotating"]
    old = gateway.token("rotating")
    wait_until(lambda: gateway.get("/rotating/x", old)[0] == 200, 20, what="the first set")
    new_key = jwt.new_key()
    new = jwt.sign(new_key, jwt.claims("alice"))
    assert gateway.get("/rotating/x", new)[0] == 401
    fetched = len(server.fetches)
    server.jwks = jwt.jwks(new_key)
    wait_until(lambda: gateway.get("/rotating/x", new)[0] == 200, 15, what="the new set")
    assert len(server.fetches) > fetched  # Envoy fetched again on its own schedule
    assert gateway.get("/rotating/x", old)[0] == 401  # the old key is gone from the set


# -- the policy and its translation ---------------------------------------------------------


def as_dict(resource: Any) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(
        resource.message, preserving_proto_field_name=True
    )
    return out


def load(tmp_path: Path, text: str) -> Any:
    folder = tmp_path / "policy"
    folder.mkdir(exist_ok=True)
    (folder / "edge.yaml").write_text(text)
    return FolderLoader(folder).load()


BASE = """\
jwt_providers:
  idp:
    issuer: https://idp.example.com
    audiences: [billing]
{provider}
listeners:
  - name: http
    address: 127.0.0.1:8080
    hosts:
      - name: api
        domains: ["*"]
        routes: [{{prefix: /, jwt: idp, upstream: api}}]
upstreams:
  api: {{endpoints: ["10.0.0.1:80"]}}
{extra}"""


def test_jwks_uri_translates_to_remote_jwks_and_a_cluster(tmp_path: Path) -> None:
    pki.issue(tmp_path, "ca", None, days=30)
    provider = "    jwks_uri: https://idp.example.com:8443/jwks\n    ca: idp-ca\n"
    extra = "secrets:\n  idp-ca: {ca: ../ca.crt}\n"
    snapshot = load(tmp_path, BASE.format(provider=provider, extra=extra)).groups[0].snapshot
    (ecds,) = snapshot.resources[ResourceType.EXTENSION].values()
    cfg: dict[str, Any] = as_dict(ecds)["typed_config"]
    p = cfg["providers"]["idp"]
    assert "local_jwks" not in p
    remote = p["remote_jwks"]
    assert remote["http_uri"] == {
        "uri": "https://idp.example.com:8443/jwks",
        "cluster": "xdsplane-jwks-idp",
        "timeout": "5s",
    }
    assert remote["cache_duration"] == "300s"  # Envoy's default, written out
    assert remote["async_fetch"]["fast_listener"] is True
    assert remote["retry_policy"]["num_retries"] == jwt_translate.JWKS_RETRIES
    c = as_dict(snapshot.resources[ResourceType.CLUSTER]["xdsplane-jwks-idp"])
    assert c["type"] == "LOGICAL_DNS"
    sa = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert sa["socket_address"] == {"address": "idp.example.com", "port_value": 8443}
    tls = c["transport_socket"]["typed_config"]
    assert tls["sni"] == "idp.example.com"
    combined = tls["common_tls_context"]["combined_validation_context"]
    assert combined["validation_context_sds_secret_config"]["name"] == "idp-ca"
    (san,) = combined["default_validation_context"]["match_typed_subject_alt_names"]
    assert san == {"san_type": "DNS", "matcher": {"exact": "idp.example.com"}}


def test_plain_http_jwks_uri_on_an_ip_is_a_static_cluster_without_tls(tmp_path: Path) -> None:
    provider = "    jwks_uri: http://10.1.2.3/jwks\n    jwks_cache: 30s\n"
    snapshot = load(tmp_path, BASE.format(provider=provider, extra="")).groups[0].snapshot
    c = as_dict(snapshot.resources[ResourceType.CLUSTER]["xdsplane-jwks-idp"])
    assert c["type"] == "STATIC" and "transport_socket" not in c
    sa = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert sa["socket_address"] == {"address": "10.1.2.3", "port_value": 80}
    (ecds,) = snapshot.resources[ResourceType.EXTENSION].values()
    remote = as_dict(ecds)["typed_config"]["providers"]["idp"]["remote_jwks"]
    assert remote["cache_duration"] == "30s"


@pytest.mark.parametrize(
    ("provider", "extra", "line", "message"),
    [
        ("", "", 3, "give one of jwks_file, jwks_uri"),
        (
            "    jwks_file: jwks.json\n    jwks_uri: http://x/jwks\n",
            "",
            3,
            "give only one of jwks_file, jwks_uri",
        ),
        ("    jwks_uri: ftp://x/jwks\n", "", 5, "must start with http:// or https://"),
        ("    jwks_uri: http://x:0/jwks\n", "", 5, "needs a host"),
        ("    jwks_uri: https://x/jwks\n", "", 3, "jwks_uri is https: give ca"),
        ("    jwks_uri: http://x/jwks\n    ca: c\n", "", 3, "there is no TLS to verify"),
        (
            "    jwks_file: jwks.json\n    jwks_cache: 1m\n",
            "",
            3,
            "jwks_cache: only with jwks_uri",
        ),
        (
            "    jwks_uri: https://x/jwks\n    ca: nope\n",
            "",
            6,
            "no secret named 'nope'",
        ),
        (
            "    jwks_uri: http://x/jwks\n",
            '  xdsplane-jwks-idp: {endpoints: ["10.0.0.2:80"]}\n',
            5,
            "upstream 'xdsplane-jwks-idp'",
        ),
    ],
)
def test_bad_jwks_uri_settings_are_located_errors(
    tmp_path: Path, provider: str, extra: str, line: int, message: str
) -> None:
    text = BASE.format(provider=provider, extra="")
    if extra:
        text = text.replace(
            '  api: {endpoints: ["10.0.0.1:80"]}\n', '  api: {endpoints: ["10.0.0.1:80"]}\n' + extra
        )
        text = text.replace(
            "upstream: api}", "upstream: api}, {prefix: /x, upstream: xdsplane-jwks-idp}"
        )
    with pytest.raises(ConfigErrors) as e:
        load(tmp_path, text)
    found = [str(err) for err in e.value.errors]
    assert any(f"edge.yaml:{line}:" in f and message in f for f in found), found
