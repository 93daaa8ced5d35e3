"""Grouping by node, merging and checking: the steps the control plane and the guard share.

Files with the same ``nodes`` form one group, joined by every file without ``nodes``; the
files without ``nodes`` also form the catch-all group ``*`` on their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsplane.config.errors import ConfigError
from xdsplane.pipeline.units import Unit
from xdsplane.policy.check import Usage, check_policy
from xdsplane.policy.check_cache import HostChecks
from xdsplane.policy.merge import GroupPolicy, merge


@dataclass(frozen=True, slots=True)
class NodeUnits:
    """The documents one node group is built from."""

    name: str
    nodes: tuple[str, ...] | None
    units: list[Unit]


def group_name(nodes: tuple[str, ...] | None) -> str:
    return "*" if nodes is None else ",".join(nodes)


def node_groups(units: list[Unit]) -> list[NodeUnits]:
    """The node groups, in the order their first file comes; the catch-all group last."""
    common = [u for u in units if u.nodes is None]
    members: dict[tuple[str, ...], list[Unit]] = {}
    for u in units:
        if u.nodes is not None:
            members.setdefault(u.nodes, []).append(u)
    out = [NodeUnits(group_name(nodes), nodes, found + common) for nodes, found in members.items()]
    if common:
        out.append(NodeUnits("*", None, common))
    return out


def scope_of(group: NodeUnits, groups: list[NodeUnits]) -> str:
    """How errors name the group: by its nodes, unless it is the only one."""
    return group.name if len(groups) > 1 else ""


def merge_and_check(
    units: list[Unit], scope: str, hosts: HostChecks | None = None
) -> tuple[GroupPolicy, Usage, list[ConfigError]]:
    """One group's files merged into one policy, and every problem the checks find
    (``hosts``: the group's host checks kept from its last check, see check_hosts.py)."""
    # A raw snapshot file has no policy parts: nothing to merge (hundreds of them, each load).
    parts = [u for u in units if u.parts]
    policy, errors = merge([u.fragment for u in parts])
    problems, usage = check_policy(policy, scope, hosts)
    return policy, usage, errors + problems


def has_parts(unit: Unit) -> bool:
    return unit.parts
