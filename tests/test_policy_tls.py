"""The TLS floor for PCI (docs/policy.md, "The TLS floor"): what an attacker, or a careless
edit, would try to slip past it, and what ``allow_legacy_tls`` lets through with a warning.

- ``min_version`` below 1.2 on a listener's or an upstream's ``tls`` is refused at load, at
  the line of ``min_version``;
- a cipher suite without forward secrecy or without AEAD is refused at the line of its
  entry, under any name Envoy accepts for it (BoringSSL's, IANA's, inside a group);
- names Envoy would accept but that are not one suite (OpenSSL rules such as ALL, lists
  joined with ':') and TLS 1.3 suites are refused;
- ``allow_legacy_tls: true`` loads them, with a located warning from ``validate`` and in
  ``serve``'s log at every load;
- TLS listeners log failed handshakes to the access log's file (the real-Envoy side is
  tests/test_tls_e2e.py::test_failed_handshakes_are_logged_with_their_reason).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from harness import ProcessGroup, XdsServer, wait_until, write_atomic
from test_policy_corpus import run_cli, write_certificate

from xdsplane.config.errors import ConfigErrors
from xdsplane.pipeline import FolderLoader
from xdsplane.policy import ciphers
from xdsplane.render import snapshot_to_json
from xdsplane.snapshot import SnapshotSet

LEGACY = [s for s in ciphers.SUITES if s.legacy]
MODERN = [s for s in ciphers.SUITES if not s.legacy]


def policy(tls: str, upstream_tls: str = "", access_log: str = "{}") -> str:
    """One TLS listener whose ``tls:`` is the flow mapping ``tls`` (line 7), and an
    upstream whose ``tls:`` is ``upstream_tls`` (line 16; default: ``{ca: ca}``)."""
    text = f"""secrets:
  edge: {{certificate: edge.crt, private_key: edge.key}}
  ca: {{ca: ca.crt}}
listeners:
  - name: https
    address: 127.0.0.1:8443
    tls: {tls}
    hosts:
      - name: web
        domains: [example.com]
        certificate: edge
        routes: [{{prefix: /, upstream: web}}]
upstreams:
  web:
    endpoints: [127.0.0.1:9443]
    tls: {upstream_tls or "{ca: ca}"}
