"""The certificate providers a node group's gRPC clients and servers need in their bootstrap,
and so which secrets are not served over SDS.

gRPC takes TLS material from bootstrap ``certificate_providers`` (gRFC A29), never SDS. Each
policy secret that a gRPC resource names becomes the ``file_watcher`` instance of the SAME
name, and the translation refers to it by that name (CertificateProviderPluginInstance
``instance_name``); `xdsplane bootstrap --grpc --policy DIR` prints them. The file watcher
rereads the files every ``refresh_interval``, so rotating a file needs no restart.

A secret only gRPC uses is not served as an SDS Secret: its private key stays on the gRPC
host's disk instead of travelling in every snapshot of the group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xdsplane.policy.grpc_check import grpc_upstreams
from xdsplane.policy.merge import GroupPolicy
from xdsplane.policy.model import Secret
from xdsplane.policy.translate.secrets import resolve

REFRESH_INTERVAL = "60s"
PLUGIN = "file_watcher"


def server_secrets(policy: GroupPolicy) -> set[str]:
    """The secrets the group's xDS-enabled gRPC servers name (certificate and client_ca)."""
    out = set()
    for part in policy.grpc_servers.values():
        out.add(part.value.certificate)
        if part.value.client_ca is not None:
            out.add(part.value.client_ca)
    return out


def provider_secrets(policy: GroupPolicy) -> list[str]:
    """The secrets gRPC resources of the group name, sorted: the CA and client certificate
    of every upstream a gRPC service uses, and the secrets of every gRPC server."""
    names: set[str] = server_secrets(policy)
    for up in grpc_upstreams(policy):
        part = policy.upstreams.get(up)
        if part is not None and part.value.tls is not None:
            names.add(part.value.tls.ca)
            if part.value.tls.certificate is not None:
                names.add(part.value.tls.certificate)
    return sorted(n for n in names if n in policy.secrets)


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
    """The secrets served over SDS: none to a group of gRPC nodes only (no listeners), and
    otherwise all but those only gRPC uses."""
    if not policy.listeners and (policy.grpc_services or policy.grpc_servers):
        return set()
    providers = set(provider_secrets(policy))
    if not providers:
        return set(policy.secrets)  # (no gRPC secret: no walk over every host and upstream)
    return set(policy.secrets) - (providers - envoy_secrets(policy))


def provider_config(secret: Secret, folder: Path) -> dict[str, Any]:
    """The bootstrap entry of one secret: ``plugin_name`` and ``config`` with absolute file
    paths (relative ones are resolved from ``folder``, the policy file's)."""

    def path(value: str) -> str:
        return str(Path(resolve(folder, value)).absolute())

    config: dict[str, Any] = {}
    if secret.certificate is not None and secret.private_key is not None:
        config["certificate_file"] = path(secret.certificate)
        config["private_key_file"] = path(secret.private_key)
    if secret.ca is not None:
        config["ca_certificate_file"] = path(secret.ca)
    config["refresh_interval"] = REFRESH_INTERVAL
    return {"plugin_name": PLUGIN, "config": config}


def certificate_providers(policy: GroupPolicy) -> dict[str, dict[str, Any]]:
    """Provider instance name -> its bootstrap entry (``plugin_name``, ``config`` with
    absolute file paths)."""
    out: dict[str, dict[str, Any]] = {}
    for name in provider_secrets(policy):
        part = policy.secrets[name]
        out[name] = provider_config(part.value, part.origin.folder)
    return out
