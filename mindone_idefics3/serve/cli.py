"""`idefics3-serve` / `python -m mindone_idefics3.serve`: an OpenAI-compatible chat-completions server."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

from ..cli_options import add_image_cache_argument, add_model_arguments, run_command
from ..errors import Idefics3Error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="idefics3-serve",
        description="Serve an Idefics3 / SmolVLM checkpoint over OpenAI's chat-completions API (FastAPI + "
                    "uvicorn): POST /v1/chat/completions (streamed or not, images as data: URIs or http(s) URLs), "
                    "GET /v1/models, /health, /metrics. One worker owns the model; requests join the running "
                    "batch between decode steps (continuous batching) and reuse the prompt prefix of earlier "
                    "ones. Prints the URL once the model is loaded and its graphs are compiled.",
        epilog="example: idefics3-serve --model HuggingFaceTB/SmolVLM-256M-Instruct --port 8000   |   "
               "idefics3-serve --demo (tiny random model, no download)")
    add_model_arguments(p, model_required=False)
    add_image_cache_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = a free port, printed when ready)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients send and /v1/models lists (default: the --model argument's last "
                        "path part)")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="most requests generated together: the rows of the KV cache (default 8)")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="prompt + answer tokens one request may hold: each row of the KV cache has this many slots "
                        "(rounded up to 64 × a power of two; default: the model's context). Longer requests get "
                        "400")
    p.add_argument("--scheduler", choices=["continuous", "static"], default="continuous",
                   help="continuous (default): requests join the running batch at the next decode step, their "
                        "images and prompt run in pieces between steps, finished rows keep their prefix for "
                        "later requests; static: a batch runs to its end while new requests wait (the old way, "
                        "kept for comparison)")
    p.add_argument("--no-warmup", action="store_true",
                   help="report ready as soon as the model is loaded, without compiling the graphs first (the "
                        "first requests then pay for compiling)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a batch; more get 503 with Retry-After (default 64)")
    p.add_argument("--max-images-per-request", type=int, default=8, help="default 8")
    p.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="refuse prompts (text + image tokens) longer than this (default: the model's context)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, metavar="N",
                   help="the largest max_tokens a request may ask for, and the default when it asks for none "
                        "(capped by the context left after the prompt; default 1024)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, metavar="N",
                   help="refuse images with more pixels than this (default 4096×4096)")
    p.add_argument("--max-image-bytes", type=int, default=20 * 2**20, metavar="N",
                   help="largest http(s) image download (default 20 MiB)")
    p.add_argument("--max-request-bytes", type=int, default=32 * 2**20, metavar="N",
                   help="largest request body; more gets 413 (default 32 MiB)")
    p.add_argument("--api-key", default=os.environ.get("IDEFICS3_SERVE_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $IDEFICS3_SERVE_API_KEY, else none)")
    p.add_argument("--no-remote-images", action="store_true",
                   help="refuse http(s) image URLs (only inline data: URIs)")
    p.add_argument("--allowed-media-domains", default=None, metavar="HOST,HOST",
                   help="fetch http(s) images only from these host names (exact match, comma-separated; redirects "
                        "to other hosts are refused too); default: any public host")
    p.add_argument("--allow-private-media-urls", action="store_true",
                   help="let image URLs reach loopback, private, link-local and other non-public addresses (off by "
                        "default: a client could otherwise make the server request internal services)")
    p.add_argument("--request-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request body must arrive within this long (else 408), and each piece of an answer must be "
                        "taken by the client within this long (else the connection is closed and the request "
                        "cancelled); default 30")
    p.add_argument("--grace-period", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT: stop accepting, let running requests finish for up to this long, then "
                        "exit 0 (default 30)")
    p.add_argument("--no-batch-padding", action="store_true",
                   help="--scheduler static: run batches of exactly the waiting requests instead of padding them to "
                        "1, 2, 4 or 8 rows (padding keeps the number of compiled graph shapes small)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn and server log level (default warning; the access log is on at any level)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text lines, or one JSON object per line for log pipelines (default text)")
    p.add_argument("--no-access-log", action="store_true",
                   help="no access-log line per request (logger mindone_idefics3.serve.access)")
    p.add_argument("--demo", action="store_true",
                   help="serve a tiny random-weight checkpoint written to a temp dir (no download; its answers are "
                        "meaningless by construction)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(run, args)


def run(args: argparse.Namespace) -> int:
    if not args.demo and not args.model:
        raise Idefics3Error("pass --model DIR_OR_REPO (or --demo)")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise Idefics3Error(f"--max-model-len must be at least 2, got {args.max_model_len}")
    for flag in ("max_batch_size", "max_queue", "max_images_per_request", "max_tokens_limit", "max_image_pixels",
                 "max_image_bytes", "max_request_bytes"):
        if getattr(args, flag) < 1:
            raise Idefics3Error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not args.request_timeout > 0:
        raise Idefics3Error(f"--request-timeout must be more than 0 seconds, got {args.request_timeout:g}")
    with tempfile.TemporaryDirectory(prefix="idefics3-serve-demo-") as tmp:
        if args.demo:
            from ..demo import write_demo_checkpoint

            args.model = str(write_demo_checkpoint(Path(tmp) / "model"))
            args.served_model_name = args.served_model_name or "idefics3-demo"
            print("demo: tiny random-weight model — its answers are meaningless by construction", file=sys.stderr)
        return serve(args)


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .server import GracefulServer
    except ImportError as e:
        raise Idefics3Error(f"the server needs FastAPI and uvicorn ({e}); install them with: pip install "
                            "'mindone_idefics3[serve]'") from None
    from ..hub import resolve_model_dir
    from . import logs
    from .app import Settings, create_app
    from .engine import Engine
    from .media import MediaPolicy
    from .prepare import Limits, Preparer

    logs.configure(args.log_level, args.log_format, access_log=not args.no_access_log)
    allowed_domains = MediaPolicy.domains(args.allowed_media_domains)
    model_dir = resolve_model_dir(args.model)  # a bad --model fails here, before the server starts
    name = args.served_model_name or Path(str(args.model).rstrip("/")).name
    engine = Engine(lambda: _load(args, model_dir), max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                    pad_batch_to_power_of_two=not args.no_batch_padding, scheduler=args.scheduler,
                    max_model_len=args.max_model_len, warmup=not args.no_warmup)

    def preparer() -> Preparer:
        from ..processing import Idefics3Processor
        from ..cli_options import processor_overrides

        model = engine.model
        context = model.config.text_config.max_position_embeddings
        if engine.batch is not None and engine.batch.length < context:
            context, where = engine.batch.length, f"this server's --max-model-len ({engine.batch.length} tokens)"
        else:
            where = f"the model's context of {context} tokens"
        limits = Limits(context=context, context_name=where,
                        max_images=args.max_images_per_request, max_prompt_tokens=args.max_prompt_tokens,
                        max_tokens=args.max_tokens_limit, max_image_pixels=args.max_image_pixels,
                        remote_images=not args.no_remote_images, max_image_bytes=args.max_image_bytes,
                        allowed_media_domains=allowed_domains, allow_private_media_urls=args.allow_private_media_urls)
        processor = Idefics3Processor.from_pretrained(model_dir, **processor_overrides(args))
        return Preparer(processor, limits, model.generation_defaults())

    app = create_app(engine, preparer, Settings(name, api_key=args.api_key, max_request_bytes=args.max_request_bytes,
                                                request_timeout=args.request_timeout))
    # log_config=None: uvicorn's records go through logs.configure's handler; the access log is ours (logs.py)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None,
                            timeout_graceful_shutdown=args.grace_period, access_log=False)
    server = GracefulServer(config)
    sock = config.bind_socket()
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    threading.Thread(target=_announce, args=(server, engine, f"http://{url_host}:{port}", name), daemon=True).start()
    server.run(sockets=[sock])
    if engine.load_error is not None:
        raise Idefics3Error(f"the model failed to load: {engine.load_error}")
    return 0


def _load(args: argparse.Namespace, model_dir):
    """(model, processor, image cache) for the engine's worker thread; the cache's default size is the device's."""
    from ..cli_options import image_cache, load_processor_and_model

    args.model = str(model_dir)
    processor, model, device, seconds = load_processor_and_model(args)
    print(f"loaded {model_dir} on {device} in {seconds:.1f} s", file=sys.stderr, flush=True)
    return model, processor, image_cache(args, device)


def _announce(server, engine, url: str, name: str) -> None:
    """Print the URL once the model is loaded and the socket listens; stop the server if the model fails."""
    while not (engine.ready.is_set() and server.started):
        if engine.load_error is not None:
            server.should_exit = True
            return
        time.sleep(0.05)
    print(f"idefics3-serve: ready at {url}/v1 (model {name!r}); health {url}/health, metrics {url}/metrics",
          flush=True)
