"""Acceptance statistics survive a restart (decoding/statistics_cache.py): a server saves them as
requests end and when it stops, and the next one on the same model starts from them. A process
with nothing saved starts from the prior shipped for its model."""

import json

import pytest

from decoding import statistics_cache
from decoding.config import EngineConfig
from decoding.cost_model import AcceptanceStats
from decoding.engine import Engine
from decoding.tree import DraftTree, NodeKind
from decoding.verify import SamplingParams
from server.scheduler import Scheduler

NEXT = NodeKind("next", ("m2", "s3"), 1)
PLD = NodeKind("pld", ("m1",), 1)


def chain(kinds: list[NodeKind]) -> DraftTree:
    tree = DraftTree.root(0)
    tree.add_chain(0, list(range(1, len(kinds) + 1)), kinds)
    return tree


def taught() -> AcceptanceStats:
    """Statistics that saw fine and coarse kinds, hot and cold, accepted and not."""
    stats = AcceptanceStats()
    deeper = [NEXT, NEXT._replace(depth=2), NEXT._replace(depth=3)]
    for step in range(40):
        stats.record(chain(deeper), list(range(step % 4)))
        stats.record(chain([k.heated() for k in deeper]), [0, 1, 2, 3] if step % 3 else [0])
        stats.record(chain([PLD, PLD._replace(depth=2)]), [0, 1] if step % 5 == 0 else [0])
    return stats


def test_state_round_trips_through_json_to_the_same_estimates():
    stats = taught()
    restored = AcceptanceStats()
    restored.record(chain([NodeKind("echo", ("t0",), 1)]), [0])  # replaced, not merged
    assert restored.restore(json.loads(json.dumps(stats.state()))) == len(stats.kinds)
    assert restored.kinds == stats.kinds
    probes = [*stats.kinds, NodeKind("next", ("m2", "s0"), 1), NodeKind("next", ("m2", "s3"), 5, True),
              NodeKind("guess", ("r1",), 1), PLD.detailed("c1")]  # unseen kinds borrow from seen ones
    assert [restored.p(k) for k in probes] == [stats.p(k) for k in probes]
    assert len({stats.p(k) for k in probes}) > 3


@pytest.mark.parametrize("bad", [
    [],  # not a dict
    {},
    {"kinds": [["next", ["m2"], 1, False, 2.0]]},  # a count missing
    {"kinds": [["next", ["m2"], 1, False, 2.0, 3.0]]},  # more accepted than offered
    {"kinds": [["next", ["m2"], 1, False, -1.0, -1.0]]},
    {"kinds": [["next", ["m2"], 1, False, 501.0, 1.0]]},  # decayed counting (0.998) stays below 500
    {"kinds": [["next", ["m2"], 1, False, float("nan"), 0.0]]},
    {"kinds": [["next", ["m2"], 1, "yes", 2.0, 1.0]]},
    {"kinds": [["next", ["m2"], 0, False, 2.0, 1.0]]},  # the root is no draft node
    {"kinds": [["next", ["m2"], "one", False, 2.0, 1.0]]},
])
def test_restore_refuses_what_counting_cannot_make_and_keeps_its_own(bad):
    stats = taught()
    before = {k: list(v) for k, v in stats.kinds.items()}
    with pytest.raises(ValueError):
        stats.restore(bad)
    assert stats.kinds == before


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITSPEC_STATISTICS_CACHE", str(tmp_path / "statistics"))
    return tmp_path / "statistics"


def start(tiny_loaded, model=None, **config) -> Engine:
    # adaptive=False: every tree is verified whole, so that the tiny random model's repetitive
    # output teaches the statistics something on every step
    return Engine(EngineConfig(method="logitspec", max_context=256, adaptive=False, **config),
                  loaded=tiny_loaded, model=model)


def teach(engine: Engine) -> None:
    engine.generate([5, 6, 7, 8] * 10, SamplingParams(), 48)
    assert engine.stats.kinds