access_log: {access_log}
"""
    return text


def folder_with(root: Path, text: str, name: str = "edge.yaml") -> Path:
    folder = root / "policy"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "edge.crt").exists():
        write_certificate(folder / "edge.crt", folder / "edge.key", ["example.com"])
        write_certificate(folder / "ca.crt", None, ["test CA"])
    (folder / name).write_text(text)
    return folder


def load(folder: Path) -> SnapshotSet:
    return FolderLoader(folder).load()


def errors_of(folder: Path) -> list[str]:
    with pytest.raises(ConfigErrors) as e:
        load(folder)
    return [str(x) for x in e.value.errors]


def listener_json(snapshots: SnapshotSet, name: str = "https") -> dict[str, Any]:
    rendered = snapshot_to_json(snapshots.groups[0].snapshot)
    found = [r for r in rendered["LDS"]["resources"] if r["name"] == name]
    assert len(found) == 1, rendered["LDS"]
    resource: dict[str, Any] = found[0]["resource"]
    return resource


# -- TLS versions -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_listener_below_tls_1_2_is_refused_at_the_line_of_min_version(
    version: str, tmp_path: Path
) -> None:
    folder = folder_with(tmp_path, policy(f'{{min_version: "{version}", max_version: "1.3"}}'))
    (error,) = errors_of(folder)
    assert error.startswith(f"{folder}/edge.yaml:7:24: min_version {version}: "), error
    assert "listener 'https'" in error and "allow_legacy_tls: true" in error, error


def test_max_version_below_1_2_is_refused_too(tmp_path: Path) -> None:
    """A ``max_version`` of 1.1 needs a ``min_version`` at most 1.1: the same refusal."""
    folder = folder_with(tmp_path, policy('{min_version: "1.0", max_version: "1.1"}'))
    (error,) = errors_of(folder)
    assert ":7:24: min_version 1.0: " in error, error


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_upstream_below_tls_1_2_is_refused(version: str, tmp_path: Path) -> None:
    folder = folder_with(tmp_path, policy("{}", f'{{ca: ca, min_version: "{version}"}}'))
    (error,) = errors_of(folder)
    assert f"/edge.yaml:16:32: min_version {version}: upstream 'web' " in error, error


def test_allow_legacy_tls_on_the_listener_does_not_cover_its_upstream(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path,
        policy('{min_version: "1.1", allow_legacy_tls: true}', '{ca: ca, min_version: "1.1"}'),
    )
    (error,) = errors_of(folder)
    assert "upstream 'web'" in error, error


# -- cipher suites ----------------------------------------------------------------------------


@pytest.mark.parametrize("suite", LEGACY, ids=lambda s: s.name)
def test_every_legacy_suite_is_refused_under_each_of_its_names(
    suite: ciphers.Suite, tmp_path: Path
) -> None:
    for i, spelled in enumerate(
        [suite.name, suite.iana, f"[ECDHE-ECDSA-AES128-GCM-SHA256|{suite.name}]"]
    ):
        folder = folder_with(
            tmp_path / str(i),
            policy(f'{{cipher_suites: [ECDHE-ECDSA-AES128-GCM-SHA256, "{spelled}"]}}'),
        )
        (error,) = errors_of(folder)
        assert f"/edge.yaml:7:58: cipher_suites: {suite.name}" in error, error
        assert suite.weakness() in error, error


def test_legacy_suites_are_the_ones_without_forward_secrecy_or_aead() -> None:
    """The examples of the rule, by name: static RSA (even with GCM) and CBC (even with
    ECDHE) are legacy; ECDHE with GCM or CHACHA20-POLY1305 is not."""
    legacy = {s.name for s in LEGACY}
    assert {"AES128-SHA", "AES256-GCM-SHA384", "ECDHE-RSA-AES128-SHA", "DES-CBC3-SHA"} <= legacy
    assert {s.name for s in MODERN} == {
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-PSK-CHACHA20-POLY1305",
    }


@pytest.mark.parametrize(
    ("spelled", "says"),
    [
        ("aes128-sha", "unknown cipher suite 'aes128-sha'; did you mean 'AES128-SHA'?"),
        ("ALL", "unknown cipher suite 'ALL'"),
        ("HIGH", "unknown cipher suite 'HIGH'"),
        ("kRSA", "unknown cipher suite 'kRSA'"),
        ("!aNULL", "unknown cipher suite '!aNULL'"),
        ("ECDHE-ECDSA-AES128-GCM-SHA256:AES128-SHA", "(one suite per list entry)"),
        ("[ECDHE-ECDSA-AES128-GCM-SHA256|ALL]", "unknown cipher suite 'ALL'"),
        ("RC4-SHA", "unknown cipher suite 'RC4-SHA'"),
        ("DHE-RSA-AES128-GCM-SHA256", "unknown cipher suite 'DHE-RSA-AES128-GCM-SHA256'"),
        ("TLS_AES_128_GCM_SHA256", "TLS 1.3 suites are not configurable in Envoy"),
        ("", "an empty cipher suite name"),
    ],
)
def test_names_that_are_not_one_known_suite_are_refused(
    spelled: str, says: str, tmp_path: Path
) -> None:
    """Envoy would take ALL, HIGH, kRSA and 'A:B' (OpenSSL rules), letting weak suites in."""
    folder = folder_with(tmp_path, policy(f'{{cipher_suites: ["{spelled}"]}}'))
    (error,) = errors_of(folder)
    assert "/edge.yaml:7:27: cipher_suites: " in error and says in error, error


def test_modern_suites_load_as_written_without_warnings(tmp_path: Path) -> None:
    names = [s.name for s in MODERN] + [
        MODERN[0].iana,
        "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]",
    ]
    folder = folder_with(tmp_path, policy(json.dumps({"cipher_suites": names})))
    snapshots = load(folder)
    assert snapshots.warnings == ()
    chain = listener_json(snapshots)["filter_chains"][0]
    params = chain["transport_socket"]["typed_config"]["common_tls_context"]["tls_params"]
    assert params["cipher_suites"] == names


# -- allow_legacy_tls: loads, with warnings ---------------------------------------------------

ALLOWED = (
    '{min_version: "1.1", cipher_suites: [ECDHE-ECDSA-AES128-GCM-SHA256, ECDHE-ECDSA-AES128-SHA],'
    " allow_legacy_tls: true}"
)


def test_allow_legacy_tls_loads_and_translates_what_it_allows(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, policy(ALLOWED))
    snapshots = load(folder)
    chain = listener_json(snapshots)["filter_chains"][0]
    params = chain["transport_socket"]["typed_config"]["common_tls_context"]["tls_params"]
    assert params["tls_minimum_protocol_version"] == "TLSv1_1"
    assert params["cipher_suites"] == ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-SHA"]
    warnings = [str(w) for w in snapshots.warnings]
    assert warnings == [
        f"{folder}/edge.yaml:7:24: listener 'https' accepts TLS 1.1 (min_version 1.1, allowed by "
        "allow_legacy_tls: true); PCI DSS needs TLS 1.2 or later",
        f"{folder}/edge.yaml:7:78: listener 'https' offers cipher suite ECDHE-ECDSA-AES128-SHA, "
        "which has no AEAD (CBC mode) (allowed by allow_legacy_tls: true)",
    ]


def test_validate_prints_the_warnings_and_succeeds(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path, policy(ALLOWED, '{ca: ca, min_version: "1.0", allow_legacy_tls: true}')
    )
    r = run_cli("validate", folder.name, cwd=folder.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        "policy/edge.yaml:7:24: warning: listener 'https' accepts TLS 1.1 (min_version 1.1, "
        "allowed by allow_legacy_tls: true); PCI DSS needs TLS 1.2 or later",
        "policy/edge.yaml:7:78: warning: listener 'https' offers cipher suite "
        "ECDHE-ECDSA-AES128-SHA, which has no AEAD (CBC mode) (allowed by allow_legacy_tls: true)",
        "policy/edge.yaml:16:32: warning: upstream 'web' accepts TLS 1.0 (min_version 1.0, "
        "allowed by allow_legacy_tls: true); PCI DSS needs TLS 1.2 or later",
    ]
    assert "ok: nodes *" in r.stderr


@pytest.mark.envoy
def test_envoy_accepts_what_allow_legacy_tls_lets_through(tmp_path: Path) -> None:
    """Envoy 1.40 itself (validate --envoy) takes the translation: TLS 1.1, a CBC suite, and
    the listener's failed-handshake log with its CEL filter."""
    folder = folder_with(
        tmp_path, policy(ALLOWED, '{ca: ca, min_version: "1.0", allow_legacy_tls: true}')
    )
    r = run_cli("validate", "--envoy", folder.name, cwd=folder.parent, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok: envoy accepts every node group" in r.stderr, r.stderr
    assert len([x for x in r.stdout.splitlines() if ": warning: " in x]) == 3, r.stdout


def test_allow_legacy_tls_with_nothing_legacy_is_a_warning(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, policy('{min_version: "1.2", allow_legacy_tls: true}'))
    (warning,) = [str(w) for w in load(folder).warnings]
    assert warning == (
        f"{folder}/edge.yaml:7:31: listener 'https': allow_legacy_tls is true but nothing here "
        "needs it; remove it"
    )


def test_a_file_in_several_node_groups_warns_once(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, policy(ALLOWED).replace("listeners:", "listeners:", 1))
    (folder / "a.yaml").write_text('nodes: ["a-*"]\n')
    (folder / "b.yaml").write_text('nodes: ["b-*"]\n')
    snapshots = load(folder)
    assert len(snapshots.groups) == 3
    assert len(snapshots.warnings) == 2, snapshots.warnings


def test_serve_logs_the_warning_at_load_and_refuses_a_legacy_edit(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """At start: the warning in serve's log. Then an edit that drops allow_legacy_tls is
    refused (its located error in /status), and the last good snapshot stays served."""
    folder = folder_with(tmp_path, policy(ALLOWED))
    server = XdsServer(procs, folder).start()

    def logged() -> list[dict[str, Any]]:
        lines = server.proc.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    warned = wait_until(
        lambda: [e for e in logged() if e.get("event") == "policy warning"] or None,
        10,
        what="the policy warning in serve's log",
    )
    assert [(e["level"], e["location"]) for e in warned] == [
        ("warning", f"{folder}/edge.yaml:7:24"),
        ("warning", f"{folder}/edge.yaml:7:78"),
    ], warned
    assert "accepts TLS 1.1" in warned[0]["warning"], warned
    shown = server.status()["reload"]["warnings"]
    assert shown == [f"{e['location']}: {e['warning']}" for e in warned], shown
    versions = server.status()["groups"]

    write_atomic(folder / "edge.yaml", policy(ALLOWED.replace(", allow_legacy_tls: true", "")))

    def error() -> str | None:
        errors = server.status()["reload"]["errors"]
        return errors[0] if errors else None

    message = wait_until(error, 10, what="the refusal in /status")
    assert message.startswith(f"{folder}/edge.yaml:7:24: min_version 1.1: "), message
    assert server.status()["groups"] == versions


# -- the failed-handshake log (its translation) -----------------------------------------------


def test_tls_listeners_log_failed_handshakes_to_the_access_log_file(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, policy("{}", access_log="{path: /var/log/envoy/access.log}"))
    listener = listener_json(load(folder))
    (log,) = listener["access_log"]
    config = log["typed_config"]
    assert config["path"] == "/var/log/envoy/access.log"
    # The same file as the HTTP access log.
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert [a["typed_config"]["path"] for a in hcm["access_log"]] == [config["path"]]
    fields = config["log_format"]["json_format"]
    assert fields["reason"] == "%DOWNSTREAM_TRANSPORT_FAILURE_REASON%"
    assert fields["client"] == "%DOWNSTREAM_REMOTE_ADDRESS%"
    assert fields["sni"] == "%REQUESTED_SERVER_NAME%"
    assert fields["time"] == "%START_TIME%"
    assert fields["event"] == "tls_handshake_failed" and fields["listener"] == "https"
    # Only failed handshakes (Envoy writes the listener log for every connection).
    alternatives = log["filter"]["or_filter"]["filters"]
    cel = alternatives[0]["extension_filter"]["typed_config"]
    assert cel["expression"] == "connection.transport_failure_reason != ''"
    assert alternatives[1] == {"response_flag_filter": {"flags": ["NR"]}}


def test_the_handshake_log_follows_the_text_format(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, policy("{}", access_log="{format: text}"))
    (log,) = listener_json(load(folder))["access_log"]
    line = log["typed_config"]["log_format"]["text_format_source"]["inline_string"]
    assert line.startswith("time=%START_TIME% event=tls_handshake_failed listener=https ")
    assert "reason=%DOWNSTREAM_TRANSPORT_FAILURE_REASON%" in line and line.endswith("\n")
    assert log["typed_config"]["path"] == "/dev/stdout"


def test_no_access_log_no_handshake_log(tmp_path: Path) -> None:
    text = policy("{}").replace("access_log: {}\n", "")
    folder = folder_with(tmp_path, text)
    assert "access_log" not in listener_json(load(folder))


# -- raw resources --------------------------------------------------------------------------

RAW_CLUSTER = """resources:
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: raw
    type: STATIC
    load_assignment:
      cluster_name: raw
      endpoints:
        - lb_endpoints:
            - endpoint: {{address: {{socket_address: {{address: 10.0.0.1, port_value: 443}}}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_params: {{{params}}}
"""


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ("tls_minimum_protocol_version: TLSv1_0", "tls_minimum_protocol_version: TLSv1_0 "),
        ("tlsMinimumProtocolVersion: TLSv1_1", "tls_minimum_protocol_version: TLSv1_1 "),
        ("tls_minimum_protocol_version: 2", "tls_minimum_protocol_version: 2 allows TLS 1.1"),
        ("tls_maximum_protocol_version: TLSv1_1", "tls_maximum_protocol_version: TLSv1_1 "),
        ("cipher_suites: [AES256-GCM-SHA384]", "cipher_suites: AES256-GCM-SHA384 has no forward"),
        ("cipherSuites: [HIGH]", "unknown cipher suite 'HIGH'"),
    ],
)
def test_raw_resources_cannot_go_below_the_floor(params: str, says: str, tmp_path: Path) -> None:
    """The escape hatch is no way around the floor: no allow_legacy_tls there."""
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "raw.yaml").write_text(RAW_CLUSTER.format(params=params))
    (error,) = errors_of(folder)
    assert f"{folder}/raw.yaml:15:" in error and says in error, error


def test_raw_resources_at_the_floor_load(tmp_path: Path) -> None:
    folder = tmp_path / "raw"
    folder.mkdir()
    params = (
        "tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3, "
        "cipher_suites: [ECDHE-ECDSA-AES128-GCM-SHA256]"
    )
    (folder / "raw.yaml").write_text(RAW_CLUSTER.format(params=params))
    assert load(folder).warnings == ()


def test_a_pasted_key_in_cipher_suites_is_not_echoed(tmp_path: Path) -> None:
    key = (
        "-----BEGIN PRIVATE KEY-----\\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg"
        "\\n-----END PRIVATE KEY-----"
    )
    folder = folder_with(tmp_path, policy(f'{{cipher_suites: ["{key}"]}}'))
    (error,) = errors_of(folder)
    assert "MIGHAgEA" not in error and "(a PEM block" in error, error
