"""Envoy's own verdict on a snapshot, before it is served.

Each node group's snapshot is turned into a *static* Envoy bootstrap and checked with
``envoy --mode validate``, which builds every listener, cluster, route table and TLS context
without binding a port or opening a connection:

- listeners and clusters go to ``static_resources``;
- an HTTP connection manager's ``rds`` (over ADS) becomes an inline ``route_config`` holding
  the named RouteConfiguration, with ``validate_clusters: false`` unless it says otherwise
  (what Envoy assumes for RDS);
- an EDS cluster (over ADS) becomes a STATIC cluster with the ClusterLoadAssignment inlined;
- Secrets go to ``static_resources.secrets`` and every ADS ``SdsSecretConfig`` loses its
  ``sds_config``, so that it names the static secret.
- a filter configured over ECDS (``config_discovery`` over ADS) gets the ``typed_config`` of
  the TypedExtensionConfig of its name.

Envoy stops at the first error and its message often names no resource ("invalid perl
operator: (?="). To say which resource of the policy it means, a rejected group is narrowed
down with more runs: clusters alone, then halves of the clusters or listeners, then a
listener with its route tables replaced by empty ones, its filter configurations (ECDS) by
empty ones, or its secrets by a throwaway certificate. The result reads
``file:line: envoy rejects route configuration 'http': ...``.

Private keys never leave the temporary directory the bootstrap is written to (mode 0700,
deleted after the run); Envoy's messages are scrubbed of PEM blocks and of the config dumps it
prints on proto validation errors. A group whose snapshot digest passed before is not run again.

The package, by concern:

- ``bootstrap.py``: rewriting a snapshot into a static bootstrap (``Trial``, ``bootstrap``);
- ``messages.py``: scrubbing and shortening what Envoy says (``clean_message``);
- ``narrow.py``: narrowing a rejection down to one resource (``Narrowing``, ``Rejection``);
- ``run.py``: finding and running Envoy (``find_envoy``, ``EnvoyChecker``).
"""

from __future__ import annotations

from xdsplane.envoycheck.bootstrap import VALIDATE_NODE, Trial, bootstrap, bootstrap_json
from xdsplane.envoycheck.messages import MAX_MESSAGE, clean_message, scrub
from xdsplane.envoycheck.narrow import KIND, MAX_RUNS, Outcome, Rejection
from xdsplane.envoycheck.run import TIMEOUT, EnvoyChecker, envoy_argv, find_envoy

__all__ = [
    "KIND",
    "MAX_MESSAGE",
    "MAX_RUNS",
    "TIMEOUT",
    "VALIDATE_NODE",
    "EnvoyChecker",
    "Outcome",
    "Rejection",
    "Trial",
    "bootstrap",
    "bootstrap_json",
    "clean_message",
    "envoy_argv",
    "find_envoy",
    "scrub",
]
