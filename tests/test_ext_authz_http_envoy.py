"""What Envoy 1.40 sends an ext_authz server asked over HTTP (``http_service``), and what a
client can forge into it: the security facts behind BENCHMARKS.md section 10, "the HTTP
ext_authz floor", and of ``guard.transport: http`` (built on them; its end-to-end tests are
tests/test_guard_http_envoy.py).

One static Envoy (no xDS) with four listeners on free ports, an HTTP/1.1 capture server
in its ext_authz cluster (records each check request's method, path and headers, allows
everything), jwt_authn with ``forward_payload_header: x-jwt-payload`` and ``forward:
false``, ext_authz's ``allowed_headers`` = x-jwt-payload, x-forwarded-client-cert and a
probe header:

- ``plain``: jwt_authn then ext_authz; ``/req/`` requires the token, ``/opt/`` lets a
  request without one through (``allow_missing``), ``/nojwt/`` has jwt_authn disabled;
  ``/mode/`` a per-route ``http_service`` with a ``path_prefix``;
  ``/req/`` also carries route metadata and ``check_settings.context_extensions``, and the
  filter names them (``route_metadata_context_namespaces``, ``metadata_context_namespaces``);
- ``strip``: the same with a ``header_mutation`` filter first removing ``x-jwt-payload``
  (what the policy already does for ``forward_claims`` headers);
- ``bare``: no jwt_authn at all (ext_authz only), to tell whose doing a removal is;
- ``tls``: TLS with an optional client certificate and ``forward_client_cert_details:
  SANITIZE_SET``: does ``x-forwarded-client-cert`` carry the client certificate to the
  authz server, and is a client's own XFCC dropped?

Observed with Envoy 1.40.0: a client's ``x-jwt-payload`` never reaches the authz server
when the HCM has jwt_authn (replaced by the verified payload with a valid token; removed
with no token on an optional route, and on a route where jwt_authn is disabled), and is
passed on as sent when the HCM has no jwt_authn; the check request carries the original
method and path, the allowed headers, ``host``, ``content-length: 0``,
``x-envoy-internal`` and ``x-envoy-expected-rq-timeout-ms``, and nothing of route
metadata, context extensions, jwt_authn's metadata or the peer certificate (gRPC-only);
with SANITIZE_SET, XFCC carries the client certificate (URL-encoded PEM, subject, URI
SAN, hash) and replaces a client's own; without a certificate a client's XFCC is removed.
A per-route ``check_settings.http_service`` with a ``path_prefix`` reaches the server as
that prefix followed by the client's path: an Envoy-set mode a client cannot choose.

``authorization_request.headers_to_add`` takes formatters: ``%DYNAMIC_METADATA(...)%`` of
jwt_authn's payload gives the verified claims as JSON, ``%DOWNSTREAM_PEER_CERT%`` the client
certificate; either is left out when empty, and a client's header of the same name is not
forwarded (not in ``allowed_headers``). This is what ``guard.transport: http`` uses (nothing
of it reaches the upstream, unlike ``forward_payload_header`` or XFCC).

Facts are asserted as observed, so that a change in a later Envoy shows here.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from harness import (
    HOST,
    ProcessGroup,
    ThreadedHttpServer,
    envoy_binary,
    free_port,
    http_get,
    wait_until,
)
from tls_helpers import TlsConnection, client_context

from xdsplane import jwt, pki

PAYLOAD = "x-jwt-payload"
XFCC = "x-forwarded-client-cert"
# What guard.transport: http uses instead (xdsplane/policy/translate/guard.py): headers
# Envoy adds to the check request only, from formatters, never from the client.
ADDED_PAYLOAD = "x-xdsplane-jwt-payload"
ADDED_CERT = "x-xdsplane-client-cert"
PROBE = "x-client-probe"  # a client header in allowed_headers: correlates requests
ISS = jwt.DEFAULT_ISSUER
T = "type.googleapis.com/envoy."


class Capture(ThreadedHttpServer):
    """The authz server: records every check request, answers 200 with no body."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        lock = threading.Lock()
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                with lock:
                    seen.append(
                        {
                            "method": self.command,
                            "path": self.path,
                            "headers": [(k.lower(), v) for k, v in self.headers.items()],
                            "body": body,
                        }
                    )
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler, name="authz-capture")

    def by_probe(self, probe: str) -> dict[str, Any] | None:
        for r in self.seen:
            if (PROBE, probe) in r["headers"]:
                return r
        return None


