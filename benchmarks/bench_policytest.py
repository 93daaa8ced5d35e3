"""`xdsplane test` on the sample: N generated cases against one Envoy, per run.

    .venv/bin/python benchmarks/bench_policytest.py [--quick] [--cases N] [--runs N]

Each run is ``xdsplane.policytest.run_cases`` as the command calls it: stand-in secrets,
the pipeline, the rewritten bootstrap, recorders, the in-memory guard, one Envoy start and
every case (five kinds in turn: token to billing, ops certificate to admin, admin without a
certificate, expired token, strict host with a certificate). Reported: seconds per run
(p50, max), milliseconds per case, and this process's peak RSS (VmHWM; Envoy's own is
not counted).

Goal (issue 14): 50 cases "in a few seconds", read here as <= 5 s per run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, header, p50, table, verdict

from xdsplane.policytest.run import run_cases

GOAL = 5.0

KINDS = (
    ("/billing/i{i}", "jwt: {{sub: u{i}}}", "{{status: 200, upstream: billing}}", ""),
    ("/billing/admin/{i}", "client_certificate: {{uri: spiffe://example.com/ops/u{i}}}",
     "{{status: 200, upstream: billing}}", ""),
    ("/billing/admin/{i}", "", "{{status: 403, upstream: none}}", ""),
    ("/billing/x{i}", "jwt: {{sub: u{i}, exp: -1h}}", "{{status: 401}}", ""),
    ("/x{i}", "client_certificate: {{uri: spiffe://a/u{i}}}", "{{status: 200}}", "mtls."),
)  # fmt: skip


def cases_yaml(n: int) -> str:
    lines = ["cases:"]
    for i in range(n):
        path, extra, expect, prefix = KINDS[i % len(KINDS)]
        more = f", {extra.format(i=i)}" if extra else ""
        lines.append(f"  - name: case {i}")
        lines.append(
            f"    request: {{host: {prefix}billing.example.com, path: {path.format(i=i)}{more}}}"
        )
        lines.append(f"    expect: {expect.format(i=i)}")
    return "\n".join(lines) + "\n"


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--runs", type=int, default=None, help="default 5, quick 1")
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 5)
    print(header(f"bench_policytest: {args.cases} cases against one Envoy", args.quick))
    seconds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="xdsplane-bench-policytest-") as tmp:
        cases = Path(tmp) / "cases.yaml"
        cases.write_text(cases_yaml(args.cases))
        for _ in range(runs):
            started = time.perf_counter()
            results = run_cases(ROOT / "snapshots", [cases])
            seconds.append(time.perf_counter() - started)
            failed = [r for r in results if not r.passed]
            if failed or len(results) != args.cases:
                for r in failed:
                    print(f"FAIL {r.name}: expected {r.expected}; got {r.got}")
                raise SystemExit("a generated case failed: the run is broken")
    rows = [
        [
            f"{args.cases} cases, one Envoy",
            f"{p50(seconds):.2f} s",
            f"{max(seconds):.2f} s",
            f"{p50(seconds) / args.cases * 1000:.1f} ms",
            runs,
            f"{vm_hwm_mb():.0f} MB",
            f"<= {GOAL:.0f} s",
            verdict(p50(seconds), GOAL),
        ]
    ]
    print(table(["run", "p50", "max", "per case", "runs", "VmHWM", "goal", "status"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
