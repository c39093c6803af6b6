from decoding.corpus import index_answers
from decoding.drafters import CORPUS_SEPARATOR, ArDrafter, LogitSpecDrafter, PldDrafter, make_drafter
from decoding.tree import NodeKind
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
    assert str(t.kinds[1]).startswith("pld:m2")  # matched "5 6 7" (3 tokens -> bucket 2)


def test_pld_no_match_no_draft():
    t = PldDrafter().propose(SuffixIndex([1, 2, 3]), 99, [])
    assert len(t) == 1


def chain_below(t, node):
    chain = []
    while t.children(node):
        (tok, node), = t.children(node).items()
        chain.append(tok)
    return chain


def test_logitspec_next_branch_and_guess_branches():
    # text: 1 2 3 4 | 2 9 8 | 1 2
    index = SuffixIndex([1, 2, 3, 4, 2, 9, 8, 1, 2])
    d = LogitSpecDrafter(guesses=3, next_tokens=2)
    # root x0 = 3: "1 2 3" matched at 0..2 -> next branch 4 2
    # guesses (top-k of the last logit, root skipped): 9 (rank 1), 5 (rank 2)
    #   ctx + [3, 9]: "9" followed by 8 1 2 -> guess branch 9 8 1 2 (4 tokens for rank <= 8)
    #   ctx + [3, 5]: 5 never seen -> guess node alone
    t = d.propose(index, 3, [3, 9, 5])
    assert t.tokens[0] == 3
    assert t.tokens[1:3] == [4, 2] and t.parents[1:3] == [0, 1]
    assert [str(k) for k in t.kinds[1:3]] == ["next:m2:s3:1", "next:m2:s3:2"]  # match of 3 tokens, the one occurrence
    n9 = t.children(0)[9]
    assert chain_below(t, n9) == [8, 1, 2]
    n5 = t.children(0)[5]
    assert t.children(n5) == {}
    assert t.kinds[n9] == NodeKind("guess", ("r0",), 1) and str(t.kinds[n5]) == "guess:r1:1"  # rank buckets 1, 2


def test_logitspec_next_trie_over_recent_occurrences():
    # "0 7" occurred 4 times, followed by 1 2 / 1 3 / 1 2 / 5 6 6 0: the latest occurrence's branch
    # is the deepest; each node's kind carries the share of the (up to `recent`) latest occurrences.
    index = SuffixIndex([0, 7, 1, 2, 0, 7, 1, 3, 0, 7, 1, 2, 0, 7, 5, 6, 6, 0])
    t = LogitSpecDrafter(guesses=0, next_tokens=4, recent=4).propose(index, 7, [])
    n1, n5 = t.children(0)[1], t.children(0)[5]
    assert list(t.children(0)) == [5, 1]  # the latest occurrence first
    assert chain_below(t, n5) == [6, 6, 0]  # 4 tokens deep for the latest
    assert set(t.children(n1)) == {2, 3}  # the others 2 deep: "1 2" / "1 3"
    assert str(t.kinds[n5]) == "next:m1:s0:1"  # a 2-token match; 1 of 4 occurrences: share 0.25
    assert str(t.kinds[n1]) == "next:m1:s2:1"  # 3 of 4: share 0.75
    assert str(t.kinds[t.children(n1)[2]]) == "next:m1:s1:2"  # 2 of 4
    # only the 2 latest occurrences
    t2 = LogitSpecDrafter(guesses=0, next_tokens=4, recent=2).propose(index, 7, [])
    assert set(t2.children(0)) == {5, 1} and set(t2.children(t2.children(0)[1])) == {2}


def test_logitspec_branches_carry_whether_the_last_logit_confirms_their_first_token():
    index = SuffixIndex([1, 2, 3, 4, 2, 9, 8, 1, 2])
    top = [3, 5, 6, 7, 8, 4]  # the last logit's top tokens, x0 = 3 first: 5 ranks 1, 8 ranks 4, 4 ranks 5
    d = LogitSpecDrafter(guesses=0, next_tokens=2, echoes=1, confirm=5)
    t = d.propose(index, 3, [], echoes=[("t", [9]), ("s", [5])], top=top)
    n4, n9, n5 = (t.children(0)[tok] for tok in (4, 9, 5))
    assert str(t.kinds[n4]) == "next:m2:s3:c2:1" and str(t.kinds[t.children(n4)[2]]) == "next:m2:s3:c2:2"
    assert str(t.kinds[n5]) == "echo:s0:c1:1"  # rank 1
    assert str(t.kinds[n9]) == "echo:t0:c0:1"  # not among the top
    under9 = [v for v in range(len(t)) if n9 in t.path_to(v)]
    assert len(under9) == 4 and all(t.kinds[v].details[-1] == "c0" for v in under9)  # 9 8 1 2, the whole branch
    # beyond `confirm` ranks, or without the logit, no branch is confirmed
    t = LogitSpecDrafter(guesses=0, next_tokens=2, confirm=4).propose(index, 3, [], top=top)
    assert str(t.kinds[t.children(0)[4]]) == "next:m2:s3:c0:1"
    t = d.propose(index, 3, [])
    assert str(t.kinds[t.children(0)[4]]) == "next:m2:s3:1"
    # the cheap look at first nodes (Drafter.openings) holds every confirmation a first node may get
    assert {str(k) for k in d.openings(index, 3) if k.details[:2] == ("m2", "s3")} == {
        "next:m2:s3:c0:1", "next:m2:s3:c1:1", "next:m2:s3:c2:1"}
    t = LogitSpecDrafter(guesses=0, next_tokens=2, confirm=0).propose(index, 3, [], top=top)
    assert str(t.kinds[t.children(0)[4]]) == "next:m2:s3:1"


