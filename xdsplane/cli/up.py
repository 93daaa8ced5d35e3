"""``xdsplane up`` (the sample gateway, supervised) and ``demo-billing`` (its upstream)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xdsplane.cli.common import Sub


def add_up(sub: Sub) -> None:
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
        "--grpc-billing-address",
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        help="the gRPC billing demo that proxyless clients reach through xds:/// (50051)",
    )
    p.add_argument(
        "--edge-address",
        default="127.0.0.1:8443",
        metavar="HOST:PORT",
        help="the policy's HTTPS listener, waited on before `up` reports ready (8443)",
    )
    p.add_argument("--guard-address", default="127.0.0.1:18081", metavar="HOST:PORT")
    p.add_argument("--guard-admin-address", default="127.0.0.1:19081", metavar="HOST:PORT")
    p.add_argument(
        "--guard-http-address",
        default="127.0.0.1:18082",
        metavar="HOST:PORT",
        help="the guard's HTTP ext_authz front, for guard.transport: http (18082)",
    )
    p.add_argument("--certs", default="certs", metavar="DIR", help="the dev PKI (default: certs)")
    p.add_argument("--delta", action="store_true", help="use incremental xDS")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for startup")


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
                grpc_billing_address=args.grpc_billing_address,
                edge_address=args.edge_address,
                guard_address=args.guard_address,
                guard_admin_address=args.guard_admin_address,
                guard_http_address=args.guard_http_address,
                certs=Path(args.certs),
                timeout=args.timeout,
                delta=args.delta,
            )
        )
    except UpError as e:
        print(f"xdsplane up: {e}", file=sys.stderr)
        return 1


def add_demo(sub: Sub) -> None:
    p = sub.add_parser(
        "demo-billing",
        help="run the demo billing service (echoes what it received as JSON), over HTTP and gRPC",
        description="The upstream the sample routes to. With --cert/--key it serves TLS; with "
        "--client-ca too it requires a client certificate from that CA (mTLS). With "
        "--grpc-address it also serves billing.Billing (Charge, Refund, List) over gRPC "
        "(plaintext), the backend of the sample's proxyless gRPC clients.",
    )
    p.add_argument("--address", default="127.0.0.1:9443", metavar="HOST:PORT")
    p.add_argument("--cert", metavar="FILE", help="server certificate (PEM)")
    p.add_argument("--key", metavar="FILE", help="its private key (PEM)")
    p.add_argument("--client-ca", metavar="FILE", help="require client certificates of this CA")
    p.add_argument(
        "--grpc-address",
        metavar="HOST:PORT",
        help="also serve the gRPC billing demo here (the sample's is 127.0.0.1:50051)",
    )


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
    grpc_server = None
    if args.grpc_address:
        from xdsplane import grpcdemo

        try:
            grpc_server = grpcdemo.start(args.grpc_address)
        except (OSError, RuntimeError) as e:
            server.shutdown()
            print(f"xdsplane demo-billing: --grpc-address: {e}", file=sys.stderr)
            return 1
        print(f"demo billing on grpc://{args.grpc_address} (billing.Billing)", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"demo billing on {'https' if tls else 'http'}://{host}:{port}/", flush=True)
    done.wait()
    server.shutdown()
    if grpc_server is not None:
        grpc_server.stop(None)
    return 0
