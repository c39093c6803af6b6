"""The decoding engine: prefill, then draft -> one batched forward -> verify, step after step.

    trees = draft(seqs); logits = model.forward(trees); for each seq: verify, keep KV, emit.

The engine owns the model, the KV cache, one drafter (chosen once), the acceptance statistics and
the cost model. It is synchronous and single-threaded; the server runs it on its own thread.

Faults stay with the sequence that has them: a drafter or verifier exception, or non-finite logits
on the path a sequence would accept, fail that sequence alone (`seq.error`); a batched forward
that raises is retried one sequence at a time to find the culprit; an out-of-memory forward halves
the batch per forward (then the tree) and retries instead of failing anyone.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from decoding import calibration_cache, cpu_linear, statistics_cache
from decoding.corpus import corpus_path, load_corpus
from decoding.config import METHODS, EngineConfig, parse_size
from decoding.cost_model import AcceptanceStats, CostModel, ranked_nodes
from decoding.drafters import Drafter, Echo, make_drafter, top_wanted
from decoding.kv_cache import KVCacheFull, bytes_per_token
from decoding.grammar import Constraint, Grammars
from decoding.loader import LoadedModel, load, log
from decoding.families import build_model
from decoding.gguf_blocks import adopt_blocks
from decoding.model import Model, Runner, SeqBatchEntry
from decoding.tree import DraftTree, NodeKind
from decoding.verify import (SamplingParams, coupled_sample, make_generator, processed_probs, sample, verify_coupled,
                             verify_greedy, verify_sampling)
from retrieval.suffix_index import SuffixIndex

CALIBRATION_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Every PROBE_EVERY-th step drafts nothing: a plain step, timed as it runs among real traffic,
# keeps the engine's figure for plain decoding honest (see Engine.plain_ratio).
PROBE_EVERY = 32
PROBE_EARLY = 4


def is_probe(step: int, plain_measured: int) -> bool:
    """Whether step number `step` is a probe: a plain step (nothing drafted) timed among real
    traffic, for the cost model (see CostModel: its bound counts on these). A batch size's first
    step, then every PROBE_EARLY-th while it has fewer than 8 plain steps measured, then every
    PROBE_EVERY-th."""
    return (plain_measured == 0 or step % PROBE_EVERY == 0
            or (plain_measured < 8 and step % PROBE_EARLY == 0))


# Every STRETCH_EVERY-th step, at STRETCH_AT, drafts half as many nodes again as the cost model
# chooses, at least one more (cost_model.stretched; one node where it chooses none): a stretch
# probe, so that a tree size priced too dear (a calibration timed on a busy machine, an outlying
# step) is measured and found out.
STRETCH_EVERY = 16
STRETCH_AT = 9


def is_stretch(step: int) -> bool:
    return step % STRETCH_EVERY == STRETCH_AT

logger = logging.getLogger("logitspec.engine")


class NonFiniteLogits(RuntimeError):
    pass


@dataclass
class Sequence:
    """One generation: its prompt, its slot in the KV cache, its suffix index and its output."""

    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_ids: frozenset[int]
    index: SuffixIndex
    drafter: Drafter | None = None
    generator: torch.Generator | None = None  # specinfer sampler
    seed: int = 0  # coupled sampler: noise for position i comes from (seed, i)
    slot: int = -1
    past_len: int = 0  # tokens whose K/V are in the slot
    root: int = -1  # the decided next token, not yet in the cache
    cache_namespace: str = ""  # prefix-cache blocks are shared within one namespace only
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    # The last logit's top tokens (Engine._top): found at once where the CPU kernel's scan reads the
    # row (root_top), else a copy of the row kept until they are wanted (root_logits).
    root_top: list[int] | None = None
    root_logits: torch.Tensor | None = None  # [vocab]
    echoes: list[Echo] = field(default_factory=list)  # LogitSpec's echoes for the root (Engine._keep_echoes)
    # Grammar the output must follow (decoding/grammar.py): consulted when drafting (pruning), when
    # verifying (masked rows) and when deciding the root; None = unconstrained.
    constraint: Constraint | None = None
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None  # why this sequence failed (finish_reason "error")
    steps: int = 0
    last_accepted: int = 0
    step_sizes: list[int] = field(default_factory=list)  # tokens emitted per step
    logprobs: int | None = None  # when set: record each output token's logprob and this many alternatives
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    _root_logprob: tuple[float, list[tuple[int, float]]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def mean_accepted(self) -> float:
        return len(self.output) / self.steps if self.steps else 0.0


@dataclass
class StepRecord:
    """What the last decoding step did, for metrics."""

    batch: int
    tree_sizes: list[int]  # nodes per sequence, root included
    accepted: list[int]  # accepted draft nodes per sequence (bonus/root not counted)
    emitted: list[int]  # tokens emitted per sequence
    seconds: float  # wall time of the whole step
    ar_seconds: float | None  # a plain (one token per sequence) step: cost model x measured plain_ratio


@dataclass(slots=True)
class StepPlan:
    """A step's schedule: the tree each sequence verifies."""

    seqs: list[Sequence]  # the sequences stepped
    live: list[Sequence]  # those with a tree (the others failed while drafting, or ran out of KV room)
    trees: list[DraftTree]  # sized, their cells reserved
    probe: bool  # roots alone, to time a plain step
    started: float  # perf_counter at the step's start ...
    drafted: float  # ... and when its trees were ready


