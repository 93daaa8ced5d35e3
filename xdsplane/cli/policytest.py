"""``xdsplane test``: a policy's cases run against one real Envoy (xdsplane.policytest)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from xdsplane.cli.common import Sub, add_envoy_binary


def add_test(sub: Sub) -> None:
    p = sub.add_parser(
        "test",
        help="run a policy's cases (requests and what must come back) against a real Envoy",
        description="Start one real Envoy on exactly the config NODE would get from "
        "POLICY_DIR, run every request of the CASES_FILEs against it and check each answer. "
        "The run is hermetic: upstreams are replaced by local recorders, JWT keys, CAs and "
        "server certificates by ones of the run, the guard runs in memory, listeners bind "
        "free loopback ports. Exit status: 0 every case passed, 1 some failed, 2 bad input "
        "(a cases file, the policy, --node) or a run that could not start. See "
        "docs/testing.md for the cases format.",
    )
    p.add_argument("policy_dir", metavar="POLICY_DIR", help="the policy folder (as for serve)")
    p.add_argument("cases", metavar="CASES_FILE", nargs="+", help="YAML cases files")
    p.add_argument(
        "--node",
        metavar="ID",
        help="the node id whose config is tested (default: the folder's first node group, "
        "e.g. edge-* for the sample; its first glob names the node, * made 'test')",
    )
    p.add_argument(
        "--junit",
        metavar="FILE",
        help="also write JUnit XML: one testcase per case, failures with expected and got",
    )
    add_envoy_binary(p)


def cmd_test(args: argparse.Namespace) -> int:
    from xdsplane.policytest.junit import write_junit
    from xdsplane.policytest.run import PolicyTestError, run_cases

    started = time.monotonic()
    try:
        results = run_cases(
            Path(args.policy_dir),
            [Path(c) for c in args.cases],
            node=args.node,
            envoy_binary=args.envoy_binary,
        )
    except PolicyTestError as e:
        for line in e.lines:
            print(line)
        print("xdsplane test: nothing run", file=sys.stderr)
        return 2
    seconds = time.monotonic() - started
    for r in results:
        if r.passed:
            print(f"ok    {r.file}:{r.line}: {r.name}")
        else:
            print(f"FAIL  {r.file}:{r.line}: {r.name}")
            print(f"      expected: {r.expected}")
            print(f"      got:      {r.got}")
            if r.detail:
                print(f"      ({r.detail})")
    failed = sum(not r.passed for r in results)
    if args.junit:
        write_junit(Path(args.junit), results, seconds)
    print(
        f"{len(results) - failed} passed, {failed} failed ({len(results)} cases, one Envoy, "
        f"{seconds:.1f}s)",
        file=sys.stderr,
    )
    return 1 if failed else 0
