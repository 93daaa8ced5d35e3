"""``xdsplane serve``: its flags (ADS limits, mTLS) and the call into ``xdsplane.app``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from xdsplane.cli.common import Sub, add_envoy_binary, add_logging, configure_logging


def add_serve(sub: Sub) -> None:
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
        "--poll",
        type=_positive_ms,
        metavar="MS",
        help="watch the policy folder by polling it every MS milliseconds (file times and "
        "sizes) instead of inotify: for a shared volume (NFS, SMB, some FUSE mounts) written "
        "from another host, which inotify never reports (docs/scaling.md). Default: inotify",
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
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="keep built raw resources in DIR across restarts, so that a restart does not "
        "parse unchanged raw snapshot files again (default: off). DIR is created 0700; one "
        "another user owns or others may write to is refused. Files holding key material "
        "(Secrets, inline private keys) and policy files are never written to it; see "
        "docs/deploy.md#disk-cache",
    )
    add_envoy_binary(p)
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
    p.add_argument(
        "--envoy-admin",
        action="append",
        default=[],
        metavar="[NAME=]HOST:PORT",
        help="an Envoy's admin address (repeatable): its per-host counts of requests with and "
        "without a client certificate (optional hosts) are read every 5 s and shown in "
        "/status, the status page and `xdsplane status`; loopback only (plain HTTP) unless "
        "--insecure. `xdsplane up` names the Envoy it starts",
    )
    add_logging(p)


def _positive_ms(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of milliseconds, >= 1")
    return value


def _add_limits(p: argparse.ArgumentParser) -> None:
    from xdsplane.gctune import YOUNG
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
    g.add_argument(
        "--write-budget",
        type=int,
        default=d.write_budget,
        metavar="BYTES",
        help="bytes of responses being encoded and written at once, all streams together, "
        "taken in the order the streams asked: what bounds memory when thousands of streams "
        "sync at once (a larger response is written alone); /status write_gate shows its "
        f"peak and how many writes waited (default: {d.write_budget})",
    )
    g.add_argument(
        "--write-stall",
        type=float,
        default=d.write_stall,
        metavar="SECONDS",
        help="how long one write may keep its place in --write-budget while its client does "
        "not read (HTTP/2 flow control); then it goes on outside the budget, counted in "
        f"/status write_gate stalled, so a stuck client delays others once at most "
        f"(default: {d.write_stall:g})",
    )
    g.add_argument(
        "--gc-young",
        type=int,
        default=YOUNG,
        metavar="N",
        help="allocations between two young garbage collections (Python's default is 700): "
        "larger lets the short-lived objects of a push to thousands of streams die before "
        "a collection looks at them, so fewer full collections walk every stream's objects; "
        f"/status gc shows the collections and their pauses (default: {YOUNG})",
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
        write_budget=args.write_budget,
        write_stall=args.write_stall,
    )
    if args.gc_young < 1:
        print(
            f"xdsplane serve: --gc-young must be at least 1, not {args.gc_young}", file=sys.stderr
        )
        return 2
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

    from xdsplane.tlsflags import all_or_none

    try:
        all_or_none(
            {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--client-ca": args.client_ca}
        )
    except ValueError as e:
        print(f"xdsplane serve: {e}", file=sys.stderr)
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
    if args.cache_dir:
        from xdsplane.pipeline.diskcache import CacheDirError, open_dir

        try:
            open_dir(Path(args.cache_dir))
        except CacheDirError as e:
            print(f"xdsplane serve: not starting: {e}", file=sys.stderr)
            return 2

    from xdsplane.envoystats import exposure, parse_admin

    try:
        envoy_admins = tuple(parse_admin(v) for v in args.envoy_admin)
    except ValueError as e:
        print(f"xdsplane serve: --envoy-admin {e}", file=sys.stderr)
        return 2
    names = [a.name for a in envoy_admins]
    if len(set(names)) != len(names):
        print("xdsplane serve: --envoy-admin: two Envoys with one name", file=sys.stderr)
        return 2
    exposed += exposure(list(envoy_admins))
    if exposed and not args.insecure:
        for reason in exposed:
            print(f"xdsplane serve: not starting: {reason}", file=sys.stderr)
        return 2
    configure_logging(args)
    stableread.install()
    opts = ServeOptions(
        config=Path(args.config),
        xds_address=args.xds_address,
        admin_address=args.admin_address,
        admin_allowed_hosts=tuple(args.admin_allowed_hosts),
        watch_step_ms=args.watch_step_ms,
        watch_poll_ms=args.poll,
        cert_warn_days=args.cert_warn_days,
        envoy_validate=args.envoy_validate,
        envoy_binary=args.envoy_binary,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        client_ca=Path(args.client_ca) if args.client_ca else None,
        limits=limits,
        insecure=args.insecure,
        envoy_admins=envoy_admins,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        gc_young=args.gc_young,
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
