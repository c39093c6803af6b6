"""The paged KV cache's prefix caching: block bookkeeping on a bare cache, then the real model's
greedy output with caching on and off, and a shared system prompt held once."""

import pytest
import torch

from decoding.kv_cache import KVCache, KVCacheFull

BS = 4


def bare_cache(blocks=16, slots=4, max_len=16, share_min=1):
    cache = KVCache(1, slots, 1, max_len, 2, torch.device("cpu"), torch.float32, num_blocks=blocks, block_size=BS)
    cache.SHARE_MIN_BLOCKS = share_min  # these tests share every hit; see test_a_short_hit_is_copied
    return cache


def run(cache, tokens, namespace=""):
    """A sequence's life up to its prefill: attach, compute the rest, publish; returns (slot, hit)."""
    slot = cache.allocate()
    hit = cache.attach_prefix(slot, tokens, namespace)
    cache.reserve(slot, len(tokens))
    cache.publish(slot, tokens)
    return slot, hit


def test_a_hit_takes_whole_blocks_and_leaves_the_last_token_to_compute():
    cache = bare_cache()
    prompt = list(range(10, 22))  # 12 tokens: 3 full blocks
    a, hit = run(cache, prompt)
    assert hit == 0 and cache.cached_blocks == 3
    b, hit = run(cache, prompt)
    assert hit == 8  # the third block would leave nothing to compute: its last token's logits are needed
    assert cache.tables[b][:2] == cache.tables[a][:2] and cache.tables[b][2] != cache.tables[a][2]
    c, hit = run(cache, prompt + [99])
    assert hit == 12 and cache.tables[c][:3] == cache.tables[a]
    assert (cache.queried_tokens, cache.hit_tokens) == (12 + 12 + 13, 8 + 12)


def test_keys_chain_the_prefix_and_the_namespace():
    cache = bare_cache()
    run(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert run(cache, [0, 0, 0, 0, 5, 6, 7, 8, 9])[1] == 0  # same second block, other prefix: a miss
    assert run(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9], namespace="other key")[1] == 0
    assert run(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])[1] == 8


def test_shared_blocks_are_counted_and_cached_ones_evicted_least_recent_first():
    cache = bare_cache(blocks=8, slots=2, max_len=16)  # homes at blocks 0 and 4
    a, _ = run(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])  # blocks 0, 1, 2; the first two full (registered)
    b, hit = run(cache, [1, 2, 3, 4, 5, 6, 7, 8, 10])
    assert hit == 8 and cache.tables[b][:2] == [0, 1] and cache.used_blocks == 4  # shared once, a last block each
    cache.release(a)
    assert cache.used_blocks == 3  # b still holds the shared ones
    cache.release(b)
    assert cache.used_blocks == 0 and cache.cached_blocks == 2 and cache.free_blocks == 8
    c, _ = run(cache, list(range(20, 36)))  # seat 0 again: from its home on, over the cached blocks
    assert cache.tables[c] == [0, 1, 2, 3] and cache.evicted_blocks == 2
    d, _ = run(cache, list(range(40, 56)))  # seat 1: blocks 4 .. 7, the pool is full
    cache.release(d)
    cache.release(c)  # cached, least recent first: d's 7, 6, 5, 4, then c's 3, 2, 1, 0
    e = cache.allocate()
    assert cache.attach_prefix(e, list(range(20, 36)) + [99]) == 16  # c's blocks, now most recent
    cache.reserve(e, 24)  # its next block (4) is cached: taken, to stay consecutive
    assert cache.tables[e] == [0, 1, 2, 3, 4, 5]
    f = cache.allocate()
    cache.reserve(f, 4)  # its home (4) is e's: no free block, so the least recently released goes
    assert cache.tables[f] == [7] and cache.cached_blocks == 5  # e holds c's four, and d's 6 is left
    with pytest.raises(KVCacheFull):
        cache.reserve(f, 12)


