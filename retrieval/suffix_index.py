"""Online suffix automaton over token ids, used to retrieve earlier continuations."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence


class SuffixIndex:
    """Suffix automaton over the tokens of one session, extended one token at a time.

    State 0 is the root. Per-state data lives in parallel lists so that the hot
    lookup path only touches plain lists and dicts.
    """

    __slots__ = (
        "_tokens",
        "_trans",
        "_link",
        "_length",
        "_firstpos",
        "_is_clone",
        "_children",
        "_child_idx",
        "_last",
        "__weakref__",  # the server counts live request-scoped indexes through weak references
    )

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self._tokens: list[int] = []
        self._trans: list[dict[int, int]] = [{}]
        self._link: list[int] = [-1]
        self._length: list[int] = [0]
        self._firstpos: list[int] = [-1]
        self._is_clone: list[bool] = [False]
        # Suffix-link tree, kept so occurrence counts can be computed on demand.
        self._children: list[list[int]] = [[]]
        # Position of each state inside its parent's children list, so a clone can
        # take over its original's slot in O(1) instead of a linear removal.
        self._child_idx: list[int] = [-1]
        self._last = 0
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        """The indexed tokens; callers must not mutate this list."""
        return self._tokens

    @staticmethod
    def _validate(token: object) -> int:
        # bool is an int subclass but never a meaningful token id.
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise ValueError(f"token ids must be non-negative ints, got {token!r}")
        return token

    def _new_state(self, length: int, link: int, firstpos: int, clone: bool,
                   trans: dict[int, int]) -> int:
        s = len(self._length)
        self._trans.append(trans)
        self._link.append(link)
        self._length.append(length)
        self._firstpos.append(firstpos)
        self._is_clone.append(clone)
        self._children.append([])
        self._child_idx.append(-1)
        return s

    def _attach(self, s: int, parent: int) -> None:
        kids = self._children[parent]
        self._child_idx[s] = len(kids)
        kids.append(s)

    def append(self, token: int) -> None:
        """Index one more token (amortised O(1))."""
        c = self._validate(token)
        trans = self._trans
        link = self._link
        length = self._length
        pos = len(self._tokens)
        self._tokens.append(c)

        cur = self._new_state(length[self._last] + 1, -1, pos, False, {})
        p = self._last
        while p != -1 and c not in trans[p]:
            trans[p][c] = cur
            p = link[p]
        if p == -1:
            parent = 0
        else:
            q = trans[p][c]
            if length[p] + 1 == length[q]:
                parent = q
            else:
                old_parent = link[q]
                clone = self._new_state(length[p] + 1, old_parent, self._firstpos[q],
                                        True, dict(trans[q]))
                # The clone sits between q and its old parent: it inherits q's
                # slot in the parent's children list, and q becomes its child.
                slot = self._child_idx[q]
                self._children[old_parent][slot] = clone
                self._child_idx[clone] = slot
                while p != -1 and trans[p].get(c) == q:
                    trans[p][c] = clone
                    p = link[p]
                link[q] = clone
                self._attach(q, clone)
                parent = clone
        link[cur] = parent
        self._attach(cur, parent)
        self._last = cur

    def extend(self, tokens: Iterable[int]) -> None:
        """Index several tokens; nothing is indexed if any of them is invalid."""
        toks = list(tokens)
        for t in toks:
            self._validate(t)
        for t in toks:
            self.append(t)

    def _walk(self, context: Sequence[int], v: int = 0, m: int = 0) -> tuple[int, int]:
        """(state, match_len) of the longest suffix of context that occurs anywhere in the text,
        reading on from state v matched over m tokens (the root by default)."""
        trans = self._trans
        link = self._link
        length = self._length
        for t in context:
            nxt = trans[v].get(t)
            while nxt is None and v:
                v = link[v]
                m = length[v]
                nxt = trans[v].get(t)
            if nxt is None:
                continue  # v is the root, m already 0
            v = nxt
            m += 1
        return v, m

    def _continuable(self, v: int, m: int, max_match: int) -> tuple[int, int]:
        """The state of the longest suffix, at most max_match long, with a token after it."""
        link = self._link
        length = self._length
        if m > max_match:
            while length[link[v]] >= max_match:
                v = link[v]
            m = max_match
        # A state's strings share their end positions, so if its first end is the
        # final token it has no other occurrence; its link's strings do.
        firstpos = self._firstpos
        last_idx = len(self._tokens) - 1
        while v and firstpos[v] >= last_idx:
            v = link[v]
            m = length[v]
        return v, m

    def _match_state(self, context: Sequence[int], max_match: int) -> tuple[int, int]:
        """Return (state, match_len) for the longest continuable suffix; state 0 if none."""
        if max_match <= 0 or len(self._tokens) < 2 or not context:
            return 0, 0
        ctx = context[-max_match:] if len(context) > max_match else context
        v, m = self._walk(ctx)
        return self._continuable(v, m, max_match)

    def match(self, context: Sequence[int], max_match: int = 32) -> tuple[int, int]:
        """Longest suffix of context[-max_match:] occurring with a following token.

        Returns (match_len, start) where text[start] follows the first such
        occurrence, or (0, -1) if there is none.
        """
        v, m = self._match_state(context, max_match)
        if not v:
            return 0, -1
        return m, self._firstpos[v] + 1

    def match_after(self, context: Sequence[int], followers: Sequence[int],
                    max_match: int = 32) -> list[tuple[int, int]]:
        """match(context + [t], max_match) for every t in followers, walking context only once."""
        if max_match <= 0 or len(self._tokens) < 2:
            return [(0, -1)] * len(followers)
        v0, m0 = self._walk(context[-max_match:] if len(context) > max_match else context)
        firstpos = self._firstpos
        out = []
        for t in followers:
            v, m = self._continuable(*self._walk((t,), v0, m0), max_match)
            out.append((m, firstpos[v] + 1) if v else (0, -1))
        return out

    def occurrences(self, context: Sequence[int], max_match: int = 32,
                    limit: int = 256) -> tuple[int, list[int]]:
        """(match_len, ends) for the longest suffix of context[-max_match:] occurring with a
        following token: `ends` are the positions where its earlier occurrences end, ascending.

        The occurrences are the prefix states in the matched state's suffix-link subtree; the
        search stops after `limit` of them (which ones is then up to the subtree's shape).
        """
        v, m = self._match_state(context, max_match)
        if not v:
            return 0, []
        firstpos = self._firstpos
        last_idx = len(self._tokens) - 1
        ends: list[int] = []
        for u in self._prefix_states(v):
            if len(ends) >= limit:
                break
            if firstpos[u] < last_idx:
                ends.append(firstpos[u])
        ends.sort()
        return m, ends

    def continuation(self, context: Sequence[int], max_tokens: int,
                     max_match: int = 32) -> list[int]:
        """Tokens that followed the first occurrence of the matched suffix."""
        if max_tokens <= 0:
            return []
        v, _ = self._match_state(context, max_match)
        if not v:
            return []
        start = self._firstpos[v] + 1
        return self._tokens[start:start + max_tokens]

    def _prefix_states(self, s: int) -> Iterator[int]:
        """The non-clone states in s's suffix-link subtree: one per end position of s's strings."""
        children = self._children
        is_clone = self._is_clone
        stack = [s]
        while stack:
            u = stack.pop()
            if not is_clone[u]:
                yield u
            stack.extend(children[u])

    def _count(self, s: int, cap: int) -> int:
        """Occurrences of state s (non-clone states in its link subtree), up to cap."""
        total = 0
        for _ in self._prefix_states(s):
            total += 1
            if total >= cap:
                return cap
        return total

    def continuations(self, context: Sequence[int], max_tokens: int, max_branches: int,
                      max_match: int = 32,
                      count_cap: int = 1024) -> list[tuple[list[int], int]]:
        """One branch per distinct token following the matched suffix.

        Each branch is (continuation starting with that token at the first
        occurrence of suffix+token, occurrence count capped at count_cap),
        sorted by count descending then by earlier first occurrence.
        """
        if max_tokens <= 0 or max_branches <= 0:
            return []
        v, _ = self._match_state(context, max_match)
        if not v:
            return []
        firstpos = self._firstpos
        cap = max(1, count_cap)
        ranked = sorted(
            ((self._count(w, cap), firstpos[w]) for w in self._trans[v].values()),
            key=lambda cw: (-cw[0], cw[1]),
        )
        toks = self._tokens
        return [(toks[fp:fp + max_tokens], cnt) for cnt, fp in ranked[:max_branches]]

    def check_integrity(self, sample: int = 2000) -> None:
        """Raise ValueError if the automaton's invariants are violated."""
        n = len(self._tokens)
        trans, link, length = self._trans, self._link, self._length
        firstpos, is_clone = self._firstpos, self._is_clone
        children, child_idx = self._children, self._child_idx
        ns = len(length)

        def fail(msg: str) -> None:
            raise ValueError(f"SuffixIndex integrity: {msg}")

        lists = (trans, link, firstpos, is_clone, children, child_idx)
        if any(len(x) != ns for x in lists):
            fail("parallel lists differ in length")
        if link[0] != -1 or length[0] != 0 or firstpos[0] != -1 or is_clone[0]:
            fail("bad root")
        if length[self._last] != n:
            fail("last state does not span the whole text")
        if n and ns > 2 * n:
            fail(f"{ns} states for {n} tokens")
        non_clones = 0
        n_children = 0
        for s in range(ns):
            for c, w in trans[s].items():
                if not 0 < w < ns or length[w] <= length[s]:
                    fail(f"transition {s}-{c}->{w} does not lengthen")
                if firstpos[w] <= firstpos[s] or self._tokens[firstpos[w]] != c:
                    fail(f"transition {s}-{c}->{w} inconsistent with firstpos")
            n_children += len(children[s])
            for i, k in enumerate(children[s]):
                if link[k] != s or child_idx[k] != i:
                    fail(f"children[{s}] entry {k} inconsistent with link/child_idx")
            if s == 0:
                continue
            p = link[s]
            if not 0 <= p < ns or length[p] >= length[s]:
                fail(f"link of {s} does not shorten")
            if not 0 <= firstpos[s] < n or firstpos[s] + 1 < length[s]:
                fail(f"firstpos of {s} out of range")
            if firstpos[p] > firstpos[s]:
                fail(f"link of {s} occurs first later than {s}")
            if not is_clone[s]:
                non_clones += 1
                if firstpos[s] != length[s] - 1:
                    fail(f"non-clone {s} is not a prefix state")
        if non_clones != n:
            fail(f"{non_clones} non-clone states for {n} tokens")
        if n_children != ns - 1:
            fail("children lists do not cover every non-root state once")

        step = max(1, (ns - 1) // max(1, sample))
        toks = self._tokens
        for s in range(1, ns, step):
            end = firstpos[s] + 1
            # Both the longest and the shortest string of s must lead to s.
            for ln in {length[s], length[link[s]] + 1}:
                v = 0
                for t in toks[end - ln:end]:
                    v = trans[v].get(t, -1)
                    if v < 0:
                        fail(f"string of state {s} not readable from root")
                if v != s:
                    fail(f"string of state {s} leads to state {v}")

    def memory_bytes(self) -> int:
        """Rough size of the index in bytes (containers only, ints excluded)."""
        gs = sys.getsizeof
        total = sum(gs(x) for x in (self._tokens, self._trans, self._link, self._length,
                                     self._firstpos, self._is_clone, self._children,
                                     self._child_idx))
        total += sum(gs(d) for d in self._trans)
        total += sum(gs(k) for k in self._children)
        return total
