"""A Llama-family decoder whose KV cache, positions and attention mask are arguments of forward.

Tree verification needs exactly that: every draft node is written into the cache at an explicit
position (past length + depth) and attends to the past plus its own ancestors. The model reads
top to bottom in this file; weights come from a Hugging Face state dict (Llama, Mistral, Qwen2,
SmolLM), with q/k/v and gate/up fused so that each layer is four matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from decoding.kv_cache import DEFAULT_BLOCK_SIZE, KVCache, bytes_per_token

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


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
    qkv_bias: bool
    model_type: str

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        model_type = hf.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model architecture {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            intermediate_size=hf["intermediate_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            model_type=model_type,
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
    layer. Attention then runs either as one call for the whole batch (`batched`): queries padded
    to [sequences, n_max], keys gathered from the tables into [sequences, kv_heads, l_max, hd], and
    a [sequences, 1, n_max, l_max] mask that lets each row see its own past and its tree
    ancestors; or as one call per sequence over its blocks, a plain view of the pool when they are
    consecutive there, else gathered.
    """

    row_block: torch.Tensor  # [N] block of each new row's cell
    row_off: torch.Tensor  # [N] offset in that block
    row_seq: torch.Tensor  # [N] (CPU) its entry in a batched call's padded batch
    row_cell: torch.Tensor  # [N] (CPU) its cell in the sequence (past_len + i)
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

    @property
    def calls(self) -> int:
        """Attention calls per layer."""
        return 1 if self.batched else len(self.masks)


