"""Drafters: small CPU-side classes that turn a sequence's own tokens into a candidate draft tree.

Every drafter has the same interface and is chosen once. A drafter never touches the model or the
KV cache; it proposes generously, labelling each node with a statistics key, and the cost model
(decoding/cost_model.py) keeps only the nodes that pay for their verification.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol

from decoding.tree import DraftTree, NodeKind
from retrieval.suffix_index import SuffixIndex


def _bucket(value: int, edges: tuple[int, ...]) -> int:
    for i, edge in enumerate(edges):
        if value <= edge:
            return i
    return len(edges)


MATCH_EDGES = (1, 2, 4, 8)  # match-length buckets: longer matches predict better
CORPUS_EDGES = (1, 2, 4, 8, 16)  # the same in the corpus, where matches run longer
CORPUS_SEPARATOR = 2**62  # between a corpus's answers: beyond any vocabulary, so no match runs across it
RANK_EDGES = (1, 2, 4, 8, 16, 32)  # next-next guess rank buckets
SHARE_EDGES = (0.25, 0.5, 0.99)  # share of recent occurrences that a next-token trie node continues
CONFIRM_EDGES = (4,)  # a confirmed first token's rank among the last logit's top tokens (then up to `confirm`)


@functools.cache
def _trie_kind(family: str, m: int, s: int, depth: int) -> NodeKind:
    """A retrieval trie node's kind (match bucket m, share bucket s), made once: a trie has tens
    to hundreds of nodes every step, and kinds are few."""
    return NodeKind(family, (f"m{m}", f"s{s}"), depth)


def _add_trie(tree: DraftTree, chains: list[list[int]], family: str, m: int) -> None:
    """Hang the continuations of a match's occurrences under the root, one trie: each node it adds
    (nodes already there keep their kinds) labelled with the share of `chains` that run through it."""
    first_new, passes = len(tree), {}  # node -> chains that run through it
    for chain in chains:
        for node in tree.add_path(0, chain):
            if node >= first_new:
                passes[node] = passes.get(node, 0) + 1
    share = [_bucket(n / len(chains), SHARE_EDGES) for n in range(len(chains) + 1)]
    kinds, depths = tree.kinds, tree.depths
    for node, n in passes.items():
        kinds[node] = _trie_kind(family, m, share[n], depths[node])


# An echo (see Engine._keep_echoes): ("t", chain) from a rejected node that held the root's token,
# ("s", chain) from a rejected node where the root now sits; chain: the target's predictions.
Echo = tuple[str, list[int]]


class Drafter(Protocol):
    name: str
    guesses: int  # how many top-k tokens of the last logit the drafter wants (0 = none)
    confirm: int  # how many of them may confirm a retrieved first token (0 = none; see LogitSpecDrafter)
    echoes: int  # how many echoes (token chains, see LogitSpecDrafter) the drafter wants (0 = none)
    forced: bool  # under a grammar, also draft the tokens it forces after the root (decoding/grammar.py)
    lookups: dict[str, list[int]]  # retrieval kind -> [lookups, hits], running totals for metrics

    def propose(self, index: SuffixIndex, x0: int, guesses: list[int], echoes: Sequence[Echo] = (),
                top: Sequence[int] = ()) -> DraftTree:
        """A candidate tree rooted at x0, the decided next token (not yet in `index`). guesses: the
        top tokens of the last logit to hang guess branches for (none when they cannot pay); top:
        its top `max(guesses, confirm) + 1` tokens, whether or not guesses are drafted."""
        ...

    def openings(self, index: SuffixIndex, x0: int, echoes: Sequence[Echo] = ()) -> Sequence[NodeKind]:
        """Kinds of the depth-1 nodes that propose() could return, found cheaply: no node deeper in
        the tree is likelier than its depth-1 ancestor, so if none of these can pay, nothing can."""
        ...


def top_wanted(drafter: Drafter) -> int:
    """How many of the last logit's top tokens besides x0 the drafter takes (Drafter.propose's `top`)."""
    return max(drafter.guesses, drafter.confirm)


class ArDrafter:
    """Plain autoregressive decoding: the tree is the root alone."""

    name = "ar"
    guesses = 0
    confirm = 0
    echoes = 0
    forced = False

    def __init__(self):
        self.lookups: dict[str, list[int]] = {}

    def propose(self, index: SuffixIndex, x0: int, guesses: list[int], echoes: Sequence[Echo] = (),
                top: Sequence[int] = ()) -> DraftTree:
        return DraftTree.root(x0)

    def openings(self, index: SuffixIndex, x0: int, echoes: Sequence[Echo] = ()) -> list[NodeKind]:
        return []


class PldDrafter:
    """Prompt lookup decoding: one chain after the earliest occurrence of the longest n-gram match."""

    name = "pld"
    guesses = 0
    confirm = 0
    echoes = 0
    forced = True

    def __init__(self, max_ngram: int = 3, max_tokens: int = 10):
        self.max_ngram = max_ngram
        self.max_tokens = max_tokens
        self.lookups = {"pld": [0, 0]}

    def openings(self, index: SuffixIndex, x0: int, echoes: Sequence[Echo] = ()) -> list[NodeKind]:
        match_len, _ = index.match(index.tokens[-self.max_ngram:] + [x0], self.max_ngram)
        return [NodeKind("pld", (f"m{_bucket(match_len, MATCH_EDGES)}",), 1)] if match_len else []

    def add_chain(self, tree: DraftTree, index: SuffixIndex, x0: int) -> None:
        """Hang PLD's chain under the root of `tree` (nodes already there keep their kinds)."""
        match_len, start = index.match(index.tokens[-self.max_ngram:] + [x0], self.max_ngram)
        self.lookups["pld"][0] += 1
        if match_len:
            self.lookups["pld"][1] += 1
            chain = index.tokens[start:start + self.max_tokens]
            m = _bucket(match_len, MATCH_EDGES)
            tree.add_chain(0, chain, [NodeKind("pld", (f"m{m}",), d) for d in range(1, len(chain) + 1)])

    def propose(self, index: SuffixIndex, x0: int, guesses: list[int], echoes: Sequence[Echo] = (),
                top: Sequence[int] = ()) -> DraftTree:
        tree = DraftTree.root(x0)
        self.add_chain(tree, index, x0)
        return tree


