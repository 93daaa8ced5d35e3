"""The one place that knows Envoy's xDS type URLs and their order.

Every other module refers to resource types through the constants here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

PREFIX = "type.googleapis.com/"


class ResourceType(StrEnum):
    """The resource types the server speaks, valued by their type URL."""

    SECRET = PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
    CLUSTER = PREFIX + "envoy.config.cluster.v3.Cluster"
    ENDPOINT = PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
    LISTENER = PREFIX + "envoy.config.listener.v3.Listener"
    ROUTE = PREFIX + "envoy.config.route.v3.RouteConfiguration"
    EXTENSION = PREFIX + "envoy.config.core.v3.TypedExtensionConfig"

    @property
    def short(self) -> str:
        """The conventional xDS name (SDS, CDS, ...), for logs, metrics and status."""
        return _SHORT[self]

    @property
    def message_class(self) -> Any:
        return _CLASSES[self]

    @property
    def wildcard(self) -> bool:
        """True for the types Envoy subscribes to as a whole (state-of-the-world full set)."""
        return self in (ResourceType.CLUSTER, ResourceType.LISTENER)

    @property
    def kept(self) -> bool:
        """True for the types the server never removes from a client (delta): a draining
        listener or cluster may still use an old secret or filter configuration, and Envoy
        unsubscribes from those it no longer needs."""
        return self in (ResourceType.SECRET, ResourceType.EXTENSION)

    @classmethod
    def from_url(cls, url: str) -> ResourceType | None:
        return _BY_URL.get(url)


_BY_URL: dict[str, ResourceType] = {t.value: t for t in ResourceType}

_SHORT = {
    ResourceType.SECRET: "SDS",
    ResourceType.CLUSTER: "CDS",
    ResourceType.ENDPOINT: "EDS",
    ResourceType.LISTENER: "LDS",
    ResourceType.ROUTE: "RDS",
    ResourceType.EXTENSION: "ECDS",
}

_CLASSES: dict[ResourceType, Any] = {
    ResourceType.SECRET: secret_pb2.Secret,
    ResourceType.CLUSTER: cluster_pb2.Cluster,
    ResourceType.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    ResourceType.LISTENER: listener_pb2.Listener,
    ResourceType.ROUTE: route_pb2.RouteConfiguration,
    ResourceType.EXTENSION: extension_pb2.TypedExtensionConfig,
}

# Make-before-break: secrets before the listeners and clusters that use them, clusters
# before their endpoints, listeners before their routes. Removals go in reverse.
# Filter configurations (ECDS) go before listeners: Envoy asks for one by name only once a
# listener names it (and that listener warms until it arrives), but a changed configuration
# of a name already held reaches the running listeners before a listener or route that
# relies on it; a modified listener takes the configuration its subscription already holds.
PUSH_ORDER: tuple[ResourceType, ...] = (
    ResourceType.SECRET,
    ResourceType.CLUSTER,
    ResourceType.ENDPOINT,
    ResourceType.EXTENSION,
    ResourceType.LISTENER,
    ResourceType.ROUTE,
)

ORDER_INDEX = {t: i for i, t in enumerate(PUSH_ORDER)}


def resource_name(message: Any) -> str:
    """The xDS name of a resource: ClusterLoadAssignment names itself by cluster_name."""
    if message.DESCRIPTOR.full_name == "envoy.config.endpoint.v3.ClusterLoadAssignment":
        return str(message.cluster_name)
    return str(message.name)


def eds_name(cluster: Any) -> str | None:
    """The ClusterLoadAssignment name an EDS cluster asks for; None for other clusters."""
    if cluster.type != cluster.EDS:
        return None
    return str(cluster.eds_cluster_config.service_name or cluster.name)
