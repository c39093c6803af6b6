"""Model runner, KV cache, drafters, draft trees, verification and the decoding engine."""