def test_a_restarted_engine_starts_from_what_the_last_one_saved(tiny_loaded, folder, capsys):
    first = start(tiny_loaded, persist_statistics=True)
    assert "none saved" in capsys.readouterr().err
    teach(first)
    assert first.save_statistics(force=False) is None  # the last save (the start) is not a minute old
    path = first.save_statistics()
    assert path.parent == folder and path.exists()
    second = start(tiny_loaded, model=first.model, persist_statistics=True)
    assert f"{len(first.stats.kinds)} node kinds from {path}" in capsys.readouterr().err
    assert second.stats.kinds == first.stats.kinds
    assert start(tiny_loaded, model=first.model).stats.kinds == {}  # persist_statistics off: none read
    # another model (here: another config) has its own entry
    other = type(tiny_loaded)(tiny_loaded.name, tiny_loaded.folder, {**tiny_loaded.hf_config, "rms_norm_eps": 1e-6},
                              tiny_loaded.state, tiny_loaded.tokenizer)
    assert start(other, model=first.model, persist_statistics=True).stats.kinds == {}


def test_requests_that_end_save_them_once_a_save_is_due(tiny_loaded, folder, monkeypatch):
    engine = start(tiny_loaded, persist_statistics=True)
    teach(engine)
    assert not folder.exists()  # not due yet
    monkeypatch.setattr(statistics_cache, "SAVE_EVERY", 0.0)
    teach(engine)  # its sequence's end saves
    saved = json.loads(next(folder.glob("*.json")).read_text())
    assert AcceptanceStats().restore(saved["statistics"]) == len(engine.stats.kinds)


def test_what_is_not_statistics_is_not_read_and_is_replaced(tiny_loaded, folder, capsys):
    engine = start(tiny_loaded, persist_statistics=True)
    path = statistics_cache.entry_path(engine._statistics_key)
    path.parent.mkdir(parents=True)
    for text in ("{not json", json.dumps({"key": engine._statistics_key, "saved_at": "x",
                                          "statistics": {"kinds": [["next", [], 1, False, 1.0, 2.0]]}})):
        path.write_text(text)
        capsys.readouterr()
        again = start(tiny_loaded, model=engine.model, persist_statistics=True)
        assert again.stats.kinds == {}
        assert ("not used" if text.startswith("{\"") else "none saved") in capsys.readouterr().err
    teach(again)
    assert again.save_statistics() == path
    assert start(tiny_loaded, model=engine.model, persist_statistics=True).stats.kinds == again.stats.kinds


def test_an_unwritable_folder_does_not_stop_the_engine(tiny_loaded, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LOGITSPEC_STATISTICS_CACHE", str(tmp_path / "file" / "statistics"))
    engine = start(tiny_loaded, persist_statistics=True)
    teach(engine)
    assert engine.save_statistics() is None


def test_the_server_saves_them_when_it_stops(tiny_loaded, folder):
    engine = start(tiny_loaded, persist_statistics=True)
    teach(engine)
    scheduler = Scheduler(engine)
    scheduler.start()
    assert not folder.exists()
    scheduler.shutdown()
    saved = json.loads(next(folder.glob("*.json")).read_text())
    restored = AcceptanceStats()
    restored.restore(saved["statistics"])
    assert restored.kinds == engine.stats.kinds


def test_serve_keeps_them_and_generate_and_bench_start_fresh():
    from server.cli import _config, build_parser

    parser = build_parser()

    def persists(*argv: str) -> bool:
        return _config(parser.parse_args(list(argv)), "logitspec").persist_statistics

    assert persists("serve")
    assert not persists("serve", "--no-persist-statistics")
    assert not persists("generate", "--prompt", "hi")
    assert not persists("bench")  # a benchmark measures a fresh start

    def prior(*argv: str) -> bool:
        return _config(parser.parse_args(list(argv)), "logitspec").prior_statistics

    assert prior("serve") and prior("generate", "--prompt", "hi") and prior("bench")
    assert not prior("serve", "--no-prior-statistics")
    assert not prior("bench", "--no-prior-statistics")


def test_a_real_server_saves_them_at_sigterm_for_the_next_one(tmp_path):
    """`logitspec serve` on the default model, end to end: what its requests taught is in the
    statistics file once SIGTERM has stopped it (not before: a save is due once a minute), in a
    form the next server reads."""
    from tests.server_process import ServerProcess

    folder = tmp_path / "statistics"
    server = ServerProcess("--max-running", "1", env={"LOGITSPEC_STATISTICS_CACHE": str(folder)})
    try:
        client = server.openai_client(timeout=120)
        model = client.models.list().data[0].id
        for text in ("Count from 1 to 30, separated by commas.", "List the weekdays twice."):
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                           max_tokens=80, temperature=0)
        assert not folder.exists()
    finally:
        server.stop()
    assert server.proc.returncode == 0
    saved = json.loads(next(folder.glob("SmolLM2*.json")).read_text())
    restored = AcceptanceStats()
    assert restored.restore(saved["statistics"]) > 0
    assert any(offered > 0 for offered, _ in restored.kinds.values())