def _header(record: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in record["headers"] if k == name]


def _hcm(name: str, strip: bool, tls: bool) -> dict[str, Any]:
    jwt_filter = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": T + "extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                "idp": {
                    "issuer": jwt.DEFAULT_ISSUER,
                    "from_headers": [{"name": "Authorization", "value_prefix": "Bearer "}],
                    "forward": False,
                    "forward_payload_header": PAYLOAD,
                    "payload_in_metadata": "jwt_payload",
                    "local_jwks": {"inline_string": "__JWKS__"},
                }
            },
            "requirement_map": {
                "req": {"provider_name": "idp"},
                "opt": {
                    "requires_any": {
                        "requirements": [{"provider_name": "idp"}, {"allow_missing": {}}]
                    }
                },
            },
        },
    }
    authz = {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": T + "extensions.filters.http.ext_authz.v3.ExtAuthz",
            "http_service": {
                "server_uri": {"uri": "http://authz", "cluster": "authz", "timeout": "1s"},
                "authorization_request": {
                    "headers_to_add": [
                        {
                            "key": ADDED_PAYLOAD,
                            "value": "%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:jwt_payload)%",
                        },
                        {"key": ADDED_CERT, "value": "%DOWNSTREAM_PEER_CERT%"},
                    ]
                },
            },
            "failure_mode_allow": False,
            "allowed_headers": {
                "patterns": [{"exact": PAYLOAD}, {"exact": XFCC}, {"exact": PROBE}]
            },
            # gRPC-only in the docs; named here to see whether HTTP carries any of it
            "metadata_context_namespaces": ["envoy.filters.http.jwt_authn"],
            "route_metadata_context_namespaces": ["probe.ns"],
            "include_peer_certificate": True,
        },
    }
    filters: list[dict[str, Any]] = []
    if strip:
        filters.append(
            {
                "name": "envoy.filters.http.header_mutation",
                "typed_config": {
                    "@type": T + "extensions.filters.http.header_mutation.v3.HeaderMutation",
                    "mutations": {"request_mutations": [{"remove": PAYLOAD}]},
                },
            }
        )
    filters += [
        *([] if name == "bare" else [jwt_filter]),
        authz,
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": T + "extensions.filters.http.router.v3.Router"},
        },
    ]

    def route(prefix: str, requirement: str | None, extra: dict[str, Any]) -> dict[str, Any]:
        jwt_route: dict[str, Any] = (
            {"requirement_name": requirement} if requirement else {"disabled": True}
        )
        per_filter: dict[str, Any] = {
            "envoy.filters.http.jwt_authn": {
                "@type": T + "extensions.filters.http.jwt_authn.v3.PerRouteConfig",
                **jwt_route,
            }
        }
        per_filter.update(extra)
        return {
            "match": {"prefix": prefix},
            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
            "metadata": {"filter_metadata": {"probe.ns": {"k": "route-meta"}}},
            "typed_per_filter_config": per_filter,
        }

    # a per-route http_service (CheckSettings.http_service): the same server, a path prefix
    # Envoy puts before the client's path, as a way to tell the guard the route's mode
    mode = {
        "envoy.filters.http.ext_authz": {
            "@type": T + "extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "check_settings": {
                "http_service": {
                    "server_uri": {"uri": "http://authz", "cluster": "authz", "timeout": "1s"},
                    "path_prefix": "/xdsplane-check/revocation",
                }
            },
        }
    }
    ctx_ext = {
        "envoy.filters.http.ext_authz": {
            "@type": T + "extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "check_settings": {"context_extensions": {"probe": "ctx-ext"}},
        }
    }
    hcm: dict[str, Any] = {
        "@type": T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        route("/req/", "req", ctx_ext),
                        route("/opt/", "opt", {}),
                        route("/nojwt/", None, {}),
                        route("/mode/", None, mode),
                    ],
                }
            ]
        },
        "http_filters": filters,
    }
    if tls:
        hcm["forward_client_cert_details"] = "SANITIZE_SET"
        hcm["set_current_client_cert_details"] = {"subject": True, "uri": True, "cert": True}
    return hcm


