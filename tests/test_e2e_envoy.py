"""End-to-end: a real Envoy 1.40, bootstrapped by ``xdsplane bootstrap``, served by
``xdsplane serve`` over ADS (state of the world and delta), answering HTTP through what it
was sent.

Each test writes its snapshot folder under tmp_path, starts the server and Envoy on free
ports, and checks behaviour through HTTP answers, Envoy's admin API and our /status.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from harness import (
    Envoy,
    Prober,
    ProcessGroup,
    Upstream,
    XdsServer,
    answers,
    direct,
    eds_cluster,
    endpoints,
    free_port,
    holds_for,
    http_get,
    listener,
    logical_dns_cluster,
    regex_direct,
    route_config,
    to_cluster,
    wait_until,
    write_snapshot,
)

pytestmark = [
    pytest.mark.envoy,  # conftest: skipped without Envoy 1.40, failed in CI
]

VARIANTS = ["sotw", "delta"]
XDS_TYPES = ("CDS", "EDS", "LDS", "RDS")
# Envoy's counters that move each time it accepts an update of a type.
UPDATE_SUCCESS = r"\.update_success$"


class Edge:
    """One snapshot folder, one xdsplane server and one Envoy (node ``edge-a``)."""

    def __init__(
        self,
        procs: ProcessGroup,
        tmp_path: Path,
        variant: str,
        node: str = "edge-a",
    ) -> None:
        self.variant = variant
        self.node = node
        self.cfg = tmp_path / "snapshots"
        self.cfg.mkdir()
        self.port = free_port()  # Envoy's HTTP listener, as the snapshot files say
        self.procs = procs
        self.workdir = tmp_path
        self.server = XdsServer(procs, self.cfg)
        self.envoy: Envoy  # set by start()

    def write(self, resources: list[dict[str, Any]], name: str = "edge.yaml") -> None:
        write_snapshot(self.cfg / name, resources)

    def start(self) -> Edge:
        """Start the server and, from ``xdsplane bootstrap`` (run while the server is
        starting), Envoy; return once Envoy is LIVE and has ACKed every type."""
        self.server.launch()
        delta = self.variant == "delta"
        self.envoy = Envoy(self.procs, self.workdir, self.node, self.server.xds_address, delta)
        self.server.wait_ready()
        self.envoy.start()
        wait_until(lambda: self.server.settled(self.node), 10, what="all types ACKed")
        return self

    def get(self, path: str) -> tuple[int, str]:
        r = http_get(self.port, path)
        return r.status, r.text

    def wait_answer(self, path: str, text: str, status: int = 200) -> None:
        wait_until(answers(self.port, path, text, status), 10, what=f"GET {path} -> {text!r}")

    def types(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = self.server.stream(self.node)["types"]
        return result

    def type_when(
        self, short: str, predicate: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        """Wait until this node's /status for type ``short`` satisfies ``predicate``."""

        def check() -> dict[str, Any] | None:
            st = self.types()[short]
            return st if predicate(st) else None

        return wait_until(check, 10, what=what)

    def responses(self) -> dict[str, int]:
        return {t: s["responses"] for t, s in self.types().items()}

    def reloads(self) -> int:
        return int(self.server.status()["reload"]["successes"])


def base_resources(port: int, ups: dict[str, Upstream], hello: str = "hello v1") -> list[Any]:
    """Listener (RDS) -> route /app to EDS cluster alpha, /hello answered directly."""
    return [
        listener("http", port),
        route_config("http", [to_cluster("/app", "alpha"), direct("/hello", hello)]),
        eds_cluster("alpha"),
        endpoints("alpha", [ups["alpha"].port]),
    ]


