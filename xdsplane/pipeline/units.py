"""One YAML document -> a Unit: its policy parsed and TLS-checked, its raw resources parsed."""

from __future__ import annotations

from dataclasses import dataclass, field

from xdsplane.config.errors import ConfigError
from xdsplane.config.yamlsrc import Document
from xdsplane.pipeline.raw import parse_resources
from xdsplane.policy import tlsrules
from xdsplane.policy.merge import Fragment
from xdsplane.policy.model import PolicyFile
from xdsplane.policy.parse import HostModels, parse_policy
from xdsplane.snapshot import Resource


@dataclass(frozen=True, slots=True)
class Unit:
    """One parsed document: who it is for, its policy and its raw resources."""

    doc: Document
    nodes: tuple[str, ...] | None
    policy: PolicyFile
    resources: tuple[Resource, ...]
    warnings: tuple[ConfigError, ...] = ()
    # Whether it holds policy parts (``has_policy_parts``): asked of every file on every
    # load (the merge skips raw files), so found once, when the Unit is made.
    parts: bool = field(init=False, repr=False, compare=False)
    # What the merge reads of it, kept with it: its parts made once (``Fragment.parts``).
    fragment: Fragment = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", has_policy_parts(self.policy))
        object.__setattr__(self, "fragment", Fragment(self.doc, self.policy))


def parse_unit(
    doc: Document, reuse: HostModels | None = None
) -> tuple[Unit | None, list[ConfigError]]:
    """``reuse``: the hosts the last parse of the same file validated (``parse_policy``)."""
    policy, errors = parse_policy(doc, reuse)
    if policy is None:
        return None, errors
    resources = parse_resources(doc, doc.value.get("resources"), ("resources",), errors)
    tls = tlsrules.check(doc, policy)
    errors.extend(tls.errors)
    errors.extend(tlsrules.check_raw(doc, doc.value.get("resources"), ("resources",)))
    if errors:
        return None, errors
    nodes = tuple(sorted(set(policy.nodes))) if policy.nodes is not None else None
    if policy.resources:
        policy = policy.model_copy(update={"resources": []})  # parsed: drop the raw dicts
    if not has_policy_parts(policy):
        # Raw resources only: their sources are already strings, so the YAML node tree
        # (millions of objects for a big snapshot) need not stay alive.
        doc = Document(doc.path, None, None)
    return Unit(doc, nodes, policy, tuple(resources), tuple(tls.warnings)), []


def has_policy_parts(policy: PolicyFile) -> bool:
    """Does the file hold anything of the policy language besides `nodes` and raw
    `resources`? Every top-level key but those two counts, so a new key cannot be left out."""
    return any(
        getattr(policy, key) not in (None, [], {})
        for key in type(policy).model_fields
        if key not in ("nodes", "resources")
    )
