"""The default model's float32 products on its GGUF blocks (decoding/gguf_blocks.py): every layer
product takes its Q4_1 blocks and the lm_head the embedding table's Q8_0 ones, the logits stay
bit-identical, and a product whose weights differ from the file's keeps its float32 copy. And the
memory around them: the file's tensor index is kept, and an engine keeps no second copy of the
weights."""

import pytest
import torch

from decoding import cpu_linear
from decoding.families import build_model
from decoding.gguf_blocks import adopt_blocks
from decoding.model import SeqBatchEntry

pytestmark = pytest.mark.skipif(cpu_linear.kernel() is None, reason="needs the AVX2 kernel")


def build(loaded):
    return build_model(loaded.hf_config, loaded.state, torch.device("cpu"), torch.float32, "native")


def logits(model, tokens: torch.Tensor):
    """A 200-token prefill, then a 7-node tree over it (two branches), all rows' logits."""
    cache = model.new_cache(1, 512)
    prefill = model.forward(tokens[:200], torch.arange(200), [SeqBatchEntry(0, 0, 200, None)], cache)
    mask = torch.ones(7, 7, dtype=torch.bool).tril_()
    mask[4:, 1:4] = False  # nodes 4-6 branch off the root beside nodes 1-3
    positions = torch.tensor([200, 201, 202, 203, 201, 202, 203])
    tree = model.forward(tokens[200:207], positions, [SeqBatchEntry(0, 200, 7, mask)], cache)
    return prefill, tree


def test_every_layer_product_takes_the_blocks_and_the_logits_stay_the_same(real_loaded):
    tokens = torch.randint(0, 49152, (207,), generator=torch.Generator().manual_seed(0))
    plain = build(real_loaded)
    expected = logits(plain, tokens)
    model = build(real_loaded)
    taken, seen, freed = adopt_blocks(model, real_loaded.gguf)
    assert (dict(taken), seen) == ({"q4_1": 120, "q8_0": 1}, 121) and freed > 500 * 2**20
    assert all(lin.blocks[0] == "q4_1" and lin.weight is None for layer in model.layers
               for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down))
    assert model.lm_head.blocks[0] == "q8_0" and model.lm_head.weight is None
    for ours, theirs in zip(logits(model, tokens), expected):
        assert torch.equal(ours, theirs)


def test_products_whose_weights_differ_from_the_files_keep_float32(real_loaded):
    model = build(real_loaded)
    down = model.layers[3].down
    down.weight[0, 0, 0] += 1e-3  # one weight of row 0 no longer a dequantized Q4_1 value
    model.lm_head.weight[-1, -1, -1] += 1e-3  # nor one of the lm_head's last row a Q8_0 value
    taken, seen, _ = adopt_blocks(model, real_loaded.gguf)
    assert (dict(taken), seen) == ({"q4_1": 119}, 121)
    assert down.blocks is None and down.weight is not None and model.layers[3].gate_up.blocks is not None
    assert model.lm_head.blocks is None and model.lm_head.weight is not None


def test_the_files_tensor_index_is_kept_beside_the_model_and_used(real_loaded, tmp_path, monkeypatch):
    import gguf

    from decoding import gguf_blocks

    first = gguf_blocks._tensor_index(real_loaded.gguf, tmp_path)
    assert (tmp_path / gguf_blocks.INDEX).exists()
    assert {t["format"] for t in first} == {"q4_1", "q8_0"} and len(first) == 211  # 30 layers x 7, the embeddings

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed the file although its index was kept")

    monkeypatch.setattr(gguf, "GGUFReader", no_parsing)
    assert gguf_blocks._tensor_index(real_loaded.gguf, tmp_path) == first
    taken, seen, _ = adopt_blocks(build(real_loaded), real_loaded.gguf, tmp_path)
    assert (dict(taken), seen) == ({"q4_1": 120, "q8_0": 1}, 121)
    (tmp_path / gguf_blocks.INDEX).write_text("{not json")  # a damaged index is parsed again
    monkeypatch.undo()
    assert gguf_blocks._tensor_index(real_loaded.gguf, tmp_path) == first


def test_an_engine_that_loaded_its_own_weights_drops_them_and_answers_the_same(real_loaded):
    """An engine that loaded the model itself keeps no state dict (the model holds its own copies:
    a view would keep the whole weights file mapped); one given a LoadedModel leaves it whole."""
    from decoding.config import EngineConfig
    from decoding.engine import Engine

    own = Engine(EngineConfig(method="ar", max_context=512))
    shared = Engine(EngineConfig(method="ar", max_context=512), loaded=real_loaded)
    assert own.loaded.state == {} and len(real_loaded.state) > 100
    source = real_loaded.state["model.embed_tokens.weight"]
    assert shared.model.embed.data_ptr() != source.data_ptr() and torch.equal(shared.model.embed, source)
    prompt = own.chat_prompt([{"role": "user", "content": "Name three rivers in Europe."}])
    assert own.generate(prompt, max_new_tokens=24).output == shared.generate(prompt, max_new_tokens=24).output
