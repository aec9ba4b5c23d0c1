"""`PostgresRegistry`: the registry in a PostgreSQL database, for replicas on many nodes.

Patches, tenants and their stack histories are rows (`pg_schema.py`); patch files are blob
rows written in the same transaction as the record naming them (`pg_blobs.py`). Every write
is one transaction that first locks the `meta` row, so writes are serialised, commit in
generation order, and leave nothing half-written when a writer dies at any point: the
database rolls its transaction back. Each write adds one `changes` row, and readers ask for
the changes since the generation they hold (`changes_since`): a worker's refresh after one
assignment reads one tenant, whatever the number of tenants. Each write also NOTIFYs the
channel `conceptguard_registry` with its generation: `change_signal` (pg_listener.py) wakes
idle readers, `wait_for_change` waits for one write.

The same guarantees as the local backend: files are validated before anything is written;
a registry is created explicitly (the schema and its `meta` row), and a database whose
`meta` row is gone, or that has no schema, is never read as an empty registry
(RegistryStateMissing); an unreachable database is RegistryUnreadable (503): every tenant
fails closed, and the next read after it is back serves again.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from patches import pg_blobs
from patches.errors import (
    PatchExists,
    PatchInUse,
    PatchNotFound,
    RegistryCorrupt,
    RegistryError,
    RegistryExists,
    RegistryStateMissing,
    RegistryUnreadable,
    TenantNotFound,
)
from patches.pg_connect import ConnectionPool, redacted, snapshot_read
from patches.pg_listener import ChangeListener
from patches.pg_schema import (
    CHANNEL,
    CREATE_LOCK,
    DDL,
    PATCH_COLUMNS,
    SCHEMA_FORMAT,
    clear_records,
    commit_write,
    names_only,
    patch_row,
    read_changes,
    read_meta,
    read_patches,
    read_state,
    read_tenants,
    reference_candidates,
    write_records,
    write_tenant,
)
from patches.registry import Registry
from patches.registry_blobs import check_file
from patches.registry_records import (
    PatchRecord,
    Registration,
    TenantRecord,
    append_history,
    check_patch_name,
    check_stack,
    check_tenant_name,
    default_patch_name,
    now_iso,
    resolve_ref,
    rollback_target,
)
from patches.registry_state import (
    RegistryChanges,
    RegistryState,
    apply_changes,
    require_copyable,
    state_problems,
    unknown_tenant,
)

if TYPE_CHECKING:
    import psycopg

    from patches.patch import Patch
    from patches.patch_file import FileLimits

T = TypeVar("T")


class PostgresRegistry(Registry):
    """A registry in the database `dsn` names (a libpq URL or key=value string); safe for
    many processes on many machines. With `create`, a database without the registry's
    schema gets a new, empty registry."""

    def __init__(self, dsn: str, limits: FileLimits | None = None, create: bool = True) -> None:
        self.dsn = dsn
        self.limits = limits
        self._pool = ConnectionPool(dsn)
        # The last whole state read (snapshot), brought forward by the change feed.
        self._state: RegistryState | None = None
        self._state_lock = threading.Lock()
        self._listener: ChangeListener | None = None
        if create:
            self._create(exist_ok=True)

    def __repr__(self) -> str:
        return f"PostgresRegistry({redacted(self.dsn)!r})"

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._pool.close()

    def change_signal(self) -> threading.Event:
        """Set on every NOTIFY of the registry's channel (and when the listening connection
        breaks or comes back); the listener starts with the first call, in the calling
        process (a server worker, after its fork)."""
        if self._listener is None:
            self._listener = ChangeListener(self._pool)
        return self._listener.changed

    # --- existence ----------------------------------------------------------------------

    def _missing_state(self, connection: psycopg.Connection) -> RegistryStateMissing:
        exists = connection.execute("SELECT to_regclass('conceptguard.meta')").fetchone()[0]
        if exists is None:
            return RegistryStateMissing(
                "there is no registry in this database (no conceptguard schema); create one "
                "with `conceptguard registry init`"
            )
        (blobs,) = connection.execute("SELECT count(*) FROM conceptguard.blobs").fetchone()
        return RegistryStateMissing(
            "the registry's state row (conceptguard.meta) is missing, but a registry exists "
            f"in this database (its schema, {blobs} patch file(s)): nothing is served or "
            "changed rather than starting an empty registry. Restore the database, or "
            "restore a copy of the state with `conceptguard registry recover --from FILE`"
        )

    def _create(self, exist_ok: bool) -> None:
        def create(connection: psycopg.Connection) -> None:
            with connection.transaction():
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (CREATE_LOCK,))
                exists = connection.execute("SELECT to_regclass('conceptguard.meta')").fetchone()[0]
                if exists is not None:
                    if read_meta(connection) is None:
                        if exist_ok:
                            return  # a registry whose state is missing: reads say so
                        raise self._missing_state(connection)
                    if exist_ok:
                        return
                    raise RegistryExists("a registry exists in this database already")
                for statement in DDL:
                    connection.execute(statement)
                connection.execute(
                    "INSERT INTO conceptguard.meta (format, created_at, generation) "
                    "VALUES (%s, %s, 0)",
                    (SCHEMA_FORMAT, now_iso()),
                )

        self._pool.run("creating the registry", create)

    def create(self) -> None:
        self._create(exist_ok=False)

    # --- reading ------------------------------------------------------------------------

    def _read(self, what: str, work: Callable[[psycopg.Connection], T]) -> T:
        """`work` in one snapshot of the database, on a registry that exists."""

        def read(connection: psycopg.Connection) -> T:
            with snapshot_read(connection):
                if read_meta(connection) is None:
                    raise self._missing_state(connection)
                return work(connection)

        return self._pool.run(what, read, retry=True)

    def _changes(self, since: int | None) -> tuple[RegistryChanges, RegistryState | None]:
        def read(connection: psycopg.Connection):
            meta = read_meta(connection)
            if meta is None:
                raise self._missing_state(connection)
            if since is not None and since == meta[0]:
                return RegistryChanges(since, since), None
            with snapshot_read(connection):
                meta = read_meta(connection)
                if meta is None:
                    raise self._missing_state(connection)
                return read_changes(connection, since, *meta)

        return self._pool.run("reading the registry's changes", read, retry=True)

    def changes_since(self, generation: int | None) -> RegistryChanges:
        return self._changes(generation)[0]

    def generation(self) -> int:
        def read(connection: psycopg.Connection) -> int:
            meta = read_meta(connection)
            if meta is None:
                raise self._missing_state(connection)
            return meta[0]

        return self._pool.run("reading the generation", read, retry=True)

    def snapshot(self) -> RegistryState:
        with self._state_lock:
            cached = self._state
            changes, whole = self._changes(cached.generation if cached else None)
            if changes.empty and cached is not None:
                return cached
            state = whole if whole is not None else apply_changes(cached, changes)
            self._state = state
            return state

    def _resolve(self, connection: psycopg.Connection, refs: Sequence[str]) -> list[str]:
        candidates = reference_candidates(connection, refs)
        return [resolve_ref(candidates, ref) for ref in refs]

    def resolve(self, ref: str) -> str:
        return self._read("resolving a patch reference", lambda c: self._resolve(c, [ref])[0])

    def patch_record(self, ref: str) -> PatchRecord:
        def read(connection: psycopg.Connection) -> PatchRecord:
            candidates = reference_candidates(connection, [ref])
            return candidates[resolve_ref(candidates, ref)]

        return self._read("reading a patch record", read)

    def list_patches(self) -> list[PatchRecord]:
        patches = self._read("listing patches", read_patches)
        return sorted(patches.values(), key=lambda r: (r.name, r.version))

    def _patch_file(self, ref: str) -> tuple[str, bytes]:
        def read(connection: psycopg.Connection) -> tuple[str, bytes]:
            pid = self._resolve(connection, [ref])[0]
            return pid, pg_blobs.read(connection, pid, registered=True)

        return self._read("reading a patch file", read)

    def get_patch_bytes(self, ref: str) -> bytes:
        return self._patch_file(ref)[1]

    def load_patch(self, ref: str) -> Patch:
        return pg_blobs.load(*self._patch_file(ref), self.limits)

    def get_tenant(self, tenant: str) -> TenantRecord:
        def read(connection: psycopg.Connection) -> TenantRecord:
            record = read_tenants(connection, [tenant]).get(tenant)
            if record is None:
                raise TenantNotFound(unknown_tenant(tenant, self._some_tenants(connection)))
            return record

        return self._read("reading a tenant", read)

    def list_tenants(self) -> list[TenantRecord]:
        tenants = self._read("listing tenants", read_tenants)
        return [tenants[name] for name in sorted(tenants)]

    @staticmethod
    def _some_tenants(connection: psycopg.Connection) -> dict:
        rows = connection.execute(
            "SELECT tenant FROM conceptguard.tenants ORDER BY tenant LIMIT 20"
        )
        return names_only(name for (name,) in rows)

    # --- writing ------------------------------------------------------------------------

    def _write(self, what: str, work: Callable[[psycopg.Connection, int], T]) -> T:
        """`work(connection, generation)` in one transaction holding the writers' lock (the
        meta row), on a registry that exists; it commits when `work` returns."""

        def write(connection: psycopg.Connection) -> T:
            with connection.transaction():
                row = connection.execute(
                    "SELECT generation FROM conceptguard.meta FOR UPDATE"
                ).fetchone()
                if row is None:
                    raise self._missing_state(connection)
                return work(connection, row[0])

        return self._pool.run(what, write)

    def put_patch_file(
        self,
        file: BinaryIO,
        name: str | None = None,
        check: Callable[[Patch], None] | None = None,
    ) -> Registration:
        checked, patch = check_file(file, self.limits)
        if check is not None:
            check(patch)
        named = name is not None
        name = check_patch_name(name) if named else default_patch_name(patch)
        pid, manifest = checked.sha256, checked.manifest

        def put(connection: psycopg.Connection, generation: int) -> Registration:
            existing = read_patches(connection, [pid]).get(pid)
            if existing is not None:
                if named and name != existing.name:
                    raise PatchExists(
                        f"this file is registered already as {existing.ref} (id "
                        f"{pid[:12]}); a patch has one name: use {existing.ref!r}, or delete "
                        f"it before registering it as {name!r}"
                    )
                return Registration(existing, created=False)
            (version,) = connection.execute(
                "SELECT 1 + greatest(coalesce((SELECT max(version) FROM conceptguard.patches "
                "WHERE name = %(n)s), 0), coalesce((SELECT version FROM conceptguard.versions "
                "WHERE name = %(n)s), 0))",
                {"n": name},
            ).fetchone()
            record = PatchRecord(
                id=pid,
                name=name,
                version=version,
                size=checked.size,
                kind=manifest.kind,
                method=manifest.method,
                concepts=list(manifest.concepts),
                target=manifest.target.component,
                created_at=manifest.created_at.isoformat(),
                registered_at=now_iso(),
            )
            pg_blobs.store(connection, file, checked)  # before the record that names it
            connection.execute(
                f"INSERT INTO conceptguard.patches ({PATCH_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                patch_row(record),
            )
            connection.execute(
                "INSERT INTO conceptguard.versions (name, version) VALUES (%s, %s) "
                "ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version",
                (name, version),
            )
            commit_write(connection, generation + 1, "patch", pid)
            return Registration(record, created=True)

        return self._write("registering a patch", put)

    def delete_patch(self, ref: str) -> PatchRecord:
        def delete(connection: psycopg.Connection, generation: int) -> PatchRecord:
            candidates = reference_candidates(connection, [ref])
            record = candidates[resolve_ref(candidates, ref)]
            users = [
                t
                for (t,) in connection.execute(
                    "SELECT tenant FROM conceptguard.tenants WHERE %s = ANY(stack) ORDER BY tenant",
                    (record.id,),
                )
            ]
            if users:
                raise PatchInUse(
                    f"patch {record.ref} ({record.id[:12]}) is in the current stack of "
                    f"tenant(s) {', '.join(users)}; give them another stack first"
                )
            connection.execute("DELETE FROM conceptguard.patches WHERE id = %s", (record.id,))
            connection.execute("DELETE FROM conceptguard.blobs WHERE id = %s", (record.id,))
            commit_write(connection, generation + 1, "patch", record.id)
            return record

        return self._write("deleting a patch", delete)

    def set_tenant(self, tenant: str, refs: Sequence[str], create: bool = True) -> TenantRecord:
        check_tenant_name(tenant)
        if isinstance(refs, str):
            raise TypeError("refs must be a sequence of patch references, not one string")
        refs = list(refs)

        def assign(connection: psycopg.Connection, generation: int) -> TenantRecord:
            old = read_tenants(connection, [tenant]).get(tenant)
            if not create and old is None:
                known = unknown_tenant(tenant, self._some_tenants(connection))
                raise TenantNotFound(f"{known}; creating a tenant must be asked for (--create)")
            ids = tuple(self._resolve(connection, refs))
            check_stack(tenant, ids, refs)
            record = append_history(old, tenant, ids, generation + 1, "assign")
            write_tenant(connection, record)
            commit_write(connection, generation + 1, "tenant", tenant)
            return record

        return self._write("assigning a tenant's stack", assign)

    def rollback_tenant(self, tenant: str, to_generation: int | None = None) -> TenantRecord:
        def rollback(connection: psycopg.Connection, generation: int) -> TenantRecord:
            old = read_tenants(connection, [tenant]).get(tenant)
            if old is None:
                raise TenantNotFound(unknown_tenant(tenant, self._some_tenants(connection)))
            stack = rollback_target(old, to_generation)
            present = read_patches(connection, stack).keys()
            missing = [pid[:12] for pid in stack if pid not in present]
            if missing:
                raise PatchNotFound(
                    f"cannot roll tenant {tenant!r} back: that stack uses deleted patch(es) "
                    f"{', '.join(missing)}; register them again first"
                )
            record = append_history(old, tenant, stack, generation + 1, "rollback")
            write_tenant(connection, record)
            commit_write(connection, generation + 1, "tenant", tenant)
            return record

        return self._write("rolling a tenant back", rollback)

    def delete_tenant(self, tenant: str) -> None:
        def delete(connection: psycopg.Connection, generation: int) -> None:
            gone = connection.execute(
                "DELETE FROM conceptguard.tenants WHERE tenant = %s RETURNING tenant", (tenant,)
            ).fetchone()
            if gone is None:
                raise TenantNotFound(unknown_tenant(tenant, self._some_tenants(connection)))
            commit_write(connection, generation + 1, "tenant", tenant)

        self._write("deleting a tenant", delete)

    # --- whole registries ---------------------------------------------------------------

    def recover(self, document: bytes) -> RegistryState:
        try:
            restored = RegistryState.from_json(document)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RegistryCorrupt(
                f"the file to recover from is not a registry state: {exc}"
            ) from None
        problems = state_problems(restored)
        if problems:
            raise RegistryCorrupt(
                f"the state cannot be restored ({len(problems)} problem(s)): "
                + "; ".join(problems[:5])
            )

        def recover(connection: psycopg.Connection) -> RegistryState:
            with connection.transaction():
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (CREATE_LOCK,))
                if read_meta(connection) is not None:
                    raise RegistryExists(
                        "the registry's state row is present; recover only restores a missing one"
                    )
                (issued,) = connection.execute(
                    "SELECT coalesce(max(generation), 0) FROM conceptguard.changes"
                ).fetchone()
                # Above every generation issued here, so no worker mistakes it for its own.
                state = replace(restored, generation=max(issued, restored.generation) + 1)
                clear_records(connection)
                write_records(connection, state)
                connection.execute(
                    "INSERT INTO conceptguard.meta (format, created_at, generation) "
                    "VALUES (%s, %s, %s)",
                    (SCHEMA_FORMAT, now_iso(), state.generation - 1),
                )
                commit_write(connection, state.generation, "all")
                return state

        return self._pool.run("recovering the registry's state", recover)

    def import_copy(self, state: RegistryState, patch_bytes: Callable[[str], bytes]) -> None:
        require_copyable(state)

        def fill(connection: psycopg.Connection, generation: int) -> None:
            (records,) = connection.execute(
                "SELECT (SELECT count(*) FROM conceptguard.patches) + "
                "(SELECT count(*) FROM conceptguard.tenants)"
            ).fetchone()
            if generation != 0 or records:
                raise RegistryExists(
                    f"this registry is not new and empty (generation {generation}): a copy "
                    "goes into a new registry only"
                )
            if state.generation == 0:
                return  # a new, empty registry: nothing to copy
            for pid in state.patches:
                data = patch_bytes(pid)
                checked, _ = check_file(io.BytesIO(data), self.limits)
                if checked.sha256 != pid:
                    raise RegistryCorrupt(f"the copy's file for patch {pid[:12]} is not it")
                pg_blobs.store(connection, io.BytesIO(data), checked)
            write_records(connection, state)
            commit_write(connection, state.generation, "all")

        self._write("copying a registry in", fill)

    # --- checking -----------------------------------------------------------------------

    def check(self) -> list[str]:
        def read(connection: psycopg.Connection) -> list[str]:
            generation = read_meta(connection)[0]
            state = read_state(connection, generation)
            problems = []
            for record in state.patches.values():
                problems += pg_blobs.problems(connection, record, self.limits)
            return problems + pg_blobs.orphans(connection) + state_problems(state)

        try:
            return self._read("checking the registry", read)
        except (RegistryCorrupt, RegistryUnreadable) as exc:
            return [str(exc)]

    # --- notifications ------------------------------------------------------------------

    def wait_for_change(self, generation: int, timeout: float) -> int | None:
        """Block until a write after `generation` commits or `timeout` seconds pass: the
        generation then current, or None on timeout. One listening connection per call;
        used by benchmarks and tools, not on the batch path."""
        connection = None
        try:
            connection = self._pool.connect()
            connection.execute(f"LISTEN {CHANNEL}")
            current = self.generation()
            if current > generation:
                return current
            for _ in connection.notifies(timeout=timeout, stop_after=1):
                return self.generation()
            return None
        except RegistryError:
            raise
        except Exception as exc:
            from patches.pg_connect import registry_error

            raise registry_error(exc, "waiting for a change") from None
        finally:
            if connection is not None:
                connection.close()
