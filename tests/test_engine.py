"""Engine mechanics on a tiny random model: lossless greedy, stops, limits, sampling seeds."""

import pytest
import torch

from decoding.config import EngineConfig
from decoding.engine import Engine
from decoding.verify import SamplingParams
from conftest import engines_for

PROMPT = [2, 10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13, 10, 11]


@pytest.fixture(scope="module")
def engines(tiny_loaded):
    return engines_for(tiny_loaded, max_context=256)


def test_greedy_speculative_equals_ar(engines):
    ar = engines["ar"].generate(PROMPT, SamplingParams(), 60)
    assert len(ar.output) > 0
    for method in ("pld", "logitspec"):
        seq = engines[method].generate(PROMPT, SamplingParams(), 60)
        assert seq.output == ar.output, method
        assert seq.finish_reason == ar.finish_reason


def test_speculation_takes_fewer_steps_on_repetitive_output(tiny_loaded):
    # Full trees: with cost-aware sizing, a start-up calibration timed on a busy machine may
    # rightly decide that no draft pays, which is not what this test is about.
    engines = engines_for(tiny_loaded, max_context=256, adaptive=False)
    ar = engines["ar"].generate(PROMPT, SamplingParams(), 60)
    spec = engines["logitspec"].generate(PROMPT, SamplingParams(), 60)
    assert ar.steps == len(ar.output) or ar.finish_reason == "stop"
    # a random model's greedy output loops quickly, which retrieval must pick up
    assert spec.steps < ar.steps


def test_generate_runs_the_method_a_request_asks_for(tiny_loaded):
    """One engine serves every method: generate(method=...) as a request's method does."""
    engine = engines_for(tiny_loaded, max_context=256, adaptive=False)["logitspec"]
    ar = engine.generate(PROMPT, SamplingParams(), 60, method="ar")
    spec = engine.generate(PROMPT, SamplingParams(), 60)
    assert ar.drafter.name == "ar" and spec.drafter.name == "logitspec"
    assert ar.output == spec.output and spec.steps < ar.steps


def test_max_tokens_exact(tiny_loaded):
    """With no stop token to end it, every method emits exactly max_tokens tokens and finishes on
    "length", also when the step that reaches the limit accepted drafted tokens beyond it."""
    from itertools import accumulate

    exact = engines_for(tiny_loaded, max_context=256, adaptive=False)  # full trees: drafts every step
    for engine in exact.values():
        engine.stop_ids = frozenset()
    reference = exact["ar"].generate(PROMPT, SamplingParams(), 40).output
    for method, engine in exact.items():
        for n in range(1, 41):
            seq = engine.generate(PROMPT, SamplingParams(), n)
            assert (len(seq.output), seq.finish_reason) == (n, "length"), (method, n)
            assert seq.output == reference[:n], (method, n)
        if method != "ar":  # some limits fall inside a step that accepted several tokens: it was cut there
            boundaries = set(accumulate(engine.generate(PROMPT, SamplingParams(), 40).step_sizes))
            assert len(boundaries) < 30 and set(range(1, 41)) - boundaries, method


def test_stop_token_never_emitted(engines, tiny_loaded):
    ar = engines["ar"].generate(PROMPT, SamplingParams(), 40)
    stop_at = ar.output[5]
    for engine in engines.values():
        engine.stop_ids = frozenset({stop_at})
        try:
            seq = engine.generate(PROMPT, SamplingParams(), 40)
        finally:
            engine.stop_ids = engine._stop_ids()
        assert seq.finish_reason == "stop"
        assert stop_at not in seq.output
        assert seq.output == ar.output[:ar.output.index(stop_at)]


def test_seeded_sampling_reproducible(engines):
    params = SamplingParams(temperature=1.0, seed=123)
    for engine in engines.values():
        a = engine.generate(PROMPT, params, 30).output
        b = engine.generate(PROMPT, params, 30).output
        assert a == b


def test_slots_released(engines):
    engine = engines["logitspec"]
    engine.generate(PROMPT, SamplingParams(), 10)
    assert engine.cache.used_slots == 0


def test_context_limit(tiny_loaded):
    engine = Engine(EngineConfig(method="logitspec", max_context=32), loaded=tiny_loaded)
    seq = engine.generate(PROMPT, SamplingParams(), 100)
    assert len(PROMPT) + len(seq.output) <= 32
    assert seq.finish_reason in ("length", "stop")
    with pytest.raises(ValueError):
        engine.generate(list(range(2, 40)), SamplingParams(), 5)


