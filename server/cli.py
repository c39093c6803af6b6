"""The `logitspec` command: generate, bench and serve."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

# How long torch's OpenMP threads (libgomp, in the CPU wheels) spin at the end of a parallel region
# before they sleep. libgomp's default, 300,000 spins, assumes every core is ours: when another
# process keeps the cores busy, a spinning thread holds the core its partner needs to finish, and a
# 1-token forward, ~1,200 small parallel regions, then waits a scheduler slice at each one. Measured
# on this project's 2-core CPU with two `while True: pass` processes running, plain decoding fell
# from ~29 to 0.8 tok/s with the default, and ran at 12-16 tok/s with 1,000 spins, for about 3% of
# quiet speed (`bench/contention.py`). 1,000 is what libgomp itself uses for an active wait policy
# when it knows it has more threads than CPUs. Only a default: GOMP_SPINCOUNT or OMP_WAIT_POLICY in
# the environment win. libgomp reads it once, when torch is first imported, which is after this.
OPENMP_SPINCOUNT = "1000"
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPINCOUNT)

from decoding.config import ATTENTION, DTYPES, METHODS, RUNNERS, SAMPLERS, EngineConfig
from server.settings import ServerSettings, keys_from_env


ENGINE = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
# A server decodes several sequences together; the engine's own default (one) suits generate and bench.
SERVE_MAX_RUNNING = 8
# generate is one-shot: a shorter calibration when none is cached (serve and bench time the full
# one). Three rounds, not one: the median of three discards one disturbed round (on a busy machine a
# single round once timed a 1-token forward at 1.2 s, 10x its median, which made every tree look free).
GENERATE_CALIBRATION_ROUNDS = 3


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where there is none to show: a required option, an
    on/off flag (nargs 0), or None (the help text says what happens then)."""

    def _get_help_string(self, action):
        if action.required or action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def _engine_args(p: argparse.ArgumentParser, calibration_rounds: int = ENGINE["calibration_rounds"]) -> None:
    p.add_argument("--model", default=ENGINE["model"],
                   help="HF model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--runner", default=ENGINE["runner"], choices=RUNNERS,
                   help="native (this project's runner of the model's family), transformers (transformers' own "
                        "model class over our KV cache: any decoder it loads, slower) or auto (native where the "
                        "family has one)")
    p.add_argument("--device", default=ENGINE["device"], help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--dtype", default=ENGINE["dtype"], choices=DTYPES,
                   help="auto = bfloat16 on CUDA, float32 on CPU; gguf = the .gguf file's own quantized weights "
                        "run by llama.cpp on the CPU (needs the llama extra; see the README for its agreement "
                        "with float32)")
    p.add_argument("--threads", type=int, default=ENGINE["threads"], help="torch CPU threads (0 = torch's default)")
    p.add_argument("--tree-capacity", type=int, default=ENGINE["tree_capacity"],
                   help="most tokens verified per sequence per step")
    p.add_argument("--no-adaptive", action="store_false", dest="adaptive", default=ENGINE["adaptive"],
                   help="turn off cost-aware tree sizing (trees are cut by acceptance statistics only)")
    p.add_argument("--draft-margin", type=float, default=ENGINE["draft_margin"],
                   help="draft only when the cost model expects this much more tokens/s than plain decoding")
    p.add_argument("--max-context", type=int, default=ENGINE["max_context"],
                   help="tokens per sequence, prompt and output together (capped by the model's own)")
    p.add_argument("--sampler", default=ENGINE["sampler"], choices=SAMPLERS,
                   help="lossless sampling verifier (coupled: same text for a seed whatever the draft)")
    p.add_argument("--attention", default=ENGINE["attention"], choices=ATTENTION,
                   help="attention calls per layer: one for the whole batch, one per sequence, or auto (on a CPU "
                        "in float32 our kernel's, one call over every row's own cells; on a GPU one batched call)")
    p.add_argument("--compile", action="store_true", default=ENGINE["compile"],
                   help="torch.compile the layers' dense parts (for GPUs; not with CPU float32)")
    p.add_argument("--calibration-rounds", type=int, default=calibration_rounds,
                   help="rounds of start-up forward timings when the calibration cache has none as long "
                        "(cache: LOGITSPEC_CACHE, else ~/.cache/logitspec)")
    p.add_argument("--kv-memory", default=ENGINE["kv_memory"],
                   help="memory for the paged KV cache, e.g. 2GiB or 512MiB (auto: every sequence's full context, "
                        "at most 2 GiB, on a CPU; half the free memory on a GPU)")
    p.add_argument("--no-prefix-caching", action="store_false", dest="prefix_caching",
                   default=ENGINE["prefix_caching"],
                   help="compute every prompt in full instead of reusing cached K/V of earlier prompts' prefixes")
    p.add_argument("--recalibrate", action="store_true", default=ENGINE["recalibrate"],
                   help="time the start-up forwards again instead of reading the calibration cache")
    p.add_argument("--no-prior-statistics", action="store_false", dest="prior_statistics",
                   default=ENGINE["prior_statistics"],
                   help="where no saved acceptance statistics are read, start from none instead of those shipped "
                        "for the model (decoding/priors/)")
    p.add_argument("--no-corpus", action="store_false", dest="corpus", default=ENGINE["corpus"],
                   help="logitspec: retrieve from the session's own text only, not also from the corpus of the "
                        "model's own answers shipped for it (decoding/priors/*.corpus.json)")


