"""Speed on a GPU without trained weights: a randomly initialised Llama-3-8B-shaped model in bf16,
its weights made on the device (speed needs no trained weights, and nothing has to be carried).

    python bench/gpu_bench.py [--json OUT.json]     # on a CUDA machine
    python bench/gpu_bench.py --dry-run             # the same steps on the CPU with a tiny model

Prints, in order:
1. the memory bandwidth measured by a device-to-device copy, and the bandwidth limit of plain
   decoding it implies (weight bytes read once per token);
2. forward time for 1 to 64 new tokens of one sequence (a tree verification's cost curve);
3. plain decoding steps of 1 to 32 sequences, one batched attention call per layer against one
   call per sequence (attention calls per step);
4. with --compile: the same 1-token and batched forwards with the layers' dense parts compiled;
5. tokens/s of the engine (`ar`, `logitspec`) and of transformers `generate` on the same weights.
A random model's greedy output soon repeats itself, so `logitspec` accepts far more than on real
text here: read its figure as the cost of the machinery, not as a speedup to expect.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decoding.config import EngineConfig  # noqa: E402
from decoding.engine import Engine  # noqa: E402
from decoding.loader import LoadedModel  # noqa: E402
from decoding.model import Model, SeqBatchEntry  # noqa: E402
from decoding.verify import SamplingParams  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=2, eos_token_id=1)


class IdTokenizer:
    """Ids are the text: the engine needs a tokenizer object, the benchmark no text."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, rounds: int) -> float:
    """Median seconds of `rounds` calls after one warm-up."""
    fn()
    times = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second a device-to-device copy moves, counting bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, 5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the steps, not speed")
    ap.add_argument("--compile", action="store_true", help="also time forwards with Model.compile()")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    shape = TINY if args.dry_run else LLAMA3_8B
    rounds = 2 if args.dry_run else args.rounds
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
                    "torch": torch.__version__, "model": "tiny" if args.dry_run else "Llama-3-8B shape, random, bf16"}
    print(f"gpu_bench on {report['device']}, torch {torch.__version__}, {report['model']}", flush=True)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    t0 = time.perf_counter()
    config = LlamaConfig(**shape)
    with torch.device(device):
        hf_model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    hf = config.to_dict()
    hf["model_type"] = "llama"
    state = dict(hf_model.state_dict())
    loaded = LoadedModel("random-llama", Path("."), hf, state, IdTokenizer())
    model = Model(hf, state, device, torch.bfloat16)
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values()
                       if t.dim() == 2 and t.shape != (shape["vocab_size"], shape["hidden_size"])) \
        + shape["vocab_size"] * shape["hidden_size"] * 2  # every layer plus the output head, once
    print(f"weights made on {device.type} in {time.perf_counter() - t0:.1f} s; "
          f"{weight_bytes / 1e9:.2f} GB read per plain step", flush=True)

    bw = copy_bandwidth(device, min(4 * 2**30, 8 * weight_bytes) if device.type == "cuda" else 2**26)
    report["bandwidth_GBps"] = bw / 1e9
    report["bandwidth_limit_tok_s"] = bw / weight_bytes
    print(f"1. device-to-device copy {bw / 1e9:.0f} GB/s: plain decoding at most "
          f"{bw / weight_bytes:.0f} tok/s for one sequence", flush=True)

    max_len = 1024
    cache = model.new_cache(32, max_len)
    context = 512
    vocab = shape["vocab_size"]
    g = torch.Generator().manual_seed(0)
    for slot in range(32):
        tokens = torch.randint(0, vocab, (context,), generator=g).to(device)
        model.forward(tokens, torch.arange(context, device=device), [SeqBatchEntry(slot, 0, context, None)], cache,
                      torch.tensor([context - 1], device=device))

    def tree_forward(n: int):
        tokens = torch.randint(0, vocab, (n,), generator=g).to(device)
        mask = torch.ones(n, n, dtype=torch.bool).tril_()
        return lambda: model.forward(tokens, torch.arange(context, context + n, device=device),
                                     [SeqBatchEntry(0, context, n, mask)], cache)

    curve = {n: timed(tree_forward(n), device, rounds) for n in (1, 2, 4, 8, 16, 32, 64)}
    report["forward_ms"] = {n: 1000 * s for n, s in curve.items()}
    print("2. forward of n tokens, one sequence, context 512: " +
          ", ".join(f"{n}: {1000 * s:.2f} ms" for n, s in curve.items()), flush=True)

    def plain_step(b: int):
        tokens = torch.randint(0, vocab, (b,), generator=g).to(device)
        positions = torch.full((b,), context, device=device)
        batch = [SeqBatchEntry(s, context, 1, None) for s in range(b)]
        return lambda: model.forward(tokens, positions, batch, cache)

    report["plain_steps"] = []
    print("3. plain step of b sequences: attention batched vs per sequence", flush=True)
    for b in (1, 4, 8, 16, 32):
        row = {"batch": b}
        for mode in ("batched", "per-sequence"):
            model.attention_mode = mode
            before = model.attention_calls
            row[mode + "_ms"] = 1000 * timed(plain_step(b), device, rounds)
            row[mode + "_calls"] = (model.attention_calls - before) // (rounds + 1)
        report["plain_steps"].append(row)
        print(f"   b={b:>2}: batched {row['batched_ms']:.2f} ms ({row['batched_calls']} calls), per-sequence "
              f"{row['per-sequence_ms']:.2f} ms ({row['per-sequence_calls']} calls)", flush=True)
    model.attention_mode = "auto"

    if args.compile:
        t0 = time.perf_counter()
        model.compile()
        one, eight = timed(tree_forward(1), device, rounds), timed(plain_step(8), device, rounds)
        report["compiled_ms"] = {"1_token": 1000 * one, "plain_batch_8": 1000 * eight}
        print(f"4. compiled: 1 token {1000 * one:.2f} ms (eager {1000 * curve[1]:.2f}), plain batch of 8 "
              f"{1000 * eight:.2f} ms; compiling and timing took {time.perf_counter() - t0:.0f} s", flush=True)
        model._qkv, model._mlp = model._qkv_eager, model._mlp_eager

    prompt = [shape["bos_token_id"]] + torch.randint(3, vocab, (200,), generator=g).tolist()
    n = args.max_new_tokens
    rates = {}
    for method in ("ar", "logitspec"):
        engine = Engine(EngineConfig(method=method, device=device.type, dtype="bfloat16", max_context=2048),
                        loaded=loaded, model=model)
        engine.generate(prompt, SamplingParams(), 8)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        seq = engine.generate(prompt, SamplingParams(), n)
        sync(device)
        rates[method] = len(seq.output) / (time.perf_counter() - t0)
        rates[method + "_mat"] = seq.mean_accepted
    ids = torch.tensor([prompt], device=device)
    hf_model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = hf_model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    sync(device)
    rates["transformers"] = (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)
    report["tok_s"] = rates
    print(f"5. one sequence, {n} new tokens, greedy: engine ar {rates['ar']:.1f} tok/s, logitspec "
          f"{rates['logitspec']:.1f} tok/s (MAT {rates['logitspec_mat']:.2f}), transformers generate "
          f"{rates['transformers']:.1f} tok/s; bandwidth limit {report['bandwidth_limit_tok_s']:.0f} tok/s",
          flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