# -- 1. serving and following edits --------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_envoy_serves_snapshot_and_follows_edits(
    variant: str, procs: ProcessGroup, tmp_path: Path, upstream: Callable[[str], Upstream]
) -> None:
    """LDS listener + RDS routes + CDS/EDS clusters reach Envoy and carry traffic; route,
    endpoint, route-removal and cluster-removal edits on disk change Envoy's answers."""
    ups = {n: upstream(n) for n in ("alpha", "beta", "gamma")}
    edge = Edge(procs, tmp_path, variant)
    port = edge.port

    def resources(
        app: str = "alpha",
        hello: str | None = "hello v1",
        beta_at: str = "beta",
        alpha: bool = True,
    ) -> list[Any]:
        routes = [to_cluster("/app", app)]
        if hello is not None:
            routes.append(direct("/hello", hello))
        out: list[Any] = [listener("http", port), route_config("http", routes)]
        if alpha:
            out += [eds_cluster("alpha"), endpoints("alpha", [ups["alpha"].port])]
        out += [eds_cluster("beta"), endpoints("beta", [ups[beta_at].port])]
        return out

    edge.write(resources())
    edge.start()

    # Listener from LDS, its routes from RDS, cluster from CDS, endpoints from EDS.
    stream = edge.server.stream(edge.node)
    assert stream["variant"] == variant
    assert set(stream["types"]) == set(XDS_TYPES)
    edge.wait_answer("/app", "alpha")
    edge.wait_answer("/hello", "hello v1")
    assert edge.envoy.dynamic_listener_names() == {"http"}
    assert edge.envoy.dynamic_cluster_names() == {"alpha", "beta"}
    assert edge.get("/nowhere")[0] == 404
    # ACKs are not answered: one response per type, and it stays that way.
    assert edge.responses() == dict.fromkeys(XDS_TYPES, 1)
    holds_for(lambda: edge.responses() == dict.fromkeys(XDS_TYPES, 1), 0.5, what="no resends")

    # RDS edit: /app now goes to the second cluster, /hello says something else.
    edge.write(resources(app="beta", hello="hello v2"))
    edge.wait_answer("/app", "beta")
    edge.wait_answer("/hello", "hello v2")

    # EDS edit: cluster beta's endpoint moves to the third upstream.
    edge.write(resources(app="beta", hello="hello v2", beta_at="gamma"))
    edge.wait_answer("/app", "gamma")

    # A removed route disappears; a removed cluster leaves Envoy (CDS is full state in
    # SotW, removed_resources in delta).
    edge.write(resources(app="beta", hello=None, beta_at="gamma", alpha=False))
    edge.wait_answer("/hello", "", status=404)
    wait_until(lambda: edge.envoy.dynamic_cluster_names() == {"beta"}, 10, what="alpha removed")
    assert edge.get("/app") == (200, "gamma")
    wait_until(lambda: edge.server.settled(edge.node), 10, what="all edits ACKed")
    assert all(t["nacks"] == 0 for t in edge.types().values()), edge.types()
    rejected = edge.envoy.stats(r"\.update_rejected$")
    assert not any(rejected.values()), rejected


# -- 2. NACKs --------------------------------------------------------------------------------


def _nack_rds(port: int, ups: dict[str, Upstream]) -> tuple[list[Any], list[Any]]:
    """RDS: a route whose safe_regex does not compile (RE2) is refused by Envoy."""
    bad = base_resources(port, ups, hello="bad")
    bad[1]["virtual_hosts"][0]["routes"].append(regex_direct("/(unclosed", "never"))
    return bad, base_resources(port, ups, hello="hello v3")


def _nack_lds(port: int, ups: dict[str, Upstream]) -> tuple[list[Any], list[Any]]:
    """LDS: two filter chains with the same match are refused by Envoy."""
    bad = base_resources(port, ups)
    bad[0] = listener("http", port, stat_prefix="bad", filter_chains=2)
    good = base_resources(port, ups)
    good[0] = listener("http", port, stat_prefix="edge")
    return bad, good


def _nack_cds(port: int, ups: dict[str, Upstream]) -> tuple[list[Any], list[Any]]:
    """CDS: a LOGICAL_DNS cluster with two endpoints is refused by Envoy.

    The good edit puts alpha back and adds a cluster (editing an EDS cluster in place
    runs into the warming problem of test_cluster_edit_applies_without_warming_timeout).
    """
    bad = base_resources(port, ups)
    bad[2] = logical_dns_cluster("alpha", [ups["alpha"].port, ups["alpha"].port])
    good = [*base_resources(port, ups), eds_cluster("beta"), endpoints("beta", [ups["alpha"].port])]
    return bad, good


NACKS: dict[str, tuple[Callable[..., tuple[list[Any], list[Any]]], str, str]] = {
    # kind: (bad and next good resources, words in Envoy's error, Envoy's rejected counter)
    "RDS": (_nack_rds, "/(unclosed", "http.http.rds.http.update_rejected"),
    "LDS": (_nack_lds, "filter chain", "listener_manager.lds.update_rejected"),
    "CDS": (_nack_cds, "LOGICAL_DNS", "cluster_manager.cds.update_rejected"),
}


