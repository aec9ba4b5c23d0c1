"""`conceptguard serve`: run the LitServe server in the foreground."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the image-generation server")
    parser.add_argument(
        "--model", help="diffusers pipeline folder or hub id (default: the embedded model)"
    )
    parser.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0", "::"))
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--timeout", type=float, default=300.0, help="queue-wait limit, seconds")
    parser.set_defaults(func=serve_command)


def _install_sigterm_as_interrupt() -> None:
    """Map SIGTERM to KeyboardInterrupt in this (main) process only.

    LitServe shuts its workers down cleanly only on KeyboardInterrupt; containers send
    SIGTERM, which would otherwise orphan the workers with the port still bound. Forked
    children inherit the handler, and there SIGTERM keeps its default meaning.
    """
    main_pid = os.getpid()

    def handler(signum, frame) -> None:
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def serve_command(args: argparse.Namespace) -> int:
    import litserve as ls

    from patches.loading import load_pipeline
    from server.default_model import default_model_path
    from server.generation_api import GenerationAPI, ModelSettings

    if args.workers < 1:
        print("conceptguard: --workers must be at least 1", file=sys.stderr)
        return 2
    source = args.model or str(default_model_path())
    # Load once in the parent so a bad model fails here, with a clear message, not in workers.
    load_pipeline(source, args.dtype, "cpu")
    settings = ModelSettings(source=source, device=args.device, dtype=args.dtype)
    server = ls.LitServer(
        GenerationAPI(settings),
        accelerator=args.device,
        devices=1,
        workers_per_device=args.workers,
        timeout=args.timeout,
    )
    _install_sigterm_as_interrupt()
    print(f"conceptguard: serving {source} on http://{args.host}:{args.port}", flush=True)
    # LitServe has already stopped its workers when a KeyboardInterrupt reaches us.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(host=args.host, port=args.port, generate_client_file=False, num_api_servers=1)
    print("conceptguard: server stopped", flush=True)
    return 0
