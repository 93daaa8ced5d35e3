from __future__ import annotations
import http.client, json
from pathlib import Path
import pytest
from harness import HOST, ProcessGroup, envoy_binary, free_port, http_get, wait_until
from tls_helpers import TlsConnection, client_context
from xdsplane import jwt, pki
import test_ext_authz_http_envoy as t

@pytest.mark.envoy
def test_scratch(procs: ProcessGroup, tmp_path: Path) -> None:
    certs = tmp_path / "certs"; pki.init(certs)
    key = jwt.new_key(); kid = jwt.kid(key)
    capture = t.Capture()
    try:
        ports = {n: free_port() for n in ("plain", "strip", "tls", "bare", "admin")}
        cfg = t.bootstrap(certs, jwt.jwks(key).decode(), ports, capture.port)
        for l in cfg["static_resources"]["listeners"]:
            hcm = l["filter_chains"][0]["filters"][0]["typed_config"]
            for f in hcm["http_filters"]:
                if f["name"] == "envoy.filters.http.ext_authz":
                    f["typed_config"]["http_service"]["authorization_request"] = {"headers_to_add": [
                        {"key": "x-g-payload", "value": "%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:jwt_payload)%"},
                        {"key": "x-g-cert", "value": "%DOWNSTREAM_PEER_CERT%"},
                        {"key": "x-g-fp", "value": "%DOWNSTREAM_PEER_FINGERPRINT_256%"},
                        {"key": "x-g-serial", "value": "%DOWNSTREAM_PEER_SERIAL%"},
                    ]}
        config = tmp_path / "envoy.json"; config.write_text(json.dumps(cfg))
        argv = [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--concurrency", "1", "--log-level", "warning", "--base-id", str(ports["admin"])]
        envoy = procs.spawn("envoy-scratch", argv, max_seconds=90).start()
        wait_until(lambda: (envoy.ensure_alive(), http_get(ports["admin"], "/ready").status == 200)[1], 30, what="ready")
        real = jwt.sign(key, jwt.claims("alice", jti="real-jti"), kid)
        def get(path, probe, headers):
            c = http.client.HTTPConnection(HOST, ports["plain"], timeout=5)
            c.request("GET", path, headers={t.PROBE: probe, **headers}); r = c.getresponse(); r.read(); c.close(); return r.status
        print(get("/req/x", "a", {"Authorization": f"Bearer {real}", "x-g-payload": "forged"}))
        print(get("/opt/x", "b", {"x-g-payload": "forged", "x-g-cert": "forged"}))
        ctx = client_context(certs, "alice", ca="service-ca")
        c = TlsConnection(ports["tls"], ctx, "localhost"); c.request("GET", "/opt/x", headers={t.PROBE: "c", "x-g-cert": "forged"}); r = c.getresponse(); r.read(); c.close(); print(r.status)
        ctx = client_context(certs, None, ca="service-ca")
        c = TlsConnection(ports["tls"], ctx, "localhost"); c.request("GET", "/opt/x", headers={t.PROBE: "d", "x-g-cert": "forged"}); r = c.getresponse(); r.read(); c.close(); print(r.status)
        for p in "abcd":
            print(p, capture.by_probe(p)["headers"])
    finally:
        capture.close()
