"""The start-up calibration is cached per machine and model: a second engine with the same key
reads it instead of timing forwards, and any change of key (or --recalibrate) times them again."""

import dataclasses
import json

import pytest

from decoding import calibration_cache
from decoding.config import EngineConfig
from decoding.engine import Engine


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITSPEC_CACHE", str(tmp_path))
    monkeypatch.delenv("LOGITSPEC_CALIBRATION_CACHE", raising=False)  # conftest's per-run folder
    return tmp_path / "calibration"


@pytest.fixture
def forwards(monkeypatch):
    """Counts the engine's forwards (the calibration is the only one an engine runs at start-up)."""
    calls = []
    original = Engine._forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_forward", counted)
    return calls


def start(tiny_loaded, forwards, model=None, **config) -> tuple[Engine, int]:
    before = len(forwards)
    engine = Engine(EngineConfig(method="logitspec", max_context=256, **config), loaded=tiny_loaded, model=model)
    return engine, len(forwards) - before


def costs(engine: Engine) -> list[float]:
    return [engine.cost.cost(n) for n in range(1, engine.config.tree_capacity + 1)]


def test_second_start_reads_the_cache_without_timing_forwards(tiny_loaded, cache, forwards, capsys):
    first, timed = start(tiny_loaded, forwards, calibration_rounds=2)
    assert timed == 1 + 2 * 12  # the context, then 2 rounds of 12 sizes
    assert len(list(cache.glob("*.json"))) == 1
    assert "measured in" in capsys.readouterr().err
    second, timed = start(tiny_loaded, forwards, model=first.model, calibration_rounds=2)
    assert timed == 0
    assert "(cached " in capsys.readouterr().err
    assert costs(second) == costs(first)
    # The batch size is not in the key: a server start reads what generate measured.
    _, timed = start(tiny_loaded, forwards, model=first.model, calibration_rounds=2, max_batch=4)
    assert timed == 0


@pytest.mark.parametrize("change", ["tree_capacity", "processor", "dtype", "runner", "model", "more_rounds",
                                    "recalibrate"])
def test_a_different_key_or_recalibrate_measures_again(tiny_loaded, cache, forwards, monkeypatch, change):
    first, _ = start(tiny_loaded, forwards, calibration_rounds=1)
    config, model = {"calibration_rounds": 1}, first.model
    if change == "tree_capacity":
        config["tree_capacity"] = 16
    elif change == "processor":
        monkeypatch.setattr(calibration_cache, "processor_name", lambda: "Another CPU")
    elif change == "dtype":
        config["dtype"], model = "bfloat16", None
    elif change == "runner":
        config["runner"], model = "transformers", None
    elif change == "model":
        other = dataclasses.replace(tiny_loaded, hf_config={**tiny_loaded.hf_config, "rms_norm_eps": 1e-6})
        _, timed = start(other, forwards, calibration_rounds=1)
        assert timed > 0
        return
    elif change == "more_rounds":  # a quick calibration never stands in for a longer one
        config["calibration_rounds"] = 2
    else:
        config["recalibrate"] = True
    _, timed = start(tiny_loaded, forwards, model=model, **config)
    assert timed > 0


def test_fewer_rounds_read_a_longer_calibration(tiny_loaded, cache, forwards):
    first, _ = start(tiny_loaded, forwards, calibration_rounds=2)
    _, timed = start(tiny_loaded, forwards, model=first.model, calibration_rounds=1)
    assert timed == 0


def test_unreadable_entry_is_measured_again_and_replaced(tiny_loaded, cache, forwards):
    first, _ = start(tiny_loaded, forwards, calibration_rounds=1)
    (entry,) = cache.glob("*.json")
    entry.write_text("{not json")
    _, timed = start(tiny_loaded, forwards, model=first.model, calibration_rounds=1)
    assert timed > 0
    assert json.loads(entry.read_text())["rounds"] == 1


def test_ar_alone_does_not_calibrate(tiny_loaded, cache, forwards):
    engine = Engine(EngineConfig(method="ar", max_context=256), loaded=tiny_loaded)
    assert engine.cost is None and not forwards and not cache.exists()
