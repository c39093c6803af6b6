import pytest

from retrieval.sessions import SessionRegistry


def test_same_key_same_index_other_key_other_index():
    r = SessionRegistry()
    a = r.get("a")
    a.extend([1, 2, 3])
    assert r.get("a") is a
    assert r.get("b") is not a and len(r.get("b")) == 0
    assert len(r) == 2


def test_lru_eviction_by_count():
    r = SessionRegistry(max_sessions=2)
    a = r.get("a")
    r.get("b")
    r.get("a")  # a is now the most recently used
    r.get("c")
    assert len(r) == 2
    assert r.get("a") is a  # b was evicted, not a


def test_eviction_by_memory_keeps_the_current_session():
    big = list(range(2000))
    r = SessionRegistry(max_bytes=10**9)
    r.get("old").extend(big)
    one = r.memory_bytes()
    r.max_bytes = one + one // 2  # room for one big index, not two
    r.get("new").extend(big)
    cur = r.get("cur")  # the next request evicts the oldest until the bound holds again
    assert len(r) == 2 and r.get("cur") is cur
    assert r.memory_bytes() <= r.max_bytes


def test_limits_validated():
    with pytest.raises(ValueError):
        SessionRegistry(max_sessions=-1)