@pytest.mark.parametrize("kind", list(NACKS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_nack_is_recorded_not_resent_and_next_edit_applies(
    variant: str,
    kind: str,
    procs: ProcessGroup,
    tmp_path: Path,
    upstream: Callable[[str], Upstream],
) -> None:
    """A resource the server accepts but Envoy rejects: the NACK is recorded per node and
    type, not answered with a resend, Envoy keeps the last good config, and the next good
    edit is ACKed."""
    ups = {"alpha": upstream("alpha")}
    edge = Edge(procs, tmp_path, variant)
    make, error_words, rejected_stat = NACKS[kind]
    bad, good = make(edge.port, ups)
    edge.write(base_resources(edge.port, ups))
    edge.start()
    edge.wait_answer("/hello", "hello v1")
    edge.wait_answer("/app", "alpha")
    good_version = edge.types()[kind]["acked_version"]
    reloads = edge.reloads()

    # The bad edit passes the server's checks (it reloads and serves it) ...
    edge.write(bad)
    wait_until(lambda: edge.reloads() > reloads, 10, what="bad edit reloaded")
    assert edge.server.status()["reload"]["errors"] == []

    # ... and Envoy refuses it: the server records the NACK for this node and type.
    status = edge.type_when(kind, lambda s: s["nacks"] == 1, what=f"{kind} NACK")
    assert error_words.lower() in status["last_nack"].lower(), status
    assert status["nacked_version"] == status["sent_version"] != good_version
    assert status["acked_version"] == good_version
    assert edge.envoy.stat(rejected_stat) == 1

    # It is not sent again, nothing else is pushed, and Envoy keeps the last good config.
    sent = edge.responses()
    holds_for(lambda: edge.responses() == sent, 1.0, what=f"no resend after the {kind} NACK")
    assert edge.types()[kind]["nacks"] == 1
    assert edge.get("/hello") == (200, "hello v1")
    assert edge.get("/app") == (200, "alpha")
    assert edge.envoy.stat(rejected_stat) == 1
    if kind == "LDS":  # Envoy lists the rejected listener beside the active one
        dump = edge.envoy.config_dump("dynamic_listeners")["configs"]
        (active,) = [c["active_state"]["listener"] for c in dump if "active_state" in c]
        assert len(active["filter_chains"]) == 1
        assert any("error_state" in c for c in dump), dump
    if kind == "CDS":
        (active,) = edge.envoy.config_dump("dynamic_active_clusters")["configs"]
        assert active["cluster"]["type"] == "EDS"

    # The next good edit is accepted: the ACKed version moves, no new NACK.
    edge.write(good)
    status = edge.type_when(
        kind,
        lambda s: (
            s["acked_version"] not in (good_version, "") and s["acked_version"] == s["sent_version"]
        ),
        what=f"{kind} ACK of the good edit",
    )
    assert status["nacks"] == 1
    assert status["responses"] == sent[kind] + 1
    if kind == "RDS":
        edge.wait_answer("/hello", "hello v3")
    if kind == "CDS":
        wait_until(lambda: edge.envoy.dynamic_cluster_names() == {"alpha", "beta"}, 10)
    assert edge.get("/app") == (200, "alpha")
    assert edge.envoy.stat(rejected_stat) == 1
    wait_until(lambda: edge.server.settled(edge.node), 10, what="all types ACKed")


# -- 2b. editing a cluster whose endpoints did not change ------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_cluster_edit_applies_without_warming_timeout(
    variant: str, procs: ProcessGroup, tmp_path: Path, upstream: Callable[[str], Upstream]
) -> None:
    """Envoy rebuilds a changed cluster; the new one waits (warms) for its endpoints."""
    ups = {"alpha": upstream("alpha")}
    edge = Edge(procs, tmp_path, variant)
    edge.write(base_resources(edge.port, ups))
    edge.start()
    edge.wait_answer("/app", "alpha")
    cds_before = edge.types()["CDS"]["acked_version"]

    # Only the cluster's definition changes; its endpoints (EDS) stay the same.
    edited = base_resources(edge.port, ups)
    edited[2] = {**eds_cluster("alpha"), "connect_timeout": "2.500s"}
    edge.write(edited)

    def applied() -> bool:
        dump = edge.envoy.config_dump("dynamic_active_clusters")
        timeouts = {c["cluster"]["name"]: c["cluster"]["connect_timeout"] for c in dump["configs"]}
        return timeouts == {"alpha": "2.500s"}

    # Not the 15 s initial_fetch_timeout: the push takes milliseconds (bench_propagation.py
    # measures it). The ceiling is half that timeout, so a busy machine cannot fail the
    # test while a cluster left warming until the timeout still does; init_fetch_timeout
    # staying 0 is the direct proof.
    wait_until(applied, 7.5, what="the edited cluster becomes active in Envoy")
    assert edge.envoy.stat("cluster.alpha.init_fetch_timeout") == 0
    assert edge.envoy.config_dump("dynamic_warming_clusters").get("configs", []) == []
    wait_until(lambda: edge.server.settled(edge.node), 10, what="CDS ACKed")
    assert edge.types()["CDS"]["acked_version"] != cds_before
    assert edge.get("/app") == (200, "alpha")


# -- 3. control-plane restart -----------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_restart_keeps_envoy_serving_and_pushes_nothing_new(
    variant: str, procs: ProcessGroup, tmp_path: Path, upstream: Callable[[str], Upstream]
) -> None:
    """SIGTERM, restart with the same files: Envoy serves on while the server is down,
    reconnects, and the server, seeing Envoy already holds the current versions, sends
    nothing: Envoy's update_success counters (CDS, LDS, RDS, per-cluster EDS) do not move.

    Envoy reconnects with its jittered backoff (500 ms doubling, 30 s max), 0.5-5 s after
    the server's 1-2 s startup: generous timeouts. SIGKILL is covered by
    test_edit_made_while_server_down_reaches_envoy_on_reconnect; SIGTERM costs the
    server's 5 s gRPC grace while Envoy's stream is open.
    """
    ups = {"alpha": upstream("alpha")}
    edge = Edge(procs, tmp_path, variant)
    edge.write(base_resources(edge.port, ups))
    edge.start()
    edge.wait_answer("/app", "alpha")
    envoy = edge.envoy
    before = envoy.stats(UPDATE_SUCCESS)
    assert before["cluster_manager.cds.update_success"] == 1
    assert before["listener_manager.lds.update_success"] == 1
    assert before["http.http.rds.http.update_success"] == 1
    assert before["cluster.alpha.update_success"] == 1
    first_connected = edge.server.stream(edge.node)["connected_at"]

    with Prober(edge.port, "/app") as probe:
        assert edge.server.stop(timeout=15.0) == 0  # SIGTERM
        # Envoy notices and keeps serving what it has.
        wait_until(lambda: not envoy.connected(), 10, what="Envoy sees the server gone")
        served_while_down = len(probe.results)
        wait_until(lambda: len(probe.results) >= served_while_down + 5, 5, what="requests")

        edge.server.start()
        stream = wait_until(lambda: edge.server.stream(edge.node), 30, what="Envoy reconnects")
        wait_until(envoy.connected, 10, what="Envoy connected_state")
        # Envoy resubscribes to every type; give the server the chance to (wrongly) push.
        wait_until(
            lambda: set(edge.server.stream(edge.node)["types"]) == set(XDS_TYPES),
            10,
            what="all types resubscribed",
        )
        holds_for(lambda: envoy.stats(UPDATE_SUCCESS) == before, 0.5, what="no update")
    assert probe.results, "the prober made no requests"
    assert probe.failures("alpha") == [], probe.failures("alpha")[:5]
    assert stream["variant"] == variant
    assert stream["connected_at"] > first_connected

    after = envoy.stats(UPDATE_SUCCESS)
    moved = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    assert moved == {}, f"update_success moved after the reconnect: {moved}"
    assert all(s["responses"] == 0 for s in edge.types().values()), edge.types()

    # The new stream works: the next edit reaches Envoy.
    edge.write(base_resources(edge.port, ups, hello="after the restart"))
    edge.wait_answer("/hello", "after the restart")


