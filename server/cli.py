"""The `logitspec` command: generate, bench and serve."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from decoding.config import DTYPES, METHODS, EngineConfig


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--tree-capacity", type=int, default=64, help="most tokens verified per sequence per step")
    p.add_argument("--no-adaptive", action="store_true", help="turn off cost-aware tree sizing")
    p.add_argument("--draft-margin", type=float, default=0.05,
                   help="draft only when the cost model expects this much more tokens/s than plain decoding")
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--sampler", default="coupled", choices=("coupled", "specinfer"),
                   help="lossless sampling verifier (coupled: same text for a seed whatever the draft)")


def _config(args, method: str) -> EngineConfig:
    return EngineConfig(model=args.model, method=method, device=args.device, dtype=args.dtype,
                        threads=args.threads, tree_capacity=args.tree_capacity,
                        adaptive=not args.no_adaptive, max_context=args.max_context,
                        sampler=args.sampler, draft_margin=args.draft_margin)


def cmd_generate(args) -> int:
    from decoding.engine import Engine
    from decoding.verify import SamplingParams

    engine = Engine(_config(args, args.method))
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

    import dataclasses

    import uvicorn

    from decoding.engine import Engine
    from server.app import create_app
    from server.settings import ServerSettings, keys_from_env
    from server.shutdown import GracefulServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Validated before the model loads, so a bad flag fails at once.
    settings = ServerSettings(
        model_name=args.served_model_name or "default", max_queue=args.max_queue,
        request_timeout=args.request_timeout, max_sessions=args.max_sessions,
        session_bytes=int(args.session_memory_mb * 2**20), api_keys=tuple(args.api_key or ()) + keys_from_env(),
        public_metrics=args.public_metrics, cors_origins=tuple(args.cors_origin or ()),
        max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_cap=args.max_tokens_cap, max_n=args.max_n, max_stop=args.max_stop,
        max_stop_length=args.max_stop_length, shutdown_grace=args.shutdown_grace)
    engine = Engine(dataclasses.replace(_config(args, args.method), max_batch=args.max_running))
    if not args.served_model_name:
        settings = dataclasses.replace(settings, model_name=engine.loaded.name)
    print(f"[logitspec] serving {settings.model_name} ({engine.device.type}, "
          f"{str(engine.dtype).replace('torch.', '')}, method {args.method}) on http://{args.host}:{args.port}",
          file=sys.stderr, flush=True)
    if not settings.api_keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[logitspec] warning: listening on {args.host} without API keys: anyone who can reach the port "
              f"can use it (--api-key or LOGITSPEC_API_KEYS)", file=sys.stderr, flush=True)
    app = create_app(engine, settings)
    # uvicorn's own wait for open connections comes after our drain; it only covers responses
    # still being written.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    GracefulServer(config, app.state.drain, settings.shutdown_grace).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    from decoding.specbench import DEFAULT_DATA

    parser = argparse.ArgumentParser(prog="logitspec", description="LogitSpec speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate one answer and print step statistics")
    g.add_argument("--prompt", required=True)
    g.add_argument("--method", default="logitspec", choices=METHODS)
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    _engine_args(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="Spec-Bench: MAT, tokens/s and speedup per category")
    b.add_argument("--data", default=str(DEFAULT_DATA))
    b.add_argument("--methods", default="ar,pld,logitspec")
    b.add_argument("--per-category", type=int, default=None)
    b.add_argument("--max-new-tokens", type=int, default=256)
    b.add_argument("--json", default=None)
    b.add_argument("--plot", default=None)
    _engine_args(b)
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("serve", help="start the OpenAI-compatible server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--method", default="logitspec", choices=METHODS, help="default speculation method")
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--max-running", type=int, default=8, help="sequences decoded together (KV slots)")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    s.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    s.add_argument("--max-sessions", type=int, default=256, help="session indexes kept (LRU)")
    s.add_argument("--session-memory-mb", type=float, default=512, help="memory for session indexes (LRU)")
    s.add_argument("--api-key", action="append", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (repeatable; also LOGITSPEC_API_KEYS, "
                        "comma-separated)")
    s.add_argument("--public-metrics", action="store_true", help="serve /metrics without a key even with API keys")
    s.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="browser origin allowed to call the API, e.g. https://chat.example.com or * (repeatable)")
    s.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body (413 beyond)")
    s.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: the context)")
    s.add_argument("--max-tokens-cap", type=int, default=None,
                   help="most completion tokens a choice may ask for, and the default when it asks for none")
    s.add_argument("--max-n", type=int, default=16, help="most sequences per request (n x prompts)")
    s.add_argument("--max-stop", type=int, default=4, help="most stop strings per request")
    s.add_argument("--max-stop-length", type=int, default=256, help="longest stop string (characters)")
    s.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="after SIGTERM: seconds running requests get to finish (new ones get 503)")
    _engine_args(s)
    s.set_defaults(func=cmd_serve)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"logitspec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
