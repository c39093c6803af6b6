"""Attention calls per step and forward time: one batched call per layer, one call per sequence,
and `auto` (on a CPU in float32: our kernel's attention, one call per layer for every row; else
SDPA with neighbouring seats batched where that costs less), on the default model (or --model),
for the batch shapes a decoding step has.

    python bench/attention.py [--batches 1,4,8,16] [--context 400] [--rounds 7]

Each shape is a decoding step over `batch` sequences whose slots hold `context` tokens (plus a
few, so lengths differ): plain (one row each), one 4- or 16-node tree among single rows, 4-node
trees everywhere, and plain rows with the middle sequence's context 4x the others' (from a seat
of its own past the others). Modes are interleaved round by round and the median forward time is
printed, with the attention calls per forward (layers x calls per layer)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decoding.config import EngineConfig  # noqa: E402
from decoding.engine import Engine  # noqa: E402
from decoding.model import SeqBatchEntry  # noqa: E402
from decoding.tree import DraftTree, NodeKind  # noqa: E402

DRAFT = NodeKind("draft", (), 1)


def chain_tree(n: int) -> DraftTree:
    """An n-node tree with branches (not a chain), as LogitSpec drafts."""
    t = DraftTree.root(100)
    parent = 0
    for i in range(1, n):
        parent = t.add(parent if i % 3 else 0, 100 + i, DRAFT)
    return t


def shapes(batch: int) -> dict[str, list[int]]:
    return {"plain": [1] * batch, "tree4+singles": [4] + [1] * (batch - 1),
            "tree16+singles": [16] + [1] * (batch - 1), "trees4": [4] * batch,
            "plain+long": [1] * batch}  # the middle sequence's context 4x the others'


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    engine = Engine(EngineConfig(model=args.model, method="ar", device=args.device, dtype=args.dtype,
                                 max_batch=max(batches) + 1, max_context=4 * args.context + 256, adaptive=False))
    model, cache = engine.model, engine.cache
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    lengths = [args.context + 7 * s for s in range(cache.num_slots)]
    long = cache.num_slots - 1  # the extra seat: stands in for the middle sequence in "plain+long"
    lengths[long] = 4 * args.context
    for slot, n in enumerate(lengths):  # fill every slot's context once
        tokens = torch.randint(0, vocab, (n,), generator=g)
        model.forward(tokens.to(model.device), torch.arange(n, device=model.device), [SeqBatchEntry(slot, 0, n, None)],
                      cache, torch.tensor([n - 1], device=model.device))
    print(f"model {engine.loaded.name} on {model.device.type} {str(model.dtype).replace('torch.', '')}, "
          f"{torch.get_num_threads()} threads, {model.config.num_layers} layers, context ~{args.context}")
    print(f"{'batch':>5} {'shape':<16} {'per-seq ms':>10} {'calls':>6} {'batched ms':>10} {'calls':>6} "
          f"{'auto ms':>8} {'calls':>6} {'batched/per-seq':>15} {'auto/best':>9}")
    for b in batches:
        for label, sizes in shapes(b).items():
            trees = [chain_tree(n) for n in sizes]
            seats = list(range(b))
            if label == "plain+long":
                if b < 3:
                    continue
                seats[b // 2] = long  # not the seat between its neighbours: auto reads it on its own
            batch = [SeqBatchEntry(s, lengths[s], len(t), t.attention_mask()) for s, t in zip(seats, trees)]
            tokens = torch.tensor([tok for t in trees for tok in t.tokens], device=model.device)
            positions = torch.tensor([lengths[s] + d for s, t in zip(seats, trees) for d in t.depths],
                                     device=model.device)
            times: dict[str, list[float]] = {"per-sequence": [], "batched": [], "auto": []}
            calls = {}
            for _ in range(args.rounds):
                for mode in times:
                    model.attention_mode = mode
                    before = model.attention_calls
                    if model.device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    model.forward(tokens, positions, batch, cache)
                    if model.device.type == "cuda":
                        torch.cuda.synchronize()
                    times[mode].append(time.perf_counter() - t0)
                    calls[mode] = model.attention_calls - before
            per, bat, auto = (1000 * statistics.median(times[m]) for m in ("per-sequence", "batched", "auto"))
            print(f"{b:>5} {label:<16} {per:>10.1f} {calls['per-sequence']:>6} {bat:>10.1f} {calls['batched']:>6} "
                  f"{auto:>8.1f} {calls['auto']:>6} {bat / per:>14.2f}x {auto / min(per, bat):>8.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
