"""One process of proxyless gRPC client channels for bench_grpc.py (not run alone).

    python _grpc_worker.py TARGET CHANNELS SECONDS

Opens CHANNELS channels to xds:///TARGET (GRPC_XDS_BOOTSTRAP_CONFIG from the environment:
grpc C-core reads it once per process, and the channels of one process share its one ADS
stream). Calls every channel at once (futures), over and over, and prints one JSON line per
answer change: {"t": time.time(), "channel": i, "answer": name}, then "ready" once every
channel has answered. Exits after SECONDS.
"""

from __future__ import annotations

import json
import sys
import time

import grpc
import grpc.experimental


def main() -> int:
    target, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
    calls = [
        grpc.secure_channel(f"xds:///{target}", creds).unary_unary("/billing.Billing/Charge")
        for _ in range(count)
    ]
    last: list[str | None] = [None] * count
    ready = False
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        futures = [c.future(b"{}", timeout=5) for c in calls]
        for i, f in enumerate(futures):
            try:
                answer = f.result().decode()
            except grpc.RpcError:
                continue
            if answer != last[i]:
                last[i] = answer
                print(json.dumps({"t": time.time(), "channel": i, "answer": answer}), flush=True)
        if not ready and all(a is not None for a in last):
            ready = True
            print("ready", flush=True)
        time.sleep(0.002)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
