"""A proxyless gRPC client, run as its own process: grpc C-core reads its xDS bootstrap
(GRPC_XDS_BOOTSTRAP_CONFIG) once per process, so each scenario gets a fresh one.

    python grpc_client_main.py TARGET METHOD calls N [TIMEOUT]
        N unary calls; prints one JSON object: {"answers": {backend: n}, "errors":
        {code: n}, "details": [first few error details], "seconds": [per call]}
    python grpc_client_main.py TARGET METHOD loop SECONDS
        calls every 10 ms for SECONDS, one JSON line per call: {"t": time.time(),
        "answer": backend or null, "code": status name or null}

A backend answers with its name (tests/grpc_helpers.py). Nothing of xdsplane is imported:
this is a program that knows only gRPC.
"""

from __future__ import annotations

import collections
import json
import sys
import time

import grpc
import grpc.experimental


def main() -> int:
    target, method, mode, arg = sys.argv[1:5]
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 10.0
    # xDS credentials: TLS to the backend as the Cluster says (certificate providers, gRFC
    # A29), plaintext when it says nothing.
    creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
    channel = grpc.secure_channel(target, creds)
    call = channel.unary_unary(method)
    if mode == "calls":
        answers: collections.Counter[str] = collections.Counter()
        errors: collections.Counter[str] = collections.Counter()
        details: list[str] = []
        seconds: list[float] = []
        for _ in range(int(arg)):
            start = time.monotonic()
            try:
                answers[call(b"{}", timeout=timeout).decode()] += 1
            except grpc.RpcError as e:
                errors[e.code().name] += 1
                if len(details) < 5:
                    details.append(str(e.details()))
            seconds.append(round(time.monotonic() - start, 4))
        out = {"answers": answers, "errors": errors, "details": details, "seconds": seconds}
        print(json.dumps(out))
        return 0
    end = time.monotonic() + float(arg)
    while time.monotonic() < end:
        line: dict[str, object] = {"t": time.time(), "answer": None, "code": None}
        try:
            line["answer"] = call(b"{}", timeout=2).decode()
        except grpc.RpcError as e:
            line["code"] = e.code().name
        print(json.dumps(line), flush=True)
        time.sleep(0.01)
    return 0


if __name__ == "__main__":
    sys.exit(main())
