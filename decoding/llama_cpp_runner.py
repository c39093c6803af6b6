"""The llama.cpp runner (`--dtype gguf`): a GGUF file's own quantized weights and llama.cpp's CPU
kernels under this engine's scheduler, drafting and verification.

On a small CPU the dequantized fp32 model reads ~540 MB of weights per token; the default model's
GGUF (Q4_1 layers, Q8_0 embeddings) is 98 MB, and llama.cpp's kernels for those blocks are what
makes llama.cpp itself 2x faster than the native runner there. This runner drives llama.cpp through
llama-cpp-python's low-level API, one `llama_decode` per forward, with no sampling or Python loop of
its own.

Tree verification in llama.cpp's KV cache. llama.cpp masks attention by sequence ids: a token sees
the cells that hold the sequence id it is decoded under (its first id) at positions up to its own.
A cell may hold several ids. So a draft tree is decoded with one temporary id per leaf:
- every prefix cell of the sequence also gets each leaf's id (`seq_cp`, a flag per cell);
- each tree node is written with the ids of the leaves below it, and decoded under the first one;
- a node then sees the prefix and the cells holding its leaf at positions up to its own depth,
  which are exactly its ancestors and itself.
`keep` then gives the accepted path's cells (those holding the leaf under the last accepted node,
at the path's positions) the sequence's own id, and drops every temporary id. A chain (prefill, or
a draft with no branches) is decoded under the sequence's own id directly.

Row independence, which lossless speculation needs: a row's logits must not depend on the other
rows of its forward or on where its cells lie. llama.cpp's CPU matrix products give each output
element from one block dot product whatever the batch (Q4_1 x Q8_1, Q8_0 x Q8_0; weight
repacking, whose multi-row tiles may round unlike single rows, is turned off). Its flash attention
visits a row's cells in cell order, skipping masked ones, so a row's attention is the same sum as
a plain step's exactly when the sequence's cells lie in position order. llama.cpp fills the
lowest free cells, so a freed cell between kept ones would later take a token out of order. Hence:
- one llama.cpp context per slot (a slot's frees can't open holes among another's cells);
- a rejected tree node that lies before the last accepted one in the cell array is not freed but
  kept under a "graveyard" id that no row attends to, until the sequence ends; only the cells past
  the last kept one (the tail) are freed, and the next tokens go there, in order.
`tests/test_llama_cpp_runner.py` checks logits bit for bit against plain steps.

What this runner does not do yet: prefix caching across requests (every prompt is prefilled), and
the CUDA device (llama-cpp-python's CPU build; GPU hosts use the native runner).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import torch

from decoding.kv_cache import DEFAULT_BLOCK_SIZE, KVCacheFull, Seats
from decoding.model import ModelConfig, Runner, SeqBatchEntry, transformers_config

MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: sequence ids per context (ours: SEQ, GRAVE and tree leaves)
BATCH = 512  # tokens per llama_decode call (n_batch = n_ubatch); larger forwards are split
PREFILL_ROWS = 32  # prompt chunks this long run without flash attention (LlamaCppCache.prefill_context)
KV_BYTES = 2  # bf16 K and V cells
GGML_TYPE_F16, GGML_TYPE_BF16 = 1, 30  # ggml.h's numbers (llama-cpp-python names only some)


def _llama():
    try:
        import llama_cpp
    except ImportError as e:
        raise ValueError("--dtype gguf runs the GGUF file through llama.cpp and needs llama-cpp-python: "
                         "pip install 'llama-cpp-python==0.3.36' (compiles llama.cpp, ~13 min on 2 cores)") from e
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp's load and context logs: errors only
    return llama_cpp


SEQ, GRAVE, FIRST_LEAF = 0, 1, 2  # sequence ids inside a slot's context


class _Context:
    """One slot's llama.cpp context: its KV cells, a batch buffer and the tree bookkeeping."""

    def __init__(self, runner: "LlamaCppRunner", cells: int, flash: bool = True, kv_type: int = GGML_TYPE_BF16):
        L = runner.llama
        cp = L.llama_context_default_params()
        cp.n_ctx = cells
        cp.n_batch = cp.n_ubatch = BATCH
        cp.n_seq_max = MAX_SEQ
        cp.n_threads = cp.n_threads_batch = runner.threads
        cp.kv_unified = True  # one cell pool for the sequence, its tree leaves and its graveyard
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        # bf16 K/V: llama.cpp's CPU flash attention then takes its one exact path for every forward.
        # With f16 or f32 K/V it splits a single row's cells across threads once there are 512 of
        # them, and tiles forwards of many rows, each summing in another order than a plain step.
        cp.type_k = cp.type_v = kv_type
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(runner.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.llama = L
        self.cells = cells
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(BATCH, 0, MAX_SEQ)
        self.tokens = np.ctypeslib.as_array(self.batch.token, shape=(BATCH,))
        self.pos = np.ctypeslib.as_array(self.batch.pos, shape=(BATCH,))
        self.n_seq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(BATCH,))
        self.logits = np.ctypeslib.as_array(self.batch.logits, shape=(BATCH,))
        self.seq_ids = [np.ctypeslib.as_array(self.batch.seq_id[i], shape=(MAX_SEQ,)) for i in range(BATCH)]
        self.graveyard = 0  # cells held by GRAVE
        # The last tree forward, until kept: (past_len, rows' first leaf ids, rows' leaf-id lists,
        # the leaf ids, each row's depth).
        self.pending: tuple[int, list[int], list[list[int]], list[int], list[int]] | None = None

    def clear(self) -> None:
        self.llama.llama_memory_clear(self.mem, False)
        self.graveyard = 0
        self.pending = None

    def drop_pending(self) -> None:
        """Forget a tree forward that was not kept: its cells are the tail, freed."""
        if self.pending is not None:
            for leaf in self.pending[3]:
                self.llama.llama_memory_seq_rm(self.mem, leaf, -1, -1)
            self.pending = None

    def free(self) -> None:
        if self.ctx:
            self.llama.llama_batch_free(self.batch)
            self.llama.llama_free(self.ctx)
            self.ctx = None


