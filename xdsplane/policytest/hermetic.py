"""The policy's snapshot, built from stand-in files: no certificate, key, CA or JWKS of the
policy is read.

Every file a secret or a JWT provider names is answered by the run (``runpki.RunPki``):

- a certificate and its key: a certificate of the run's CA covering the domains of every
  host that serves it (so the pipeline's domain check holds), with the URI SAN
  ``spiffe://xdsplane-test/secret/NAME``, followed by the run's CA (the chain);
- a CA (and an OCSP staple's issuer): the run's CA; a CRL: an empty one of the run's CA;
- an OCSP staple: a good response for the stand-in certificate;
- a JWKS file: the run's JWT key.

The snapshot is then exactly what the pipeline builds for the node, with these contents.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path

from xdsplane.config import stableread
from xdsplane.config.errors import ConfigErrors
from xdsplane.pipeline import FolderLoader, load_policy
from xdsplane.policy.translate.secrets import paths, resolve
from xdsplane.policytest.runpki import RunPki
from xdsplane.snapshot import NodeGroup

SECRET_URI = "spiffe://xdsplane-test/secret/"


class PolicyTestError(Exception):
    """Bad input for a run (cases, policy, node) or a run that could not start: exit 2."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass
class StandIns:
    files: dict[str, bytes] = field(default_factory=dict)
    # secret name -> the URI SANs of its stand-in certificate (what Envoy presents with it)
    secret_uris: dict[str, tuple[str, ...]] = field(default_factory=dict)


def stand_ins(folder: Path, run: RunPki) -> StandIns:
    """The stand-in contents of every file the policy's secrets and JWT providers name."""
    try:
        groups, errors = stableread.retry_busy(lambda: load_policy(folder))
    except ConfigErrors as e:
        raise PolicyTestError([str(x) for x in e.errors]) from None
    except stableread.FileBusy:
        raise PolicyTestError([f"{folder}: files stayed open for writing; try again"]) from None
    if errors:
        raise PolicyTestError([str(x) for x in ConfigErrors(errors).errors])
    # certificate path -> (the DNS names its hosts serve, the secrets naming it)
    certs: dict[str, tuple[list[str], list[str]]] = {}
    keys: dict[str, str] = {}  # key path -> its certificate path
    staples: dict[str, str] = {}  # staple path -> its certificate path
    cas: set[str] = set()
    crls: set[str] = set()
    out = StandIns()
    for group in groups:
        policy = group.policy
        served: dict[str, list[str]] = {}
        for lpart in policy.listeners.values():
            for host in lpart.value.hosts:
                if host.certificate is not None:
                    served.setdefault(host.certificate, []).extend(host.domains)
        for name, part in policy.secrets.items():
            wanted = paths(part.value, part.origin.folder)
            if "certificate" in wanted:
                dns, names = certs.setdefault(wanted["certificate"], ([], []))
                dns.extend(served.get(name, []))
                names.append(name)
                keys.setdefault(wanted["private_key"], wanted["certificate"])
                if "ocsp_staple" in wanted:
                    staples.setdefault(wanted["ocsp_staple"], wanted["certificate"])
                if "ocsp_issuer" in wanted:
                    cas.add(wanted["ocsp_issuer"])
            if "ca" in wanted:
                cas.add(wanted["ca"])
            if "crl" in wanted:
                crls.add(wanted["crl"])
        for ppart in policy.jwt_providers.values():
            if ppart.value.jwks_file is not None:
                out.files[resolve(ppart.origin.folder, ppart.value.jwks_file)] = run.jwks()
    issued: dict[str, tuple[Path, Path]] = {}
    for cert_path, (dns, names) in certs.items():
        uris = [SECRET_URI + n for n in sorted(set(names))]
        crt, key = run.issue(dns, uris)
        issued[cert_path] = (crt, key)
        # the chain: leaf, then the run's CA (an OCSP staple without ocsp_issuer needs it)
        out.files[cert_path] = crt.read_bytes() + run.ca_path.read_bytes()
        for n in names:
            out.secret_uris[n] = tuple(uris)
    for key_path, cert_path in keys.items():
        out.files[key_path] = issued[cert_path][1].read_bytes()
    for staple_path, cert_path in staples.items():
        out.files[staple_path] = run.ocsp(issued[cert_path][0]).read_bytes()
    for ca in cas:
        out.files[ca] = run.ca_path.read_bytes()
    for crl in crls:
        out.files[crl] = run.crl().read_bytes()
    return out


@dataclass
class _StandInLoader(FolderLoader):
    """The pipeline's loader, reading the stand-ins instead of the files secrets name."""

    stand_ins: dict[str, bytes] = field(default_factory=dict)

    def _read_secret(self, path: str) -> bytes:
        self._reading.add(path)
        found = self.stand_ins.get(path)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "no stand-in for this file", path)
        return found


def node_group(folder: Path, node: str | None, files: dict[str, bytes]) -> NodeGroup:
    """The node group ``node`` gets (default: the folder's first group), built by the
    pipeline from the stand-in files."""
    stableread.install()
    loader = _StandInLoader(folder, stand_ins=files)
    try:
        snapshots = stableread.retry_busy(loader.load)
    except ConfigErrors as e:
        raise PolicyTestError([str(x) for x in e.errors]) from None
    except stableread.FileBusy:
        raise PolicyTestError([f"{folder}: files stayed open for writing; try again"]) from None
    if not snapshots.groups:
        raise PolicyTestError([f"{folder}: serves no node group"])
    if node is None:
        return snapshots.groups[0]
    group = snapshots.group_for(node, None)
    if group is None:
        names = ", ".join(",".join(g.globs or ("*",)) for g in snapshots.groups)
        raise PolicyTestError([f"--node {node}: no node group of {folder} matches ({names})"])
    return group


def default_node(group: NodeGroup) -> str:
    """A node id for Envoy's bootstrap: the group's first glob, made concrete."""
    first = (group.globs or ("xdsplane-test",))[0]
    return first.replace("*", "test").replace("?", "t") or "xdsplane-test"
