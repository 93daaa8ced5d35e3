"""xdsplane: an Envoy xDS control plane serving gateways from policy files on disk."""

__version__ = "0.1.0"
