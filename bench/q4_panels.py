"""What keeping the default model's Q4_1 blocks would buy the float32 path: bench/q4_panels.c (a
prototype, not used by the engine) against our AVX2 fp32 kernel, on SmolLM2-135M's 121 product
shapes (random Q4_1-like weights, the lm_head quantized too), 7 rounds alternating, medians.
It first checks that the two give bit-identical outputs.

    python bench/q4_panels.py

At 1b9f8cb on this project's 2-core AMD EPYC (AVX2), ms for all 121 products:
    rows   1     2     3     4     5     6     8     12    16    32    64
    fp32   15.3  15.3  15.2  17.6  17.3  17.0  20.4  25.1  31.1  54.1  99.1
    q4     6.1   6.5   8.0   9.1   13.1  14.3  19.6  22.4  28.0  53.9  97.1
"""
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from decoding import cpu_linear  # noqa: E402

torch.set_num_threads(2)
LIB = Path(tempfile.mkdtemp()) / "q4_panels.so"
subprocess.run(["cc", *cpu_linear.FLAGS, str(ROOT / "bench" / "q4_panels.c"), "-o", str(LIB)], check=True)
q4 = ctypes.CDLL(str(LIB))
q4.linear_q4.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
f32 = cpu_linear.kernel()
g = torch.Generator().manual_seed(0)
shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
def pack_q4(n, k):
    # random Q4_1-like: per column per 32-k block d, m; q in 0..15
    qv = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    d = (torch.rand(n, k // 32, generator=g) * 0.01).half().float()
    m = (-torch.rand(n, k // 32, generator=g) * 0.08).half().float()
    W = (qv.float().view(n, k // 32, 32) * d[..., None] + m[..., None]).view(n, k)  # mul then add, like numpy
    P, B = n // 16, k // 32
    out = np.zeros((P, B, 2 * 16 * 4 + 32 * 8), dtype=np.uint8)
    qn = qv.numpy().reshape(P, 16, B, 32)  # panel, col, block, kk
    dn = d.numpy().reshape(P, 16, B); mn = m.numpy().reshape(P, 16, B)
    for p in range(P):
        dm = np.ascontiguousarray(np.concatenate([dn[p].T, mn[p].T], axis=1).astype(np.float32))  # [B, 32]
        out[p, :, :128] = dm.view(np.uint8).reshape(B, 128)
        lo = qn[p, :8].transpose(1, 2, 0); hi = qn[p, 8:].transpose(1, 2, 0)  # [B, 32, 8]
        out[p, :, 128:] = (lo | (hi << 4)).reshape(B, 256)
    return W, torch.from_numpy(out.reshape(-1).copy())
print("packing...", file=sys.stderr)
ws = [pack_q4(n, k) for n, k in shapes]
packed32 = [(cpu_linear.pack(W), W.shape[0]) for W, _ in ws]
# correctness vs fp32 kernel
for m in (1, 3, 4, 5, 7, 13):
    x = torch.randn(m, 576)
    (W, q), (p32, n) = ws[2], packed32[2]
    y = torch.empty(m, n); q4.linear_q4(x.data_ptr(), m, 576, q.data_ptr(), n, y.data_ptr(), 2)
    ref = cpu_linear.linear(f32, x, p32, n, None)
    print("rows", m, "bit-equal to the fp32 kernel:", torch.equal(y, ref), "max diff", (y - ref).abs().max().item())
SIZES = [1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64]
xs = {m: [torch.randn(m, k, generator=g) for n, k in shapes] for m in SIZES}
ys = {m: [torch.empty(m, n) for n, k in shapes] for m in SIZES}
t = {(w, m): [] for w in ("f32", "q4") for m in SIZES}
for r in range(7):
    for m in SIZES:
        t0 = time.perf_counter()
        for (p32, n), x in zip(packed32, xs[m]): cpu_linear.linear(f32, x, p32, n, None)
        t["f32", m].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for (W, q), (n, k), x, y in zip(ws, shapes, xs[m], ys[m]): q4.linear_q4(x.data_ptr(), m, k, q.data_ptr(), n, y.data_ptr(), 2)
        t["q4", m].append(time.perf_counter() - t0)
for w in ("f32", "q4"):
    print(w, " ".join(f"{m}:{1000 * statistics.median(t[w, m]):.1f}" for m in SIZES))
