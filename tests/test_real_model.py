"""End-to-end on the embedded SmolLM2-135M-Instruct: lossless greedy and lossless sampling."""

import json
import re

import pytest
import torch
from scipy.stats import chisquare

from decoding.model import SeqBatchEntry
from decoding.specbench import first_turns
from decoding.verify import SamplingParams, processed_probs, verify_sampling

pytestmark = pytest.mark.slow

CATEGORIES = ("coding", "summarization", "translation")


def prompts(engine):
    return [engine.chat_prompt([{"role": "user", "content": text}]) for text in first_turns(CATEGORIES)]


@pytest.fixture(scope="module")
def transformers_greedy(real_loaded):
    """Greedy continuation by transformers' own model and generate, on the same dequantized weights:
    the reference our `ar` must equal."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real_loaded.folder, dtype=torch.float32).eval()

    def greedy(prompt: list[int], max_new_tokens: int, stop_ids) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stop_ids),
                                 pad_token_id=min(stop_ids))
        tokens = out[0, len(prompt):].tolist()
        return tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens  # ours never emits the stop token

    return greedy


def test_greedy_speculative_outputs_equal_ar(real_engines, transformers_greedy):
    total_ar_steps = total_spec_steps = 0
    for prompt in prompts(real_engines["ar"]):
        ar = real_engines["ar"].generate(prompt, SamplingParams(), 64)
        assert len(ar.output) > 10
        assert ar.output == transformers_greedy(prompt, 64, real_engines["ar"].stop_ids)
        for method in ("pld", "logitspec"):
            seq = real_engines[method].generate(prompt, SamplingParams(), 64)
            assert seq.output == ar.output, (method, real_engines["ar"].tokenizer.decode(ar.output))
        total_ar_steps += ar.steps
        total_spec_steps += seq.steps
    assert total_spec_steps < total_ar_steps  # logitspec accepted drafts somewhere


def test_speculative_sampling_matches_plain_sampling_on_real_logits(real_engines):
    """Tree rejection sampling over the real model's tree logits reproduces the target distribution."""
    engine = real_engines["logitspec"]
    prompt = engine.chat_prompt([{"role": "user", "content": "Name a colour."}])
    seq = engine.start_sequence(prompt, SamplingParams(), 8)
    try:
        # A real LogitSpec tree under the decided root, plus the root's own likeliest next tokens
        # (from a first real forward) so that acceptance, not only rejection, is exercised.
        top = engine._top(seq)
        tree = engine.drafter.propose(seq.index, seq.root, top, top=top)
        tree = tree.subtree(list(range(min(len(tree), 16))))

        def forward(t):
            positions = torch.tensor([seq.past_len + d for d in t.depths])
            return engine.model.forward(torch.tensor(t.tokens), positions,
                                        [SeqBatchEntry(seq.slot, seq.past_len, len(t), t.attention_mask())],
                                        engine.cache)

        for token in forward(tree)[0].topk(4).indices.tolist():
            tree.add(0, token, "top")
        logits = forward(tree)
        assert len(tree.children(0)) >= 5
    finally:
        engine.stop_sequence(seq)
    params = SamplingParams(temperature=1.0, top_k=50)
    target = processed_probs(logits[0:1], params)[0].double()
    g = torch.Generator().manual_seed(0)
    draws = 4000
    counts = torch.zeros_like(target)
    for _ in range(draws):
        path, nxt = verify_sampling(tree, logits, params, g)
        first = tree.tokens[path[1]] if len(path) > 1 else nxt
        counts[first] += 1
    support = target > 0
    assert counts[~support].sum() == 0
    expected = target[support] / target[support].sum() * draws
    assert chisquare(counts[support].numpy(), expected.numpy()).pvalue > 1e-3
    # the drafted children carry real mass, so acceptance was exercised, not bypassed
    drafted = torch.tensor(list(tree.children(0)))
    assert target[drafted].sum() > 0.3


def test_seeded_sampling_same_text_for_every_method(real_engines):
    """Coupled sampling: a seed fixes the text, whatever the drafter and the tree sizes chosen."""
    prompt = real_engines["ar"].chat_prompt([{"role": "user", "content": "Tell me a short story."}])
    p = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
    outputs = {m: e.generate(prompt, p, 32).output for m, e in real_engines.items()}
    assert outputs["pld"] == outputs["ar"] and outputs["logitspec"] == outputs["ar"]
    other = real_engines["ar"].generate(prompt, SamplingParams(temperature=0.8, top_p=0.95, seed=8), 32)
    assert other.output != outputs["ar"]


def test_cli_bench_writes_report(tmp_path):
    from server.cli import main

    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps(q) for q in [
        {"question_id": 1, "category": "coding", "turns": ["Write hello world in Python.", "Now in C."]},
        {"question_id": 2, "category": "qa", "turns": ["What is the capital of France?"]},
    ]))
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["bench", "--data", str(data), "--max-new-tokens", "24", "--json", str(out),
                 "--plot", str(png), "--max-context", "1024"]) == 0
    report = json.loads(out.read_text())
    assert set(report["methods"]) == {"ar", "pld", "logitspec"}
    assert report["mismatches"] == {"pld": 0, "logitspec": 0}
    for m in report["methods"].values():
        assert set(m["overall"]) == {"mat", "tokens_per_s", "speedup", "new_tokens", "steps"}
        assert set(m["categories"]) == {"coding", "qa"}
    assert report["methods"]["ar"]["overall"]["mat"] == 1.0
    assert png.stat().st_size > 10_000


def test_cli_generate_prints_the_greedy_answer(real_engines, transformers_greedy, capsys):
    """`logitspec generate` (greedy, with speculation) prints transformers' greedy answer to the
    same chat prompt, and that answer is right in plain words."""
    from server.cli import main

    question = "What is the capital of France?"
    assert main(["generate", "--prompt", question, "--max-tokens", "16", "--method", "logitspec"]) == 0
    captured = capsys.readouterr()
    engine = real_engines["ar"]
    reference = transformers_greedy(engine.chat_prompt([{"role": "user", "content": question}]), 16, engine.stop_ids)
    text = engine.tokenizer.decode(reference, skip_special_tokens=True)
    assert captured.out == text + "\n"
    assert "Paris" in text and re.fullmatch(r"[\w ,.'-]+[.!]", text), text
    assert "[logitspec] runner native, architecture llama, numerics float32\n" in captured.err
    assert re.search(rf"\[logitspec\] {len(reference)} tokens in \d+ steps .* tok/s, finish: stop", captured.err)


def test_missing_model_path_is_a_clear_error(capsys):
    from server.cli import main

    assert main(["generate", "--prompt", "x", "--model", "/nonexistent/model"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_two_processes_converting_the_same_gguf_both_succeed(tmp_path, monkeypatch):
    """Two first starts at once: the one that renames its converted folder second finds the
    other's already there (os.replace refuses a non-empty folder) and uses it."""
    import os
    import shutil

    import decoding.loader as loader

    monkeypatch.setenv("LOGITSPEC_CACHE", str(tmp_path))
    real_replace = os.replace

    def other_process_first(src, dst):
        shutil.copytree(src, dst)  # the other process's rename lands just before ours
        real_replace(src, dst)

    monkeypatch.setattr(loader.os, "replace", other_process_first)
    folder = loader.convert_gguf(loader.default_model_path())
    assert (folder / "model.safetensors").exists()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # our temporary folder is gone