def plan_attention(batch: list[SeqBatchEntry], cache: KVCache, device: torch.device,
                   mode: str = "auto") -> AttentionPlan:
    """Reserve the cells this forward writes and plan its attention. mode auto: one batched call
    on an accelerator (per-sequence calls are launch-bound there); on a CPU, batched unless padding
    adds more than half the query rows. Measured on a 2-core CPU (bench/attention.py,
    docs/attention_cpu.txt)."""
    blocks, offsets = [], []
    for e in batch:
        cache.reserve(e.slot, e.past_len + e.n)
        b, o = cache.cells(e.slot, e.past_len, e.n)
        blocks += b
        offsets += o
    row_seq = torch.tensor([j for j, e in enumerate(batch) for _ in range(e.n)])
    row_cell = torch.tensor([e.past_len + i for e in batch for i in range(e.n)])
    row_block, row_off = torch.tensor(blocks, device=device), torch.tensor(offsets, device=device)
    rows = len(blocks)
    n_max = max(e.n for e in batch)
    runs = [cache.runs(e.slot, e.past_len + e.n) for e in batch]
    l_max = max(e.past_len + e.n for e in batch)
    lo, hi = min(e.slot for e in batch), max(e.slot for e in batch)
    at_home = (all(len(r) == 1 and r[0][0] == cache.home(e.slot) for r, e in zip(runs, batch))
               and cache.home(hi) + cache.blocks_for(l_max) <= cache.num_blocks)
    if mode == "auto":
        # One sequence is one call either way: the per-sequence path skips the padding and mask.
        # On a CPU the batched call must also read its K/V in place (gathering them costs more
        # than the calls it saves).
        batched = len(batch) > 1 and (device.type != "cpu"
                                      or (at_home and 2 * (hi - lo + 1) * n_max <= 3 * rows))
    else:
        batched = mode == "batched"
    if not batched:
        masks = []
        for e in batch:
            if e.tree_mask is None and e.n == 1:
                masks.append(None)
                continue
            m = torch.ones(e.n, e.past_len + e.n, dtype=torch.bool)
            m[:, e.past_len:] = e.new_rows_mask()
            masks.append(m.to(device))
        return AttentionPlan(row_block, row_off, row_seq, row_cell, False, masks=masks, runs=runs)
    l_max = max(e.past_len + e.n for e in batch)
    width = cache.blocks_for(l_max)
    lo, hi = min(e.slot for e in batch), max(e.slot for e in batch)
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
    return AttentionPlan(row_block, row_off, row_seq, row_cell, True, n_max, l_max,
                         torch.tensor(q_index, device=device), tables, mask.to(device), seats=seats, home=home,
                         home_stride=cache.home_stride)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
          softcap: float | None) -> torch.Tensor:
    """q [B, heads, n, hd], k/v [B, kv_heads, L, hd] (grouped-query), mask bool [.., n, L] or None
    (every row sees every key). softcap: logits -> softcap * tanh(logits / softcap) before the
    softmax (Gemma 2), which SDPA cannot do, so that case runs as plain products."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: list[SeqBatchEntry],
              plan: AttentionPlan, masks: list[torch.Tensor | None] | torch.Tensor | None = None,
              scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """q: [N, heads, hd] for the new rows, whose K/V are already in the pool ([kv_heads, blocks,
    block_size, hd]); returns [N, heads * hd]. masks: the plan's masks, or a variant of them (a
    sliding window's) in the same layout."""
    heads, hd = q.shape[1:]
    kv_heads = k_pool.shape[0]
    if masks is None:
        masks = plan.mask if plan.batched else plan.masks
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
    q [n, heads, hd] -> [n, heads * hd]. The query heads sharing a KV head are folded into rows
    (grouped-query attention without expanding K/V)."""
    n, heads, hd = q.shape
    kv_heads = k_pool.shape[0]
    group = heads // kv_heads
    folded = q.view(n, kv_heads, group, hd).permute(1, 2, 0, 3).reshape(1, kv_heads, group * n, hd)
    outs, lses = [], []
    for first, count, c0, c1 in runs:
        k = k_pool[:, first:first + count].reshape(kv_heads, -1, hd)[None, :, :c1 - c0]
        v = v_pool[:, first:first + count].reshape(kv_heads, -1, hd)[None, :, :c1 - c0]
        part = None if mask is None else mask[:, c0:c1].repeat(group, 1)  # [group * n, cells]
        bias = None if part is None else torch.zeros(part.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~part, float("-inf"))
        o, lse = _flash_cpu(folded, k, v, attn_mask=bias, scale=scale)  # [1, kv_heads, group * n, hd], [1, kv_heads, group * n]
        if part is not None:
            seen = part.any(-1)  # a row that sees nothing here gets weight 0 (the kernel reports lse 0)
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
        self._window_masks: dict[int, list | torch.Tensor] = {}

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                 window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        plan = self.plan
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]  # [kv_heads, blocks, block_size, hd]
        k_pool[:, plan.row_block, plan.row_off] = k.transpose(0, 1)  # each row's K/V into its cell
        v_pool[:, plan.row_block, plan.row_off] = v.transpose(0, 1)
        masks = None if window is None else self._windowed(window)
        return attention(q, k_pool, v_pool, self.batch, plan, masks, scale, softcap)

    def _windowed(self, window: int):
        """The plan's masks with keys at positions <= p - window hidden from a row at position p.
        A past cell's position is its index; a new row's (a tree node's) is its own position."""
        if window in self._window_masks:
            return self._window_masks[window]
        plan, positions = self.plan, self.positions.cpu()
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
            masks = plan.mask & near.to(plan.mask.device)
        else:
            masks, start = [], 0
            for e, m in zip(self.batch, plan.masks):
                pos = positions[start:start + e.n]
                kpos = torch.cat([torch.arange(e.past_len), pos])
                near = (kpos[None, :] > pos[:, None] - window).to(plan.row_block.device)
                masks.append(near if m is None else m & near)
                start += e.n
        self._window_masks[window] = masks
        return masks


def rope_inv_freq(hf: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, delegating non-default RoPE types to transformers."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope_type == "default":
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        return inv.float(), 1.0
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope type {rope_type!r}")
    config = AutoConfig.for_model(**hf)
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv.float(), float(scaling)


def _mkldnn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


class Linear:
    """y = x W^T + b, with W prepacked once for oneDNN on CPU fp32.

    Why: a plain fp32 GEMM on CPU repacks W on every call, so a 4-row product costs about twice a
    1-row one, and its result for a row depends on how many rows are in the batch. The prepacked
    oneDNN kernel (packed for 16 rows) costs nearly the same from 1 to 16 rows and gives every row
    bit-identical results whatever the batch size, which is what lets a tree forward reproduce
    plain decoding token for token. Same fp32 arithmetic, so no change of numerics to flag.
    """

    PACK_ROWS = 16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.bias = bias
        self.out_features = weight.shape[0]
        self.packed = _mkldnn_usable(weight.device, weight.dtype)
        self.weight = (torch.ops.mkldnn._reorder_linear_weight(weight, self.PACK_ROWS)
                       if self.packed else weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Model:
    """Weights plus a forward over a flat batch of new tokens from one or more cache slots."""

    def __init__(self, hf_config: dict, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        cfg = ModelConfig.from_hf(hf_config)
        self.config = cfg
        self.device = device
        self.dtype = dtype

        def w(name: str) -> torch.Tensor:
            if name not in state:
                raise ValueError(f"weight {name!r} missing from the checkpoint")
            return state[name].to(device=device, dtype=dtype).contiguous()

        self.embed = w("model.embed_tokens.weight")  # [vocab, hidden]
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in state
        self.lm_head = Linear(self.embed if tied else w("lm_head.weight"))  # [vocab, hidden]
        self.norm = w("model.norm.weight")
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            qkv = torch.cat([w(p + "self_attn.q_proj.weight"), w(p + "self_attn.k_proj.weight"),
                             w(p + "self_attn.v_proj.weight")])  # [q + 2 kv, hidden]
            qkv_b = None
            if cfg.qkv_bias:
                qkv_b = torch.cat([w(p + "self_attn.q_proj.bias"), w(p + "self_attn.k_proj.bias"),
                                   w(p + "self_attn.v_proj.bias")])
            self.layers.append((
                w(p + "input_layernorm.weight"),
                Linear(qkv, qkv_b),
                Linear(w(p + "self_attn.o_proj.weight")),
                w(p + "post_attention_layernorm.weight"),
                Linear(torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")])),  # [2 inter, hidden]
                Linear(w(p + "mlp.down_proj.weight")),
            ))
        self._qkv, self._mlp = self._qkv_eager, self._mlp_eager  # compile() replaces them
        # Attention calls per layer: batched, per-sequence or auto (see plan_attention).
        self.attention_mode = "auto"
        self.attention_calls = 0  # attention calls run so far, all layers counted
        inv_freq, self.rope_scaling = rope_inv_freq(hf_config, cfg.head_dim)
        self.inv_freq = inv_freq.to(device)  # [head_dim / 2]

    def new_cache(self, num_slots: int, max_len: int, memory: int | None = None) -> KVCache:
        """A paged cache for `num_slots` sequences of up to `max_len` tokens; memory: its budget in
        bytes (None: room for every slot's full context)."""
        c = self.config
        blocks = None
        if memory is not None:
            per_block = DEFAULT_BLOCK_SIZE * bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, self.dtype)
            blocks = max(1, memory // per_block)
        return KVCache(c.num_layers, num_slots, c.num_kv_heads, max_len, c.head_dim, self.device, self.dtype, blocks)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Computed in fp32 like the reference implementation, whatever the weight dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return weight * xf.to(x.dtype)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [N, head_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [N, head_dim]
        return ((emb.cos() * self.rope_scaling).to(self.dtype)[:, None, :],
                (emb.sin() * self.rope_scaling).to(self.dtype)[:, None, :])

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _qkv_eager(self, x: torch.Tensor, layer: tuple, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> rotated q [N, heads, hd], k [N, kv_heads, hd] and v [N, kv_heads, hd]."""
        c = self.config
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        ln1, qkv_proj = layer[0], layer[1]
        qkv = qkv_proj(self._rms_norm(x, ln1))  # [N, q + 2 kv]
        q = qkv[:, :q_size].view(-1, c.num_heads, c.head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(-1, c.num_kv_heads, c.head_dim)
        v = qkv[:, q_size + kv_size:].view(-1, c.num_kv_heads, c.head_dim)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin), v

    def _mlp_eager(self, x: torch.Tensor, attn: torch.Tensor, layer: tuple) -> torch.Tensor:
        """The rest of the layer: output projection, residual, norm, SwiGLU MLP, residual."""
        _, _, o_proj, ln2, gate_up_proj, down_proj = layer
        x = x + o_proj(attn)
        gate, up = gate_up_proj(self._rms_norm(x, ln2)).chunk(2, dim=-1)
        return x + down_proj(F.silu(gate) * up)

    def compile(self) -> None:
        """torch.compile the layers' dense parts (everything but the attention call, whose batch
        layout changes every step), with a dynamic row count so one graph serves every size.
        Meant for GPUs; inductor cannot lower CPU fp32's prepacked oneDNN weights."""
        if self.lm_head.packed:
            raise ValueError("compile does not work with the prepacked CPU float32 linears: use it on CUDA "
                             "(or with dtype bfloat16 on a CPU, for testing)")
        self._qkv = torch.compile(self._qkv_eager, dynamic=True)
        self._mlp = torch.compile(self._mlp_eager, dynamic=True)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, batch: list[SeqBatchEntry],
                cache: KVCache, logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run new tokens through the model, writing their K/V into each sequence's slot.

        tokens, positions: [N] with the sequences' rows concatenated in `batch` order.
        logit_rows: which rows get logits (all when None). Returns fp32 logits [len(logit_rows), vocab].
        """
        cos, sin = self._rope(positions)
        x = self.embed[tokens]  # [N, hidden]

        plan = plan_attention(batch, cache, self.device, self.attention_mode)
        self.attention_calls += plan.calls * len(self.layers)

        attend = LayerAttention(cache, batch, plan, positions)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(x, layer, cos, sin)  # [N, heads | kv_heads, hd]
            attn = attend(i, q, k, v)  # [N, heads * hd]
            x = self._mlp(x, attn, layer)

        if logit_rows is not None:
            x = x[logit_rows]
        return self.lm_head(self._rms_norm(x, self.norm)).float()
