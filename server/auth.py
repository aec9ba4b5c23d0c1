"""API keys -> callers. Runs in the API process only: HTTP headers never reach the workers,
so the tenant resolved here travels to them inside the work item (server/schemas.py).

A key is sent as `Authorization: Bearer KEY` (what the `openai` client sends). A caller is
either one tenant or the admin; nothing in a request body, prompt or other header can
choose or change the tenant.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.config import ServerConfig, hash_key
from server.errors import Forbidden, Unauthorized

_SCHEME = "bearer "


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a tenant (by name) or the admin (tenant None)."""

    tenant: str | None

    @property
    def is_admin(self) -> bool:
        return self.tenant is None


ADMIN = Caller(tenant=None)


class KeyRing:
    """Resolves `Authorization` headers against the configured key hashes."""

    def __init__(self, config: ServerConfig):
        self._callers: dict[str, Caller] = {key: ADMIN for key in config.admin_keys}
        for name, tenant in config.tenants.items():
            self._callers.update({key: Caller(tenant=name) for key in tenant.keys})
        self.tenants = frozenset(config.tenants)

    def identify(self, authorization: str | None) -> Caller:
        if not authorization:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        if authorization[: len(_SCHEME)].lower() != _SCHEME:
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        caller = self._callers.get(hash_key(authorization[len(_SCHEME) :].strip()))
        if caller is None:
            raise Unauthorized("unknown API key")
        return caller

    def tenant(self, authorization: str | None) -> Caller:
        """A tenant caller, for the generation API."""
        caller = self.identify(authorization)
        if caller.is_admin:
            raise Forbidden("the admin key manages patches and tenants; generate with a tenant key")
        return caller

    def admin(self, authorization: str | None) -> Caller:
        """The admin caller, for patch and tenant management."""
        caller = self.identify(authorization)
        if not caller.is_admin:
            raise Forbidden(
                f"tenant {caller.tenant!r} may not manage patches or tenants: this route needs "
                "the admin key"
            )
        return caller
