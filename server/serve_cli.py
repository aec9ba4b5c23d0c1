"""`conceptguard serve`: run the LitServe server in the foreground.

The model is a local diffusers folder (the embedded MiniCanvas one by default), loaded with
no network access, or a hub id: fetched once, here, where this machine may reach a hub
(HF_HUB_OFFLINE=1 forbids it), and then served from its local copy, so the workers never
touch the network and serve exactly the revision this process checked.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import socket
import sys
from pathlib import Path

from patches.errors import ConceptGuardError, ModelLoadError
from server.config import COMPILE_MODES

ENV_DATA_HOME = "XDG_DATA_HOME"


class ListenFailed(ConceptGuardError):
    """The server cannot listen on the address asked for."""


def default_registry_dir() -> Path:
    """Where a server started without --registry, config or $CONCEPTGUARD_REGISTRY keeps its
    registry: a per-user data directory, so that no local registry (`conceptguard registry`'s
    default is ./registry) is a running server's by accident."""
    data_home = os.environ.get(ENV_DATA_HOME) or str(Path.home() / ".local" / "share")
    return Path(data_home) / "conceptguard" / "registry"


def _registry_location(location: str | Path) -> str:
    """A registry directory made absolute (the workers start elsewhere), or a database URL
    as it was given."""
    from patches.registry import is_database_url

    return str(location) if is_database_url(location) else str(Path(location).resolve())


def _host(value: str) -> str:
    from server.http_protocol import listening_address

    try:
        return listening_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the image-generation server")
    parser.add_argument(
        "--model",
        help="diffusers pipeline folder, or a hub id where this machine may reach a hub "
        "(default: the embedded MiniCanvas model)",
    )
    parser.add_argument(
        "--registry",
        help="patch registry: a directory, or a postgresql:// URL for replicas on several "
        "nodes (default: the config's, else $CONCEPTGUARD_REGISTRY, "
        f"else {default_registry_dir()})",
    )
    parser.add_argument(
        "--registry-create",
        choices=("if-missing", "never"),
        default="if-missing",
        help="create an empty registry where --registry holds none (if-missing, the default), "
        "or refuse to start there (never: for replicas that must share an existing registry)",
    )
    parser.add_argument("--config", help="server config file, YAML or JSON (server/config.py)")
    parser.add_argument(
        "--host",
        type=_host,
        default="127.0.0.1",
        help="address to listen on: any of this machine's interface addresses, or 0.0.0.0 / "
        ":: for all (default: 127.0.0.1)",
    )
    parser.add_argument("--port", type=int, default=8000, help="1024 to 65535 (default: 8000)")
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="off",
        help="serve the denoiser and VAE through torch.compile in this mode (each worker "
        "compiles every batch bucket before it reports ready; for GPUs; default off)",
    )
    parser.add_argument("--timeout", type=float, help="queue-wait limit in seconds (config)")
    parser.set_defaults(func=serve_command)


def _install_stop_signals() -> None:
    """Map SIGTERM and SIGINT to KeyboardInterrupt in this (main) process only.

    LitServe shuts its workers down cleanly only on KeyboardInterrupt; containers send
    SIGTERM, which would otherwise orphan the workers with the port still bound. SIGINT is
    installed explicitly because a shell starts background jobs with SIGINT ignored, and
    Python then leaves it ignored (`kill -INT` would do nothing). Forked children inherit
    the handler, and there the signals keep their default meaning.
    """
    main_pid = os.getpid()

    def handler(signum, frame) -> None:
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


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


def _listen(host: str, port: int) -> socket.socket:
    from server.http_protocol import bind_listening_socket

    shown = f"[{host}]" if ":" in host else host
    try:
        return bind_listening_socket(host, port)
    except OSError as exc:
        raise ListenFailed(f"cannot listen on {shown}:{port}: {exc.strerror}") from None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")


