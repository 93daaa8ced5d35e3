"""The admin server against a web page in the operator's browser (issue #11, item 9).

DNS rebinding: a page on evil.example re-resolves its name to 127.0.0.1 and reads
``http://evil.example:19000/status`` as same-origin. The admin server answers only Host
headers that name itself, so that request (and every spelling of it) gets 421. Every
response carries a Content-Security-Policy, X-Frame-Options and X-Content-Type-Options.
Against a real ``xdsplane serve``, with raw requests (http.client sends the Host we say).
"""

from __future__ import annotations

import http.client
from pathlib import Path

import pytest
from harness import HOST, ProcessGroup, XdsServer, direct, listener, route_config, write_snapshot

from xdsplane.adminhttp import host_allowed, normalize_allowed

PATHS = ["/", "/status", "/metrics", "/healthz", "/readyz", "/no-such-page"]


def get(port: int, path: str, hosts: list[str]) -> tuple[int, dict[str, str], bytes]:
    """GET with exactly these Host headers (none, one, or several)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        for h in hosts:
            conn.putheader("Host", h)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def assert_hardened(headers: dict[str, str], what: str) -> None:
    csp = headers.get("content-security-policy", "")
    assert "default-src 'none'" in csp, (what, csp)
    assert "frame-ancestors 'none'" in csp, (what, csp)
    assert "script-src" not in csp and "unsafe-inline" not in csp, (what, csp)
    assert headers.get("x-frame-options") == "DENY", what
    assert headers.get("x-content-type-options") == "nosniff", what


@pytest.fixture
def server(procs: ProcessGroup, tmp_path: Path) -> XdsServer:
    folder = tmp_path / "snapshots"
    folder.mkdir()
    write_snapshot(
        folder / "edge.yaml", [listener("http", 18), route_config("http", [direct("/", "x")])]
    )
    return XdsServer(procs, folder, extra_args=["--admin-allowed-hosts", "admin.internal"]).start()


def test_a_rebound_host_name_is_refused_on_every_path(server: XdsServer) -> None:
    port = server.admin_port
    hostile = [
        "evil.example",
        f"evil.example:{port}",
        f"EVIL.example:{port}",
        f"127.0.0.1.evil.example:{port}",
        f"localhost.evil.example:{port}",
        f"{HOST}:{port}@evil.example",
        f"evil.example#{HOST}:{port}",
        f"{HOST}:{port + 1 if port < 65535 else port - 1}",  # another port: another server
        "",
        "admin.internal.evil.example",
    ]
    for path in PATHS:
        for host in hostile:
            status, headers, body = get(port, path, [host])
            assert status == 421, (path, host, status, body[:200])
            assert b"nodes" not in body and b"xdsplane_" not in body, (path, host)
            assert_hardened(headers, f"421 for {host!r}")
        # no Host header at all, or two of them (one ours, one not): aiohttp's parser
        # refuses the first itself (400)
        assert get(port, path, [])[0] in (400, 421), path
        assert get(port, path, [f"{HOST}:{port}", "evil.example"])[0] in (400, 421), path


def test_its_own_address_loopback_names_and_the_allowed_list_are_answered(
    server: XdsServer,
) -> None:
    port = server.admin_port
    good = [
        f"{HOST}:{port}",
        HOST,
        f"localhost:{port}",
        f"LocalHost:{port}",
        "localhost",
        f"[::1]:{port}",
        f"admin.internal:{port}",  # --admin-allowed-hosts admin.internal (any port)
        "admin.internal",
    ]
    for host in good:
        status, headers, body = get(port, "/status", [host])
        assert status == 200, (host, status, body[:200])
        assert_hardened(headers, f"/status for {host!r}")
    for path in PATHS:
        status, headers, _ = get(port, path, [f"{HOST}:{port}"])
        assert status == (404 if path == "/no-such-page" else 200), (path, status)
        assert_hardened(headers, path)


def test_the_page_allows_its_own_style_and_nothing_else(server: XdsServer) -> None:
    import base64
    import hashlib
    import re

    status, headers, body = get(server.admin_port, "/", [f"{HOST}:{server.admin_port}"])
    assert status == 200
    styles = re.findall(rb"<style>(.*?)</style>", body, re.S)
    assert len(styles) == 1 and b"<script" not in body
    digest = base64.b64encode(hashlib.sha256(styles[0]).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in headers["content-security-policy"]


def test_host_rule_for_a_wildcard_bind() -> None:
    allowed = normalize_allowed(["Admin.Example.com:8443, ops.example.com"])
    local = ("10.0.0.5", 19000)  # bound on 0.0.0.0: the address the request came in on
    assert host_allowed("10.0.0.5:19000", local, allowed)
    assert host_allowed("10.0.0.5", local, allowed)
    assert host_allowed("admin.example.com:8443", local, allowed)
    assert host_allowed("ops.example.com:1", local, allowed)
    assert not host_allowed("admin.example.com:19000", local, allowed)
    assert not host_allowed("localhost:19000", local, allowed)  # not on loopback
    assert not host_allowed("127.0.0.1:19000", local, allowed)
    assert not host_allowed("10.0.0.6:19000", local, allowed)
    assert not host_allowed("evil.example", local, allowed)
    assert host_allowed("[::ffff:10.0.0.5]:19000", ("::ffff:10.0.0.5", 19000), frozenset())
    assert host_allowed("anything", local, normalize_allowed(["*"]))
    with pytest.raises(ValueError):
        normalize_allowed(["a/b"])