def test_a_short_hit_is_copied_into_the_sequences_own_blocks():
    """Below SHARE_MIN_BLOCKS a hit is copied: the sequence stays one run from its home block, and
    the cached blocks stay cached (most recently used)."""
    cache = bare_cache(blocks=32, share_min=3)
    tokens = list(range(1, 14))  # 3 full blocks
    a, _ = run(cache, tokens)
    for i, block in enumerate(cache.tables[a]):
        cache.k[0][:, block] = float(i + 1)
    cache.release(a)
    cache.allocate()  # seat 0 (whose home holds a's cached blocks) stays busy
    b = cache.allocate()
    assert cache.attach_prefix(b, tokens[:9] + [50, 51]) == 8  # 2 blocks: copied
    assert cache.tables[b][0] == cache.home(b) and cache.runs(b, 8) == [(cache.home(b), 2, 0, 8)]
    assert torch.equal(cache.k[0][:, cache.tables[b][1]], torch.full((1, BS, 2), 2.0))
    assert cache.used_blocks == 2 and cache.cached_blocks == 3 and next(reversed(cache._evictable)) in (0, 1)
    c = cache.allocate()
    assert cache.attach_prefix(c, tokens + [60]) == 12  # 3 blocks: shared
    assert cache.tables[c] == [0, 1, 2]


def test_a_failed_sequence_leaves_nothing_in_the_prefix_cache():
    cache = bare_cache()
    a, _ = run(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    cache.release(a, scrub=True)
    assert cache.cached_blocks == 0 and run(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])[1] == 0


def test_sequences_start_at_home_and_grow_on_consecutive_blocks():
    cache = bare_cache(blocks=32, max_len=64)  # 4 seats: homes at blocks 0, 8, 16, 24
    a, b = cache.allocate(), cache.allocate()
    cache.reserve(a, 4)
    cache.reserve(b, 4)
    cache.reserve(a, 16)
    cache.reserve(b, 8)
    assert cache.tables[a] == [0, 1, 2, 3] and cache.tables[b] == [8, 9]
    assert cache.runs(a, 14) == [(0, 4, 0, 14)]
    cache.reserve(a, 40)  # 4 .. 7, then b's block: it goes on in the middle of the largest free run, 10 .. 31
    assert cache.tables[a] == [0, 1, 2, 3, 4, 5, 6, 7, 21, 22]
    assert cache.runs(a, 37) == [(0, 8, 0, 32), (21, 2, 32, 37)]
    cache.release(b)  # nothing registered: its blocks are free again, and the next sequence of its seat starts there
    c = cache.allocate()
    assert cache.attach_prefix(c, list(range(20))) == 0
    cache.reserve(c, 4)
    assert cache.tables[c] == [8]


def test_a_sequence_starts_at_home_even_over_cached_blocks():
    cache = bare_cache(blocks=32, max_len=64)
    a = cache.allocate()
    run_tokens = list(range(100, 120))
    assert cache.attach_prefix(a, run_tokens) == 0
    cache.reserve(a, 20)
    cache.publish(a, run_tokens)
    cache.release(a)  # blocks 0 .. 4 cached
    b = cache.allocate()  # the same seat, another conversation
    cache.reserve(b, 8)
    assert cache.tables[b] == [0, 1] and cache.cached_blocks == 3 and cache.evicted_blocks == 2


