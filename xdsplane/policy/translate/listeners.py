"""Listeners -> Listener: one filter chain per host on TLS listeners, chosen by SNI."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import extension_pb2, substitution_format_string_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2 as cel_filter_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.formatter.cel.v3 import cel_pb2
from envoy.extensions.rbac.principals.mtls_authenticated.v3 import mtls_authenticated_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from xdsplane.names import EXT_AUTHZ_NAMESPACE, GUARD_REASON_KEY, JTI_HASH_KEY, JWT_PAYLOAD_KEY
from xdsplane.policy.model import AccessLog, Guard, Host, IntrospectionProvider, Listener, Tls
from xdsplane.policy.translate import authz, guard, introspection, jwt, otlp, ratelimit
from xdsplane.policy.translate.common import (
    ads,
    pack,
    sds,
    socket_address,
    tls_params,
    transport_socket,
)
from xdsplane.policy.translate.routes import route_config_name

HCM = "envoy.filters.network.http_connection_manager"

# What every access log line says, JSON keys -> Envoy command operators.
ACCESS_LOG_FIELDS: dict[str, str] = {
    "time": "%START_TIME%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "method": "%REQ(:METHOD)%",
    "authority": "%REQ(:AUTHORITY)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "duration_ms": "%DURATION%",
    "route": "%ROUTE_NAME%",
    "upstream": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "sni": "%REQUESTED_SERVER_NAME%",
    "tls_version": "%DOWNSTREAM_TLS_VERSION%",
    # Presented and validated are the same on xdsplane's hosts: a host that asks for client
    # certificates verifies them (a bad one ends the handshake; nothing is accepted
    # untrusted) and never resumes sessions, where validation would not run again.
    "client_cert_presented": "%CEL(connection.mtls)%",
    "client_cert_validated": "%CEL(connection.mtls)%",
    "client_cert_subject": "%DOWNSTREAM_PEER_SUBJECT%",
    "client_cert_uri_san": "%DOWNSTREAM_PEER_URI_SAN%",
    "client_cert_dns_san": "%DOWNSTREAM_PEER_DNS_SAN%",
    "client_cert_fingerprint": "%DOWNSTREAM_PEER_FINGERPRINT_256%",
    "client_cert_expiry": "%DOWNSTREAM_PEER_CERT_V_END%",
    # Route access rules (translate/authz.py): the RBAC policy that refused the request
    # (client-certificate, deny-N, no-allow-rule), and in shadow mode what would have happened.
    "access_denied_by": authz.metadata_operator("enforced_effective_policy_id"),
    "access_shadow": authz.metadata_operator("shadow_engine_result"),
    "access_shadow_denied_by": authz.metadata_operator("shadow_effective_policy_id"),
    # Who, by token: the verified JWT's sub (jwt_authn's payload metadata, so never a claim
    # of an unverified token), and what the guard returned as ext_authz dynamic metadata:
    # a hash of the token's jti (never the jti or the token) and its decision's reason.
    # Empty on routes without a token or without the guard.
    "jwt_sub": f"%DYNAMIC_METADATA({jwt.FILTER}:{JWT_PAYLOAD_KEY}:sub)%",
    "jti_hash": f"%DYNAMIC_METADATA({EXT_AUTHZ_NAMESPACE}:{JTI_HASH_KEY})%",
    "guard_reason": f"%DYNAMIC_METADATA({EXT_AUTHZ_NAMESPACE}:{GUARD_REASON_KEY})%",
    # Timing: the request's start (``time``), its whole duration, and the upstream's part
    # (first byte sent upstream to last byte received; empty when no upstream answered).
    "upstream_ms": "%COMMON_DURATION(US_TX_BEG:US_RX_END:ms)%",
}


HANDSHAKE_FAILED = "tls_handshake_failed"

# A request without a client certificate on a host whose client_certificate is optional
# (docs/observability.md): its access-log line says so in two extra fields, and Envoy counts
# it per host in http.<listener>/<host>.rbac.client_certificate_missing.shadow_denied
# (dots in the names become _: host_stat_prefix).
CERTIFICATE_MISSING = authz.CERTIFICATE_MISSING
MISSING_STAT_PREFIX = CERTIFICATE_MISSING
OPTIONAL_HOST_LOG_FIELDS: dict[str, str] = {
    "event": f"%CEL(connection.mtls?'request':'{CERTIFICATE_MISSING}')%",
    "client_certificate": "%CEL(connection.mtls?'presented':'missing')%",
}


def handshake_log_fields(listener: str) -> dict[str, str]:
    """What a failed-handshake line says, JSON keys -> Envoy command operators. ``reason``
    is BoringSSL's (e.g. ...:UNSUPPORTED_PROTOCOL:..., NO_SHARED_CIPHER, CERTIFICATE_VERIFY_
    FAILED, HTTP_REQUEST); ``flags`` NR: no host of the listener serves that SNI."""
    return {
        "time": "%START_TIME%",
        "event": HANDSHAKE_FAILED,
        "listener": listener,
        "client": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "sni": "%REQUESTED_SERVER_NAME%",
        "reason": "%DOWNSTREAM_TRANSPORT_FAILURE_REASON%",
        "flags": "%RESPONSE_FLAGS%",
    }


def _log_format(log: AccessLog, fields: Mapping[str, str], cel: bool) -> Any:
    if log.format == "json":
        fmt = substitution_format_string_pb2.SubstitutionFormatString(
            json_format=struct_pb2.Struct(
                fields={k: struct_pb2.Value(string_value=v) for k, v in fields.items()}
            )
        )
    else:
        line = " ".join(f"{k}={v}" for k, v in fields.items()) + "\n"
        fmt = substitution_format_string_pb2.SubstitutionFormatString(
            text_format_source={"inline_string": line}
        )
    if cel:
        fmt.formatters.append(
            extension_pb2.TypedExtensionConfig(
                name="envoy.formatter.cel", typed_config=pack(cel_pb2.Cel())
            )
        )
    return fmt


def access_log_fields(host: Host | None = None) -> dict[str, str]:
    """What a request's line (and OTLP record) says, JSON keys -> Envoy command operators."""
    if host is not None and host.client_certificate == "optional":
        return {**ACCESS_LOG_FIELDS, **OPTIONAL_HOST_LOG_FIELDS}
    return dict(ACCESS_LOG_FIELDS)


