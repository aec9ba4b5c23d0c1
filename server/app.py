"""Assembling the LitServe server: the generation API (workers), the admin routes, /metrics.

`build_server` creates the registry if its location holds none and `create_registry` allows
it (a brand-new deployment), and refuses to start on one that exists but cannot be read (its
state.json missing, say) or, without `create_registry`, on a location that holds none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litserve.callbacks import Callback

from patches.registry import open_registry
from patches.signature import ModelSignature
from server.admin_routes import install_error_handlers, register_admin_routes
from server.auth import KeyRing
from server.config import ServerConfig
from server.generation_api import GenerationAPI, ModelSettings
from server.http_protocol import protocol_with_header_deadline
from server.images_spec import GENERATIONS_PATH
from server.metrics import RouteMetrics, register_metrics_route
from server.openai_routes import register_model_routes, served_model_id
from server.openapi import install_openapi
from server.supervisor import SupervisedServer


class QuietWorker(Callback):
    """Quiets each inference worker before it loads the model, which `serve`'s main process
    has just loaded in full view (conceptguard/quiet.py): the same warnings and progress bars
    once per worker would be noise."""

    def on_before_setup(self, *args: Any, **kwargs: Any) -> None:
        from conceptguard.quiet import (
            quiet_model_loading,
            silence_known_warnings,
            thread_only_tqdm_lock,
        )

        silence_known_warnings()
        quiet_model_loading()
        thread_only_tqdm_lock()


def build_server(
    settings: ModelSettings,
    config: ServerConfig,
    registry_path: str,
    signature: ModelSignature,
    workers: int,
    native: int,
    run_dir: Path | None = None,
    create_registry: bool = True,
    model_id: str | None = None,
) -> SupervisedServer:
    """The server for `settings`' model; `signature` is that model's ModelSignature, all the
    API process needs to verify uploads (the workers load the model themselves), and
    `native` its native image side (the default size and the unit of a request's work).
    `run_dir` is this run's directory for worker health (server/worker_health.py);
    `model_id` the name `GET /v1/models` gives the model (default: from its source)."""
    api = GenerationAPI(settings, config, registry_path, native=native, workers=workers)
    server = SupervisedServer(
        api,
        accelerator=settings.device,
        devices=1,
        workers_per_device=workers,
        timeout=config.batching.queue_timeout_s,
        run_dir=run_dir,
        shutdown_grace_s=config.supervision.shutdown_grace_s,
        callbacks=[QuietWorker()],
    )
    install_error_handlers(server.app)
    server.app.state.body_timeout_s = config.http.body_timeout_s
    keys = KeyRing(config)
    registry = open_registry(registry_path, create=create_registry)
    # A registry whose state is missing or unreadable stops the start here, with its reason,
    # instead of a server that answers 503 to everyone.
    registry.snapshot()
    model_id = model_id or served_model_id(settings.source)
    register_admin_routes(server.app, registry, keys, signature, config)
    register_model_routes(server.app, keys, model_id)
    register_metrics_route(server.app, keys)
    server.app.add_middleware(RouteMetrics, tenants=config.tenants, skip_path=GENERATIONS_PATH)
    install_openapi(server.app, config, native, model_id)
    return server


def uvicorn_options(config: ServerConfig) -> dict[str, Any]:
    """What `LitServer.run` passes on to uvicorn: slow clients cannot hold connections."""
    return {
        "http": protocol_with_header_deadline(config.http.header_timeout_s),
        "timeout_keep_alive": config.http.keep_alive_s,
    }
