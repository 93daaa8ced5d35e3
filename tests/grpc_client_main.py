"""A proxyless gRPC client, run as its own process: grpc C-core reads its xDS bootstrap
(GRPC_XDS_BOOTSTRAP_CONFIG) once per process, so each scenario gets a fresh one.

    python grpc_client_main.py TARGET METHOD calls N [TIMEOUT]
        N unary calls; prints one JSON object: {"answers": {backend: n}, "errors":
        {code: n}, "details": [first few error details], "seconds": [per call]}
    python grpc_client_main.py TARGET METHOD calls N TIMEOUT hash:NAME
        the same, call i sending metadata NAME: k<i % 32>; the summary adds "by_key":
        {value: sorted distinct backends}
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
    hash_header = sys.argv[6].removeprefix("hash:") if len(sys.argv) > 6 else None
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
        by_key: dict[str, set[str]] = collections.defaultdict(set)
        for i in range(int(arg)):
            start = time.monotonic()
            metadata = [(hash_header, f"k{i % 32}")] if hash_header else None
            try:
                answer = call(b"{}", timeout=timeout, metadata=metadata).decode()
                answers[answer] += 1
                if metadata:
                    by_key[metadata[0][1]].add(answer)
            except grpc.RpcError as e:
                errors[e.code().name] += 1
                if len(details) < 5:
                    details.append(str(e.details()))
            seconds.append(round(time.monotonic() - start, 4))
        out = {"answers": answers, "errors": errors, "details": details, "seconds": seconds}
        out["by_key"] = {k: sorted(v) for k, v in by_key.items()}
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
