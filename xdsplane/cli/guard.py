"""``xdsplane guard``: its flags and the call into ``xdsplane.guard.app``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from xdsplane.cli.common import Sub, add_logging, configure_logging


def add_guard(sub: Sub) -> None:
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
        "--http-address",
        metavar="HOST:PORT",
        help="also serve ext_authz over HTTP/1.1 here, for policies with guard.transport: "
        "http (Envoy's http_service; about a quarter of gRPC's CPU per check): the same "
        "decisions, store, metrics and mTLS as gRPC; the rate limit service stays gRPC "
        "(default: not served)",
    )
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
        "APIs (and the --http-address front) are served over TLS to callers whose client "
        "certificate chains to --client-ca and carries one of the --client-san values (URI "
        "SAN when the value has ://, else DNS SAN); others are refused. The files are "
        "reloaded when they change and on SIGHUP. Without them the guard does not start "
        "unless --insecure.",
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
        "--revocations",
        metavar="FILE",
        help="a YAML/JSON list of revocations (xdsplane revoke --file), watched: entries "
        "refused beside those in the store",
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
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N guard processes on --address (SO_REUSEPORT: the kernel spreads "
        "connections over them), supervised by this one: restarted with backoff when one "
        "exits, stopped with it. Worker K serves /metrics and /healthz on the "
        "--admin-address port + K. N > 1 needs --redis (default: 1, this process serves)",
    )
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    add_logging(p)


def cmd_guard(args: argparse.Namespace) -> int:
    from xdsplane.guard.app import GuardOptions, GuardStartupError, run
    from xdsplane.guard.service import GuardConfig
    from xdsplane.guard.workers import check_workers

    problem = check_workers(args.workers, args.redis)
    if problem is not None:
        print(f"xdsplane guard: {problem}", file=sys.stderr)
        return 2
    if args.workers > 1 and args.worker_index is None:
        from xdsplane.cli import parser
        from xdsplane.guard.workers import supervise

        argv = sys.argv[1:]
        if vars(parser().parse_args(argv)) != vars(args):
            print("xdsplane guard: --workers runs only as a command", file=sys.stderr)
            return 2
        return supervise(args, argv)
    configure_logging(args)
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
        revocations=Path(args.revocations) if args.revocations else None,
        redis=args.redis,
        redis_password_file=Path(args.redis_password_file) if args.redis_password_file else None,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        client_ca=Path(args.client_ca) if args.client_ca else None,
        client_sans=tuple(args.client_san),
        insecure=args.insecure,
        worker=args.worker_index,
        http_address=args.http_address,
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
