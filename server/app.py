"""Assembling the LitServe server: the generation API (workers), the admin routes, /metrics."""

from __future__ import annotations

from typing import Any

import litserve as ls

from patches.registry import open_registry
from patches.targets import pipeline_components
from server.admin_routes import install_error_handlers, register_admin_routes
from server.auth import KeyRing
from server.config import ServerConfig
from server.generation_api import GenerationAPI, ModelSettings
from server.metrics import register_metrics_route


def build_server(
    settings: ModelSettings,
    config: ServerConfig,
    registry_path: str,
    pipe: Any,
    workers: int,
) -> ls.LitServer:
    """The server for `settings`' model; `pipe` is that model loaded in this process (on the
    CPU), used by the API process to verify uploads."""
    # Hash every component now, before LitServe forks the API process, so the fork finds
    # the fingerprints cached and verifying an upload never rehashes the model.
    from patches.patch import base_fingerprint

    for module in pipeline_components(pipe).values():
        base_fingerprint(module)
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
    register_admin_routes(
        server.app, open_registry(registry_path), keys, pipe, config.max_patch_bytes
    )
    register_metrics_route(server.app)
    return server
