"""A snapshot -> a static Envoy bootstrap that ``envoy --mode validate`` can check.

Listeners and clusters go to ``static_resources``; whatever they take over ADS (route
tables, endpoints, secrets, ECDS filter configurations) is inlined. A ``Trial`` says which
listeners and clusters to include and what to replace by a harmless stand-in.
"""

from __future__ import annotations

import datetime
import functools
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from xdsplane.config.protos import find_message
from xdsplane.names import GRPC_SERVER_LISTENER_TEMPLATE
from xdsplane.snapshot import Snapshot
from xdsplane.types import ResourceType

VALIDATE_NODE = "xdsplane-validate"
_ANY = "google.protobuf.Any"
_SDS = "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig"
_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_CLUSTER = "envoy.config.cluster.v3.Cluster"


@dataclass(frozen=True, slots=True)
class Trial:
    """One Envoy run: which listeners and clusters, and what is swapped for a harmless stand-in.

    Every secret is always present; ``dummy_secrets`` are replaced by a throwaway certificate
    (or CA), ``stub_routes`` by empty route tables, ``stub_endpoints`` by no endpoints,
    ``stub_extensions`` (ECDS) by an empty configuration of the type the filter accepts.
    """

    listeners: tuple[str, ...]
    clusters: tuple[str, ...]
    stub_routes: frozenset[str] = frozenset()
    stub_endpoints: frozenset[str] = frozenset()
    dummy_secrets: frozenset[str] = frozenset()
    stub_extensions: frozenset[str] = frozenset()


def _is_ads(config_source: Any) -> bool:
    return bool(config_source.WhichOneof("config_source_specifier") == "ads")


def _copy(message: Any) -> Any:
    out = type(message)()
    out.CopyFrom(message)
    return out


@dataclass
class _Rewriter:
    """Rewrites messages in place so that they need no ADS: see the module docstring."""

    snapshot: Snapshot
    trial: Trial

    def route_config(self, name: str) -> Any:
        found = self.snapshot.of(ResourceType.ROUTE).get(name)
        if found is None or name in self.trial.stub_routes:
            rc = ResourceType.ROUTE.message_class(name=name)
        else:
            rc = _copy(found.message)
            self.walk(rc)
        if not rc.HasField("validate_clusters"):
            rc.validate_clusters.value = False
        return rc

    def load_assignment(self, name: str) -> Any:
        found = self.snapshot.of(ResourceType.ENDPOINT).get(name)
        if found is None or name in self.trial.stub_endpoints:
            return ResourceType.ENDPOINT.message_class(cluster_name=name)
        return _copy(found.message)

    def walk(self, msg: Message) -> bool:
        """True when ``msg`` (or something inside it) was changed."""
        m: Any = msg
        name = msg.DESCRIPTOR.full_name
        if name == _ANY:
            cls = find_message(m.type_url.rsplit("/", 1)[-1])
            if cls is None:
                return False
            inner = cls()
            try:
                m.Unpack(inner)
            except Exception:
                return False
            if not self.walk(inner):
                return False
            prefix = m.type_url.rsplit("/", 1)[0] + "/" if "/" in m.type_url else ""
            m.Pack(inner, type_url_prefix=prefix or "type.googleapis.com/", deterministic=True)
            return True
        changed = inlined = False
        if name == _HCM and m.WhichOneof("route_specifier") == "rds":
            if _is_ads(m.rds.config_source):
                m.route_config.CopyFrom(self.route_config(m.rds.route_config_name))
                changed = inlined = True
        elif name == _SDS and m.HasField("sds_config") and _is_ads(m.sds_config):
            m.ClearField("sds_config")
            return True
        elif (
            "config_discovery" in msg.DESCRIPTOR.fields_by_name
            and m.HasField("config_discovery")
            and _is_ads(m.config_discovery.config_source)
        ):
            found = self.snapshot.of(ResourceType.EXTENSION).get(m.name)
            stub = (
                find_message(m.config_discovery.type_urls[0].rsplit("/", 1)[-1])
                if (m.name in self.trial.stub_extensions and m.config_discovery.type_urls)
                else None
            )
            if stub is not None:
                m.typed_config.Pack(stub(), deterministic=True)  # clears config_discovery
                changed = True
            elif found is not None:
                m.typed_config.CopyFrom(found.message.typed_config)
                changed = True
        elif name == _CLUSTER and m.type == m.EDS and _is_ads(m.eds_cluster_config.eds_config):
            cla = self.load_assignment(m.eds_cluster_config.service_name or m.name)
            m.ClearField("eds_cluster_config")
            m.type = m.STATIC
            m.load_assignment.CopyFrom(cla)
            changed = True
        for fd, value in msg.ListFields():
            if fd.message_type is None or (inlined and fd.name == "route_config"):
                continue  # an inlined route table was rewritten already
            if fd.message_type.GetOptions().map_entry:
                for v in value.values():
                    if isinstance(v, Message):
                        changed = self.walk(v) or changed
            elif fd.is_repeated:
                for v in value:
                    changed = self.walk(v) or changed
            else:
                changed = self.walk(value) or changed
        return changed


