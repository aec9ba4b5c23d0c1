"""The server's typed configuration: tenants and their API keys, the admin key, request
bounds, batching, the registry.

Loaded from a YAML or JSON file (`conceptguard serve --config FILE`) and/or the environment.
API keys are stored and compared only as sha256 hashes (`sha256:<64 hex>`); the environment
may give plain keys, which are hashed as they are read and never kept.

    tenants:
      acme:   {keys: ["sha256:9f86d0..."]}
      globex: {keys: ["sha256:60303a..."]}
    admin_keys: ["sha256:fd61a0..."]
    metrics_keys: ["sha256:2c26b4..."]   # for Prometheus scrapers: GET /metrics only
    registry: /var/lib/conceptguard/registry
    limits: {max_prompt_chars: 1000, max_images: 4, max_steps: 100, max_image_steps: 400}
    batching: {max_batch_size: 8, batch_timeout_s: 0.02, queue_timeout_s: 300, build_grace_s: 0.05}
    admission: {tenant_share: 0.5}
    http: {header_timeout_s: 10, body_timeout_s: 30}
    supervision: {stuck_after_s: 60, shutdown_grace_s: 5}

Environment: CONCEPTGUARD_API_KEYS="acme=KEY1,globex=KEY2" (plain keys or sha256: hashes),
CONCEPTGUARD_ADMIN_KEY="KEY" and CONCEPTGUARD_METRICS_KEY="KEY" (comma-separated for
several), CONCEPTGUARD_REGISTRY=DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from patches.errors import ConceptGuardError
from patches.registry_records import check_tenant_name

KeyHash = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
ENV_API_KEYS = "CONCEPTGUARD_API_KEYS"
ENV_ADMIN_KEY = "CONCEPTGUARD_ADMIN_KEY"
ENV_METRICS_KEY = "CONCEPTGUARD_METRICS_KEY"
ENV_REGISTRY = "CONCEPTGUARD_REGISTRY"


class ConfigError(ConceptGuardError):
    """A configuration file or environment variable that cannot be used as it is."""

    http_status = 500


def hash_key(key: str) -> str:
    """The stored form of an API key. Keys are random tokens, so a plain sha256 suffices."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _stored_form(key: str) -> str:
    key = key.strip()
    if not key:
        raise ConfigError("an API key is empty")
    return key if key.startswith("sha256:") else hash_key(key)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TenantConfig(_Strict):
    keys: list[KeyHash] = Field(min_length=1)


# `conceptguard serve --compile`: off, or a torch.compile mode (server/compiled.py).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


