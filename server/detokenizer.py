"""Incremental, UTF-8 safe detokenization with stop strings that never leak into the stream."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Text is decoded over a short window of recent tokens (a token's text can depend on its
    neighbours), and a delta ending in U+FFFD (a multi-byte character cut between tokens) is held
    back until the character is complete. Stop strings are matched on the text; the part of the
    text that could still become a stop string is held back, so a stop string never appears
    partially in the stream.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.skip = skip_special_tokens
        self.tokens: list[int] = []
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # tokens whose text is already in self.text
        self.text = ""  # all decoded text (including held-back text)
        self.sent = 0  # characters of self.text already released
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the text now safe to send (possibly empty)."""
        if self.stopped:
            return ""
        self.tokens.extend(ids)
        prefix = self._decode(self.tokens[self._prefix_offset:self._read_offset])
        full = self._decode(self.tokens[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.tokens)
        return self._release()

    def _release(self) -> str:
        end = len(self.text)
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s) + 1))
            if at != -1 and at < end:
                end = at
                self.stopped = True
        if not self.stopped:
            # hold back a tail that is a proper prefix of some stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        if self.stopped:
            self.text = self.text[:end]
        return delta

    def flush(self) -> str:
        """At the end of generation: release what was held back (no stop string can complete now)."""
        if self.stopped:
            return ""
        tail = self._decode(self.tokens[self._prefix_offset:])
        prefix = self._decode(self.tokens[self._prefix_offset:self._read_offset])
        if len(tail) > len(prefix):
            self.text += tail[len(prefix):]
            self._read_offset = len(self.tokens)
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta
