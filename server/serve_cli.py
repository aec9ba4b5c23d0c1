"""`conceptguard serve`: run the LitServe server in the foreground."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the image-generation server")
    parser.add_argument(
        "--model", help="diffusers pipeline folder or hub id (default: the embedded model)"
    )
    parser.add_argument(
        "--registry",
        help="patch registry directory (default: the config's, else $CONCEPTGUARD_REGISTRY, "
        "else ./registry)",
    )
    parser.add_argument(
        "--registry-create",
        choices=("if-missing", "never"),
        default="if-missing",
        help="create an empty registry where --registry holds none (if-missing, the default), "
        "or refuse to start there (never: for replicas that must share an existing registry)",
    )
    parser.add_argument("--config", help="server config file, YAML or JSON (server/config.py)")
    parser.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0", "::"))
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--timeout", type=float, help="queue-wait limit in seconds (config)")
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


def _raise_open_files_limit() -> None:
    """Let the API process hold as many connections as the hard limit allows (the soft limit
    is often 1024); slow clients are bounded by the HTTP timeouts, not by running out."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve_command(args: argparse.Namespace) -> int:
    from server.metrics import prepare_multiprocess_dir, remove_multiprocess_dir
    from server.worker_health import prepare_run_dir, remove_run_dir

    if args.workers < 1:
        print("conceptguard: --workers must be at least 1", file=sys.stderr)
        return 2
    _raise_open_files_limit()
    # Before anything imports prometheus_client, in this process and so in every child.
    metrics_dir = prepare_multiprocess_dir()
    run_dir = prepare_run_dir()
    try:
        return _serve(args, run_dir)
    finally:
        remove_run_dir(run_dir)
        remove_multiprocess_dir(metrics_dir)


def _serve(args: argparse.Namespace, run_dir: Path) -> int:
    import torch

    from patches.loading import load_pipeline
    from patches.signature import ModelSignature
    from server.app import build_server, uvicorn_options
    from server.config import load_config, with_generated_keys
    from server.default_model import default_model_path
    from server.generation import native_size
    from server.generation_api import ModelSettings

    config = load_config(args.config)
    if args.timeout is not None:
        batching = config.batching.model_copy(update={"queue_timeout_s": args.timeout})
        config = config.model_copy(update={"batching": batching})
    registry_path = Path(args.registry or config.registry or "registry").resolve()
    source = args.model or str(default_model_path())
    # One thread here: this process only loads and hashes, and LitServe forks the API process
    # from it (a forked child must not inherit a busy OpenMP pool).
    torch.set_num_threads(1)
    # Load once in the parent so a bad model fails here, with a clear message, not in workers.
    pipe = load_pipeline(source, args.dtype, "cpu")
    # The API process verifies uploads against the model's signature (fingerprints, names,
    # shapes); the weights themselves are dropped before LitServe starts its processes.
    signature = ModelSignature.of(pipe)
    native = native_size(pipe)
    del pipe
    gc.collect()
    if not config.has_keys():
        config, keys = with_generated_keys(config)
        print(
            "conceptguard: no API keys configured; keys for this run only:\n"
            f"  tenant 'default': {keys['default']}\n  admin: {keys['admin']}",
            flush=True,
        )
    settings = ModelSettings(source=source, device=args.device, dtype=args.dtype)
    server = build_server(
        settings,
        config,
        str(registry_path),
        signature,
        args.workers,
        native,
        run_dir=run_dir,
        create_registry=args.registry_create == "if-missing",
    )
    _install_sigterm_as_interrupt()
    print(
        f"conceptguard: serving {source} on http://{args.host}:{args.port} "
        f"(registry {registry_path}, {args.workers} worker(s))",
        flush=True,
    )
    # LitServe has already stopped its workers when a KeyboardInterrupt reaches us.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(
            host=args.host,
            port=args.port,
            generate_client_file=False,
            num_api_servers=1,
            **uvicorn_options(config),
        )
    if server.failure is not None:
        print(f"conceptguard: server stopped: {server.failure}", file=sys.stderr, flush=True)
        return 1
    print("conceptguard: server stopped", flush=True)
    return 0
