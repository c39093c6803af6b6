"""Engine mechanics on a tiny random model: lossless greedy, stops, limits, sampling seeds."""

import pytest

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


def test_speculation_takes_fewer_steps_on_repetitive_output(engines):
    ar = engines["ar"].generate(PROMPT, SamplingParams(), 60)
    spec = engines["logitspec"].generate(PROMPT, SamplingParams(), 60)
    assert ar.steps == len(ar.output) or ar.finish_reason == "stop"
    # a random model's greedy output loops quickly, which retrieval must pick up
    assert spec.steps < ar.steps


def test_max_tokens_exact(engines):
    for method, engine in engines.items():
        for n in (1, 2, 7):
            seq = engine.generate(PROMPT, SamplingParams(), n)
            assert len(seq.output) <= n
            if seq.finish_reason == "length":
                assert len(seq.output) == n


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


@pytest.mark.parametrize("calibration, proposes", [
    ({1: 1.0, 64: 64.0}, False),  # every token costs a whole step: no draft can pay, so none is built
    ({1: 1.0, 64: 1.0}, True),  # tokens are free: every step builds its full proposal
])
def test_proposals_skipped_when_no_node_could_pay(tiny_loaded, calibration, proposes):
    from decoding.cost_model import CostModel

    engine = Engine(EngineConfig(method="logitspec", max_context=256, adaptive=False), loaded=tiny_loaded)
    engine.cost = CostModel(calibration, max_tokens=64)
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
    probes = steps // 32
    assert len(calls) == (steps - probes if proposes else 0)
    assert seq.output == engine.generate(prompt, SamplingParams(), 12).output
