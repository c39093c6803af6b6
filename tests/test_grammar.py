"""Grammar-constrained decoding: the constraint's tree walk, and speculation that stays lossless
with respect to the constrained distribution (greedy equal to constrained `ar`, sampling equal in
distribution, chi-square), on the real default model."""

import dataclasses
import json

import pytest
import torch
from scipy.stats import chisquare

from decoding.config import EngineConfig
from decoding.engine import Engine
from decoding.grammar import Constraint, GrammarError, json_schema_grammar, lark_grammar
from decoding.model import SeqBatchEntry
from decoding.tree import DraftTree, NodeKind
from decoding.verify import SamplingParams, processed_probs
from retrieval.suffix_index import SuffixIndex

DRAFT = NodeKind("draft", (), 1)  # a test node's kind (statistics need one)

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}},
          "required": ["name", "age", "city"], "additionalProperties": False}


def one_token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_prune_drops_forbidden_drafts_and_their_subtrees(real_engines):
    engine = real_engines["ar"]
    tok = lambda s: one_token(engine.tokenizer, s)  # noqa: E731
    c = engine.grammars.constraint(lark_grammar('start: "{" ("a" | "b") "}"'))
    tree = DraftTree.root(tok("{"))
    a = tree.add(0, tok("a"), DRAFT)
    tree.add(a, tok("}"), DRAFT)
    tree.add(a, tok("a"), DRAFT)  # "{aa": forbidden under an allowed parent
    c_ = tree.add(0, tok("c"), DRAFT)  # forbidden, with a subtree that goes too
    tree.add(c_, tok("}"), DRAFT)
    b = tree.add(0, tok("b"), DRAFT)
    tree.add(b, engine.tokenizer.eos_token_id, DRAFT)  # "{b" + end: the grammar is not complete
    pruned = c.prune(tree)
    decode = lambda t, v: engine.tokenizer.decode([t.tokens[i] for i in t.path_to(v)])  # noqa: E731
    assert sorted(decode(pruned, v) for v in range(len(pruned))) == ["{", "{a", "{a}", "{b"]
    # the walk leaves the matcher where it was: the root is still the next token
    assert c.matcher.validate_tokens([tok("{")]) == 1


def test_tree_masks_equal_a_fresh_matcher_advanced_along_each_path(real_engines):
    """Oracle: each node's mask computed by consuming root..node into a new matcher."""
    engine = real_engines["ar"]
    grammar = json_schema_grammar(PERSON)
    tree = DraftTree.root(engine.tokenizer.encode('{"')[0])
    for text in ('{"name": "Ada", "age": 36', '{"name": "Bo', '{"age": 3'):
        ids = engine.tokenizer.encode(text)
        node = 0
        for t in ids[1:]:
            node = tree.add(node, t, DRAFT)
    c = engine.grammars.constraint(grammar)
    tree = c.prune(tree)
    masks = c.allowed(c.tree_masks(tree))  # [n, vocab]
    assert len(tree) > 10
    for v in range(len(tree)):
        fresh = engine.grammars.constraint(grammar)
        fresh.advance([tree.tokens[i] for i in tree.path_to(v)])
        assert torch.equal(masks[v], fresh.allowed(fresh.next_mask())[0]), v
    # '{"age' is refused at the first key (properties come in order, name first)
    texts = {engine.tokenizer.decode([tree.tokens[i] for i in tree.path_to(v)]) for v in range(len(tree))}
    assert '{"name": "Ada", "age": 36' in texts and not any(t.startswith('{"age') for t in texts)


def test_invalid_schema_is_a_grammar_error(real_engines):
    grammars = real_engines["ar"].grammars
    with pytest.raises(GrammarError):
        grammars.check(json_schema_grammar({"type": "object", "properties": {"a": {"type": "no-such-type"}}}))
    grammars.check(json_schema_grammar(PERSON))


EXTRACT = [
    "Extract the person as JSON with name, age and city: Ada Lovelace, aged 36, lived in London.",
    "Give JSON with name, age and city for: Grace Hopper was 85 and lived in Arlington.",
    "JSON please (name, age, city): the teacher Mr Smith, 40 years old, from Paris.",
]


@pytest.fixture(scope="module")
def full_tree_engine(real_loaded, real_engines):
    """LogitSpec with cost-aware sizing off: every step verifies a tree of up to 32 nodes, so the
    masks of many tree nodes decide what is accepted."""
    return Engine(EngineConfig(method="logitspec", adaptive=False, tree_capacity=32, max_context=2048),
                  loaded=real_loaded,
                  model=real_engines["ar"].model)


# Capitals only: the model's own next token inside a value ("ondon" after "L") is forbidden at
# most tree nodes, so a mask missing from any node's row changes (or breaks) the output.
UPPER = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z][A-Z .]*$"},
                                          "age": {"type": "integer"},
                                          "city": {"type": "string", "pattern": "^[A-Z][A-Z ]*$"}},
         "required": ["name", "age", "city"], "additionalProperties": False}


