"""A model's JSON, remembered by the model object's identity from one load to the next.

The policy's models are immutable and an unchanged file keeps its models (the same objects)
across loads, so a model's ``model_dump_json`` is worth keeping while the object lives. Each
load reads through ``json``; ``next_load`` then forgets what the load did not read (two
generations), so the memo never outgrows one policy.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


class JsonMemo(Generic[M]):
    def __init__(self) -> None:
        self._last: dict[int, tuple[M, str]] = {}
        self._used: dict[int, tuple[M, str]] = {}

    def json(self, model: M) -> str:
        key = id(model)
        hit = self._used.get(key) or self._last.get(key)
        if hit is None or hit[0] is not model:  # an id reused by another object
            hit = (model, model.model_dump_json())
        self._used[key] = hit
        return hit[1]

    def next_load(self) -> None:
        self._last, self._used = self._used, {}
