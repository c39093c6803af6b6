import torch

from decoding.tree import DraftTree


def build():
    #        0(10)
    #       /     \
    #    1(11)    3(20)
    #     |        |
    #    2(12)    4(21)
    t = DraftTree.root(10)
    t.add_chain(0, [11, 12], ["a", "a"])
    t.add_chain(0, [20, 21], ["b", "b"])
    return t


def test_tokens_parents_depths():
    t = build()
    assert t.tokens == [10, 11, 12, 20, 21]
    assert t.parents == [-1, 0, 1, 0, 3]
    assert t.depths == [0, 1, 2, 1, 2]
    assert t.children(0) == {11: 1, 20: 3}


def test_add_path_walks_existing_nodes_and_adds_the_rest():
    t = build()
    nodes = t.add_path(0, [20, 21, 22, 23])  # 20 and 21 exist (nodes 3, 4); 22 and 23 are new
    assert nodes == [3, 4, 5, 6]
    assert t.tokens[5:] == [22, 23] and t.parents[5:] == [4, 5] and t.depths[5:] == [3, 4]
    assert t.kinds[5:] == [None, None] and t.kinds[3] == "b"  # existing nodes keep their kinds
    assert t.children(4) == {22: 5} and t.children(5) == {23: 6} and t.children(6) == {}
    # the same tree as token-by-token add
    u = build()
    node = 0
    for token in [20, 21, 22, 23]:
        node = u.add(node, token, None)
    assert (u.tokens, u.parents, u.depths) == (t.tokens, t.parents, t.depths)
    assert t.add_path(2, []) == []


def test_add_deduplicates_siblings():
    t = build()
    t.add_chain(0, [11, 13], ["c", "c"])  # shares node 1, adds 13 under it
    assert t.tokens == [10, 11, 12, 20, 21, 13]
    assert t.parents[-1] == 1
    assert t.kinds[1] == "a"  # the first writer of a node keeps its kind


def test_tree_mask_literal():
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 0, 0, 1, 0],
        [1, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(build().attention_mask(), expected)


def test_chain_mask_is_none_meaning_causal():
    t = DraftTree.root(5)
    t.add_chain(0, [6, 7, 8], ["x"] * 3)
    assert t.attention_mask() is None


def test_subtree_and_path():
    t = build()
    s = t.subtree([0, 3, 4, 1])
    assert s.tokens == [10, 11, 20, 21]
    assert s.parents == [-1, 0, 0, 2]
    assert t.path_to(4) == [0, 3, 4]


def test_subtree_rejects_orphans():
    import pytest

    with pytest.raises(ValueError):
        build().subtree([0, 2])