def test_logitspec_echoes_are_branches_under_the_root():
    index = SuffixIndex([1, 2, 3, 4, 2, 9, 8, 1, 2])
    d = LogitSpecDrafter(guesses=0, next_tokens=2, echoes=1)
    t = d.propose(index, 3, [], echoes=[("t", [9]), ("s", [6, 7])])
    assert set(t.children(0)) == {4, 9, 6}
    n9, n6 = t.children(0)[9], t.children(0)[6]
    # a lone prediction goes on with what followed "9" before; a walked chain stays as it is
    assert chain_below(t, n9) == [8, 1, 2] and str(t.kinds[n9]) == "echo:t0:1"
    assert chain_below(t, n6) == [7] and str(t.kinds[n6]) == "echo:s0:1"
    assert t.kinds[t.children(n6)[7]] == NodeKind("echo", ("s0", "w"), 2)
    echo = NodeKind("echo", ("t0", "c1"), 1)  # (as the last logit may confirm it, see the next test)
    assert echo in d.openings(index, 3, [("t", [9])]) and echo not in d.openings(index, 3, [])


def test_logitspec_retrieves_from_the_corpus_what_no_other_branch_proposes():
    # the session: ... 1 2, root 3 ("1 2 3" followed by 4 2 in the session itself)
    index = SuffixIndex([1, 2, 3, 4, 2, 9, 8, 1, 2])
    # the corpus: "2 3" followed by 4 5 6 (an answer), by 7 7 (ended there) and by 4 6
    corpus = index_answers([[0, 2, 3, 4, 5, 6, 1], [2, 3, 7, 7], [9, 2, 3, 4, 6]])
    d = LogitSpecDrafter(guesses=0, next_tokens=2, confirm=0, corpus=corpus, corpus_tokens=3, corpus_branches=8)
    t = d.propose(index, 3, [])
    n4, n7 = t.children(0)[4], t.children(0)[7]
    assert str(t.kinds[n4]) == "next:m2:s3:1"  # the session's own branch keeps its node
    assert set(t.children(n4)) == {2, 5, 6}  # under it, the corpus's 5 and 6 (6 followed 4 in two answers)
    assert str(t.kinds[t.children(n4)[5]]) == "corpus:m1:s1:2"  # a 2-token match in the corpus; 1 of 3 occurrences
    assert chain_below(t, t.children(n4)[5]) == [6]
    assert str(t.kinds[n7]) == "corpus:m1:s1:1" and chain_below(t, n7) == [7]  # cut where the answer ended
    assert CORPUS_SEPARATOR not in t.tokens
    assert d.lookups["corpus"] == [1, 1]
    assert {str(k) for k in d.openings(index, 3) if k.family == "corpus"} == {f"corpus:m1:s{s}:1" for s in range(4)}
    # with the last logit at hand the corpus's first nodes are confirmed like the others
    t = LogitSpecDrafter(guesses=0, next_tokens=2, confirm=4, corpus=corpus).propose(index, 3, [], top=[3, 7])
    assert str(t.kinds[t.children(0)[7]]) == "corpus:m1:s1:c1:1"
    # no match in the corpus, or no corpus: no corpus nodes
    t = d.propose(SuffixIndex([5, 5]), 8, [])
    assert len(t) == 1 and d.lookups["corpus"] == [2, 1] and not any(k.family == "corpus" for k in d.openings(index, 8))
    t = LogitSpecDrafter(guesses=0, next_tokens=2).propose(index, 3, [])
    assert not any(k and k.family == "corpus" for k in t.kinds)


def test_logitspec_guess_lengths_follow_rank():
    assert [LogitSpecDrafter.guess_length(r) for r in (1, 8, 9, 32, 33)] == [4, 4, 3, 3, 1]


def test_unknown_method():
    with pytest.raises(ValueError):
        make_drafter("medusa")
