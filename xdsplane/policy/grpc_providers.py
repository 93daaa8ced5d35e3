"""The certificate providers a node group's gRPC clients need in their bootstrap.

gRPC takes TLS material from bootstrap ``certificate_providers`` (gRFC A29), never SDS. Each
policy secret that a gRPC resource names becomes the ``file_watcher`` instance of the SAME
name, and the translation refers to it by that name (CertificateProviderPluginInstance
``instance_name``); `xdsplane bootstrap --grpc --policy DIR` prints them. The file watcher
rereads the files every ``refresh_interval``, so rotating a file needs no restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xdsplane.policy.grpc_check import grpc_upstreams
from xdsplane.policy.merge import GroupPolicy
from xdsplane.policy.translate.secrets import resolve

REFRESH_INTERVAL = "60s"
PLUGIN = "file_watcher"


def provider_secrets(policy: GroupPolicy) -> list[str]:
    """The secrets gRPC resources of the group name, sorted: the CA and client certificate
    of every upstream a gRPC service uses. (xDS-enabled servers add theirs here.)"""
    names: set[str] = set()
    for up in grpc_upstreams(policy):
        part = policy.upstreams.get(up)
        if part is not None and part.value.tls is not None:
            names.add(part.value.tls.ca)
            if part.value.tls.certificate is not None:
                names.add(part.value.tls.certificate)
    return sorted(n for n in names if n in policy.secrets)


def certificate_providers(policy: GroupPolicy) -> dict[str, dict[str, Any]]:
    """Provider instance name -> its bootstrap entry (``plugin_name``, ``config`` with
    absolute file paths)."""
    out: dict[str, dict[str, Any]] = {}
    for name in provider_secrets(policy):
        part = policy.secrets[name]
        secret, folder = part.value, part.origin.folder

        def path(value: str, folder: Path = folder) -> str:
            return str(Path(resolve(folder, value)).absolute())

        config: dict[str, Any] = {}
        if secret.certificate is not None and secret.private_key is not None:
            config["certificate_file"] = path(secret.certificate)
            config["private_key_file"] = path(secret.private_key)
        if secret.ca is not None:
            config["ca_certificate_file"] = path(secret.ca)
        config["refresh_interval"] = REFRESH_INTERVAL
        out[name] = {"plugin_name": PLUGIN, "config": config}
    return out
