"""The speedup metrics' arithmetic, on literal step records (no model, no server)."""

import pytest

from decoding.engine import StepRecord
from server.metrics import SPEEDUP_WINDOW, Metrics


def step(emitted: list[int], seconds: float, ar_seconds: float | None) -> StepRecord:
    return StepRecord(batch=len(emitted), tree_sizes=[e + 1 for e in emitted], accepted=[e - 1 for e in emitted],
                      emitted=emitted, seconds=seconds, ar_seconds=ar_seconds)


def metrics() -> Metrics:
    m = Metrics(None, None, None)
    m.registry.unregister(m.engine_collector)  # it reads a live engine; these tests have none
    return m


def value(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name)


def test_speedup_is_plain_time_for_the_tokens_over_time_taken():
    m = metrics()
    # batch of 2: plain decoding costs 0.1 s per step for both, so 3 + 1 tokens = 2 plain steps = 0.2 s
    m.observe_step(step([3, 1], seconds=0.125, ar_seconds=0.1), now=10.0)
    assert value(m, "logitspec_spec_decode_speedup") == pytest.approx(0.2 / 0.125)
    assert value(m, "logitspec_spec_decode_baseline_seconds_total") == pytest.approx(0.2)
    assert value(m, "logitspec_spec_decode_step_seconds_total") == pytest.approx(0.125)
    # a plain step (one token each, at the plain cost) pulls the ratio toward 1
    m.observe_step(step([1, 1], seconds=0.1, ar_seconds=0.1), now=11.0)
    assert value(m, "logitspec_spec_decode_speedup") == pytest.approx(0.3 / 0.225)


def test_speedup_gauge_forgets_steps_older_than_its_window():
    m = metrics()
    m.observe_step(step([4], seconds=0.1, ar_seconds=0.1), now=0.0)
    assert value(m, "logitspec_spec_decode_speedup") == pytest.approx(4.0)
    m.observe_step(step([1], seconds=0.2, ar_seconds=0.1), now=SPEEDUP_WINDOW + 1)
    assert value(m, "logitspec_spec_decode_speedup") == pytest.approx(0.5)
    # the counters keep everything: rate() over any window is the dashboard's business
    assert value(m, "logitspec_spec_decode_baseline_seconds_total") == pytest.approx(0.5)
    assert value(m, "logitspec_spec_decode_step_seconds_total") == pytest.approx(0.3)


def test_steps_without_a_cost_model_leave_speedup_alone():
    m = metrics()
    m.observe_step(step([2], seconds=0.1, ar_seconds=None), now=0.0)
    assert value(m, "logitspec_spec_decode_speedup") == 0.0
    assert value(m, "logitspec_spec_decode_baseline_seconds_total") == 0.0
    assert value(m, "logitspec_generation_tokens_total") == 2.0
