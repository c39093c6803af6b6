"""bench/draft_replay.py's cost-aware replay, on a made-up recording (no model)."""

import random

import pytest

from bench.draft_replay import Replay

CALIBRATION = {1: 0.034, 4: 0.042, 8: 0.049, 16: 0.066, 32: 0.097, 64: 0.163}


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
