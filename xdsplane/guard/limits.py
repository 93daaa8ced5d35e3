"""The rate limit file (``xdsplane guard --limits FILE``): parsing and descriptor matching.

One YAML document per domain (separate several with ``---``), in the shape of Envoy's
reference rate limit service::

    domain: edge
    descriptors:
      - key: remote_address                 # any value: one counter per address
        rate_limit: {unit: minute, requests_per_unit: 60}
      - key: path
        value: /billing/invoices            # only this value
        rate_limit: {unit: second, requests_per_unit: 10}
      - key: client
        value: partner
        descriptors:                        # the next entry of the same descriptor
          - key: path
            rate_limit: {unit: hour, requests_per_unit: 1000}

A request descriptor (an ordered list of key/value entries, from the route's
``rate_limits`` actions) walks the tree one entry per level; at each level an exact
``key``+``value`` rule wins over a ``key``-only one. The rule reached by the last entry
applies, if it has a ``rate_limit``; a descriptor that matches nothing is not limited.
Errors are reported as ``path:line:column: message``, all at once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdsplane.config.errors import ConfigError, ConfigErrors, Location
from xdsplane.config.yamlsrc import Document, YamlError, parse
from xdsplane.guard.introspect import IntrospectionSpec

UNITS: dict[str, int] = {"second": 1, "minute": 60, "hour": 3600}

Keys = tuple[str | int, ...]


@dataclass(frozen=True)
class Limit:
    requests_per_unit: int
    unit: str  # second | minute | hour
    source: str  # path:line of the rule, for logs

    @property
    def seconds(self) -> int:
        return UNITS[self.unit]


@dataclass
class Rule:
    key: str
    value: str | None
    limit: Limit | None
    children: dict[tuple[str, str | None], Rule] = field(default_factory=dict)


@dataclass
class GuardLimits:
    domains: dict[str, dict[tuple[str, str | None], Rule]] = field(default_factory=dict)
    # From a policy folder's JWT providers (their largest max_lifetime and clock_skew, in
    # seconds), for replay protection: how long a token may live and be accepted past exp.
    token_max_lifetime: float | None = None
    token_clock_skew: float | None = None
    # The policy's introspection providers, read with its limits (one read of the folder):
    # name -> what the guard needs to ask the endpoint (secret file and CA read).
    introspection: dict[str, IntrospectionSpec] = field(default_factory=dict)

    def match(self, domain: str, entries: list[tuple[str, str]]) -> Limit | None:
        """The limit for one request descriptor in ``domain``; None: not limited."""
        level = self.domains.get(domain)
        if level is None or not entries:
            return None
        rule: Rule | None = None
        for key, value in entries:
            rule = level.get((key, value)) or level.get((key, None))
            if rule is None:
                return None
            level = rule.children
        return rule.limit if rule is not None else None

    def rule_count(self) -> int:
        def count(level: dict[tuple[str, str | None], Rule]) -> int:
            return sum(1 + count(r.children) for r in level.values())

        return sum(count(level) for level in self.domains.values())


def counter_key(domain: str, entries: list[tuple[str, str]], limit: Limit, window: int) -> str:
    """The counter of one descriptor in one fixed window (bounded length: values are hashed)."""
    canonical = json.dumps([domain, entries, limit.unit], separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:32]
    return f"rl:{domain}:{limit.unit}:{digest}:{window}"


class _Parser:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.errors: list[ConfigError] = []

    def error(self, keys: Keys, message: str, key: bool = False) -> None:
        where = self.doc.locate_key(keys) if key else self.doc.locate(keys)
        self.errors.append(ConfigError(where, message))

    def check_keys(self, value: dict[str, Any], keys: Keys, allowed: set[str]) -> None:
        for k in value:
            if k not in allowed:
                known = ", ".join(sorted(allowed))
                self.error((*keys, k), f"unknown key {k!r} (expected one of: {known})", key=True)

    def document(self, value: Any) -> tuple[str, dict[tuple[str, str | None], Rule]] | None:
        if not isinstance(value, dict):
            self.error((), "a limits document is a mapping with `domain` and `descriptors`")
            return None
        self.check_keys(value, (), {"domain", "descriptors"})
        domain = value.get("domain")
        if not isinstance(domain, str) or not domain:
            self.error(("domain",), "`domain` must be a non-empty string")
            domain = None
        rules = self.descriptors(value.get("descriptors"), ("descriptors",), required=True)
        if domain is None:
            return None
        return domain, rules

    def descriptors(
        self, value: Any, keys: Keys, required: bool
    ) -> dict[tuple[str, str | None], Rule]:
        out: dict[tuple[str, str | None], Rule] = {}
        if value is None and not required:
            return out
        if not isinstance(value, list) or not value:
            self.error(keys, "`descriptors` must be a non-empty list")
            return out
        for i, item in enumerate(value):
            rule = self.rule(item, (*keys, i))
            if rule is None:
                continue
            ident = (rule.key, rule.value)
            if ident in out:
                what = f"key {rule.key!r}" + (f" value {rule.value!r}" if rule.value else "")
                self.error((*keys, i), f"{what} is defined twice at this level")
                continue
            out[ident] = rule
        return out

    def rule(self, item: Any, keys: Keys) -> Rule | None:
        if not isinstance(item, dict):
            self.error(keys, "a descriptor is a mapping with `key` (and `value`, `rate_limit`)")
            return None
        self.check_keys(item, keys, {"key", "value", "rate_limit", "descriptors"})
        key = item.get("key")
        if not isinstance(key, str) or not key:
            self.error((*keys, "key"), "`key` must be a non-empty string")
            key = None
        value = item.get("value")
        if value is not None and not isinstance(value, str):
            self.error((*keys, "value"), "`value` must be a string (quote numbers)")
            value = None
        limit = None
        if "rate_limit" in item:
            limit = self.limit(item["rate_limit"], (*keys, "rate_limit"))
        children = self.descriptors(item.get("descriptors"), (*keys, "descriptors"), False)
        if "rate_limit" not in item and "descriptors" not in item:
            self.error(keys, "a descriptor needs a `rate_limit`, nested `descriptors`, or both")
        if key is None:
            return None
        return Rule(key, value or None, limit, children)

    def limit(self, value: Any, keys: Keys) -> Limit | None:
        if not isinstance(value, dict):
            self.error(keys, "`rate_limit` is a mapping {unit, requests_per_unit}")
            return None
        self.check_keys(value, keys, {"unit", "requests_per_unit"})
        unit = value.get("unit")
        ok = True
        if unit not in UNITS:
            self.error((*keys, "unit"), f"`unit` must be one of: {', '.join(UNITS)}")
            ok = False
        rpu = value.get("requests_per_unit")
        if not isinstance(rpu, int) or isinstance(rpu, bool) or rpu < 0:
            self.error((*keys, "requests_per_unit"), "`requests_per_unit` must be an integer >= 0")
            ok = False
        if not ok:
            return None
        assert isinstance(rpu, int)
        where = self.doc.locate(keys)
        return Limit(rpu, str(unit), f"{where.path}:{where.line}")


def parse_limits(text: str | bytes, path: str) -> GuardLimits:
    """Parse a limits file; raises ConfigErrors (every problem, located)."""
    try:
        docs = parse(text, path)
    except YamlError as e:
        raise ConfigErrors([e.error]) from None
    limits = GuardLimits()
    errors: list[ConfigError] = []
    if not docs:
        errors.append(ConfigError(Location(path, 1), "no limits: the file is empty"))
    for doc in docs:
        parser = _Parser(doc)
        parsed = parser.document(doc.value)
        errors.extend(parser.errors)
        if parsed is None:
            continue
        domain, rules = parsed
        if domain in limits.domains:
            errors.append(
                ConfigError(doc.locate(("domain",)), f"domain {domain!r} is defined twice")
            )
            continue
        limits.domains[domain] = rules
    if errors:
        raise ConfigErrors(errors)
    return limits


def load_limits(path: Path) -> GuardLimits:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigErrors([ConfigError(Location(str(path)), e.strerror or str(e))]) from None
    return parse_limits(data, str(path))
