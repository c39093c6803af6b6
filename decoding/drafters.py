"""Drafters: small CPU-side classes that turn a sequence's own tokens into a candidate draft tree.

Every drafter has the same interface and is chosen once. A drafter never touches the model or the
KV cache; it proposes generously, labelling each node with a statistics key, and the cost model
(decoding/cost_model.py) keeps only the nodes that pay for their verification.
"""

from __future__ import annotations

from typing import Protocol

from decoding.tree import DraftTree
from retrieval.suffix_index import SuffixIndex


def _bucket(value: int, edges: tuple[int, ...]) -> int:
    for i, edge in enumerate(edges):
        if value <= edge:
            return i
    return len(edges)


MATCH_EDGES = (1, 2, 4, 8)  # match-length buckets: longer matches predict better
RANK_EDGES = (1, 2, 4, 8, 16, 32)  # next-next guess rank buckets


class Drafter(Protocol):
    name: str
    guesses: int  # how many top-k tokens of the last logit the drafter wants (0 = none)
    lookups: dict[str, list[int]]  # retrieval kind -> [lookups, hits], running totals for metrics

    def propose(self, index: SuffixIndex, x0: int, guesses: list[int]) -> DraftTree:
        """A candidate tree rooted at x0, the decided next token (not yet in `index`)."""
        ...

    def openings(self, index: SuffixIndex, x0: int) -> list[str]:
        """Kinds of the depth-1 nodes that propose() could return, found cheaply: no node deeper in
        the tree is likelier than its depth-1 ancestor, so if none of these can pay, nothing can."""
        ...


class ArDrafter:
    """Plain autoregressive decoding: the tree is the root alone."""

    name = "ar"
    guesses = 0

    def __init__(self):
        self.lookups: dict[str, list[int]] = {}

    def propose(self, index: SuffixIndex, x0: int, guesses: list[int]) -> DraftTree:
        return DraftTree.root(x0)

    def openings(self, index: SuffixIndex, x0: int) -> list[str]:
        return []


class PldDrafter:
    """Prompt lookup decoding: one chain after the earliest occurrence of the longest n-gram match."""

    name = "pld"
    guesses = 0

    def __init__(self, max_ngram: int = 3, max_tokens: int = 10):
        self.max_ngram = max_ngram
        self.max_tokens = max_tokens
        self.lookups = {"pld": [0, 0]}

    def openings(self, index: SuffixIndex, x0: int) -> list[str]:
        match_len, _ = index.match(index.tokens[-self.max_ngram:] + [x0], self.max_ngram)
        return [f"pld:m{_bucket(match_len, MATCH_EDGES)}:1"] if match_len else []

    def propose(self, index: SuffixIndex, x0: int, guesses: list[int]) -> DraftTree:
        tree = DraftTree.root(x0)
        context = index.tokens[-self.max_ngram:] + [x0]
        match_len, start = index.match(context, self.max_ngram)
        self.lookups["pld"][0] += 1
        if match_len:
            self.lookups["pld"][1] += 1
            chain = index.tokens[start:start + self.max_tokens]
            m = _bucket(match_len, MATCH_EDGES)
            tree.add_chain(0, chain, [f"pld:m{m}:{d}" for d in range(1, len(chain) + 1)])
        return tree


class LogitSpecDrafter:
    """LogitSpec: retrieval for the next token and for each next-next guess from the last logit.

    Branch for the next token: what followed the longest earlier match of ctx + [x0], plus the
    runner-up distinct continuations. Branches for the next-next token: each top-k token t of the
    last logit (t != x0) is a guess for the token after x0, followed by what followed ctx + [x0, t];
    lower ranks get shorter retrievals (reference: 4 tokens for rank <= 8, 3 for <= 32, else 1).
    """

    name = "logitspec"

    def __init__(self, guesses: int = 48, next_tokens: int = 24, next_branches: int = 3,
                 max_match: int = 32):
        self.guesses = guesses
        self.next_tokens = next_tokens
        self.next_branches = next_branches
        self.max_match = max_match
        self.lookups = {"next": [0, 0], **{f"guess:r{r}": [0, 0] for r in range(len(RANK_EDGES) + 1)}}

    @staticmethod
    def guess_length(rank: int) -> int:
        return 4 if rank <= 8 else 3 if rank <= 32 else 1

    def openings(self, index: SuffixIndex, x0: int) -> list[str]:
        kinds = [f"guess:r{_bucket(1, RANK_EDGES)}:1"] if self.guesses else []
        match_len, _ = index.match(index.tokens[-(self.max_match - 1):] + [x0], self.max_match)
        if match_len:
            m = _bucket(match_len, MATCH_EDGES)
            kinds += [f"next{b}:m{m}:1" for b in range(self.next_branches)]
        return kinds

    def propose(self, index: SuffixIndex, x0: int, guesses: list[int]) -> DraftTree:
        tree = DraftTree.root(x0)
        tokens = index.tokens
        context = tokens[-(self.max_match - 1):] + [x0]
        match_len, _ = index.match(context, self.max_match)
        self.lookups["next"][0] += 1
        if match_len:
            self.lookups["next"][1] += 1
            m = _bucket(match_len, MATCH_EDGES)
            branches = index.continuations(context, self.next_tokens, self.next_branches, self.max_match)
            for b, (chain, _count) in enumerate(branches):
                length = self.next_tokens if b == 0 else self.next_tokens // 4
                chain = chain[:length]
                tree.add_chain(0, chain, [f"next{b}:m{m}:{d}" for d in range(1, len(chain) + 1)])
        guesses = [t for t in guesses if t != x0]
        # The guesses share the context ctx + [x0]: walked once, then one step per guess.
        for rank, (t, (match_len, start)) in enumerate(
                zip(guesses, index.match_after(context[-(self.max_match - 1):], guesses, self.max_match)), 1):
            r = _bucket(rank, RANK_EDGES)
            node = tree.add(0, t, f"guess:r{r}:1")
            counter = self.lookups[f"guess:r{r}"]
            counter[0] += 1
            if match_len:
                counter[1] += 1
                chain = tokens[start:start + self.guess_length(rank)]
                m = min(_bucket(match_len, MATCH_EDGES), 2)
                tree.add_chain(node, chain, [f"guess:r{r}:m{m}:{d}" for d in range(2, len(chain) + 2)])
        return tree


DRAFTERS = {"ar": ArDrafter, "pld": PldDrafter, "logitspec": LogitSpecDrafter}


def make_drafter(method: str) -> Drafter:
    if method not in DRAFTERS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(DRAFTERS)}")
    return DRAFTERS[method]()
