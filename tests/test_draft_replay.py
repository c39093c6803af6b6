"""bench/draft_replay.py's cost-aware replay, on a made-up recording (no model)."""

import json
import random
import re
import sys

import pytest

from bench.draft_replay import Replay

CALIBRATION = {1: 0.034, 4: 0.042, 8: 0.049, 16: 0.066, 32: 0.097, 64: 0.163}
COST = ",".join(f"{n}:{1000 * s}" for n, s in CALIBRATION.items())  # the calibration as --cost takes it


def recording(seed: int = 0) -> dict:
    """An answer that copies stretches of its prompt between runs of fresh tokens, and for each
    answer token a top-k whose first entry is that token (greedy)."""
    rng = random.Random(seed)
    prompt = [rng.randrange(100, 1000) for _ in range(300)]
    answer = []
    while len(answer) < 400:
        start = rng.randrange(len(prompt) - 40)
        answer += prompt[start:start + rng.randrange(4, 40)]
        answer += [rng.randrange(1000, 2000) for _ in range(rng.randrange(1, 8))]
    top = [[t] + rng.sample(range(2000, 3000), 63) for t in answer]
    return {"category": "made-up", "prompt": prompt, "answer": answer, "top": top}


@pytest.mark.parametrize("method", ["pld", "logitspec"])
def test_cost_aware_replay_prices_its_steps_and_never_beats_its_oracle(method):
    run = Replay(method, 64, CALIBRATION, {})
    for seed in range(3):
        turn = recording(seed)
        tokens, steps, verified, seconds, oracle = run.turn(turn)
        assert tokens == len(turn["answer"])
        assert steps < tokens  # the copies are found and drafted
        assert verified > steps
        # every step is priced at the size it verified; the oracle verifies only the accepted path
        # of the uncut tree, so it is never slower, and is faster where the cut guessed wrong
        assert seconds >= steps * CALIBRATION[1]
        assert oracle < seconds
    assert run.probes > 0  # plain probes, as the engine makes


def test_drafter_parameters_are_checked():
    run = Replay("logitspec", 64, CALIBRATION, {"recent": "4"})
    assert run.drafter.recent == 4
    with pytest.raises(SystemExit, match="no parameter"):
        Replay("pld", 64, CALIBRATION, {"recent": "4"})


def test_a_shared_index_finds_what_an_earlier_turn_said():
    """With --shared-index, a turn's drafts come from earlier turns too: an answer that repeats
    an earlier answer (and nothing of its own prompt) is drafted from it; without, it is not."""
    first = recording(0)
    rng = random.Random(7)
    second = {**recording(1), "prompt": [rng.randrange(3000, 4000) for _ in range(50)], "answer": first["answer"],
              "top": first["top"]}
    steps = {}
    for shared in (False, True):
        run = Replay("pld", 64, CALIBRATION, {}, shared)
        run.turn(first)
        tokens, steps[shared], *_ = run.turn(second)
    assert steps[True] < tokens / 3 < steps[False]


def test_a_corpus_drafts_an_answer_it_holds_for_logitspec_as_in_the_engine():
    """Replay(corpus=...): LogitSpec retrieves from the corpus as the engine does from the one
    shipped for its model; an answer the corpus holds (and its prompt does not) is drafted."""
    from decoding.corpus import index_answers

    first = recording(0)
    rng = random.Random(7)
    turn = {**first, "prompt": [rng.randrange(3000, 4000) for _ in range(50)]}
    steps = {}
    for corpus in (None, index_answers([first["answer"]])):
        run = Replay("logitspec", 64, CALIBRATION, {}, corpus=corpus)
        tokens, steps[corpus is not None], *_ = run.turn(turn)
    assert steps[True] < tokens / 3 < steps[False]
    assert Replay("pld", 64, CALIBRATION, {}, corpus=index_answers([[1, 2]])).drafter.name == "pld"


def test_questions_keep_their_turns_in_order():
    from bench.draft_replay import questions

    a1 = recording(0)
    a2 = {**recording(1), "prompt": a1["prompt"] + a1["answer"] + [5, 6]}  # a follow-up of a1
    b1 = recording(2)
    groups = questions([a1, a2, b1])
    assert [[id(t) for t in g] for g in groups] == [[id(a1), id(a2)], [id(b1)]]