def test_config_validation():
    with pytest.raises(ValueError):
        EngineConfig(method="eagle")
    with pytest.raises(ValueError):
        EngineConfig(max_batch=0)
    with pytest.raises(ValueError):
        EngineConfig(dtype="int3")


def plain_only_cost_model(calibration, max_tokens):
    """A CostModel that learns plain steps only. On the tiny model a 64-token forward costs what a
    1-token one does, so what its drafting steps measure (noise, on a busy machine) moves the
    break-even floor to about 0, where a guess accepted 0 times in 10^6 still 'pays'; the tests
    that use it are about the gating, not about the learning (tests/test_cost_model.py)."""
    from decoding.cost_model import CostModel

    class PlainOnly(CostModel):
        def observe(self, n_tokens, seconds, batch=1):
            if n_tokens == batch:
                super().observe(n_tokens, seconds, batch)

        def settle(self, *args, **kwargs):
            pass

    return PlainOnly(calibration, max_tokens=max_tokens)


@pytest.mark.parametrize("calibration, proposes", [
    # every token costs a whole step: no draft can pay, so none is built but on stretch steps (so
    # that estimates which fell below the floor can rise again)
    ({1: 1.0, 64: 64.0}, False),
    ({1: 1.0, 64: 1.0}, True),  # tokens are free: every step builds its full proposal
])
def test_proposals_skipped_when_no_node_could_pay(tiny_loaded, calibration, proposes, monkeypatch):
    import decoding.engine as engine_module

    probes, stretches = [], []
    is_probe, is_stretch = engine_module.is_probe, engine_module.is_stretch
    monkeypatch.setattr(engine_module, "is_probe", lambda *a: probes.append(is_probe(*a)) or probes[-1])
    monkeypatch.setattr(engine_module, "is_stretch", lambda *a: stretches.append(is_stretch(*a)) or stretches[-1])
    engine = Engine(EngineConfig(method="logitspec", max_context=256, adaptive=False), loaded=tiny_loaded)
    engine.cost = plain_only_cost_model(calibration, max_tokens=64)
    calls = []
    propose = engine.drafter.propose
    engine.drafter.propose = lambda *a: calls.append(1) or propose(*a)
    prompt = [2, 7, 8, 9, 7, 8, 9, 7, 8, 9]
    seq = engine.start_sequence(prompt, SamplingParams(), 12)
    steps = 0
    while not seq.finished:
        engine.step([seq])
        steps += 1
    engine.stop_sequence(seq)
    assert len(probes) == steps and 0 < sum(probes) < steps
    stretched = sum(s and not p for s, p in zip(stretches, probes))
    assert proposes or stretched > 0
    assert len(calls) == (steps - sum(probes) if proposes else stretched)
    assert seq.output == engine.generate(prompt, SamplingParams(), 12).output


@pytest.mark.parametrize("guesses_fail", [True, False])
def test_branches_that_cannot_pay_are_not_built(tiny_loaded, guesses_fail):
    """Where guesses have shown they are (almost) never accepted, LogitSpec proposes without them
    (no guess branches, no retrievals for them) while its next-token branch, which may pay, is
    still built."""
    from decoding.tree import NodeKind

    engine = Engine(EngineConfig(method="logitspec", max_context=256), loaded=tiny_loaded)
    engine.cost = plain_only_cost_model({1: 1.0, 64: 2.0}, max_tokens=64)  # a draft token costs 1/63 of a step
    assert engine.cost.break_even() > 1e-3
    if guesses_fail:
        for hot in (False, True):
            engine.stats.kinds[NodeKind("guess", (), 1, hot)] = [1e6, 0.0]
    seen = []
    propose = engine.drafter.propose
    tops = []
    engine.drafter.propose = lambda index, x0, guesses, echoes=(), top=(): (
        seen.append(guesses), tops.append(top)) and propose(index, x0, guesses, echoes, top)
    prompt = [2, 7, 8, 9, 7, 8, 9, 7, 8, 9]
    seq = engine.generate(prompt, SamplingParams(), 12)
    assert engine.cost.break_even() > 1e-3
    assert seen, "the next-token branch could pay, so proposals were made"
    assert all(g == [] for g in seen) == guesses_fail
    # the last logit's top tokens still confirm retrieved first tokens (LogitSpecDrafter._confirm)
    assert all(len(top) == engine.drafter.confirm + 1 for top in tops)
    assert seq.output == engine.generate(prompt, SamplingParams(), 12).output


