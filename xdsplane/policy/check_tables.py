"""What a group's checks find over whole tables, kept while the tables are the same parts.

A document that did not change gives the very same Part objects to every merge
(``merge.Fragment.parts``), so a table whose parts are the very objects of the last check
is unchanged, and so is what was found over it: which definitions the hosts' names are
(the usage), and the upstreams' own checks. Told by identity, in C: an edit of one listener
does not walk the 200 upstreams again.
"""

from __future__ import annotations

from operator import is_
from typing import Any

from xdsplane.config.errors import ConfigError
from xdsplane.policy.merge import GroupPolicy, Part, UseKey


def same_objects(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """The very same objects, in the same order."""
    return len(a) == len(b) and all(map(is_, a, b))


class TableMemo:
    """One group's: each is kept with the parts it read, and found again only when the
    very same parts (and the rest of what it read) are given."""

    def __init__(self) -> None:
        # table -> (names, the table's parts, their use keys)
        self._use: dict[str, tuple[set[str], tuple[object, ...], set[UseKey]]] = {}
        # (where, upstream parts, secret parts, gRPC upstreams, errors, secrets used)
        self._upstreams: (
            tuple[
                str,
                tuple[object, ...],
                tuple[object, ...],
                set[str],
                list[ConfigError],
                set[UseKey],
            ]
            | None
        ) = None

    def use_keys(self, table: str, names: set[str], parts: dict[str, Part[Any]]) -> set[UseKey]:
        """The use keys (``check.use_key``) of the parts ``names`` name in ``table``."""
        values = tuple(parts.values())
        hit = self._use.get(table)
        if hit is not None and hit[0] == names and same_objects(hit[1], values):
            return hit[2]
        keys = {(id(parts[n].origin.doc), parts[n].origin.keys) for n in names}
        self._use[table] = (names, values, keys)
        return keys

    def upstreams(
        self, policy: GroupPolicy, where: str, grpc_used: set[str]
    ) -> tuple[list[ConfigError], set[UseKey]] | None:
        """What the upstreams' checks found last time (errors, the secrets they use), if
        they read the same: the same upstreams and secrets, gRPC upstreams and scope."""
        kept = self._upstreams
        if (
            kept is None
            or kept[0] != where
            or kept[3] != grpc_used
            or not same_objects(kept[1], tuple(policy.upstreams.values()))
            or not same_objects(kept[2], tuple(policy.secrets.values()))
        ):
            return None
        return kept[4], kept[5]

    def keep_upstreams(
        self,
        policy: GroupPolicy,
        where: str,
        grpc_used: set[str],
        errors: list[ConfigError],
        secrets: set[UseKey],
    ) -> None:
        self._upstreams = (
            where,
            tuple(policy.upstreams.values()),
            tuple(policy.secrets.values()),
            set(grpc_used),
            errors,
            secrets,
        )