def access_logs(log: AccessLog, host: Host | None = None) -> list[Any]:
    """The file's logger, and with ``otlp`` the OpenTelemetry one: same fields."""
    fields = access_log_fields(host)
    fmt = _log_format(log, fields, cel=True)
    out = [
        accesslog_pb2.AccessLog(
            name="envoy.access_loggers.file",
            typed_config=pack(file_pb2.FileAccessLog(path=log.path, log_format=fmt)),
        )
    ]
    if log.otlp is not None:
        out.append(otlp.access_log(log.otlp, fields, cel=True))
    return out


def handshake_logs(log: AccessLog, listener: str) -> list[Any]:
    """The listener's own access log, for connections that never reach an HTTP connection
    manager: Envoy writes it for every connection, so it is filtered to those whose TLS
    handshake failed (a transport failure reason) or whose SNI no host serves (NR). Same
    file as the HTTP access log (Envoy shares one file per path, line by line)."""
    failed = accesslog_pb2.AccessLogFilter(
        extension_filter=accesslog_pb2.ExtensionFilter(
            name="envoy.access_loggers.extension_filters.cel",
            typed_config=pack(
                cel_filter_pb2.ExpressionFilter(
                    expression="connection.transport_failure_reason != ''"
                )
            ),
        )
    )
    no_chain = accesslog_pb2.AccessLogFilter(
        response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=["NR"])
    )
    fields = handshake_log_fields(listener)
    fmt = _log_format(log, fields, cel=False)
    handshake_failed = accesslog_pb2.AccessLogFilter(
        or_filter=accesslog_pb2.OrFilter(filters=[failed, no_chain])
    )
    out = [
        accesslog_pb2.AccessLog(
            name="envoy.access_loggers.file",
            filter=handshake_failed,
            typed_config=pack(file_pb2.FileAccessLog(path=log.path, log_format=fmt)),
        )
    ]
    if log.otlp is not None:
        out.append(otlp.access_log(log.otlp, fields, cel=False, log_filter=handshake_failed))
    return out


def _router() -> Any:
    return hcm_pb2.HttpFilter(
        name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())
    )


def _missing_certificate_counter() -> Any:
    """An RBAC filter with shadow rules only (it never refuses): its shadow policy "denies"
    exactly the requests on a connection without a validated client certificate, which
    Envoy counts in ``rbac.client_certificate_missing.shadow_denied`` under the host's HCM
    stat prefix (``....shadow_allowed`` counts the others). The prefix also keeps its
    dynamic metadata apart from the route access rules' ``shadow_engine_result``."""
    presented = rbac_pb2.Principal(
        custom=extension_pb2.TypedExtensionConfig(
            name="envoy.rbac.principals.mtls_authenticated",
            typed_config=pack(mtls_authenticated_pb2.Config(any_validated_client_certificate=True)),
        )
    )
    missing = rbac_pb2.Policy(
        permissions=[rbac_pb2.Permission(any=True)],
        principals=[rbac_pb2.Principal(not_id=presented)],
    )
    config = rbac_filter_pb2.RBAC(
        shadow_rules=rbac_pb2.RBAC(
            action=rbac_pb2.RBAC.DENY, policies={CERTIFICATE_MISSING: missing}
        ),
        shadow_rules_stat_prefix=MISSING_STAT_PREFIX,
    )
    return hcm_pb2.HttpFilter(name=authz.CERTIFICATE_MISSING_FILTER, typed_config=pack(config))


