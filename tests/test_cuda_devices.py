"""Device correctness without a GPU: the model's forward, the KV cache, the samplers and the
verifiers' tensor math run on an accelerator stand-in, and a CPU tensor meeting it raises exactly
where it would on a GPU host. Reading a value (int(), .item()) cannot work there, which is why the
samplers return tensors and leave reading them to the verifiers' walks.

The stand-in is torch's `meta` device (tensors with a device, shape and dtype but no data), not
FakeTensorMode's fake CUDA tensors: in a CPU-only torch build those cannot be indexed at all
(Python indexing takes a CUDA device guard: "PyTorch is not linked with support for cuda
devices"), and the model indexes everywhere. Both raise on the same mixing, which
`test_mixing_devices_is_caught` shows for each. Neither compares a generator's device with the
tensors' (CUDA does), so the generators asked for are checked separately.

The tests at the bottom run the same paths for real when CUDA is present (bench/gpu_check.sh).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

import decoding.verify as verify
from decoding.engine import pick_device
from decoding.model import Model, SeqBatchEntry
from decoding.tree import DraftTree
from decoding.verify import SamplingParams

DEVICE = torch.device("meta")  # the accelerator stand-in (see the module docstring)
PARAMS = SamplingParams(temperature=0.8, top_p=0.9, top_k=20)


@pytest.fixture
def generators(monkeypatch):
    """The devices generators are asked for. Neither the meta device nor FakeTensorMode compares a
    generator's device with the tensors' (CUDA does), and no generator can be made for them, so
    each request is recorded here and handed a CPU generator."""
    asked = []

    def recorded_generator(device, seed):
        asked.append(torch.device(device))
        return torch.Generator().manual_seed(seed)

    monkeypatch.setattr(verify, "generator", recorded_generator, raising=False)
    return asked


def tree_with_branches() -> DraftTree:
    t = DraftTree.root(5)
    t.add_chain(0, [7, 8, 9], ["a"] * 3)
    t.add(0, 11, "b")
    t.add(1, 12, "b")
    return t


def test_forward_keeps_every_tensor_on_the_device(tiny_loaded):
    model = Model(tiny_loaded.hf_config, tiny_loaded.state, DEVICE, torch.bfloat16)
    cache = model.new_cache(3, 64)
    tree = tree_with_branches()
    # As the engine builds a step: a prefill chunk, a tree (its mask made on the CPU by the
    # tree) and a plain one-token row, in one flat batch.
    batch = [SeqBatchEntry(0, 0, 6, None), SeqBatchEntry(1, 10, len(tree), tree.attention_mask()),
             SeqBatchEntry(2, 3, 1, None)]
    n = sum(e.n for e in batch)
    tokens = torch.arange(n, device=DEVICE) % 90 + 3
    positions = torch.cat([torch.arange(6), 10 + torch.tensor(tree.depths), torch.tensor([3])]).to(DEVICE)
    logits = model.forward(tokens, positions, batch, cache)
    assert logits.device == DEVICE and logits.shape == (n, tiny_loaded.hf_config["vocab_size"])
    rows = torch.tensor([5, 6 + len(tree) - 1, n - 1], device=DEVICE)
    assert model.forward(tokens, positions, batch, cache, rows).shape[0] == 3


def test_kv_compaction_on_the_device(tiny_loaded):
    model = Model(tiny_loaded.hf_config, tiny_loaded.state, DEVICE, torch.bfloat16)
    cache = model.new_cache(2, 32)
    cache.reserve(1, 8)  # blocks are zeroed on the device when handed out
    cache.keep(1, 4, [0, 2, 3])
    assert cache.k[0].device == DEVICE


def test_coupled_sampler_stays_on_the_logits_device(generators):
    logits = torch.randn(97, device=DEVICE)
    token = verify.coupled_sample(logits, PARAMS, seed=3, position=17)
    assert token.device == DEVICE and token.dim() == 0
    assert generators and all(d == DEVICE for d in generators)


def test_specinfer_draws_stay_on_the_logits_device(generators):
    logits = torch.randn(4, 97, device=DEVICE)
    probs = verify.processed_probs(logits, PARAMS)
    assert probs.device == DEVICE
    g = verify.make_generator(PARAMS, DEVICE)
    assert verify.sample(probs[0], g).device == DEVICE
    assert verify.uniform(g, probs.device).device == DEVICE
    assert generators == [DEVICE]


def test_mixing_devices_is_caught():
    """The check can fail: CPU noise added to accelerator log-probabilities raises on the stand-in,
    as it does on fake CUDA tensors (and on a GPU)."""
    with pytest.raises(RuntimeError, match="device"):
        torch.randn(97, device=DEVICE).log_softmax(-1) + torch.rand(97, dtype=torch.float64)
    with FakeTensorMode(), pytest.raises(FakeTensorDeviceMismatchError):
        torch.randn(97, device=torch.device("cuda", 0)).log_softmax(-1) + torch.rand(97, dtype=torch.float64)


# ---- on a real GPU (bench/gpu_check.sh runs these; skipped without CUDA) -------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
@pytest.mark.parametrize("sampler", ["coupled", "specinfer"])
def test_sampled_generation_on_cuda(tiny_loaded, sampler):
    from decoding.config import EngineConfig
    from decoding.engine import Engine

    engine = Engine(EngineConfig(method="logitspec", device="cuda", dtype="float32", sampler=sampler,
                                 adaptive=False), loaded=tiny_loaded)
    assert pick_device("auto").type == "cuda"
    seq = engine.generate([2, 10, 11, 12, 10, 11, 12, 10], SamplingParams(temperature=0.9, top_p=0.95, seed=1), 24)
    assert len(seq.output) == 24 or seq.finish_reason == "stop"


@needs_cuda
def test_greedy_speculative_equals_plain_on_cuda(tiny_loaded):
    from tests.conftest import engines_for

    engines = engines_for(tiny_loaded, device="cuda", dtype="float32", max_context=256)
    prompt = [2] + [10, 11, 12, 13] * 6
    outputs = {m: e.generate(prompt, SamplingParams(), 40).output for m, e in engines.items()}
    assert outputs["pld"] == outputs["ar"] and outputs["logitspec"] == outputs["ar"]
