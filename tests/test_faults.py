"""Faults under load (issue #7, item 1): a real Envoy 1.40 carrying counted HTTP load while
the control plane is killed, a replica is lost, Envoy itself restarts, the policy and the
certificates change again and again, and the guard's Redis goes away and comes back.

Every scenario is one function driven by a count: the default run uses the short count,
the ``slow`` marker runs the same code longer (``pytest -m slow tests/test_faults.py``).
Each test prints its figures (``-rP`` shows them); RELIABILITY.md records them.

File faults (partial writes, a file replaced by a directory, permission denied, a
Kubernetes-style symlink swap, the folder deleted and recreated) are in test_file_faults.py.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import (
    HOST,
    Envoy,
    Load,
    ProcessGroup,
    Upstream,
    XdsServer,
    assert_no_failure_nor_drop,
    free_port,
    holds_for,
    http_get,
    load_figures,
    short_and_long,
    wait_until,
)
from test_e2e_envoy import UPDATE_SUCCESS, VARIANTS, XDS_TYPES, Edge, base_resources
from tls_helpers import (
    BILLING,
    LISTENER_CHURN,
    Looper,
    StatSampler,
    file_serial,
    handshake,
    start_edge,
)
from tls_helpers import Edge as TlsEdge

from xdsplane import pki

pytestmark = [
    pytest.mark.envoy,  # conftest: skipped without Envoy 1.40, failed in CI
]

# The goal is Envoy back on the control plane within 1 s of the server's return: a figure
# (reconnect_after_return in the FIGURES line, `pytest -rP -m slow`, RELIABILITY.md), not a
# default test's bound. What the test asserts is the behaviour behind it: the bootstrap's
# retry policy (0.1 s base, 0.5 s cap) replaces Envoy's own backoff (0.5 s doubling to 30 s,
# measured 0.3-13.6 s after a restart). 5 s leaves a busy 2-core machine ten times the cap
# for Envoy's attempt and handshake, and still fails on the 30 s backoff's longer waits.
RECONNECT_CEILING = 5.0


def accepts(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def returned_at(server: XdsServer) -> float:
    """Start ``server`` and return the moment it can serve ADS again: its xDS port accepts
    connections and /readyz answers 200 (polled every 5 ms)."""
    server.launch()

    def back() -> float | None:
        server.proc.ensure_alive()
        if accepts(server.xds_port) and server._get("/readyz").status == 200:
            return time.monotonic()
        return None

    return wait_until(back, 30, interval=0.005, what=f"{server.proc.name} back")


def connected_at(envoy: Envoy, timeout: float = 30.0) -> float:
    """The moment Envoy's ADS stream is up again (control_plane.connected_state == 1),
    polled every 10 ms on Envoy's admin API."""
    return wait_until(
        lambda: time.monotonic() if envoy.connected() else None,
        timeout,
        interval=0.01,
        what="Envoy's control_plane.connected_state == 1",
    )


def unchanged(envoy: Envoy, updates: dict[str, int], versions: dict[str, str]) -> bool:
    return envoy.stats(UPDATE_SUCCESS) == updates and envoy.version_texts() == versions


def alpha_edge(
    procs: ProcessGroup, tmp_path: Path, variant: str, upstream: Callable[[str], Upstream]
) -> tuple[Edge, dict[str, Upstream]]:
    """An edge (not started) whose files route /app to the upstream ``alpha``."""
    ups = {"alpha": upstream("alpha")}
    edge = Edge(procs, tmp_path, variant)
    edge.write(base_resources(edge.port, ups))
    return edge, ups