def bootstrap(certs: Path, jwks: str, ports: dict[str, int], authz_port: int) -> dict[str, Any]:
    listeners = []
    for name in ("plain", "strip", "tls", "bare"):
        chain: dict[str, Any] = {
            "filters": [
                {
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": _hcm(name, strip=name == "strip", tls=name == "tls"),
                }
            ]
        }
        if name == "tls":
            chain["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": T + "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": False,
                    "common_tls_context": {
                        "tls_certificates": [
                            {
                                "certificate_chain": {"filename": str(certs / "edge.crt")},
                                "private_key": {"filename": str(certs / "edge.key")},
                            }
                        ],
                        "validation_context": {
                            "trusted_ca": {"filename": str(certs / "client-ca.crt")}
                        },
                    },
                },
            }
        listeners.append(
            {
                "name": name,
                "address": {"socket_address": {"address": HOST, "port_value": ports[name]}},
                "filter_chains": [chain],
            }
        )
    config = {
        "admin": {"address": {"socket_address": {"address": HOST, "port_value": ports["admin"]}}},
        "static_resources": {
            "listeners": listeners,
            "clusters": [
                {
                    "name": "authz",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "authz",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": HOST,
                                                    "port_value": authz_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }
    text = json.dumps(config).replace('"__JWKS__"', json.dumps(jwks))
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _b64(claims: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()


def _payload(record: dict[str, Any]) -> dict[str, Any] | None:
    values = _header(record, PAYLOAD)
    if not values:
        return None
    assert len(values) == 1, values
    data = values[0]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    return decoded


@pytest.mark.envoy
def test_http_ext_authz_forwarded_headers(procs: ProcessGroup, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    pki.init(certs)
    key = jwt.new_key()
    kid = jwt.kid(key)
    capture = Capture()
    try:
        ports = {n: free_port() for n in ("plain", "strip", "tls", "bare", "admin")}
        config = tmp_path / "envoy.json"
        config.write_text(json.dumps(bootstrap(certs, jwt.jwks(key).decode(), ports, capture.port)))
        binary = envoy_binary()
        assert binary is not None
        argv = [binary, "-c", str(config), "--disable-hot-restart", "--concurrency", "1"]
        argv += ["--log-level", "warning", "--base-id", str(ports["admin"])]
        envoy = procs.spawn("envoy-authz-http", argv, max_seconds=90).start()

        def ready() -> bool:
            envoy.ensure_alive()
            return http_get(ports["admin"], "/ready").status == 200

        wait_until(ready, 30, what="envoy ready")

        forged = _b64({"sub": "mallory", "jti": "forged-jti", "iss": ISS})
        # the client's own copies of the headers_to_add names (not in allowed_headers)
        added = {ADDED_PAYLOAD: '{"sub": "mallory"}', ADDED_CERT: "forged-cert"}
        real = jwt.sign(key, jwt.claims("alice", jti="real-jti"), kid)

        def get(listener: str, path: str, probe: str, headers: dict[str, str]) -> int:
            conn = http.client.HTTPConnection(HOST, ports[listener], timeout=5)
            try:
                conn.request("GET", path, headers={PROBE: probe, **headers})
                r = conn.getresponse()
                r.read()
                return r.status
            finally:
                conn.close()

        def tls_get(cert: str | None, probe: str, headers: dict[str, str]) -> int:
            ctx = client_context(certs, cert, ca="service-ca")
            conn = TlsConnection(ports["tls"], ctx, "localhost")
            try:
                conn.request("GET", "/opt/x", headers={PROBE: probe, **headers})
                r = conn.getresponse()
                r.read()
                return r.status
            finally:
                conn.close()

        auth = {"Authorization": f"Bearer {real}"}
        spoof = {XFCC: "By=spoof;URI=spiffe://x/ops"}
        statuses = {
            # (a) a valid token and a forged payload header
            "a": get("plain", "/req/x", "a", {**auth, PAYLOAD: forged, **added}),
            # (b) no token on a route where the token is optional, a forged payload header
            "b": get("plain", "/opt/x", "b", {PAYLOAD: forged, **added}),
            # (c) a route where jwt_authn is disabled (ext_authz still asked)
            "c": get("plain", "/nojwt/x", "c", {PAYLOAD: forged}),
            # (d) a token that fails verification on the optional route
            "d": get("plain", "/opt/x", "d", {"Authorization": "Bearer x.y.z", PAYLOAD: forged}),
            # the same three with a header_mutation removing x-jwt-payload first
            "a-strip": get("strip", "/req/x", "a-strip", {**auth, PAYLOAD: forged}),
            "b-strip": get("strip", "/opt/x", "b-strip", {PAYLOAD: forged}),
            "c-strip": get("strip", "/nojwt/x", "c-strip", {PAYLOAD: forged}),
            # (e) no jwt_authn filter in the HCM at all: does ext_authz pass it on?
            "e": get("bare", "/nojwt/x", "e", {PAYLOAD: forged, **added}),
            # a per-route http_service with a path prefix (the route's mode)
            "mode": get("plain", "/mode/x?y=1", "mode", {}),
            # XFCC: a client's own on plaintext (the HCM's default, SANITIZE)
            "xfcc-plain": get("plain", "/opt/x", "xfcc-plain", spoof),
            # SANITIZE_SET over TLS, with a client certificate and without one
            "xfcc-cert": tls_get("alice", "xfcc-cert", {**spoof, **added}),
            "xfcc-none": tls_get(None, "xfcc-none", {**spoof, **added}),
        }
        seen = {probe: capture.by_probe(probe) for probe in statuses}
        for probe, status in statuses.items():
            record = seen[probe]
            shown = "(not asked)" if record is None else json.dumps(record["headers"])
            print(f"{probe}: HTTP {status}; authz got {shown}")

        def got(probe: str) -> dict[str, Any]:
            record = seen[probe]
            assert record is not None, (probe, statuses[probe])
            return record

        assert all(v == 200 for k, v in statuses.items() if k != "d"), statuses
        # (a) replaced by the verified payload
        assert (_payload(got("a")) or {}).get("jti") == "real-jti"
        assert (_payload(got("a-strip")) or {}).get("jti") == "real-jti"
        # (b) removed: jwt_authn drops the header it would forward even when no token
        # came (Envoy 1.40), so the client's bytes never reach the authz server
        assert _payload(got("b")) is None and _payload(got("b-strip")) is None
        # (c) jwt_authn disabled on the route: removed all the same
        assert _payload(got("c")) is None and _payload(got("c-strip")) is None
        # (e) an HCM without jwt_authn: ext_authz passes the client's header on as it is
        assert _payload(got("e")) == {"sub": "mallory", "jti": "forged-jti", "iss": ISS}
        # (d) a bad token on the optional route: 401 from jwt_authn, authz never asked
        assert statuses["d"] == 401 and seen["d"] is None

        # What else the HTTP check request carries: the original method and path, the
        # allowed headers, a few Envoy adds; no route metadata, no context extensions, no
        # jwt_authn metadata, no peer certificate (those are gRPC CheckRequest fields).
        a = got("a")
        assert a["method"] == "GET" and a["path"] == "/req/x", a
        text = json.dumps(a["headers"])
        for absent in ("ctx-ext", "route-meta", "probe.ns", "BEGIN CERTIFICATE"):
            assert absent not in text, (absent, a["headers"])

        # the per-route path prefix: Envoy's prefix, then the client's path and query
        assert got("mode")["path"] == "/xdsplane-check/revocation/mode/x?y=1", got("mode")

        # XFCC: the client's own dropped on plaintext; set by Envoy from the certificate
        # with SANITIZE_SET (the client's replaced), removed without a certificate
        assert _header(got("xfcc-plain"), XFCC) == []
        (value,) = _header(got("xfcc-cert"), XFCC)
        assert "URI=spiffe://example.com/ops/alice" in value and "Cert=" in value, value
        assert "spoof" not in value, value
        assert _header(got("xfcc-none"), XFCC) == []

        # headers_to_add with formatters (what guard.transport: http relies on): the
        # verified payload as JSON from jwt_authn's metadata, the peer certificate as
        # URL-encoded PEM; absent (no token, no certificate, no jwt_authn) -> not added; a
        # client's own copy of either never reaches the authz server
        (payload,) = _header(got("a"), ADDED_PAYLOAD)
        assert json.loads(payload)["jti"] == "real-jti", payload
        for probe in ("b", "e", "xfcc-cert", "xfcc-none"):
            assert _header(got(probe), ADDED_PAYLOAD) == [], probe
        (cert,) = _header(got("xfcc-cert"), ADDED_CERT)
        assert cert.startswith("-----BEGIN%20CERTIFICATE-----"), cert
        for probe in ("a", "b", "e", "xfcc-none"):
            assert _header(got(probe), ADDED_CERT) == [], probe
    finally:
        capture.close()
