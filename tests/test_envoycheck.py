"""Envoy's own verdict: `xdsplane validate --envoy` and `serve --envoy-validate`.

The policies here pass xdsplane's checks; some hold something a real Envoy 1.40 refuses
(a regex whose RE2 program is over Envoy's size limit, a health check without an interval,
a secret that is not PEM), and the tests check that the complaint is reported against the
policy file and line it came from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from xdsplane import cli, envoycheck
from xdsplane.cache import SnapshotCache
from xdsplane.envoycheck import EnvoyChecker, bootstrap_json, clean_message, find_envoy
from xdsplane.pipeline import FolderLoader
from xdsplane.snapshot import NodeGroup, Snapshot, SnapshotSet, make_resource
from xdsplane.types import ResourceType
from xdsplane.watch import Reloader

ENVOY = find_envoy()
F = TypeVar("F", bound=Callable[..., Any])


def needs_envoy(test: F) -> F:
    """Marks a test that runs a real Envoy (conftest: skipped without Envoy 1.40, failed
    when XDSPLANE_REQUIRE_ENVOY=1)."""
    return pytest.mark.envoy(test)  # type: ignore[no-any-return]


GOOD = """\
listeners:
  - name: http
    address: 127.0.0.1:10000
    hosts:
      - name: web
        domains: ["*"]
        routes:
          - {prefix: /, upstream: web}
upstreams:
  web: {endpoints: [127.0.0.1:8081]}
"""

# A valid RE2 regex, but its compiled program (155) is over Envoy's default limit of 100.
BIG_REGEX = GOOD.replace("{prefix: /, upstream: web}", '{regex: "/(a|b){50}", upstream: web}')
REGEX_REJECTED = (
    "policy.yaml:2:5: envoy rejects route configuration 'http'{scope}: regex '/(a|b){{50}}' RE2 "
    "program size of "
)

# A raw cluster protobuf accepts, but whose health check lacks the required interval.
BAD_HEALTH_CHECK = (
    GOOD
    + """\
resources:
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: extra
    type: STATIC
    connect_timeout: 1s
    health_checks: [{timeout: 1s}]
