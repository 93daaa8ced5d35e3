"""Configuration errors that point at a file, a line and a column."""

from __future__ import annotations

from dataclasses import dataclass

from xdsplane.redact import escape_control, quote, scrub_message

__all__ = ["MAX_MESSAGE", "ConfigError", "ConfigErrors", "Location", "quote"]


@dataclass(frozen=True, slots=True)
class Location:
    path: str
    line: int = 0  # 1-based; 0 when unknown
    column: int = 0  # 1-based; 0 when unknown

    @classmethod
    def parse(cls, source: str) -> Location:
        """A location from ``path:line`` or ``path:line:column`` (Resource.source)."""
        path, _, last = source.rpartition(":")
        if path and last.isdigit():
            head, _, line = path.rpartition(":")
            if head and line.isdigit():
                return cls(head, int(line), int(last))
            return cls(path, int(last))
        return cls(source or "<snapshot>")

    def __str__(self) -> str:
        path = escape_control(self.path)
        if self.line and self.column:
            return f"{path}:{self.line}:{self.column}"
        if self.line:
            return f"{path}:{self.line}"
        return path


MAX_MESSAGE = 1000  # characters of one error message


@dataclass(frozen=True, slots=True)
class ConfigError:
    """One problem found in a folder; ``str()`` gives ``path:line:column: message``."""

    location: Location
    message: str

    def __post_init__(self) -> None:
        # A message quotes what the file says: maybe a private key pasted where a file name
        # belongs, a token, control characters, or megabytes on one line. Whatever built the
        # message, key material is replaced (xdsplane.redact), each quoted value is cut and
        # control characters are escaped, so no output surface can print them.
        message = scrub_message(self.message)
        if len(message) > MAX_MESSAGE:
            message = f"{message[: MAX_MESSAGE - 40]}... ({len(message)} characters)"
        object.__setattr__(self, "message", message)

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class ConfigErrors(Exception):
    """All the problems found in one load, raised together."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = sorted(
            errors, key=lambda e: (e.location.path, e.location.line, e.location.column)
        )
        super().__init__("\n".join(str(e) for e in self.errors))
