"""The llama.cpp runner (--dtype gguf) on the embedded default model's GGUF file: tree rows equal
plain steps bit for bit, so speculation stays lossless at these numerics."""

import random

import pytest
import torch

from decoding.config import EngineConfig
from decoding.engine import Engine
from decoding.loader import default_model_path, load
from decoding.llama_cpp_runner import LlamaCppRunner
from decoding.model import SeqBatchEntry
from decoding.specbench import first_turns
from decoding.verify import SamplingParams
from tests.conftest import engines_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_loaded():
    return load(None, weights=False)


@pytest.fixture(scope="module")
def runner(gguf_loaded):
    return LlamaCppRunner(default_model_path(), gguf_loaded.hf_config, threads=2)


def _forward(runner, cache, slot, past, tokens, mask, rows=None):
    n = len(tokens)
    depths = list(range(n)) if mask is None else (mask.sum(1) - 1).tolist()
    return runner.forward(torch.tensor(tokens), torch.tensor([past + d for d in depths]),
                          [SeqBatchEntry(slot, past, n, mask)], cache, rows)


def _random_tree(rng, true_path, extra):
    """A tree holding `true_path` as one branch among `extra` random nodes, its rows in a random
    order with parents first: (tokens, tree mask, the true path's rows)."""
    tokens, parents = [true_path[0]], [-1]
    for _ in range(extra):
        tokens.append(rng.randrange(100, 40000))
        parents.append(rng.randrange(len(tokens) - 1))
    true = [0]
    for t in true_path[1:]:
        tokens.append(t)
        parents.append(true[-1])
        true.append(len(tokens) - 1)
    order, placed = [], set()
    pending = list(range(len(tokens)))
    rng.shuffle(pending)
    while pending:
        j = next(j for j in pending if parents[j] < 0 or parents[j] in placed)
        pending.remove(j)
        placed.add(j)
        order.append(j)
    row = {j: i for i, j in enumerate(order)}
    mask = torch.zeros(len(order), len(order), dtype=torch.bool)
    for i, j in enumerate(order):
        while j >= 0:
            mask[i, row[j]] = True
            j = parents[j]
    return [tokens[j] for j in order], mask, [row[j] for j in true]


@pytest.mark.parametrize("prompt_len", [60, 600])  # 600: past the 512 cells where f16 K/V split a row's sum
def test_tree_rows_equal_plain_steps_bit_for_bit(runner, prompt_len):
    """Random trees, each holding the true continuation as one branch, with a random accepted
    prefix of it kept: every accepted row's logits equal a plain one-token step's, exactly, and so
    do the plain steps that follow kept trees (rejected cells among kept ones stay out of the way)."""
    rng = random.Random(prompt_len)
    cache = runner.new_cache(1, 2048)
    prompt = [rng.randrange(100, 40000) for _ in range(prompt_len)]
    text = [rng.randrange(100, 40000) for _ in range(70)]
    slot = cache.allocate()
    _forward(runner, cache, slot, 0, prompt, None, torch.tensor([prompt_len - 1]))
    plain = []
    for i, t in enumerate(text):
        plain.append(_forward(runner, cache, slot, prompt_len + i, [t], None)[0])
        cache.keep(slot, prompt_len + i, [0])
    cache.release(slot)

    slot = cache.allocate()
    _forward(runner, cache, slot, 0, prompt, None, torch.tensor([prompt_len - 1]))
    i, compared = 0, 0
    while i < len(text) - 16:
        depth = rng.randrange(0, 12)
        tokens, mask, true_rows = _random_tree(rng, text[i:i + depth + 1], rng.randrange(1, 20))
        logits = _forward(runner, cache, slot, prompt_len + i, tokens, mask)
        accepted = true_rows[:rng.randrange(0, depth + 1) + 1]
        for d, row in enumerate(accepted):
            assert torch.equal(logits[row], plain[i + d]), (i + d, (logits[row] - plain[i + d]).abs().max())
            compared += 1
        cache.keep(slot, prompt_len + i, accepted)
        i += len(accepted)
    graveyard = cache.context(slot).graveyard
    for j in range(i, len(text)):  # plain steps after the trees
        assert torch.equal(_forward(runner, cache, slot, prompt_len + j, [text[j]], None)[0], plain[j])
        cache.keep(slot, prompt_len + j, [0])
    assert compared > 20 and graveyard > 0  # rejected cells did lie among kept ones


@pytest.fixture(scope="module")
def gguf_engines(gguf_loaded):
    # Full trees (no cost model): llama.cpp's multi-row forwards are dear on a small CPU, and
    # adaptive sizing would rarely draft here, which would test nothing.
    return engines_for(gguf_loaded, dtype="gguf", threads=2, adaptive=False, tree_capacity=24, max_context=2048)


def test_greedy_speculative_outputs_equal_ar_on_gguf(gguf_engines):
    total_ar = total_spec = 0
    for text in first_turns(("coding", "extraction", "translation")):
        prompt = gguf_engines["ar"].chat_prompt([{"role": "user", "content": text}])
        ar = gguf_engines["ar"].generate(prompt, SamplingParams(), 64)
        assert len(ar.output) > 10
        for method in ("pld", "logitspec"):
            seq = gguf_engines[method].generate(prompt, SamplingParams(), 64)
            assert seq.output == ar.output, method
        total_ar += ar.steps
        total_spec += seq.steps
    assert total_spec < total_ar  # drafts were accepted


def test_two_sequences_in_one_step_equal_each_alone(gguf_engines, gguf_loaded):
    engine = Engine(EngineConfig(method="logitspec", dtype="gguf", threads=2, adaptive=False, tree_capacity=16,
                                 max_batch=2, max_context=2048), loaded=gguf_loaded, model=gguf_engines["ar"].model)
    prompts = [engine.chat_prompt([{"role": "user", "content": t}]) for t in first_turns(("qa", "rag"))]
    seqs = [engine.start_sequence(p, SamplingParams(), 48) for p in prompts]
    while not all(s.finished for s in seqs):
        engine.step([s for s in seqs if not s.finished])
    for seq, prompt in zip(seqs, prompts):
        engine.stop_sequence(seq)
        assert seq.output == gguf_engines["ar"].generate(prompt, SamplingParams(), 48).output


def test_dtype_gguf_needs_a_gguf_file(tiny_loaded):
    with pytest.raises(ValueError, match="needs a .gguf model file"):
        Engine(EngineConfig(dtype="gguf"), loaded=tiny_loaded)


def test_dtype_gguf_is_for_the_llama_cpp_runner():
    with pytest.raises(ValueError, match="llama.cpp runner"):
        EngineConfig(dtype="gguf", runner="native")