class LogitSpecDrafter:
    """LogitSpec: retrieval for the next token and for each next-next guess from the last logit.

    Branch for the next token: a trie of what followed the most recent earlier occurrences of the
    longest match of ctx + [x0] (the latest one deepest); each node's kind carries the share of
    those occurrences that pass through it, so a continuation every occurrence agrees on ranks
    above one that a single occurrence had. Branches for the next-next token: each top-k token t
    of the last logit (t != x0) is a guess for the token after x0, followed by what followed
    ctx + [x0, t]; lower ranks get shorter retrievals (reference: 4 tokens for rank <= 8, 3 for
    <= 32, else 1). Echoes (Engine._keep_echoes): in the previous step's tree, what the target
    predicted after a rejected node that held x0 or sat where x0 now sits, continued down that
    node's draft as far as the target agreed there; each is one more branch for what follows x0.
    And PLD's chain (the earliest occurrence of the longest match of up to 3 tokens, which the
    trie of the latest occurrences of the longest match may not hold), under PLD's own kinds: the
    candidate tree always holds what `pld` would draft, ranked by the same statistics.

    And, where the model ships one (decoding/corpus.py), the corpus: the model's own answers to
    questions of ours, indexed once and shared read-only by every sequence. What followed the
    longest match of ctx + [x0] there, up to `corpus_branches` occurrences `corpus_tokens` deep,
    is a trie like the next-token one, under kinds of their own (match bucket, share), added
    last so that it takes only nodes no other branch proposed. A session's own text says what
    this answer repeats; the corpus says how this model tends to go on (list openings, markdown,
    stock phrases), which helps where the session has nothing yet.

    The last logit also confirms: a first token that retrieval (or an echo) proposes and that is
    among the logit's top `confirm` tokens (x0 aside) is likelier to be accepted than one the
    logit does not rank, so each such branch's kinds, first node to leaves, carry a confirmation
    detail (c1: rank <= 4, c2: rank <= confirm, c0: not among them). In the replay of 63
    Spec-Bench answers (bench/draft_replay.py, whole trees), next-token first nodes were accepted
    56% / 37% / 14% of the time as c1 / c2 / c0, their children 29% / 21% / 9%; without the
    detail, their kinds had averaged over all three.
    """

    name = "logitspec"
    forced = True

    def __init__(self, guesses: int = 48, next_tokens: int = 16, recent: int = 16, max_match: int = 32,
                 echoes: int = 4, search: int = 256, confirm: int = 48, corpus: SuffixIndex | None = None,
                 corpus_tokens: int = 6, corpus_branches: int = 4):
        self.guesses = guesses
        self.confirm = confirm
        self.next_tokens = next_tokens  # depth of the latest occurrence's branch; the others get half
        self.recent = recent  # occurrences in the next-token trie
        self.max_match = max_match
        self.echoes = echoes
        self.search = search  # occurrences looked at to find the recent ones
        self.pld = PldDrafter()
        self.corpus = corpus  # read-only, shared by every sequence (never extended)
        self.corpus_tokens = corpus_tokens
        self.corpus_branches = corpus_branches
        self.lookups = {"next": [0, 0], "echo": [0, 0], "corpus": [0, 0],
                        **{f"guess:r{r}": [0, 0] for r in range(len(RANK_EDGES) + 1)}}
        self.lookups["pld"] = self.pld.lookups["pld"]

    @staticmethod
    def guess_length(rank: int) -> int:
        return 4 if rank <= 8 else 3 if rank <= 32 else 1

    @staticmethod
    def _echo_detail(tag: str, rank: int) -> str:
        return f"{tag}{min(rank, 2)}"

    @staticmethod
    def _add_retrieved(tree: DraftTree, node: int, tokens: list[int], start: int, length: int,
                       match_len: int, family: str, detail: str) -> None:
        """Hang `length` tokens of what followed a retrieval (text from `start`) under the depth-1
        node of a next-next candidate (a guess or an echo)."""
        chain = tokens[start:start + length]
        m = min(_bucket(match_len, MATCH_EDGES), 2)
        tree.add_chain(node, chain, [NodeKind(family, (detail, f"m{m}"), d) for d in range(2, len(chain) + 2)])

    def openings(self, index: SuffixIndex, x0: int, echoes: Sequence[Echo] = ()) -> Sequence[NodeKind]:
        context = index.tokens[-(self.max_match - 1):] + [x0]
        match_len, _ = index.match(context, self.max_match)
        corpus_len = self.corpus.match(context, self.max_match)[0] if self.corpus is not None else 0
        return _logitspec_openings(min(3, sum(t == "t" for t, _ in echoes)), min(3, sum(t == "s" for t, _ in echoes)),
                                   _bucket(match_len, MATCH_EDGES) if match_len else -1,
                                   tuple(self.pld.openings(index, x0)), bool(self.confirm), bool(self.guesses),
                                   _bucket(corpus_len, CORPUS_EDGES) if corpus_len else -1)

    def propose(self, index: SuffixIndex, x0: int, guesses: list[int],
                echoes: Sequence[Echo] = (), top: Sequence[int] = ()) -> DraftTree:
        tree = DraftTree.root(x0)
        tokens = index.tokens
        context = tokens[-(self.max_match - 1):] + [x0]
        match_len, ends = index.occurrences(context, self.max_match, self.search)
        self.lookups["next"][0] += 1
        if match_len:
            self.lookups["next"][1] += 1
            recent = ends[-self.recent:][::-1]
            depths = [self.next_tokens] + [self.next_tokens // 2] * (len(recent) - 1)  # the latest deepest
            _add_trie(tree, [tokens[end + 1:end + 1 + depth] for end, depth in zip(recent, depths)], "next",
                      _bucket(match_len, MATCH_EDGES))
        self.pld.add_chain(tree, index, x0)
        # Echoes and guesses share the context ctx + [x0]: walked once, then one step per token.
        after = context[-(self.max_match - 1):]
        echoes = [(tag, e) for tag, e in echoes if e][:2 * self.echoes]
        firsts = [e[0] for _, e in echoes]
        rank = {"t": 0, "s": 0}
        for (tag, echo), (match_len, start) in zip(echoes, index.match_after(after, firsts, self.max_match)):
            detail = self._echo_detail(tag, rank[tag])
            rank[tag] += 1
            tree.add_chain(0, echo, [NodeKind("echo", (detail,) if d == 1 else (detail, "w"), d)
                                     for d in range(1, len(echo) + 1)])
            self.lookups["echo"][0] += 1
            if match_len and len(echo) == 1:  # a lone prediction goes on with what followed it before
                self.lookups["echo"][1] += 1
                self._add_retrieved(tree, tree.children(0)[echo[0]], tokens, start, 4, match_len, "echo", detail)
        guesses = [t for t in guesses if t != x0]
        for rank, (t, (match_len, start)) in enumerate(
                zip(guesses, index.match_after(after, guesses, self.max_match)), 1):
            r = _bucket(rank, RANK_EDGES)
            node = tree.add(0, t, NodeKind("guess", (f"r{r}",), 1))
            counter = self.lookups[f"guess:r{r}"]
            counter[0] += 1
            if match_len:
                counter[1] += 1
                self._add_retrieved(tree, node, tokens, start, self.guess_length(rank), match_len, "guess", f"r{r}")
        if self.corpus is not None:
            self._add_corpus(tree, context)
        if self.confirm and top:
            self._confirm(tree, [t for t in top if t != x0][:self.confirm])
        return tree

    def _add_corpus(self, tree: DraftTree, context: list[int]) -> None:
        """The corpus trie (see the class) under the root: kinds only for nodes it adds."""
        match_len, ends = self.corpus.occurrences(context, self.max_match, 8 * self.corpus_branches)
        self.lookups["corpus"][0] += 1
        if not match_len:
            return
        self.lookups["corpus"][1] += 1
        text, chains = self.corpus.tokens, []
        for end in ends[-self.corpus_branches:]:
            chain = text[end + 1:end + 1 + self.corpus_tokens]
            if CORPUS_SEPARATOR in chain:  # the answer ended there
                chain = chain[:chain.index(CORPUS_SEPARATOR)]
            chains.append(chain)
        _add_trie(tree, chains, "corpus", _bucket(match_len, CORPUS_EDGES))

    def _confirm(self, tree: DraftTree, top: list[int]) -> None:
        """Add each branch's confirmation detail (see the class) to its kinds, guesses aside (their
        rank is their detail already). Parents precede children, so one pass down the tree."""
        rank = {t: r for r, t in enumerate(top, 1)}
        tag = [""] * len(tree)
        for i in range(1, len(tree)):
            kind = tree.kinds[i]
            if tree.depths[i] == 1:
                r = rank.get(tree.tokens[i])
                tag[i] = "c0" if r is None else f"c{1 + _bucket(r, CONFIRM_EDGES)}"
            else:
                tag[i] = tag[tree.parents[i]]
            if kind.family != "guess":
                tree.kinds[i] = kind.detailed(tag[i])


@functools.cache
def _logitspec_openings(t_echoes: int, s_echoes: int, m: int, pld: tuple[NodeKind, ...], confirm: bool,
                        guesses: bool, corpus_m: int = -1) -> tuple[NodeKind, ...]:
    """LogitSpecDrafter.openings for these counts of echoes ("t", "s"; at most 3 each), the
    next-token match bucket (-1: no match), PLD's openings and the corpus match bucket (-1: no
    match), made once: asked for on every step, they are few. A tuple: every caller with the same
    arguments gets this same one."""
    kinds = [NodeKind("echo", (LogitSpecDrafter._echo_detail(tag, rank),), 1)
             for tag, n in (("t", t_echoes), ("s", s_echoes)) for rank in range(n)]
    if m >= 0:
        kinds += [_trie_kind("next", m, s, 1) for s in range(len(SHARE_EDGES) + 1)]
    if corpus_m >= 0:
        kinds += [_trie_kind("corpus", corpus_m, s, 1) for s in range(len(SHARE_EDGES) + 1)]
    kinds += pld
    if confirm:  # without the logit at hand, each as it may be confirmed
        kinds = [k.detailed(f"c{c}") for k in kinds for c in range(len(CONFIRM_EDGES) + 2)]
    return tuple(kinds + ([NodeKind("guess", (f"r{_bucket(1, RANK_EDGES)}",), 1)] if guesses else []))


DRAFTERS = {"ar": ArDrafter, "pld": PldDrafter, "logitspec": LogitSpecDrafter}


def make_drafter(method: str) -> Drafter:
    if method not in DRAFTERS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(DRAFTERS)}")
    return DRAFTERS[method]()
