"""The policy schema. Names and defaults here are the stable, documented surface.

Every model forbids unknown keys and is strict about types (a port is a number, not a
string), so a typo is an error with its line, never a silently ignored setting.

One module per part of the policy file; everything is imported from here.
"""

from __future__ import annotations

from xdsplane.policy.model.common import (
    DURATION_PATTERN as DURATION_PATTERN,
)
from xdsplane.policy.model.common import (
    NAME_PATTERN as NAME_PATTERN,
)
from xdsplane.policy.model.common import (
    Address as Address,
)
from xdsplane.policy.model.common import (
    Duration as Duration,
)
from xdsplane.policy.model.common import (
    HttpMethod as HttpMethod,
)
from xdsplane.policy.model.common import (
    ListenAddress as ListenAddress,
)
from xdsplane.policy.model.common import (
    Model as Model,
)
from xdsplane.policy.model.common import (
    Name as Name,
)
from xdsplane.policy.model.common import (
    Regex as Regex,
)
from xdsplane.policy.model.common import (
    TlsVersion as TlsVersion,
)
from xdsplane.policy.model.common import (
    duration_seconds as duration_seconds,
)
from xdsplane.policy.model.common import (
    is_duration_field as is_duration_field,
)
from xdsplane.policy.model.common import (
    split_host_port as split_host_port,
)
from xdsplane.policy.model.grpcservers import (
    GRPC_METHOD_PATTERN as GRPC_METHOD_PATTERN,
)
from xdsplane.policy.model.grpcservers import (
    GrpcAddress as GrpcAddress,
)
from xdsplane.policy.model.grpcservers import (
    GrpcMethod as GrpcMethod,
)
from xdsplane.policy.model.grpcservers import (
    GrpcRbacRule as GrpcRbacRule,
)
from xdsplane.policy.model.grpcservers import (
    GrpcServer as GrpcServer,
)
from xdsplane.policy.model.grpcservers import (
    SanGlob as SanGlob,
)
from xdsplane.policy.model.grpcservices import (
    GRPC_STATUS_CODES as GRPC_STATUS_CODES,
)
from xdsplane.policy.model.grpcservices import (
    Authority as Authority,
)
from xdsplane.policy.model.grpcservices import (
    GrpcBackoff as GrpcBackoff,
)
from xdsplane.policy.model.grpcservices import (
    GrpcFault as GrpcFault,
)
from xdsplane.policy.model.grpcservices import (
    GrpcFaultAbort as GrpcFaultAbort,
)
from xdsplane.policy.model.grpcservices import (
    GrpcFaultDelay as GrpcFaultDelay,
)
from xdsplane.policy.model.grpcservices import (
    GrpcHash as GrpcHash,
)
from xdsplane.policy.model.grpcservices import (
    GrpcMethodName as GrpcMethodName,
)
from xdsplane.policy.model.grpcservices import (
    GrpcRetries as GrpcRetries,
)
from xdsplane.policy.model.grpcservices import (
    GrpcRetryOn as GrpcRetryOn,
)
from xdsplane.policy.model.grpcservices import (
    GrpcRoute as GrpcRoute,
)
from xdsplane.policy.model.grpcservices import (
    GrpcService as GrpcService,
)
from xdsplane.policy.model.grpcservices import (
    GrpcServiceName as GrpcServiceName,
)
from xdsplane.policy.model.grpcservices import (
    GrpcStatusName as GrpcStatusName,
)
from xdsplane.policy.model.introspection import (
    IntrospectionCache as IntrospectionCache,
)
from xdsplane.policy.model.introspection import (
    IntrospectionEndpoint as IntrospectionEndpoint,
)
from xdsplane.policy.model.introspection import (
    IntrospectionProvider as IntrospectionProvider,
)
from xdsplane.policy.model.introspection import (
    is_loopback_host as is_loopback_host,
)
from xdsplane.policy.model.jwtproviders import (
    HeaderName as HeaderName,
)
from xdsplane.policy.model.jwtproviders import (
    JwksUri as JwksUri,
)
from xdsplane.policy.model.jwtproviders import (
    JwtProvider as JwtProvider,
)
from xdsplane.policy.model.policyfile import (
    TOP_LEVEL_KEYS as TOP_LEVEL_KEYS,
)
from xdsplane.policy.model.policyfile import (
    AccessLog as AccessLog,
)
from xdsplane.policy.model.policyfile import (
    Guard as Guard,
)
from xdsplane.policy.model.policyfile import (
    OtlpLog as OtlpLog,
)
from xdsplane.policy.model.policyfile import (
    PolicyFile as PolicyFile,
)
from xdsplane.policy.model.routes import (
    ACCESS_RULE_KEYS as ACCESS_RULE_KEYS,
)
from xdsplane.policy.model.routes import (
    ALLOW_LEGACY_TLS as ALLOW_LEGACY_TLS,
)
from xdsplane.policy.model.routes import (
    PATH_PREFIX_PATTERN as PATH_PREFIX_PATTERN,
)
from xdsplane.policy.model.routes import (
    Access as Access,
)
from xdsplane.policy.model.routes import (
    AccessRule as AccessRule,
)
from xdsplane.policy.model.routes import (
    Cidr as Cidr,
)
from xdsplane.policy.model.routes import (
    CipherSuite as CipherSuite,
)
from xdsplane.policy.model.routes import (
    ClaimName as ClaimName,
)
from xdsplane.policy.model.routes import (
    ClaimValue as ClaimValue,
)
from xdsplane.policy.model.routes import (
    ClaimValues as ClaimValues,
)
from xdsplane.policy.model.routes import (
    ClientCertificate as ClientCertificate,
)
from xdsplane.policy.model.routes import (
    DirectResponse as DirectResponse,
)
from xdsplane.policy.model.routes import (
    Domain as Domain,
)
from xdsplane.policy.model.routes import (
    GlobalRateLimit as GlobalRateLimit,
)
from xdsplane.policy.model.routes import (
    HeaderMatch as HeaderMatch,
)
from xdsplane.policy.model.routes import (
    Host as Host,
)
from xdsplane.policy.model.routes import (
    Listener as Listener,
)
from xdsplane.policy.model.routes import (
    OcspPolicy as OcspPolicy,
)
from xdsplane.policy.model.routes import (
    PathGlob as PathGlob,
)
from xdsplane.policy.model.routes import (
    PathParameters as PathParameters,
)
from xdsplane.policy.model.routes import (
    RateLimit as RateLimit,
)
from xdsplane.policy.model.routes import (
    RateLimitBy as RateLimitBy,
)
from xdsplane.policy.model.routes import (
    RegexRewrite as RegexRewrite,
)
from xdsplane.policy.model.routes import (
    Retries as Retries,
)
from xdsplane.policy.model.routes import (
    RetryOn as RetryOn,
)
from xdsplane.policy.model.routes import (
    Rewrite as Rewrite,
)
from xdsplane.policy.model.routes import (
    Route as Route,
)
from xdsplane.policy.model.routes import (
    Scope as Scope,
)
from xdsplane.policy.model.routes import (
    Tls as Tls,
)
from xdsplane.policy.model.secret import (
    Secret as Secret,
)
from xdsplane.policy.model.upstreams import (
    MAX_LOCALITY_WEIGHT_SUM as MAX_LOCALITY_WEIGHT_SUM,
)
from xdsplane.policy.model.upstreams import (
    HealthCheck as HealthCheck,
)
from xdsplane.policy.model.upstreams import (
    LbPolicy as LbPolicy,
)
from xdsplane.policy.model.upstreams import (
    Locality as Locality,
)
from xdsplane.policy.model.upstreams import (
    OutlierDetection as OutlierDetection,
)
from xdsplane.policy.model.upstreams import (
    Upstream as Upstream,
)
from xdsplane.policy.model.upstreams import (
    UpstreamLimits as UpstreamLimits,
)
from xdsplane.policy.model.upstreams import (
    UpstreamTls as UpstreamTls,
)
