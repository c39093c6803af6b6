"""The CPU kernel's attention over the paged KV cache (`attend` in decoding/kernels/linear_avx2.c,
`cpu_linear.attend`): right against float64, and a row's result the same bits whatever else is in
the call, which is what makes a tree node's logits equal the plain step's."""

import pytest
import torch
import torch.nn.functional as F

from decoding import cpu_linear
from decoding.model import Model, SeqBatchEntry
from tests.conftest import needs_kernel

pytestmark = needs_kernel

BLOCK = 16


def pools(kv_heads: int, blocks: int, hd: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(kv_heads, blocks, BLOCK, hd, generator=g), torch.randn(kv_heads, blocks, BLOCK, hd, generator=g))


def random_tree(n: int, g: torch.Generator) -> torch.Tensor:
    """[n, n] bool: row i sees its ancestors and itself; node 0 is the root, every other node's
    parent an earlier node."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        parent = int(torch.randint(0, i, (), generator=g)) if i else -1
        if parent >= 0:
            mask[i] = mask[parent]
        mask[i, i] = True
    return mask


def seen(table: list[int], past: int, n: int, tree: torch.Tensor | None, k_pool, v_pool):
    """The reference's view of one sequence: its K/V gathered [kv_heads, past + n, hd] and each row's
    visibility [n, past + n]."""
    cells = torch.arange(past + n)
    blocks, offsets = torch.tensor(table)[cells // BLOCK], cells % BLOCK
    mask = torch.zeros(n, past + n, dtype=torch.bool)
    mask[:, :past] = True
    mask[:, past:] = tree if tree is not None else torch.ones(n, n, dtype=torch.bool).tril()
    return k_pool[:, blocks, offsets], v_pool[:, blocks, offsets], mask


def call(q, k_pool, v_pool, entries, scale=None):
    rows = cpu_linear.CellRows.of(entries)
    return cpu_linear.attend(cpu_linear.kernel(), q, k_pool, v_pool, rows, scale or q.shape[-1] ** -0.5)


@pytest.mark.parametrize("heads, kv_heads, hd", [(9, 3, 64), (4, 2, 16), (8, 2, 80), (4, 4, 32), (12, 1, 8)])
def test_matches_float64_attention_for_trees_prefills_and_plain_steps(heads, kv_heads, hd):
    """Three sequences in one call, their blocks shuffled in the pool: a tree after 300 cells, a
    prefill chunk of 21 rows after 40, a plain step after 1000; each row against float64 SDPA."""
    g = torch.Generator().manual_seed(heads * 100 + hd)
    k_pool, v_pool = pools(kv_heads, 140, hd, hd)
    order = torch.randperm(140, generator=g).tolist()
    specs = [(300, 9, random_tree(9, g)), (40, 21, None), (1000, 1, None)]
    entries, start = [], 0
    for past, n, tree in specs:
        blocks = -(-(past + n) // BLOCK)
        entries.append((order[start:start + blocks], past, n, tree))
        start += blocks
    q = torch.randn(sum(n for _, n, _ in specs), heads, hd, generator=g)
    out = call(q, k_pool, v_pool, entries)
    row = 0
    for table, past, n, tree in entries:
        k, v, mask = seen(table, past, n, tree, k_pool, v_pool)
        want = F.scaled_dot_product_attention(q[row:row + n].transpose(0, 1).double()[None], k.double()[None],
                                              v.double()[None], attn_mask=mask, enable_gqa=True)
        got = out[row:row + n].view(n, heads, hd).transpose(0, 1)
        assert (got.double() - want[0]).abs().max() < 2e-6, (past, n)
        row += n


def test_scale_is_applied():
    k_pool, v_pool = pools(2, 8, 32, 1)
    q = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(2))
    entries = [(list(range(8)), 50, 3, None)]
    k, v, mask = seen(list(range(8)), 50, 3, None, k_pool, v_pool)
    want = F.scaled_dot_product_attention(q.transpose(0, 1).double()[None], k.double()[None], v.double()[None],
                                          attn_mask=mask, enable_gqa=True, scale=0.3)
    got = call(q, k_pool, v_pool, entries, scale=0.3).view(3, 4, 32).transpose(0, 1)
    assert (got.double() - want[0]).abs().max() < 2e-6


@pytest.mark.parametrize("hd", [64, 80])
def test_a_row_is_the_same_bits_alone_in_a_tree_beside_other_sequences_and_as_the_plain_step(hd):
    """A tree's rows alone, together, beside another sequence, with one thread; and the deepest node
    against the plain step at its position once its ancestors sit in cells past .. past + depth,
    as after acceptance."""
    g = torch.Generator().manual_seed(hd)
    heads, kv_heads, past, n = 9, 3, 611, 11
    k_pool, v_pool = pools(kv_heads, 60, hd, 7)
    table = torch.randperm(60, generator=g)[:-(-(past + n) // BLOCK)].tolist()
    tree = random_tree(n, g)
    q = torch.randn(n, heads, hd, generator=g)
    together = call(q, k_pool, v_pool, [(table, past, n, tree)])
    for i in range(n):
        # alone, its ancestors' cells as its extras
        rows = cpu_linear.CellRows.of([(table, past, 1, None)])
        rows.row_hi[0] = past
        rows.extra_cells = torch.tensor([past + j for j in tree[i].nonzero()[:, 0].tolist()], dtype=torch.int32)
        rows.extra_ptr = torch.tensor([0, len(rows.extra_cells)], dtype=torch.int64)
        alone = cpu_linear.attend(cpu_linear.kernel(), q[i:i + 1], k_pool, v_pool, rows, hd ** -0.5)
        assert torch.equal(alone, together[i:i + 1]), i
    other = torch.randn(5, heads, hd, generator=g)
    beside = call(torch.cat([other, q]), k_pool, v_pool, [(table, 200, 5, None), (table, past, n, tree)])
    assert torch.equal(beside[5:], together)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(call(q, k_pool, v_pool, [(table, past, n, tree)]), together)
    finally:
        torch.set_num_threads(threads)
    deepest = int(tree.sum(1).argmax())
    path = tree[deepest].nonzero()[:, 0].tolist()
    k2, v2 = k_pool.clone(), v_pool.clone()
    for depth, node in enumerate(path):  # the accepted path moved to the front, as KVCache.keep does
        src, dst = past + node, past + depth
        k2[:, table[dst // BLOCK], dst % BLOCK] = k_pool[:, table[src // BLOCK], src % BLOCK]
        v2[:, table[dst // BLOCK], dst % BLOCK] = v_pool[:, table[src // BLOCK], src % BLOCK]
    plain = call(q[deepest:deepest + 1], k2, v2, [(table, past + len(path) - 1, 1, None)])
    assert torch.equal(plain, together[deepest:deepest + 1])


def test_the_model_uses_it_on_cpu_float32_and_can_be_turned_off(tiny_loaded, monkeypatch):
    model = Model(tiny_loaded.hf_config, tiny_loaded.state, torch.device("cpu"), torch.float32)
    assert model.cell_attention is not None
    monkeypatch.setenv("LOGITSPEC_CPU_ATTENTION", "off")
    assert Model(tiny_loaded.hf_config, tiny_loaded.state, torch.device("cpu"), torch.float32).cell_attention is None
    monkeypatch.delenv("LOGITSPEC_CPU_ATTENTION")
    assert Model(tiny_loaded.hf_config, tiny_loaded.state, torch.device("cpu"), torch.bfloat16).cell_attention is None


def tree_then_plain_steps(model, tokens: list[int], prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A chain of drafted tokens verified in one forward, against the same tokens fed one plain step
    at a time: the logits of each."""
    n = len(tokens)
    cache = model.new_cache(2, 512)
    cache.allocate()
    model.forward(torch.tensor(prompt), torch.arange(len(prompt)), [SeqBatchEntry(0, 0, len(prompt), None)], cache)
    chain = torch.ones(n, n, dtype=torch.bool).tril()
    tree = model.forward(torch.tensor(tokens), torch.arange(len(prompt), len(prompt) + n),
                         [SeqBatchEntry(0, len(prompt), n, chain)], cache)
    plain = []
    for i, t in enumerate(tokens):
        p = len(prompt) + i
        plain.append(model.forward(torch.tensor([t]), torch.tensor([p]), [SeqBatchEntry(0, p, 1, None)], cache))
    return tree, torch.cat(plain)


def test_a_verified_chain_gives_the_plain_steps_logits_bit_for_bit(tiny_loaded):
    """The model's rows: products are row-independent already; with this attention a tree forward's
    logits are the plain steps' to the bit (with SDPA they differ in the last bits)."""
    model = Model(tiny_loaded.hf_config, tiny_loaded.state, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 97, (450,), generator=g).tolist()
    tokens = torch.randint(0, 97, (12,), generator=g).tolist()
    tree, plain = tree_then_plain_steps(model, tokens, prompt)
    assert torch.equal(tree, plain)
