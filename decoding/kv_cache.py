"""Preallocated per-sequence KV slots, written at explicit positions and compacted after verification."""

from __future__ import annotations

import heapq

import torch


class KVCache:
    """K and V for `num_slots` sequences of up to `max_len` tokens each, one tensor pair per layer.

    A forward writes a tree's K/V at positions past_len .. past_len + n - 1 of its slot; after
    verification `keep` moves the accepted nodes' entries to the front of that region, so the
    cache never holds rejected branches and is never reallocated.
    """

    ZERO_AHEAD = 64

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        if num_slots < 1 or max_len < 1:
            raise ValueError("a KV cache needs at least one slot of at least one token")
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        # torch.empty: the OS commits pages only when written, so unused capacity costs no memory on CPU.
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len
        # Per slot: cells below this hold finite values in every layer (written or zeroed). A
        # batched attention call reads cells past a sequence's own length (masked, but a masked
        # NaN still poisons the product), and torch.empty leaves them as whatever memory held.
        self._finite = [0] * num_slots
        # A heap: the lowest free slot is handed out first, so running sequences sit in few
        # neighbouring slots and the batched attention's strided view over them wastes little.
        self._free = list(range(num_slots))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV slot")
        return heapq.heappop(self._free)

    def release(self, slot: int, scrub: bool = False) -> None:
        """scrub: the slot may hold non-finite K/V (its sequence failed); zero it before reuse."""
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        if scrub:
            self._finite[slot] = 0
        heapq.heappush(self._free, slot)

    def make_finite(self, slot: int, length: int, written: bool = False) -> None:
        """Make cells [.., length) of `slot` finite before a forward reads them. written: the forward
        writes every cell up to `length` that is not already below the mark (a sequence's own
        cells: its past was written by its earlier forwards), so none needs zeroing. Every forward
        calls this for what it writes or reads, before writing, so a cell holding K/V is always
        below the mark, and each cell is zeroed at most once per occupant."""
        start = self._finite[slot]
        if start >= length:
            return
        if written:
            self._finite[slot] = length
            return
        # Ahead in steps of ZERO_AHEAD cells: a decoding step grows a sequence by a few cells, and
        # zeroing those alone would cost two small writes per layer every step.
        end = min(self.max_len, max(length, start + self.ZERO_AHEAD))
        for k, v in zip(self.k, self.v):
            k[slot, :, start:end].zero_()
            v[slot, :, start:end].zero_()
        self._finite[slot] = end

    def keep(self, slot: int, past_len: int, accepted: list[int]) -> None:
        """Move tree rows `accepted` (indices into the last forward's new tokens, ascending) to the front."""
        if accepted == list(range(len(accepted))):
            return  # already in place: the accepted path is a prefix (always so for chains)
        src = torch.tensor(accepted, device=self.k[0].device) + past_len
        dst = slice(past_len, past_len + len(accepted))
        for k, v in zip(self.k, self.v):
            k[slot, :, dst] = k[slot, :, src]
            v[slot, :, dst] = v[slot, :, src]
