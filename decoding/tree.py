"""One draft-tree type for chains and trees: token ids plus parent indices.

Node 0 is the root (the next token, already decided); every other node's parent comes before it
(topological order), so the attention mask, the positions and the accepted path all derive from
`parents` alone. Sibling tokens are distinct: the tree is a trie of draft continuations.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class NodeKind(NamedTuple):
    """What a draft node is, for the acceptance statistics (decoding/cost_model.py): the branch
    that proposed it, the details that predict its acceptance (coarsest first: a retrieval's
    match-length bucket, a guess's rank bucket, ...), its depth, and whether its sequence accepted
    drafts in its last step (hot: acceptance runs in streaks)."""

    family: str  # "next", "guess", "echo", "pld", "forced"
    details: tuple[str, ...]
    depth: int
    hot: bool = False

    # Both are asked for on every node of every step, and kinds are few (families x detail
    # buckets x depths): each is made once (functools.cache) instead of by a namedtuple _replace.
    @functools.cache
    def coarse(self) -> "NodeKind":
        """The kind without its finer details: the first detail stays when there are several
        (next m2 s3 -> next m2), a lone detail goes (pld m2 -> pld), so that a failing sub-family
        (retrievals after a 1-token match) does not drag down untried siblings (the same after a
        long match) below what they would need to be proposed at all."""
        if len(self.details) > 1:
            return self._replace(details=self.details[:1])
        return self._replace(details=()) if self.details else self

    @functools.cache
    def heated(self) -> "NodeKind":
        return self._replace(hot=True)

    @functools.cache
    def detailed(self, detail: str) -> "NodeKind":
        """The kind with one more, finest detail."""
        return self._replace(details=(*self.details, detail))

    def __str__(self) -> str:
        return ("h." if self.hot else "") + ":".join((self.family, *self.details, str(self.depth)))


@dataclass(slots=True)
class DraftTree:
    tokens: list[int]
    parents: list[int]
    kinds: list[NodeKind | None]  # acceptance-statistics key of each node (None for the root)
    depths: list[int] = field(default_factory=list)
    _children: list[dict[int, int]] = field(default_factory=list)

    @classmethod
    def root(cls, token: int) -> "DraftTree":
        return cls([token], [-1], [None], [0], [{}])

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self, node: int) -> dict[int, int]:
        """token -> child node index, in insertion order."""
        return self._children[node]

    def add(self, parent: int, token: int, kind: NodeKind | None) -> int:
        """Add `token` under `parent` unless that child exists; return the child's index."""
        existing = self._children[parent].get(token)
        if existing is not None:
            return existing
        idx = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.kinds.append(kind)
        self.depths.append(self.depths[parent] + 1)
        self._children.append({})
        self._children[parent][token] = idx
        return idx

    def add_path(self, parent: int, tokens: list[int]) -> list[int]:
        """`add` each token under the one before (the first under `parent`), kinds left None for
        the caller; returns the nodes, existing or new, one per token."""
        nodes = []
        children, depth = self._children, self.depths[parent]
        for token in tokens:
            depth += 1
            node = children[parent].get(token)
            if node is None:
                node = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(parent)
                self.kinds.append(None)
                self.depths.append(depth)
                children.append({})
                children[parent][token] = node
            nodes.append(node)
            parent = node
        return nodes

    def add_chain(self, parent: int, tokens: list[int], kinds: list[NodeKind]) -> None:
        for token, kind in zip(tokens, kinds):
            parent = self.add(parent, token, kind)

    def subtree(self, keep: list[int]) -> "DraftTree":
        """The tree restricted to nodes `keep` (must contain the root and every kept node's parent)."""
        keep = sorted(keep)
        new_index = {old: new for new, old in enumerate(keep)}
        out = DraftTree.root(self.tokens[0])
        for old in keep[1:]:
            parent = new_index.get(self.parents[old])
            if parent is None:
                raise ValueError(f"node {old} kept without its parent {self.parents[old]}")
            out.add(parent, self.tokens[old], self.kinds[old])
        return out

    def attention_mask(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """[n, n] bool: node i sees its ancestors and itself. None for a chain (plain causal)."""
        n = len(self.tokens)
        if all(p == i - 1 for i, p in enumerate(self.parents)):
            return None
        rows = [[False] * n for _ in range(n)]
        for i, p in enumerate(self.parents):
            if p >= 0:
                rows[i][:p + 1] = rows[p][:p + 1]
            rows[i][i] = True
        return torch.tensor(rows, dtype=torch.bool, device=device)

    def path_to(self, node: int) -> list[int]:
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]
