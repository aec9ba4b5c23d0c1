"""API keys -> callers. Runs in the API process only: HTTP headers never reach the workers,
so the tenant resolved here travels to them inside the work item (server/schemas.py).

A key is sent as exactly one `Authorization: Bearer KEY` header (what the `openai` client
sends); a request with several is refused, never resolved by whichever comes first. A caller
is one tenant, the admin, or a metrics scraper; nothing in a request body, prompt or other
header can choose or change the tenant. Routes authenticate before they read a body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from starlette.datastructures import Headers

from server.config import ServerConfig, hash_key
from server.errors import Forbidden, InvalidRequest, Unauthorized

_SCHEME = "bearer "

Role = Literal["tenant", "admin", "metrics"]


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a tenant (by name), the admin, or a metrics scraper."""

    role: Role
    tenant: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


ADMIN = Caller("admin")
METRICS = Caller("metrics")


def authorization(headers: Headers) -> str | None:
    """The request's one Authorization header (None without one); several are refused."""
    values = headers.getlist("authorization")
    if len(values) > 1:
        raise InvalidRequest(
            f"the request has {len(values)} Authorization headers; send exactly one"
        )
    return values[0] if values else None


class KeyRing:
    """Resolves `Authorization` headers against the configured key hashes."""

    def __init__(self, config: ServerConfig):
        self._callers: dict[str, Caller] = {key: ADMIN for key in config.admin_keys}
        self._callers.update({key: METRICS for key in config.metrics_keys})
        for name, tenant in config.tenants.items():
            self._callers.update({key: Caller("tenant", name) for key in tenant.keys})
        self.tenants = frozenset(config.tenants)

    def identify(self, headers: Headers) -> Caller:
        value = authorization(headers)
        if not value:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        if value[: len(_SCHEME)].lower() != _SCHEME:
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        caller = self._callers.get(hash_key(value[len(_SCHEME) :].strip()))
        if caller is None:
            raise Unauthorized("unknown API key")
        return caller

    def tenant(self, headers: Headers) -> Caller:
        """A tenant caller, for the generation API."""
        caller = self.identify(headers)
        if caller.role != "tenant":
            does = {"admin": "manages patches and tenants", "metrics": "only reads /metrics"}
            raise Forbidden(
                f"the {caller.role} key {does[caller.role]}; generate with a tenant key"
            )
        return caller

    def admin(self, headers: Headers) -> Caller:
        """The admin caller, for patch and tenant management."""
        caller = self.identify(headers)
        if not caller.is_admin:
            who = f"tenant {caller.tenant!r}" if caller.tenant else f"the {caller.role} key"
            raise Forbidden(
                f"{who} may not manage patches or tenants: this route needs the admin key"
            )
        return caller

    def client(self, headers: Headers) -> Caller:
        """A tenant or the admin, for what every API client may read (GET /v1/models)."""
        caller = self.identify(headers)
        if caller.role == "metrics":
            raise Forbidden("the metrics key only reads /metrics")
        return caller

    def metrics(self, headers: Headers) -> Caller:
        """A metrics scraper or the admin, for GET /metrics (it names every tenant)."""
        caller = self.identify(headers)
        if caller.role == "tenant":
            raise Forbidden(
                "/metrics shows every tenant's traffic: it needs a metrics key or the admin key"
            )
        return caller
