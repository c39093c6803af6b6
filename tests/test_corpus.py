"""LogitSpec's corpus (decoding/corpus.py): the model's own answers shipped for it, read at start
for that model only, drafted from as one more branch, and lossless like every other."""

import json

import pytest

from decoding import corpus
from decoding.config import EngineConfig
from decoding.engine import Engine
from decoding.verify import SamplingParams


def start(tiny_loaded, model=None, method="logitspec", **config) -> Engine:
    # adaptive=False: every tree is verified whole, so the corpus's nodes are verified every step
    return Engine(EngineConfig(method=method, max_context=256, adaptive=False, prior_statistics=False, **config),
                  loaded=tiny_loaded, model=model)


def test_a_corpus_is_read_for_its_own_model_only(tiny_loaded, priors, capsys):
    path = corpus.write_corpus(tiny_loaded, [[5, 6, 7], [8, 9]], "a test")
    assert path == priors / f"{tiny_loaded.name}.corpus.json"
    engine = start(tiny_loaded)
    assert "corpus: 2 answers (5 tokens) shipped for this model" in capsys.readouterr().err
    index = engine.drafters["logitspec"].corpus
    assert index.tokens == [5, 6, 7, corpus.CORPUS_SEPARATOR, 8, 9, corpus.CORPUS_SEPARATOR]
    assert start(tiny_loaded, model=engine.model, corpus=False).drafters["logitspec"].corpus is None
    # another model of the same name, an older format, or a token the model cannot embed: not read
    other = type(tiny_loaded)(tiny_loaded.name, tiny_loaded.folder, {**tiny_loaded.hf_config, "num_hidden_layers": 3},
                              tiny_loaded.state, tiny_loaded.tokenizer)
    assert corpus.load_corpus(other) is None and corpus.load_corpus(tiny_loaded) is not None
    entry = json.loads(path.read_text())
    entry["key"]["format"] -= 1
    path.write_text(json.dumps(entry))
    assert corpus.load_corpus(tiny_loaded) is None
    corpus.write_corpus(tiny_loaded, [[5, 6, tiny_loaded.hf_config["vocab_size"]]], "a test")
    assert corpus.load_corpus(tiny_loaded) is None
    corpus.write_corpus(tiny_loaded, [[5, 6, -1]], "a test")
    assert corpus.load_corpus(tiny_loaded) is None
    assert start(tiny_loaded, model=engine.model).drafters["logitspec"].corpus is None


def test_the_corpus_is_drafted_from_accepted_and_lossless(tiny_loaded, priors):
    """The model's own answer in the corpus: LogitSpec drafts it where the session holds nothing
    like it, the target accepts it, and the output is plain decoding's, greedy and sampled."""
    plain = start(tiny_loaded, method="ar")
    prompt = [11, 40, 3, 77, 25, 9, 61, 2]
    answer = plain.generate(prompt, SamplingParams(), 40).output
    corpus.write_corpus(tiny_loaded, [prompt + answer], "a test")
    engine = start(tiny_loaded, model=plain.model)
    seq = engine.generate(prompt, SamplingParams(), 40)
    assert seq.output == answer
    lookups, hits = engine.drafters["logitspec"].lookups["corpus"]
    assert lookups > 0 and hits > 0
    accepted = sum(a for k, (_, a) in engine.stats.kinds.items() if k.family == "corpus")
    assert accepted > 10 and seq.mean_accepted > 2
    without = start(tiny_loaded, model=plain.model, corpus=False)
    assert without.generate(prompt, SamplingParams(), 40).output == answer
    assert not any(k.family == "corpus" for k in without.stats.kinds)
    sampled = SamplingParams(temperature=0.9, seed=7)
    assert engine.generate(prompt, sampled, 40).output == plain.generate(prompt, sampled, 40).output


def test_no_corpus_flag():
    from server.cli import _config, build_parser

    parser = build_parser()
    for command in (["serve"], ["generate", "--prompt", "hi"], ["bench"]):
        assert _config(parser.parse_args(command), "logitspec").corpus
        assert not _config(parser.parse_args([*command, "--no-corpus"]), "logitspec").corpus


@pytest.mark.slow
def test_the_default_model_ships_a_corpus(real_loaded):
    found = corpus.load_corpus(real_loaded)
    assert found is not None, "no corpus for the default model: run bench/make_prior.py"
    index, answers = found
    assert answers >= 100 and len(index) > 10_000
