"""What an Envoy needs to start: ``bootstrap``, ``certs`` (development PKI), ``token``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xdsplane.cli.common import Sub


def add_bootstrap(sub: Sub) -> None:
    p = sub.add_parser(
        "bootstrap",
        help="print an Envoy bootstrap (YAML) that takes its config from this server over "
        "ADS, or with --grpc a gRPC xDS bootstrap (JSON)",
    )
    p.add_argument(
        "--grpc",
        action="store_true",
        help="print the bootstrap JSON of a proxyless gRPC client or xDS-enabled server "
        "(GRPC_XDS_BOOTSTRAP file or GRPC_XDS_BOOTSTRAP_CONFIG value; docs/grpc.md)",
    )
    p.add_argument(
        "--policy",
        metavar="DIR",
        help="with --grpc: the policy folder whose certificate providers the node's group "
        "needs (each secret its gRPC resources name, as a file_watcher instance)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="with --grpc: allow a plaintext xDS channel to a non-loopback --xds-address",
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


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from xdsplane.bootstrap import XdsClientTls, bootstrap, to_yaml

    if args.grpc:
        from xdsplane.cli.grpc_bootstrap import cmd_grpc_bootstrap

        return cmd_grpc_bootstrap(args)
    if args.policy or args.insecure:
        print("xdsplane bootstrap: --policy and --insecure go with --grpc", file=sys.stderr)
        return 2

    try:
        tls = XdsClientTls.from_flags(args.tls_cert, args.tls_key, args.ca, args.sni)
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


def add_certs(sub: Sub) -> None:
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
        "rotate",
        help="re-issue NAME in place: new key and serial, same SANs and issuer (and a new "
        "NAME.ocsp.der when there is one)",
    )
    r.add_argument("name", metavar="NAME")
    r.add_argument("--dir", default="certs", help="default: certs")
    r.add_argument("--days", type=int, default=None, help="default: the old lifetime")
    o = certs.add_parser(
        "ocsp",
        help="write NAME.ocsp.der: an OCSP response for NAME signed by its CA, to staple "
        "(the secret's ocsp_staple)",
    )
    o.add_argument("name", metavar="NAME")
    o.add_argument("--dir", default="certs", help="default: certs")
    o.add_argument("--days", type=int, default=7, help="until its next update (default: 7)")
    o.add_argument("--revoked", action="store_true", help="say revoked (to test refusals)")


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
        elif args.certs_command == "ocsp":
            path = pki.ocsp_response(directory, args.name, args.days, args.revoked)
            status = "revoked" if args.revoked else "good"
            print(f"wrote {path} ({status}, next update in {args.days} days)")
        else:
            path = pki.rotate(directory, args.name, args.days)
            print(f"rotated {path}")
    except pki.PkiError as e:
        print(f"xdsplane certs: {e}", file=sys.stderr)
        return 1
    return 0


def add_token(sub: Sub) -> None:
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