_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def for_grpc(rtype: ResourceType, message: Any) -> bool:
    """A resource only proxyless gRPC clients take, which Envoy cannot judge: a Listener that
    is an ``api_listener`` (Envoy builds those only from its own bootstrap), a Cluster whose
    TLS names bootstrap certificate provider instances (gRPC's, docs/grpc.md). gRPC judges
    them itself; its NACKs show in /status."""
    if rtype is ResourceType.LISTENER:
        # ... or the Listener an xDS-enabled gRPC server asks for (GRPC_SERVER_LISTENER_TEMPLATE):
        # Envoy would bind its address and refuse its certificate provider instances.
        server = GRPC_SERVER_LISTENER_TEMPLATE.split("%s", 1)[0]
        return bool(message.HasField("api_listener") or message.name.startswith(server))
    if rtype is ResourceType.CLUSTER and message.HasField("transport_socket"):
        packed = message.transport_socket.typed_config
        if packed.type_url != _UPSTREAM_TLS:
            return False
        from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

        ctx = tls_pb2.UpstreamTlsContext()
        packed.Unpack(ctx)
        common = ctx.common_tls_context
        return bool(
            common.HasField("tls_certificate_provider_instance")
            or common.validation_context.HasField("ca_certificate_provider_instance")
        )
    return False


def envoy_names(snapshot: Snapshot, rtype: ResourceType) -> tuple[str, ...]:
    """The listeners or clusters of ``snapshot`` that Envoy can judge (not ``for_grpc``)."""
    return tuple(n for n, r in snapshot.of(rtype).items() if not for_grpc(rtype, r.message))


def bootstrap(snapshot: Snapshot, trial: Trial | None = None) -> Any:
    """A static Envoy Bootstrap message for ``snapshot`` (all of it unless ``trial`` says)."""
    from envoy.config.bootstrap.v3 import bootstrap_pb2

    if trial is None:
        trial = Trial(
            envoy_names(snapshot, ResourceType.LISTENER),
            envoy_names(snapshot, ResourceType.CLUSTER),
        )
    rw = _Rewriter(snapshot, trial)
    out = bootstrap_pb2.Bootstrap()
    out.node.id = VALIDATE_NODE
    out.node.cluster = VALIDATE_NODE
    sock = out.admin.address.socket_address
    sock.address = "127.0.0.1"
    sock.port_value = 0
    static = out.static_resources
    for name, r in snapshot.of(ResourceType.SECRET).items():
        static.secrets.append(
            _dummy_secret(r.message) if name in trial.dummy_secrets else r.message
        )
    for kind, names, target in (
        (ResourceType.CLUSTER, trial.clusters, static.clusters),
        (ResourceType.LISTENER, trial.listeners, static.listeners),
    ):
        for name in names:
            msg = _copy(snapshot.of(kind)[name].message)
            rw.walk(msg)
            target.append(msg)
    return out


def bootstrap_json(snapshot: Snapshot, trial: Trial | None = None) -> str:
    """The bootstrap as JSON for ``envoy -c``. Holds private keys: never print it."""
    return str(
        json_format.MessageToJson(bootstrap(snapshot, trial), preserving_proto_field_name=True)
    )


@functools.cache
def _throwaway_pem() -> tuple[bytes, bytes]:
    """A self-signed certificate and its key, made once: stands in for a suspect secret."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xdsplane-validate")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("xdsplane-validate")]), False)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _dummy_secret(original: Any) -> Any:
    from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

    cert, key = _throwaway_pem()
    kind = original.WhichOneof("type")
    if kind == "tls_certificate":
        return secret_pb2.Secret(
            name=original.name,
            tls_certificate=common_pb2.TlsCertificate(
                certificate_chain={"inline_bytes": cert}, private_key={"inline_bytes": key}
            ),
        )
    if kind == "validation_context":
        return secret_pb2.Secret(
            name=original.name,
            validation_context=common_pb2.CertificateValidationContext(
                trusted_ca={"inline_bytes": cert}
            ),
        )
    return original