class LlamaCppCache(Seats):
    """The engine's KV cache on the llama.cpp runner: `num_slots` sequences, each in a llama.cpp
    context of its own (made when the slot is first used). Admission is accounted in blocks of
    `block_size` cells from the memory budget, like the paged cache's."""

    def __init__(self, runner: "LlamaCppRunner", num_slots: int, max_len: int, cells: int):
        super().__init__(num_slots, max_len, DEFAULT_BLOCK_SIZE)
        self.runner = runner
        self.llama = runner.llama
        self.device = torch.device("cpu")
        self.num_blocks = max(cells, max_len) // self.block_size
        # Each context: the longest sequence, room for its graveyard and one forward's cells.
        self.context_cells = -(-(max_len + max_len // 2 + BATCH) // 256) * 256
        self.memory_bytes = self.num_blocks * self.block_size * runner.kv_bytes_per_token
        self._contexts: list[_Context | None] = [None] * num_slots
        # Prompts are prefilled in one more context, without flash attention (see prefill).
        self._prefill: _Context | None = None
        self._prefill_owner: tuple[int, int] | None = None  # (slot, cells) it holds
        self._reserved = [0] * num_slots  # cells reserved per slot (tokens, graveyard included)
        self.tables: list[list[int]] = [[] for _ in range(num_slots)]  # (no paged blocks: always empty)
        self.queried_tokens = self.hit_tokens = self.evicted_blocks = self.cached_blocks = 0

    def __del__(self):
        for c in getattr(self, "_contexts", []) + [getattr(self, "_prefill", None)]:
            if c is not None:
                c.free()

    def context(self, slot: int) -> _Context:
        c = self._contexts[slot]
        if c is None:
            c = self._contexts[slot] = _Context(self.runner, self.context_cells)
        return c

    # ---- seats and accounting ----------------------------------------------------------------

    @property
    def used_blocks(self) -> int:
        return sum(self.blocks_for(n) for n in self._reserved)

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - self.used_blocks

    def allocate(self) -> int:
        slot = super().allocate()
        self.context(slot).clear()
        return slot

    def release(self, slot: int, scrub: bool = False) -> None:
        self._check_allocated(slot)
        self.context(slot).clear()
        self._reserved[slot] = 0
        self._vacate(slot)

    def reserve(self, slot: int, length: int) -> None:
        """Room for the sequence's first `length` cells (and its graveyard)."""
        c = self.context(slot)
        cells = length + c.graveyard
        if cells > c.cells - BATCH:
            raise KVCacheFull(f"the slot's llama.cpp context holds {c.cells - BATCH} cells; {cells} needed")
        need = self.blocks_for(cells) - self.blocks_for(self._reserved[slot])
        if need > 0 and need > self.free_blocks:
            raise KVCacheFull(f"{self.free_blocks} KV blocks free, {need} needed")
        self._reserved[slot] = max(self._reserved[slot], cells)

    # ---- prefix caching: not in this runner yet ----------------------------------------------

    def attach_prefix(self, slot: int, tokens: list[int], namespace: str = "") -> int:
        self.queried_tokens += len(tokens)
        return 0

    def publishable(self, slot: int, length: int) -> bool:
        return False

    def publish(self, slot: int, tokens: list[int]) -> None:
        pass

    # ---- forwards and trees ------------------------------------------------------------------

    def prefill_context(self, e: SeqBatchEntry) -> _Context | None:
        """The context to run a prompt chunk in (logits for its last row only), or None for the
        slot's own.

        llama.cpp's CPU flash attention, which the slot's context needs for exact tree rows, takes
        its plain per-row loop with bf16 K/V, and for a prompt of hundreds of rows that loop is
        slow (a 1,000-token prompt took 9.2 s against 7.0 s for llama.cpp's own defaults). So a
        chunk of at least PREFILL_ROWS rows that starts the sequence (or continues the chunk before
        it) runs in a shared context with llama.cpp's defaults (float16 K/V, no flash attention:
        7.3 s), and its cells are then copied into the slot's context, rounded to bfloat16. Every
        method prefills a prompt the same way, so `ar` and speculation still start from the same
        cache; verification and decoding run in the slot's context."""
        c = self.context(e.slot)
        if e.n < PREFILL_ROWS or c.graveyard or not (e.past_len == 0 or self._prefill_owner == (e.slot, e.past_len)):
            return None
        if self._prefill is None:
            self._prefill = _Context(self.runner, self.context_cells, flash=False, kv_type=GGML_TYPE_F16)
        if e.past_len == 0:
            self._prefill.clear()
        self._prefill_owner = (e.slot, e.past_len + e.n)
        return self._prefill

    def copy_prefill(self, slot: int) -> None:
        """The prefill context's cells of the sequence into the slot's context (in position order)."""
        L, src, dst = self.llama, self._prefill, self.context(slot)
        size = L.llama_state_seq_get_size(src.ctx, SEQ)
        buf = (ctypes.c_uint8 * size)()
        if L.llama_state_seq_get_data(src.ctx, buf, size, SEQ) != size:
            raise RuntimeError("llama.cpp could not read a prefilled sequence's state")
        state = _prefill_state_for_decoding(np.frombuffer(buf, dtype=np.uint8))
        out = (ctypes.c_uint8 * len(state)).from_buffer(state)
        if L.llama_state_seq_set_data(dst.ctx, out, len(state), SEQ) != len(state):
            raise RuntimeError("llama.cpp could not write a prefilled sequence's state")

    def keep(self, slot: int, past_len: int, accepted: list[int]) -> None:
        """Keep the accepted nodes (a path from the root, by row) as the sequence's next cells."""
        L, c = self.llama, self.context(slot)
        end = past_len + len(accepted)
        pending = c.pending
        if pending is not None and pending[0] == past_len:
            _, first_leaf, row_leaves, leaves, depths = pending
            # The cells holding the leaf under the last accepted node, at the path's positions,
            # are the path's nodes.
            L.llama_memory_seq_cp(c.mem, first_leaf[accepted[-1]], SEQ, past_len, end)
            # Rejected rows before the last accepted one lie among kept cells: each leaf's such
            # cells (its ancestors in rows up to that one: a prefix of its depths) go to the graveyard.
            last = max(accepted)
            deepest: dict[int, int] = {}
            for row in range(last + 1):
                for leaf in row_leaves[row]:
                    deepest[leaf] = max(deepest.get(leaf, -1), depths[row])
            for leaf, depth in deepest.items():
                L.llama_memory_seq_cp(c.mem, leaf, GRAVE, past_len, past_len + depth + 1)
            c.graveyard += last + 1 - len(accepted)
        c.drop_pending()
        L.llama_memory_seq_rm(c.mem, SEQ, end, -1)  # a chain's rejected tail
        self._reserved[slot] = max(self._reserved[slot], end + c.graveyard)

    def prepare(self, e: SeqBatchEntry) -> list[list[int]]:
        """The sequence ids of each of the entry's new rows, after freeing what the slot held past
        `e.past_len` (a tree not kept, a timing forward: the tail of its cells)."""
        L, c = self.llama, self.context(e.slot)
        c.drop_pending()
        L.llama_memory_seq_rm(c.mem, SEQ, e.past_len, -1)
        mask = e.tree_mask
        if mask is None or e.n == 1 or bool(torch.equal(mask, _tril(e.n))):
            return [[SEQ]] * e.n
        m = mask.numpy()
        leaves = np.flatnonzero(m.sum(0) == 1)  # ancestors of no other node
        if FIRST_LEAF + len(leaves) > MAX_SEQ:
            raise KVCacheFull(f"a tree of {len(leaves)} leaves needs more sequence ids than llama.cpp has ({MAX_SEQ})")
        ids = np.arange(FIRST_LEAF, FIRST_LEAF + len(leaves))
        below = m[leaves]  # [leaves, n]: which rows lie on each leaf's path
        rows = [ids[below[:, j]].tolist() for j in range(e.n)]
        for leaf in ids.tolist():
            L.llama_memory_seq_cp(c.mem, SEQ, leaf, 0, e.past_len)
        c.pending = (e.past_len, [r[0] for r in rows], rows, ids.tolist(), (m.sum(1) - 1).tolist())
        return rows


def _prefill_state_for_decoding(state: np.ndarray) -> np.ndarray:
    """A sequence's state as the prefill context writes it (float16 K/V, V stored transposed: per
    layer, each V element across the cells) turned into what a slot's context reads (bfloat16, V
    by cell like K): llama.cpp's reader requires both to match its own cache. The layout is
    llama_kv_cache::state_write's for one stream of a model without per-cell extras."""
    u32 = lambda at: int(state[at:at + 4].view(np.uint32)[0])  # noqa: E731
    at = 8  # magic, seq id
    if u32(at) != 1:
        raise RuntimeError("unexpected llama.cpp state: more than one stream")
    cells = u32(at + 4)
    at += 8 + 12 * cells  # stream count, cell count; per cell: pos, 1 seq id, the id
    if u32(at) != 1:
        raise RuntimeError("unexpected llama.cpp state: V is not transposed")
    layers = u32(at + 4)
    head = bytearray(state[:at].tobytes()) + np.array([0, layers], dtype=np.uint32).tobytes()
    at += 8
    parts = [bytes(head)]
    bf16 = np.array([GGML_TYPE_BF16], dtype=np.int32).tobytes()
    for _ in range(layers):  # K: type, row size, rows
        if u32(at) != GGML_TYPE_F16:
            raise RuntimeError("unexpected llama.cpp state: K is not float16")
        row = int(state[at + 4:at + 12].view(np.uint64)[0])
        parts.append(bf16 + state[at + 4:at + 12].tobytes())
        parts.append(_f16_to_bf16(state[at + 12:at + 12 + cells * row]))
        at += 12 + cells * row
    for _ in range(layers):  # V transposed: type, element size, elements per cell, then by element
        el, n_embd = u32(at + 4), u32(at + 8)
        if u32(at) != GGML_TYPE_F16 or el != 2:
            raise RuntimeError("unexpected llama.cpp state: V is not float16")
        block = state[at + 12:at + 12 + n_embd * cells * el].view(np.uint16).reshape(n_embd, cells)
        parts.append(bf16 + np.array([n_embd * el], dtype=np.uint64).tobytes())
        parts.append(_f16_to_bf16(np.ascontiguousarray(block.T)))
        at += 12 + n_embd * cells * el
    if at != len(state):
        raise RuntimeError("unexpected llama.cpp state layout")
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy()


def _f16_to_bf16(data: np.ndarray) -> bytes:
    """float16 values (raw bytes or uint16) as bfloat16 bytes, rounded to nearest even."""
    return torch.from_numpy(data.view(np.float16).copy()).to(torch.bfloat16).view(torch.int16).numpy().tobytes()


_TRILS: dict[int, torch.Tensor] = {}


def _tril(n: int) -> torch.Tensor:
    if n not in _TRILS:
        _TRILS[n] = torch.ones(n, n, dtype=torch.bool).tril_()
    return _TRILS[n]


class LlamaCppRunner(Runner):
    """A GGUF file run by llama.cpp on the CPU (see the module's docstring)."""

    runner = "llama.cpp"

    def __init__(self, gguf: Path, hf_config: dict, threads: int = 0):
        self.llama = L = _llama()
        super().__init__(ModelConfig.from_transformers(transformers_config(hf_config)), torch.device("cpu"),
                         torch.float32)
        self.path = Path(gguf)
        self.threads = threads or torch.get_num_threads() or os.cpu_count() or 1
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = False  # no weight repacking: its 4-row tiles round unlike single rows
        self.model = L.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {self.path}")
        self.vocab_size = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        desc = ctypes.create_string_buffer(256)
        L.llama_model_desc(self.model, desc, len(desc))
        self.quantization = desc.value.decode(errors="replace").split()[-1]  # e.g. "llama 135M Q4_1": Q4_1
        c = self.config
        self.kv_bytes_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * KV_BYTES

    def __del__(self):
        if getattr(self, "model", None):
            self.llama.llama_model_free(self.model)
            self.model = None

    def new_cache(self, num_slots: int, max_len: int, memory: int | None = None) -> LlamaCppCache:
        cells = num_slots * max_len
        if memory is not None:
            cells = min(cells, memory // self.kv_bytes_per_token)
        return LlamaCppCache(self, num_slots, max_len, cells)

    def compile(self) -> None:
        raise ValueError("--compile is for the native runner on CUDA; the llama.cpp runner has nothing to compile")

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, batch: list[SeqBatchEntry],
                cache: LlamaCppCache, logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The native runner's contract: fp32 logits [len(logit_rows), vocab] (all rows when None).
        One llama_decode per sequence (each has its own context) and per BATCH of its rows."""
        n_rows = tokens.shape[0]
        want = np.zeros(n_rows, dtype=bool)
        if logit_rows is None:
            want[:] = True
        else:
            want[logit_rows.cpu().numpy()] = True
        toks = tokens.cpu().numpy()
        pos = positions.cpu().numpy()
        out = []
        start = 0
        for e in batch:
            seqs = cache.prepare(e)
            last_only = want[start + e.n - 1] and not want[start:start + e.n - 1].any()
            prefill = cache.prefill_context(e) if last_only else None
            c = prefill or cache.context(e.slot)
            for lo in range(0, e.n, BATCH):
                hi = min(e.n, lo + BATCH)
                a, b = start + lo, start + hi
                logits = self._decode(c, toks[a:b], pos[a:b], seqs[lo:hi], want[a:b])
                if logits is not None:
                    out.append(logits)
            if prefill is not None:
                cache.copy_prefill(e.slot)
            start += e.n
        logits = torch.from_numpy(np.concatenate(out) if len(out) > 1 else out[0])
        if logit_rows is not None:
            # The flagged rows come back in row order; the caller's order may differ.
            rank = torch.empty(n_rows, dtype=torch.long)
            rank[torch.from_numpy(np.flatnonzero(want))] = torch.arange(logits.shape[0])
            logits = logits[rank[logit_rows.cpu()]]
        return logits

    def _decode(self, c: _Context, toks, pos, seqs, want) -> np.ndarray | None:
        n = len(toks)
        c.batch.n_tokens = n
        c.tokens[:n] = toks
        c.pos[:n] = pos
        c.logits[:n] = want
        for i, ids in enumerate(seqs):
            c.n_seq[i] = len(ids)
            c.seq_ids[i][:len(ids)] = ids
        rc = self.llama.llama_decode(c.ctx, c.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) on a forward of {n} tokens")
        k = int(want.sum())
        if k == 0:
            return None
        return np.ctypeslib.as_array(self.llama.llama_get_logits(c.ctx), shape=(k, self.vocab_size)).copy()
