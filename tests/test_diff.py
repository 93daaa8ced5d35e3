"""`xdsplane diff OLD NEW`: resources added, changed and removed, with field-level changes."""

from __future__ import annotations

import base64
import datetime
import re
from pathlib import Path

import pytest

from xdsplane import cli
from xdsplane.diff import json_changes

POLICY = """\
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

OTHER_LISTENER = """\
  - name: other
    address: 127.0.0.1:10001
    hosts:
      - name: api
        domains: ["*"]
        routes:
          - {prefix: /, upstream: web}
"""

TLS_POLICY = """\
secrets:
  edge: {certificate: cert.pem, private_key: key.pem}
listeners:
  - name: https
    address: 127.0.0.1:10443
    tls: {}
    hosts:
      - name: web
        domains: [example.com]
        certificate: edge
        routes:
          - {prefix: /, upstream: web}
upstreams:
  web: {endpoints: [127.0.0.1:8081]}
"""


def write(root: Path, name: str, files: dict[str, str | bytes]) -> Path:
    d = root / name
    d.mkdir()
    for fname, content in files.items():
        path = d / fname
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return d


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, list[str], str]:
    code = cli.main(["diff", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_identical_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path, "a", {"p.yaml": POLICY})
    b = write(tmp_path, "b", {"p.yaml": POLICY})
    code, out, _ = run(capsys, a, b, "--exit-code")
    assert code == 0
    assert out == ["no differences; 0 changed, 0 added, 0 removed"]


def test_route_prefix_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path, "a", {"p.yaml": POLICY})
    b = write(tmp_path, "b", {"p.yaml": POLICY.replace("prefix: /,", "prefix: /api/,")})
    code, out, _ = run(capsys, a, b)
    assert code == 0
    assert out == [
        "nodes *:",
        f"  ~ RDS http  ({b}/p.yaml:2:5)",
        '      virtual_hosts[web].routes[web/route-0].match.prefix: "/" -> "/api/"',
        "1 changed, 0 added, 0 removed",
    ]
    assert run(capsys, a, b, "--exit-code")[0] == 3


def test_upstream_added(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path, "a", {"p.yaml": POLICY})
    new = POLICY.replace(
        "          - {prefix: /, upstream: web}\n",
        "          - {prefix: /api/, upstream: api}\n          - {prefix: /, upstream: web}\n",
    ).replace("upstreams:\n", "upstreams:\n  api: {endpoints: [127.0.0.1:9000]}\n")
    b = write(tmp_path, "b", {"p.yaml": new})
    code, out, _ = run(capsys, a, b)
    assert code == 0
    assert out[:3] == [
        "nodes *:",
        f"  + CDS api  ({b}/p.yaml:11:8)",
        f"  + EDS api  ({b}/p.yaml:11:8)",
    ]
    assert f"  ~ RDS http  ({b}/p.yaml:2:5)" in out
    assert '      virtual_hosts[web].routes[web/route-0].route.cluster: "web" -> "api"' in out
    assert out[-1] == "1 changed, 2 added, 0 removed"


def test_listener_removed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = POLICY.replace("upstreams:\n", OTHER_LISTENER + "upstreams:\n")
    a = write(tmp_path, "a", {"p.yaml": old})
    b = write(tmp_path, "b", {"p.yaml": POLICY})
    code, out, _ = run(capsys, a, b)
    assert code == 0
    assert out == [
        "nodes *:",
        f"  - LDS other  ({a}/p.yaml:9:5)",
        f"  - RDS other  ({a}/p.yaml:9:5)",
        "0 changed, 0 added, 2 removed",
    ]


def test_one_node_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    canary = 'nodes: ["canary-*"]\n' + (
        POLICY.replace("10000", "10002").replace("web", "canary").replace("http", "canary")
    )
    a = write(tmp_path, "a", {"p.yaml": POLICY, "canary.yaml": canary})
    b = write(
        tmp_path,
        "b",
        {"p.yaml": POLICY, "canary.yaml": canary.replace("8081", "8082")},
    )
    code, out, err = run(capsys, a, b, "--node", "edge-1")
    assert (code, out, err) == (0, ["no differences; 0 changed, 0 added, 0 removed"], "")
    code, out, _ = run(capsys, a, b, "--node", "canary-1")
    assert out == [
        "nodes canary-*:",
        f"  ~ EDS canary  ({b}/canary.yaml:11:11)",
        "      endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value: "
        "8081 -> 8082",
        "1 changed, 0 added, 0 removed",
    ]
    code, out, _ = run(capsys, a, b)
    assert out[0] == "nodes canary-*:"
    assert out[-1] == "1 changed, 0 added, 0 removed"


def test_load_error_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path, "a", {"p.yaml": POLICY})
    b = write(tmp_path, "b", {"p.yaml": POLICY.replace("upstream: web", "upstream: nowhere")})
    code, out, err = run(capsys, a, b)
    assert code == 1
    assert out == []
    assert f"{b}/p.yaml" in err
    assert "does not load" in err


def make_pair(cn: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("example.com")]), False)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def test_secret_change_never_shows_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert1, key1 = make_pair("edge-2025")
    cert2, key2 = make_pair("edge-2026")
    a = write(tmp_path, "a", {"p.yaml": TLS_POLICY, "cert.pem": cert1, "key.pem": key1})
    b = write(tmp_path, "b", {"p.yaml": TLS_POLICY, "cert.pem": cert2, "key.pem": key2})
    for extra in ([], ["--unified"]):
        code, out, err = run(capsys, a, b, *extra)
        text = "\n".join(out) + err
        assert code == 0
        assert f"  ~ SDS edge  ({b}/p.yaml:2:9)" in out
        assert out[-1] == "1 changed, 0 added, 0 removed"
        # the fingerprints differ: a reviewer sees that the key changed, not the key
        assert re.search(r"private_key.*<redacted sha256:[0-9a-f]{8}\.\.\.>", text), text
        for key in (key1, key2):
            body = [ln for ln in key.decode().splitlines() if not ln.startswith("-----")]
            assert all(ln not in text for ln in body)
            assert base64.b64encode(key).decode()[:40] not in text
        assert "PRIVATE KEY" not in text
    code, out, _ = run(capsys, a, b)
    changed = [ln.strip() for ln in out if "certificate_chain" in ln]
    assert len(changed) == 1
    assert "CN=edge-2025" in changed[0] and "CN=edge-2026" in changed[0]


def test_lists_of_named_items_match_by_name() -> None:
    old = {"routes": [{"name": "a", "x": 1}, {"name": "b", "x": 2}]}
    new = {"routes": [{"name": "b", "x": 3}, {"name": "a", "x": 1}]}
    paths = [(c.path, c.old, c.new) for c in json_changes(old, new)]
    assert paths == [
        ("routes[b].x", 2, 3),
        ("routes (order)", ["a", "b"], ["b", "a"]),
    ]


def test_lists_without_names_match_by_content() -> None:
    changes = [c.render() for c in json_changes({"d": ["a", "b"]}, {"d": ["z", "a", "b"]})]
    assert changes == ['d[0]: (unset) -> "z"']