@pytest.mark.parametrize("variant", VARIANTS)
def test_edit_made_while_server_down_reaches_envoy_on_reconnect(
    variant: str, procs: ProcessGroup, tmp_path: Path, upstream: Callable[[str], Upstream]
) -> None:
    """SIGKILL, edit, restart: Envoy serves throughout, reconnects claiming the versions it
    holds, and only what changed meanwhile (the route configuration) is sent: RDS
    update_success moves by one, nothing else."""
    ups = {"alpha": upstream("alpha")}
    edge = Edge(procs, tmp_path, variant)
    edge.write(base_resources(edge.port, ups))
    edge.start()
    edge.wait_answer("/hello", "hello v1")
    before = edge.envoy.stats(UPDATE_SUCCESS)

    with Prober(edge.port, "/app") as probe:
        edge.server.kill()
        wait_until(lambda: not edge.envoy.connected(), 10, what="Envoy sees the server gone")
        edge.write(base_resources(edge.port, ups, hello="edited while down"))
        assert edge.get("/hello") == (200, "hello v1")
        edge.server.start()
        wait_until(lambda: edge.server.stream(edge.node), 30, what="Envoy reconnects")
        edge.wait_answer("/hello", "edited while down")
    assert probe.results, "the prober made no requests"
    assert probe.failures("alpha") == [], probe.failures("alpha")[:5]
    wait_until(lambda: edge.server.settled(edge.node, ["RDS"]), 10, what="RDS ACKed")
    rds = "http.http.rds.http.update_success"
    holds_for(
        lambda: edge.envoy.stats(UPDATE_SUCCESS) == {**before, rds: before[rds] + 1},
        0.5,
        what="only RDS updated",
    )
    assert edge.get("/app") == (200, "alpha")
    assert {t: s["responses"] for t, s in edge.types().items() if s["responses"]} == {"RDS": 1}


