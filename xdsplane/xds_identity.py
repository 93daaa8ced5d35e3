"""Who is on the other end of an xDS stream: the client certificate's identity, checked
against the node id the Envoy claims.

The mapping (documented in ``xdsplane serve --help`` and the README): a client certificate
speaks for node ``ID`` when it carries the URI SAN ``spiffe://xdsplane/node/ID`` or a DNS SAN
equal to ``ID`` (exactly, case included; a wildcard DNS SAN never matches). Anything else is
refused. The certificate is read from gRPC's auth context (``x509_pem_cert``, the peer's leaf
certificate as PEM) and parsed with ``cryptography``, so DNS and URI SANs are told apart.

The certificate also decides which node group a stream is served (docs/deploy.md, "xDS
identity"): groups select nodes by a glob on the node id or ``node.cluster``, and the
cluster an Envoy sends is its own claim. Over mTLS ``node.cluster`` is used for selection
only when the certificate proves it with the URI SAN ``spiffe://xdsplane/cluster/<name>``;
an unproven cluster that would select another group than the node id alone is refused
(``CLUSTER_NOT_PROVEN``), and one that would not is ignored for selection, now and after
every reload.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography import x509

NODE_URI_PREFIX = "spiffe://xdsplane/node/"
CLUSTER_URI_PREFIX = "spiffe://xdsplane/cluster/"

# Reasons a stream is refused: the keys of ``Registry.refused`` (and of /status "refused").
NO_NODE_ID = "no_node_id"
NO_CLIENT_CERTIFICATE = "no_client_certificate"
NODE_ID_MISMATCH = "node_id_mismatch"
CLUSTER_NOT_PROVEN = "cluster_not_proven"


def node_uri(node_id: str) -> str:
    """The URI SAN that makes a certificate speak for ``node_id``."""
    return NODE_URI_PREFIX + node_id


def cluster_uri(cluster: str) -> str:
    """The URI SAN that lets a certificate's node be selected by ``cluster``."""
    return CLUSTER_URI_PREFIX + cluster


@dataclass(frozen=True)
class PeerIdentity:
    """The SANs of a peer's client certificate."""

    subject: str
    dns: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()

    def sans(self) -> list[str]:
        """Every SAN, typed (``DNS:``, ``URI:``, ``IP:``), for logs."""
        return (
            [f"DNS:{d}" for d in self.dns]
            + [f"URI:{u}" for u in self.uris]
            + [f"IP:{i}" for i in self.ips]
        )

    def speaks_for(self, node_id: str) -> bool:
        if not node_id:
            return False
        if node_uri(node_id) in self.uris:
            return True
        return "*" not in node_id and node_id in self.dns

    def proves_cluster(self, cluster: str) -> bool:
        """The certificate carries the URI SAN ``spiffe://xdsplane/cluster/<cluster>``."""
        return bool(cluster) and cluster_uri(cluster) in self.uris


def from_pem(pem: bytes) -> PeerIdentity:
    """The identity in a PEM certificate; ValueError when it is not one."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return PeerIdentity(cert.subject.rfc4514_string())
    return PeerIdentity(
        subject=cert.subject.rfc4514_string(),
        dns=tuple(san.get_values_for_type(x509.DNSName)),
        uris=tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
        ips=tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    )


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> PeerIdentity | None:
    """The client certificate's identity from a gRPC auth context; None without one.

    ``auth_context`` is ``ServicerContext.auth_context()``: on a TLS connection with a
    client certificate it holds ``x509_pem_cert`` (the leaf, PEM). A certificate gRPC
    accepted but that does not parse counts as none.
    """
    for pem in auth_context.get("x509_pem_cert", ()):
        try:
            return from_pem(bytes(pem))
        except ValueError:
            return None
    return None


def refusal(identity: PeerIdentity | None, node_id: str) -> tuple[str, str] | None:
    """``(reason, message)`` when ``identity`` may not claim ``node_id``, else None."""
    if identity is None:
        return NO_CLIENT_CERTIFICATE, "a client certificate is required"
    if not identity.speaks_for(node_id):
        return (
            NODE_ID_MISMATCH,
            f"the client certificate does not name node {node_id!r}: it needs the URI SAN "
            f"{node_uri(node_id)} or the DNS SAN {node_id}",
        )
    return None


def selection_cluster(identity: PeerIdentity, cluster: str) -> str | None:
    """The cluster groups may select ``identity``'s stream by: ``cluster`` when the
    certificate proves it, else None (the node id alone selects)."""
    return cluster if identity.proves_cluster(cluster) else None


def cluster_refusal(cluster: str) -> str:
    """The message for a stream whose unproven ``cluster`` would move it to another group
    than its node id selects. Group names are not told to the client (the log has them)."""
    return (
        f"node.cluster {cluster!r} would select another node group than the node id, and the "
        f"client certificate does not prove that cluster: it needs the URI SAN "
        f"{cluster_uri(cluster)} (or send a cluster that does not change the group)"
    )
