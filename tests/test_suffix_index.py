"""Tests for retrieval.suffix_index.SuffixIndex."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.suffix_index import SuffixIndex  # noqa: E402

TEXT = [1, 2, 3, 1, 2, 4, 1, 2]
#       0  1  2  3  4  5  6  7


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        ([1, 2], (2, 2)),
        ([2], (1, 2)),
        ([1], (1, 1)),
        ([5, 1], (1, 1)),
        ([2, 3], (2, 3)),
        ([2, 4], (2, 6)),
        ([3, 1, 2, 4], (4, 6)),
        ([1, 2, 3, 1, 2], (5, 5)),
        ([9], (0, -1)),
        ([], (0, -1)),
        # [4,1,2] only occurs at the very end: fall back to [1,2].
        ([4, 1, 2], (2, 2)),
        (TEXT, (2, 2)),
        ([9, 9, 4], (1, 6)),
    ],
)
def test_match_literal(context: list[int], expected: tuple[int, int]) -> None:
    idx = SuffixIndex(TEXT)
    assert idx.match(context) == expected


@pytest.mark.parametrize(
    ("context", "max_tokens", "expected"),
    [
        ([1, 2], 3, [3, 1, 2]),
        ([2, 3], 2, [1, 2]),
        ([3, 1, 2, 4], 5, [1, 2]),
        ([5, 1], 3, [2, 3, 1]),
        ([9], 3, []),
        ([1, 2], 0, []),
        ([1, 2], -1, []),
    ],
)
def test_continuation_literal(context: list[int], max_tokens: int,
                              expected: list[int]) -> None:
    assert SuffixIndex(TEXT).continuation(context, max_tokens) == expected


@pytest.mark.parametrize(
    ("text", "context", "max_tokens", "max_branches", "expected"),
    [
        (TEXT, [1, 2], 3, 4, [([3, 1, 2], 1), ([4, 1, 2], 1)]),
        (TEXT, [2], 2, 4, [([3, 1], 1), ([4, 1], 1)]),
        (TEXT, [1], 3, 4, [([2, 3, 1], 3)]),
        (TEXT, [3, 1, 2, 4], 5, 4, [([1, 2], 1)]),
        (TEXT, [4, 1, 2], 3, 4, [([3, 1, 2], 1), ([4, 1, 2], 1)]),
        (TEXT, [9], 3, 4, []),
        (TEXT, [1, 2], 0, 4, []),
        (TEXT, [1, 2], 3, 0, []),
        # [1,2] is followed by 3 twice and 4 once.
        (TEXT + [3], [1, 2], 3, 4, [([3, 1, 2], 2), ([4, 1, 2], 1)]),
        (TEXT + [3], [1, 2], 3, 1, [([3, 1, 2], 2)]),
        # Equal counts: earlier first occurrence wins, not smaller token id.
        ([5, 2, 5, 1, 5, 3], [5], 2, 4, [([2, 5], 1), ([1, 5], 1), ([3], 1)]),
        # Overlapping occurrences count: [7,7] occurs 3 times in [7,7,7,7].
        ([7, 7, 7, 7], [7], 10, 4, [([7, 7, 7], 3)]),
    ],
)
def test_continuations_literal(text: list[int], context: list[int], max_tokens: int,
                               max_branches: int,
                               expected: list[tuple[list[int], int]]) -> None:
    assert SuffixIndex(text).continuations(context, max_tokens, max_branches) == expected


@pytest.mark.parametrize(
    ("text", "context", "expected"),
    [
        (TEXT, [1, 2], (2, [1, 4])),  # [1,2] also ends at 7, the last token: nothing follows it
        (TEXT, [1], (1, [0, 3, 6])),
        (TEXT, [5, 2, 4], (2, [5])),
        (TEXT, [9], (0, [])),
        ([7, 7, 7, 7], [7, 7], (2, [1, 2])),
    ],
)
def test_occurrences_literal(text: list[int], context: list[int], expected: tuple[int, list[int]]) -> None:
    assert SuffixIndex(text).occurrences(context) == expected


def test_occurrences_limit() -> None:
    text = [3, 1] * 50 + [2]
    m, ends = SuffixIndex(text).occurrences([3, 1], limit=4)
    assert m == 2 and len(ends) == 4 and ends == sorted(ends) and all(text[e - 1:e + 1] == [3, 1] for e in ends)


def test_count_cap() -> None:
    idx = SuffixIndex([7] * 10)
    assert idx.continuations([7], 2, 4) == [([7, 7], 9)]
    assert idx.continuations([7], 2, 4, count_cap=4) == [([7, 7], 4)]


def test_no_continuation_fallback() -> None:
    idx = SuffixIndex([1, 2, 3, 4])
    # Every suffix of the whole text ends with the unique final token.
    assert idx.match([1, 2, 3, 4]) == (0, -1)
    assert idx.continuation([1, 2, 3, 4], 5) == []
    assert idx.continuations([1, 2, 3, 4], 5, 5) == []
    assert idx.match([3]) == (1, 3)
    assert idx.match([2, 3]) == (2, 3)

    rep = SuffixIndex([7, 7, 7, 7])
    assert rep.match([7, 7]) == (2, 2)
    assert rep.match([7, 7, 7, 7]) == (3, 3)
    assert rep.match([7] * 6) == (3, 3)
    assert rep.continuations([7] * 6, 3, 3) == [([7], 1)]


def test_tiny_indexes() -> None:
    empty = SuffixIndex()
    assert len(empty) == 0
    assert empty.match([1]) == (0, -1)
    assert empty.continuations([1], 3, 3) == []
    empty.check_integrity()

    one = SuffixIndex([5])
    assert one.match([5]) == (0, -1)
    one.append(5)
    assert one.match([5]) == (1, 1)
    assert one.continuation([5], 4) == [5]
    one.check_integrity()


def test_max_match_capping() -> None:
    idx = SuffixIndex(TEXT)
    ctx = [1, 2, 3, 1, 2]
    assert idx.match(ctx, max_match=32) == (5, 5)
    assert idx.match(ctx, max_match=3) == (3, 5)
    assert idx.match(ctx, max_match=2) == (2, 2)
    assert idx.match(ctx, max_match=1) == (1, 2)
    assert idx.match(ctx, max_match=0) == (0, -1)
    assert idx.continuation(ctx, 3, max_match=2) == [3, 1, 2]
    assert idx.continuations(ctx, 3, 4, max_match=2) == [([3, 1, 2], 1), ([4, 1, 2], 1)]
    assert idx.continuations(ctx, 3, 4, max_match=5) == [([4, 1, 2], 1)]


def test_api_basics() -> None:
    idx = SuffixIndex([3, 4])
    idx.append(5)
    idx.extend(iter([6, 7]))
    assert len(idx) == 5
    assert idx.tokens == [3, 4, 5, 6, 7]
    assert idx.memory_bytes() > 0
    idx.check_integrity()


@pytest.mark.parametrize("bad", [-1, 1.0, "3", None, True])
def test_validation(bad: object) -> None:
    idx = SuffixIndex([1, 2])
    with pytest.raises(ValueError):
        idx.append(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        idx.extend([3, bad])  # type: ignore[list-item]
    # A rejected extend indexes nothing.
    assert idx.tokens == [1, 2]
    with pytest.raises(ValueError):
        SuffixIndex([bad])  # type: ignore[list-item]
    idx.check_integrity()


def test_integrity_detects_corruption() -> None:
    idx = SuffixIndex(TEXT)
    idx._length[idx._last] += 1
    with pytest.raises(ValueError):
        idx.check_integrity()


# --- brute-force oracle -----------------------------------------------------


def oracle_match(text: list[int], context: list[int], max_match: int) -> tuple[int, int]:
    if max_match <= 0:
        return 0, -1
    ctx = context[-max_match:]
    n = len(text)
    for ln in range(len(ctx), 0, -1):
        s = ctx[-ln:]
        for i in range(n - ln):
            if text[i:i + ln] == s:
                return ln, i + ln
    return 0, -1


def oracle_continuations(text: list[int], context: list[int], max_tokens: int,
                         max_branches: int, max_match: int,
                         count_cap: int) -> list[tuple[list[int], int]]:
    ln, _ = oracle_match(text, context, max_match)
    if ln == 0 or max_tokens <= 0 or max_branches <= 0:
        return []
    s = context[-ln:]
    first: dict[int, int] = {}
    counts: dict[int, int] = {}
    for i in range(len(text) - ln):
        if text[i:i + ln] == s:
            c = text[i + ln]
            first.setdefault(c, i + ln)
            counts[c] = counts.get(c, 0) + 1
    order = sorted(first, key=lambda c: (-min(counts[c], count_cap), first[c]))
    return [(text[first[c]:first[c] + max_tokens], min(counts[c], count_cap))
            for c in order[:max_branches]]


def oracle_occurrences(text: list[int], context: list[int], max_match: int) -> tuple[int, list[int]]:
    ln, _ = oracle_match(text, context, max_match)
    if ln == 0:
        return 0, []
    s = context[-ln:]
    return ln, [i + ln - 1 for i in range(len(text) - ln) if text[i:i + ln] == s]


def random_context(rng: random.Random, text: list[int], alphabet: int) -> list[int]:
    kind = rng.random()
    if text and kind < 0.5:
        # A real substring, optionally with a random prefix, so long matches occur.
        j = rng.randrange(len(text) + 1)
        i = rng.randrange(max(0, j - 40), j + 1)
        prefix = [rng.randrange(alphabet + 1) for _ in range(rng.randrange(3))]
        return prefix + text[i:j]
    if text and kind < 0.6:
        return list(text)
    return [rng.randrange(alphabet + 1) for _ in range(rng.randrange(12))]


def check_queries(rng: random.Random, idx: SuffixIndex, text: list[int],
                  alphabet: int, queries: int) -> None:
    for _ in range(queries):
        ctx = random_context(rng, text, alphabet)
        max_match = rng.choice([1, 2, 3, 5, 8, 32])
        max_tokens = rng.choice([0, 1, 3, 7])
        max_branches = rng.choice([1, 2, 8])
        count_cap = rng.choice([1, 3, 1024])
        expected = oracle_match(text, ctx, max_match)
        assert idx.match(ctx, max_match) == expected, (text, ctx, max_match)
        followers = [rng.randrange(alphabet + 1) for _ in range(rng.randrange(4))]
        assert idx.match_after(ctx, followers, max_match) == \
            [oracle_match(text, ctx + [t], max_match) for t in followers], (text, ctx, followers, max_match)
        m, ends = oracle_occurrences(text, ctx, max_match)
        assert idx.occurrences(ctx, max_match) == (m, ends), (text, ctx, max_match)
        limit = rng.choice([1, 2, 5])
        got_m, got = idx.occurrences(ctx, max_match, limit)
        assert got_m == m and len(got) == min(limit, len(ends)) and set(got) <= set(ends) and got == sorted(got)
        ln, start = expected
        cont = text[start:start + max_tokens] if ln and max_tokens > 0 else []
        assert idx.continuation(ctx, max_tokens, max_match) == cont
        assert idx.continuations(ctx, max_tokens, max_branches, max_match, count_cap) == \
            oracle_continuations(text, ctx, max_tokens, max_branches, max_match, count_cap)


def test_random_incremental() -> None:
    rng = random.Random(1234)
    for _ in range(60):
        alphabet = rng.randint(2, 6)
        length = rng.randint(0, 200)
        idx = SuffixIndex()
        text: list[int] = []
        for _ in range(length):
            t = rng.randrange(alphabet)
            idx.append(t)
            text.append(t)
            if rng.random() < 0.1:
                check_queries(rng, idx, text, alphabet, 3)
        assert idx.tokens == text
        idx.check_integrity()
        check_queries(rng, idx, text, alphabet, 20)


def test_random_extend() -> None:
    rng = random.Random(98765)
    for _ in range(60):
        alphabet = rng.randint(2, 6)
        text = [rng.randrange(alphabet) for _ in range(rng.randint(0, 200))]
        idx = SuffixIndex()
        cut = rng.randrange(len(text) + 1)
        idx.extend(text[:cut])
        idx.extend(text[cut:])
        assert len(idx) == len(text)
        idx.check_integrity()
        check_queries(rng, idx, text, alphabet, 30)
        # Same structure regardless of how the tokens arrived.
        one_shot = SuffixIndex(text)
        assert one_shot._trans == idx._trans
        assert one_shot._firstpos == idx._firstpos