def _config(args, method: str, max_batch: int = ENGINE["max_batch"]) -> EngineConfig:
    return EngineConfig(model=args.model, method=method, runner=args.runner, device=args.device, dtype=args.dtype,
                        threads=args.threads, tree_capacity=args.tree_capacity, adaptive=args.adaptive,
                        max_context=args.max_context, sampler=args.sampler, draft_margin=args.draft_margin,
                        max_batch=max_batch, calibration_rounds=args.calibration_rounds,
                        recalibrate=args.recalibrate, attention=args.attention, compile=args.compile,
                        kv_memory=args.kv_memory, prefix_caching=args.prefix_caching,
                        persist_statistics=getattr(args, "persist_statistics", ENGINE["persist_statistics"]),
                        prior_statistics=args.prior_statistics, corpus=args.corpus)


def _settings(args) -> ServerSettings:
    return ServerSettings(
        model_name=args.served_model_name or "default", max_queue=args.max_queue,
        request_timeout=args.request_timeout, max_sessions=args.max_sessions,
        session_bytes=int(args.session_memory_mb * 2**20), api_keys=tuple(args.api_key or ()) + keys_from_env(),
        public_metrics=args.public_metrics, cors_origins=tuple(args.cors_origin or ()),
        max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_cap=args.max_tokens_cap, max_n=args.max_n, max_stop=args.max_stop,
        max_stop_length=args.max_stop_length, shutdown_grace=args.shutdown_grace, access_log=args.access_log)


def _print_runner(engine) -> None:
    print(f"[logitspec] runner {engine.model.runner}, architecture {engine.model.architecture}, "
          f"numerics {engine.numerics}",
          file=sys.stderr, flush=True)


def cmd_generate(args) -> int:
    from decoding.engine import Engine
    from decoding.verify import SamplingParams

    engine = Engine(_config(args, args.method))
    _print_runner(engine)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    prompt = (engine.chat_prompt([{"role": "user", "content": args.prompt}]) if not args.raw
              else engine.tokenizer.encode(args.prompt))
    t0 = time.perf_counter()
    seq = engine.generate(prompt, params, args.max_tokens)
    seconds = time.perf_counter() - t0
    print(engine.tokenizer.decode(seq.output, skip_special_tokens=True))
    print(f"\n[{args.method}] {len(seq.output)} tokens in {seq.steps} steps "
          f"(mean accepted {seq.mean_accepted:.2f}/step), {seconds:.2f} s, "
          f"{len(seq.output) / seconds:.1f} tok/s, finish: {seq.finish_reason}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from decoding.specbench import format_table, plot, run_bench

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if "ar" not in methods:
        print("logitspec: ar not among --methods: no speedups or mismatches (they are measured against ar "
              "in the same run)", file=sys.stderr)
    result = run_bench(Path(args.data), methods, args.per_category, args.max_new_tokens, _config(args, "ar"))
    report = result.to_json(methods)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, Path(args.plot))
    return 0


