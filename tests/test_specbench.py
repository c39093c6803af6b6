"""The Spec-Bench harness's bookkeeping, with engines that only record what they are asked and a
fake clock: the methods stepping side by side, each method's own conversation, the tallies and
mismatches."""

import io
import json
from collections import Counter
from types import SimpleNamespace

from decoding import specbench
from decoding.config import EngineConfig
from decoding.engine import StepTimes


class Clock:
    now = 0.0

    @staticmethod
    def perf_counter() -> float:
        return Clock.now


class RecordingEngine:
    """Answers [len(prompt) % 7, 1, 2] (logitspec adds a 9 on prompts that hold "odd", to count
    mismatches), one token a step; a step takes STEP[method] on the fake clock, a prefill 0.5."""

    calls: list[tuple[str, str]] = []  # (method, prompt) of each prefill, in order
    steps: list[tuple[str, dict[str, float]]] = []  # (method, every running method's time so far) per step
    engines: dict[str, "RecordingEngine"] = {}  # method -> its engine, to see who is running at a step
    STEP = {"ar": 1.0, "pld": 3.0, "logitspec": 2.0}

    def __init__(self, config, loaded=None, model=None):
        self.method = config.method
        self.model = model or object()
        self.device = SimpleNamespace(type="cpu")
        self.numerics = "fp32"
        self.times = StepTimes()
        self.tokenizer = SimpleNamespace(decode=lambda ids: " ".join(map(str, ids)))
        self.spent, self.seq = 0.0, None
        RecordingEngine.engines[self.method] = self

    def chat_prompt(self, messages):
        return " | ".join(f"{m['role']}:{m['content']}" for m in messages)

    def start_sequence(self, prompt, params, max_new_tokens):
        RecordingEngine.calls.append((self.method, prompt))
        Clock.now += 0.5
        self.spent = 0.5
        answer = [len(prompt) % 7, 1, 2] + ([9] if self.method == "logitspec" and "odd" in prompt else [])
        self.seq = SimpleNamespace(answer=answer, output=[], steps=0, error=None, finished=False)
        return self.seq

    def step(self, seqs):
        seq, = seqs
        running = {m: e.spent for m, e in RecordingEngine.engines.items() if e.running}
        RecordingEngine.steps.append((self.method, running))
        Clock.now += self.STEP[self.method]
        self.spent += self.STEP[self.method]
        seq.output.append(seq.answer[len(seq.output)])
        seq.steps += 1
        seq.finished = len(seq.output) == len(seq.answer)

    @property
    def running(self):
        return self.seq is not None and not self.seq.finished

    def stop_sequence(self, seq):
        self.seq = None


def _bench(tmp_path, monkeypatch, methods, questions):
    data = tmp_path / "question.jsonl"
    data.write_text("\n".join(json.dumps(q) for q in questions) + "\n")
    RecordingEngine.calls, RecordingEngine.steps, RecordingEngine.engines = [], [], {}
    monkeypatch.setattr(specbench, "time", Clock)
    monkeypatch.setattr(specbench, "load", lambda model: SimpleNamespace(name="fake"))
    monkeypatch.setattr(specbench, "Engine", RecordingEngine)
    monkeypatch.setattr(specbench, "freeze_start_up_heap", lambda: None)
    return specbench.run_bench(data, methods, None, 8, EngineConfig(), progress=io.StringIO())


def test_the_method_with_least_time_on_the_turn_steps_next(tmp_path, monkeypatch):
    methods = ["ar", "pld", "logitspec"]
    result = _bench(tmp_path, monkeypatch, methods, [{"category": "c", "turns": ["one", "two"]}])
    assert len(RecordingEngine.steps) == 2 * 3 * 3
    for method, running in RecordingEngine.steps:
        assert running[method] == min(running.values()), (method, running)
    # Turn 1: all start at 0.5, ties go by the turn's order (ar, pld, logitspec); then by time.
    assert [m for m, _ in RecordingEngine.steps[:9]] == [
        "ar", "pld", "logitspec", "ar", "ar", "logitspec", "pld", "logitspec", "pld"]
    # Each method's seconds are its own prefills and steps, not the wall time of the turn.
    assert result.overall["pld"].seconds == 2 * (0.5 + 3 * 3.0)
    assert result.overall["ar"].seconds == 2 * (0.5 + 3 * 1.0)


def test_prefills_rotate_from_turn_to_turn(tmp_path, monkeypatch):
    methods = ["ar", "pld", "logitspec"]
    questions = [{"category": c, "turns": [f"{c} one", f"{c} two", f"{c} three"]} for c in ("a", "b")]
    _bench(tmp_path, monkeypatch, methods, questions)
    calls = [m for m, _ in RecordingEngine.calls]
    turns = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(turns) == 6 and all(sorted(t) == sorted(methods) for t in turns)  # every method once a turn
    for place in range(3):
        assert Counter(t[place] for t in turns) == {m: 2 for m in methods}, place


def test_each_method_keeps_its_own_conversation_and_mismatches_are_counted(tmp_path, monkeypatch):
    methods = ["ar", "pld", "logitspec"]
    questions = [{"category": "c", "turns": ["odd start", "then"]}, {"category": "d", "turns": ["plain"]}]
    result = _bench(tmp_path, monkeypatch, methods, questions)
    prompts = {}
    for m, prompt in RecordingEngine.calls:
        prompts.setdefault(m, []).append(prompt)
    # The second turn's prompt holds that method's own first answer: logitspec's has the extra 9.
    assert prompts["ar"][1] == prompts["pld"][1] != prompts["logitspec"][1]
    assert prompts["logitspec"][1].split("assistant:")[1].split(" |")[0].endswith(" 9")
    assert result.mismatches["pld"] == 0
    assert result.mismatches["logitspec"] == 2  # both turns of the "odd" conversation
    assert result.overall["logitspec"].new_tokens == 3 * 3 + 2
    assert result.categories["d"]["ar"].new_tokens == 3


def test_turn_order_rotates():
    assert [specbench.turn_order(["a", "b", "c"], t) for t in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert specbench.turn_order(["ar"], 5) == ["ar"]
