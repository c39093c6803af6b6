"""Retrieval helpers for speculative decoding."""

from retrieval.suffix_index import SuffixIndex

__all__ = ["SuffixIndex"]
