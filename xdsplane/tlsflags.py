"""TLS files come as a set: a certificate, its key and a CA, all three or none.

``serve`` (--tls-cert, --tls-key, --client-ca), the guard (the same three) and ``bootstrap``
(--tls-cert, --tls-key, --ca) apply this one rule.
"""

from __future__ import annotations

from collections.abc import Mapping


def all_or_none(files: Mapping[str, object | None]) -> bool:
    """True with every file given, False with none; ValueError naming the missing flags.

    ``files`` maps each flag, in the order to name them, to its value.
    """
    given = [flag for flag, value in files.items() if value]
    if not given:
        return False
    missing = [flag for flag in files if flag not in given]
    if missing:
        flags = list(files)
        together = ", ".join(flags[:-1]) + " and " + flags[-1]
        raise ValueError(f"{together} go together (missing: {', '.join(missing)})")
    return True
