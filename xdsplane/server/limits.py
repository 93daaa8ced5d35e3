"""What one ADS client may ask of the server: streams, message size, request rate, names.

A real Envoy keeps one ADS stream, sends one request per response it gets (its ACK or NACK)
plus one per subscription change, and names at most as many resources as the policy serves.
These limits are far above that and bound what a broken or hostile client can cost:

- ``max_message_bytes``: a larger request is refused by gRPC itself; the client's stream
  ends with RESOURCE_EXHAUSTED ("Received message larger than max").
- ``max_streams``: ADS streams served at once, over all clients. A stream counts once its
  first request is valid (a node id, and over mTLS the certificate's checks); one more is
  then refused with RESOURCE_EXHAUSTED, counted (``xdsplane_streams_refused_total{reason=
  "max_streams"}`` and /status "refused"); open streams are not touched. Streams that have
  not sent a first request do not count, so idle streams lock nobody out: they are bounded
  by ``max_streams_per_connection`` and ``first_request_timeout`` instead.
- ``max_streams_per_node``: over mTLS, streams served at once for one node id (which the
  client certificate proves). A new stream past it ends the node's oldest stream (with
  RESOURCE_EXHAUSTED; counted as ``reason="max_streams_per_node"``): a stream left
  half-open by a network break never locks its node out, and one certificate cannot take
  more than this of ``max_streams``. Not on plaintext: there anyone could end a real node's
  streams by sending its id.
- ``max_streams_per_connection``: HTTP/2 concurrent streams on one connection (gRPC's
  ``grpc.max_concurrent_streams``, announced to the client in SETTINGS); a client past it
  waits for one of its own streams to end. A real Envoy uses one.
- ``first_request_timeout``: seconds a new stream may take to send its first request; then
  it is ended with DEADLINE_EXCEEDED and counted (``reason="first_request_timeout"``).
- ``request_rate`` and ``request_burst``: a token bucket per stream. Past it the server
  slows down: it reads the stream's next request only when a token is there (HTTP/2 flow
  control then holds the client back), so nothing is lost and nobody is disconnected; the
  delayed requests are counted (``xdsplane_requests_throttled_total``).
- ``max_names``: resource names one stream may name for one type (a SotW request's
  ``resource_names``; a delta stream's subscription in total, and a request's
  ``initial_resource_versions``). Past it the stream ends with RESOURCE_EXHAUSTED.
- ``max_total_names``: resource names held by all streams together, counted as for
  ``max_names`` (a delta stream's ``initial_resource_versions`` count for its whole life,
  as what they leave behind may stay). A request that would go past it ends its stream with
  RESOURCE_EXHAUSTED, logged and counted (``reason="max_total_names"``); other streams keep
  what they hold.
- ``write_budget`` and ``write_stall``: bytes of responses being encoded and written at
  once over all streams, admitted in order (gate.py: what bounds the server's memory when
  thousands of streams sync at once), and the seconds one write may keep its place before
  it is let go on outside the budget (a client that does not read must not stall others).
- node ids and clusters longer than ``MAX_NODE_FIELD`` characters are refused
  (INVALID_ARGUMENT): they are kept per node, in /status and as metric labels.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from xdsplane.types import ResourceType

MAX_NODE_FIELD = 1024
WRITE_BUDGET = 16 * 1024 * 1024
WRITE_STALL = 0.5
FIRST_REQUEST_TIMEOUT = "first_request_timeout"  # a refusal reason (/status, /metrics)


@dataclass(frozen=True, slots=True)
class Limits:
    max_message_bytes: int = 4 * 1024 * 1024
    max_streams: int = 10_000
    request_rate: float = 100.0  # requests per second, per stream (0: no limit)
    request_burst: int = 200
    max_names: int = 100_000
    max_streams_per_connection: int = 100
    max_streams_per_node: int = 8
    first_request_timeout: float = 10.0
    max_total_names: int = 5_000_000
    write_budget: int = WRITE_BUDGET
    write_stall: float = WRITE_STALL

    def problems(self) -> list[str]:
        """What is wrong with these values (for the command line), in flag terms."""
        out = []
        if self.max_message_bytes < 1024:
            out.append("--max-message-bytes must be at least 1024")
        if self.max_streams < 1:
            out.append("--max-streams must be at least 1")
        if self.request_rate < 0:
            out.append("--max-request-rate must not be negative")
        if self.request_burst < 1:
            out.append("--request-burst must be at least 1")
        if self.max_names < 1:
            out.append("--max-names must be at least 1")
        if self.max_streams_per_node < 1:
            out.append("--max-streams-per-node must be at least 1")
        if self.max_streams_per_connection < 1:
            out.append("--max-streams-per-connection must be at least 1")
        if not self.first_request_timeout > 0:
            out.append("--first-request-timeout must be more than 0")
        if self.max_total_names < 1:
            out.append("--max-total-names must be at least 1")
        if self.write_budget < 1:
            out.append("--write-budget must be at least 1 byte")
        if not self.write_stall > 0:
            out.append("--write-stall must be more than 0 s")
        return out

    def bucket(self) -> TokenBucket | None:
        if self.request_rate <= 0:
            return None
        return TokenBucket(self.request_rate, self.request_burst)

    def names_problem(self, variant: str, req: Any, subscribed: Collection[str]) -> str | None:
        """Why ``req`` names too many resources (None: it does not). ``subscribed``: the
        names the stream is subscribed to for the request's type already (delta only)."""
        if variant == "sotw":
            count = len(req.resource_names)
        else:
            new = sum(1 for n in req.resource_names_subscribe if n not in subscribed)
            count = max(
                len(subscribed) + new,
                len(req.resource_names_unsubscribe),
                len(req.initial_resource_versions),
            )
        if count <= self.max_names:
            return None
        rtype = ResourceType.from_url(req.type_url)
        kind = rtype.short if rtype is not None else "an unknown type"
        return (
            f"{count} resource names for {kind} on one stream; "
            f"the limit is {self.max_names} (--max-names)"
        )


def names_held(variant: str, req: Any, subscribed: Collection[str]) -> int:
    """The resource names a stream names for ``req``'s type once ``req`` is handled (what
    ``max_total_names`` charges, with a delta stream's ``initial_resource_versions``): a
    SotW request's names; a delta stream's subscription after the request (``subscribed``:
    before it)."""
    if variant == "sotw":
        return len(set(req.resource_names) - {"*"})
    subscribe = set(req.resource_names_subscribe) - {"*"}
    added = {n for n in subscribe if n not in subscribed}
    removed = sum(1 for n in set(req.resource_names_unsubscribe) if n in subscribed or n in added)
    return len(subscribed) + len(added) - removed


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; ``take()`` says how long to wait."""

    __slots__ = ("burst", "lowest", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.lowest = float(burst)  # the fewest tokens left so far: how close it came
        self.stamp = time.monotonic()

    def take(self) -> float:
        """Take one token; the seconds to wait before the request it pays for (0: none)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1.0
        self.lowest = min(self.lowest, self.tokens)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    @property
    def peak(self) -> int:
        """The most tokens ever used at once (a burst of this many requests)."""
        return max(0, round(self.burst - self.lowest))