"""
)

FAKE_KEY = "-----BEGIN PRIVATE KEY-----\nTOPSECRETKEYMATERIAL\n-----END PRIVATE KEY-----\n"


def folder(tmp_path: Path, text: str, name: str = "policy") -> Path:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "policy.yaml").write_text(text)
    return d


def load(d: Path) -> SnapshotSet:
    return FolderLoader(d).load()


# -- without Envoy ---------------------------------------------------------------------------


def test_static_bootstrap_needs_no_ads() -> None:
    """RDS inlined, EDS clusters made STATIC, SDS names the static secrets."""
    snapshots = load(Path(__file__).parent / "corpus" / "good")
    snap = snapshots.groups[-1].snapshot
    data = json.loads(bootstrap_json(snap))
    assert '"ads"' not in json.dumps(data)
    static = data["static_resources"]
    assert [s["name"] for s in static["secrets"]] == ["edge-cert"]
    billing = next(c for c in static["clusters"] if c["name"] == "billing")
    assert billing["type"] == "STATIC"
    assert "eds_cluster_config" not in billing
    assert billing["load_assignment"]["endpoints"][0]["lb_endpoints"]
    https = static["listeners"][0]
    chain = https["filter_chains"][0]
    hcm = chain["filters"][0]["typed_config"]
    assert "rds" not in hcm
    assert hcm["route_config"]["name"] == "https"
    assert hcm["route_config"]["validate_clusters"] is False
    sds = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert sds["tls_certificate_sds_secret_configs"] == [{"name": "edge-cert"}]
    assert data["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 0}


def test_messages_are_scrubbed() -> None:
    dump = (
        "error initializing configuration '/tmp/x/bootstrap.json': goo.gle/debugproto    \n"
        "static_resources {\n  secrets {\n    private_key { inline_string: "
        '"-----BEGIN PRIVATE KEY-----\\nTOPSECRET\\n-----END PRIVATE KEY-----\\n" }\n  }\n}\n'
        ": Proto constraint validation failed (BootstrapValidationError.StaticResources: "
        "embedded message failed validation | caused by StaticResourcesValidationError."
        "Clusters[0]: embedded message failed validation | caused by ClusterValidationError."
        "HealthChecks[0]: embedded message failed validation | caused by "
        "HealthCheckValidationError.Interval: value is required)\n"
    )
    msg = clean_message(dump, 1)
    assert "TOPSECRET" not in msg
    assert msg == "Cluster.health_checks[0].interval: value is required (proto constraint)"
    assert "TOPSECRET" not in clean_message(f"odd: {FAKE_KEY} and more", 1)
    assert "TOPSECRET" not in clean_message("cut: -----BEGIN PRIVATE KEY-----\nTOPSECRET", 1)


def test_validate_without_envoy_prints_a_notice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(envoycheck, "find_envoy", lambda explicit=None: None)
    assert cli.main(["validate", str(folder(tmp_path, BIG_REGEX)), "--envoy"]) == 0
    err = capsys.readouterr().err
    assert "no envoy binary" in err
    assert "ok: nodes *" in err


def test_validate_with_a_missing_envoy_binary_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = folder(tmp_path, GOOD)
    assert cli.main(["validate", str(d), "--envoy-binary", str(tmp_path / "nope")]) == 1
    assert "not found" in capsys.readouterr().err


def fake_envoy(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-envoy"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_no_verdict_is_an_error_not_a_rejection(tmp_path: Path) -> None:
    snapshots = load(folder(tmp_path, GOOD))
    silent = EnvoyChecker(fake_envoy(tmp_path, "exit 1"), label="dir")
    assert silent.check(snapshots) == [
        "dir: envoy could not check nodes *: exited with code 1 and said nothing"
    ]
    assert silent.runs == 1  # no narrowing down without a verdict


async def test_a_hanging_envoy_is_stopped(tmp_path: Path) -> None:
    snapshots = load(folder(tmp_path, GOOD))
    slow = EnvoyChecker(fake_envoy(tmp_path, "exec sleep 30"), timeout=0.3, label="dir")
    expected = ["dir: envoy could not check nodes *: no verdict within 0.3s"]
    assert slow.check(snapshots) == expected
    assert await slow.acheck(snapshots) == expected


# -- with Envoy ------------------------------------------------------------------------------


@needs_envoy
def test_good_policy_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(folder(tmp_path, GOOD)), "--envoy"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "envoy accepts" in captured.err


@needs_envoy
def test_regex_over_envoys_program_size_is_rejected_at_its_policy_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = folder(tmp_path, BIG_REGEX)
    assert cli.main(["validate", str(d)]) == 0  # our own checks let it through
    capsys.readouterr()
    assert cli.main(["validate", str(d), "--envoy"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    assert out[0].startswith(f"{d}/" + REGEX_REJECTED.format(scope=""))
    assert "> max program size of 100" in out[0]


@needs_envoy
def test_a_rejection_shared_by_node_groups_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = folder(tmp_path, BIG_REGEX)
    canary = GOOD.replace("10000", "10002").replace("web", "canary").replace("http", "canary")
    (d / "canary.yaml").write_text('nodes: ["canary-*"]\n' + canary)
    assert cli.main(["validate", str(d), "--envoy"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    assert out[0].startswith(f"{d}/" + REGEX_REJECTED.format(scope=" (for nodes canary-*; *)"))


@needs_envoy
def test_raw_cluster_envoy_refuses_is_reported_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = folder(tmp_path, BAD_HEALTH_CHECK)
    assert cli.main(["validate", str(d), "--envoy"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{d}/policy.yaml:12:5: envoy rejects cluster 'extra': "
        "Cluster.health_checks[0].interval: value is required (proto constraint)"
    ]


def _tls_snapshot(key: str) -> Snapshot:
    """A TLS listener whose certificate comes over SDS from a secret holding ``key``."""
    from google.protobuf import json_format

    listener: dict[str, Any] = {
        "name": "https",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10443}},
        "filter_chains": [
            {
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/"
                        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "common_tls_context": {
                            "tls_certificate_sds_secret_configs": [
                                {
                                    "name": "edge-cert",
                                    "sds_config": {"ads": {}, "resource_api_version": "V3"},
                                }
                            ]
                        },
                    },
                },
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                            "stat_prefix": "https",
                            "cluster": "web",
                        },
                    }
                ],
            }
        ],
    }
    cluster = {
        "name": "web",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "web"},
    }
    secret = {
        "name": "edge-cert",
        "tls_certificate": {
            "certificate_chain": {"inline_string": "-----BEGIN CERTIFICATE-----\nx\n"},
            "private_key": {"inline_string": key},
        },
    }
    from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

    del tcp_proxy_pb2, tls_pb2  # imported so that json_format resolves their @type
    resources = []
    for rtype, value, line in (
        (ResourceType.LISTENER, listener, 3),
        (ResourceType.CLUSTER, cluster, 30),
        (ResourceType.SECRET, secret, 40),
    ):
        msg = json_format.ParseDict(value, rtype.message_class())
        resources.append(make_resource(rtype, msg, f"edge.yaml:{line}"))
    return Snapshot.build(resources)


@needs_envoy
def test_bad_secret_is_blamed_and_its_key_never_shown() -> None:
    assert ENVOY is not None
    snapshot = _tls_snapshot(FAKE_KEY)
    checker = EnvoyChecker(ENVOY, label="edge")
    problems = checker.check(SnapshotSet((NodeGroup("*", None, snapshot),)))
    assert len(problems) == 1
    assert problems[0].startswith("edge.yaml:40: envoy rejects secret 'edge-cert': ")
    assert "TOPSECRET" not in problems[0]
    assert "PRIVATE KEY" not in problems[0]


@needs_envoy
def test_groups_that_passed_are_not_run_again(tmp_path: Path) -> None:
    assert ENVOY is not None
    snapshots = load(folder(tmp_path, GOOD))
    checker = EnvoyChecker(ENVOY)
    assert checker.check(snapshots) == []
    assert checker.runs == 1
    assert checker.check(load(folder(tmp_path, GOOD))) == []
    assert checker.runs == 1  # same digest: no second Envoy


@needs_envoy
async def test_reloader_refuses_a_reload_envoy_rejects(tmp_path: Path) -> None:
    assert ENVOY is not None
    d = folder(tmp_path, GOOD)
    cache = SnapshotCache()
    checker = EnvoyChecker(ENVOY, label=str(d))
    reloader = Reloader(d, cache, validator=checker.acheck)
    assert await reloader.reload("start") is True
    served = cache.current
    assert served is not None

    folder(tmp_path, BIG_REGEX)
    assert await reloader.reload("edit") is False
    assert cache.current is served
    assert len(reloader.state.errors) == 1
    assert reloader.state.errors[0].startswith(f"{d}/" + REGEX_REJECTED.format(scope=""))

    folder(tmp_path, GOOD.replace("prefix: /", "prefix: /v2/"))
    assert await reloader.reload("fix") is True
    assert cache.current is not served
    assert reloader.state.errors == []


@needs_envoy
async def test_serve_refuses_to_start_on_what_envoy_rejects(tmp_path: Path) -> None:
    from xdsplane.app import ServeOptions, StartupError, serve

    d = folder(tmp_path, BIG_REGEX)
    opts = ServeOptions(
        config=d,
        xds_address="127.0.0.1:0",
        admin_address="127.0.0.1:0",
        envoy_validate=True,
        envoy_binary=ENVOY,
    )
    with pytest.raises(StartupError) as err:
        await serve(opts)
    assert len(err.value.errors) == 1
    assert err.value.errors[0].startswith(f"{d}/" + REGEX_REJECTED.format(scope=""))
