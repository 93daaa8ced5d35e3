"""`serve --envoy-admin`: per-host missing-certificate counts read from Envoys' admin
(issue #13 item 4, "in the control plane's status page when it can read them").

The end-to-end path (the sample through a real Envoy under `xdsplane up`) is in
tests/test_up.py; here: the parser against hostile answers, the loopback rule, an Envoy that
does not answer, and what the page and `xdsplane status` print."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import HOST, free_port

from xdsplane import envoystats, statuspage
from xdsplane.envoystats import EnvoyAdmin, EnvoyStats, parse_admin, parse_stats

ROOT = Path(__file__).resolve().parent.parent
DENIED = "http.https/billing.rbac.client_certificate_missing.shadow_denied"
ALLOWED = "http.https/billing.rbac.client_certificate_missing.shadow_allowed"


def body(*stats: dict[str, Any]) -> bytes:
    return json.dumps({"stats": list(stats)}).encode()


def test_counts_per_host_from_envoys_json() -> None:
    hosts = parse_stats(
        body(
            {"name": DENIED, "value": 3},
            {"name": ALLOWED, "value": 7},
            {"name": "http.https/strict.rbac.client_certificate_missing.shadow_denied", "value": 0},
            {"name": "http.https/billing.rbac.shadow_denied", "value": 99},  # a route's rule
            {"name": "cluster.billing.upstream_rq_total", "value": 5},
        )
    )
    assert hosts == {
        "https/billing": {"without_certificate": 3, "with_certificate": 7},
        "https/strict": {"without_certificate": 0, "with_certificate": 0},
    }


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"<html>", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", 'no "stats" list'),
        (b'{"stats": {}}', 'no "stats" list'),
        (b" " * (envoystats.MAX_BYTES + 1), "larger than"),
    ],
)
def test_an_answer_that_is_not_envoys_is_an_error(answer: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_stats(answer)


def test_hostile_entries_are_skipped_not_trusted() -> None:
    hosts = parse_stats(
        body(
            {"name": DENIED, "value": True},  # a bool is not a count
            {"name": DENIED, "value": -4},
            {"name": DENIED, "value": "12"},
            {"name": ["x"], "value": 1},
            "not an object",  # type: ignore[arg-type]
            {"name": "http.a b.rbac.client_certificate_missing.shadow_denied", "value": 1},
        )
    )
    assert hosts == {}
    many = [
        {"name": f"http.l/h{i}.rbac.client_certificate_missing.shadow_denied", "value": 1}
        for i in range(envoystats.MAX_HOSTS + 50)
    ]
    assert len(parse_stats(body(*many))) == envoystats.MAX_HOSTS


def test_admin_addresses_and_the_loopback_rule() -> None:
    assert parse_admin("edge-1=127.0.0.1:9901") == EnvoyAdmin("edge-1", "127.0.0.1", 9901)
    assert parse_admin("127.0.0.1:9901").name == "127.0.0.1:9901"
    assert parse_admin("[::1]:9901").address == "[::1]:9901"
    for bad in ("edge 1=127.0.0.1:9901", "<b>=127.0.0.1:1", "edge=nowhere", "edge=1.2.3.4:x"):
        with pytest.raises(ValueError):
            parse_admin(bad)
    assert envoystats.exposure([parse_admin("127.0.0.1:9901"), parse_admin("[::1]:1")]) == []
    for off in ("10.0.0.5:9901", "0.0.0.0:9901", "127.1:9901", "envoy.internal:9901"):
        (reason,) = envoystats.exposure([parse_admin(off)])
        assert "not on loopback" in reason


SERVE = (sys.executable, "-m", "xdsplane", "serve", "--config", str(ROOT / "snapshots"))


def test_serve_refuses_an_envoy_admin_off_the_host() -> None:
    done = subprocess.run(
        [*SERVE, "--envoy-admin", "edge-1=10.1.2.3:9901"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done
    assert "--envoy-admin 10.1.2.3:9901 is not on loopback" in done.stderr
    twice = subprocess.run(
        [*SERVE, "--envoy-admin", "e=127.0.0.1:1", "--envoy-admin", "e=127.0.0.1:2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert twice.returncode == 2 and "two Envoys with one name" in twice.stderr, twice


class FakeAdmin(ThreadingHTTPServer):
    """A local HTTP server standing in for an Envoy admin's /stats (what it answers is set
    by the test); it records the requests it got."""

    def __init__(self) -> None:
        self.answer: tuple[int, bytes] = (200, body({"name": DENIED, "value": 2}))
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(f"GET {self.path}")
                status, payload = outer.answer
                self.send_response(status)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__((HOST, 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture
def fake_admin() -> Iterator[FakeAdmin]:
    server = FakeAdmin()
    yield server
    server.shutdown()
    server.server_close()


async def read(stats: EnvoyStats) -> list[dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=stats.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await stats.read_once(session)
    return stats.status()


async def test_reads_only_get_stats_and_shows_a_silent_envoy(fake_admin: FakeAdmin) -> None:
    down = free_port()  # nothing listens there
    stats = EnvoyStats(
        [parse_admin(f"up={HOST}:{fake_admin.port}"), parse_admin(f"down={HOST}:{down}")],
        timeout=2.0,
    )
    before = stats.status()
    assert [e["error"] for e in before] == ["not read yet", "not read yet"]
    up, silent = await read(stats)
    assert up["ok"] and up["hosts"] == [
        {"host": "https/billing", "without_certificate": 2, "with_certificate": 0}
    ]
    assert not silent["ok"] and silent["error"], silent
    assert len(fake_admin.requests) == 1
    assert fake_admin.requests[0].startswith("GET /stats?format=json&filter=")

    fake_admin.answer = (500, b"oops")
    (up, _) = await read(stats)
    assert not up["ok"] and up["error"] == "HTTP 500"
    assert up["hosts"] == [
        {"host": "https/billing", "without_certificate": 2, "with_certificate": 0}
    ]  # the last counts read stay, marked as not current by ok: false
    fake_admin.answer = (200, body({"name": DENIED, "value": 5}))
    (up, _) = await read(stats)
    assert up["ok"] and up["hosts"][0]["without_certificate"] == 5


async def test_run_stops_when_asked(fake_admin: FakeAdmin) -> None:
    stats = EnvoyStats([parse_admin(f"e={HOST}:{fake_admin.port}")], interval=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(stats.run(stop))
    for _ in range(200):
        if len(fake_admin.requests) >= 2:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert len(fake_admin.requests) >= 2 and stats.status()[0]["ok"]


def test_page_and_terminal_escape_what_an_envoy_sent() -> None:
    status: dict[str, Any] = {
        "ready": True,
        "envoys": [
            {
                "name": "edge-1",
                "address": "127.0.0.1:9901",
                "ok": True,
                "error": "",
                "read_at": 1.0,
                "hosts": [
                    {
                        "host": "https/<script>alert(1)</script>",
                        "without_certificate": 4,
                        "with_certificate": 1,
                    }
                ],
            },
            {
                "name": "edge-2",
                "address": "127.0.0.1:9902",
                "ok": False,
                "error": "<img src=x onerror=alert(1)>",
                "read_at": None,
                "hosts": [],
            },
        ],
    }
    page = statuspage.render(status)
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;" in page and "Client certificates on optional hosts" in page
    lines = statuspage.status_lines(status)
    assert any(
        "edge-1" in line and "4 requests without a client certificate" in line for line in lines
    )
    assert any("edge-2: admin not read" in line for line in lines)
    # without --envoy-admin the section is absent
    assert "Client certificates on optional hosts" not in statuspage.render({"envoys": None})
