"""Grammar constraints on a sequence's output, with llguidance as the matcher.

The constrained target distribution at a position is the model's logits with every token the
grammar forbids there set to -inf. Speculation keeps it exact: the matcher's state advances along
each tree path (consume, then roll back), so every node's logits row gets the mask of the state
after the tokens from the root down to that node, and the verifiers (greedy, coupled, SpecInfer)
run unchanged on the masked rows. A draft child that the grammar forbids at its parent has
probability 0 under the constrained target, so it can never be accepted: `prune` removes it (and
its subtree) before the forward, which changes what is verified but not what is emitted.

State convention: the matcher has consumed every emitted token except the root (the decided next
token, which is drafted from but not emitted yet). A stop token stands for the grammar's end: it
is allowed exactly where the grammar may end, and nothing follows it.

Why llguidance (docs/grammar_engines.txt): on this CPU and the default model's tokenizer its
masks were correct in every random walk (xgrammar 0.2.8 let raw control characters into JSON
strings, 3 of 40 walks invalid JSON), its worst mask took 1.75 ms against xgrammar's 15.7 ms
(medians 0.01-0.03 ms and 0.003 ms, both negligible next to a 33 ms forward), and it has no
dependencies (xgrammar pulls triton and apache-tvm-ffi).
"""

from __future__ import annotations

import numpy as np
import torch

from decoding.tree import DraftTree


class GrammarError(ValueError):
    """A grammar (a JSON schema, a tool's parameters, a Lark grammar) that cannot be compiled."""


