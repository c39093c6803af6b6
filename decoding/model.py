"""The native model runner: a decoder whose KV cache, positions and attention mask are arguments of forward.

Tree verification needs exactly that: every draft node is written into the cache at an explicit
position (past length + depth) and attends to the past plus its own ancestors. `Model` is the
Llama-family runner (Llama 1-3, Mistral, Qwen2) and reads top to bottom in this file; the other
families (`decoding/families/`) are small subclasses that override one hook each where they
differ (norm, q/k post-processing, feed-forward, embedding scale, logits, RoPE per layer type).
Weights come from a Hugging Face state dict, with q/k/v and gate/up fused so that each layer is
four matrix products.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from decoding import cpu_linear
from decoding.kv_cache import DEFAULT_BLOCK_SIZE, KVCache, bytes_per_token


def transformers_config(hf: dict):
    """transformers' own config class for a checkpoint's config.json: it fills in each family's
    defaults and reads every spelling a checkpoint may use (rope_scaling or rope_parameters,
    rope_local_base_freq, sliding_window_pattern, ...), so the runners read one."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**hf)


@dataclass(slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    model_type: str

    @classmethod
    def from_transformers(cls, c) -> "ModelConfig":
        heads = c.num_attention_heads
        return cls(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            intermediate_size=getattr(c, "intermediate_size", 0),
            rms_norm_eps=getattr(c, "rms_norm_eps", 1e-6),
            max_position=getattr(c, "max_position_embeddings", 4096),
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            model_type=c.model_type,
        )


@dataclass(slots=True)
class SeqBatchEntry:
    """One sequence's share of a batched forward: rows [start, start + n) of the flat inputs."""

    slot: int
    past_len: int  # tokens already in this slot's cache
    n: int  # new tokens this forward (prefill chunk, chain or tree)
    tree_mask: torch.Tensor | None  # [n, n] bool, None = causal among the new tokens

    def new_rows_mask(self) -> torch.Tensor:
        """[n, n] bool: which new rows each new row sees (its tree ancestors, or causal)."""
        return self.tree_mask if self.tree_mask is not None else torch.ones(self.n, self.n, dtype=torch.bool).tril_()


@dataclass(slots=True)
class AttentionPlan:
    """How one forward's rows meet the paged KV cache, worked out once and shared by every layer.

    Every new row's K/V go to (block, offset) of its sequence's table in one indexed write per
    layer. Attention then runs either as one call for a group of sequences (`batched`): queries
    padded to [sequences, n_max], keys read as [sequences, kv_heads, l_max, hd] (in place from the
    seats' home blocks, or gathered from the tables), and a [sequences, 1, n_max, l_max] mask that
    lets each row see its own past and its tree ancestors; or as one call per sequence over its
    blocks, a plain view of the pool when they are consecutive there, else one call per run. A
    plan may also be made of `parts`, each a plan of its own for some of the sequences (on a CPU:
    neighbouring seats of similar length batched together, the rest one call each).
    """

    row_block: torch.Tensor | None  # [N] block of each new row's cell (the whole forward's plan)
    row_off: torch.Tensor | None  # [N] offset in that block
    row_seq: torch.Tensor | None  # [N] (CPU) its entry in a batched call's padded batch
    row_cell: torch.Tensor | None  # [N] (CPU) its cell in the sequence (past_len + i)
    batched: bool
    n_max: int = 0
    l_max: int = 0
    q_index: torch.Tensor | None = None  # [N] batched: each row's place in the padded [sequences * n_max] queries
    tables: torch.Tensor | None = None  # [sequences, blocks] batched: the tables, padded
    mask: torch.Tensor | None = None  # [seats, 1, n_max, l_max] bool (batched) ...
    masks: list[torch.Tensor | None] | None = None  # ... or per sequence [n, past + n] (None: one row)
    # per sequence: its cells as runs of consecutive blocks, (first block, blocks, first cell, end cell)
    runs: list[list[tuple[int, int, int, int]]] | None = None
    seats: int = 0  # batched: entries of the padded batch (sequences, or seats lo..hi when at home)
    home: int | None = None  # batched at home: the first seat's home block; seats are home_stride blocks apart
    home_stride: int = 0
    # composite: (its rows among the forward's [N], its batch entries, their plan)
    parts: list[tuple[torch.Tensor, list[SeqBatchEntry], AttentionPlan]] | None = None
    # cells (the CPU kernel's attention): every row's cells, the whole forward in one call per layer
    # of `kernel`, the library the runner chose (Runner.cells_kernel)
    rows: cpu_linear.CellRows | None = None
    kernel: ctypes.CDLL | None = None

    @property
    def calls(self) -> int:
        """Attention calls per layer."""
        if self.rows is not None:
            return 1
        if self.parts is not None:
            return sum(part.calls for _, _, part in self.parts)
        return 1 if self.batched else len(self.masks)


# What one attention call costs on a CPU, in units of one cached token read for one sequence
# (its K and V for every KV head), from timings of the CPU flash kernel on a 2-core AVX2 EPYC:
# time ~ 4 us + 0.115 us x sequences x keys x (1 + 0.26 x (query rows - 1)), plus ~30 us of
# Python and small ops around each call and ~30 us more for each part of a split batch (its
# rows gathered and scattered back). The kernel reads every key of the padded batch, masked or
# not: a batch that pads many short sequences to one long one reads mostly padding.
CALL_COST = 600.0
ROW_COST = 0.26


def _at_home(e: SeqBatchEntry, runs: list[tuple[int, int, int, int]], cache: KVCache) -> bool:
    """Whether the sequence's cells are one run of the pool from its seat's home block."""
    return len(runs) == 1 and runs[0][0] == cache.home(e.slot)


def _segments(batch: list[SeqBatchEntry], runs: list[list[tuple[int, int, int, int]]],
              cache: KVCache) -> list[list[int]]:
    """CPU grouping of a batch into attention calls: entries (indices into `batch`) that sit at
    their seat's home are cut, in seat order, into runs of neighbouring seats read in place as one
    batched call, where that costs less than separate calls (CALL_COST, ROW_COST); every other
    entry is a group of one. Minimum-cost cut by dynamic programming over the seat order."""
    at_home = sorted((i for i, (e, r) in enumerate(zip(batch, runs)) if _at_home(e, r, cache)),
                     key=lambda i: batch[i].slot)
    home_set = set(at_home)
    singles = [[i] for i in range(len(batch)) if i not in home_set]
    m = len(at_home)
    best, cut = [0.0] + [float("inf")] * m, [0] * (m + 1)
    for j in range(1, m + 1):
        last = batch[at_home[j - 1]]
        n_max = l_max = 0
        for i in range(j, 0, -1):  # the group at_home[i - 1 .. j - 1]
            e = batch[at_home[i - 1]]
            n_max, l_max = max(n_max, e.n), max(l_max, e.past_len + e.n)
            if i == j:  # one sequence: its own call, no padding
                cost = CALL_COST + l_max * (1 + ROW_COST * (n_max - 1))
            elif cache.home(last.slot) + cache.blocks_for(l_max) > cache.num_blocks:
                continue  # the strided view would run past the pool
            else:
                cost = CALL_COST + (last.slot - e.slot + 1) * l_max * (1 + ROW_COST * (n_max - 1))
            if best[i - 1] + cost < best[j]:
                best[j], cut[j] = best[i - 1] + cost, i - 1
    groups, j = [], m
    while j > 0:
        groups.append(at_home[cut[j]:j])
        j = cut[j]
    return groups[::-1] + singles


def plan_attention(batch: list[SeqBatchEntry], cache: KVCache, device: torch.device,
                   mode: str = "auto", cells: ctypes.CDLL | None = None) -> AttentionPlan:
    """Reserve the cells this forward writes and plan its attention. cells (a runner's auto where it
    has the CPU kernel's attention, Runner.cells_kernel): one call of that library's attention
    (`cpu_linear.attend`) for every row of the forward, each reading its own cells in place,
    whatever the mode; else batched: one SDPA call;
    per-sequence: one per sequence; auto: one batched call on an accelerator (per-sequence calls
    are launch-bound there), and on a CPU the cheapest grouping by `_segments`: a batched call
    must read its K/V in place (gathering them costs more than the calls it saves) and reads every
    sequence padded to the longest, so sequences of very different lengths, or a tree among
    single rows, are better apart (bench/attention.py, docs/attention_cpu.txt)."""
    blocks, offsets = [], []
    for e in batch:
        cache.reserve(e.slot, e.past_len + e.n)
        b, o = cache.cells(e.slot, e.past_len, e.n)
        blocks += b
        offsets += o
    row_block, row_off = torch.tensor(blocks, device=device), torch.tensor(offsets, device=device)
    if cells is not None:
        rows = cpu_linear.CellRows.of([(cache.tables[e.slot][:cache.blocks_for(e.past_len + e.n)], e.past_len, e.n,
                                        None if e.tree_mask is None else e.tree_mask.cpu()) for e in batch])
        return AttentionPlan(row_block, row_off, None, None, False, rows=rows, kernel=cells)
    runs = [cache.runs(e.slot, e.past_len + e.n) for e in batch]
    if mode == "auto" and device.type == "cpu" and len(batch) > 1:
        groups = _segments(batch, runs, cache)
        if len(groups) > 1 and any(len(g) > 1 for g in groups):
            starts = [0]
            for e in batch:
                starts.append(starts[-1] + e.n)
            parts, singles = [], []
            for g in groups:
                if len(g) == 1:
                    singles += g
                else:
                    parts.append((g, _batched_plan([batch[i] for i in g], [runs[i] for i in g], cache, device)))
            if singles:
                singles.sort()
                parts.append((singles, _per_sequence_plan([batch[i] for i in singles], [runs[i] for i in singles],
                                                          device)))
            parts = [(torch.tensor([r for i in g for r in range(starts[i], starts[i + 1])], device=device),
                      [batch[i] for i in g], part) for g, part in parts]
            return AttentionPlan(row_block, row_off, None, None, True, parts=parts)
        batched = len(groups) == 1
    elif mode == "auto":
        batched = len(batch) > 1
    else:
        batched = mode == "batched"
    plan = _batched_plan(batch, runs, cache, device) if batched else _per_sequence_plan(batch, runs, device)
    plan.row_block, plan.row_off = row_block, row_off
    return plan


def _per_sequence_plan(batch: list[SeqBatchEntry], runs: list[list[tuple[int, int, int, int]]],
                       device: torch.device) -> AttentionPlan:
    masks = []
    for e in batch:
        if e.tree_mask is None and e.n == 1:
            masks.append(None)
            continue
        m = torch.ones(e.n, e.past_len + e.n, dtype=torch.bool)
        m[:, e.past_len:] = e.new_rows_mask()
        masks.append(m.to(device))
    row_seq = torch.tensor([j for j, e in enumerate(batch) for _ in range(e.n)])
    row_cell = torch.tensor([e.past_len + i for e in batch for i in range(e.n)])
    return AttentionPlan(None, None, row_seq, row_cell, False, masks=masks, runs=runs)


def _batched_plan(batch: list[SeqBatchEntry], runs: list[list[tuple[int, int, int, int]]], cache: KVCache,
                  device: torch.device) -> AttentionPlan:
    n_max = max(e.n for e in batch)
    l_max = max(e.past_len + e.n for e in batch)
    lo, hi = min(e.slot for e in batch), max(e.slot for e in batch)
    width = cache.blocks_for(l_max)
    at_home = (all(_at_home(e, r, cache) for r, e in zip(runs, batch))
               and cache.home(hi) + width <= cache.num_blocks)
    if at_home:
        # Every sequence is one run from its seat's home block: the seats lo..hi are one strided
        # view of the pool, as slots were (no copy). Cells read there beyond a sequence's own
        # (masked) must be finite.
        seats = hi - lo + 1
        for seat in range(lo, hi + 1):
            cache.make_finite(cache.home(seat), width)
        position = [e.slot - lo for e in batch]
        home, tables = cache.home(lo), None
    else:
        # Padding table entries repeat the sequence's own last block: cells read there are masked,
        # and a block in use holds finite values.
        seats, position, home = len(batch), list(range(len(batch))), None
        tables = torch.tensor([t + [t[-1]] * (width - len(t))
                               for t in (cache.tables[e.slot][:cache.blocks_for(e.past_len + e.n)] for e in batch)])
        tables = tables.to(device)
    mask = torch.zeros(seats, 1, n_max, l_max, dtype=torch.bool)
    mask[:, 0, :, 0] = True  # padding rows see one cell, so no row is all -inf (their output is dropped)
    q_index = []
    for s, e in zip(position, batch):
        q_index.extend(range(s * n_max, s * n_max + e.n))
        m = mask[s, 0, :e.n]
        m[:, :e.past_len] = True
        m[:, e.past_len:e.past_len + e.n] = e.new_rows_mask()
    row_seq = torch.tensor([s for s, e in zip(position, batch) for _ in range(e.n)])
    row_cell = torch.tensor([e.past_len + i for e in batch for i in range(e.n)])
    return AttentionPlan(None, None, row_seq, row_cell, True, n_max, l_max,
                         torch.tensor(q_index, device=device), tables, mask.to(device), seats=seats, home=home,
                         home_stride=cache.home_stride)


def _additive(masks, dtype: torch.dtype):
    """Boolean masks (a tensor, None, or a list of those, nested as a plan's parts are) as additive
    biases: 0 where a row sees a key, -inf where it does not. SDPA makes exactly this of a boolean
    mask on every call, that is once per layer; a forward makes it once (LayerAttention)."""
    if masks is None:
        return None
    if isinstance(masks, list):
        return [_additive(m, dtype) for m in masks]
    return torch.zeros(masks.shape, dtype=dtype, device=masks.device).masked_fill_(~masks, float("-inf"))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float | None,
          softcap: float | None) -> torch.Tensor:
    """q [B, heads, n, hd], k/v [B, kv_heads, L, hd] (grouped-query), bias [.., n, L] additive
    (0 or -inf, see _additive) or None (every row sees every key). softcap: logits -> softcap *
    tanh(logits / softcap) before the softmax (Gemma 2), which SDPA cannot do, so that case runs
    as plain products."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: list[SeqBatchEntry],
              plan: AttentionPlan, masks: list | torch.Tensor, scale: float | None = None,
              softcap: float | None = None) -> torch.Tensor:
    """q: [N, heads, hd] for the new rows, whose K/V are already in the pool ([kv_heads, blocks,
    block_size, hd]); returns [N, heads * hd]. masks: the plan's masks as additive biases
    (LayerAttention._biases), or a variant of them (a sliding window's) in the same layout."""
    heads, hd = q.shape[1:]
    kv_heads = k_pool.shape[0]
    if plan.parts is not None:
        out = q.new_empty(q.shape[0], heads * hd)
        for p, (rows, entries, part) in enumerate(plan.parts):
            out[rows] = attention(q[rows], k_pool, v_pool, entries, part, masks[p], scale, softcap)
        return out
    if plan.batched:
        seats = plan.seats
        padded = q.new_zeros(seats * plan.n_max, heads, hd)
        padded[plan.q_index] = q

        def keys(pool):  # [seats, kv_heads, l_max, hd]
            if plan.home is not None:  # seats' home runs, one strided view
                blocks, block, _ = pool.shape[1:]
                return pool.as_strided((seats, kv_heads, plan.l_max, hd),
                                       (plan.home_stride * block * hd, blocks * block * hd, hd, 1),
                                       pool.storage_offset() + plan.home * block * hd)
            # gathered: [kv_heads, seats, width, block, hd] -> [seats, kv_heads, l_max, hd] (a view of the copy)
            return pool[:, plan.tables].permute(1, 0, 2, 3, 4).reshape(seats, kv_heads, -1, hd)[:, :, :plan.l_max]

        o = _sdpa(padded.view(seats, plan.n_max, heads, hd).transpose(1, 2),  # [seats, heads, n_max, hd]
                  keys(k_pool), keys(v_pool), masks, scale, softcap)  # [seats, heads, n_max, hd]
        return o.transpose(1, 2).reshape(seats * plan.n_max, heads * hd)[plan.q_index]

    outs, start = [], 0
    for e, mask, runs in zip(batch, masks, plan.runs):
        end, total = start + e.n, e.past_len + e.n
        if len(runs) == 1 or (k_pool.device.type != "cpu" or softcap is not None):
            o = _sdpa(q[start:end].transpose(0, 1).unsqueeze(0),  # [1, heads, n, hd]
                      _cells(k_pool, runs, total), _cells(v_pool, runs, total), mask, scale, softcap)
            outs.append(o[0].transpose(0, 1).reshape(e.n, heads * hd))
        else:
            outs.append(_attention_over_runs(q[start:end], k_pool, v_pool, runs, mask, scale))
        start = end
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _cells(pool: torch.Tensor, runs: list[tuple[int, int, int, int]], total: int) -> torch.Tensor:
    """[1, kv_heads, total, hd]: a sequence's K or V, a view of the pool when its blocks are one
    run, else gathered."""
    kv_heads, hd = pool.shape[0], pool.shape[-1]
    if len(runs) == 1:
        first, count, _, _ = runs[0]
        return pool[:, first:first + count].reshape(kv_heads, -1, hd)[None, :, :total]
    blocks = torch.tensor([b for first, count, _, _ in runs for b in range(first, first + count)], device=pool.device)
    return pool[:, blocks].reshape(kv_heads, -1, hd)[None, :, :total]


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _attention_over_runs(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                         runs: list[tuple[int, int, int, int]], mask: torch.Tensor | None,
                         scale: float | None) -> torch.Tensor:
    """One sequence whose blocks lie in several runs of the pool (a shared prefix, then its own):
    attention over each run as a view, merged by the runs' log-sum-exps, so no K/V is copied.
    q [n, heads, hd] -> [n, heads * hd]; mask: additive [n, cells], or None. The query heads
    sharing a KV head are folded into rows (grouped-query attention without expanding K/V)."""
    n, heads, hd = q.shape
    kv_heads = k_pool.shape[0]
    group = heads // kv_heads
    folded = q.view(n, kv_heads, group, hd).permute(1, 2, 0, 3).reshape(1, kv_heads, group * n, hd)
    outs, lses = [], []
    for first, count, c0, c1 in runs:
        k = k_pool[:, first:first + count].reshape(kv_heads, -1, hd)[None, :, :c1 - c0]
        v = v_pool[:, first:first + count].reshape(kv_heads, -1, hd)[None, :, :c1 - c0]
        part = None if mask is None else mask[:, c0:c1].repeat(group, 1)  # [group * n, cells] additive
        o, lse = _flash_cpu(folded, k, v, attn_mask=part, scale=scale)  # [1, kv_heads, group * n, hd], [1, kv_heads, group * n]
        if part is not None:
            seen = (part == 0).any(-1)  # a row that sees nothing here gets weight 0 (the kernel reports lse 0)
            lse = lse.masked_fill(~seen, float("-inf"))
            o = o.masked_fill(~seen[:, None], 0.0)
        outs.append(o)
        lses.append(lse)
    weights = torch.softmax(torch.stack(lses).float(), dim=0).to(q.dtype)  # [runs, 1, kv_heads, group * n]
    o = (torch.stack(outs) * weights[..., None]).sum(0)  # [1, kv_heads, group * n, hd]
    return o.view(kv_heads, group, n, hd).permute(2, 0, 1, 3).reshape(n, heads * hd)


class LayerAttention:
    """One forward's attention, layer by layer: `attend(layer, q, k, v)` writes the new rows' K/V
    into the cache and returns their attention output. The model families call only this, so how
    K/V are stored stays behind it.

    Options a family may pass: scale (default 1/sqrt(head_dim)), window (a sliding window: a row
    at position p sees keys at positions > p - window) and softcap (attention-logit soft-capping)."""

    def __init__(self, cache: KVCache, batch: list[SeqBatchEntry], plan: AttentionPlan, positions: torch.Tensor):
        self.cache, self.batch, self.plan = cache, batch, plan
        self.positions = positions  # [N] the new rows' positions (a tree node's: past + depth)
        self._biases_made: dict[int | None, list | torch.Tensor | None] = {}

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                 window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        plan = self.plan
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]  # [kv_heads, blocks, block_size, hd]
        k_pool[:, plan.row_block, plan.row_off] = k.transpose(0, 1)  # each row's K/V into its cell
        v_pool[:, plan.row_block, plan.row_off] = v.transpose(0, 1)
        if plan.rows is not None:
            if window is not None or softcap is not None:
                raise ValueError("the CPU kernel's attention has no sliding window or soft-capping")
            return cpu_linear.attend(plan.kernel, q, k_pool, v_pool, plan.rows,
                                     scale if scale is not None else q.shape[-1] ** -0.5)
        return attention(q, k_pool, v_pool, self.batch, plan, self._biases(window, q.dtype), scale, softcap)

    def _biases(self, window: int | None, dtype: torch.dtype):
        """The plan's masks, or a sliding window's (see `_windowed`), as additive biases, made once
        per forward for every layer."""
        if window not in self._biases_made:
            masks = (_plan_masks(self.plan) if window is None
                     else _windowed(self.plan, self.batch, self.positions.cpu(), window, self.cache.device))
            self._biases_made[window] = _additive(masks, dtype)
        return self._biases_made[window]


