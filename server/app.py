"""Assembling the LitServe server: the generation API (workers), the admin routes, /metrics.

`build_server` creates the registry if its location holds none (a brand-new deployment) and
refuses to start on one that exists but cannot be read (its state.json missing, say).
"""

from __future__ import annotations

import litserve as ls

from patches.registry import open_registry
from patches.signature import ModelSignature
from server.admin_routes import install_error_handlers, register_admin_routes
from server.auth import KeyRing
from server.config import ServerConfig
from server.generation_api import GenerationAPI, ModelSettings
from server.metrics import register_metrics_route


def build_server(
    settings: ModelSettings,
    config: ServerConfig,
    registry_path: str,
    signature: ModelSignature,
    workers: int,
) -> ls.LitServer:
    """The server for `settings`' model; `signature` is that model's ModelSignature, all the
    API process needs to verify uploads (the workers load the model themselves)."""
    api = GenerationAPI(settings, config, registry_path)
    server = ls.LitServer(
        api,
        accelerator=settings.device,
        devices=1,
        workers_per_device=workers,
        timeout=config.batching.queue_timeout_s,
    )
    install_error_handlers(server.app)
    keys = KeyRing(config)
    registry = open_registry(registry_path)
    # A registry whose state is missing or unreadable stops the start here, with its reason,
    # instead of a server that answers 503 to everyone.
    registry.snapshot()
    register_admin_routes(server.app, registry, keys, signature, config)
    register_metrics_route(server.app, keys)
    return server