def _jwt_filters(
    names: list[str], providers: Mapping[str, jwt.Provider], more_headers: Sequence[str] = ()
) -> list[Any]:
    """Claim headers stripped (those of the JWT providers and ``more_headers``, the
    introspection providers'), then tokens checked: before RBAC and the router."""
    filters = []
    headers = sorted({*(jwt.forwarded_headers(names, providers) if names else []), *more_headers})
    if headers:
        filters.append(
            hcm_pb2.HttpFilter(name=jwt.STRIP_FILTER, typed_config=pack(jwt.strip_config(headers)))
        )
    if not names:
        return filters
    # The configuration, key sets included, comes over ECDS: a new JWKS leaves the Listener.
    filters.append(hcm_pb2.HttpFilter(name=jwt.FILTER, config_discovery=jwt.config_discovery()))
    return filters


def _rate_limit_filters(local: bool, global_guard: Guard | None) -> list[Any]:
    """After jwt_authn (the jwt_sub identity), before ext_authz: a refused request does not
    spend its token's one use."""
    filters = []
    if local:
        config = ratelimit.local_filter_config()
        filters.append(hcm_pb2.HttpFilter(name=ratelimit.LOCAL_FILTER, typed_config=pack(config)))
    if global_guard is not None:
        config = ratelimit.global_filter_config(global_guard)
        filters.append(hcm_pb2.HttpFilter(name=ratelimit.GLOBAL_FILTER, typed_config=pack(config)))
    return filters


def _http_filters(
    host: Host | None,
    jwt_names: list[str],
    providers: Mapping[str, jwt.Provider],
    ext_authz: Guard | None = None,
    rbac_hosts: Sequence[Host] = (),
    limits: tuple[bool, Guard | None] = (False, None),
    introspected: Mapping[str, IntrospectionProvider] | None = None,
) -> list[Any]:
    """``introspected``: the introspection providers (the HCM's routes may name some);
    ``ext_authz``: the guard that the HCM's replay-protected routes ask, if any;
    ``rbac_hosts``: the hosts whose routes the HCM serves (RBAC if any route has rules);
    ``limits``: (a route has a local rate limit, the guard asked for global ones)."""
    # jwt_authn first (the others read its claims); then the cheap local refusals (access
    # rules, rate limits) so that a refused request neither spends budget it was not granted
    # nor its token's one use at the guard (ext_authz, last before the router).
    filters = []
    if host is not None and host.client_certificate == "optional":
        # First: every request is counted, also those a later filter refuses.
        filters.append(_missing_certificate_counter())
    intro_names = introspection.providers_of(rbac_hosts)
    found = introspected or {}
    intro_headers = introspection.forwarded_headers(intro_names, found)
    if ext_authz is not None and ext_authz.transport == "http":
        # The headers Envoy adds to the guard's check request only: a client's own copies
        # never reach the guard (not in allowed_headers), nor, removed here, the upstream.
        intro_headers = [*intro_headers, *guard.HTTP_ONLY_HEADERS]
    filters.extend(_jwt_filters(jwt_names, providers, intro_headers))
    if authz.needs_rbac(rbac_hosts):
        filters.append(
            hcm_pb2.HttpFilter(name=authz.RBAC_FILTER, typed_config=pack(authz.filter_config()))
        )
    filters.extend(_rate_limit_filters(*limits))
    if ext_authz is not None:
        filters.append(
            hcm_pb2.HttpFilter(
                name=guard.FILTER,
                typed_config=pack(
                    guard.filter_config(
                        ext_authz, introspection.longest_timeout(intro_names, found)
                    )
                ),
            )
        )
    filters.append(_router())
    return filters


def _hcm(
    name: str,
    route_config: str,
    host: Host | None,
    log: AccessLog | None,
    jwt_names: list[str],
    providers: Mapping[str, jwt.Provider],
    ext_authz: Guard | None = None,
    rbac_hosts: Sequence[Host] = (),
    limits: tuple[bool, Guard | None] = (False, None),
    introspected: Mapping[str, IntrospectionProvider] | None = None,
) -> Any:
    m = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads(), route_config_name=route_config),
        http_filters=_http_filters(
            host, jwt_names, providers, ext_authz, rbac_hosts, limits, introspected
        ),
        use_remote_address=wrappers_pb2.BoolValue(value=True),
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        strip_any_host_port=True,
        # /admin%2Fx must not slip past a rule on /admin/ (Envoy's edge best practice).
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.UNESCAPE_AND_REDIRECT,
        forward_client_cert_details=hcm_pb2.HttpConnectionManager.SANITIZE,
    )
    if host is not None and host.client_certificate != "off":
        m.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
        m.set_current_client_cert_details.CopyFrom(
            hcm_pb2.HttpConnectionManager.SetCurrentClientCertDetails(
                subject=wrappers_pb2.BoolValue(value=True), uri=True, dns=True
            )
        )
    if log is not None:
        m.access_log.extend(access_logs(log, host))
    return listener_components_pb2.Filter(name=HCM, typed_config=pack(m))