def test_estimates_that_fell_below_the_floor_rise_again():
    """Statistics learn only from drafted nodes. Once every first node's estimate has fallen below
    the break-even floor, no proposal is made, so only the stretch steps' (which always propose)
    can raise them again: text that repeats is drafted again after a while."""
    from decoding.tree import NodeKind

    run = Replay("pld", 64, CALIBRATION, {})
    for hot in (False, True):
        run.stats.kinds[NodeKind("pld", (), 1, hot)] = [20.0, 0.0]  # 20 offered, none accepted
    assert run.stats.p(NodeKind("pld", (), 1)) < run.cost.break_even(1)
    tokens = steps = 0
    for seed in range(3):
        t, s, *_ = run.turn(recording(seed))
        tokens, steps = tokens + t, steps + s
    assert steps < 0.7 * tokens


def command_line_replay(tmp_path, monkeypatch, capsys, turns: list[dict], *flags: str) -> tuple[str, str]:
    """`draft_replay.py replay --cost COST` of a recording of `turns`, with `flags`: its stdout and stderr."""
    from bench.draft_replay import main

    path = tmp_path / "recording.json"
    path.write_text(json.dumps({"max_new_tokens": 400, "turns": turns}))
    monkeypatch.setattr(sys, "argv", ["draft_replay.py", "replay", str(path), "--cost", COST, *flags])
    assert main() == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_the_command_line_replay_gates_drafts_by_the_engines_margin(tmp_path, monkeypatch, capsys):
    """`replay --cost` runs with the engine's draft margin unless told otherwise, and a margin a
    draft must clear makes the replay draft less (as --draft-margin makes the engine)."""
    turns = [recording(seed) for seed in range(3)]
    verified = {}
    for margin in (None, "0", "1"):
        _, err = command_line_replay(tmp_path, monkeypatch, capsys, turns, "--methods", "pld",
                                     *(["--margin", margin] if margin is not None else []))
        verified[margin] = float(re.search(r"([\d.]+) tokens verified a step", err).group(1))
    assert verified["1"] < verified[None] <= verified["0"]


def test_fresh_statistics_replays_each_category_from_a_cold_start(tmp_path, monkeypatch, capsys):
    """`replay --fresh-statistics` starts each category from empty statistics: a category replayed
    after another reads as it does alone, where one learning run carries the first's statistics
    into the second."""
    turns = [dict(recording(seed), category=category) for seed, category in ((0, "a"), (1, "a"), (2, "b"))]

    def replay(recorded, *flags):
        out, _ = command_line_replay(tmp_path, monkeypatch, capsys, recorded, "--methods", "pld,logitspec", *flags)
        assert "lowest" in out
        return {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if len(line.split()) == 3}

    alone = replay(turns[2:])
    assert replay(turns, "--fresh-statistics")["b"] == alone["b"]
    assert replay(turns)["b"] != alone["b"]


def test_restart_statistics_starts_each_category_from_what_the_others_taught(tmp_path, monkeypatch, capsys):
    """`replay --restart-statistics` starts each category from the statistics the other categories'
    turns taught (a restarted server that kept them): a category alone has nothing to learn from
    and reads as from a cold start, never from its own turns; with another category before or
    after it, it reads otherwise, and the same whichever came first."""
    turns = [dict(recording(seed), category=category) for seed, category in ((0, "a"), (1, "a"), (2, "b"))]

    def replay(recorded, *flags):
        out, _ = command_line_replay(tmp_path, monkeypatch, capsys, recorded, "--methods", "pld,logitspec", *flags)
        return {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if len(line.split()) == 3}

    restarted = replay(turns, "--restart-statistics")
    assert replay(turns[2:], "--restart-statistics")["b"] == replay(turns[2:], "--fresh-statistics")["b"]
    assert restarted["b"] != replay(turns, "--fresh-statistics")["b"]
    assert replay(turns[2:] + turns[:2], "--restart-statistics")["b"] == restarted["b"]
