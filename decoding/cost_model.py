"""Cost-aware tree sizing: keep the draft nodes that raise expected accepted tokens per second.

Two measurements drive it, both plain Python: how long a forward of N tokens takes on this
hardware (calibrated at start-up, then updated from every step), and how often a draft node of
each kind (drafter branch, retrieval match length, depth) ends up accepted. Each step, the nodes of
all sequences in the batch compete in one ranking; the cut that maximises
(sequences + expected accepted nodes) / cost(tokens in the forward) wins, down to no draft at all.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from decoding.tree import DraftTree, NodeKind


class AcceptanceStats:
    """Decayed accept/offer counts per node kind, shrunk towards coarser kinds while data is thin.

    A kind (decoding.tree.NodeKind) is a branch, details and a depth (e.g. next m2 s3 at depth 3).
    Its estimate is pulled towards its coarse kind (NodeKind.coarse), whose estimate is pulled
    towards `prior`, so a rare kind starts from what its family has shown instead of from an
    arbitrary constant.
    """

    def __init__(self, prior: float = 0.2, prior_weight: float = 4.0, decay: float = 0.998):
        self.prior = prior
        self.prior_weight = prior_weight
        self.decay = decay
        self.kinds: dict[NodeKind, list[float]] = {}  # kind (fine or coarse) -> [offered, accepted], decayed
        self.by_position: dict[int, list[int]] = {}  # depth -> [offered, accepted], exact totals
        self._cache: dict[NodeKind, float] = {}

    def state(self) -> dict:
        """What the estimates are made of, as JSON-able data: every kind's decayed counts (the
        exact per-depth totals behind the metrics belong to this process and stay out)."""
        return {"kinds": [[k.family, list(k.details), k.depth, k.hot, offered, accepted]
                          for k, (offered, accepted) in list(self.kinds.items())]}

    def restore(self, state: dict) -> int:
        """Take the counts of `state` (from `state()`, perhaps of an earlier process) in place of
        this one's; returns how many kinds. Raises ValueError, keeping this one's counts, when an
        entry is not a kind with counts that decayed counting could have made."""
        most = 1.0 / (1.0 - self.decay) + 1e-6  # decayed counts of 1 per offer stay below this
        kinds: dict[NodeKind, list[float]] = {}
        try:
            for family, details, depth, hot, offered, accepted in state["kinds"]:
                if not isinstance(hot, bool):
                    raise ValueError(f"hot is {hot!r}")
                kind = NodeKind(str(family), tuple(str(d) for d in details), int(depth), hot)
                offered, accepted = float(offered), float(accepted)
                if kind.depth < 1:
                    raise ValueError(f"depth {kind.depth} for {kind.family}: draft nodes are at depth 1 or more")
                if not 0.0 <= accepted <= offered <= most:
                    raise ValueError(f"counts {offered}, {accepted} for {kind}")
                kinds[kind] = [offered, accepted]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not acceptance statistics: {e}") from None
        self.kinds = kinds
        self._cache.clear()
        return len(kinds)

    def _shrunk(self, kind: NodeKind, toward: float) -> float:
        s = self.kinds.get(kind)
        if s is None:
            return toward
        return (s[1] + toward * self.prior_weight) / (s[0] + self.prior_weight)

    def p(self, kind: NodeKind) -> float:
        p = self._cache.get(kind)
        if p is None:
            coarse = kind.coarse()
            p = self._shrunk(coarse, self.prior)
            if coarse != kind:
                p = self._shrunk(kind, p)
            self._cache[kind] = p
        return p

    def paying(self, openings: Sequence[NodeKind], floor: float, hot: bool) -> set[str]:
        """The families among a proposal's likeliest first nodes (Drafter.openings) whose estimate
        clears `floor` (CostModel.break_even), judged hot or cold as the sequence is."""
        return {k.family for k in openings if self.p(k.heated() if hot else k) > floor}

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
            coarse = kind.coarse()
            for key in (kind, coarse) if coarse != kind else (kind,):
                s = self.kinds.setdefault(key, [0.0, 0.0])
                s[0] = s[0] * d + 1.0
                s[1] = s[1] * d + ok
            pos = self.by_position.setdefault(tree.depths[i], [0, 0])
            pos[0] += 1
            pos[1] += ok


class CostModel:
    """Seconds per forward, learned from the steps themselves; the start-up calibration is a prior.

    cost(N, B) prices a forward of N tokens for B sequences, k = N - B of them draft tokens, as

        cost(N, B) = plain(B) x (1 + extra(k, B))

    plain(B), what a step of one token per sequence costs, is learned from plain steps (probes and
    steps that drafted nothing): the first measured replaces the calibration, later ones enter an
    exponentially weighted average of log seconds (weight `alpha` on the newest). extra(k, B), what
    k draft tokens add as a share of a plain step, is learned in two layers from drafting steps:

    - slope(B) x x(N, B), where x is the draft tokens' calibrated share (f(N) - f(B)) / f(B) of
      the start-up shape f and slope(B) a decayed least-squares fit (`decay` per step; a prior of
      1 that never decays, see SLOPE_PRIOR_X). It carries what one tree size teaches to all the
      others: a calibration whose shape is off by a factor is set right for sizes not yet tried.
    - a correction at anchor sizes k = 1, 2, ..., 6, 8, 10, ... (ANCHORS), interpolated linearly:
      the decayed mean of what steps near the anchor measured beyond slope x x (see
      ANCHOR_PRIOR_WEIGHT). It learns what no single factor can: a calibration timed on a busy
      machine is noise, flat or even falling where the true curve rises, and there x = 0 for small
      trees, so that the slope cannot see them (a loaded start priced 3-token trees as free and,
      with a slope fitted on the few larger ones, every larger tree at 3x its cost).

    A batch size not measured yet borrows the nearest measured one's plain ratio and slope (not
    its corrections, which are in its own units). A bigger forward never costs less than a
    smaller one.

    Sizes the model prices too dear would never be chosen, so never measured: every
    STRETCH_EVERY-th step the engine drafts half as many nodes again as chosen, at least one more
    (`stretched`; one node where none pays; Engine._schedule), and what it measures there moves
    the slope and the anchors near that size.

    Bound: after the first plain step at B (the engine makes a batch size's first step a plain
    one, see Engine.step), the cost of a tree size in use is within 10% of the truth after 8
    drafting steps at it, noise aside (an anchor's data then weigh 3.6, decay 0.75, against the
    prior's 0.5), and a single outlying step moves it by at most OUTLIER_REACH of a plain step.
    A calibration 4x off in scale or by a factor in shape is set right everywhere by the slope:
    the fake-clock tests show the choices right from the 12th step. One whose
    shape is noise (timed on a busy machine) is set right where trees are, and by the third
    stretch probe (the 48th step) the choices deliver within 3% of the best tokens per second.
    plain(B) follows a change of the machine's speed within 8 plain steps (0.7^8 x ln 4 < ln 1.1),
    and the engine makes 8 of its first 32 steps at a batch size plain, then one in PROBE_EVERY.

    What the forward costs is only half of whether drafting pays: the realised loop (`settle`)
    compares whole steps, drafting included, as they ran. Per batch size and per band of draft
    sizes (BACKOFF_BANDS) it keeps the tokens per second of recent drafting steps against the
    plain steps', and where drafting delivered less, it raises that band's back-off margin: a
    draft of that size must then promise that much more than plain decoding to be chosen. The
    back-off falls again where drafting delivers more, and decays on every step that does not
    draft in its band, so drafting there is tried again after a while. Bands, because what a
    loss says depends on the size that lost: a cold start prices unseen node kinds at the prior
    and drafts a large tree or two that do not pay; that must not keep out the small trees that
    cost next to nothing (one 64-node loss had held a whole short answer to plain decoding).
    """

    def __init__(self, calibration: dict[int, float], max_tokens: int, max_batch: int = 1, alpha: float = 0.3,
                 decay: float = 0.75, margin: float = 0.0):
        if not calibration or 1 not in calibration:
            raise ValueError("calibration needs at least the 1-token forward")
        self.max_tokens = max_tokens
        self.max_batch = max(1, max_batch)
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
        size = self.max_batch + 1
        self._log_plain: list[float | None] = [None] * size  # learned log plain(B), None = not measured
        self._plain_seen = [0] * size
        self._sxy: list[float | None] = [None] * size  # slope fit: decayed sums of x * y, x * x
        self._sxx = [0.0] * size
        self._prior_slope = [1.0] * size
        self._draft_seen = [0] * size
        # anchor corrections, per batch size: decayed sums of weight, weight x measured extra and
        # weight x calibrated share, for each anchor (see ANCHORS)
        self._anchors = [a for a in ANCHORS if a < max_tokens] + [max_tokens]
        self._anchor_sums: list[list[list[float]] | None] = [None] * size
        # B -> (cost(B + k, B) for k = 0.. so far asked, running max; slope(B); corrections at B)
        self._costs: dict[int, tuple[list[float], float, list[float]]] = {}
        # the realised loop (settle): per batch size
        self._plain_step = [0.0] * size  # seconds of a whole plain step (EWMA), 0 = none
        bands = len(BACKOFF_BANDS) + 1
        self._draft_tokens = [[0.0] * bands for _ in range(size)]  # per band: decayed sums over
        self._draft_seconds = [[0.0] * bands for _ in range(size)]  # recent drafting steps
        self._backoff = [[0.0] * bands for _ in range(size)]

    def _base(self, b: int) -> float:
        return self._shape[min(b, self.max_tokens)]

    def _x(self, n: int, b: int) -> float:
        """Draft tokens' calibrated share of a plain step."""
        return (self._shape[min(n, self.max_tokens)] - self._base(b)) / self._base(b)

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

    def _batch(self, batch: int) -> int:
        return min(max(batch, 1), self.max_batch)

    def _nearest(self, b: int, learned: list) -> int | None:
        seen = [i for i in range(1, self.max_batch + 1) if learned[i] is not None]
        return min(seen, key=lambda i: (abs(i - b), i)) if seen else None

    def plain(self, batch: int = 1) -> float:
        """Seconds of a plain step (one token per sequence) at this batch size."""
        b = self._batch(batch)
        near = self._nearest(b, self._log_plain)
        if near is None:
            return self._base(b)
        # borrowed: the nearest batch size's measured/calibrated ratio
        return math.exp(self._log_plain[near]) * self._base(b) / self._base(near)

    def slope(self, batch: int = 1) -> float:
        """Draft tokens' cost against their calibrated share of a plain step, at this batch size."""
        near = self._nearest(self._batch(batch), self._sxy)
        if near is None:
            return 1.0
        w = SLOPE_PRIOR_X ** 2
        return max((w * self._prior_slope[near] + self._sxy[near]) / (w + self._sxx[near]), 0.0)

    def measured(self, n_tokens: int, batch: int = 1) -> int:
        """How many plain steps (n_tokens == batch) or drafting steps were measured at this batch size."""
        b = self._batch(batch)
        return self._plain_seen[b] if n_tokens <= b else self._draft_seen[b]

    def _bracket(self, k: int) -> tuple[int, float]:
        """The anchor at or below k draft tokens (its index) and k's weight on the next one."""
        anchors = self._anchors
        if k <= anchors[0]:
            return 0, 0.0
        i = bisect.bisect_right(anchors, k) - 1
        if i >= len(anchors) - 1:
            return len(anchors) - 1, 0.0
        lo, hi = anchors[i], anchors[i + 1]
        return i, (k - lo) / (hi - lo)

    def _corrections(self, b: int, slope: float) -> list[float]:
        """Each anchor's learned extra beyond slope x x, shrunk towards 0 (the prior)."""
        sums = self._anchor_sums[b]
        if sums is None:
            return [0.0] * len(self._anchors)
        return [(wy - slope * wx) / (ANCHOR_PRIOR_WEIGHT + w) for w, wy, wx in sums]

    def _table(self, b: int, n: int) -> list[float]:
        """cost(m, b) for m = b..n at least (entry m - b), running max; extended only as far as
        asked, since most steps price small trees only."""
        table = self._costs.get(b)
        if table is None:
            slope = self.slope(b)
            table = self._costs[b] = ([self.plain(b)], slope, self._corrections(b, slope))
        costs, slope, corrections = table
        if len(costs) <= n - b:
            plain = costs[0]
            for m in range(b + len(costs), n + 1):
                i, w = self._bracket(m - b)
                correction = corrections[i] if w == 0.0 else (1 - w) * corrections[i] + w * corrections[i + 1]
                costs.append(max(plain * (1 + slope * self._x(m, b) + correction), costs[-1]))
        return costs

    def cost(self, n_tokens: int, batch: int = 1) -> float:
        b = self._batch(batch)
        n = min(max(n_tokens, b), self.max_tokens)
        return self._table(b, n)[n - b]

    def observe(self, n_tokens: int, seconds: float, batch: int = 1) -> None:
        """One forward's seconds (the forward alone)."""
        b = self._batch(batch)
        n = min(max(n_tokens, 1), self.max_tokens)
        if seconds <= 0:
            return
        if n <= b:
            y = math.log(seconds)
            prior = self._log_plain[b]
            if prior is None:
                # the first at this size: starts from the value borrowed from another size, or
                # (nothing measured yet) replaces the calibration
                prior = math.log(self.plain(b)) if self._nearest(b, self._log_plain) is not None else y
            self._log_plain[b] = prior + self.alpha * (y - prior)
            self._plain_seen[b] += 1
            self._costs.clear()  # every size's price follows plain(B), and other sizes borrow it
            return
        if self._log_plain[b] is None:
            return  # no plain step measured at this size yet: nothing to measure drafts against
        x, y = self._x(n, b), seconds / self.plain(b) - 1.0
        # One step moves the estimate only so far (see OUTLIER_REACH): the first forward of a new
        # shape pays one-off costs, and a size priced too dear by one such step is not chosen again.
        expected = self.cost(n, b) / self.plain(b) - 1.0
        reach = max(OUTLIER_REACH, 2 * abs(expected))
        y = min(max(y, expected - reach), expected + reach)
        if self._sxy[b] is None:  # the prior: the slope borrowed (or 1)
            self._prior_slope[b] = self.slope(b)
            self._sxy[b] = self._sxx[b] = 0.0
        d = self.decay
        if x >= SLOPE_PRIOR_X:  # see SLOPE_PRIOR_X: small x measure noise, the anchors take them
            self._sxy[b] = self._sxy[b] * d + x * y
            self._sxx[b] = self._sxx[b] * d + x * x
        if self._anchor_sums[b] is None:
            self._anchor_sums[b] = [[0.0, 0.0, 0.0] for _ in self._anchors]
        i, w = self._bracket(n - b)
        for j, weight in ((i, 1.0 - w), (i + 1, w)):
            if weight > 0:  # a step ages an anchor's data as far as it weighs there
                sums, aged = self._anchor_sums[b][j], d ** weight
                sums[0] = sums[0] * aged + weight
                sums[1] = sums[1] * aged + weight * y
                sums[2] = sums[2] * aged + weight * x
        self._costs.clear()  # priced before this step's data: price again
        self._draft_seen[b] += 1

    def settle(self, batch: int, tokens: int, seconds: float, draft_tokens: int) -> None:
        """A whole step as it ran (drafting, forward, verification): tokens emitted over seconds,
        after a forward of batch + draft_tokens tokens (0: a plain step)."""
        b = self._batch(batch)
        if seconds <= 0:
            return
        band = _band(draft_tokens) if draft_tokens > 0 else -1  # -1: a plain step
        if band < 0:
            p = self._plain_step[b]
            self._plain_step[b] = seconds if not p else p + 0.2 * (seconds - p)
        # every step ages every band's drafting record, so that rare drafting steps are judged by
        # themselves, not by drafting steps from a busier time
        tokens_rec, seconds_rec, backoff = self._draft_tokens[b], self._draft_seconds[b], self._backoff[b]
        for j in range(len(backoff)):
            tokens_rec[j] *= DRAFT_DECAY
            seconds_rec[j] *= DRAFT_DECAY
            if j != band:
                backoff[j] *= BACKOFF_RELAX
        if band < 0:
            return
        tokens_rec[band] += tokens
        seconds_rec[band] += seconds
        plain = self._plain_step[b] or self.cost(b, b)
        shortfall = (b / plain) / (tokens_rec[band] / seconds_rec[band]) - 1.0
        backoff[band] = min(max(backoff[band] + BACKOFF_GAIN * shortfall, 0.0), MAX_BACKOFF)

    def backoff(self, batch: int = 1, draft_tokens: int = 1) -> float:
        """The realised loop's extra margin at this batch size for drafts of this many tokens
        (0: drafting of that size delivers)."""
        return self._backoff[self._batch(batch)][_band(draft_tokens)]

    def _hurdles(self, batch: int) -> list[float]:
        """Per band: how much more than plain decoding a draft must promise."""
        return [1.0 + self.margin + x for x in self._backoff[self._batch(batch)]]

    def break_even(self, batch: int = 1, max_nodes: int = 16) -> float:
        """The least acceptance probability at which draft nodes could pay at this batch size: below
        it, k nodes accepted with that probability each never beat a plain step, whatever k."""
        plain, hurdles = self.cost(batch, batch), self._hurdles(batch)
        return min(batch * (self.cost(batch + k, batch) * hurdles[_band(k)] / plain - 1.0) / k
                   for k in range(1, max_nodes + 1))

    def choose(self, probs: list[list[float]], limits: list[int], stretch: bool = False) -> list[int]:
        """How many draft nodes each sequence keeps.

        probs[s]: sequence s's candidate nodes' acceptance estimates, sorted descending (ancestors
        first). limits[s]: the most nodes s may keep (tree capacity, KV room). stretch: keep
        `stretched(k)` nodes where k pay (a stretch probe: the forward's cost at a size the model
        would not choose, so that an overpriced size is found out; see Engine._schedule).
        """
        base = len(probs)
        merged = sorted(((p, s) for s, ps in enumerate(probs) for p in ps[:limits[s]]), reverse=True)
        merged = merged[:self.max_tokens - base]
        # cost(base + k, base) for every k at once (base + len(merged) <= max_tokens)
        b = self._batch(base)
        costs = self._table(b, base + len(merged))
        hurdles = self._hurdles(base)
        # a draft's promised tokens per second, over its band's hurdle, against plain decoding's
        gain, best_k, best_rate = 0.0, 0, base / self.cost(base, base)
        for k, (p, _) in enumerate(merged, start=1):
            gain += p
            rate = (base + gain) / costs[base + k - b] / hurdles[_band(k)]
            if rate > best_rate:
                best_rate, best_k = rate, k
        if stretch:
            best_k = min(stretched(best_k), len(merged))
        counts = [0] * base
        for _, s in merged[:best_k]:
            counts[s] += 1
        return counts


# The slope's prior weighs as one drafting step whose calibrated extra cost is a tenth of a plain
# step, and never decays; steps whose draft tokens are calibrated at less than that do not enter
# the slope at all (the anchors learn them). The slope is a ratio of two small numbers for small
# trees: a few draft tokens in a flat stretch of the calibration cost about nothing, and
# step-to-step noise of a few percent then read as a slope of 5 or 10, which priced every larger
# tree out. Trees whose draft tokens cost a third of a plain step or more outweigh the prior
# within a step or two.
SLOPE_PRIOR_X = 0.1

# A drafting step's measured extra is clipped to within this share of a plain step of the current
# estimate (or within the estimate itself, where that is larger): an outlier (a new shape's first
# forward, a page fault, a busy moment) moves a size's price by a fraction of a plain step at most,
# while an estimate off by a factor (a calibration 4x off) still moves by up to that factor per step.
OUTLIER_REACH = 0.1

# Draft-token counts at which CostModel learns its corrections to slope x x (plus max_tokens):
# dense where trees usually are, where a busy calibration's noise matters most.
ANCHORS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128, 192, 256)
# An anchor's correction starts at 0 and weighs this against its data (decayed sums of weights,
# where a step exactly at the anchor weighs 1 and one between two anchors splits 1 between them).
ANCHOR_PRIOR_WEIGHT = 0.5