@pytest.mark.slow
def test_multiturn_greedy_output_is_the_same_with_and_without_prefix_caching(real_loaded):
    """Three chat turns, each prompt the whole conversation so far: alone and as a batch of two
    conversations, ar and logitspec, caching on and off give the same tokens at every turn, and
    with caching on each later turn computes only what its conversation added."""
    from conftest import engines_for
    from decoding.verify import SamplingParams

    on = engines_for(real_loaded, max_context=1024, max_batch=2)
    off = engines_for(real_loaded, max_context=1024, max_batch=2, prefix_caching=False)
    questions = [["Name three rivers in Europe.", "Which of them is the longest?", "Say that in French."],
                 ["Write a haiku about rain.", "Now one about snow.", "Which one do you prefer?"]]

    def conversation(engines, method, batch):
        engine = engines[method]
        histories = [[{"role": "system", "content": "You are a concise assistant. " * 6}] for _ in questions]
        answers, cached = [], []
        for turn in range(3):
            seqs = []
            for conv, history in enumerate(histories[:2 if batch else 1]):
                history.append({"role": "user", "content": questions[conv][turn]})
                seq = engine.new_sequence(engine.chat_prompt(history), SamplingParams(), 16)
                engine.prefill(seq)
                seqs.append(seq)
            while not all(s.finished for s in seqs):
                running = [s for s in seqs if not s.finished]
                engine.step(running)
            for seq, history in zip(seqs, histories):
                engine.stop_sequence(seq)
                answers.append(seq.output)
                cached.append((seq.cached_tokens, len(seq.prompt)))
                history.append({"role": "assistant", "content": engine.tokenizer.decode(seq.output, skip_special_tokens=True)})
        return answers, cached

    for method, batch in (("ar", False), ("logitspec", False), ("logitspec", True)):
        with_cache, cached = conversation(on, method, batch)
        without, uncached = conversation(off, method, batch)
        assert with_cache == without, (method, batch)
        assert all(hit == 0 for hit, _ in uncached)
        later = cached[2 if batch else 1:]  # every turn after the first
        assert all(total - hit <= 60 for hit, total in later), (method, batch, cached)


@pytest.mark.slow
def test_sixteen_requests_sharing_a_system_prompt_hold_its_blocks_once(real_loaded):
    """16 requests admitted together through the scheduler, all opening with the same ~1,000-token
    system prompt: the first computes it, the 15 others find its blocks, and while all 16 run the
    prompt's blocks are held once. Their greedy answers equal those of an engine without caching."""
    from conftest import engines_for
    from decoding.verify import SamplingParams
    from server.scheduler import GenRequest, Scheduler

    engine = engines_for(real_loaded, max_context=1536, max_batch=16)["logitspec"]
    system = " ".join(f"Rule {i}: answer politely and cite the handbook section {i}." for i in range(70))
    prompts = [engine.chat_prompt([{"role": "system", "content": system},
                                   {"role": "user", "content": f"What is {i} plus {i}?"}]) for i in range(16)]
    shared = 0
    while all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    assert shared >= 1000
    scheduler = Scheduler(engine)
    reqs = [GenRequest(prompt=p, params=SamplingParams(), max_tokens=6) for p in prompts]
    scheduler._waiting.extend(reqs)
    scheduler._admit()  # all 16 at once, as the scheduler admits them
    assert len(scheduler._prefilling) == 16
    for req in scheduler._prefilling:  # then prefilled one after another, as its loop does
        assert engine.prefill(req.seq)
    cache = engine.cache
    bs = cache.block_size
    tables = [cache.tables[r.seq.slot] for r in reqs]
    held = {b for t in tables for b in t}
    assert [r.seq.cached_tokens for r in reqs[1:]] == [shared // bs * bs] * 15
    assert all(t[:shared // bs] == tables[0][:shared // bs] for t in tables)
    own = sum(len(t) - shared // bs for t in tables)
    assert len(held) == shared // bs + own and cache.used_blocks == len(held)
    outputs = {id(r): None for r in reqs}
    seqs = [r.seq for r in reqs]
    while not all(s.finished for s in seqs):
        engine.step([s for s in seqs if not s.finished])
    for r in reqs:
        outputs[id(r)] = list(r.seq.output)
        engine.stop_sequence(r.seq)
    reference = engines_for(real_loaded, max_context=1536, prefix_caching=False)["ar"]
    for r in (reqs[0], reqs[7]):
        assert reference.generate(r.prompt, SamplingParams(), 6).output == outputs[id(r)]


def test_a_short_hit_already_at_the_seats_home_is_taken_in_place():
    cache = bare_cache(blocks=32, share_min=3)
    tokens = list(range(1, 10))  # 2 full blocks
    a, _ = run(cache, tokens)
    cache.release(a)
    b = cache.allocate()  # the same seat: its home holds the chain
    assert cache.attach_prefix(b, tokens) == 8 and cache.tables[b] == [0, 1]
    cache.reserve(b, 12)
    assert cache.runs(b, 12) == [(0, 3, 0, 12)] and cache.evicted_blocks == 0
