"""A real multi-tenant `conceptguard serve` for tests: keys, a config file, HTTP helpers."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image
from server_process import ServerProcess, start_server

from server.config import hash_key

TENANT_KEYS = {t: f"test-key-{t}" for t in "abcd"}
ADMIN_KEY = "test-admin-key"
METRICS_KEY = "test-metrics-key"
GENERATE = "/v1/images/generations"


def write_config(path: Path, **extra: Any) -> Path:
    """A JSON server config with the test keys (stored hashed, like a real one)."""
    config = {
        "tenants": {t: {"keys": [hash_key(k)]} for t, k in TENANT_KEYS.items()},
        "admin_keys": [hash_key(ADMIN_KEY)],
        "metrics_keys": [hash_key(METRICS_KEY)],
        **extra,
    }
    path.write_text(json.dumps(config, indent=2))
    return path


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def images_of(response: requests.Response) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))
        for item in response.json()["data"]
    ]


@dataclass
class TenantServer:
    process: ServerProcess
    registry: Path | str

    @property
    def url(self) -> str:
        return self.process.url

    def generate(self, tenant: str, prompt: str = "a red circle", seed: int = 1, **extra):
        body = {"prompt": prompt, "seed": seed, "steps": 3, **extra}
        return requests.post(
            self.url + GENERATE, json=body, headers=bearer(TENANT_KEYS[tenant]), timeout=120
        )

    def image(self, tenant: str, prompt: str = "a red circle", seed: int = 1):
        """(first image, conceptguard record) of a request that must succeed."""
        response = self.generate(tenant, prompt, seed)
        assert response.status_code == 200, response.text
        return images_of(response)[0], response.json()["conceptguard"]

    def metrics_text(self) -> str:
        """GET /metrics as a scraper does (with the metrics key)."""
        response = requests.get(self.url + "/metrics", headers=bearer(METRICS_KEY), timeout=30)
        assert response.status_code == 200, response.text
        return response.text

    def admin(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(
            method, self.url + path, headers=bearer(ADMIN_KEY), timeout=60, **kwargs
        )


def start_tenant_server(
    folder: Path,
    model: Path,
    workers: int = 2,
    registry: str | None = None,
    env: dict[str, str] | None = None,
    serve_args: list[str] | None = None,
    **config: Any,
):
    """`registry`: a location (a database URL); default a new directory in `folder`.
    `serve_args`: more `conceptguard serve` options."""
    location = registry or folder / "registry"
    config_path = write_config(folder / "config.json", **config)
    args = ["--workers", str(workers), "--model", str(model), "--registry", str(location)]
    args += ["--config", str(config_path), *(serve_args or [])]
    process = start_server(args, folder / "server.log", env)
    return TenantServer(process, location)
