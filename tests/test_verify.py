import math

import pytest
import torch
from scipy.stats import chisquare

from decoding.tree import DraftTree
from decoding.verify import SamplingParams, processed_probs, sample, verify_coupled, verify_greedy, verify_sampling


def logits_from(rows):
    return torch.tensor(rows, dtype=torch.float32).log()


def tree_two_levels():
    #      0(root)
    #    /   |    \
    #  1(2) 3(0)  4(4)
    #   |
    #  2(1)
    t = DraftTree.root(3)
    t.add_chain(0, [2, 1], ["a", "a"])
    t.add(0, 0, "b")
    t.add(0, 4, "c")
    return t


def test_greedy_walks_agreeing_path_and_returns_bonus():
    t = tree_two_levels()
    # argmax per node: root->2 (node 1), node1->1 (node 2), node2->3 (bonus)
    logits = torch.full((5, 5), -5.0)
    logits[0, 2] = 1
    logits[1, 1] = 1
    logits[2, 3] = 1
    logits[3, 0] = 1
    logits[4, 0] = 1
    assert verify_greedy(t, logits) == ([0, 1, 2], 3)


def test_greedy_rejects_at_root():
    t = tree_two_levels()
    logits = torch.zeros(5, 5)
    logits[0, 3] = 1  # token 3 is no child of the root
    assert verify_greedy(t, logits) == ([0], 3)


def test_processed_probs_top_k_top_p():
    logits = logits_from([[0.5, 0.25, 0.15, 0.1]])
    p = processed_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([[2 / 3, 1 / 3, 0, 0]]))
    p = processed_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.allclose(p, torch.tensor([[2 / 3, 1 / 3, 0, 0]]))  # 0.5 < 0.7, 0.75 >= 0.7
    p = processed_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert torch.allclose(p, torch.tensor([[1.0, 0, 0, 0]]))


def test_params_validation():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def emitted_pair(tree, path, next_token):
    """The first two tokens after the root, None where the step did not decide the second."""
    toks = [tree.tokens[i] for i in path[1:]] + [next_token]
    return toks[0], (toks[1] if len(toks) > 1 else None)


def run_chi_square(tree, rows, params, draws=20000, seed=0, sampler="specinfer"):
    """Chi-square tests of the first two emitted tokens against the target. `sampler`: "specinfer",
    "coupled", or a function with verify_sampling's signature (to show that the test can fail)."""
    logits = torch.tensor(rows, dtype=torch.float32).log()
    target = processed_probs(logits, params)  # [nodes, vocab]
    g = torch.Generator().manual_seed(seed)
    firsts, seconds = [], {}
    for i in range(draws):
        if callable(sampler):
            path, nxt = sampler(tree, logits, params, g)
        elif sampler == "specinfer":
            path, nxt = verify_sampling(tree, logits, params, g)
        else:  # a fresh seed per draw, as per request
            path, nxt = verify_coupled(tree, logits, params, seed * draws + i, past_len=10)
        a, b = emitted_pair(tree, path, nxt)
        firsts.append(a)
        if b is not None:
            seconds.setdefault(a, []).append(b)
    vocab = logits.shape[1]
    counts = torch.bincount(torch.tensor(firsts), minlength=vocab).double()
    support = target[0] > 0
    assert counts[~support].sum() == 0, "sampled a token with zero probability"
    exp = target[0][support].double()
    exp = exp / exp.sum() * counts.sum()
    p = chisquare(counts[support].numpy(), exp.numpy()).pvalue
    assert p > 1e-3, f"first tokens: chi-square p = {p:.2g}"
    # Given the first token is a drafted child with children of its own, the second token follows
    # that child's distribution.
    for token, node in tree.children(0).items():
        if tree.children(node) and token in seconds and len(seconds[token]) > 500:
            c = torch.bincount(torch.tensor(seconds[token]), minlength=vocab).double()
            sup = target[node] > 0
            e = target[node][sup].double()
            e = e / e.sum() * c.sum()
            p = chisquare(c[sup].numpy(), e.numpy()).pvalue
            assert p > 1e-3, f"second tokens after {token}: chi-square p = {p:.2g}"


ROWS = [
    [0.30, 0.05, 0.40, 0.05, 0.20],  # root: the drafted children 2, 0, 4 hold 90%
    [0.10, 0.60, 0.10, 0.10, 0.10],  # after 2
    [0.20, 0.20, 0.20, 0.20, 0.20],  # after 2, 1
    [0.25, 0.25, 0.25, 0.15, 0.10],  # after 0
    [0.05, 0.05, 0.05, 0.05, 0.80],  # after 4
]


def test_tree_rejection_sampling_matches_target_distribution():
    run_chi_square(tree_two_levels(), ROWS, SamplingParams(temperature=1.0))


def test_tree_rejection_sampling_with_temperature_top_k_top_p():
    run_chi_square(tree_two_levels(), ROWS, SamplingParams(temperature=0.7, top_k=4, top_p=0.9), seed=1)


def test_coupled_sampling_matches_target_distribution():
    run_chi_square(tree_two_levels(), ROWS, SamplingParams(temperature=1.0), draws=8000, sampler="coupled")
    run_chi_square(tree_two_levels(), ROWS, SamplingParams(temperature=0.7, top_k=4, top_p=0.9), draws=8000,
                   seed=3, sampler="coupled")


def test_coupled_sampling_does_not_depend_on_the_tree():
    """Same seed: the emitted tokens agree between a bare root and a full tree, as far as both go."""
    logits = torch.tensor(ROWS).log()
    params = SamplingParams(temperature=1.0)
    bare = DraftTree.root(3)
    for seed in range(200):
        path, nxt = verify_coupled(tree_two_levels(), logits, params, seed, past_len=10)
        tokens = [tree_two_levels().tokens[i] for i in path[1:]] + [nxt]
        _, first = verify_coupled(bare, logits[:1], params, seed, past_len=10)
        assert tokens[0] == first


def accepts_the_first_child_too_often(tree, logits, params, g):
    """verify_sampling, except that 5% of the time the first drafted child is accepted outright."""
    if torch.rand((), generator=g) < 0.05:
        child = next(iter(tree.children(0).values()))
        return [0, child], sample(processed_probs(logits[child:child + 1], params)[0], g)
    return verify_sampling(tree, logits, params, g)


def draws_the_next_token_from_the_parent(tree, logits, params, g):
    """verify_sampling, except that after an accepted child the next token comes from its parent's
    row (an off-by-one in the node index)."""
    path, nxt = verify_sampling(tree, logits, params, g)
    if len(path) > 1:
        nxt = sample(processed_probs(logits[path[-2]:path[-2] + 1], params)[0], g)
    return path, nxt


@pytest.mark.parametrize("biased, caught", [(accepts_the_first_child_too_often, "first tokens"),
                                            (draws_the_next_token_from_the_parent, "second tokens after 2")])
def test_chi_square_detects_a_biased_sampler(biased, caught):
    """The statistical check is able to fail: slightly wrong verifiers, through the same helper as
    the real ones, are caught (and at the first or the second token, as each bias predicts)."""
    with pytest.raises(AssertionError, match=caught):
        run_chi_square(tree_two_levels(), ROWS, SamplingParams(temperature=1.0), sampler=biased)