def _plan_masks(plan: AttentionPlan):
    """The plan's boolean masks: its batched call's, its per-sequence calls', or a list of its
    parts' masks."""
    if plan.parts is not None:
        return [_plan_masks(part) for _, _, part in plan.parts]
    return plan.mask if plan.batched else plan.masks


def _windowed(plan: AttentionPlan, batch: list[SeqBatchEntry], positions: torch.Tensor, window: int,
              device: torch.device):
    """The plan's masks with keys at positions <= p - window hidden from a row at position p.
    A past cell's position is its index; a new row's (a tree node's) is its own position."""
    if plan.parts is not None:
        return [_windowed(part, entries, positions[rows.cpu()], window, device) for rows, entries, part in plan.parts]
    if plan.batched:
        seqs = plan.seats
        qpos = torch.zeros(seqs * plan.n_max, dtype=torch.long)
        qpos[plan.q_index.cpu()] = positions
        kpos = torch.arange(plan.l_max).repeat(seqs, 1)  # [seqs, l_max]
        kpos[plan.row_seq, plan.row_cell] = positions
        near = kpos[:, None, None, :] > qpos.view(seqs, 1, plan.n_max, 1) - window
        padding = torch.ones(seqs * plan.n_max, dtype=torch.bool)
        padding[plan.q_index.cpu()] = False
        near[:, 0, :, 0] |= padding.view(seqs, plan.n_max)  # they keep their one cell (see plan_attention)
        return plan.mask & near.to(device)
    masks, start = [], 0
    for e, m in zip(batch, plan.masks):
        pos = positions[start:start + e.n]
        kpos = torch.cat([torch.arange(e.past_len), pos])
        near = (kpos[None, :] > pos[:, None] - window).to(device)
        masks.append(near if m is None else m & near)
        start += e.n
    return masks


