"""The model runner on a tiny random Llama: against transformers, and tree/batch/KV mechanics."""

import pytest
import torch

from decoding.model import Model, SeqBatchEntry
from decoding.tree import DraftTree, NodeKind

DRAFT = NodeKind("draft", (), 1)  # a test node's kind (statistics need one)

ATOL = 2e-5


@pytest.fixture(scope="module")
def model(tiny_loaded):
    return Model(tiny_loaded.hf_config, tiny_loaded.state, torch.device("cpu"), torch.float32)


def prefill(model, cache, slot, tokens):
    n = len(tokens)
    return model.forward(torch.tensor(tokens), torch.arange(n), [SeqBatchEntry(slot, 0, n, None)], cache)


def test_matches_transformers(model, tiny_hf):
    hf_model, _ = tiny_hf
    tokens = [5, 17, 3, 60, 22, 9, 41, 8]
    cache = model.new_cache(1, 64)
    ours = prefill(model, cache, 0, tokens)
    with torch.no_grad():
        ref = hf_model(torch.tensor([tokens])).logits[0]
    assert ours.shape == (8, 97)
    assert torch.allclose(ours, ref, atol=ATOL)


def test_tree_forward_equals_sequential_decoding(model):
    cache = model.new_cache(1, 64)
    prompt = [5, 17, 3, 60]
    prefill(model, cache, 0, prompt)
    # sequential reference for the path 7, 8, 9
    seq_cache = model.new_cache(1, 64)
    prefill(model, seq_cache, 0, prompt)
    ref = []
    for i, tok in enumerate([7, 8, 9]):
        ref.append(model.forward(torch.tensor([tok]), torch.tensor([4 + i]),
                                 [SeqBatchEntry(0, 4 + i, 1, None)], seq_cache))
    ref = torch.cat(ref)
    # tree: root 7 with children 30 (leaf) and 8, 8 with children 31 and 9
    t = DraftTree.root(7)
    t.add(0, 30, DRAFT)
    n8 = t.add(0, 8, DRAFT)
    t.add(n8, 31, DRAFT)
    n9 = t.add(n8, 9, DRAFT)
    positions = torch.tensor([4 + d for d in t.depths])
    out = model.forward(torch.tensor(t.tokens), positions, [SeqBatchEntry(0, 4, len(t), t.attention_mask())], cache)
    path = t.path_to(n9)
    assert torch.allclose(out[path], ref, atol=ATOL)
    # keep the accepted path's K/V only, then decoding continues as if it had been sequential
    cache.keep(0, 4, path)
    nxt = model.forward(torch.tensor([50]), torch.tensor([7]), [SeqBatchEntry(0, 7, 1, None)], cache)
    ref_next = model.forward(torch.tensor([50]), torch.tensor([7]), [SeqBatchEntry(0, 7, 1, None)], seq_cache)
    assert torch.allclose(nxt, ref_next, atol=ATOL)


def test_batched_forward_equals_separate(model):
    a, b = [5, 17, 3, 60, 22], [9, 41, 8]
    cache = model.new_cache(3, 64)
    sep_a = prefill(model, cache, 0, a)
    sep_b = prefill(model, cache, 1, b)
    # same two prompts prefilled together into other slots, as ragged rows of one forward
    batch_cache = model.new_cache(3, 64)
    out = model.forward(torch.tensor(a + b), torch.cat([torch.arange(5), torch.arange(3)]),
                        [SeqBatchEntry(2, 0, 5, None), SeqBatchEntry(0, 0, 3, None)], batch_cache)
    assert torch.allclose(out[:5], sep_a, atol=ATOL)
    assert torch.allclose(out[5:], sep_b, atol=ATOL)


def test_logit_rows_selects_rows(model):
    cache = model.new_cache(1, 64)
    tokens = [5, 17, 3, 60]
    full = prefill(model, cache, 0, tokens)
    last = model.forward(torch.tensor(tokens), torch.arange(4), [SeqBatchEntry(0, 0, 4, None)], cache,
                         torch.tensor([3]))
    assert torch.allclose(last[0], full[3], atol=ATOL)


