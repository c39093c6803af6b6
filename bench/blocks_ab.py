"""The default model's forwards with its products on the GGUF file's blocks against float32: every
product in float32 (`LOGITSPEC_Q4=off`), the layers on their Q4_1 blocks with the lm_head in
float32, and everything on blocks (the lm_head on the embedding table's Q8_0 ones, the default).
Forwards of n tokens after 256 of context, all three in one process and alternating, so a change
of the machine's speed hits all alike; medians of the rounds. The logits are compared first: the
blocks must give exactly the float32 outputs.

    python bench/blocks_ab.py              # 9 rounds
    python bench/blocks_ab.py --rounds 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decoding.config import EngineConfig  # noqa: E402
from decoding.engine import Engine  # noqa: E402
from decoding.model import SeqBatchEntry  # noqa: E402

SIZES = [1, 2, 4, 6, 8, 12, 16, 32, 64]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    os.environ["LOGITSPEC_Q4"] = "off"
    plain = Engine(EngineConfig(method="ar"))
    os.environ["LOGITSPEC_Q4"] = "on"
    blocks = Engine(EngineConfig(method="ar"))
    lm_head = blocks.model.lm_head
    if plain.products != "avx2" or lm_head.blocks is None:
        sys.exit(f"needs the AVX2 kernel and a model whose lm_head takes blocks (products: {blocks.products})")
    on_blocks, in_float32 = (lm_head.blocks, None), (None, plain.model.lm_head.weight)

    past = 256
    ctx = torch.randint(0, plain.model.config.vocab_size, (past + max(SIZES),),
                        generator=torch.Generator().manual_seed(0))
    slots = {}
    for engine in (plain, blocks):
        slots[id(engine)] = engine.cache.allocate()
        engine._forward(ctx[:past], torch.arange(past), [SeqBatchEntry(slots[id(engine)], 0, past, None)],
                        last_only=True)

    def forward(config: str, n: int) -> tuple[float, torch.Tensor]:
        engine = plain if config == "float32" else blocks
        lm_head.blocks, lm_head.weight = in_float32 if config == "layers on blocks" else on_blocks
        entry = [SeqBatchEntry(slots[id(engine)], past, n, torch.ones(n, n, dtype=torch.bool).tril_())]
        t0 = time.perf_counter()
        logits = engine._forward(ctx[past:past + n], torch.arange(past, past + n), entry)
        return time.perf_counter() - t0, logits

    configs = ["float32", "layers on blocks", "all on blocks"]
    for n in SIZES:
        outs = [forward(c, n)[1] for c in configs]
        if not all(torch.equal(outs[0], o) for o in outs[1:]):
            sys.exit(f"the logits differ at {n} tokens")
    times: dict[tuple[str, int], list[float]] = {(c, n): [] for c in configs for n in SIZES}
    for r in range(args.rounds):
        for n in SIZES:
            for c in configs:
                times[c, n].append(forward(c, n)[0])
        print(f"\r[blocks_ab] round {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(f"forward of n tokens after {past} of context, ms (medians of {args.rounds} rounds, alternating); "
          f"logits equal at every size; products {blocks.products}")
    print(f"{'tokens':>18} " + "".join(f"{n:>7d}" for n in SIZES))
    for c in configs:
        print(f"{c:>18} " + "".join(f"{1e3 * statistics.median(times[c, n]):7.1f}" for n in SIZES))


if __name__ == "__main__":
    main()