def cmd_serve(args) -> int:
    import logging

    import uvicorn

    from decoding.engine import Engine, freeze_start_up_heap
    from server.app import create_app
    from server.shutdown import GracefulServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(args)  # validated before the model loads, so a bad flag fails at once
    engine = Engine(_config(args, args.method, max_batch=args.max_running))
    _print_runner(engine)
    if not args.served_model_name:
        settings = dataclasses.replace(settings, model_name=engine.loaded.name)
    print(f"[logitspec] serving {settings.model_name} ({engine.device.type}, "
          f"{engine.numerics}, method {args.method}) on http://{args.host}:{args.port}",
          file=sys.stderr, flush=True)
    if not settings.api_keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[logitspec] warning: listening on {args.host} without API keys: anyone who can reach the port "
              f"can use it (--api-key or LOGITSPEC_API_KEYS)", file=sys.stderr, flush=True)
    app = create_app(engine, settings)
    freeze_start_up_heap()
    # uvicorn's own wait for open connections comes after our drain; it only covers responses
    # still being written.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    GracefulServer(config, app.state.drain, settings.shutdown_grace).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from decoding.specbench import DEFAULT_DATA
    from decoding.verify import SamplingParams

    sampling = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    server = {f.name: f.default for f in dataclasses.fields(ServerSettings)}
    parser = argparse.ArgumentParser(prog="logitspec", description="LogitSpec speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    g = command("generate", "generate one answer and print step statistics")
    g.add_argument("--prompt", required=True, help="the user message (or, with --raw, the text to continue)")
    g.add_argument("--method", default=ENGINE["method"], choices=METHODS, help="speculation method")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=sampling["temperature"], help="0 = greedy")
    g.add_argument("--top-p", type=float, default=sampling["top_p"], help="nucleus sampling mass (1 = off)")
    g.add_argument("--top-k", type=int, default=sampling["top_k"], help="sample among the k likeliest (0 = off)")
    g.add_argument("--seed", type=int, default=sampling["seed"],
                   help="sampling seed: the same seed gives the same text (default: a random one)")
    g.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    _engine_args(g, calibration_rounds=GENERATE_CALIBRATION_ROUNDS)
    g.set_defaults(func=cmd_generate)

    b = command("bench", "Spec-Bench: MAT, tokens/s and speedup per category")
    b.add_argument("--data", default=str(DEFAULT_DATA), help="questions, one JSON object per line (Spec-Bench format)")
    b.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to compare (ar is the baseline)")
    b.add_argument("--per-category", type=int, default=None, help="questions per category (default: all)")
    b.add_argument("--max-new-tokens", type=int, default=256, help="most tokens generated per turn")
    b.add_argument("--json", default=None, help="also write the report to this JSON file (default: none)")
    b.add_argument("--plot", default=None, help="also plot speedup and MAT per category to this PNG file (default: none)")
    _engine_args(b)
    b.set_defaults(func=cmd_bench)

    s = command("serve", "start the OpenAI-compatible server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--method", default=ENGINE["method"], choices=METHODS,
                   help="default speculation method (a request may pick another)")
    s.add_argument("--served-model-name", default=None,
                   help="model id in the API (default: the model's file or folder name)")
    s.add_argument("--max-running", type=int, default=SERVE_MAX_RUNNING, help="sequences decoded together (KV slots)")
    s.add_argument("--max-queue", type=int, default=server["max_queue"], help="waiting requests before 429")
    s.add_argument("--request-timeout", type=float, default=server["request_timeout"], help="seconds per request")
    s.add_argument("--max-sessions", type=int, default=server["max_sessions"], help="session indexes kept (LRU)")
    s.add_argument("--session-memory-mb", type=float, default=server["session_bytes"] / 2**20,
                   help="memory for session indexes (LRU)")
    s.add_argument("--api-key", action="append", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (repeatable; also LOGITSPEC_API_KEYS, "
                        "comma-separated; default: no key needed)")
    s.add_argument("--public-metrics", action="store_true", help="serve /metrics without a key even with API keys")
    s.add_argument("--no-access-log", action="store_false", dest="access_log", default=server["access_log"],
                   help="do not log a line per request (method, path, status, duration, tokens)")
    s.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="browser origin allowed to call the API, e.g. https://chat.example.com or * (repeatable; "
                        "default: none)")
    s.add_argument("--max-body-bytes", type=int, default=server["max_body_bytes"], help="largest request body (413 beyond)")
    s.add_argument("--max-prompt-tokens", type=int, default=server["max_prompt_tokens"],
                   help="longest prompt (default: the context)")
    s.add_argument("--max-tokens-cap", type=int, default=server["max_tokens_cap"],
                   help="most completion tokens a choice may ask for, and the default when it asks for none "
                        "(default: the context)")
    s.add_argument("--max-n", type=int, default=server["max_n"], help="most sequences per request (n x prompts)")
    s.add_argument("--max-stop", type=int, default=server["max_stop"], help="most stop strings per request")
    s.add_argument("--max-stop-length", type=int, default=server["max_stop_length"],
                   help="longest stop string (characters)")
    s.add_argument("--shutdown-grace", type=float, default=server["shutdown_grace"],
                   help="after SIGTERM: seconds running requests get to finish (new ones get 503)")
    s.add_argument("--no-persist-statistics", action="store_false", dest="persist_statistics", default=True,
                   help="start from empty acceptance statistics instead of those the last server on this "
                        "model saved (in $LOGITSPEC_CACHE/statistics), and save none")
    _engine_args(s)
    s.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"logitspec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
