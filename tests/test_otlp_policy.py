"""``access_log.otlp``: what loads, what is refused (plaintext off the host, in any spelling),
and what Envoy gets (an OpenTelemetry access logger beside the file, the collector's
Cluster). The records themselves, through a real Envoy, are in tests/test_siem.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_policy_tls import errors_of, folder_with, listener_json, load, policy

from xdsplane.render import snapshot_to_json

OTLP_LOGGER = "envoy.access_loggers.open_telemetry"


def with_otlp(otlp: str) -> str:
    return policy("{}", access_log=f"{{path: /dev/stdout, otlp: {otlp}}}")


def loggers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    chain = resource["filter_chains"][0]
    hcm = chain["filters"][0]["typed_config"]
    found: list[dict[str, Any]] = hcm.get("access_log", [])
    return found


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.5:4317",
        "0.0.0.0:4317",
        "collector.internal:4317",
        "127.0.0.1.nip.io:4317",
        "[::ffff:127.0.0.1]:4317",
        "[::]:4317",
    ],
)
def test_plaintext_to_a_collector_off_the_host_is_refused(address: str, tmp_path: Path) -> None:
    folder = folder_with(tmp_path, with_otlp(f'{{address: "{address}"}}'))
    errors = errors_of(folder)
    assert len(errors) == 1, errors
    assert "edge.yaml:17:" in errors[0], errors  # the line of access_log
    assert "without TLS" in errors[0] and "otlp.tls" in errors[0], errors


@pytest.mark.parametrize("address", ["127.0.0.1:4317", "localhost:4317", "[::1]:4317"])
def test_plaintext_to_a_loopback_collector_loads(address: str, tmp_path: Path) -> None:
    snaps = load(folder_with(tmp_path, with_otlp(f'{{address: "{address}"}}')))
    names = [log["name"] for log in loggers(listener_json(snaps))]
    assert names == ["envoy.access_loggers.file", OTLP_LOGGER], names


def test_tls_to_a_remote_collector_loads_with_the_upstream_tls(tmp_path: Path) -> None:
    otlp = '{address: "collector.internal:4317", log_name: edge, tls: {ca: ca, sni: collector}}'
    snaps = load(folder_with(tmp_path, with_otlp(otlp)))
    rendered = snapshot_to_json(snaps.groups[0].snapshot)
    clusters = {r["name"]: r["resource"] for r in rendered["CDS"]["resources"]}
    otlp_cluster = clusters["xdsplane-otlp"]
    assert otlp_cluster["type"] == "STRICT_DNS"
    tls = otlp_cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "collector"
    config = loggers(listener_json(snaps))[1]["typed_config"]
    common = config["common_config"]
    assert common["log_name"] == "edge"
    assert common["grpc_service"]["envoy_grpc"]["cluster_name"] == "xdsplane-otlp"
    keys = {kv["key"] for kv in config["attributes"]["values"]}
    assert {"jwt_sub", "jti_hash", "guard_reason", "client_cert_fingerprint", "details"} <= keys


def test_a_missing_tls_secret_is_named(tmp_path: Path) -> None:
    otlp = '{address: "collector.internal:4317", tls: {ca: nope}}'
    errors = errors_of(folder_with(tmp_path, with_otlp(otlp)))
    assert any("no secret named 'nope'" in e for e in errors), errors


def test_the_handshake_log_goes_to_the_collector_too(tmp_path: Path) -> None:
    snaps = load(folder_with(tmp_path, with_otlp('{address: "127.0.0.1:4317"}')))
    names = [log["name"] for log in listener_json(snaps)["access_log"]]
    assert names == ["envoy.access_loggers.file", OTLP_LOGGER], names


def test_without_otlp_no_collector_cluster(tmp_path: Path) -> None:
    snaps = load(folder_with(tmp_path, policy("{}", access_log="{path: /dev/stdout}")))
    rendered = snapshot_to_json(snaps.groups[0].snapshot)
    assert "xdsplane-otlp" not in {r["name"] for r in rendered["CDS"]["resources"]}
    assert [log["name"] for log in loggers(listener_json(snaps))] == ["envoy.access_loggers.file"]


def test_the_collector_cluster_name_is_reserved(tmp_path: Path) -> None:
    text = with_otlp('{address: "127.0.0.1:4317"}').replace(
        "upstreams:\n  web:", "upstreams:\n  xdsplane-otlp:"
    )
    text = text.replace("upstream: web}", "upstream: xdsplane-otlp}")
    errors = errors_of(folder_with(tmp_path, text))
    assert any("'xdsplane-otlp' is taken by the OTLP collector's cluster" in e for e in errors), (
        errors
    )
