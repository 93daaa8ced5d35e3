"""``xdsplane bootstrap --grpc``: the bootstrap JSON of a proxyless gRPC client or server."""

from __future__ import annotations

import argparse
import json
import sys
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any


def _providers(folder: str, node_id: str, cluster: str) -> dict[str, Any]:
    """The certificate providers of the node group ``node_id`` falls in (ValueError when the
    folder does not check out)."""
    from xdsplane.pipeline import load_policy
    from xdsplane.policy.grpc_providers import certificate_providers

    groups, errors = load_policy(Path(folder))
    if errors:
        shown = "; ".join(str(e) for e in errors[:3])
        raise ValueError(f"--policy {folder}: {len(errors)} error(s): {shown}")
    for group in groups:
        globs = group.nodes or ()
        if any(fnmatchcase(node_id, g) or fnmatchcase(cluster, g) for g in globs):
            return certificate_providers(group.policy)
    for group in groups:
        if group.nodes is None:
            return certificate_providers(group.policy)
    return {}


def cmd_grpc_bootstrap(args: argparse.Namespace) -> int:
    from xdsplane.bootstrap import XdsClientTls, grpc_bootstrap, split_address
    from xdsplane.exposure import is_loopback

    addresses = tuple(args.xds_address or ["127.0.0.1:18000"])
    cluster = args.cluster or args.node
    try:
        tls = XdsClientTls.from_flags(args.tls_cert, args.tls_key, args.ca, args.sni)
        if tls is None and not args.insecure:
            for addr in addresses:
                host, _ = split_address(addr)
                if not is_loopback(host):
                    raise ValueError(
                        f"--xds-address {addr} is not loopback and the xDS channel would be "
                        "plaintext (anyone on the way reads the configuration and can claim "
                        "this node's id): give --tls-cert, --tls-key and --ca, or --insecure"
                    )
        providers = _providers(args.policy, args.node, cluster) if args.policy else {}
        data = grpc_bootstrap(args.node, args.cluster, addresses, tls, providers)
    except ValueError as e:
        print(f"xdsplane bootstrap: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    return 0
