#!/usr/bin/env python
"""Serve an inference package behind an OpenAI-compatible HTTP API.

    python tools/export.py --checkpoint outputs/quickstart/checkpoints --out outputs/pkg_tiny --int8
    python tools/serve.py --package outputs/pkg_tiny --mode cache --budget-mb 64 --port 8000
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "pkg_tiny", "prompt": "The import statement", "max_tokens": 32, "temperature": 0}'
    python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); \\
        print(c.completions.create(model='pkg_tiny', prompt='A class', max_tokens=32).choices[0].text)"

Routes: POST /v1/completions, POST /v1/chat/completions (both with "stream": true for
server-sent events), GET /v1/models, GET /health. Concurrent requests are decoded together
(continuous batching, --max-batch). Modes: resident | naive | ring[:K] | cache[:S] (S expert
slots; without S, --budget-mb sets the expert memory). SIGTERM / SIGINT: stop admitting
requests, finish the ones in flight, exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--mode", default="resident", help="resident | naive | ring[:K] | cache[:S]")
    p.add_argument("--budget-mb", type=float, default=None, help="expert memory budget for 'ring' / 'cache' without a count")
    p.add_argument("--source", choices=("disk", "host"), default="disk")
    p.add_argument("--buffered", action="store_true", help="read experts through the page cache (no O_DIRECT)")
    p.add_argument("--no-prefetch", action="store_true", help="cache mode: no pre-gating prefetch")
    p.add_argument("--quant", choices=("float32", "int8", "int4"), default="float32",
                   help="cache mode: serve the int8 / int4 expert sections (export with --int8 / --int4)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the package directory name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-concurrent", type=int, default=16, help="requests in flight at once; more get 429")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's max_seq_len - 1")
    p.add_argument("--max-tokens", type=int, default=256, help="largest accepted max_tokens")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tokenizer", type=Path, default=None, help="default: the package's tokenizer/, else bytes")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))

    from paddle_semoe.data.subword import TokenizerError, model_tokenizer
    from paddle_semoe.inference.package import PackageError, read_manifest
    from paddle_semoe.inference.runner import InferenceModel, ServeConfig, parse_mode
    from paddle_semoe.inference.scheduler import GenerationEngine
    from paddle_semoe.inference.server import CompletionServer, ServerLimits

    try:
        manifest = read_manifest(args.package)
        tok = model_tokenizer(args.package, int(manifest.model["vocab_size"]), args.tokenizer)
        mode, k = parse_mode(args.mode)
        serve = ServeConfig(mode=mode, num_slots=k, budget_bytes=int(args.budget_mb * 2**20) if args.budget_mb else None,
                            source=args.source, direct_io=not args.buffered, prefetch=not args.no_prefetch,
                            quant=args.quant)
        max_seq = int(manifest.model["max_seq_len"])
        limits = ServerLimits(max_prompt_tokens=args.max_prompt_tokens or max_seq - 1, max_tokens=args.max_tokens,
                              max_concurrent=args.max_concurrent)
        model = InferenceModel.load(manifest, serve)
    except (PackageError, TokenizerError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    engine = GenerationEngine(model, max_batch=args.max_batch).start()
    eos = getattr(tok, "eos_id", None)
    server = CompletionServer(engine, tok, args.model_name or args.package.resolve().name, max_seq, limits,
                              args.host, args.port, stop_ids=() if eos is None else (int(eos),)).start()
    print(f"serving {server.model_name} ({args.mode}) on {server.url}", flush=True)
    stop = threading.Event()

    def on_signal(signum, _frame):
        logging.getLogger("serve").info("%s: finishing the requests in flight", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(0.5):  # short waits: signal handlers run promptly
        pass
    server.shutdown()
    model.close()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    from paddle_semoe.engine.launch_env import run_entry

    sys.exit(run_entry(main, name="serve"))
