"""JsonMemo: a model's JSON by object identity, kept for one load after it was last read."""

from __future__ import annotations

from pydantic import BaseModel

from xdsplane.policy.jsonmemo import JsonMemo


class M(BaseModel):
    a: int


def test_the_memo_follows_the_object_not_its_id_and_forgets_what_a_load_did_not_read() -> None:
    memo: JsonMemo[M] = JsonMemo()
    one = M(a=1)
    assert memo.json(one) == '{"a":1}'
    memo.next_load()
    assert memo.json(one) == '{"a":1}'  # kept across one load
    memo.next_load()
    memo.next_load()
    assert memo._last == {} and memo._used == {}  # not read for a load: forgotten
    # An id the memo holds, now another object's (ids are reused once freed): its own JSON.
    two = M(a=2)
    memo._used[id(two)] = (one, '{"a":1}')
    assert memo.json(two) == '{"a":2}'
