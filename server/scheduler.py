"""Continuous batching on an engine thread, with asyncio hand-off to the HTTP handlers.

Each loop: admit waiting requests while KV slots are free, run one prefill chunk (so a long
prompt never stalls running streams for more than a chunk), then one batched decoding step over
every running sequence. Tokens go to each request's asyncio queue through the event loop's
thread-safe callback; a cancelled request (client gone, deadline passed) leaves the batch and
frees its slot before the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from decoding.engine import Engine, Sequence
from decoding.kv_cache import KVCacheFull
from decoding.verify import SamplingParams
from retrieval.suffix_index import SuffixIndex
from server.detokenizer import IncrementalDetokenizer

log = logging.getLogger("logitspec.scheduler")


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class Delta:
    text: str
    tokens: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]]]


@dataclass
class Finished:
    reason: str  # "stop" | "length"
    completion_tokens: int
    steps: int


@dataclass
class Failed:
    message: str
    status: int = 500


@dataclass
class GenRequest:
    """One sequence to generate (a request with n choices is n of these)."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    method: str | None = None
    index: SuffixIndex | None = None
    deadline: float | None = None  # time.monotonic() limit
    cache_namespace: str = ""  # prefix-cache blocks are shared only within one (one per API key)
    grammar: str | None = None  # an llguidance grammar the output must follow (server/structured.py)
    # set by the scheduler
    id: int = 0
    queue: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False
    seq: Sequence | None = None
    detok: IncrementalDetokenizer | None = None
    enqueued_at: float = 0.0
    first_token_at: float | None = None
    ar_time: float = 0.0  # this request's share of plain-decoding time for what it emitted
    spent_time: float = 0.0  # its share of the steps' actual time

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 64):
        self.engine = engine
        self.max_queue = max_queue
        self._waiting: deque[GenRequest] = deque()
        self._prefilling: list[GenRequest] = []
        self._running: list[GenRequest] = []
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="logitspec-engine", daemon=True)
        self.steps = 0
        self.drafts = 0  # sequence-steps that verified at least one draft token
        self.metrics = None  # server.metrics.Metrics, set by the app

    # ---- called from the event loop ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread.is_alive():  # idempotent: draining stops it before the app's shutdown does
            self._thread.join(timeout)

    def submit(self, req: GenRequest) -> GenRequest:
        req.loop = asyncio.get_running_loop()
        req.queue = asyncio.Queue()
        req.id = next(self._ids)
        req.enqueued_at = time.monotonic()
        with self._cv:
            if self._stop:
                self._detach(req)
                raise ShuttingDown()
            if len(self._waiting) >= self.max_queue:
                self._detach(req)  # the refusal's traceback may outlive the request
                raise QueueFull()
            self._waiting.append(req)
            self._cv.notify()
        return req

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._prefilling or self._running)

    @property
    def counts(self) -> dict[str, int]:
        return {"waiting": len(self._waiting), "prefilling": len(self._prefilling),
                "running": len(self._running), "kv_slots_used": self.engine.cache.used_slots}

    # ---- engine thread -------------------------------------------------------------------------------------

    def _publish(self, req: GenRequest, event) -> None:
        if req.loop is not None and not req.loop.is_closed():
            req.loop.call_soon_threadsafe(req.queue.put_nowait, event)

    def _release(self, req: GenRequest, scrub: bool | None = None) -> None:
        if req.seq is not None:
            self.engine.stop_sequence(req.seq, scrub)
        self._detach(req)

    @staticmethod
    def _detach(req: GenRequest) -> None:
        """A request that is over holds no sequence and no index: the app may keep the GenRequest
        a while (a stream's frames, an exception's traceback, a reference cycle awaiting the
        collector), and a request-scoped index can be megabytes, so it goes when the request does."""
        req.seq = None
        req.index = None

    def _finish(self, req: GenRequest, reason: str) -> None:
        delta = req.detok.flush() if req.detok and not req.detok.stopped else ""
        if delta:
            self._publish(req, Delta(delta, [], []))
        seq = req.seq
        if self.metrics is not None:
            self.metrics.finished.labels(reason).inc()
            self.metrics.e2e.observe(time.monotonic() - req.enqueued_at)
            if req.spent_time > 0 and req.ar_time > 0:
                self.metrics.request_speedup.observe(req.ar_time / req.spent_time)
        self._publish(req, Finished(reason, len(seq.output) if seq else 0, seq.steps if seq else 0))
        self._release(req)

    def _fail(self, req: GenRequest, message: str, status: int = 500) -> None:
        self._publish(req, Failed(message, status))
        self._release(req)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for group in (self._prefilling, self._running):
            for req in list(group):
                if req.deadline is not None and now > req.deadline and not req.cancelled:
                    req.cancelled = True
                    self._publish(req, Failed("the request's deadline passed", 504))
                if req.cancelled:
                    group.remove(req)
                    # A running sequence's K/V passed its steps' checks: its cached blocks stay.
                    self._release(req, scrub=False if group is self._running else None)
        for req in list(self._waiting):
            if req.cancelled:
                self._waiting.remove(req)
                self._detach(req)

    def _admit(self) -> None:
        engine = self.engine
        while self._waiting and engine.admissible(len(self._waiting[0].prompt),
                                                  len(self._running) + len(self._prefilling)):
            req = self._waiting.popleft()
            try:
                constraint = engine.grammars.constraint(req.grammar) if req.grammar is not None else None
                req.seq = engine.new_sequence(req.prompt, req.params, req.max_tokens, req.index,
                                              req.logprobs, req.method, constraint, req.cache_namespace)
            except ValueError as e:
                self._fail(req, str(e), 400)
                continue
            except Exception as e:  # this request alone fails; the loop must survive it
                log.exception("could not start request %d", req.id)
                self._fail(req, f"generation failed: {type(e).__name__}")
                continue
            req.detok = IncrementalDetokenizer(engine.tokenizer, req.stop)
            self._prefilling.append(req)
            if self.metrics is not None:
                self.metrics.queue_time.observe(time.monotonic() - req.enqueued_at)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not (self._waiting or self._prefilling or self._running):
                    self._cv.wait()
                if self._stop:
                    break
                self._drop_cancelled()
                self._admit()
            try:
                self._iterate()
            except Exception as e:  # last resort: the engine isolates a sequence's faults itself
                log.exception("engine step failed")
                for req in self._prefilling + self._running:
                    self._fail(req, f"internal error: {type(e).__name__}")
                self._prefilling.clear()
                self._running.clear()
        for req in list(self._waiting) + self._prefilling + self._running:
            self._fail(req, "the server is shutting down", 503)
        try:  # on this thread: no step is changing them while they are written
            self.engine.save_statistics()
        except Exception:
            log.exception("saving the acceptance statistics failed")

    def _iterate(self) -> None:
        if self._prefilling:
            req = self._prefilling[0]
            try:
                ready = self.engine.prefill(req.seq, max_chunks=1)
            except KVCacheFull:  # running sequences took the blocks this prompt needed
                log.warning("KV cache full during the prefill of request %d", req.id)
                self._prefilling.pop(0)
                self._fail(req, "the KV cache is full; retry shortly", 503)
                ready = False
            except Exception as e:  # this prompt alone fails
                log.exception("prefill failed for request %d", req.id)
                self._prefilling.pop(0)
                self._fail(req, f"generation failed: {type(e).__name__}")
                ready = False
            if ready:
                self._prefilling.pop(0)
                if self.metrics is not None:
                    self.metrics.prompt_tokens.inc(len(req.seq.prompt))
                if req.seq.finished:
                    self._finish(req, req.seq.finish_reason)
                else:
                    self._running.append(req)
        running = [r for r in self._running if not r.cancelled]
        if not running:
            return
        result = self.engine.step([r.seq for r in running])
        emitted, record = result.emitted, result.record
        self.steps += 1
        self.drafts += sum(size > 1 for size in record.tree_sizes)
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.observe_step(record, now)
        for req, tokens in zip(running, emitted):
            seq = req.seq
            if seq.error is not None:  # this sequence alone failed; the batch went on
                self._running.remove(req)
                self._fail(req, f"generation failed: {seq.error}")
                continue
            if tokens:
                if req.first_token_at is None:
                    req.first_token_at = now
                    if self.metrics is not None:
                        self.metrics.ttft.observe(now - req.enqueued_at)
                elif self.metrics is not None:
                    self.metrics.itl.observe(record.seconds / len(tokens))
                req.spent_time += record.seconds / record.batch
                if record.ar_seconds is not None:
                    req.ar_time += record.ar_seconds * len(tokens) / record.batch
            text = req.detok.push(tokens) if tokens else ""
            if text or tokens:
                lps = seq.token_logprobs[len(seq.output) - len(tokens):] if seq.logprobs is not None else []
                self._publish(req, Delta(text, tokens, lps))
            if req.detok.stopped:
                seq.finish_reason = "stop"
            if seq.finished:
                self._running.remove(req)
                self._finish(req, seq.finish_reason)
