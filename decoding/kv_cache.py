"""A paged KV cache with prefix caching.

K and V live in fixed-size blocks drawn from one pool per layer, sized once from a memory budget.
Each sequence seat (a "slot": at most `num_slots` sequences run at once) has a block table: cell c
of the sequence (its token at position c) is offset c % block_size of block table[c // block_size].
Memory therefore follows the tokens held, not seats x context.

Prefix caching: a block whose every cell holds final K/V of known tokens is registered under a key
chained from its tokens and its prefix's key (and a namespace: one API key never hits another's
blocks). A new sequence takes the longest registered chain of its prompt's blocks instead of
computing them (`attach_prefix`). Blocks are reference-counted and shared read-only: a sequence
writes only at positions past its prompt's cached part, which lie in blocks of its own. A
registered block that no sequence holds stays cached until the pool runs short, then the least
recently released goes first.
"""

from __future__ import annotations

import hashlib
import heapq
import re
from array import array
from collections import OrderedDict

import torch

DEFAULT_BLOCK_SIZE = 16


class KVCacheFull(RuntimeError):
    """No block is free or evictable: the pool (--kv-memory) is held by running sequences."""


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class Seats:
    """What every KV cache the engine drives shares: `num_slots` seats (a sequence each, the lowest
    free one first) and memory accounted in blocks of `block_size` cells."""

    def __init__(self, num_slots: int, max_len: int, block_size: int):
        if num_slots < 1 or max_len < 1:
            raise ValueError("a KV cache needs at least one slot of at least one token")
        self.num_slots, self.max_len, self.block_size = num_slots, max_len, block_size
        self._free_slots = list(range(num_slots))

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self._free_slots)

    def allocate(self) -> int:
        if not self._free_slots:
            raise RuntimeError("no free KV slot")
        return heapq.heappop(self._free_slots)

    def _check_allocated(self, slot: int) -> None:
        if slot in self._free_slots or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")

    def _vacate(self, slot: int) -> None:
        heapq.heappush(self._free_slots, slot)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


