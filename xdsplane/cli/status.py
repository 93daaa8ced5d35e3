"""``xdsplane status``: what a running server serves, from its /status."""

from __future__ import annotations

import argparse
import json
import sys

from xdsplane.cli.common import Sub


def add_status(sub: Sub) -> None:
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


def cmd_status(args: argparse.Namespace) -> int:
    import urllib.request

    from xdsplane.bootstrap import split_address
    from xdsplane.redact import escape_control
    from xdsplane.statuspage import status_lines

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
        for line in status_lines(data):
            print(escape_control(line))
    return 0
