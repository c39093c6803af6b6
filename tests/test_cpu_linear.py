"""Our AVX2 float32 product (decoding/cpu_linear.py): right, row-independent, and replaced by
oneDNN's where it cannot be built."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from decoding import cpu_linear
from decoding.model import Linear
from tests.conftest import needs_kernel

ROOT = Path(__file__).resolve().parent.parent


@needs_kernel
def test_kernel_builds_where_the_cpu_and_a_compiler_allow():
    assert cpu_linear.kernel() is not None, cpu_linear.unavailable_reason()
    assert cpu_linear.in_use(torch.device("cpu"), torch.float32) == "avx2"
    assert cpu_linear.in_use(torch.device("cpu"), torch.bfloat16) == "torch"


# Shapes across the kernel's edges: panels of 16 columns (n), register blocks of 6 rows and passes
# of 64 rows (m), odd inner sizes (k).
@needs_kernel
@pytest.mark.parametrize("m, k, n, bias", [(1, 576, 960, False), (5, 33, 17, True), (6, 64, 16, False),
                                           (7, 100, 1, True), (16, 576, 3072, False), (64, 8, 40, True),
                                           (130, 31, 50, True), (0, 16, 16, False)])
def test_matches_a_float64_product(m, k, n, bias):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    y = cpu_linear.linear(cpu_linear.kernel(), x, cpu_linear.pack(w), n, b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert torch.allclose(y.double(), want, atol=1e-4 * k ** 0.5, rtol=1e-5)


@needs_kernel
def test_a_row_is_bit_identical_alone_or_in_any_batch_and_thread_count():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(140, 200, generator=g), torch.randn(70, 200, generator=g), torch.randn(70, generator=g)
    lin = Linear(w, b)
    assert lin.kernel is not None
    alone = torch.cat([lin(x[i:i + 1]) for i in range(len(x))])
    for m in (2, 5, 6, 7, 13, 64, 65, 140):
        assert torch.equal(lin(x[:m]), alone[:m]), m
    assert torch.equal(lin(x[3:9]), alone[3:9])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(lin(x), alone)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_inputs_of_any_leading_shape():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(24, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    lin = Linear(w)
    assert lin(x).shape == (2, 3, 24)
    assert torch.equal(lin(x), lin(x.reshape(6, 8)).view(2, 3, 24))
    assert torch.equal(lin(x.transpose(0, 1)), lin(x.transpose(0, 1).contiguous()))  # strided input


def run_fresh(code: str, **env) -> str:
    """Python in a fresh interpreter (the kernel is loaded once per process)."""
    full = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@needs_kernel
def test_shares_torchs_openmp_runtime(tmp_path):
    """Two OpenMP runtimes would each keep a thread pool spinning on the same cores."""
    out = run_fresh("import torch\nfrom decoding import cpu_linear\nassert cpu_linear.kernel() is not None\n"
                    "x = cpu_linear.linear(cpu_linear.kernel(), torch.ones(4, 8), cpu_linear.pack(torch.ones(8, 8)), 8, None)\n"
                    "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l}))",
                    LOGITSPEC_CACHE=str(tmp_path))
    assert out.count("libgomp") == 1, out
    assert list((tmp_path / "kernels").glob("linear_avx2-*.so")), "not compiled into the cache root"


@pytest.mark.parametrize("env, why", [({"CC": "/nonexistent/cc"}, "nonexistent"),
                                      ({"LOGITSPEC_CPU_KERNEL": "off"}, "LOGITSPEC_CPU_KERNEL=off")])
def test_falls_back_to_onednn_when_it_cannot_be_built(tmp_path, env, why):
    out = run_fresh("import torch\nfrom decoding import cpu_linear\nfrom decoding.model import Linear\n"
                    "w, x = torch.randn(40, 24), torch.randn(5, 24)\nlin = Linear(w)\n"
                    "print(lin.kernel is None, lin.packed, cpu_linear.in_use(torch.device('cpu'), torch.float32))\n"
                    "print(torch.allclose(lin(x), x @ w.T, atol=1e-5))\nprint(cpu_linear.unavailable_reason())",
                    LOGITSPEC_CACHE=str(tmp_path), **env)
    first, close, reason = out.splitlines()
    assert first == "True True torch" and close == "True"
    assert why in reason


def gguf_blocks(fmt: str, n: int, k: int, seed: int):
    """Random GGUF rows [n, k / 32, bytes per block]: Q4_1 (float16 d and m, then random nibbles)
    or Q8_0 (float16 d, then random int8)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    size = cpu_linear.Q4_BYTES if fmt == "q4_1" else cpu_linear.Q8_BYTES
    blocks = rng.integers(0, 256, (n, k // 32, size), dtype=np.uint8)
    d = (rng.random((n, k // 32)) * 0.02).astype(np.float16)
    blocks[..., 0:2] = d.view(np.uint8).reshape(n, k // 32, 2)
    if fmt == "q4_1":
        m = (-rng.random((n, k // 32)) * 0.1).astype(np.float16)
        blocks[..., 2:4] = m.view(np.uint8).reshape(n, k // 32, 2)
    return blocks


VALUES = {"q4_1": cpu_linear.q4_values, "q8_0": cpu_linear.q8_values}
PACK = {"q4_1": cpu_linear.pack_q4, "q8_0": cpu_linear.pack_q8}


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_block_values_are_ggufs_own_dequantization(fmt):
    import gguf
    import numpy as np

    blocks = gguf_blocks(fmt, 48, 576, 0)
    ours = VALUES[fmt](blocks)
    theirs = gguf.quants.dequantize(blocks.reshape(48, -1), getattr(gguf.GGMLQuantizationType, fmt.upper()))
    assert ours.dtype == np.float32 and np.array_equal(ours, theirs.astype(np.float32))


@contextlib.contextmanager
def block_products_on(isa: str):
    """The block products on AVX2 alone ("avx2") or with their AVX-512 paths ("avx512"; a skip
    where the CPU has no AVX-512F/BW), the kernel's choice restored after."""
    lib = cpu_linear.kernel()
    was = lib.linear_isa(-1)
    try:
        if lib.linear_isa(int(isa == "avx512")) != (isa == "avx512"):
            pytest.skip("this CPU has no AVX-512F/BW")
        yield
    finally:
        lib.linear_isa(was)


@pytest.fixture(params=["avx2", "avx512"])
def block_isa(request):
    with block_products_on(request.param):
        yield request.param


# The block products' paths: AVX2 in registers up to 6 (Q8_0) / 12 (Q4_1) rows in groups of at
# most 6, AVX-512 from 3 to 32 rows in groups of at most 16, a per-thread buffer beyond: every way
# must give exactly the float32 kernel's outputs on the dequantized weights, bias or not.
@needs_kernel
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("n, k", [(16, 32), (96, 576), (960, 576), (576, 1536)])
def test_block_product_is_bit_identical_to_the_float32_kernel(fmt, n, k, block_isa):
    lib = cpu_linear.kernel()
    blocks = gguf_blocks(fmt, n, k, n + k)
    weights = torch.from_numpy(VALUES[fmt](blocks))
    packed, panels = cpu_linear.pack(weights), PACK[fmt](blocks)
    g = torch.Generator().manual_seed(n)
    x, bias = torch.randn(40, k, generator=g), torch.randn(n, generator=g)
    for m in [*range(0, 20), 31, 32, 33, 40]:
        for b in (None, bias):
            ours = cpu_linear.linear_blocks(lib, fmt, x[:m], panels, n, k, b)
            assert torch.equal(ours, cpu_linear.linear(lib, x[:m], packed, n, b)), (m, b is not None)
    alone = cpu_linear.linear_blocks(lib, fmt, x[5:6], panels, n, k, None)
    assert torch.equal(cpu_linear.linear_blocks(lib, fmt, x, panels, n, k, None)[5:6], alone)


@needs_kernel
def test_avx512_block_paths_are_on_by_default_and_can_be_turned_off(tmp_path):
    with block_products_on("avx512"):  # skips where the CPU has no AVX-512
        pass
    script = ("import torch\nfrom decoding import cpu_linear\nprint(cpu_linear.block_isa(cpu_linear.kernel()))")
    assert run_fresh(script, LOGITSPEC_CACHE=str(tmp_path)).strip() == "avx512"
    assert run_fresh(script, LOGITSPEC_CACHE=str(tmp_path), LOGITSPEC_AVX512="off").strip() == "avx2"


@needs_kernel
@pytest.mark.parametrize("vocab", [49152, 1003, 8, 5])
def test_top_k_is_torchs_top_values_lower_index_first(vocab):
    lib = cpu_linear.kernel()
    g = torch.Generator().manual_seed(vocab)
    for trial in range(20):
        row = torch.randn(vocab, generator=g)
        if trial % 2:
            row = torch.round(row * 4) / 4  # many ties
        if trial % 5 == 0:
            row[trial % vocab] = float("-inf")  # a grammar's masked token: never taken
        for k in sorted({1, 4, 49, vocab}):
            k = min(k, vocab)
            top = cpu_linear.top_k(lib, row, k)
            finite = int(torch.isfinite(row).sum())
            assert len(top) == min(k, finite)
            assert torch.equal(row[top], row.topk(len(top)).values)  # the k largest values, largest first
            assert all(row[a] > row[b] or (row[a] == row[b] and a < b) for a, b in zip(top, top[1:]))
            assert len(set(top)) == len(top)