def test_linear_rows_do_not_depend_on_batch_size(model):
    """Prepacked CPU fp32 linears: a row's result is bit-identical alone or among others."""
    lin = model.layers[0].gate_up
    x = torch.randn(40, model.config.hidden_size)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(40)])
    for m in (2, 5, 16, 17, 40):
        assert torch.equal(lin(x[:m]), alone[:m])


def test_kv_slots_allocate_and_release(model):
    cache = model.new_cache(2, 8)
    s1, s2 = cache.allocate(), cache.allocate()
    assert {s1, s2} == {0, 1} and cache.free_slots == 0
    with pytest.raises(RuntimeError):
        cache.allocate()
    cache.release(s1)
    with pytest.raises(ValueError):
        cache.release(s1)
    assert cache.used_slots == 1


def test_unsupported_architecture_is_a_clear_error(tiny_loaded):
    hf = dict(tiny_loaded.hf_config, model_type="gpt2")
    with pytest.raises(ValueError, match="unsupported model architecture"):
        Model(hf, tiny_loaded.state, torch.device("cpu"), torch.float32)


def mixed_step(model, cache):
    """One decoding step as the engine builds it: a tree in slot 2, single rows in slots 0 and 3
    (slot 1 idle), after prefilling each. Slot 2 holds more than a block (16 cells), so a batched
    call reads the others' cells past their own block. Returns the step's logits."""
    long = [9, 41, 8, 60, 22] * 4
    prompts = {0: [5, 17, 3], 2: long, 3: [11, 12]}
    for slot, p in prompts.items():
        prefill(model, cache, slot, p)
    t = DraftTree.root(7)
    t.add(0, 30, DRAFT)
    n8 = t.add(0, 8, DRAFT)
    t.add(n8, 31, DRAFT)
    batch = [SeqBatchEntry(2, len(long), len(t), t.attention_mask()), SeqBatchEntry(0, 3, 1, None),
             SeqBatchEntry(3, 2, 1, None)]
    tokens = torch.tensor(t.tokens + [44, 45])
    positions = torch.tensor([len(long) + d for d in t.depths] + [3, 2])
    return model.forward(tokens, positions, batch, cache)


@pytest.mark.parametrize("mode", ["batched", "per-sequence"])
def test_attention_modes_equal_separate_forwards(tiny_loaded, mode):
    model = Model(tiny_loaded.hf_config, tiny_loaded.state, torch.device("cpu"), torch.float32)
    reference = mixed_step(model, model.new_cache(4, 64))  # auto: one batched call here (short contexts)
    model.attention_mode = mode
    calls = model.attention_calls
    out = mixed_step(model, model.new_cache(4, 64))
    assert torch.allclose(out, reference, atol=ATOL)
    # the step's forward: 1 call per layer batched, 1 per sequence otherwise (prefills: 1 each)
    assert model.attention_calls - calls == len(model.layers) * (3 + (1 if mode == "batched" else 3))


