"""Cost-aware tree sizing: keep the draft nodes that raise expected accepted tokens per second.

Two measurements drive it, both plain Python: how long a forward of N tokens takes on this
hardware (calibrated at start-up, then updated from every step), and how often a draft node of
each kind (drafter branch, retrieval match length, depth) ends up accepted. Each step, the nodes of
all sequences in the batch compete in one ranking; the cut that maximises
(sequences + expected accepted nodes) / cost(tokens in the forward) wins, down to no draft at all.
"""

from __future__ import annotations

from decoding.tree import DraftTree


class AcceptanceStats:
    """Decayed accept/offer counts per node kind, shrunk towards coarser kinds while data is thin.

    A kind reads "family:detail...:depth" (e.g. "next:m2:s3:3"). Its estimate is pulled towards its
    coarse kind (see coarse), whose estimate is pulled towards `prior`, so a rare kind starts
    from what its family has shown instead of from an arbitrary constant.
    """

    def __init__(self, prior: float = 0.2, prior_weight: float = 4.0, decay: float = 0.998):
        self.prior = prior
        self.prior_weight = prior_weight
        self.decay = decay
        self.kinds: dict[str, list[float]] = {}  # kind (fine or coarse) -> [offered, accepted], decayed
        self.by_position: dict[int, list[int]] = {}  # depth -> [offered, accepted], exact totals
        self._cache: dict[str, float] = {}

    @staticmethod
    def coarse(kind: str) -> str:
        """The kind without its finer details: "next:m2:s3:5" -> "next:m2:5", "pld:m2:5" ->
        "pld:5". The first detail stays, so that a failing sub-family (retrievals after a 1-token
        match) does not drag down untried siblings (the same after a long match) below what they
        would need to be proposed at all: a kind that is never proposed never gets corrected."""
        parts = kind.split(":")
        if len(parts) > 3:
            return f"{parts[0]}:{parts[1]}:{parts[-1]}"
        return f"{parts[0]}:{parts[-1]}" if len(parts) > 2 else kind

    def _shrunk(self, kind: str, toward: float) -> float:
        s = self.kinds.get(kind)
        if s is None:
            return toward
        return (s[1] + toward * self.prior_weight) / (s[0] + self.prior_weight)

    def p(self, kind: str) -> float:
        p = self._cache.get(kind)
        if p is None:
            coarse = self.coarse(kind)
            p = self._shrunk(coarse, self.prior)
            if coarse != kind:
                p = self._shrunk(kind, p)
            self._cache[kind] = p
        return p

    def node_probs(self, tree: DraftTree) -> list[float]:
        """Estimated marginal acceptance of each node; never above its parent's. Root = 1."""
        ps = [1.0] * len(tree)
        for i in range(1, len(tree)):
            ps[i] = min(self.p(tree.kinds[i]), ps[tree.parents[i]])
        return ps

    def record(self, tree: DraftTree, accepted: list[int]) -> None:
        hit = set(accepted)
        d = self.decay
        self._cache.clear()
        for i in range(1, len(tree)):
            ok = i in hit
            kind = tree.kinds[i]
            coarse = self.coarse(kind)
            for key in (kind, coarse) if coarse != kind else (kind,):
                s = self.kinds.setdefault(key, [0.0, 0.0])
                s[0] = s[0] * d + 1.0
                s[1] = s[1] * d + ok
            pos = self.by_position.setdefault(tree.depths[i], [0, 0])
            pos[0] += 1
            pos[1] += ok


