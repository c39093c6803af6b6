"""The CPU kernel's attention (`attend` in decoding/kernels/linear_avx2.c) against PyTorch's SDPA
on the default model's forwards: every forward of n tokens (a chain, as a tree forward verifies one)
after `--past` tokens of context alternates between the two in one process, so a change of the
machine's speed hits both alike; medians of the rounds. Prints each curve in the `N:MS,...` form
that `bench/draft_replay.py replay --cost` takes, and whether a chain's logits equal the plain
steps' to the bit with each.

    python bench/attention_ab.py --past 256 600 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.kernel_ab import chain_timer  # noqa: E402
from decoding.config import EngineConfig  # noqa: E402
from decoding.engine import Engine  # noqa: E402
from decoding.model import SeqBatchEntry  # noqa: E402

SIZES = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--past", type=int, nargs="+", default=[256, 600])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    engine = Engine(EngineConfig(method="ar"))
    model = engine.model
    kernel = model.cell_attention
    if kernel is None:
        sys.exit("the model does not run the CPU kernel's attention here")
    versions = {"kernel": kernel, "sdpa": None}
    slot = engine.cache.allocate()
    ctx = torch.randint(0, model.config.vocab_size, (max(args.past) + max(SIZES),),
                        generator=torch.Generator().manual_seed(0))
    for past in args.past:
        forward = chain_timer(engine, slot, ctx, past)

        same = {}
        for name, lib in versions.items():
            model.cell_attention = lib
            chain = forward(8)[1]
            plain = torch.cat([engine._forward(ctx[past + i:past + i + 1], torch.tensor([past + i]),
                                               [SeqBatchEntry(slot, past + i, 1, None)]) for i in range(8)])
            same[name] = torch.equal(chain, plain)
        times = {(name, n): [] for name in versions for n in SIZES}
        for r in range(args.rounds):
            for n in SIZES:
                for name, lib in versions.items():
                    model.cell_attention = lib
                    times[name, n].append(forward(n)[0])
            print(f"\r[attention_ab] past {past}: round {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        print(f"forward of n tokens after {past} of context, ms (medians of {args.rounds} rounds, alternating)")
        for name in versions:
            print(f"{name}: " + ",".join(f"{n}:{1e3 * statistics.median(times[name, n]):.1f}" for n in SIZES)
                  + f"   (a chain of 8 equals 8 plain steps bit for bit: {same[name]})")
    model.cell_attention = kernel


if __name__ == "__main__":
    main()
