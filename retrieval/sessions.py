"""Per-session suffix indexes that outlive a request, bounded by count and memory (LRU)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from retrieval.suffix_index import SuffixIndex


class SessionRegistry:
    """Session key -> the suffix index of that conversation (all turns' prompts and outputs).

    Keys are opaque strings chosen by the server (namespaced by API key where keys exist), so one
    key's index can only be reached through that exact key. Least recently used sessions are
    evicted beyond `max_sessions` or `max_bytes` of index memory.
    """

    def __init__(self, max_sessions: int = 256, max_bytes: int = 512 * 2**20):
        if max_sessions < 0 or max_bytes < 0:
            raise ValueError("session limits must be >= 0")
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self._sessions: OrderedDict[str, SuffixIndex] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> SuffixIndex:
        """The session's index, created empty on first use; marks it most recently used."""
        with self._lock:
            index = self._sessions.get(key)
            if index is None:
                index = SuffixIndex()
                self._sessions[key] = index
            self._sessions.move_to_end(key)
            self._evict(keep=key)
            return index

    def _evict(self, keep: str) -> None:
        # Sizes are measured once per call, not once per eviction: measuring walks every index.
        memory = self._memory()
        while len(self._sessions) > self.max_sessions or (len(self._sessions) > 1 and memory > self.max_bytes):
            oldest = next(iter(self._sessions))
            if oldest == keep:
                break
            memory -= self._sessions.pop(oldest).memory_bytes()

    def _memory(self) -> int:
        return sum(ix.memory_bytes() for ix in self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    def memory_bytes(self) -> int:
        with self._lock:
            return self._memory()