def test_echoes_come_from_rejected_nodes_at_or_holding_the_new_root():
    import torch
    from types import SimpleNamespace

    from decoding.drafters import LogitSpecDrafter
    from decoding.tree import DraftTree

    # root 5 -> 7 (accepted) -> 9 (rejected); root 5 -> 8 -> 4 -> 2 (rejected: 8 is not what
    # follows 5); 7 -> 3 -> 8 (rejected, deeper)
    tree = DraftTree.root(5)
    n7 = tree.add(0, 7, "a")
    n7_9 = tree.add(n7, 9, "a")
    n8 = tree.add(0, 8, "b")
    n8_4 = tree.add(n8, 4, "b")
    tree.add(n8_4, 2, "b")
    n7_3 = tree.add(n7, 3, "c")
    deep8 = tree.add(n7_3, 8, "c")
    best = [7, 8, 5, 4, 1, 0, 8, 6]  # per node; after 7 the target says 8: 8 is the new root
    logits = torch.full((len(tree), 10), -1.0)
    logits[torch.arange(len(tree)), torch.tensor(best)] = 1.0
    seq = SimpleNamespace(root=8, drafter=LogitSpecDrafter(echoes=4), echoes=[])
    # Nodes holding 8: under n8 the target agreed with 4 (then said 1, not 2), so its echo is
    # 4 1; deep8's is 6. Nodes where 8 now sits (the rejected children of 7): 9 predicts 5; 3
    # predicts 8, which is its child, which predicts 6.
    expected = [("t", [4, 1]), ("t", [6]), ("s", [best[n7_9]]), ("s", [8, 6])]
    Engine._keep_echoes(seq, tree, [0, n7], logits, None)
    assert seq.echoes == expected
    Engine._keep_echoes(seq, tree, [0, n7], logits, best)
    assert seq.echoes == expected
    seq.drafter = LogitSpecDrafter(echoes=1)  # at most 1 of each
    Engine._keep_echoes(seq, tree, [0, n7], logits, best)
    assert seq.echoes == [("t", [4, 1]), ("s", [5])]
    seq.root = 1  # no rejected node holds the new root: the siblings' predictions only
    Engine._keep_echoes(seq, tree, [0, n7], logits, best)
    assert seq.echoes == [("s", [5])]
    Engine._keep_echoes(seq, tree, [0, n7, n7_3, deep8], logits, best)  # nothing rejected below deep8
    assert seq.echoes == []


@pytest.mark.parametrize("mode, calls_per_layer", [("auto", 1), ("per-sequence", 3)])
def test_a_plain_batched_step_makes_one_attention_call_per_layer(tiny_loaded, mode, calls_per_layer):
    engine = Engine(EngineConfig(method="ar", max_batch=4, max_context=128, adaptive=False), loaded=tiny_loaded)
    engine.model.attention_mode = mode
    seqs = [engine.start_sequence([2, 10 + i, 11, 12], SamplingParams(), 8) for i in range(3)]
    before = engine.times.attention_calls
    engine.step(seqs)
    assert engine.times.attention_calls - before == calls_per_layer * engine.model.config.num_layers
    for seq in seqs:
        engine.stop_sequence(seq)


@pytest.mark.parametrize("scan", ["torch", "kernel"])
@pytest.mark.parametrize("vocab", [49152, 32064, 1000, 97])
def test_row_summary_is_torchs_argmax_first_of_ties_and_finiteness(vocab, scan):
    from decoding import cpu_linear
    from decoding.engine import row_summary

    lib = None
    if scan == "kernel":
        lib = cpu_linear.kernel()
        if lib is None:
            pytest.skip(f"no CPU kernel here: {cpu_linear.unavailable_reason()}")

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=g)
    logits[0, [3, vocab // 2, vocab - 1]] = 40.0  # ties: the first wins
    logits[1, vocab - 1] = 40.0  # the maximum in the last block
    logits[2, 5] = float("nan")
    logits[3, 7] = float("inf")
    logits[4, 9] = float("-inf")
    logits[5] = float("-inf")  # a fully masked row
    logits[5, vocab - 2] = 0.0
    logits[6] = 3.0  # every token tied
    best, finite = row_summary(logits, lib)
    assert best[:2] == [3, vocab - 1]
    assert [b for i, b in enumerate(best) if i not in (2, 3)] == \
        [b for i, b in enumerate(logits.max(-1).indices.tolist()) if i not in (2, 3)]
    assert best[6] == 0
    assert finite == [True, True, False, False, False, False, True, True, True]