def _local_model(source: str) -> str:
    """A local folder for `source`: itself if it is one; a hub id fetched into the hub cache
    (progress shown), or ModelLoadError saying why the hub could not give it."""
    if Path(source).exists() or _hub_offline():
        return source  # load_pipeline refuses a hub id while the hub is off, saying so
    from diffusers import DiffusionPipeline

    try:
        return str(DiffusionPipeline.download(source))
    except Exception as exc:
        raise ModelLoadError(_hub_failure(source, exc)) from None


def _hub_failure(source: str, exc: BaseException) -> str:
    """Why the hub did not give `source`, from the causes chained to `exc`."""
    from huggingface_hub import constants

    where = f"the model hub at {constants.ENDPOINT}"
    cause: BaseException | None = exc
    while cause is not None:
        response = getattr(cause, "response", None)
        status = getattr(response, "status_code", None)
        if status == 404:
            return (
                f"{where} has no model {source!r} (HTTP 404; a private or gated model needs a "
                "token: set HF_TOKEN)"
            )
        if status in (401, 403):
            return (
                f"{where} refused {source!r} (HTTP {status}): it is private or gated; set "
                "HF_TOKEN to a token that may read it"
            )
        if type(cause).__name__ in ("ConnectError", "ConnectTimeout") or isinstance(
            cause, ConnectionError | socket.gaierror | TimeoutError
        ):
            return (
                f"cannot reach {where} to fetch {source!r} ({cause}); on a machine without "
                f"hub access, download it where there is (`hf download {source} --local-dir "
                "DIR`) and pass --model DIR"
            )
        cause = cause.__cause__ or cause.__context__
    return f"cannot fetch {source!r} from {where}: {exc}"


def _serve(args: argparse.Namespace, run_dir: Path) -> int:
    import torch

    from conceptguard.quiet import quiet_model_loading
    from patches.loading import load_pipeline
    from patches.registry import shown_location
    from patches.signature import ModelSignature
    from server.app import build_server, uvicorn_options
    from server.config import load_config, with_generated_keys
    from server.default_model import default_model_path
    from server.generation import native_size
    from server.generation_api import ModelSettings
    from server.openai_routes import served_model_id

    config = load_config(args.config)
    if args.timeout is not None:
        batching = config.batching.model_copy(update={"queue_timeout_s": args.timeout})
        config = config.model_copy(update={"batching": batching})
    registry_path = _registry_location(args.registry or config.registry or default_registry_dir())
    listen = _listen(args.host, args.port)  # a port in use is refused before the model loads
    source = args.model or str(default_model_path())
    folder = _local_model(source)
    # One thread here: this process only loads and hashes, and LitServe forks the API process
    # from it (a forked child must not inherit a busy OpenMP pool).
    torch.set_num_threads(1)
    print(f"conceptguard: loading {source}", flush=True)
    quiet_model_loading()
    # Load once in the parent so a bad model fails here, with a clear message, not in workers.
    pipe = load_pipeline(folder, args.dtype, "cpu")
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
    settings = ModelSettings(
        source=folder, device=args.device, dtype=args.dtype, compile=args.compile
    )
    server = build_server(
        settings,
        config,
        str(registry_path),
        signature,
        args.workers,
        native,
        run_dir=run_dir,
        create_registry=args.registry_create == "if-missing",
        model_id=served_model_id(source),
    )
    _install_stop_signals()
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"conceptguard: serving {source} on http://{shown}:{args.port} "
        f"(registry {shown_location(registry_path)}, {args.workers} worker(s))",
        flush=True,
    )
    # LitServe has already stopped its workers when a KeyboardInterrupt reaches us.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(
            listen=listen,
            generate_client_file=False,
            num_api_servers=1,
            **uvicorn_options(config),
        )
    if server.failure is not None:
        print(f"conceptguard: server stopped: {server.failure}", file=sys.stderr, flush=True)
        return 1
    print("conceptguard: server stopped", flush=True)
    return 0
