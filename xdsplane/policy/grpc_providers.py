"""Which policy secrets gRPC uses, as bootstrap certificate providers rather than SDS.

gRPC never asks for SDS: a secret it uses becomes a ``certificate_providers`` instance of
the SAME NAME in the gRPC bootstrap (plugin ``file_watcher``, reading the files on the gRPC
host), and resources name it in ``CertificateProviderPluginInstance.instance_name``. A
secret only gRPC uses is therefore not served as an SDS Secret: its private key stays on
the gRPC host's disk instead of travelling in every snapshot of the group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xdsplane.policy.merge import GroupPolicy
from xdsplane.policy.model import Secret
from xdsplane.policy.translate.secrets import resolve

REFRESH_INTERVAL = "10s"
"""How often gRPC's file_watcher provider re-reads the files (a rotation's delay)."""


def server_secrets(policy: GroupPolicy) -> set[str]:
    """The secrets the group's gRPC servers name (certificate and client_ca)."""
    out = set()
    for part in policy.grpc_servers.values():
        out.add(part.value.certificate)
        if part.value.client_ca is not None:
            out.add(part.value.client_ca)
    return out


def provider_secrets(policy: GroupPolicy) -> set[str]:
    """Every secret of the group gRPC uses as a certificate provider."""
    return server_secrets(policy)


def envoy_secrets(policy: GroupPolicy) -> set[str]:
    """The secrets something served to Envoy names: hosts, upstreams, the guard, JWKS."""
    out: set[str] = set()
    for lpart in policy.listeners.values():
        for h in lpart.value.hosts:
            out.update(n for n in (h.certificate, h.client_ca) if n is not None)
    tls_specs = [u.value.tls for u in policy.upstreams.values()]
    if policy.guard is not None:
        tls_specs.append(policy.guard.value.tls)
    for tls in tls_specs:
        if tls is not None:
            out.update(n for n in (tls.ca, tls.certificate) if n is not None)
    out.update(p.value.ca for p in policy.jwt_providers.values() if p.value.ca is not None)
    return out


def sds_secrets(policy: GroupPolicy) -> set[str]:
    """The secrets served over SDS: all but those only gRPC uses."""
    grpc_only = provider_secrets(policy) - envoy_secrets(policy)
    return set(policy.secrets) - grpc_only


def provider_config(secret: Secret, folder: Path) -> dict[str, Any]:
    """The bootstrap ``certificate_providers`` entry for ``secret`` (absolute paths)."""
    config: dict[str, Any] = {}
    if secret.is_certificate:
        assert secret.certificate is not None and secret.private_key is not None
        config["certificate_file"] = _absolute(folder, secret.certificate)
        config["private_key_file"] = _absolute(folder, secret.private_key)
    else:
        assert secret.ca is not None
        config["ca_certificate_file"] = _absolute(folder, secret.ca)
    config["refresh_interval"] = REFRESH_INTERVAL
    return {"plugin_name": "file_watcher", "config": config}


def providers(policy: GroupPolicy) -> dict[str, dict[str, Any]]:
    """The ``certificate_providers`` of a gRPC bootstrap for this group, by secret name."""
    out = {}
    for name in sorted(provider_secrets(policy)):
        part = policy.secrets.get(name)
        if part is not None:
            out[name] = provider_config(part.value, part.origin.folder)
    return out


def _absolute(folder: Path, path: str) -> str:
    return str(Path(resolve(folder, path)).absolute())