def figures(name: str, **values: Any) -> None:
    """One line of measured figures, for RELIABILITY.md (``pytest -rP`` prints it)."""
    print(f"FIGURES {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


def spread(values: list[float]) -> str:
    return f"min {min(values):.3f}s median {statistics.median(values):.3f}s max {max(values):.3f}s"


# -- 1. the control plane killed with SIGKILL under load, then restarted ----------------------


@pytest.mark.parametrize("count", short_and_long(2, 20))
@pytest.mark.parametrize("variant", VARIANTS)
def test_sigkill_under_load(
    variant: str,
    count: int,
    procs: ProcessGroup,
    tmp_path: Path,
    upstream: Callable[[str], Upstream],
) -> None:
    """``kills`` times: SIGKILL the server while Envoy carries load, start it again on the
    same files. Envoy serves every request meanwhile, is connected again within
    RECONNECT_CEILING of the server's return, and is sent nothing: its update_success
    counters and version_text stay as they were, the server writes no response."""
    kills = count
    edge, ups = alpha_edge(procs, tmp_path, variant, upstream)
    edge.start()
    edge.wait_answer("/app", "alpha")
    envoy = edge.envoy
    updates = envoy.stats(UPDATE_SUCCESS)
    versions = envoy.version_texts()
    assert len(versions) >= 4 and all(versions.values()), versions
    reconnects: list[float] = []
    downtimes: list[float] = []
    with Load(edge.port, "/app") as load:
        for _ in range(kills):
            wait_until(load.flowing(20), 10, what="load flowing before the kill")
            killed = time.monotonic()
            edge.server.kill()
            wait_until(lambda: not envoy.connected(), 10, what="Envoy sees the server gone")
            back = returned_at(edge.server)
            downtimes.append(back - killed)
            reconnects.append(connected_at(envoy) - back)
            wait_until(
                lambda: set(edge.types()) == set(XDS_TYPES), 10, what="all types resubscribed"
            )
            # Give the server the chance to (wrongly) push while the load goes on.
            holds_for(lambda: unchanged(envoy, updates, versions), 0.3, what="nothing pushed")
            assert all(s["responses"] == 0 for s in edge.types().values()), edge.types()
    figures(
        f"sigkill-{variant}",
        kills=kills,
        **load_figures(load, "alpha"),
        downtime=spread(downtimes),
        reconnect_after_return=spread(reconnects),
    )
    assert load.count() > 50 * kills, load.summary()
    assert_no_failure_nor_drop(load, "alpha")
    assert unchanged(envoy, updates, versions)
    slow = [round(r, 3) for r in reconnects if r > RECONNECT_CEILING]
    assert not slow, (
        f"Envoy reconnected later than {RECONNECT_CEILING}s after the server's return "
        f"({len(slow)} of {kills}: {slow}); all: {spread(reconnects)}"
    )
    # The new stream works: an edit reaches Envoy.
    edge.write(base_resources(edge.port, ups, hello="after the kills"))
    edge.wait_answer("/hello", "after the kills")


# -- 2. two replicas on the same files, one Envoy with both in its bootstrap -----------------


@pytest.mark.parametrize("count", short_and_long(2, 20))
@pytest.mark.parametrize("variant", VARIANTS)
def test_replica_failover_under_load(
    variant: str,
    count: int,
    procs: ProcessGroup,
    tmp_path: Path,
    upstream: Callable[[str], Upstream],
) -> None:
    """Two ``xdsplane serve`` on one folder; Envoy's bootstrap names both (one xds_cluster,
    two endpoints: what ``xdsplane bootstrap --xds-address A --xds-address B`` writes).
    ``moves`` times: SIGKILL the replica Envoy uses; Envoy moves to the other, which sends
    nothing (the versions are the same content hashes), then the killed one comes back
    for the next round. Load through Envoy throughout, none of it failing."""
    moves = count
    edge, _ = alpha_edge(procs, tmp_path, variant, upstream)
    replicas = [edge.server, XdsServer(procs, edge.cfg, name="xdsplane-b")]
    for r in replicas:
        r.launch()
    envoy = Envoy(procs, tmp_path, edge.node, [r.xds_address for r in replicas], variant == "delta")
    edge.envoy = envoy
    for r in replicas:
        r.wait_ready()
    # Same files, same versions: the replicas agree before Envoy ever connects.
    groups = [r.status()["groups"] for r in replicas]
    assert [g["versions"] for g in groups[0]] == [g["versions"] for g in groups[1]]
    envoy.start()
    edge.wait_answer("/app", "alpha")

    def in_use() -> XdsServer | None:
        """The one replica Envoy has a stream with, subscribed to every type."""
        found = [r for r in replicas if r.proc.alive() and r.streams(edge.node)]
        if len(found) == 1 and set(found[0].stream(edge.node)["types"]) == set(XDS_TYPES):
            return found[0]
        return None

    first = wait_until(in_use, 10, what="Envoy on one replica")
    wait_until(lambda: first.settled(edge.node), 10, what="everything ACKed")
    updates = envoy.stats(UPDATE_SUCCESS)
    versions = envoy.version_texts()
    switches: list[float] = []
    with Load(edge.port, "/app") as load:
        for _ in range(moves):
            wait_until(load.flowing(20), 10, what="load flowing")
            used = wait_until(in_use, 10, what="Envoy on one replica")
            other = replicas[1 - replicas.index(used)]
            killed = time.monotonic()
            used.kill()

            def moved(other: XdsServer = other) -> float | None:
                stream = other.streams(edge.node)
                done = stream and set(stream[0]["types"]) == set(XDS_TYPES) and envoy.connected()
                return time.monotonic() if done else None

            switches.append(wait_until(moved, 30, interval=0.01, what="Envoy moved") - killed)
            holds_for(lambda: unchanged(envoy, updates, versions), 0.3, what="nothing pushed")
            assert all(s["responses"] == 0 for s in other.stream(edge.node)["types"].values())
            used.start()  # back for the next round, same files, same versions
    figures(
        f"replicas-{variant}",
        moves=moves,
        **load_figures(load, "alpha"),
        kill_to_other_replica=spread(switches),
    )
    assert_no_failure_nor_drop(load, "alpha")
    assert unchanged(envoy, updates, versions)
    assert load.count() > 50 * moves, load.summary()


# -- 3. Envoy restarted: its full configuration back at once ---------------------------------


@pytest.mark.parametrize("count", short_and_long(2, 10))
@pytest.mark.parametrize("variant", VARIANTS)
def test_envoy_restart_gets_everything_at_once(
    variant: str,
    count: int,
    procs: ProcessGroup,
    tmp_path: Path,
    upstream: Callable[[str], Upstream],
) -> None:
    """``restarts`` times: stop Envoy (SIGKILL, then SIGTERM on alternate rounds), start
    it again from the same bootstrap. Its first request per type is answered with
    everything at once (one response per type on the new stream), it accepts exactly the
    versions the previous Envoy held, and it serves within seconds, with no initial fetch
    timing out."""
    restarts = count
    edge, _ = alpha_edge(procs, tmp_path, variant, upstream)
    edge.start()
    edge.wait_answer("/app", "alpha")
    versions = edge.envoy.version_texts()
    served = {t: s["sent_version"] for t, s in edge.types().items()}
    to_serving: list[float] = []
    for i in range(restarts):
        if i % 2 == 0:
            edge.envoy.proc.kill()
        else:
            edge.envoy.stop()
        wait_until(lambda: not edge.server.streams(edge.node), 10, what="the old stream ends")
        started = time.monotonic()
        edge.envoy.proc.start()
        edge.wait_answer("/app", "alpha")
        to_serving.append(time.monotonic() - started)
        wait_until(lambda: edge.server.settled(edge.node), 10, what="everything ACKed")
        types = edge.types()
        assert {t: s["responses"] for t, s in types.items()} == dict.fromkeys(XDS_TYPES, 1)
        assert {t: s["acked_version"] for t, s in types.items()} == served
        assert edge.envoy.version_texts() == versions
        assert edge.get("/hello") == (200, "hello v1")
        timeouts = edge.envoy.stats(r"init_fetch_timeout$")
        assert not any(timeouts.values()), timeouts
    figures(f"envoy-restart-{variant}", restarts=restarts, start_to_serving=spread(to_serving))
    # "At once": Envoy's own start-up (about a second, more on a loaded machine) and one
    # response per type; nowhere near the 15 s initial_fetch_timeout.
    assert max(to_serving) < 10, spread(to_serving)


# -- 4. policy reloads and certificate rotations during continuous load -----------------------


@pytest.mark.parametrize("count", short_and_long(1, 10))
def test_reloads_and_rotations_under_load(count: int, procs: ProcessGroup, tmp_path: Path) -> None:
    """The billing edge over TLS (tls_helpers.start_edge) under load: kept-alive
    connections and a new connection (new handshake) per request. ``reloads`` policy
    edits (a route's answer changes each time: RDS) and, spread among them, ``rotations``
    of the edge certificate (new key and serial: SDS). Each change is waited for until
    Envoy shows it. No request fails, no kept-alive connection is replaced, no listener
    is modified or drained."""
    reloads, rotations = 50 * count, 20 * count
    edge = start_edge(procs, tmp_path)
    stop = threading.Event()
    try:
        kept = [Looper(edge, i, stop) for i in range(3)]
        fresh = [Looper(edge, 10 + i, stop, fresh=True) for i in range(2)]
        sampler = StatSampler(edge, stop)
        threads: list[threading.Thread] = [*kept, *fresh, sampler]
        every = max(1, reloads // max(1, rotations))
        served: list[int] = []
        reload_before = edge.server.status()["reload"]

        def rotate(what: str) -> None:
            """A new edge certificate (key and serial), waited for until Envoy serves it."""
            pki.rotate(edge.certs, "edge")
            new = file_serial(edge.certs / "edge.crt")
            wait_until(
                lambda: handshake(edge.layout.https_port, edge.ctx(), BILLING).serial == new,
                10,
                what=what,
            )
            served.append(new)

        started = time.monotonic()
        for t in threads:
            t.start()
        try:
            for i in range(1, reloads + 1):
                edge.layout.policy_file.write_text(healthz_says(edge, f"ok {i}"))
                wait_until(
                    lambda i=i: edge.get("/healthz").text == f"ok {i}",
                    10,
                    what=f"reload {i} live in Envoy",
                )
                if i % every == 0 and len(served) < rotations:
                    rotate(f"rotation {len(served) + 1} live in Envoy")
            while len(served) < rotations:  # more rotations than reloads
                rotate("rotation live in Envoy")
            progress = sum(lp.ok for lp in kept + fresh)
            wait_until(lambda: sum(lp.ok for lp in kept + fresh) > progress + 10, 10, what="load")
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        seconds = time.monotonic() - started
        requests = sum(lp.ok + len(lp.failures) for lp in kept + fresh)
        failures = [f for lp in kept + fresh for f in lp.failures]
        dropped = sum(lp.conn.connects - 1 for lp in kept)
        status = edge.server.status()["reload"]
        figures(
            "reloads-and-rotations",
            reloads=reloads,
            rotations=len(served),
            seconds=f"{seconds:.1f}",
            requests=requests,
            per_second=f"{requests / seconds:.0f}",
            new_connections=sum(lp.conn.connects for lp in fresh),
            failed=len(failures),
            dropped=dropped,
            reload_successes=status["successes"] - reload_before["successes"],
            reload_failures=status["failures"] - reload_before["failures"],
            listener_churn_peak=sampler.peak,
        )
        assert failures == [], failures[:5]
        assert dropped == 0, [lp.conn.connects for lp in kept]
        assert all(lp.ok > 10 for lp in kept + fresh), [lp.ok for lp in kept + fresh]
        assert sum(lp.conn.connects for lp in fresh) > 20
        assert len(set(served)) == rotations
        assert sampler.peak == dict.fromkeys(LISTENER_CHURN, 0), sampler.peak
        assert status["errors"] == [] and status["failures"] == reload_before["failures"]
        assert status["successes"] >= reload_before["successes"] + reloads + rotations
        rejected = edge.envoy.stats(r"update_rejected$")
        assert not any(rejected.values()), rejected
    finally:
        edge.upstream.stop()


def healthz_says(edge: TlsEdge, body: str) -> str:
    text = edge.layout.policy()
    old = 'body: "ok\\n"'
    assert old in text
    return text.replace(old, f'body: "{body}"')


# -- 5. the guard's Redis stopped and started under load -------------------------------------


def phase(load: Load, guard: Any, what: str) -> None:
    """One phase of an outage test: at least a second and 40 requests, the guard up."""
    holds_for(guard.proc.alive, 1.0, what=f"the guard stays up ({what})")
    wait_until(load.flowing(40), 20, what=f"load flowing ({what})")


@pytest.mark.parametrize("count", short_and_long(2, 10))
@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_outage_under_load(
    mode: str,
    count: int,
    procs: ProcessGroup,
    tmp_path: Path,
    upstream: Callable[[str], Upstream],
) -> None:
    """Envoy -> jwt_authn -> ext_authz (``xdsplane guard --redis``, replay protection) ->
    upstream, under load where every request carries a new token. ``outages`` times Redis
    is stopped (SIGTERM) and started again on the same port. While it is up every request
    is served; while it is down the guard does what it was configured to: ``closed``
    refuses with 503 (x-guard-reason store_unavailable), ``open`` lets requests through;
    once it is back the guard uses it again without being restarted (a token is refused
    the second time: the memory is Redis again)."""
    outages = count
    from test_guard import Guard, Redis, pki_dir
    from test_replay import POLICY

    from xdsplane import jwt

    echo = upstream("echo")
    redis = Redis(procs, tmp_path).start()
    certs = pki_dir(tmp_path)  # POLICY reaches the guard over mTLS with ../certs
    guard = Guard(
        procs,
        "guard",
        "--redis",
        redis.url,
        *(["--fail-open"] if mode == "open" else []),
        certs=certs,
    )
    guard.launch()
    folder = tmp_path / "policy"
    folder.mkdir()
    key = jwt.new_key()
    pki.write_atomic(tmp_path / "keys" / "jwks.json", jwt.jwks(key))
    port = free_port()
    (folder / "edge.yaml").write_text(
        POLICY.format(
            guard=f"{HOST}:{guard.port}",
            fail_open="false",  # Envoy's side: the guard itself is always up here
            issuer=jwt.DEFAULT_ISSUER,
            port=port,
            upstream=echo.port,
        )
        # What is tested is the guard's answer with Redis up or down, so Envoy waits for it
        # long enough: the guard bounds its Redis calls to 1 s, and a loaded machine once
        # held a guard answer past test_replay's 500 ms (Envoy then says 403 itself).
        .replace("timeout: 500ms", "timeout: 3s")
    )
    server = XdsServer(procs, folder).launch()
    envoy = Envoy(procs, tmp_path, "edge-1", server.xds_address)
    server.wait_ready()
    guard.ready()
    envoy.start()
    try:

        def bearer() -> dict[str, str]:
            return {"Authorization": "Bearer " + jwt.sign(key, jwt.claims("alice"))}

        wait_until(lambda: http_get(port, "/x", headers=bearer()).status == 200, 20, what="served")
        token = bearer()
        assert http_get(port, "/x", headers=token).status == 200
        assert http_get(port, "/x", headers=token).status == 403  # replay, through Redis
        up_phases: list[tuple[float, float]] = []
        down_phases: list[tuple[float, float]] = []
        recoveries: list[float] = []
        with Load(port, "/x", headers=bearer) as load:
            for _ in range(outages):
                up_from = time.monotonic()
                phase(load, guard, "Redis up")
                up_phases.append((up_from, time.monotonic()))
                redis.proc.stop()  # SIGTERM: Redis closes its connections
                down_from = time.monotonic()
                phase(load, guard, "Redis down")
                down_phases.append((down_from, time.monotonic()))
                redis.start()
                back = time.monotonic()

                def recovered() -> bool:
                    if mode == "closed":
                        return http_get(port, "/x", headers=bearer()).status == 200
                    http_get(port, "/x", headers=bearer())
                    return bool(guard.health()["backend_up"])

                wait_until(recovered, 20, what="the guard uses Redis again")
                recoveries.append(time.monotonic() - back)
            up_from = time.monotonic()
            phase(load, guard, "Redis back")
            up_phases.append((up_from, time.monotonic()))
        up = [r for a, b in up_phases for r in load.between(a, b)]
        down = [r for a, b in down_phases for r in load.between(a, b)]
        served_up = [r for r in up if r[1] == 200]
        expected_down = 200 if mode == "open" else 503
        as_configured = [r for r in down if r[1] == expected_down]
        figures(
            f"redis-outage-fail-{mode}",
            outages=outages,
            load=load.summary(),
            redis_up_requests=len(up),
            redis_up_failed=len(up) - len(served_up),
            redis_down_requests=len(down),
            redis_down_answered_as_configured=len(as_configured),
            recovery_after_redis_start=spread(recoveries),
        )
        assert len(up) > 40 * outages and len(down) > 30 * outages, load.summary()
        assert served_up == up, [r for r in up if r[1] != 200][:5]
        assert as_configured == down, [r for r in down if r[1] != expected_down][:5]
        if mode == "closed":
            assert all("store" in r[2] for r in down), down[:3]
        # Recovery without restarts, and the guard's memory is shared through Redis again.
        assert (guard.proc.starts, server.proc.starts, envoy.proc.starts) == (1, 1, 1)
        token = bearer()
        assert http_get(port, "/x", headers=token).status == 200
        again = http_get(port, "/x", headers=token)
        assert (again.status, again.headers.get("x-guard-reason")) == (403, "replay")
        assert guard.health()["backend_up"] is True
    finally:
        guard.close()