class Rope:
    """cos/sin of rotary embeddings at given positions, for one set of transformers' RoPE
    parameters (every rope_type it knows: default, llama3, yarn, longrope, ...; `layer_type` for
    families whose layer types differ, Gemma 3's local and global layers).

    LongRoPE (Phi-3/4) has two frequency sets: short below original_max_position_embeddings, long
    from there on. Here each row picks by its own position (long from the original maximum on),
    which keeps a row's result independent of the rows beside it (lossless speculation needs
    that) and equals transformers' forward token by token over its cache. transformers' Phi-3
    `generate` differs once a sequence first passes the original maximum: it then recomputes the
    whole cache with the long set, while our cached K/V of earlier positions keep the short one.
    Sequences within the original context (4096 tokens for Phi-3-mini-128k) are identical."""

    def __init__(self, config, device: torch.device, dtype: torch.dtype, layer_type: str | None = None):
        params = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
        rope_type = params.get("rope_type", params.get("type", "default"))
        extra = {} if layer_type is None else {"layer_type": layer_type}
        self.long_from: int | None = None  # LongRoPE: rows at this position or later use long_inv_freq
        self.long_inv_freq: torch.Tensor | None = None
        if rope_type == "default":
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            dim = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
            theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(f"unsupported rope type {rope_type!r}")
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **extra)
            if rope_type == "longrope":
                self.long_from = params["original_max_position_embeddings"]
                long, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=self.long_from + 1, **extra)
                self.long_inv_freq = long.float().to(device)
        self.inv_freq = inv_freq.float().to(device)  # [rotary_dim / 2]
        self.scaling = float(scaling)
        self.dtype = dtype

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> cos, sin [N, 1, rotary_dim]."""
        inv_freq = self.inv_freq[None, :]  # [1, rotary_dim / 2]
        if self.long_from is not None:
            inv_freq = torch.where((positions >= self.long_from)[:, None], self.long_inv_freq, inv_freq)
        freqs = positions.float()[:, None] * inv_freq  # [N, rotary_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [N, rotary_dim]
        return ((emb.cos() * self.scaling).to(self.dtype)[:, None, :],
                (emb.sin() * self.scaling).to(self.dtype)[:, None, :])


def _mkldnn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


class Linear:
    """y = x W^T + b, with W packed once for a CPU fp32 kernel.

    Why: a plain fp32 GEMM on CPU repacks W on every call, so a 4-row product costs about twice a
    1-row one, and its result for a row depends on how many rows are in the batch. Our AVX2 kernel
    (`decoding/cpu_linear.py`), or where it cannot be built oneDNN's prepacked one (packed for 16
    rows), costs little more for 16 rows than for 1 and gives every row bit-identical results
    whatever the batch size, which is what lets a tree forward reproduce plain decoding token for
    token. Same fp32 arithmetic, so no change of numerics to flag.
    """

    PACK_ROWS = 16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.bias = None if bias is None else bias.contiguous()
        self.out_features, self.in_features = weight.shape
        self.kernel = cpu_linear.kernel_for(weight.device, weight.dtype)
        self.packed = self.kernel is not None or _mkldnn_usable(weight.device, weight.dtype)
        if self.kernel is not None:
            self.weight = cpu_linear.pack(weight)
        elif self.packed:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, self.PACK_ROWS)
        else:
            self.weight = weight
        # A GGUF file's blocks in place of weight (decoding/gguf_blocks.py): their format
        # ("q4_1", "q8_0") and the kernel's panels of them.
        self.blocks: tuple[str, torch.Tensor] | None = None

    def use_blocks(self, fmt: str, panels: torch.Tensor) -> None:
        """Run on a GGUF file's blocks (cpu_linear.pack_q4 / pack_q8) whose weights equal this
        product's, dropping the float32 copy: the same outputs from a fraction of the bytes."""
        self.blocks, self.weight = (fmt, panels), None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is not None:
            fmt, panels = self.blocks
            return cpu_linear.linear_blocks(self.kernel, fmt, x, panels, self.out_features, self.in_features, self.bias)
        if self.kernel is not None:
            return cpu_linear.linear(self.kernel, x, self.weight, self.out_features, self.bias)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Checkpoint:
    """A state dict's tensors, moved to the model's device and dtype when a runner takes them."""

    def __init__(self, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        self.state, self.device, self.dtype = state, device, dtype

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def __call__(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.state:
            raise ValueError(f"weight {name!r} missing from the checkpoint")
        source = self.state[name]
        tensor = source.to(device=self.device, dtype=dtype or self.dtype).contiguous()
        if tensor.data_ptr() == source.data_ptr():
            # Its own memory, not a view of the loaded weights: those are a map of the whole
            # safetensors file, which one view (the embeddings) would keep mapped and resident
            # (~0.5 GB on the default model) after the engine has dropped the state dict.
            tensor = tensor.clone()
        return tensor

    def linear(self, *names: str) -> Linear:
        """One Linear over the named projections' weights (and biases, where the checkpoint has
        them) stacked along the output: q/k/v or gate/up fused into one matrix product."""
        weight = torch.cat([self(n + ".weight") for n in names])
        biases = [n + ".bias" for n in names if n + ".bias" in self]
        if biases and len(biases) != len(names):
            raise ValueError(f"some of {names} have a bias and some not")
        return Linear(weight, torch.cat([self(b) for b in biases]) if biases else None)


@dataclass(slots=True)
class Layer:
    """One decoder layer's weights."""

    input_norm: torch.Tensor  # [hidden]
    qkv: Linear  # [q + 2 kv, hidden]
    o_proj: Linear  # [hidden, q]
    post_attention_norm: torch.Tensor  # [hidden]
    gate_up: Linear | None  # [2 inter, hidden]; None in a mixture-of-experts layer
    down: Linear | None  # [hidden, inter]

    def products(self) -> list[Linear]:
        """The layer's matrix products: those of its fields that are one (a family's own too)."""
        return [v for f in fields(self) if isinstance(v := getattr(self, f.name), Linear)]


class Runner:
    """What the engine uses of a model runner: `config`, `new_cache`, `forward`, `compile`, and the
    attention mode and call count. Both the native runner (`Model`) and transformers' fallback
    (`decoding/families/transformers_runner.py`) plan each forward's attention here."""

    runner = "native"

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype):
        self.config = config
        self.device = device
        self.dtype = dtype
        # Attention calls per layer: batched, per-sequence or auto (see plan_attention).
        self.attention_mode = "auto"
        # The CPU kernel's attention, which auto takes where it is set (a runner whose layers all
        # fit it sets it): one call per layer, and a row's result the same bits whatever else is
        # in the forward.
        self.cell_attention = None
        self.attention_calls = 0  # attention calls run so far, all layers counted

    @property
    def architecture(self) -> str:
        return self.config.model_type

    @property
    def cells_kernel(self) -> ctypes.CDLL | None:
        """The library whose attention this runner's forwards use (auto with cell_attention set),
        or None: SDPA as attention_mode plans it."""
        return self.cell_attention if self.attention_mode == "auto" else None

    def new_cache(self, num_slots: int, max_len: int, memory: int | None = None) -> KVCache:
        """A paged cache for `num_slots` sequences of up to `max_len` tokens; memory: its budget in
        bytes (None: room for every slot's full context)."""
        c = self.config
        blocks = None
        if memory is not None:
            per_block = DEFAULT_BLOCK_SIZE * bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, self.dtype)
            blocks = max(1, memory // per_block)
        return KVCache(c.num_layers, num_slots, c.num_kv_heads, max_len, c.head_dim, self.device, self.dtype, blocks)

    def _layer_attention(self, batch: list[SeqBatchEntry], positions: torch.Tensor, cache: KVCache) -> LayerAttention:
        """This forward's attention, planned once for every layer."""
        plan = plan_attention(batch, cache, self.device, self.attention_mode, self.cells_kernel)
        self.attention_calls += plan.calls * self.config.num_layers
        return LayerAttention(cache, batch, plan, positions)


class Model(Runner):
    """The Llama-family runner (Llama 1-3 with their RoPE scaling, Mistral, Qwen2) and the base of
    every native family: weights plus a forward over a flat batch of new tokens from one or more
    cache slots. A family overrides the hooks where it differs; the forward stays this one."""

    architectures: tuple[str, ...] = ("llama", "mistral", "qwen2")

    def __init__(self, hf_config: dict, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        from transformers.activations import ACT2FN

        hf = transformers_config(hf_config)
        if hf.model_type not in self.architectures:
            raise ValueError(f"unsupported model architecture {hf.model_type!r} for the {type(self).__name__} "
                             f"runner, which runs {', '.join(self.architectures)}")
        super().__init__(ModelConfig.from_transformers(hf), device, dtype)
        self.hf = hf  # transformers' config: the families read their options from it
        cfg = self.config
        self.act = ACT2FN[self._activation()]
        w = Checkpoint(state, device, dtype)
        self.embed = w("model.embed_tokens.weight")  # [vocab, hidden]
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in w
        self.lm_head = Linear(self.embed if tied else w("lm_head.weight"))  # [vocab, hidden]
        self.norm = self._norm_weight(w, "model.norm.weight")
        self.layers = [self._load_layer(w, f"model.layers.{i}.") for i in range(cfg.num_layers)]
        self.attention_options = [self._attention_options(i) for i in range(cfg.num_layers)]
        if not any(o.get("window") or o.get("softcap") for o in self.attention_options):
            self.cell_attention = cpu_linear.attention_kernel(device, dtype, cfg.num_heads, cfg.num_kv_heads,
                                                              cfg.head_dim)
        self.ropes, self.layer_rope = self._ropes()  # RoPE kinds by name, and each layer's
        self._qkv, self._mlp = self._qkv_eager, self._mlp_eager  # compile() replaces them

    # ---- what a family may override ------------------------------------------------------------

    def _activation(self) -> str:
        return getattr(self.hf, "hidden_act", "silu")

    layer_class: type[Layer] = Layer  # a family with more weights per layer extends Layer

    def _load_layer(self, w: Checkpoint, p: str) -> Layer:
        return self.layer_class(**self._attention_weights(w, p), **self._mlp_weights(w, p))

    def _attention_weights(self, w: Checkpoint, p: str) -> dict:
        return dict(
            input_norm=self._norm_weight(w, p + "input_layernorm.weight"),
            qkv=w.linear(p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"),
            o_proj=w.linear(p + "self_attn.o_proj"),
            post_attention_norm=self._norm_weight(w, p + "post_attention_layernorm.weight"),
        )

    def _mlp_weights(self, w: Checkpoint, p: str) -> dict:
        return dict(gate_up=w.linear(p + "mlp.gate_proj", p + "mlp.up_proj"), down=w.linear(p + "mlp.down_proj"))

    def _norm_weight(self, w: Checkpoint, name: str) -> torch.Tensor:
        return w(name)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Computed in fp32 like the reference implementation, whatever the weight dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return weight * xf.to(x.dtype)

    def _attention_options(self, i: int) -> dict:
        """LayerAttention's options for layer i: a sliding window where the config has one, on the
        layers its layer_types mark sliding (Qwen2/3), else on every layer (Mistral, Phi-3)."""
        window = getattr(self.hf, "sliding_window", None)
        layer_types = getattr(self.hf, "layer_types", None)
        if layer_types is not None and layer_types[i] != "sliding_attention":
            window = None
        return {"window": window} if window else {}

    def _ropes(self) -> tuple[dict[str, Rope], list[str]]:
        return {"all": Rope(self.hf, self.device, self.dtype)}, ["all"] * self.config.num_layers

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed[tokens]

    def _project_qkv(self, x: torch.Tensor, layer: Layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> q [N, heads, hd], k [N, kv_heads, hd] and v [N, kv_heads, hd], before RoPE."""
        c = self.config
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        qkv = layer.qkv(self._rms_norm(x, layer.input_norm))  # [N, q + 2 kv]
        q = qkv[:, :q_size].view(-1, c.num_heads, c.head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(-1, c.num_kv_heads, c.head_dim)
        v = qkv[:, q_size + kv_size:].view(-1, c.num_kv_heads, c.head_dim)
        return q, k, v

    def _feed_forward(self, h: torch.Tensor, layer: Layer) -> torch.Tensor:
        gate, up = layer.gate_up(h).chunk(2, dim=-1)
        return layer.down(self.act(gate) * up)

    def _mlp_eager(self, x: torch.Tensor, attn: torch.Tensor, layer: Layer) -> torch.Tensor:
        """The rest of the layer: output projection, residual, norm, feed-forward, residual."""
        x = x + layer.o_proj(attn)
        return x + self._feed_forward(self._rms_norm(x, layer.post_attention_norm), layer)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self._rms_norm(x, self.norm)).float()

    # ---- the forward -----------------------------------------------------------------------------

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the first cos.shape[-1] dims of each head (all of them unless partial rotary)."""
        dim = cos.shape[-1]
        if dim < x.shape[-1]:
            return torch.cat([Model._rotate(x[..., :dim], cos, sin), x[..., dim:]], dim=-1)
        half = dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _qkv_eager(self, x: torch.Tensor, layer: Layer, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> rotated q [N, heads, hd], k [N, kv_heads, hd] and v [N, kv_heads, hd]."""
        q, k, v = self._project_qkv(x, layer)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin), v

    def compile(self) -> None:
        """torch.compile the layers' dense parts (everything but the attention call, whose batch
        layout changes every step), with a dynamic row count so one graph serves every size.
        Meant for GPUs; inductor cannot lower CPU fp32's packed weights (ours or oneDNN's)."""
        if self.lm_head.packed:
            raise ValueError("compile does not work with the packed CPU float32 linears: use it on CUDA "
                             "(or with dtype bfloat16 on a CPU, for testing)")
        self._qkv = torch.compile(self._qkv_eager, dynamic=True)
        self._mlp = torch.compile(self._mlp_eager, dynamic=True)

    def products(self) -> list[Linear]:
        """Every matrix product of the model: each layer's, then the lm_head."""
        return [lin for layer in self.layers for lin in layer.products()] + [self.lm_head]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, batch: list[SeqBatchEntry],
                cache: KVCache, logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run new tokens through the model, writing their K/V into each sequence's slot.

        tokens, positions: [N] with the sequences' rows concatenated in `batch` order.
        logit_rows: which rows get logits (all when None). Returns fp32 logits [len(logit_rows), vocab].
        """
        rope = {name: r(positions) for name, r in self.ropes.items()}  # cos, sin [N, 1, rotary_dim] per kind
        x = self._embed(tokens)  # [N, hidden]
        attend = self._layer_attention(batch, positions, cache)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(x, layer, *rope[self.layer_rope[i]])  # [N, heads | kv_heads, hd]
            attn = attend(i, q, k, v, **self.attention_options[i])  # [N, heads * hd]
            x = self._mlp(x, attn, layer)
        if logit_rows is not None:
            x = x[logit_rows]
        return self._logits(x)
