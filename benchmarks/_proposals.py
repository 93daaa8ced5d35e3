"""Run-time patches that measure a design before it is built, for the benchmarks only.

Nothing in xdsplane/ is changed: ``_serve_diag.py --proposals NAME,...`` applies these to
the imported modules before the server starts. (The prototypes of the fixes proposed at
``ca9dc85`` were removed once they had all landed; see git history.)

httpauthz the guard asked over HTTP/1.1 instead of gRPC (issue #15 item 4, measured with
          ``bench_guard.py --backends http-echo,http-redis``): the ext_authz filter gets an
          ``http_service`` (server_uri -> the guard's cluster, the same timeout, only
          ``x-jwt-payload`` forwarded: the top-level ``allowed_headers``, as
          ``authorization_request.allowed_headers`` is deprecated), the guard's cluster
          drops its HTTP/2 options (HTTP/1.1), and every JWT provider forwards its verified
          payload in ``x-jwt-payload`` (``forward_payload_header``). Not a fix: a
          measuring instrument for an HTTP front (see BENCHMARKS.md section 10).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PAYLOAD_HEADER = "x-jwt-payload"


def _httpauthz() -> None:
    from envoy.config.core.v3 import http_uri_pb2
    from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
    from envoy.type.matcher.v3 import string_pb2

    from xdsplane.policy.translate import guard, jwt
    from xdsplane.policy.translate.common import duration

    grpc_cluster = guard.cluster
    provider = jwt._provider

    def http1_cluster(spec: Any) -> Any:
        c = grpc_cluster(spec)
        del c.typed_extension_protocol_options[guard._HTTP_OPTIONS]  # HTTP/1.1, Envoy's default
        return c

    def http_filter_config(spec: Any, introspection_timeout: float = 0.0) -> Any:
        return ext_authz_pb2.ExtAuthz(
            http_service=ext_authz_pb2.HttpService(
                server_uri=http_uri_pb2.HttpUri(
                    uri=f"http://{spec.address}",
                    cluster=guard.CLUSTER,
                    timeout=duration(guard.timeout(spec, introspection_timeout)),
                )
            ),
            failure_mode_allow=spec.fail_open,
            allowed_headers=string_pb2.ListStringMatcher(
                patterns=[string_pb2.StringMatcher(exact=PAYLOAD_HEADER)]
            ),
        )

    def forwarding_provider(name: str, spec: Any, jwks: bytes) -> Any:
        p = provider(name, spec, jwks)
        p.forward_payload_header = PAYLOAD_HEADER
        return p

    guard.cluster = http1_cluster
    guard.filter_config = http_filter_config
    jwt._provider = forwarding_provider


PROPOSALS: dict[str, Callable[[], None]] = {"httpauthz": _httpauthz}


def apply(names: list[str]) -> None:
    for name in names:
        if name:
            PROPOSALS[name]()
