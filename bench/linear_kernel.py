"""Our AVX2 float32 product against oneDNN's prepacked one, on the default model: what a forward of
n tokens costs with each (after 256 tokens of context, as the start-up calibration times it), and
the model's matrix products alone. Both models live in one process and every measurement alternates
between them, so a change of the machine's speed hits both alike; medians of the rounds.

    python bench/linear_kernel.py                 # 9 rounds
    python bench/linear_kernel.py --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decoding import cpu_linear  # noqa: E402
from decoding.config import EngineConfig  # noqa: E402
from decoding.engine import Engine  # noqa: E402
from decoding.model import SeqBatchEntry  # noqa: E402

SIZES = [1, 2, 4, 8, 16, 32, 64]


def timers(engine: Engine, past: int = 256):
    """(forward of n tokens, the model's linears alone on n rows) -> seconds."""
    slot = engine.cache.allocate()
    ctx = torch.randint(0, engine.model.config.vocab_size, (past + max(SIZES),),
                        generator=torch.Generator().manual_seed(0))
    engine._forward(ctx[:past], torch.arange(past), [SeqBatchEntry(slot, 0, past, None)], last_only=True)
    model = engine.model
    linears = model.products()

    def forward(n: int) -> float:
        entry = [SeqBatchEntry(slot, past, n, torch.ones(n, n, dtype=torch.bool).tril_())]
        t0 = time.perf_counter()
        engine._forward(ctx[past:past + n], torch.arange(past, past + n), entry)
        return time.perf_counter() - t0

    def products(n: int) -> float:
        with torch.inference_mode():
            xs = [torch.randn(n, lin.in_features) for lin in linears]
            t0 = time.perf_counter()
            for lin, x in zip(linears, xs):
                lin(x)
            return time.perf_counter() - t0
    return forward, products


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    if cpu_linear.kernel() is None:
        sys.exit(f"the AVX2 kernel is not available here: {cpu_linear.unavailable_reason()}")
    config = EngineConfig(method="ar", adaptive=False)
    engine = Engine(config)  # on a .gguf model, its blocks where they match (products "avx2+q4_1+q8_0")
    ours = timers(engine)
    cpu_linear._loaded["lib"] = None  # the next model's Linears take oneDNN's product
    theirs = timers(Engine(config))
    times = {(who, what, n): [] for who in ("avx2", "onednn") for what in (0, 1) for n in SIZES}
    for r in range(args.rounds):
        for n in SIZES:
            for what in (0, 1):
                for who, fns in (("avx2", ours), ("onednn", theirs)):
                    times[who, what, n].append(fns[what](n))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    print(f"{torch.get_num_threads()} threads; medians of {args.rounds} rounds, alternating; ms; "
          f"ours: {engine.products}")
    for what, label in ((0, "forward after 256 tokens"), (1, "matrix products alone")):
        print(f"{label:26s}" + "".join(f"{n:>8d}" for n in SIZES))
        for who in ("onednn", "avx2"):
            print(f"  {who:24s}" + "".join(f"{1000 * statistics.median(times[who, what, n]):8.1f}" for n in SIZES))
        print(f"  {'avx2 / onednn':24s}" + "".join(
            f"{statistics.median(times['avx2', what, n]) / statistics.median(times['onednn', what, n]):8.2f}"
            for n in SIZES))


if __name__ == "__main__":
    main()
