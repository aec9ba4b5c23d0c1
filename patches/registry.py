"""The patch registry: a versioned, content-addressed store of patches and tenant stacks.

`Registry` is the small interface every backend implements: a local directory
(`local_registry.py`, the embedded default for one machine) and a PostgreSQL database
(`pg_registry.py`, for replicas on many nodes). Records crossing it are frozen dataclasses
with `to_dict()` for JSON output. Every write bumps one registry-wide `generation`; server
workers ask for the changes since the generation they hold before each batch
(`changes_since`), so a refresh costs what changed, not what the registry holds. A registry
is created explicitly; once it exists, a missing state is an error, never an empty registry
(fail closed).
"""

from __future__ import annotations

import io
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from patches.errors import RegistryError
from patches.registry_records import (
    HISTORY_LIMIT,
    PatchRecord,
    Registration,
    StackEntry,
    TenantRecord,
    resolve_ref,
)

if TYPE_CHECKING:
    from patches.patch import Patch
    from patches.registry_state import RegistryChanges, RegistryState

__all__ = [
    "HISTORY_LIMIT",
    "PatchRecord",
    "Registration",
    "Registry",
    "StackEntry",
    "TenantRecord",
    "open_registry",
    "resolve_ref",
    "shown_location",
]

DATABASE_SCHEMES = ("postgresql", "postgres")


# --- the interface ---------------------------------------------------------------------


class Registry(ABC):
    """A versioned store of patches and per-tenant stacks. Every write bumps `generation`."""

    @abstractmethod
    def generation(self) -> int:
        """The current registry generation; cheap enough to call before every batch."""

    @abstractmethod
    def snapshot(self) -> RegistryState:
        """One consistent view of generation, patch records and tenant records (as cheap as
        `generation` when nothing changed), so a reader never mixes two generations."""

    @abstractmethod
    def changes_since(self, generation: int | None) -> RegistryChanges:
        """The change feed: what a reader holding the registry at `generation` needs to
        reach the current one - records created or changed since, names and ids removed -
        in one consistent read. Empty (and as cheap as `generation`) when nothing changed;
        `full` (everything) for None or a generation the backend cannot diff from."""

    @abstractmethod
    def put_patch_file(
        self,
        file: BinaryIO,
        name: str | None = None,
        check: Callable[[Patch], None] | None = None,
    ) -> Registration:
        """Validate the seekable binary `file` in bounded memory (and run `check` on it, a
        Patch whose tensors are on the meta device: names, dtypes and shapes) before writing
        anything; register it as a new version of `name` (default: the manifest's name, which
        must be a plain patch name). Bytes registered already are not stored again: their
        record comes back with `created` False, or PatchExists when `name` is another."""

    def put_patch(
        self,
        data: bytes,
        name: str | None = None,
        check: Callable[[Patch], None] | None = None,
    ) -> PatchRecord:
        """`put_patch_file` for bytes in memory; the record."""
        return self.put_patch_file(io.BytesIO(data), name, check).record

    @abstractmethod
    def get_patch_bytes(self, ref: str) -> bytes:
        """The stored file bytes of the patch `ref` names."""

    @abstractmethod
    def load_patch(self, ref: str) -> Patch:
        """The patch `ref` names, re-validated and checked against its id."""

    @abstractmethod
    def patch_record(self, ref: str) -> PatchRecord:
        """The record of the patch `ref` names."""

    @abstractmethod
    def list_patches(self) -> list[PatchRecord]:
        """All patches, sorted by name then version."""

    @abstractmethod
    def resolve(self, ref: str) -> str:
        """The patch id `ref` names (see `resolve_ref` for the accepted forms)."""

    @abstractmethod
    def delete_patch(self, ref: str) -> PatchRecord:
        """Remove a patch no tenant's current stack uses; returns its former record."""

    @abstractmethod
    def set_tenant(self, tenant: str, refs: Sequence[str], create: bool = True) -> TenantRecord:
        """Make `refs` (resolved to ids, applied in order) the tenant's stack. Without
        `create`, a tenant with no record is refused (TenantNotFound): typos stay visible."""

    @abstractmethod
    def get_tenant(self, tenant: str) -> TenantRecord:
        """The tenant's record."""

    @abstractmethod
    def list_tenants(self) -> list[TenantRecord]:
        """All tenants, sorted by name."""

    @abstractmethod
    def delete_tenant(self, tenant: str) -> None:
        """Forget a tenant and its history."""

    @abstractmethod
    def rollback_tenant(self, tenant: str, to_generation: int | None = None) -> TenantRecord:
        """Go back to the previous stack, or to the stack recorded at `to_generation`."""

    @abstractmethod
    def check(self) -> list[str]:
        """Consistency problems found in the stored state (empty when consistent)."""

    @abstractmethod
    def create(self) -> None:
        """Start a new, empty registry here; RegistryExists where one is, RegistryStateMissing
        where one was (its marker or patch files remain)."""

    @abstractmethod
    def recover(self, document: bytes) -> RegistryState:
        """Restore a copy of the state (`document`, a state.json) where the state is missing,
        after checking its consistency; it gets a generation above any this registry issued,
        so every worker rebuilds from it. Damaged patch files it names are left to `check`
        (their tenants fail closed)."""

    @abstractmethod
    def import_copy(self, state: RegistryState, patch_bytes: Callable[[str], bytes]) -> None:
        """Fill this registry, which must exist and be empty (generation 0), with a copy of
        another: `state` (generation, records, tenants with their histories, version
        counters) and the file `patch_bytes(id)` of every patch, each checked against its id
        before it is stored (`conceptguard registry migrate`). All or nothing where the
        backend has transactions; elsewhere a failure leaves it empty (stray files are
        orphans that the next put of the same bytes rewrites)."""

    def change_signal(self) -> threading.Event | None:
        """An Event set whenever the registry may have changed - a write by any process -
        for a reader that waits idle (it clears the Event, then asks `changes_since`); None
        where the backend has none, and the reader polls."""
        return None

    def close(self) -> None:  # noqa: B027 (most backends hold nothing open)
        """Release what the backend holds open (database connections); reads and writes
        may follow, and reopen them."""


def is_database_url(location: str | Path) -> bool:
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and scheme.lower() in DATABASE_SCHEMES


def shown_location(location: str | Path) -> str:
    """`location` as it may be printed or logged: a database URL without its password."""
    if not is_database_url(location):
        return str(location)
    from patches.pg_connect import redacted

    return redacted(str(location))


def open_registry(location: str | Path, create: bool = True) -> Registry:
    """The registry at `location`: a local directory, or a PostgreSQL database
    (`postgresql://USER@HOST:PORT/DB`, any libpq URL; the password best comes from the
    environment or a password file, PGPASSWORD / PGPASSFILE). With `create`, a location
    holding no registry (a missing or empty directory, a database without the registry's
    schema) gets a new, empty one; one whose state is missing is never re-initialised
    (reading or writing it raises RegistryStateMissing)."""
    text = str(location)
    scheme, sep, _ = text.partition("://")
    if is_database_url(text):
        from patches.pg_registry import PostgresRegistry

        return PostgresRegistry(text, create=create)
    if sep:
        raise RegistryError(
            f"registry location {shown_location(text)!r}: {scheme}:// registries are not "
            "supported; give a local directory path or a postgresql:// URL"
        )
    from patches.local_registry import LocalRegistry

    return LocalRegistry(Path(text), create=create)