class CostModel:
    """Seconds per forward: a shape in tokens, calibrated once, plus what the traffic teaches.

    The shape f(N) (N tokens of one sequence's tree) comes from start-up timings. What a
    calibration cannot know is learned per batch size B from the steps themselves:
    cost(N, B) = f(N) + o(B) + s(B) * (N - B).
    o(B), the overhead of B sequences in one forward (attention per sequence, bookkeeping, context
    drift), is fitted on plain steps, one token per sequence. s(B), a surcharge per draft token, is
    fitted on the rest: in a batch, a sequence that verifies a tree instead of one token also pays
    for its mask, a masked attention and the KV compaction, which one sequence's calibration does
    not show (on 2 CPU cores, 4 sequences' draft tokens cost about 1.5x their calibrated price, so
    trees that looked worth it were not). The shape itself is never updated piecemeal, so a size
    observed often can never make its rarely observed neighbours look free.
    """

    def __init__(self, calibration: dict[int, float], max_tokens: int, max_batch: int = 1, alpha: float = 0.1,
                 decay: float = 0.95, margin: float = 0.0):
        if not calibration or 1 not in calibration:
            raise ValueError("calibration needs at least the 1-token forward")
        self.max_tokens = max_tokens
        self.alpha = alpha
        self.decay = decay
        # A draft must promise this much more than plain decoding's tokens per second: gains
        # smaller than the model's own error are coin flips that cost a bigger forward.
        self.margin = margin
        points = sorted(calibration.items())
        shape, best = [0.0], 0.0
        for n in range(1, max_tokens + 1):
            best = max(best, self._interpolate(points, n))  # a bigger forward never costs less
            shape.append(best)
        self._shape = shape
        self._offset = [0.0] * (max_batch + 1)
        self._seen = [False] * (max_batch + 1)
        # surcharge per draft token: decayed sums of excess seconds and of draft tokens
        self._excess = [0.0] * (max_batch + 1)
        self._drafted = [0.0] * (max_batch + 1)

    @staticmethod
    def _interpolate(points: list[tuple[int, float]], n: int) -> float:
        lo = points[0]
        for hi in points:
            if hi[0] >= n:
                if hi[0] == lo[0]:
                    return hi[1]
                w = (n - lo[0]) / (hi[0] - lo[0])
                return lo[1] + w * (hi[1] - lo[1])
            lo = hi
        # Past the last point: extrapolate with the last segment's slope.
        (n1, t1), (n2, t2) = (points[-2] if len(points) > 1 else points[-1]), points[-1]
        slope = (t2 - t1) / (n2 - n1) if n2 != n1 else 0.0
        return t2 + slope * (n - n2)

    def surcharge(self, batch: int = 1) -> float:
        """Seconds per draft token beyond the calibrated shape, learned at this batch size."""
        b = min(max(batch, 1), len(self._offset) - 1)
        return self._excess[b] / self._drafted[b] if self._drafted[b] else 0.0

    def cost(self, n_tokens: int, batch: int = 1) -> float:
        n = min(max(n_tokens, 1), self.max_tokens)
        b = min(max(batch, 1), len(self._offset) - 1)
        seconds = max(self._shape[n] + self._offset[b], 1e-6)
        if n <= b:
            return seconds
        # Draft tokens may turn out cheaper than calibrated, but a tree never costs less than the
        # plain step of its batch.
        plain = self.cost(b, b)
        return max(seconds + self.surcharge(b) * (n - b), plain)

    def break_even(self, batch: int = 1, max_nodes: int = 16) -> float:
        """The least acceptance probability at which draft nodes could pay at this batch size: below
        it, k nodes accepted with that probability each never beat a plain step, whatever k."""
        plain = self.cost(batch, batch) / (1.0 + self.margin)
        return min(batch * (self.cost(batch + k, batch) / plain - 1.0) / k for k in range(1, max_nodes + 1))

    def observe(self, n_tokens: int, seconds: float, batch: int = 1) -> None:
        b = min(max(batch, 1), len(self._offset) - 1)
        n = min(max(n_tokens, 1), self.max_tokens)
        if not self._seen[b]:  # start a new batch size from the nearest one seen
            seen = [i for i, ok in enumerate(self._seen) if ok]
            if seen:
                near = min(seen, key=lambda i: abs(i - b))
                self._offset[b] = self._offset[near]
                self._excess[b], self._drafted[b] = self._excess[near], self._drafted[near]
            self._seen[b] = True
        if n <= b:  # a plain step: one token per sequence
            self._offset[b] += self.alpha * (seconds - self._shape[n] - self._offset[b])
            return
        d = self.decay
        self._excess[b] = self._excess[b] * d + (seconds - self._shape[n] - self._offset[b])
        self._drafted[b] = self._drafted[b] * d + (n - b)

    def choose(self, probs: list[list[float]], limits: list[int]) -> list[int]:
        """How many draft nodes each sequence keeps.

        probs[s]: sequence s's candidate nodes' acceptance estimates, sorted descending (ancestors
        first). limits[s]: the most nodes s may keep (tree capacity, KV room).
        """
        base = len(probs)
        merged = sorted(((p, s) for s, ps in enumerate(probs) for p in ps[:limits[s]]), reverse=True)
        merged = merged[:self.max_tokens - base]
        gain, best_k, best_rate = 0.0, 0, (1.0 + self.margin) * base / self.cost(base, base)
        for k, (p, _) in enumerate(merged, start=1):
            gain += p
            rate = (base + gain) / self.cost(base + k, base)
            if rate > best_rate:
                best_rate, best_k = rate, k
        counts = [0] * base
        for _, s in merged[:best_k]:
            counts[s] += 1
        return counts


def ranked_nodes(tree: DraftTree, probs: list[float]) -> list[int]:
    """Non-root nodes, most likely first; a parent always precedes its children."""
    return sorted(range(1, len(tree)), key=lambda i: (-probs[i], tree.depths[i], i))
