"""`xdsplane up` from a clean checkout (no certificates yet) serves the sample end to end,
and SIGTERM leaves no process behind."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import free_port, http_get, wait_until
from test_sample import bearer_get

from xdsplane import jwt

REPO = Path(__file__).resolve().parent.parent


def children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.envoy
def test_up_serves_the_sample_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {8443: free_port(), 8080: free_port(), 9443: free_port(), 18081: free_port()}
    policy = tmp_path / "snapshots"
    policy.mkdir()
    for f in (REPO / "snapshots").glob("*.yaml"):
        text = f.read_text()
        for old, new in ports.items():
            text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
            text = text.replace(f"https_port: {old}", f"https_port: {new}")
        (policy / f.name).write_text(text)
    certs = tmp_path / "certs"
    assert not certs.exists()
    addr = {name: f"127.0.0.1:{free_port()}" for name in ("xds", "admin", "envoy", "ga")}
    addr["g"] = f"127.0.0.1:{ports[18081]}"  # the sample's guard address
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [
                sys.executable, "-m", "xdsplane", "up",
                "--config", str(policy), "--certs", str(certs),
                "--xds-address", addr["xds"], "--admin-address", addr["admin"],
                "--envoy-admin-address", addr["envoy"],
                "--billing-address", f"127.0.0.1:{ports[9443]}",
                "--edge-address", f"127.0.0.1:{ports[8443]}",
                "--guard-address", addr["g"], "--guard-admin-address", addr["ga"],
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: "xdsplane is up" in log.read_text() or up.poll() is not None, 90)
        assert up.poll() is None, log.read_text()[-3000:]
        pids = children(up.pid)
        assert len(pids) >= 3, pids  # control plane, guard, Envoy
        ctx = ssl.create_default_context(cafile=str(certs / "service-ca.crt"))
        ctx.load_cert_chain(str(certs / "alice.crt"), str(certs / "alice.key"))
        token = jwt.token(certs, "alice")
        answer = bearer_get(ports[8443], ctx, "/billing/invoices", token)
        assert answer.status == 200, answer
        assert "commonName=gateway" in answer.text  # reached billing over mTLS
        assert "CN=alice" in answer.text  # with the client's identity in XFCC
        # the guard up started checks replay and serves the policy's global limit
        assert bearer_get(ports[8443], ctx, "/billing/invoices", token).status == 403
        again = bearer_get(ports[8443], ctx, "/billing/invoices", jwt.token(certs, "alice"))
        assert again.status == 200, again
        assert "x-ratelimit-limit" in again.headers, again.headers
        ga_port = int(addr["ga"].rsplit(":", 1)[1])
        health = json.loads(http_get(ga_port, "/healthz").body)
        assert health["domains"] == ["xdsplane"] and health["rules"] == 2, health
        assert health["grpc"] == "mtls" and health["insecure"] is False, health
        # Envoy got its configuration over the mTLS xDS channel, as node edge-1.
        assert "(mTLS)" in log.read_text()
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            code = up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert code == 0, log.read_text()[-3000:]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], "processes left behind"
    text = log.read_text()
    assert "PRIVATE KEY" not in text and token not in text
