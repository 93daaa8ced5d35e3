"""Commands for reviewers and assessors: ``routes`` (the access matrix) and ``report`` (an
evidence page: the matrix, the policy test cases' results, commit and certificates)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from xdsplane.cli.common import Sub, add_envoy_binary


def add_routes(sub: Sub) -> None:
    p = sub.add_parser(
        "routes",
        help="print the access matrix: who may reach each listener, host and route",
        description="Load DIR as `serve` would and print, for every listener, host and route, "
        "what a request needs to get through: the client certificate (required at the "
        "handshake, required by the route, optional, off) and the SANs allowed, the JWT "
        "provider and its audiences, replay protection, local and global rate limits, the "
        "RBAC policies Envoy enforces and those it only logs (shadow), the upstream and "
        "whether it is reached over mTLS, and the TLS versions. Read from the policy the "
        "translator uses, so it says what Envoy is given (docs/audit.md).",
        epilog="exit status: 0 printed, 1 the folder does not load or no group selects --node.",
    )
    p.add_argument("dir", metavar="POLICY_DIR")
    p.add_argument("--node", metavar="ID", help="only the node group this Envoy node id gets")
    p.add_argument("--cluster", default="", metavar="NAME", help="its node cluster (default: ID)")
    p.add_argument(
        "--format",
        choices=["table", "json", "markdown"],
        default="table",
        help="table (default, aligned text), json (one object per route), markdown",
    )


def matrix_groups(
    snapshots: Any, node: str | None, cluster: str = ""
) -> list[dict[str, Any]] | None:
    """The access matrix of each node group (of ``node``'s only), as JSON; None: no group
    selects ``node``."""
    from xdsplane.policy.matrix import access_matrix

    groups = list(snapshots.groups)
    if node is not None:
        g = snapshots.group_for(node, cluster or node)
        if g is None:
            return None
        groups = [g]
    return [
        {
            "group": g.name,
            "nodes": list(g.globs) if g.globs is not None else None,
            "routes": [r.as_json() for r in access_matrix(g.policy)] if g.policy else [],
        }
        for g in groups
    ]


def cmd_routes(args: argparse.Namespace) -> int:
    from xdsplane import pipeline
    from xdsplane.policy import matrix_render

    result = pipeline.load(Path(args.dir))
    for line in result.errors:
        print(line, file=sys.stderr)
    if result.snapshots is None:
        print(f"xdsplane routes: {args.dir} does not load", file=sys.stderr)
        return 1
    groups = matrix_groups(result.snapshots, args.node, args.cluster)
    if groups is None:
        print(f"no file in {args.dir} selects node {args.node!r}", file=sys.stderr)
        return 1
    if args.format == "json":
        sys.stdout.write(matrix_render.dumps(groups))
        return 0
    render = matrix_render.markdown if args.format == "markdown" else matrix_render.table
    for i, g in enumerate(groups):
        if i:
            print()
        title = f"nodes {g['group']}"
        print(f"## {title}\n" if args.format == "markdown" else f"{title}:")
        for line in render(g["routes"]):
            print(line)
    return 0


def add_report(sub: Sub) -> None:
    p = sub.add_parser(
        "report",
        help="write an evidence page for an assessor: access matrix, test cases run, "
        "commit, certificates",
        description="Run the cases files against a real Envoy serving POLICY_DIR (as `xdsplane "
        "test` does) and write one self-contained HTML page (inline CSS, no script, no "
        "external resource) with the access matrix, each case and its result, the policy's git "
        "commit (and whether the folder has uncommitted changes), each served certificate's "
        "subject and expiry (never a key), when it was generated and by which xdsplane "
        "version (docs/audit.md).",
        epilog="exit status: 0 written and every case passed, 1 written but a case failed, or "
        "the folder does not load (nothing written), 2 bad arguments or cases, or no Envoy "
        "to run them (nothing written).",
    )
    p.add_argument("dir", metavar="POLICY_DIR")
    p.add_argument("cases", metavar="CASES_FILE", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="the HTML file")
    p.add_argument(
        "--node",
        metavar="ID",
        help="the node id whose config is tested and shown (default: as `xdsplane test`, "
        "the folder's first node group; the matrix then shows every group)",
    )
    add_envoy_binary(p)


def cmd_report(args: argparse.Namespace) -> int:
    from xdsplane.policytest import report
    from xdsplane.policytest.run import PolicyTestError

    runner = report.default_runner(args.envoy_binary)
    try:
        evidence = report.collect(Path(args.dir), list(args.cases), args.node, runner)
    except PolicyTestError as e:
        for line in e.lines:
            print(line, file=sys.stderr)
        print("xdsplane report: no case run, nothing written", file=sys.stderr)
        return 2
    except report.NotLoaded as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        print(f"xdsplane report: {e}", file=sys.stderr)
        return 1
    report.write(args.out, evidence)
    failed = [r for r in evidence.results if not r.passed]
    print(
        f"wrote {args.out}: {len(evidence.results)} case(s), {len(failed)} failed",
        file=sys.stderr,
    )
    return 1 if failed or not evidence.results else 0