def test_greedy_constrained_output_is_identical_for_every_method(real_engines, full_tree_engine):
    engines = {**real_engines, "logitspec-full": full_tree_engine}
    drafted = 0
    for schema, text in [(PERSON, t) for t in EXTRACT] + [(UPPER, EXTRACT[0])]:
        grammar = json_schema_grammar(schema)
        prompt = real_engines["ar"].chat_prompt([{"role": "user", "content": text}])
        outputs = {}
        for name, engine in engines.items():
            seq = engine.generate(prompt, SamplingParams(), 40, constraint=engine.grammars.constraint(grammar))
            outputs[name] = seq.output
            if name == "logitspec-full":
                drafted += len(seq.output) - seq.steps
        answer = real_engines["ar"].tokenizer.decode(outputs["ar"])
        assert all(out == outputs["ar"] for out in outputs.values()), (text, answer)
        if schema is PERSON:
            value = json.loads(answer)  # the grammar made it valid, and complete within 40 tokens
            assert set(value) == {"name", "age", "city"} and isinstance(value["age"], int)
        else:
            assert answer.startswith('{"name": "') and answer[10:12].isupper()
    assert drafted > 20  # trees were verified under the grammar, not only roots


@pytest.mark.parametrize("sampler", ["coupled", "specinfer"])
def test_constrained_sampling_has_the_constrained_distribution(real_loaded, real_engines, sampler):
    """The engine's own acceptance (_accept: masks every tree row, then verifies) over one real
    forward of a tree, drawn many times: the tokens at positions 1 and 2 after the root follow the
    masked target rows (chi-square), and nothing outside the grammar is ever emitted."""
    engine = Engine(EngineConfig(method="logitspec", sampler=sampler, adaptive=False, max_context=1024),
                    loaded=real_loaded, model=real_engines["ar"].model)
    tok = engine.tokenizer
    colours = ["red", "green", "blue", "black", "white", "yellow", "orange", "purple"]
    grammar = lark_grammar("start: C \" and \" C\nC: " + " | ".join(f'"{c}"' for c in colours))
    params = SamplingParams(temperature=1.0)
    prompt = engine.chat_prompt([{"role": "user", "content": "Name two colours."}])
    base = engine.grammars.constraint(grammar)
    threads = torch.get_num_threads()
    seq = engine.start_sequence(prompt, dataclasses.replace(params, seed=0), 8, constraint=base)
    try:
        and_ = one_token(tok, " and")
        tree = DraftTree.root(seq.root)
        node = tree.add(0, and_, DRAFT)
        for c in colours[:4]:
            tree.add(node, one_token(tok, " " + c), DRAFT)
        tree = base.prune(tree)
        assert len(tree) == 6
        rows = engine.model.forward(torch.tensor(tree.tokens), torch.tensor([seq.past_len + d for d in tree.depths]),
                                    [SeqBatchEntry(seq.slot, seq.past_len, len(tree), tree.attention_mask())],
                                    engine.cache)
        masked = base.mask_logits(rows, base.tree_masks(tree))
        target1 = processed_probs(masked[0:1], params)[0].double()  # the token after the root
        target2 = processed_probs(masked[1:2], params)[0].double()  # ... and after " and"
        raw1 = processed_probs(rows[0:1], params)[0].double()
        # The grammar matters here: unmasked, most of the mass would leave it.
        assert raw1[target1 > 0].sum() < 0.5 and (target2 > 0).sum() >= 8
        draws = 2000
        counts1, counts2 = torch.zeros_like(target1), torch.zeros_like(target2)
        torch.set_num_threads(1)  # one row at a time: a thread pool only adds contention on a busy machine
        for i in range(draws):
            s = dataclasses.replace(seq, seed=1000 + i, generator=torch.Generator().manual_seed(i), output=[],
                                    step_sizes=[], echoes=[], index=SuffixIndex(),
                                    constraint=Constraint(base.matcher.deep_copy(), base.vocab_size, base.stop_ids))
            out = engine._accept(s, tree, rows) + [s.root]
            counts1[out[1]] += 1
            if len(out) > 2 and out[1] == and_:
                counts2[out[2]] += 1
    finally:
        torch.set_num_threads(threads)
        engine.stop_sequence(seq)
    for counts, target in ((counts1, target1), (counts2, target2)):
        support = target > 0
        assert counts[~support].sum() == 0
        n = counts.sum()
        keep = support & (target * n >= 5)  # chi-square wants expected counts >= 5; the rest pooled
        observed = torch.cat([counts[keep], counts[support & ~keep].sum().reshape(1)])
        expected = torch.cat([target[keep], target[support & ~keep].sum().reshape(1)]) / target[support].sum() * n
        if expected[-1] < 5:
            observed, expected = observed[:-1], expected[:-1]
        expected = expected * observed.sum() / expected.sum()
        if len(observed) > 1:  # (after " red", the grammar leaves " and" nearly all the mass)
            assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3, sampler
    assert counts2.sum() > 0.5 * draws  # the drafted " and" was accepted, so tree rows were used