def test_auto_attention_batches_neighbours_and_keeps_a_long_sequence_apart(tiny_loaded):
    """On a CPU, auto reads a long sequence on its own and batches the short ones beside it (a
    batched call reads every sequence padded to the longest); the rows equal separate forwards."""
    from decoding.model import plan_attention

    model = Model(tiny_loaded.hf_config, tiny_loaded.state, torch.device("cpu"), torch.float32)
    model.cell_attention = None  # SDPA's grouping: auto where the CPU kernel's attention is not used
    prompts = {0: [5, 17, 3], 1: [11, 12, 13, 14], 3: [9, 41, 8, 60, 22] * 80}
    alone = {}
    for slot, p in prompts.items():
        cache = model.new_cache(4, 512)
        prefill(model, cache, slot, p)
        alone[slot] = (model.forward(torch.tensor([44]), torch.tensor([len(p)]), [SeqBatchEntry(slot, len(p), 1, None)],
                                   cache))
    cache = model.new_cache(4, 512)
    for slot, p in prompts.items():
        prefill(model, cache, slot, p)
    batch = [SeqBatchEntry(3, 400, 1, None), SeqBatchEntry(0, 3, 1, None), SeqBatchEntry(1, 4, 1, None)]
    plan = plan_attention(batch, cache, torch.device("cpu"))
    assert [[e.slot for e in entries] for _, entries, _ in plan.parts] == [[0, 1], [3]] and plan.calls == 2
    assert [rows.tolist() for rows, _, _ in plan.parts] == [[1, 2], [0]]
    calls = model.attention_calls
    out = model.forward(torch.tensor([44] * 3), torch.tensor([400, 3, 4]), batch, cache)
    assert model.attention_calls - calls == 2 * len(model.layers)
    assert torch.allclose(out, torch.cat([alone[3], alone[0], alone[1]]), atol=ATOL)


def test_segments_cut_by_cost():
    """The CPU grouping: neighbouring seats of similar length in one call, a long sequence or one
    away from its home on its own, seats far apart not padded across."""
    from decoding.kv_cache import KVCache
    from decoding.model import _segments

    cache = KVCache(1, 8, 1, 1024, 4, torch.device("cpu"), torch.float32)
    for slot, length in enumerate([300, 120, 90, 1000, 110, 300]):
        cache.reserve(slot, length + 1)

    def groups(lengths):
        batch = [SeqBatchEntry(slot, n, 1, None) for slot, n in lengths.items()]
        runs = [cache.runs(e.slot, e.past_len + 1) for e in batch]
        return sorted(sorted(batch[i].slot for i in g) for g in _segments(batch, runs, cache))

    assert groups({0: 300, 1: 120, 2: 90, 4: 110, 5: 300}) == [[0, 1, 2, 4, 5]]  # one idle seat: cheap padding
    assert groups({0: 300, 1: 120, 2: 90, 3: 1000, 4: 110, 5: 300}) == [[0, 1, 2], [3], [4, 5]]
    assert groups({0: 300, 5: 300}) == [[0], [5]]  # four seats between: more padding than a call
    cache.tables[6] = [cache._take(cache.home(7) + 5)]  # seat 6 away from its home: read on its own
    assert groups({4: 110, 5: 100, 6: 10}) == [[4, 5], [6]]


def test_batched_attention_ignores_garbage_in_unused_cells(tiny_loaded):
    """Cells a batched call reads but masks (past a sequence's length, padding table entries) may
    hold anything torch.empty left there; a NaN there would poison the whole row if read."""
    model = Model(tiny_loaded.hf_config, tiny_loaded.state, torch.device("cpu"), torch.float32)
    model.attention_mode = "batched"
    reference = mixed_step(model, model.new_cache(4, 64))
    cache = model.new_cache(4, 64)
    for _ in range(4):
        cache.allocate()
    for k, v in zip(cache.k, cache.v):
        k.fill_(float("nan"))
        v.fill_(float("inf"))
    assert torch.equal(mixed_step(model, cache), reference)
    # a failed sequence's blocks may hold non-finite K/V: scrubbed on release, zeroed before reuse
    failed = list(cache.tables[0])  # slot 0's sequence is the shortest: its block is read past its end
    for slot in range(4):
        cache.release(slot, scrub=slot == 0)
    for k in cache.k:
        k[:, failed] = float("nan")  # as a failed sequence may leave them
    for _ in range(4):
        cache.allocate()
    assert torch.equal(mixed_step(model, cache), reference)


