from decoding.drafters import ArDrafter, LogitSpecDrafter, PldDrafter, make_drafter
from retrieval.suffix_index import SuffixIndex

import pytest


def test_ar_is_root_only():
    t = ArDrafter().propose(SuffixIndex([1, 2, 3]), 9, [])
    assert t.tokens == [9] and t.parents == [-1]


def test_pld_chain_from_earliest_longest_match():
    # context ... 5 6 + root 7: "5 6 7" first occurred at 1..3, followed by 8 9 4
    index = SuffixIndex([4, 5, 6, 7, 8, 9, 4, 5, 6, 7, 1, 2, 5, 6])
    t = PldDrafter(max_ngram=3, max_tokens=3).propose(index, 7, [])
    assert t.tokens == [7, 8, 9, 4]
    assert t.parents == [-1, 0, 1, 2]
    assert t.kinds[1].startswith("pld:m2")  # matched "5 6 7" (3 tokens -> bucket 2)


def test_pld_no_match_no_draft():
    t = PldDrafter().propose(SuffixIndex([1, 2, 3]), 99, [])
    assert len(t) == 1


def test_logitspec_next_branch_and_guess_branches():
    # text: 1 2 3 4 | 2 9 8 | 1 2
    index = SuffixIndex([1, 2, 3, 4, 2, 9, 8, 1, 2])
    d = LogitSpecDrafter(guesses=3, next_tokens=2, next_branches=1)
    # root x0 = 3: "1 2 3" matched at 0..2 -> next branch 4 2
    # guesses (top-k of the last logit, root skipped): 9 (rank 1), 5 (rank 2)
    #   ctx + [3, 9]: "9" followed by 8 1 2 -> guess branch 9 8 1 2 (4 tokens for rank <= 8)
    #   ctx + [3, 5]: 5 never seen -> guess node alone
    t = d.propose(index, 3, [3, 9, 5])
    assert t.tokens[0] == 3
    assert t.tokens[1:3] == [4, 2] and t.parents[1:3] == [0, 1]
    n9 = t.children(0)[9]
    chain, node = [], n9
    while t.children(node):
        (tok, node), = t.children(node).items()
        chain.append(tok)
    assert chain == [8, 1, 2]
    n5 = t.children(0)[5]
    assert t.children(n5) == {}
    assert t.kinds[n9] == "guess:r0:1" and t.kinds[n5] == "guess:r1:1"  # rank buckets 1, 2


def test_logitspec_guess_lengths_follow_rank():
    assert [LogitSpecDrafter.guess_length(r) for r in (1, 8, 9, 32, 33)] == [4, 4, 3, 3, 1]


def test_unknown_method():
    with pytest.raises(ValueError):
        make_drafter("medusa")