class Grammars:
    """Compiles grammars for one tokenizer. The llguidance tokenizer takes about 0.4 s to build,
    so it is built on first use and shared by every sequence."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = frozenset(stop_ids)
        self._lltok = None

    @property
    def lltok(self):
        if self._lltok is None:
            import llguidance.hf

            try:
                self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=sorted(self.stop_ids))
            except Exception as e:  # e.g. a tokenizer that is not a Hugging Face fast tokenizer
                raise GrammarError(f"this model's tokenizer cannot be used with a grammar ({type(e).__name__}: {e})")
        return self._lltok

    def check(self, grammar: str) -> None:
        """Raise GrammarError with llguidance's message when `grammar` does not compile."""
        import llguidance

        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.lltok)
        if is_error:
            raise GrammarError(messages[0] if messages else "invalid grammar")

    def constraint(self, grammar: str) -> "Constraint":
        import llguidance

        matcher = llguidance.LLMatcher(self.lltok, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return Constraint(matcher, self.vocab_size, self.stop_ids)


def json_schema_grammar(schema: dict | bool) -> str:
    """An llguidance grammar for JSON that matches `schema`, compact: `{"a": 1, "b": [2, 3]}`.

    No free whitespace: a small model given the choice wanders into newlines and indentation, and
    one fixed layout keeps tool-call arguments on one line (server/tools.py parses them)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})


def lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


class Constraint:
    """One sequence's grammar state: which tokens may come next, along the output and along a tree."""

    def __init__(self, matcher, vocab_size: int, stop_ids: frozenset[int]):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids
        self.words = (vocab_size + 31) // 32

    # ---- the output ------------------------------------------------------------------------------

    def advance(self, tokens: list[int]) -> None:
        """Consume emitted tokens (a stop token ends the output: nothing after it is consumed)."""
        for token in tokens:
            if token in self.stop_ids:
                return
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"the grammar refused emitted token {token}: {self.matcher.get_error()}")

    # ---- masks -----------------------------------------------------------------------------------

    def _bitmask(self, out: torch.Tensor) -> None:
        """Fill `out` [words] int32 with the allowed tokens at the current state."""
        if self.matcher.is_stopped():  # the grammar is complete: only a stop token may follow
            out.zero_()
            for s in self.stop_ids:
                out[s // 32] |= _bit(s)
            return
        self.matcher.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * 4)

    def _bits(self, bitmask: torch.Tensor) -> np.ndarray:
        """[n, words] int32 -> [n, vocab] bool (numpy). Little-endian words unpacked least
        significant bit first are in token order."""
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")  # [n, words * 32]
        return bits[:, :self.vocab_size].view(np.bool_)

    def allowed(self, bitmask: torch.Tensor) -> torch.Tensor:
        """[n, words] int32 -> [n, vocab] bool."""
        return torch.from_numpy(self._bits(bitmask))

    def mask_logits(self, logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        """logits [n, vocab], bitmask [n, words] -> the constrained logits [n, vocab] (a new tensor).

        On a CPU in numpy, single-threaded: torch's elementwise ops over [n, vocab] go to its
        thread pool, and on this 2-core machine, busy with other work, a masked_fill of 6 rows
        took 30-50 ms there against about 1 ms here."""
        allowed = self._bits(bitmask)
        if logits.device.type != "cpu":
            allowed = torch.from_numpy(allowed).to(logits.device)
            out = torch.full_like(logits, float("-inf"))
            out[:, :self.vocab_size] = logits[:, :self.vocab_size].masked_fill(~allowed, float("-inf"))
            return out
        out = logits.detach().numpy().copy()
        np.putmask(out[:, :self.vocab_size], ~allowed, -np.inf)
        out[:, self.vocab_size:] = -np.inf  # padded embedding rows are never text
        return torch.from_numpy(out)

    def next_mask(self) -> torch.Tensor:
        """[1, words] the mask at the current state (for the token after the emitted output)."""
        out = torch.zeros(1, self.words, dtype=torch.int32)
        self._bitmask(out[0])
        return out

    # ---- trees -----------------------------------------------------------------------------------

    def _consume(self, token: int) -> int:
        """Consume a tree node's token; returns how many tokens to roll back afterwards."""
        if token in self.stop_ids:
            return 0  # the end: the state stays, and `_walk` allows nothing below a stop node
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused tree token {token}: {self.matcher.get_error()}")
        return 1

    def forced(self, root: int, limit: int = 16) -> list[int]:
        """The tokens the grammar forces after `root` (a key, a closing brace and the next key...):
        drafts that the constrained target accepts unless the model prefers another tokenization
        of the same text."""
        if root in self.stop_ids:
            return []
        back = self._consume(root)
        try:
            return self.matcher.compute_ff_tokens()[:limit]
        finally:
            self.matcher.rollback(back)

    def prune(self, tree: DraftTree) -> DraftTree:
        """The tree without the draft nodes the grammar forbids at their parent (and their subtrees).
        The root is allowed: it was decided from masked logits."""
        keep = []

        def walk(node: int) -> None:
            keep.append(node)
            if tree.tokens[node] in self.stop_ids:
                return
            for token, child in tree.children(node).items():
                ok = self.matcher.validate_tokens([token]) == 1 if token not in self.stop_ids \
                    else self.matcher.is_accepting()
                if ok:
                    back = self._consume(token)
                    walk(child)
                    self.matcher.rollback(back)

        back = self._consume(tree.tokens[0])
        try:
            walk(0)
        finally:
            self.matcher.rollback(back)
        return tree if len(keep) == len(tree) else tree.subtree(keep)

    def tree_masks(self, tree: DraftTree) -> torch.Tensor:
        """[len(tree), words] int32: row i is the mask at the state after the path root..i."""
        masks = torch.zeros(len(tree), self.words, dtype=torch.int32)

        def walk(node: int) -> None:
            token = tree.tokens[node]
            if token in self.stop_ids:  # nothing follows the end; the row is never used
                return
            back = self._consume(token)
            self._bitmask(masks[node])
            for child in tree.children(node).values():
                walk(child)
            self.matcher.rollback(back)

        walk(0)
        return masks


def _bit(token: int) -> int:
    """The int32 value of `token`'s bit in its mask word (bit 31 is the sign bit)."""
    b = 1 << (token % 32)
    return b - (1 << 32) if b >= 1 << 31 else b
