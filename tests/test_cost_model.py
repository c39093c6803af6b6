import pytest

from decoding.cost_model import AcceptanceStats, CostModel, ranked_nodes
from decoding.tree import DraftTree


def flat_then_steep():
    # 1..8 tokens cost the same, then every token costs as much as a whole forward
    return CostModel({1: 1.0, 8: 1.0, 9: 2.0, 16: 9.0}, max_tokens=64)


def test_interpolation_and_monotone():
    c = CostModel({1: 1.0, 4: 4.0, 8: 3.0}, max_tokens=16)
    assert c.cost(1) == 1.0
    assert c.cost(2) == pytest.approx(2.0)
    assert c.cost(8) == 4.0  # a bigger forward never looks cheaper than a smaller one
    assert c.cost(100) == c.cost(16)


def test_choose_takes_free_tokens_and_stops_when_they_cost():
    c = flat_then_steep()
    # sequence 0 has 10 good candidates; only 7 fit in the flat region (root + 7 = 8 tokens)
    assert c.choose([[0.9] * 10], [63]) == [7]


def test_choose_no_draft_when_nothing_pays():
    c = CostModel({1: 1.0, 2: 2.0, 64: 64.0}, max_tokens=64)  # cost linear in tokens
    assert c.choose([[0.5, 0.4, 0.3]], [63]) == [0]


def test_choose_across_batch_prefers_likely_nodes():
    c = CostModel({1: 1.0, 4: 1.0, 5: 10.0}, max_tokens=64)  # 4 tokens free, then very costly
    # two sequences (two roots): two free slots go to the two most likely nodes
    assert c.choose([[0.9, 0.2], [0.8, 0.7]], [63, 63]) == [1, 1]


def test_choose_respects_limits():
    assert flat_then_steep().choose([[0.9] * 10], [3]) == [3]


def test_plain_steps_move_the_offset():
    c = CostModel({1: 1.0, 16: 1.0}, max_tokens=16, alpha=0.5)
    c.observe(1, 3.0)
    assert c.cost(1) == pytest.approx(2.0)
    assert c.cost(16) == pytest.approx(2.0)  # the offset shifts every size alike


def test_tree_steps_teach_a_surcharge_per_draft_token():
    c = CostModel({1: 1.0, 4: 1.0, 8: 1.0, 16: 1.0}, max_tokens=16, max_batch=4, decay=1.0)
    c.observe(4, 1.0, batch=4)  # plain: as calibrated
    c.observe(8, 1.4, batch=4)  # 4 draft tokens cost 0.4 more than calibrated
    c.observe(6, 1.2, batch=4)  # 2 draft tokens 0.2 more
    assert c.surcharge(4) == pytest.approx(0.1)
    assert c.cost(4, 4) == pytest.approx(1.0)
    assert c.cost(12, 4) == pytest.approx(1.8)
    assert c.cost(2, 1) == pytest.approx(1.0)  # another batch size learns its own
    # drafts that looked free are now judged at their real price: p = 0.05 per node never pays 0.1 s
    assert c.choose([[0.05] * 8] * 4, [8] * 4) == [0] * 4
    c.observe(8, 0.2, batch=4)  # cheaper than calibrated ...
    assert c.cost(16, 4) >= c.cost(4, 4)  # ... but never cheaper than the plain step


def test_acceptance_stats_prior_and_updates():
    s = AcceptanceStats(prior=0.5, prior_weight=2.0, decay=1.0)
    t = DraftTree.root(1)
    t.add_chain(0, [2, 3], ["k1", "k2"])
    assert s.node_probs(t) == [1.0, 0.5, 0.5]
    s.record(t, [0, 1])  # node 1 accepted, node 2 rejected
    assert s.p("k1") == pytest.approx((1 + 1) / (1 + 2))
    assert s.p("k2") == pytest.approx((0 + 1) / (1 + 2))
    assert s.by_position == {1: [1, 1], 2: [1, 0]}


def test_child_estimate_capped_by_parent_and_ranking():
    s = AcceptanceStats(decay=1.0)
    s.kinds = {"low": [100.0, 10.0], "high": [100.0, 90.0]}
    t = DraftTree.root(1)
    t.add_chain(0, [2, 3], ["low", "high"])
    t.add(0, 4, "high")
    ps = s.node_probs(t)
    assert ps[2] == ps[1] < ps[3]
    assert ranked_nodes(t, ps) == [3, 1, 2]


def test_batch_offset_shifts_all_sizes_alike():
    c = CostModel({1: 1.0, 16: 1.5, 32: 3.0}, max_tokens=64, max_batch=16, alpha=1.0)
    c.observe(16, 2.5, batch=16)  # 16 sequences cost 1.0 more than one 16-token tree
    assert c.cost(16, 16) == pytest.approx(2.5)
    assert c.cost(32, 16) == pytest.approx(4.0)  # the extra tokens keep their calibrated price
    assert c.cost(16, 1) == pytest.approx(1.5)  # a single sequence is unaffected
    # so with 16 sequences a candidate is judged by its marginal cost, not by a stale neighbour
    assert c.choose([[0.05]] * 16, [63] * 16) == [0] * 16


def test_break_even_probability():
    assert CostModel({1: 1.0, 64: 64.0}, max_tokens=64).break_even() == pytest.approx(1.0)
    assert CostModel({1: 1.0, 64: 1.0}, max_tokens=64).break_even() == pytest.approx(0.0)
    # 4 sequences at 1.0 s, each extra token 0.1 s: k nodes pay iff 4 + k p > 4 (1 + 0.1 k)
    c = CostModel({1: 0.5, 4: 1.0, 64: 7.0}, max_tokens=64, max_batch=4)
    assert c.break_even(4) == pytest.approx(0.4)


def test_margin_keeps_marginal_drafts_out():
    # 1 s per step, each extra token 0.1 s: a node accepted with p = 0.12 raises the rate by ~2%
    c = CostModel({1: 1.0, 2: 1.1, 64: 7.3}, max_tokens=64)
    assert c.choose([[0.12]], [1]) == [1]
    c.margin = 0.05
    assert c.choose([[0.12]], [1]) == [0]
    assert c.choose([[0.2]], [1]) == [1]  # 1.2 / 1.1 = +9%: clears the margin
    assert c.break_even() == pytest.approx(0.05 / 16 + 0.105)  # best case: 16 such nodes


def test_coarse_kind_keeps_the_first_detail():
    from decoding.cost_model import AcceptanceStats

    assert AcceptanceStats.coarse("next:m2:s3:5") == "next:m2:5"
    assert AcceptanceStats.coarse("h.guess:r0:m1:3") == "h.guess:r0:3"
    assert AcceptanceStats.coarse("pld:m2:5") == "pld:5"
    assert AcceptanceStats.coarse("guess:r1:1") == "guess:1"
    assert AcceptanceStats.coarse("guess:1") == "guess:1"
    # a failing sub-family does not condemn an untried sibling sub-family
    stats = AcceptanceStats()
    for _ in range(50):
        stats.kinds.setdefault("next:m0:s0:1", [0.0, 0.0])[0] += 1
        stats.kinds.setdefault("next:m0:1", [0.0, 0.0])[0] += 1
    assert stats.p("next:m0:s1:1") < 0.05 and stats.p("next:m3:s1:1") == stats.prior
