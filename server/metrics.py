"""Prometheus metrics: speculative decoding (vLLM's counter meanings), speedup, and serving.

Counters that the engine already keeps as running totals (drafts, draft and accepted tokens,
acceptance per position, retrieval lookups) are read at scrape time by a collector, so the hot path
pays nothing for them. Per-step and per-request distributions are observed by the scheduler.

Speedup, defined: the time plain decoding would have needed for the tokens emitted (per step,
the engine's measured cost of a one-token-per-sequence forward at that batch size, times tokens
emitted / sequences) divided by the time the decoding steps took. Two counters carry both sums
(`..._baseline_seconds_total`, `..._step_seconds_total`), so the speedup over any window is
`rate(baseline) / rate(step)`; the gauge is that ratio over the last SPEEDUP_WINDOW seconds of
decoding; the histogram has one value per request (its share of each step it was in). Above 1,
speculation pays on this hardware. Prefill is not decoding and counts in neither sum.

Labels are bounded: endpoint, status code, finish reason, position (<= tree depth cap), retrieval
kind; never a request or a session.
"""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "logitspec"
MAX_POSITION = 32  # accepted-per-position label values stop here
SPEEDUP_WINDOW = 60.0  # seconds of decoding steps the speedup gauge covers


class EngineCollector:
    """Engine running totals, read at scrape time."""

    def __init__(self, engine, scheduler, sessions):
        self.engine, self.scheduler, self.sessions = engine, scheduler, sessions

    def collect(self):
        stats = self.engine.stats
        offered = sum(v[0] for v in stats.by_position.values())
        accepted = sum(v[1] for v in stats.by_position.values())
        drafts = CounterMetricFamily(f"{PREFIX}_spec_decode_num_drafts",
                                     "Decoding steps of a sequence that verified at least one draft token.")
        drafts.add_metric([], self.scheduler.drafts)
        yield drafts
        dt = CounterMetricFamily(f"{PREFIX}_spec_decode_num_draft_tokens", "Draft tokens verified.")
        dt.add_metric([], offered)
        yield dt
        at = CounterMetricFamily(f"{PREFIX}_spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        at.add_metric([], accepted)
        yield at
        pos = CounterMetricFamily(f"{PREFIX}_spec_decode_num_accepted_tokens_per_pos",
                                  "Draft tokens accepted, by depth in the draft tree (1 = right after the "
                                  "decided token).", labels=["position"])
        for depth in range(1, MAX_POSITION + 1):
            pos.add_metric([str(depth)], stats.by_position.get(depth, [0, 0])[1])
        yield pos
        look = CounterMetricFamily(f"{PREFIX}_retrieval_lookups", "Suffix-index lookups by drafter branch.",
                                   labels=["kind"])
        hits = CounterMetricFamily(f"{PREFIX}_retrieval_hits", "Suffix-index lookups that found a "
                                   "continuation, by drafter branch (next token, next-next guess by rank "
                                   "bucket, prompt lookup).", labels=["kind"])
        for drafter in self.engine.drafters.values():
            for kind, (n, h) in drafter.lookups.items():
                look.add_metric([kind], n)
                hits.add_metric([kind], h)
        yield look
        yield hits
        cache = self.engine.cache
        free = cache.free_blocks
        for name, help_, value in (
                ("decode_steps", "Batched decoding steps run.", self.engine.times.steps),
                ("decode_attention_calls", "Attention calls in decoding steps, all layers counted (per step: "
                 "layers when the batch shares one call per layer).", self.engine.times.attention_calls),
                ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache (vLLM's "
                 "prefix_cache_queries).", cache.queried_tokens),
                ("prefix_cache_hits", "Prompt tokens whose K/V came from the prefix cache (vLLM's "
                 "prefix_cache_hits).", cache.hit_tokens),
                ("kv_blocks_evicted", "Cached KV blocks evicted to make room.", cache.evicted_blocks)):
            c = CounterMetricFamily(f"{PREFIX}_{name}", help_)
            c.add_metric([], value)
            yield c
        counts = self.scheduler.counts
        for name, help_, value in (
                ("requests_running", "Sequences being decoded.", counts["running"] + counts["prefilling"]),
                ("requests_waiting", "Sequences waiting for a KV slot.", counts["waiting"]),
                ("kv_slots_used", "KV cache slots in use.", counts["kv_slots_used"]),
                ("kv_slots", "KV cache slots in all.", self.engine.cache.num_slots),
                ("kv_blocks_used", "KV cache blocks held by running sequences.", cache.num_blocks - free),
                ("kv_blocks_free", "KV cache blocks a sequence could take (free, or cached and held by "
                 "none).", free),
                ("kv_blocks_cached", "KV cache blocks registered in the prefix cache (held or not).",
                 cache.cached_blocks),
                ("kv_blocks", "KV cache blocks in all.", cache.num_blocks),
                ("kv_block_size", "Tokens per KV cache block.", cache.block_size),
                ("kv_cache_usage_perc", "Share of the KV cache's blocks held by running sequences, 0 to 1 "
                 "(vLLM's kv_cache_usage_perc).", (cache.num_blocks - free) / cache.num_blocks),
                ("sessions", "Session suffix indexes held.", len(self.sessions)),
                ("session_index_bytes", "Memory held by session suffix indexes (estimate).",
                 self.sessions.memory_bytes())):
            g = GaugeMetricFamily(f"{PREFIX}_{name}", help_)
            g.add_metric([], value)
            yield g


class Metrics:
    def __init__(self, engine, scheduler, sessions):
        self.registry = r = CollectorRegistry()
        self.engine_collector = EngineCollector(engine, scheduler, sessions)
        r.register(self.engine_collector)
        latency = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.acceptance_length = Histogram(
            f"{PREFIX}_spec_decode_acceptance_length", "Tokens emitted per sequence per decoding step "
            "(accepted draft tokens plus the decided token).", buckets=(1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64),
            registry=r)
        self.tree_size = Histogram(f"{PREFIX}_spec_decode_tree_size", "Draft tree size chosen per sequence per "
                                   "step (nodes including the decided token).",
                                   buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), registry=r)
        self.speedup = Gauge(f"{PREFIX}_spec_decode_speedup", "Speedup over plain decoding on this hardware and "
                             "batch size: the time plain decoding would need for the tokens emitted, over the time "
                             "taken (decoding steps of the last 60 s).", registry=r)
        self.baseline_seconds = Counter(f"{PREFIX}_spec_decode_baseline_seconds", "Time plain decoding would have "
                                        "needed for the tokens emitted (the engine's measured one-token-per-sequence "
                                        "step cost at the batch size).", registry=r)
        self.step_seconds = Counter(f"{PREFIX}_spec_decode_step_seconds", "Time the decoding steps took.",
                                    registry=r)
        self.request_speedup = Histogram(f"{PREFIX}_spec_decode_request_speedup", "Speedup over plain decoding, "
                                         "one value per finished request.",
                                         buckets=(0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 3, 4, 6, 10), registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=latency, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between tokens of a sequence "
                             "(a step's time divided by the tokens it emitted).",
                             buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2),
                             registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=latency, registry=r)
        self.queue_time = Histogram(f"{PREFIX}_request_queue_time_seconds", "Time waiting for a KV slot.",
                                    buckets=latency, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter(f"{PREFIX}_request_finished", "Finished sequences by finish reason.",
                                ["finish_reason"], registry=r)
        self._window: deque[tuple[float, float, float]] = deque()  # (step end, baseline s, step s)
        self._num = self._den = 0.0

    def observe_step(self, record, now: float) -> None:
        """One engine step (engine thread) that ended at `now` (time.monotonic())."""
        for size, emitted in zip(record.tree_sizes, record.emitted):
            self.tree_size.observe(size)
            if emitted:
                self.acceptance_length.observe(emitted)
        self.generation_tokens.inc(sum(record.emitted))
        if record.ar_seconds is not None and record.seconds > 0:
            ar_time = record.ar_seconds * sum(record.emitted) / record.batch
            self.baseline_seconds.inc(ar_time)
            self.step_seconds.inc(record.seconds)
            self._window.append((now, ar_time, record.seconds))
            self._num += ar_time
            self._den += record.seconds
            while self._window[0][0] < now - SPEEDUP_WINDOW:
                _, a, b = self._window.popleft()
                self._num -= a
                self._den -= b
            if self._den > 0:
                self.speedup.set(self._num / self._den)