def test_a_first_start_reads_the_prior_shipped_for_its_model(tiny_loaded, folder, priors, capsys):
    shipped = taught()
    path = statistics_cache.write_prior(tiny_loaded, shipped.state(), "a test")
    assert path.parent == priors
    first = start(tiny_loaded)
    assert "from the prior shipped for this model" in capsys.readouterr().err
    # counts to 4 decimals in the file: the same kinds, estimates within rounding
    assert first.stats.kinds.keys() == shipped.kinds.keys()
    assert all(first.stats.p(k) == pytest.approx(shipped.p(k), abs=1e-4) for k in shipped.kinds)
    assert start(tiny_loaded, model=first.model, prior_statistics=False).stats.kinds == {}
    # a server with nothing saved starts from the prior too; once it has saved, from what it saved
    served = start(tiny_loaded, model=first.model, persist_statistics=True)
    assert served.stats.kinds == first.stats.kinds
    served.stats = AcceptanceStats()
    teach(served)
    served.save_statistics()
    assert start(tiny_loaded, model=first.model, persist_statistics=True).stats.kinds == served.stats.kinds
    # another model of the same name, or a prior of an older format, is not read
    other = type(tiny_loaded)(tiny_loaded.name, tiny_loaded.folder, {**tiny_loaded.hf_config, "num_hidden_layers": 3},
                              tiny_loaded.state, tiny_loaded.tokenizer)
    assert statistics_cache.load_prior(other) is None
    assert statistics_cache.load_prior(tiny_loaded) is not None
    entry = json.loads(path.read_text())
    entry["key"]["format"] -= 1
    path.write_text(json.dumps(entry))
    assert start(tiny_loaded, model=first.model).stats.kinds == {}


def test_a_prior_that_counting_cannot_make_is_not_used(tiny_loaded, priors, capsys):
    state = taught().state()
    state["kinds"][0][5] = state["kinds"][0][4] + 1  # more accepted than offered
    statistics_cache.write_prior(tiny_loaded, state, "a test")
    assert start(tiny_loaded).stats.kinds == {}
    assert "not used" in capsys.readouterr().err


@pytest.mark.slow
def test_the_default_model_ships_a_prior_of_the_drafters_kinds(real_loaded):
    """The shipped prior is keyed to the embedded model and of this FORMAT (bench/make_prior.py
    writes it again when kinds change), and holds the kinds logitspec (with the shipped corpus)
    and pld draft."""
    state = statistics_cache.load_prior(real_loaded)
    assert state is not None, "no prior for the default model: run bench/make_prior.py"
    stats = AcceptanceStats()
    assert stats.restore(state) > 100
    families = {k.family for k in stats.kinds}
    assert {"next", "pld", "guess", "corpus"} <= families <= {"next", "pld", "guess", "echo", "forced", "corpus"}
    assert any(k.hot for k in stats.kinds) and any(a > 0 for _, a in stats.kinds.values())