# -- 4. per-node snapshots --------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_nodes_get_their_own_snapshots(
    variant: str, procs: ProcessGroup, tmp_path: Path, upstream: Callable[[str], Upstream]
) -> None:
    """Files with different ``nodes:`` give two Envoys different snapshots (plus the shared
    file's resources); an edit for one node pushes nothing to the other."""
    shared = upstream("shared")
    cfg = tmp_path / "snapshots"
    cfg.mkdir()
    ports = {"edge-a": free_port(), "edge-b": free_port()}

    def node_file(node: str, hello: str) -> None:
        # Each node's own listener (own port) and routes; the cluster comes from common.yaml.
        resources = [
            listener("http", ports[node]),
            route_config("http", [to_cluster("/app", "shared"), direct("/who", hello)]),
        ]
        write_snapshot(cfg / f"{node}.yaml", resources, nodes=[node])

    write_snapshot(cfg / "common.yaml", [eds_cluster("shared"), endpoints("shared", [shared.port])])
    node_file("edge-a", "I am edge-a")
    node_file("edge-b", "I am edge-b")
    server = XdsServer(procs, cfg).launch()
    delta = variant == "delta"
    envoys = {n: Envoy(procs, tmp_path, n, server.xds_address, delta=delta) for n in ports}
    server.wait_ready()
    for e in envoys.values():
        e.proc.start()
    for n, e in envoys.items():
        wait_until(e.ready, 20, what=f"{n} ready")
        wait_until(partial(server.settled, n), 10, what=f"{n} ACKed everything")

    assert {s["node"]: s["group"] for s in server.streams()} == {
        "edge-a": "edge-a",
        "edge-b": "edge-b",
    }
    for n, port in ports.items():
        wait_until(answers(port, "/who", f"I am {n}"), 10, what=f"{n} /who")
        assert http_get(port, "/app").text == "shared"
    # Each Envoy has only its own listener (each file's listener is on its own port).
    for n, e in envoys.items():
        dump = e.config_dump("dynamic_listeners")
        bound = {
            c["active_state"]["listener"]["address"]["socket_address"]["port_value"]
            for c in dump["configs"]
        }
        assert bound == {ports[n]}, (n, bound)

    # An edit of edge-a's file reaches edge-a only: nothing is pushed to edge-b.
    b_before = envoys["edge-b"].stats(UPDATE_SUCCESS)
    b_responses = {t: s["responses"] for t, s in server.stream("edge-b")["types"].items()}
    node_file("edge-a", "I am edge-a, edited")
    wait_until(answers(ports["edge-a"], "/who", "I am edge-a, edited"), 10, what="edge-a edit")
    assert http_get(ports["edge-b"], "/who").text == "I am edge-b"

    def b_untouched() -> bool:
        responses = {t: s["responses"] for t, s in server.stream("edge-b")["types"].items()}
        return responses == b_responses and envoys["edge-b"].stats(UPDATE_SUCCESS) == b_before

    holds_for(b_untouched, 0.3, what="edge-b gets no push for edge-a's edit")