class KVCache(Seats):
    """K and V: one [kv_heads, num_blocks, block_size, head_dim] tensor per layer.

    That layout makes a run of consecutive blocks a plain view [kv_heads, tokens, head_dim] for
    attention, so the allocator keeps a sequence's blocks consecutive where it can: its next block
    is the one after its last when that one is free or merely cached, and a sequence starts in the
    middle of the largest free run, leaving its neighbours room to grow (see _place).
    """


    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, num_blocks: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        super().__init__(num_slots, max_len, block_size)
        per_seq = -(-max_len // block_size)
        num_blocks = num_slots * per_seq if num_blocks is None else num_blocks
        if num_blocks < per_seq:
            raise ValueError(f"the KV cache holds {num_blocks * block_size} tokens, less than one context of "
                             f"{max_len}: give it more memory or lower the context")
        shape = (num_kv_heads, num_blocks, block_size, head_dim)
        # torch.empty: on a CPU the OS commits pages only when written, so blocks never used cost
        # no memory; a block is zeroed when first handed out (see _take).
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.device = device
        self.num_blocks = num_blocks
        self.tables: list[list[int]] = [[] for _ in range(num_slots)]
        # Each seat's own blocks start at its home block when that one is free or merely cached:
        # sequences that sit at home are one strided view of the pool for a batched attention call.
        self.home_stride = num_blocks // num_slots
        # A cached prefix this long is shared, a shorter one copied (attach_prefix). On a CPU a
        # sequence in two runs of the pool loses the in-place batched call and pays a second
        # attention call per layer; on a GPU a batch's K/V are gathered anyway.
        self.SHARE_MIN_BLOCKS = 32 if device.type == "cpu" else 1
        self._ref = [0] * num_blocks
        self._free = set(range(num_blocks))  # held by no sequence and not cached
        self._free_flags = bytearray(b"\x01") * num_blocks  # the same, as flags (runs of free blocks)
        # Blocks that may hold non-finite values (never written, or left by a failed sequence):
        # zeroed before use, since attention reads a block's unused cells masked, and a masked
        # NaN still poisons a row.
        self._dirty = bytearray(b"\x01") * num_blocks
        # Prefix cache: key <-> block for registered blocks; registered blocks no sequence holds,
        # least recently released first.
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        # Per slot: the chain of keys of its table's leading full blocks (registered or not) and
        # the namespace they were chained from.
        self._keys: list[list[bytes]] = [[] for _ in range(num_slots)]
        self._namespace: list[str] = [""] * num_slots
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # ... found there
        self.evicted_blocks = 0

    # ---- seats -------------------------------------------------------------------------------

    def release(self, slot: int, scrub: bool = False) -> None:
        """Give back the slot and its blocks. Its registered blocks stay cached; scrub: its blocks
        may hold non-finite K/V (its sequence failed): none stays cached, and each is zeroed before
        reuse."""
        self._check_allocated(slot)
        for block in reversed(self.tables[slot]):  # a prefix's tail is evicted before its head
            self._ref[block] -= 1
            if self._ref[block]:
                continue
            if scrub:
                self._dirty[block] = 1
                self._unregister(block)
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.add(block)
                self._free_flags[block] = 1
        self.tables[slot] = []
        self._keys[slot] = []
        self._vacate(slot)

    # ---- blocks ------------------------------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        """Blocks a sequence could take now: free ones and cached ones no sequence holds."""
        return len(self._free) + len(self._evictable)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def cached_blocks(self) -> int:
        return len(self._key_of)

    def home(self, slot: int) -> int:
        return slot * self.home_stride

    def make_finite(self, first: int, count: int) -> None:
        """Zero the blocks first .. first + count - 1 that may hold non-finite values (a batched
        call reads them masked); blocks in use are never among them."""
        for block in range(first, min(first + count, self.num_blocks)):
            if self._dirty[block]:
                for k, v in zip(self.k, self.v):
                    k[:, block].zero_()
                    v[:, block].zero_()
                self._dirty[block] = 0

    def reserve(self, slot: int, length: int) -> None:
        """Give the slot's table enough blocks for cells [0, length). Raises KVCacheFull."""
        table = self.tables[slot]
        while len(table) * self.block_size < length:
            # A sequence starts at its seat's home block and grows on consecutively, even over
            # cached blocks (evicted out of their turn): on a CPU a batch read in place costs less
            # than the prefill a cached block might save.
            table.append(self._take(table[-1] + 1 if table else self.home(slot)))
            self._ref[table[-1]] = 1

    def _take(self, prefer: int | None) -> int:
        """prefer: the block wanted, taken when free or cached and held by none."""
        if prefer is not None and prefer < self.num_blocks and (prefer in self._free or prefer in self._evictable):
            block = prefer
        else:
            block = self._place()
        if block is None:
            if not self._evictable:
                raise KVCacheFull(f"all {self.num_blocks} KV blocks are held by running sequences")
            block = next(iter(self._evictable))  # least recently released
        if block in self._evictable:
            self._unregister(block)
            self.evicted_blocks += 1
        self._free.discard(block)
        self._free_flags[block] = 0
        self.make_finite(block, 1)
        return block

    def _place(self) -> int | None:
        """Where a sequence's blocks start (or go on, when its next block is taken): in the largest
        run of free blocks, at its start when nothing precedes it, else in its middle, which leaves
        the sequence before it room to grow on consecutively too."""
        best = None
        for m in re.finditer(b"\x01+", self._free_flags):
            if best is None or m.end() - m.start() > best.end() - best.start():
                best = m
        if best is None:
            return None
        start, end = best.span()
        return start if start == 0 else start + (end - start) // 2

    def _unregister(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None and self._block_of.get(key) == block:
            del self._block_of[key]
        self._evictable.pop(block, None)

    # ---- prefix caching ------------------------------------------------------------------------

    def _chain(self, prev: bytes, tokens: list[int]) -> bytes:
        return hashlib.blake2b(prev + array("l", tokens).tobytes(), digest_size=16).digest()

    def _root_key(self, namespace: str) -> bytes:
        """What a namespace's first block key is chained from."""
        return self._chain(b"", list(namespace.encode()))

    def _register(self, key: bytes, block: int) -> None:
        """File a full block under its key, unless the key or the block is filed already (another
        sequence computed the same block first)."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def attach_prefix(self, slot: int, tokens: list[int], namespace: str = "") -> int:
        """Start the (empty) slot's table with the longest cached chain of `tokens`' full blocks,
        leaving at least the last token to compute (its logits are needed). Returns the number of
        tokens whose K/V are now in place.

        A chain of at least SHARE_MIN_BLOCKS blocks is shared; a shorter one (a chat template's
        system prompt, a repeated short prompt) is copied into the slot's own blocks: on a CPU,
        sharing it would split the sequence into two runs of the pool for little memory, and a
        sequence in one run at its seat's home is read in place by a batched attention call."""
        if self.tables[slot]:
            raise ValueError(f"slot {slot} already holds blocks")
        self._namespace[slot] = namespace
        bs = self.block_size
        key = self._root_key(namespace)
        keys, chain = [], []
        for i in range((len(tokens) - 1) // bs):
            key = self._chain(key, tokens[i * bs:(i + 1) * bs])
            block = self._block_of.get(key)
            if block is None:
                break
            if self._ref[block] == 0:
                self._evictable.pop(block, None)
            self._ref[block] += 1  # held: neither evicted nor reused while attaching
            chain.append(block)
            keys.append(key)
        at_home = bool(chain) and chain[0] == self.home(slot) and chain[-1] - chain[0] == len(chain) - 1
        if len(chain) >= self.SHARE_MIN_BLOCKS or at_home:  # (at home already: the seat's last prompt again)
            self.tables[slot] = chain
        elif chain:
            # Copied out first: the seat's home, where the copy goes, may be one of the chain's blocks.
            src = torch.tensor(chain, device=self.device)
            saved = [(k[:, src].clone(), v[:, src].clone()) for k, v in zip(self.k, self.v)]
            for block in chain:
                self._ref[block] -= 1
                if self._ref[block] == 0:
                    self._evictable[block] = None  # just used: the most recent
            self.reserve(slot, len(chain) * bs)
            own = self.tables[slot][:len(chain)]
            dst = torch.tensor(own, device=self.device)
            for (ks, vs), k, v in zip(saved, self.k, self.v):
                k[:, dst] = ks
                v[:, dst] = vs
            for key, block in zip(keys, own):  # the copy stands in for an original it evicted
                self._register(key, block)
        self._keys[slot] = keys
        self.queried_tokens += len(tokens)
        self.hit_tokens += len(keys) * bs
        return len(keys) * bs

    def publishable(self, slot: int, length: int) -> bool:
        """Whether `length` cells of the slot complete a block not yet offered to the cache."""
        return min(length // self.block_size, len(self.tables[slot])) > len(self._keys[slot])

    def publish(self, slot: int, tokens: list[int]) -> None:
        """Register the slot's full blocks whose cells all hold final K/V: `tokens` are the tokens at
        the slot's positions 0.. whose K/V are in the cache (no draft rows)."""
        bs, table, keys = self.block_size, self.tables[slot], self._keys[slot]
        full = min(len(tokens) // bs, len(table))
        if len(keys) >= full:
            return
        key = keys[-1] if keys else self._root_key(self._namespace[slot])
        for i in range(len(keys), full):
            key = self._chain(key, tokens[i * bs:(i + 1) * bs])
            keys.append(key)
            self._register(key, table[i])

    # ---- cells -------------------------------------------------------------------------------

    def runs(self, slot: int, length: int) -> list[tuple[int, int, int, int]]:
        """Cells [0, length) of the slot as runs of consecutive blocks in the pool: (first block,
        blocks, first cell, end cell)."""
        bs = self.block_size
        table = self.tables[slot][:self.blocks_for(length)]
        out, start = [], 0
        for i in range(1, len(table) + 1):
            if i == len(table) or table[i] != table[i - 1] + 1:
                out.append((table[start], i - start, start * bs, min(i * bs, length)))
                start = i
        return out

    def cells(self, slot: int, start: int, n: int) -> tuple[list[int], list[int]]:
        """(block, offset) of the slot's cells start .. start + n - 1."""
        return self.locate(slot, range(start, start + n))

    def locate(self, slot: int, cells) -> tuple[list[int], list[int]]:
        """(blocks, offsets) of the slot's cells, in order."""
        table, bs = self.tables[slot], self.block_size
        return [table[c // bs] for c in cells], [c % bs for c in cells]

    def keep(self, slot: int, past_len: int, accepted: list[int]) -> None:
        """Move tree rows `accepted` (indices into the last forward's new tokens, ascending) to the front."""
        if accepted == list(range(len(accepted))):
            return  # already in place: the accepted path is a prefix (always so for chains)
        src_b, src_o = (torch.tensor(x, device=self.device)
                        for x in self.locate(slot, [past_len + a for a in accepted]))
        dst_b, dst_o = (torch.tensor(x, device=self.device) for x in self.cells(slot, past_len, len(accepted)))
        for k, v in zip(self.k, self.v):
            k[:, dst_b, dst_o] = k[:, src_b, src_o]
            v[:, dst_b, dst_o] = v[:, src_b, src_o]
