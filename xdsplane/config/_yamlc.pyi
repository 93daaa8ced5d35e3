from collections.abc import Callable
from typing import Any

def bind(path: str) -> str: ...
def load(
    data: bytes,
    memo: dict[str, Any],
    plain: Callable[[str], Any],
    depth: int,
    max_depth: int,
    max_values: int,
    noted: frozenset[str],
    /,
) -> list[tuple[Any, Any, list[tuple[str, Any]]]] | None: ...