def naive_attention(q, keys, values, allowed, scale, softcap):
    """One row: q [heads, hd], keys/values [L, kv_heads, hd], allowed [L] bool."""
    heads, kv_heads = q.shape[0], keys.shape[1]
    out = []
    for h in range(heads):
        kh = keys[:, h // (heads // kv_heads)]
        s = (kh @ q[h]) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~allowed, float("-inf"))
        out.append(torch.softmax(s, 0) @ values[:, h // (heads // kv_heads)])
    return torch.cat(out)


@pytest.mark.parametrize("mode", ["batched", "per-sequence", "auto"])
@pytest.mark.parametrize("scale,window,softcap", [(None, None, None), (0.3, None, None), (None, 3, None),
                                                  (None, None, 2.0), (0.5, 4, 1.5)])
def test_layer_attention_options_match_a_naive_reference(mode, scale, window, softcap):
    """The options model families pass (query scale, sliding window, logit soft-capping) on a
    tree among single rows, against a row-by-row reference."""
    from decoding.kv_cache import KVCache
    from decoding.model import LayerAttention, plan_attention

    torch.manual_seed(1)
    heads, kv_heads, hd = 4, 2, 8
    cache = KVCache(1, 4, kv_heads, 32, hd, torch.device("cpu"), torch.float32, block_size=4)
    cache.SHARE_MIN_BLOCKS = 1
    past = {2: 6, 0: 3, 3: 9}
    seqs = {s: torch.randn(p, kv_heads, hd) for s, p in past.items()}
    # Slot 1 computed and published two blocks; slot 2's prompt shares the first (a prefix hit),
    # so its own blocks lie elsewhere: its attention spans two runs of the pool.
    shared = list(range(8))
    cache.reserve(1, 8)
    cache.publish(1, shared)
    assert cache.attach_prefix(2, shared[:4] + [50, 51]) == 4
    for s, kv in seqs.items():
        cache.reserve(s, past[s])
        blocks, offsets = cache.cells(s, 0, past[s])
        cache.k[0][:, blocks, offsets] = kv.transpose(0, 1)
        cache.v[0][:, blocks, offsets] = -kv.transpose(0, 1)
    t = DraftTree.root(7)
    t.add(0, 30, DRAFT)
    n8 = t.add(0, 8, DRAFT)
    t.add(n8, 31, DRAFT)
    batch = [SeqBatchEntry(2, 6, len(t), t.attention_mask()), SeqBatchEntry(0, 3, 1, None),
             SeqBatchEntry(3, 9, 1, None)]
    n = sum(e.n for e in batch)
    q, k, v = torch.randn(n, heads, hd), torch.randn(n, kv_heads, hd), torch.randn(n, kv_heads, hd)
    plan = plan_attention(batch, cache, torch.device("cpu"), mode)
    if mode == "per-sequence":
        assert len(plan.runs[0]) == 2  # slot 2: the shared block, then its own elsewhere
    if mode == "auto":  # slots 0 and 3 batched in place, slot 2 (in two runs) on its own
        assert [[e.slot for e in entries] for _, entries, _ in plan.parts] == [[0, 3], [2]]
    positions = torch.tensor([6 + d for d in t.depths] + [3, 9])
    out = LayerAttention(cache, batch, plan, positions)(0, q, k, v, scale=scale, window=window,
                                                                  softcap=softcap)
    row = 0
    for e in batch:
        mask = e.new_rows_mask()
        keys = torch.cat([seqs[e.slot], k[row:row + e.n]])
        values = torch.cat([-seqs[e.slot], v[row:row + e.n]])
        depths = t.depths if e.n > 1 else [0]
        for i in range(e.n):
            pos = e.past_len + depths[i]
            allowed = torch.cat([torch.ones(e.past_len, dtype=torch.bool), mask[i]])
            if window is not None:
                key_pos = torch.tensor(list(range(e.past_len)) + [e.past_len + d for d in depths])
                allowed &= key_pos > pos - window
            ref = naive_attention(q[row + i], keys, values, allowed, scale or hd ** -0.5, softcap)
            assert torch.allclose(out[row + i], ref, atol=1e-5), (e.slot, i)
        row += e.n
