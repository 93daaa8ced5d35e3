"""What both protocol variants share: outgoing messages and per-type status."""

from __future__ import annotations

from dataclasses import dataclass, field

from xdsplane.types import ResourceType


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One response ready to write: its bytes plus what status and metrics need."""

    type: ResourceType
    version: str
    nonce: str
    data: bytes
    resources: int
    removed: int = 0


@dataclass(slots=True)
class TypeStatus:
    """What a client made of one type: for /status, metrics and logs."""

    acked_version: str = ""
    sent_version: str = ""
    responses: int = 0
    acks: int = 0
    nacks: int = 0
    last_nack: str = ""
    nacked_version: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "acked_version": self.acked_version,
            "sent_version": self.sent_version,
            "responses": self.responses,
            "acks": self.acks,
            "nacks": self.nacks,
            "last_nack": self.last_nack,
            "nacked_version": self.nacked_version,
        }


@dataclass(slots=True)
class Nonces:
    """Nonces are per stream: one counter, the latest per type remembered by the caller."""

    counter: int = 0
    prefix: str = field(default="")

    def next(self) -> str:
        self.counter += 1
        return f"{self.prefix}{self.counter}"


def nack_message(error_detail: object) -> str:
    message = str(getattr(error_detail, "message", "") or "")
    return message[:2000] or "rejected without a message"