# The realised loop (CostModel.settle): drafting steps' tokens per second are a decayed average
# over the drafting steps among about the last 1 / (1 - DRAFT_DECAY) steps; each drafting step moves the back-off
# by BACKOFF_GAIN x the shortfall against plain steps (a 2x shortfall adds 0.5 at once), and each
# plain step keeps BACKOFF_RELAX of it (half-life ~23 plain steps).
DRAFT_DECAY = 0.9
BACKOFF_GAIN = 0.5
BACKOFF_RELAX = 0.97
MAX_BACKOFF = 2.0
# ... kept apart for drafts of up to 4, 16 and 64 tokens in the forward, and more.
BACKOFF_BANDS = (4, 16, 64)


def stretched(k: int) -> int:
    """Draft nodes on a stretch probe where the cost model chose k: half as many again, at least
    one more. Twice plus one (as before) spent more than a probe needs on large trees: in a
    math_reasoning run a 16-node tree took about 2 plain steps' time, a 33-node one about 3.
    Replayed on the 63 recorded Spec-Bench turns (bench/draft_replay.py), half again raised
    modelled tokens per second for both methods under both kernel-era calibrations: LogitSpec
    +1.2% and +0.8%, PLD +0.3% and +1.7% (docs/bench_cpu_d3ea729.txt's and
    docs/bench_cpu_e200e3a.txt's). The fake-clock tests still converge by the third probe; one
    more node (k + 1) reaches too little: a calibration too steep at large sizes then stays
    unlearned there."""
    return k + max(1, (k + 1) // 2)


def _band(draft_tokens: int) -> int:
    return bisect.bisect_left(BACKOFF_BANDS, draft_tokens)


def ranked_nodes(tree: DraftTree, probs: list[float]) -> list[int]:
    """Non-root nodes, most likely first; a parent always precedes its children."""
    return sorted(range(1, len(tree)), key=lambda i: (-probs[i], tree.depths[i], i))