class Limits(_Strict):
    """Bounds on one generation request; each violation is a 400 that names the bound.

    Work is bounded relative to the served model: `max_side` defaults to twice the model's
    native side, and `max_image_steps` bounds n x steps x (width x height) / native side^2,
    the request's work counted in denoising steps of one image at the native size.
    """

    max_prompt_chars: int = Field(default=1000, ge=1, le=100_000)
    max_images: int = Field(default=4, ge=1, le=64)
    max_steps: int = Field(default=100, ge=1, le=1000)
    min_side: int = Field(default=32, ge=8)
    # None: twice the served model's native side (a 512-pixel model: 1024).
    max_side: int | None = Field(default=None, ge=8, le=4096)
    max_image_steps: int = Field(default=400, ge=1)
    default_steps: int = Field(default=25, ge=1)
    default_guidance_scale: float = Field(default=4.0, ge=0.0)

    @model_validator(mode="after")
    def _consistent(self) -> Limits:
        if self.min_side % 8 or (self.max_side or 8) % 8:
            raise ValueError("min_side and max_side must be multiples of 8")
        if self.max_side is not None and self.min_side > self.max_side:
            raise ValueError("min_side must not exceed max_side")
        if self.default_steps > self.max_steps:
            raise ValueError("default_steps must not exceed max_steps")
        return self

    def max_side_for(self, native: int) -> int:
        """The largest side a request may ask of a model whose native side is `native`."""
        if self.max_side is not None:
            return self.max_side
        return max(self.min_side, min(4096, 2 * native // 8 * 8))


class Batching(_Strict):
    max_batch_size: int = Field(default=8, ge=1, le=256)
    # How long a worker waits for more requests to fill a batch.
    batch_timeout_s: float = Field(default=0.02, ge=0.0, le=5.0)
    # Queue-wait limit: a request no worker has started within it gets 504 at that moment
    # (and is never computed).
    queue_timeout_s: float = Field(default=300.0, gt=0.0)
    # How long a batch waits for a stack build its rows need (a tenant whose stack just
    # changed) before it starts without them (they join a later batch): the most one
    # tenant's stack change can delay the other rows of a batch. 0: never wait.
    build_grace_s: float = Field(default=0.05, ge=0.0, le=1.0)
    # Denoising steps of the one generation each worker runs before it reports ready (so
    # the first request does not pay for kernel selection and allocations); 0: none.
    warm_up_steps: int = Field(default=2, ge=0, le=50)


class Admission(_Strict):
    """How many generation requests the server holds, and how they reach the workers.

    A request holds a place from the moment its key is checked (before its body is read)
    until it is answered. Beyond `max_in_flight`, or beyond a tenant's share of it, the
    answer is 429 with Retry-After. Requests go to the workers' queue at most
    `dispatch_window` at a time; the others wait in per-tenant queues, taken round robin, so
    a tenant with many queued requests delays another tenant's request by at most one turn.
    """

    # None: 4 x workers x max_batch_size.
    max_in_flight: int | None = Field(default=None, ge=1)
    # The most one tenant may hold: max(1, tenant_share x max_in_flight).
    tenant_share: float = Field(default=0.5, gt=0.0, le=1.0)
    # None: 2 x workers x max_batch_size (enough to keep every worker's batches full).
    dispatch_window: int | None = Field(default=None, ge=1)

    def in_flight_for(self, workers: int, batch: int) -> int:
        return self.max_in_flight or 4 * workers * batch

    def tenant_cap_for(self, workers: int, batch: int) -> int:
        return max(1, int(self.tenant_share * self.in_flight_for(workers, batch)))

    def window_for(self, workers: int, batch: int) -> int:
        return self.dispatch_window or 2 * workers * batch


class HttpTimeouts(_Strict):
    """Slow or stalled clients: connections are not held open by them."""

    # From a connection's first byte (or its opening) to a request's complete headers.
    header_timeout_s: float = Field(default=10.0, gt=0.0, le=600.0)
    # The longest pause within a request body; a JSON body must also be whole within it.
    body_timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    # An idle keep-alive connection is closed after this long.
    keep_alive_s: int = Field(default=5, ge=1, le=600)


class Supervision(_Strict):
    """Watching the inference workers (server/worker_health.py)."""

    # A worker that has shown no sign of life (it beats between batches, at least every
    # second while idle, and at every denoising step) for this long is stuck: its requests
    # get 503 WorkerLost, and /health is 503 while every worker is stuck or gone.
    stuck_after_s: float = Field(default=60.0, gt=0.0)
    # On SIGTERM: how long open HTTP exchanges (an upload being received) may take to end.
    # Generation requests still waiting are answered 503 ShuttingDown at once.
    shutdown_grace_s: int = Field(default=5, ge=0, le=600)


class ServerConfig(_Strict):
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    admin_keys: list[KeyHash] = Field(default_factory=list)
    # Keys that may read GET /metrics and nothing else (the admin key may too).
    metrics_keys: list[KeyHash] = Field(default_factory=list)
    registry: str | None = None
    limits: Limits = Field(default_factory=Limits)
    batching: Batching = Field(default_factory=Batching)
    admission: Admission = Field(default_factory=Admission)
    http: HttpTimeouts = Field(default_factory=HttpTimeouts)
    supervision: Supervision = Field(default_factory=Supervision)
    max_patch_bytes: int = Field(default=1 << 30, ge=1024)
    # Uploads spooled and checked at once, per API process; more get 429 with Retry-After.
    max_concurrent_uploads: int = Field(default=2, ge=1, le=64)

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, tenants: dict[str, TenantConfig]) -> dict[str, TenantConfig]:
        for name in tenants:
            check_tenant_name(name)
        return tenants

    @model_validator(mode="after")
    def _keys_unique(self) -> ServerConfig:
        owners: dict[str, str] = {}
        roles = [(k, "the admin") for k in self.admin_keys]
        roles += [(k, "the metrics scraper") for k in self.metrics_keys]
        roles += [(k, f"tenant {name!r}") for name, t in self.tenants.items() for k in t.keys]
        for key, role in roles:
            if key in owners and owners[key] != role:
                raise ValueError(f"one key is given to both {owners[key]} and {role}")
            owners[key] = role
        return self

    def has_keys(self) -> bool:
        return bool(self.admin_keys) or any(t.keys for t in self.tenants.values())


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ValueError as exc:  # yaml.YAMLError and json.JSONDecodeError are ValueErrors
        kind = path.suffix[1:] or "JSON"
        raise ConfigError(f"config file {path} is not valid {kind}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _env_keys(env: Mapping[str, str], data: dict) -> dict:
    tenants = {name: dict(t) for name, t in (data.get("tenants") or {}).items()}
    for item in filter(None, (part.strip() for part in env.get(ENV_API_KEYS, "").split(","))):
        tenant, sep, key = item.partition("=")
        if not sep:
            raise ConfigError(f"{ENV_API_KEYS} entries look like TENANT=KEY; got {item[:20]!r}")
        entry = tenants.setdefault(tenant.strip(), {"keys": []})
        entry["keys"] = [*entry.get("keys", []), _stored_form(key)]
    admin = list(data.get("admin_keys") or [])
    admin += [_stored_form(k) for k in env.get(ENV_ADMIN_KEY, "").split(",") if k.strip()]
    metrics = list(data.get("metrics_keys") or [])
    metrics += [_stored_form(k) for k in env.get(ENV_METRICS_KEY, "").split(",") if k.strip()]
    return {**data, "tenants": tenants, "admin_keys": admin, "metrics_keys": metrics}


def load_config(path: str | os.PathLike | None, env: Mapping[str, str] | None = None):
    """The configuration from `path` (YAML or JSON, optional) with the environment added."""
    env = os.environ if env is None else env
    data = _read_file(Path(path)) if path else {}
    data = _env_keys(env, data)
    if not data.get("registry") and env.get(ENV_REGISTRY):
        data["registry"] = env[ENV_REGISTRY]
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as exc:
        where = f"config file {path}" if path else "configuration"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'top level'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{where}: {problems}") from None


def with_generated_keys(config: ServerConfig) -> tuple[ServerConfig, dict[str, str]]:
    """For a server started with no keys at all: one random key for tenant 'default' and one
    admin key, valid for this run only (printed once, like a notebook token)."""
    keys = {role: "cg-" + secrets.token_urlsafe(24) for role in ("default", "admin")}
    tenants = {**config.tenants, "default": TenantConfig(keys=[hash_key(keys["default"])])}
    updated = config.model_copy(
        update={"tenants": tenants, "admin_keys": [hash_key(keys["admin"])]}
    )
    return ServerConfig.model_validate(updated.model_dump()), keys