def host_stat_prefix(listener: str, host: str) -> str:
    """The HCM stat prefix of a host's filter chain: one token, so that Envoy's tag
    extraction makes all of it the ``envoy_http_conn_manager_prefix`` label in
    /stats/prometheus (a dot would end the label and put the rest into the metric's name)."""
    return f"{listener}/{host}".replace(".", "_")


OCSP_POLICIES = {
    "lenient": tls_pb2.DownstreamTlsContext.LENIENT_STAPLING,
    "strict": tls_pb2.DownstreamTlsContext.STRICT_STAPLING,
    "must_staple": tls_pb2.DownstreamTlsContext.MUST_STAPLE,
}


def downstream_tls(tls: Tls, host: Host) -> Any:
    common = tls_pb2.CommonTlsContext(
        tls_params=tls_params(tls.min_version, tls.max_version, tls.cipher_suites),
        alpn_protocols=tls.alpn,
        tls_certificate_sds_secret_configs=[sds(host.certificate or "")],
    )
    if host.client_certificate != "off":
        common.validation_context_sds_secret_config.CopyFrom(sds(host.client_ca or ""))
    ctx = tls_pb2.DownstreamTlsContext(common_tls_context=common)
    if host.ocsp is not None:
        ctx.ocsp_staple_policy = OCSP_POLICIES[host.ocsp]
    if host.client_certificate != "off":
        ctx.require_client_certificate.CopyFrom(
            wrappers_pb2.BoolValue(value=host.client_certificate == "required")
        )
        # A resumed session skips certificate validation: never resume on these hosts.
        ctx.disable_stateless_session_resumption = True
        ctx.disable_stateful_session_resumption = True
    return ctx


def listener(
    spec: Listener,
    log: AccessLog | None,
    providers: Mapping[str, jwt.Provider] | None = None,
    guard_spec: Guard | None = None,
    introspected: Mapping[str, IntrospectionProvider] | None = None,
) -> Any:
    """``providers``: the JWT providers (with their JWKS) the listener's routes name;
    ``introspected``: the introspection providers they name (forwarded headers, timeout);
    ``guard_spec``: the policy's guard, for hosts with replay-protected routes."""
    found = providers or {}

    def ext_authz(hosts: list[Host]) -> Guard | None:
        return guard_spec if guard.needs_ext_authz(hosts) else None

    def limits(hosts: list[Host]) -> tuple[bool, Guard | None]:
        wanted = ratelimit.needs_global(hosts)
        return ratelimit.needs_local(hosts), (guard_spec if wanted else None)

    out = listener_pb2.Listener(name=spec.name, address=socket_address(spec.address))
    if spec.tls is None:
        names = jwt.providers_of(spec.hosts)
        hcm = _hcm(
            spec.name,
            route_config_name(spec),
            None,
            log,
            names,
            found,
            ext_authz(spec.hosts),
            rbac_hosts=spec.hosts,
            limits=limits(spec.hosts),
            introspected=introspected,
        )
        out.filter_chains.append(listener_components_pb2.FilterChain(name=spec.name, filters=[hcm]))
        return out
    if log is not None:
        out.access_log.extend(handshake_logs(log, spec.name))
    out.listener_filters.append(
        listener_components_pb2.ListenerFilter(
            name="envoy.filters.listener.tls_inspector",
            typed_config=pack(tls_inspector_pb2.TlsInspector()),
        )
    )
    for h in spec.hosts:
        chain = listener_components_pb2.FilterChain(
            name=f"{spec.name}/{h.name}",
            filters=[
                _hcm(
                    host_stat_prefix(spec.name, h.name),
                    route_config_name(spec, h),
                    h,
                    log,
                    jwt.providers_of([h]),
                    found,
                    ext_authz([h]),
                    rbac_hosts=[h],
                    limits=limits([h]),
                    introspected=introspected,
                )
            ],
            transport_socket=transport_socket(downstream_tls(spec.tls, h)),
        )
        names = [d for d in h.domains if d != "*"]
        if names and "*" not in h.domains:  # a host with "*" is the chain for any name
            chain.filter_chain_match.CopyFrom(
                listener_components_pb2.FilterChainMatch(server_names=names)
            )
        out.filter_chains.append(chain)
    return out