def row_summary(logits: torch.Tensor, lib=None) -> tuple[list[int], list[bool]]:
    """Each row's greedy token (argmax's, first of ties) and whether it is finite: a row holding a
    NaN has a NaN maximum; one holding an infinity, an infinite extreme.

    On a CPU, torch's max or argmax with indices over a vocabulary row runs ~10x slower than its
    amax, and every draft node paid for it: with 2 threads here, max and amin took 0.21 / 0.47 ms
    for 5 / 16 rows of 49,152. So the argmax goes by blocks: each block's amax, the first block
    holding the row's maximum (argmax over the block maxima), then the first maximum within that
    block, which is the row's first maximum: 0.13 / 0.19 ms. (In a step, the first pass over
    rows the forward has just written costs ~0.25 ms more than a second pass would.)

    lib: the CPU kernel (decoding/cpu_linear.py), whose row_summary reads a row in one pass for
    its maximum and finiteness and stops at the maximum in a second: 5 rows in ~30 us."""
    if cpu_linear.scans_for(logits, lib):
        return cpu_linear.row_summary(lib, logits)
    n, vocab = logits.shape
    block = next((b for b in (128, 64, 32, 16) if vocab % b == 0 and vocab > b), None)
    if block is None:
        peak, best = logits.max(-1)
        return best.tolist(), (torch.isfinite(peak) & torch.isfinite(logits.amin(-1))).tolist()
    blocks = logits.reshape(n, vocab // block, block)
    block_max = blocks.amax(-1)  # [n, vocab / block]
    first = block_max.argmax(-1)  # [n]
    best = first * block + blocks[torch.arange(n, device=logits.device), first].argmax(-1)
    finite = torch.isfinite(block_max.amax(-1)) & torch.isfinite(logits.amin(-1))
    return best.tolist(), finite.tolist()


class Verified(NamedTuple):
    """One sequence's share of a verification forward: its tree as verified and its logits rows,
    with each row's greedy token and whether the row is finite, found for the whole forward at
    once (None: the sequence failed)."""

    tree: DraftTree
    logits: torch.Tensor | None
    best: list[int] | None = None
    finite: list[bool] | None = None


@dataclass(slots=True)
class StepRun:
    """A step's verification forward."""

    verified: list[Verified]  # per live sequence
    seconds: float  # the forward alone (tree masks excluded)
    mask_seconds: float  # building the tree masks
    clean: bool  # one forward for the whole batch (not split or retried)
    attention_calls: int


@dataclass(slots=True)
class StepResult:
    """What a step produced: each sequence's new tokens (empty for one that failed: see its
    `error`) and the record the server's metrics read."""

    emitted: list[list[int]]
    record: StepRecord


@dataclass
class StepTimes:
    """Wall time split of the engine's work, for reports (drafting + masks vs forward vs verify)."""

    draft: float = 0.0
    mask: float = 0.0
    forward: float = 0.0
    verify: float = 0.0
    prefill: float = 0.0
    grammar: float = 0.0  # pruning trees and masking rows for constrained sequences (inside draft and verify)
    steps: int = 0
    tokens: int = 0  # tokens verified in decoding steps' forwards (roots and draft nodes)
    attention_calls: int = 0  # attention calls in decoding steps' forwards, all layers counted

    @property
    def decode_total(self) -> float:
        return self.draft + self.mask + self.forward + self.verify


def freeze_start_up_heap() -> None:
    """For a long-running process (the server, a benchmark), once its engines are built: exempt
    every object alive now from the garbage collector's full scans. Start-up leaves ~300k objects
    that live as long as the process (transformers' and the tokenizer's modules, the model's
    Python side), and each full collection walked them all: 213 ms on a 2-core CPU, a stall of
    every running stream, which drafting's allocations (draft trees, suffix-index states) set off
    every few minutes of decoding (once in 166 s of ar, pld and logitspec; none after freezing).

    Then hand the start-up's freed memory back to the system: glibc keeps freed heap pages mapped,
    ~220 MB of them after building the default model (the transient float32 copies of the products,
    the matching's arrays), counted in the process's resident memory until trimmed."""
    gc.collect()
    gc.freeze()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim this way


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def uses_gguf(config: EngineConfig, device: torch.device) -> bool:
    """Whether the engine runs the GGUF file's own weights through llama.cpp (--dtype gguf)."""
    if config.dtype == "gguf" or config.runner == "llama.cpp":
        if device.type != "cpu":
            raise ValueError("dtype gguf (the llama.cpp runner) runs on the CPU; use --device cpu")
        return True
    return False


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The native runner's weights dtype (the logits' for gguf, whose weights are the file's own)."""
    if name == "gguf":
        return torch.float32
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None, model: Runner | None = None):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = pick_device(config.device)
        gguf = model is None and uses_gguf(config, self.device)
        self.loaded = loaded or load(config.model, weights=not gguf)
        self.tokenizer = self.loaded.tokenizer
        self.dtype = pick_dtype(config.dtype, self.device)
        if gguf:
            if self.loaded.gguf is None:
                raise ValueError("dtype gguf needs a .gguf model file (the embedded default model is one)")
            from decoding.llama_cpp_runner import LlamaCppRunner

            model = LlamaCppRunner(self.loaded.gguf, self.loaded.hf_config, config.threads)
        self.model = model or build_model(self.loaded.hf_config, self.loaded.state, self.device, self.dtype,
                                          config.runner)
        if loaded is None:
            # Weights this engine loaded for itself: the model now holds its own copies of what it
            # reads (see Checkpoint), so the state dict, a map of the whole weights file, would only
            # stay resident for the engine's life (~0.5 GB on the default model). An engine given
            # a LoadedModel leaves it whole for the others.
            self.loaded.state.clear()
        # The float32 products on a GGUF file's blocks (Q4_1, Q8_0) where they hold exactly the same
        # weights (decoding/gguf_blocks.py): the same outputs from a fraction of the bytes. A model
        # passed in has had its turn.
        self.products = cpu_linear.in_use(self.device, self.dtype)
        self.scans = cpu_linear.kernel_for(self.device, self.dtype)  # its row_summary and top_k, or None
        if model is None and self.products == "avx2" and self.loaded.gguf is not None \
                and isinstance(self.model, Model) and os.environ.get("LOGITSPEC_Q4", "").lower() not in cpu_linear.OFF:
            t0 = time.perf_counter()
            taken, seen, freed = adopt_blocks(self.model, self.loaded.gguf, self.loaded.folder)
            if taken:
                formats = ", ".join(f"{n} on {fmt.upper()}" for fmt, n in sorted(taken.items()))
                log(f"{sum(taken.values())} of {seen} products run on the GGUF's blocks ({formats}; "
                    f"{freed / 2**20:.0f} MiB of float32 weights freed, {time.perf_counter() - t0:.1f} s)")
        if isinstance(self.model, Model):  # the calibration cache keys on the formats: other forward costs
            formats = sorted({lin.blocks[0] for lin in self.model.products() if lin.blocks is not None})
            self.products += "".join(f"+{fmt}" for fmt in formats)
            if formats and cpu_linear.block_isa(cpu_linear.kernel()) == "avx512":
                self.products += "+avx512"
        self.model.attention_mode = config.attention
        if getattr(self.model, "cells_kernel", None) is not None:
            self.products += "+attention"  # the CPU kernel's attention: other forward costs, another calibration
        if config.compile:
            self.model.compile()
        max_len = min(config.max_context, self.model.config.max_position)
        self.cache = self.model.new_cache(config.max_batch, max_len, self._kv_memory(max_len))
        c = self.cache
        log(f"KV cache: {c.num_blocks} blocks of {c.block_size} tokens ({c.num_blocks * c.block_size} tokens, "
            f"{c.memory_bytes / 2**20:.0f} MiB), {c.num_slots} sequences of up to {c.max_len}; prefix caching "
            + ("on" if config.prefix_caching and self.model.runner != "llama.cpp" else
               "off" if not config.prefix_caching else "not in the llama.cpp runner"))
        # One drafter per method; a sequence picks one when it starts (default: config.method).
        self.drafters: dict[str, Drafter] = {m: make_drafter(m) for m in METHODS}
        self.drafter = self.drafters[config.method]
        if config.corpus:
            self._read_corpus()
        self.stats = AcceptanceStats()
        self._statistics_key = statistics_cache.statistics_key(self.loaded) if config.persist_statistics else None
        self._statistics_saved = time.monotonic()
        restored = self._statistics_key is not None and self._restore_statistics()
        if not restored and config.prior_statistics:
            self._restore_prior()
        self.times = StepTimes()
        self._forwards = 0  # verification forwards run, to tell a clean step from a retried one
        self._steps_run = 0
        # Measured plain-step time over the cost model's estimate of it, from steps that drafted
        # nothing (probes and natural ones). The cost model's shape comes from start-up timings
        # and its offset is fitted at the tree sizes in use, so on its own it can misjudge a plain
        # step by 10-25% in a busy server; this ratio corrects the speedup baseline. None = not
        # measured yet.
        self.plain_ratio: float | None = None
        self.stop_ids = self._stop_ids()
        self.grammars = Grammars(self.tokenizer, self.model.config.vocab_size, self.stop_ids)
        # Working limits: start at the configuration, halved when a forward runs out of memory.
        self.batch_limit = config.max_batch  # sequences per verification forward
        self.tree_capacity = config.tree_capacity
        self.prefill_chunk = config.prefill_chunk
        # Test-only fault injection: after every prefill and verification forward, called as
        # fault_hook(seq, rows) for each sequence in it with its logits rows; it may raise (the
        # forward failed) or write into rows. Set from Python only: no flag, environment variable
        # or route reaches it.
        self.fault_hook: Callable[[Sequence, torch.Tensor], None] | None = None
        self.cost = self._calibrate() if config.adaptive and (config.method != "ar" or config.max_batch > 1) else None

    @property
    def numerics(self) -> str:
        """The weights' numerics, as start-up prints them: a dtype, or the GGUF file's own blocks."""
        if self.model.runner == "llama.cpp":
            return f"gguf {self.model.quantization} via llama.cpp"
        return str(self.dtype).replace("torch.", "")

    # ---- set-up -------------------------------------------------------------------------------

    def _kv_memory(self, max_len: int) -> int:
        """The KV cache's budget in bytes: --kv-memory, else every slot's full context capped at
        2 GiB on a CPU (the pool's pages are committed only as blocks are first used), or half the
        free memory on a GPU."""
        if self.config.kv_memory != "auto":
            return parse_size(self.config.kv_memory)
        c = self.model.config
        context = max_len * bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(free // 2, context)
        return min(self.config.max_batch * context, 2 * 2**30)

    def _stop_ids(self) -> frozenset[int]:
        ids = set()
        eos = self.loaded.hf_config.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def _calibrate(self) -> CostModel:
        """Forward costs of 1..64 tokens, so tree sizing starts informed: read from the calibration
        cache when this machine and model were timed before (`decoding/calibration_cache.py`), else
        timed now and cached."""
        max_tokens = self.config.tree_capacity * self.config.max_batch
        room = self.cache.max_len // 2  # half the slot for context, half for the largest tree
        sizes = [n for n in CALIBRATION_SIZES if n <= min(max(self.config.tree_capacity, 2), room)] or [1]
        past = max(1, min(256, self.cache.max_len - max(sizes)))
        rounds = self.config.calibration_rounds
        key = calibration_cache.calibration_key(self.loaded, self.device, self.dtype, sizes, past,
                                                self.config.compile, self.model.runner,
                                                self.products)
        cached = None if self.config.recalibrate else calibration_cache.load(key, rounds)
        if cached is not None:
            seconds, entry = cached
            source = f"cached {entry['measured_at']}, {entry['rounds']} rounds"
        else:
            t0 = time.perf_counter()
            seconds = self._time_forwards(sizes, past, rounds)
            path = calibration_cache.save(key, rounds, seconds)
            source = (f"measured in {time.perf_counter() - t0:.1f} s, {rounds} rounds; "
                      + (f"cached in {path}" if path else "cache folder not writable"))
        log("forward cost vs tree size: " + ", ".join(
            f"{n}:{1000 * s:.0f}ms" for n, s in seconds.items() if n in (1, 4, 8, 16, 32, 64)) + f" ({source})")
        return CostModel(seconds, max_tokens, self.config.max_batch, margin=self.config.draft_margin)

    def _read_corpus(self) -> None:
        """LogitSpec's corpus: the one shipped for this model (decoding/corpus.py), if there is."""
        t0 = time.perf_counter()
        found = load_corpus(self.loaded)
        if found is not None:
            index, answers = found
            self.drafters["logitspec"].corpus = index
            log(f"corpus: {answers} answers ({len(index) - answers} tokens) shipped for this model "
                f"({corpus_path(self.loaded)}), indexed in {time.perf_counter() - t0:.1f} s")

    def _restore_statistics(self) -> bool:
        """The acceptance statistics an earlier process saved for this model, if any: whether
        they were taken."""
        path = statistics_cache.entry_path(self._statistics_key)
        found = statistics_cache.load(self._statistics_key)
        if found is None:
            log(f"acceptance statistics: none saved for this model in {path.parent}")
            return False
        state, saved_at = found
        return self._take_statistics(state, f"from {path} (saved {saved_at})")

    def _restore_prior(self) -> None:
        """The statistics shipped for this model (statistics_cache.load_prior), if there are."""
        state = statistics_cache.load_prior(self.loaded)
        if state is not None:
            self._take_statistics(state, f"from the prior shipped for this model "
                                         f"({statistics_cache.prior_path(self.loaded)})")

    def _take_statistics(self, state: dict, source: str) -> bool:
        """Restore `state` (from `source`, for the log); whether it was taken (not: logged, and the
        statistics stay as they were)."""
        try:
            kinds = self.stats.restore(state)
        except ValueError as e:
            log(f"acceptance statistics {source} not used ({e})")
            return False
        log(f"acceptance statistics: {kinds} node kinds {source}")
        return True

    def save_statistics(self, force: bool = True) -> Path | None:
        """Save the acceptance statistics for the next process (persist_statistics): now, or with
        force=False only when the last save is SAVE_EVERY seconds old. The path written, or None
        (not persisting, not due, or the cache folder not writable)."""
        if self._statistics_key is None:
            return None
        now = time.monotonic()
        if not force and now - self._statistics_saved < statistics_cache.SAVE_EVERY:
            return None
        self._statistics_saved = now
        return statistics_cache.save(self._statistics_key, self.stats.state())

    def _time_forwards(self, sizes: list[int], past: int, rounds: int) -> dict[int, float]:
        """Median seconds of a forward of n tokens after `past` tokens of context, for each size."""
        slot = self.cache.allocate()
        try:
            g = torch.Generator().manual_seed(0)
            ctx = torch.randint(0, self.model.config.vocab_size, (past + max(sizes),), generator=g)
            self._forward(ctx[:past], torch.arange(past), [SeqBatchEntry(slot, 0, past, None)], last_only=True)
            # Rounds over all sizes, keeping each size's median: what a forward typically costs.
            # The fastest would be optimistic, and unevenly so: on 2 CPU cores a 6-token forward's
            # median was 20% above its fastest, a 1-token one's 7%. Sizing trees on the fastest
            # makes extra tokens look cheaper than they are, and the learned offset (fitted at the
            # tree sizes in use) then overstates a plain step, and with it the reported speedup.
            timings: dict[int, list[float]] = {n: [] for n in sizes}
            for _ in range(rounds):
                for n in sizes:
                    tokens, positions = ctx[past:past + n], torch.arange(past, past + n)
                    entry = [SeqBatchEntry(slot, past, n, torch.ones(n, n, dtype=torch.bool).tril_())]
                    t0 = time.perf_counter()
                    self._forward(tokens, positions, entry)
                    timings[n].append(time.perf_counter() - t0)
            return {n: statistics.median(ts) for n, ts in timings.items()}
        finally:
            self.cache.release(slot)

    # ---- model calls ---------------------------------------------------------------------------

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, batch: list[SeqBatchEntry],
                 last_only: bool = False) -> torch.Tensor:
        rows = None
        if last_only:
            ends = torch.tensor([e.n for e in batch]).cumsum(0) - 1
            rows = ends.to(self.device)
        return self.model.forward(tokens.to(self.device), positions.to(self.device), batch, self.cache, rows)

    def _run(self, seqs: list[Sequence], tokens: torch.Tensor, positions: torch.Tensor,
             batch: list[SeqBatchEntry], last_only: bool = False) -> torch.Tensor:
        """A serving forward (prefill or verification), where injected faults land."""
        logits = self._forward(tokens, positions, batch, last_only)
        if self.fault_hook is not None:
            with torch.inference_mode():  # the forward's tensors are inference tensors
                for seq, rows in zip(seqs, logits.split([1 if last_only else e.n for e in batch])):
                    self.fault_hook(seq, rows)
        return logits

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- sequence lifecycle ----------------------------------------------------------------------

    def new_sequence(self, prompt: list[int], params: SamplingParams, max_new_tokens: int,
                     index: SuffixIndex | None = None, logprobs: int | None = None,
                     method: str | None = None, constraint: Constraint | None = None,
                     cache_namespace: str = "") -> Sequence:
        """Validate, allocate a KV slot and index the prompt; `prefill` then takes the prompt's
        cached prefix and runs the rest through the model. cache_namespace: prefix-cache blocks are
        shared only within one namespace (the server's: one per API key)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if method is not None and method not in self.drafters:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(self.drafters)}")
        if len(prompt) + 1 > self.cache.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds the context of {self.cache.max_len}")
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
        seq = Sequence(prompt=list(prompt), params=params, max_new_tokens=max_new_tokens,
                       stop_ids=self.stop_ids, index=index if index is not None else SuffixIndex(),
                       generator=make_generator(params, self.device), seed=seed, logprobs=logprobs,
                       drafter=self.drafters[method] if method else self.drafter, constraint=constraint)
        seq.index.extend(prompt)
        seq.slot = self.cache.allocate()
        seq.cache_namespace = cache_namespace
        return seq

    def prefill(self, seq: Sequence, max_chunks: int | None = None) -> bool:
        """Run up to `max_chunks` prompt chunks (all when None); True once the first token is decided."""
        t0 = time.perf_counter()
        if self.config.prefix_caching and seq.past_len == 0 and not self.cache.tables[seq.slot]:
            # Looked up when the prefill starts, not at admission: requests admitted together
            # (16 sharing a system prompt) are prefilled one after another, and each finds the
            # blocks the ones before it published.
            seq.past_len = seq.cached_tokens = self.cache.attach_prefix(seq.slot, seq.prompt, seq.cache_namespace)
        done = 0
        while seq.past_len < len(seq.prompt) and (max_chunks is None or done < max_chunks):
            start = seq.past_len
            part = seq.prompt[start:start + self.prefill_chunk]
            try:
                logits = self._run([seq], torch.tensor(part), torch.arange(start, start + len(part)),
                                   [SeqBatchEntry(seq.slot, start, len(part), None)], last_only=True)
            except torch.OutOfMemoryError:
                if self.prefill_chunk == 1:
                    raise
                self._free_memory()
                self.prefill_chunk = max(1, self.prefill_chunk // 2)
                logger.warning("out of memory in prefill: chunk halved to %d tokens", self.prefill_chunk)
                continue
            seq.past_len += len(part)
            done += 1
            self._publish(seq)
        self.times.prefill += time.perf_counter() - t0
        if seq.past_len < len(seq.prompt):
            return False
        if not torch.isfinite(logits[0]).all():
            raise NonFiniteLogits("non-finite logits after the prompt")
        if seq.max_new_tokens <= 0:
            seq.finish_reason = "length"
        else:
            row = logits[0]
            if seq.constraint is not None:
                t0 = time.perf_counter()
                row = seq.constraint.mask_logits(logits[:1], seq.constraint.next_mask())[0]
                self.times.grammar += time.perf_counter() - t0
            self._decide_root(seq, row)
        return True

    def start_sequence(self, prompt: list[int], params: SamplingParams, max_new_tokens: int,
                       index: SuffixIndex | None = None, logprobs: int | None = None,
                       method: str | None = None, constraint: Constraint | None = None) -> Sequence:
        """Allocate a slot, prefill the prompt and decide the first token."""
        seq = self.new_sequence(prompt, params, max_new_tokens, index, logprobs, method, constraint)
        try:
            self.prefill(seq)
        except BaseException:
            self.stop_sequence(seq)
            raise
        return seq

    def stop_sequence(self, seq: Sequence, scrub: bool | None = None) -> None:
        """Release the sequence's slot and blocks. scrub (None: unless it ended normally): it may
        have left non-finite K/V behind (failed, or stopped in its prefill), which must neither stay
        in the prefix cache nor be read unzeroed by the next user of its blocks."""
        if seq.slot >= 0:
            if scrub is None:
                scrub = seq.finish_reason not in ("stop", "length")
            self.cache.release(seq.slot, scrub=scrub)
            seq.slot = -1
        self.save_statistics(force=False)

    def _publish(self, seq: Sequence) -> None:
        """Offer the sequence's newly completed blocks to the prefix cache."""
        if self.config.prefix_caching and self.cache.publishable(seq.slot, seq.past_len):
            tokens = seq.prompt[:seq.past_len]
            if len(tokens) < seq.past_len:
                tokens = tokens + seq.output[:seq.past_len - len(tokens)]
            self.cache.publish(seq.slot, tokens)

    def _decide_root(self, seq: Sequence, logits: torch.Tensor) -> None:
        """logits: [vocab], the target's distribution for the next token."""
        if seq.params.greedy:
            token = int(logits.argmax())
        elif self.config.sampler == "coupled":
            token = int(coupled_sample(logits, seq.params, seq.seed, seq.past_len))
        else:
            token = int(sample(processed_probs(logits[None], seq.params)[0], seq.generator))
        self._set_root(seq, token, logits)

    def _set_root(self, seq: Sequence, token: int, logits: torch.Tensor) -> None:
        # A decided stop token ends the sequence here: no forward is spent on it.
        if token in seq.stop_ids:
            seq.finish_reason = "stop"
            return
        seq.root = token
        if seq.logprobs is not None:
            seq._root_logprob = self._logprob(logits, token, seq.logprobs)
        # The top tokens: with the kernel's scan (~20 us) at once; else taken only if this sequence
        # drafts next step (see step), from a copy of the row, not a view that would keep the whole
        # step's logits alive (torch's topk of 49 over 49,152 took ~95 us here, the copy ~25 us).
        k = top_wanted(seq.drafter)
        seq.root_top = seq.root_logits = None
        if k and cpu_linear.scans_for(logits, self.scans):
            seq.root_top = cpu_linear.top_k(self.scans, logits, k + 1)
        elif k:
            seq.root_logits = logits.clone()

    def _top(self, seq: Sequence) -> list[int]:
        """The top tokens of the last logit (x0 among them): LogitSpec's next-next guesses and the
        tokens that confirm a retrieved first token (Drafter.propose)."""
        if seq.root_top is not None:
            return seq.root_top
        if seq.root_logits is None:
            return []
        return seq.root_logits.topk(top_wanted(seq.drafter) + 1).indices.tolist()

    @staticmethod
    def _logprob(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
        """The model's own (temperature 1) log-probability of `token` and the `top` likeliest."""
        lp = torch.log_softmax(logits, dim=-1)
        alts = []
        if top:
            values, ids = lp.topk(top)
            alts = list(zip(ids.tolist(), values.tolist()))
        return float(lp[token]), alts

    # ---- one decoding step over a batch ----------------------------------------------------------------

    def step(self, seqs: list[Sequence]) -> StepResult:
        """One decoding step for every running sequence, in three stages that hand on what they
        produce: schedule (draft and size each tree, reserve its cells), execute (one verification
        forward) and postprocess (verify, emit, and teach the statistics and the cost model).

        A sequence that fails (see the module docstring) emits nothing and has `error` set."""
        plan = self._schedule(seqs)
        run = self._execute(plan)
        return self._postprocess(plan, run)

    def _schedule(self, seqs: list[Sequence]) -> StepPlan:
        """Each sequence's tree for this step: its drafter's proposal (skipped when not even its
        likeliest first nodes could pay), pruned by its grammar, sized by the cost model and given
        KV cells; a probe verifies roots alone."""
        started = time.perf_counter()
        self._steps_run += 1
        probe = self.cost is not None and is_probe(self._steps_run, self.cost.measured(len(seqs), len(seqs)))
        # Below this acceptance estimate no draft node pays at this batch size (None: no sizing).
        floor = self.cost.break_even(len(seqs)) if self.cost is not None and not probe else None
        stretch = is_stretch(self._steps_run)
        live, trees = [], []
        for seq in seqs:
            try:
                tree = DraftTree.root(seq.root) if probe else self._draft(seq, floor, stretch)
            except Exception as e:
                self._fault(seq, e)
                continue
            live.append(seq)
            trees.append(tree)
        if live and not probe:
            trees = self._size_trees(live, trees, stretch)
        live, trees = self._reserve(live, trees)
        return StepPlan(seqs, live, trees, probe, started, time.perf_counter())

    def _draft(self, seq: Sequence, floor: float | None, stretch: bool = False) -> DraftTree:
        # Acceptance runs in streaks (copying a list, a quote, a loop): a sequence whose last step
        # accepted drafts is "hot", and its nodes are judged by hot statistics.
        hot = bool(seq.step_sizes) and seq.step_sizes[-1] > 1
        forced = self._forced(seq)
        # A full proposal costs retrievals for every guess; when not even its likeliest first
        # nodes could pay (large batches, text that does not repeat), skip it. Likewise a branch
        # whose likeliest first node cannot pay: guesses and echoes, which on a CPU rarely do,
        # would otherwise be ranked, retrieved for and cut on every step. But never on a stretch
        # step: statistics learn only from drafted nodes, so estimates that once fell below the
        # floor would otherwise hold drafting off for good (the stretch cut then keeps one node).
        guess, echoes = True, seq.echoes
        if floor is not None:
            paying = self.stats.paying([*seq.drafter.openings(seq.index, seq.root, seq.echoes),
                                        *([NodeKind("forced", (), 1)] if forced else [])], floor, hot)
            if not paying and not stretch:
                return DraftTree.root(seq.root)
            guess = "guess" in paying
            if "echo" not in paying:
                echoes = []
        top = self._top(seq)
        tree = seq.drafter.propose(seq.index, seq.root, top[:seq.drafter.guesses + 1] if guess else [], echoes, top)
        if hot:
            tree.kinds = [k and k.heated() for k in tree.kinds]
        if seq.constraint is not None:
            tree = self._constrain(seq, tree, forced)
        return tree

    def _execute(self, plan: StepPlan) -> StepRun:
        """The verification forward (split, or retried one sequence at a time, when it must be)."""
        mask_before, forwards_before = self.times.mask, self._forwards
        calls_before = self.model.attention_calls
        t0 = time.perf_counter()
        verified = self._forward_trees(plan.live, plan.trees)
        seconds = time.perf_counter() - t0 - (self.times.mask - mask_before)
        return StepRun(verified, seconds, self.times.mask - mask_before, self._forwards == forwards_before + 1,
                       self.model.attention_calls - calls_before)

    def _postprocess(self, plan: StepPlan, run: StepRun) -> StepResult:
        """Verify each tree against its logits and emit; then what the step teaches: acceptance
        statistics (in _accept), the forward's cost and the step's realised speed."""
        emitted: dict[int, list[int]] = {}
        verify_started = time.perf_counter()
        for seq, v in zip(plan.live, run.verified):
            if v.logits is None:
                continue
            try:
                emitted[id(seq)] = self._accept(seq, v.tree, v.logits, v.best, v.finite)
            except Exception as e:
                self._fault(seq, e)
        ended = time.perf_counter()
        seqs = plan.seqs
        done = [(s, v.tree) for s, v in zip(plan.live, run.verified) if id(s) in emitted]
        tokens = sum(len(v.tree) for v in run.verified)
        plain_estimate = self.cost.cost(len(seqs), len(seqs)) if self.cost is not None else None
        if self.cost is not None and run.clean and len(done) == len(seqs):
            drafted = tokens > len(seqs)
            if not drafted:  # a plain step, timed whole
                ratio = (ended - plan.started) / plain_estimate
                self.plain_ratio = ratio if self.plain_ratio is None else 0.8 * self.plain_ratio + 0.2 * ratio
            # the forward alone (with the acceptance that follows it, as a step pays it)
            self.cost.observe(tokens, ended - plan.drafted - run.mask_seconds, len(seqs))
            self.cost.settle(len(seqs), sum(len(e) for e in emitted.values()), ended - plan.started, tokens - len(seqs))
        tm = self.times
        tm.draft += plan.drafted - plan.started
        tm.forward += run.seconds
        tm.verify += ended - verify_started
        tm.steps += 1
        tm.tokens += tokens
        tm.attention_calls += run.attention_calls
        record = StepRecord(len(seqs), [len(t) for _, t in done], [s.last_accepted for s, _ in done],
                            [len(emitted[id(s)]) for s, _ in done], ended - plan.started,
                            None if plain_estimate is None else plain_estimate * (self.plain_ratio or 1.0))
        return StepResult([emitted.get(id(s), []) for s in seqs], record)

    def _reserve(self, seqs: list[Sequence], trees: list[DraftTree]) -> tuple[list[Sequence], list[DraftTree]]:
        """KV blocks for every tree's cells. When the pool (--kv-memory) runs short, a tree is cut
        to its root; a sequence that cannot get a block even for that ends here ("length")."""
        kept_seqs, kept_trees = [], []
        for seq, tree in zip(seqs, trees):
            try:
                self.cache.reserve(seq.slot, seq.past_len + len(tree))
            except KVCacheFull:
                try:
                    self.cache.reserve(seq.slot, seq.past_len + 1)
                except KVCacheFull:
                    logger.warning("KV cache full: a sequence of %d tokens ends here (finish_reason length); "
                                   "raise --kv-memory or lower --max-running", seq.past_len)
                    seq.finish_reason = "length"
                    continue
                tree = DraftTree.root(seq.root)
            kept_seqs.append(seq)
            kept_trees.append(tree)
        return kept_seqs, kept_trees

    def admissible(self, prompt_len: int, running: int) -> bool:
        """Whether a new sequence's prompt fits in the KV blocks free now, leaving one block of
        room for each running sequence (always, when nothing runs: the pool holds a context)."""
        if self.cache.free_slots == 0:
            return False
        return running == 0 or self.cache.free_blocks >= self.cache.blocks_for(prompt_len + 1) + running

    def _forced(self, seq: Sequence) -> list[int]:
        """Under a grammar, the tokens it forces after the root, for drafters that draft them."""
        if seq.constraint is None or not seq.drafter.forced:
            return []
        t0 = time.perf_counter()
        try:
            return seq.constraint.forced(seq.root)
        finally:
            self.times.grammar += time.perf_counter() - t0

    def _constrain(self, seq: Sequence, tree: DraftTree, forced: list[int]) -> DraftTree:
        """The drafter's tree under the grammar: forbidden drafts pruned (under the constrained
        target they have probability 0, so they could never be accepted), and the forced tokens
        hung under the root as one more chain."""
        t0 = time.perf_counter()
        try:
            tree = seq.constraint.prune(tree) if len(tree) > 1 else tree
            tree.add_chain(0, forced, [NodeKind("forced", (), d) for d in range(1, len(forced) + 1)])
            return tree
        finally:
            self.times.grammar += time.perf_counter() - t0

    def _forward_trees(self, seqs: list[Sequence], trees: list[DraftTree]) -> list[Verified]:
        """Verification forwards of at most `batch_limit` sequences each. Per sequence: its tree (cut
        down if memory ran out) and its logits rows [len(tree), vocab], None if it failed alone."""
        out, i = [], 0
        while i < len(seqs):
            n = self.batch_limit
            out += self._forward_chunk(seqs[i:i + n], trees[i:i + n])
            i += n
        return out

    def _forward_chunk(self, seqs: list[Sequence], trees: list[DraftTree]) -> list[Verified]:
        t0 = time.perf_counter()
        masks = [t.attention_mask() for t in trees]
        tokens = torch.tensor([tok for t in trees for tok in t.tokens])
        positions = torch.tensor([s.past_len + d for s, t in zip(seqs, trees) for d in t.depths])
        batch = [SeqBatchEntry(s.slot, s.past_len, len(t), m) for s, t, m in zip(seqs, trees, masks)]
        self.times.mask += time.perf_counter() - t0
        self._forwards += 1
        try:
            logits = self._run(seqs, tokens, positions, batch)  # [total tokens, vocab]
        except torch.OutOfMemoryError:
            self._free_memory()
            if len(seqs) > 1:
                self.batch_limit = max(1, len(seqs) // 2)
                logger.warning("out of memory in a forward of %d sequences: at most %d per forward from now",
                               len(seqs), self.batch_limit)
                return self._forward_trees(seqs, trees)
            if len(trees[0]) > 1:
                # Parents precede children, so the first k nodes are a tree.
                self.tree_capacity = max(1, len(trees[0]) // 2)
                logger.warning("out of memory in a forward of %d tokens: trees capped at %d nodes from now",
                               len(trees[0]), self.tree_capacity)
                return self._forward_chunk(seqs, [trees[0].subtree(list(range(self.tree_capacity)))])
            self._fault(seqs[0], "out of memory")
            return [Verified(trees[0], None)]
        except Exception as e:
            if len(seqs) == 1:
                self._fault(seqs[0], e)
                return [Verified(trees[0], None)]
            logger.warning("a forward of %d sequences failed (%s): retrying them one at a time",
                           len(seqs), type(e).__name__)
            return [r for s, t in zip(seqs, trees) for r in self._forward_chunk([s], [t])]
        # Once over the whole forward, not in two small parallel ops per sequence (they were 5% of
        # a 16-sequence step in a busy server).
        best, finite = row_summary(logits, self.scans)
        out, start = [], 0
        for tree in trees:
            end = start + len(tree)
            out.append(Verified(tree, logits[start:end], best[start:end], finite[start:end]))
            start = end
        return out

    def _fault(self, seq: Sequence, cause: Exception | str) -> None:
        """Fail this sequence alone; the caller releases its slot."""
        if isinstance(cause, Exception):
            # Logged as text: a log record holding the exception would keep the failed forward's
            # frames, and with them every sequence of its batch, alive for as long as it is kept.
            logger.error("sequence failed: %s", "".join(traceback.format_exception(cause)).rstrip())
            cause = "non-finite logits" if isinstance(cause, NonFiniteLogits) else type(cause).__name__
        seq.error = cause
        seq.finish_reason = "error"

    def _size_trees(self, seqs: list[Sequence], trees: list[DraftTree], stretch: bool = False) -> list[DraftTree]:
        """Keep each tree's likeliest nodes: as many as pay for themselves (half as many again on a
        stretch probe, see CostModel.choose), or up to capacity when cost-aware sizing is off."""
        capacity = self.tree_capacity
        limits = [min(capacity, self.cache.max_len - s.past_len) - 1 for s in seqs]
        ranked, probs = [], []
        for tree in trees:
            ps = self.stats.node_probs(tree)
            order = ranked_nodes(tree, ps)
            ranked.append(order)
            probs.append([ps[i] for i in order])
        counts = self.cost.choose(probs, limits, stretch) if self.cost is not None else limits
        return [t if c >= len(t) - 1 else t.subtree([0] + order[:c])
                for t, order, c in zip(trees, ranked, counts)]

    def _accept(self, seq: Sequence, tree: DraftTree, logits: torch.Tensor, best: list[int] | None = None,
                finite: list[bool] | None = None) -> list[int]:
        """best, finite: each row's argmax and finiteness (row_summary), when the forward found them
        already. The finiteness is of the model's rows: masked rows hold -inf on purpose."""
        if finite is None:
            best, finite = row_summary(logits, self.scans)
        if seq.constraint is not None:
            best = None  # the argmax of the constrained rows, found below
            # The constrained target: every row masked at its node's grammar state. From here on
            # verification, the bonus token, logprobs and echoes all read the constrained rows.
            t0 = time.perf_counter()
            logits = seq.constraint.mask_logits(logits, seq.constraint.tree_masks(tree))
            self.times.grammar += time.perf_counter() - t0
        if seq.params.greedy:
            if best is None:
                best = row_summary(logits, self.scans)[0]
            path, next_token = verify_greedy(tree, logits, best)
        else:
            best = None  # (echoes follow the sampled path, not the greedy one)
            if self.config.sampler == "coupled":
                path, next_token = verify_coupled(tree, logits, seq.params, seq.seed, seq.past_len)
            else:
                path, next_token = verify_sampling(tree, logits, seq.params, seq.generator)
        if not all(finite[i] for i in path):  # the rows this step's tokens came from
            raise NonFiniteLogits("non-finite logits")
        if len(tree) > 1:
            self.stats.record(tree, path)
        seq.last_accepted = len(path) - 1
        self.cache.keep(seq.slot, seq.past_len, path)
        seq.past_len += len(path)
        seq.steps += 1
        new = []
        for node in path:
            token = tree.tokens[node]
            if token in seq.stop_ids:
                seq.finish_reason = "stop"
                break
            new.append(token)
            if len(seq.output) + len(new) >= seq.max_new_tokens:
                seq.finish_reason = "length"
                break
        if seq.logprobs is not None:
            entries = [seq._root_logprob] + [self._logprob(logits[path[j - 1]], tree.tokens[path[j]], seq.logprobs)
                                             for j in range(1, len(new))]
            seq.token_logprobs.extend(entries[:len(new)])
        if seq.constraint is not None and seq.finish_reason is None:
            seq.constraint.advance(new)  # the grammar's state follows the output
        seq.output.extend(new)
        seq.step_sizes.append(len(new))
        seq.index.extend(new)
        self._publish(seq)
        if seq.finish_reason is None and seq.past_len + 1 >= self.cache.max_len:
            seq.finish_reason = "length"
        if seq.finish_reason is None:
            self._set_root(seq, next_token, logits[path[-1]])
        if seq.finish_reason is None:  # (a decided stop token ends it)
            self._keep_echoes(seq, tree, path, logits, best)
        return new

    @staticmethod
    def _keep_echoes(seq: Sequence, tree: DraftTree, path: list[int], logits: torch.Tensor,
                     best: list[int] | None) -> None:
        """LogitSpec's echoes for the next step: the verification forward also gave the target's
        prediction after every rejected draft node. Two kinds of rejected node saw a context close
        to the new root's: one that held the root's token elsewhere in the tree ("t": a token
        dropped, inserted or swapped before it), and a sibling of the root, which sat where the
        root now sits ("s": the same context but that one token). Their predictions, continued
        down their drafts as far as the target agreed there, are more branches for what follows
        the root, as the last logit's top-k are for the token after it."""
        seq.echoes = []
        if not seq.drafter.echoes or len(tree) == len(path):
            return
        k = seq.drafter.echoes
        on_path = set(path)
        same = sorted((v for v in range(1, len(tree)) if tree.tokens[v] == seq.root and v not in on_path),
                      key=lambda v: tree.depths[v])[:k]
        siblings = list(tree.children(path[-1]).values())[:k]  # all rejected: the path ends above them

        def predicted(v: int) -> int:
            return best[v] if best is not None else int(logits[v].argmax())

        for tag, nodes in (("t", same), ("s", siblings)):
            for v in nodes:
                echo = [predicted(v)]
                while (child := tree.children(v).get(echo[-1])) is not None:
                    v = child
                    echo.append(predicted(v))
                seq.echoes.append((tag, echo))

    # ---- convenience: one request start to end -------------------------------------------------

    def generate(self, prompt: list[int], params: SamplingParams | None = None, max_new_tokens: int = 128,
                 index: SuffixIndex | None = None, constraint: Constraint | None = None,
                 method: str | None = None) -> Sequence:
        seq = self.start_sequence(prompt, params or SamplingParams(), max_new_tokens, index, method=method,
                                  constraint=constraint)
        try:
            while not seq.finished:
                self.step([seq])
        finally:
            self.stop_sequence(seq)
        if seq.error is not None:
            raise RuntimeError(f"generation failed: {seq.error}")
        return seq

    def chat_prompt(self, turns: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The tokenizer's own chat template. Where the template has no system role and refuses a
        system message (Gemma 2's and Mistral v0.1's raise), the system messages are folded into
        the first user message instead (see fold_system_messages), which is what Gemma 3's
        template, also without a system role, does itself. tools: given to a template that renders
        them (server/structured.py decides)."""
        from jinja2 import TemplateError

        extra = {"tools": tools} if tools else {}
        try:
            ids = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, **extra)
        except TemplateError:
            folded = fold_system_messages(turns)
            if folded == turns:
                raise
            ids = self.tokenizer.apply_chat_template(folded, add_generation_prompt=True, tokenize=True, **extra)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)


def fold_system_messages(turns: list[dict]) -> list[dict]:
    """The system messages' text, each followed by a blank line, put before the first user
    message's (a user message of its own when there is none); the other turns unchanged."""
    system = "".join(t["content"] + "\n\n" for t in turns if t["role"] == "system")
    rest = [t for t in turns if t["role"] != "system"]
    if not system:
        return rest
    first_user = next((i for i, t in enumerate(rest) if t["role"] == "user"), None)
    if first_user is None:
        return [{"role": "user", "content": system.rstrip("\n")}] + rest
    return [*rest[:first_user], {**rest[first_user], "content": system + rest[first_user]["content"]},
            *rest[first_user + 1:]]
