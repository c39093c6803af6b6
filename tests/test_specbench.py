"""The Spec-Bench harness's bookkeeping, with engines that only record what they are asked: the
methods' order within each turn, each method's own conversation, the tallies and mismatches."""

import io
import json
from collections import Counter
from types import SimpleNamespace

from decoding import specbench
from decoding.config import EngineConfig
from decoding.engine import StepTimes


class RecordingEngine:
    calls: list[tuple[str, str]] = []  # (method, prompt), in the order generate ran

    def __init__(self, config, loaded=None, model=None):
        self.method = config.method
        self.model = model or object()
        self.device = SimpleNamespace(type="cpu")
        self.numerics = "fp32"
        self.times = StepTimes()
        self.tokenizer = SimpleNamespace(decode=lambda ids: " ".join(map(str, ids)))

    def chat_prompt(self, messages):
        return " | ".join(f"{m['role']}:{m['content']}" for m in messages)

    def generate(self, prompt, params, max_new_tokens):
        RecordingEngine.calls.append((self.method, prompt))
        # pld answers like ar; logitspec differs on prompts that hold "odd", to count mismatches.
        output = [len(prompt) % 7, 1, 2] + ([9] if self.method == "logitspec" and "odd" in prompt else [])
        return SimpleNamespace(output=output, steps=2)


def _bench(tmp_path, monkeypatch, methods, questions):
    data = tmp_path / "question.jsonl"
    data.write_text("\n".join(json.dumps(q) for q in questions) + "\n")
    RecordingEngine.calls = []
    monkeypatch.setattr(specbench, "load", lambda model: SimpleNamespace(name="fake"))
    monkeypatch.setattr(specbench, "Engine", RecordingEngine)
    monkeypatch.setattr(specbench, "freeze_start_up_heap", lambda: None)
    return specbench.run_bench(data, methods, None, 8, EngineConfig(), progress=io.StringIO())


def test_each_method_takes_each_place_in_the_turn_order_equally_often(tmp_path, monkeypatch):
    methods = ["ar", "pld", "logitspec"]
    questions = [{"category": c, "turns": [f"{c} one", f"{c} two", f"{c} three"]} for c in ("a", "b")]
    _bench(tmp_path, monkeypatch, methods, questions)
    calls = [m for m, _ in RecordingEngine.calls]
    assert len(calls) == 6 * 3
    turns = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert all(sorted(t) == sorted(methods) for t in turns)  # every method once a turn
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


def test_the_report_splits_each_method_by_its_place_in_the_order(tmp_path, monkeypatch):
    methods = ["ar", "pld"]
    questions = [{"category": "c", "turns": ["one", "two", "three"]}]
    report = _bench(tmp_path, monkeypatch, methods, questions).to_json(methods)
    for m in methods:
        places = report["methods"][m]["by_place"]
        assert sum(p["new_tokens"] for p in places.values()) == report["methods"][m]["overall"]["new_tokens"]
    # ar ran first at turns 1 and 3, second at turn 2 (three tokens each).
    assert {k: p["new_tokens"] for k, p in report["methods"]["ar"]["by_place"].items()} == {"0": 6, "1": 3}
    assert "tok/s by place in the turn's order" in specbench.format_table(report)
