"""Versions of the AVX2 linear kernel (`decoding/kernels/linear_avx2.c`) on the default model's
forwards: each source is compiled, and every forward of n tokens after 256 of context alternates
between them in one process (the model's linears are pointed at each library in turn), so a
change of the machine's speed hits all alike; medians of the rounds. Prints each version's curve
in the `N:MS,...` form that `bench/draft_replay.py replay --cost` takes, so a kernel change can be
judged by the speed it models for every method, not by the forward alone.

    git show 60b376b:decoding/kernels/linear_avx2.c > /tmp/old.c
    python bench/kernel_ab.py /tmp/old.c decoding/kernels/linear_avx2.c --rounds 9

The versions must have the C functions the model calls (`linear_f32`, and `linear_q4` /
`linear_q8` for products on a GGUF file's blocks); their outputs are compared on every size
before timing, since a faster kernel that changes a bit is not a candidate.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decoding import cpu_linear  # noqa: E402
from decoding.config import EngineConfig  # noqa: E402
from decoding.engine import Engine  # noqa: E402
from decoding.model import SeqBatchEntry  # noqa: E402

SIZES = list(range(1, 17)) + [24, 32, 48, 64]


def chain_timer(engine: Engine, slot: int, ctx: torch.Tensor, past: int):
    """Prefill ctx[:past] into the slot; returns forward(n): the seconds and logits of one forward
    of the next n tokens of ctx as a chain (as a tree forward verifies one), written over the same
    cells at every call."""
    engine._forward(ctx[:past], torch.arange(past), [SeqBatchEntry(slot, 0, past, None)], last_only=True)

    def forward(n: int) -> tuple[float, torch.Tensor]:
        entry = [SeqBatchEntry(slot, past, n, torch.ones(n, n, dtype=torch.bool).tril_())]
        t0 = time.perf_counter()
        logits = engine._forward(ctx[past:past + n], torch.arange(past, past + n), entry)
        return time.perf_counter() - t0, logits

    return forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    engine = Engine(EngineConfig(method="ar"))
    linears = engine.model.products()
    if not linears or any(lin.kernel is None for lin in linears):
        sys.exit(f"the model does not run on the AVX2 kernel here ({cpu_linear.unavailable_reason()})")
    with tempfile.TemporaryDirectory() as tmp:
        libs = []
        for i, src in enumerate(args.sources):
            cpu_linear.build(Path(tmp) / f"v{i}.so", src)
            libs.append(cpu_linear.bind(ctypes.CDLL(str(Path(tmp) / f"v{i}.so"))))
        needed = {"linear_f32"} | {"linear_q4" if lin.blocks[0] == "q4_1" else "linear_q8"
                                   for lin in linears if lin.blocks is not None}
        for src, lib in zip(args.sources, libs):
            missing = sorted(name for name in needed if not hasattr(lib, name))
            if missing:
                sys.exit(f"{src} lacks {', '.join(missing)}, which this model's products call")

        def use(lib: ctypes.CDLL) -> None:
            for lin in linears:
                lin.kernel = lib

        past = 256
        slot = engine.cache.allocate()
        ctx = torch.randint(0, engine.model.config.vocab_size, (past + max(SIZES),),
                            generator=torch.Generator().manual_seed(0))
        forward = chain_timer(engine, slot, ctx, past)

        for n in SIZES:
            outs = []
            for lib in libs:
                use(lib)
                outs.append(forward(n)[1])
            if not all(torch.equal(outs[0], o) for o in outs[1:]):
                sys.exit(f"the versions' logits differ at {n} tokens")
        times: dict[tuple[int, int], list[float]] = {(i, n): [] for i in range(len(libs)) for n in SIZES}
        for r in range(args.rounds):
            for n in SIZES:
                for i, lib in enumerate(libs):
                    use(lib)
                    times[i, n].append(forward(n)[0])
            print(f"\r[kernel_ab] round {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    print(f"forward of n tokens after {past} of context, ms (medians of {args.rounds} rounds, alternating)")
    for i, src in enumerate(args.sources):
        print(f"{src}: " + ",".join(f"{n}:{1e3 * statistics.median(times[i, n]):.1f}" for n in SIZES))


if __name__ == "__main__":
    main()
