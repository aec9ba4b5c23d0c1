"""The PostgreSQL registry's tables, and the one mapping between their rows and the registry's
records (`registry_records.py`).

Everything lives in the schema `conceptguard` (one registry per database):

    meta           one row: format, created_at, generation, feed_horizon. The row is the
                   registry's state: without it a registry that existed is missing, never
                   empty. Every write locks it first, so writes are serialised and commit
                   in generation order.
    patches        one row per patch record (id = sha256 of the file, C collation so that
                   id-prefix lookups use the primary key)
    versions       the highest version ever given to each name (never reused)
    tenants        a tenant's current stack and the generation it last changed at
    stack_history  the tenant's last HISTORY_LIMIT stack changes
    blobs          a patch file's id and size; its bytes are blob_chunks rows (8 MiB each),
                   written and read in bounded memory, in the same transaction as the record
    changes        the change feed: one row per write (generation, what it touched)

The generation is a counter in `meta`, not a SEQUENCE: a sequence hands numbers out in call
order, not commit order, and is not rolled back, so a reader could see generation 6 before
5 commits and skip 5 for ever, and a refused write would leave a hole.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from patches.registry_records import PatchRecord, StackEntry, TenantRecord
from patches.registry_state import RegistryChanges, RegistryState

if TYPE_CHECKING:
    import psycopg

SCHEMA_FORMAT = 1
CHANNEL = "conceptguard_registry"
# pg_advisory_xact_lock key for creating, recovering: "cg-registry" in ASCII.
CREATE_LOCK = 0x63672D7265676973
# The change feed keeps this many writes; a reader further behind reads everything.
FEED_KEEP = 100_000
FEED_PRUNE_EVERY = 1_000

DDL = (
    "CREATE SCHEMA IF NOT EXISTS conceptguard",
    """CREATE TABLE conceptguard.meta (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        format integer NOT NULL,
        created_at text NOT NULL,
        generation bigint NOT NULL CHECK (generation >= 0),
        feed_horizon bigint NOT NULL DEFAULT 0)""",
    """CREATE TABLE conceptguard.blobs (
        id text COLLATE "C" PRIMARY KEY,
        size bigint NOT NULL)""",
    """CREATE TABLE conceptguard.blob_chunks (
        id text COLLATE "C" NOT NULL REFERENCES conceptguard.blobs ON DELETE CASCADE,
        seq integer NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (id, seq))""",
    """CREATE TABLE conceptguard.patches (
        id text COLLATE "C" PRIMARY KEY,
        name text NOT NULL,
        version integer NOT NULL,
        size bigint NOT NULL,
        kind text NOT NULL,
        method text NOT NULL,
        concepts text[] NOT NULL,
        target text NOT NULL,
        created_at text NOT NULL,
        registered_at text NOT NULL,
        UNIQUE (name, version))""",
    """CREATE TABLE conceptguard.versions (
        name text PRIMARY KEY,
        version integer NOT NULL)""",
    """CREATE TABLE conceptguard.tenants (
        tenant text PRIMARY KEY,
        stack text[] NOT NULL,
        generation bigint NOT NULL)""",
    """CREATE TABLE conceptguard.stack_history (
        tenant text NOT NULL REFERENCES conceptguard.tenants ON DELETE CASCADE,
        generation bigint NOT NULL,
        stack text[] NOT NULL,
        at text NOT NULL,
        action text NOT NULL,
        PRIMARY KEY (tenant, generation))""",
    """CREATE TABLE conceptguard.changes (
        generation bigint PRIMARY KEY,
        kind text NOT NULL CHECK (kind IN ('patch', 'tenant', 'all')),
        key text NOT NULL)""",
)

PATCH_COLUMNS = "id, name, version, size, kind, method, concepts, target, created_at, registered_at"


# --- rows <-> records ----------------------------------------------------------------------


def patch_record(row: tuple) -> PatchRecord:
    pid, name, version, size, kind, method, concepts, target, created_at, registered_at = row
    return PatchRecord(
        pid, name, version, size, kind, method, list(concepts), target, created_at, registered_at
    )


def patch_row(record: PatchRecord) -> tuple:
    return (
        record.id,
        record.name,
        record.version,
        record.size,
        record.kind,
        record.method,
        list(record.concepts),
        record.target,
        record.created_at,
        record.registered_at,
    )


def read_patches(
    connection: psycopg.Connection, ids: Iterable[str] | None = None
) -> dict[str, PatchRecord]:
    """Patch records by id: all of them, or those of `ids` that exist."""
    if ids is None:
        rows = connection.execute(f"SELECT {PATCH_COLUMNS} FROM conceptguard.patches")
    else:
        rows = connection.execute(
            f"SELECT {PATCH_COLUMNS} FROM conceptguard.patches WHERE id = ANY(%s)", (list(ids),)
        )
    return {row[0]: patch_record(row) for row in rows}


def reference_candidates(
    connection: psycopg.Connection, refs: Iterable[str]
) -> dict[str, PatchRecord]:
    """Every record `resolve_ref` may look at to resolve each of `refs`: those named like a
    ref (or its NAME part) and those whose id starts with a hex ref. Resolving against them
    answers exactly as against every record, without reading every record."""
    names, prefixes = set(), set()
    for ref in refs:
        if not isinstance(ref, str):
            continue
        names.add(ref.rpartition("@")[0] if "@" in ref else ref)
        if ref and all(c in "0123456789abcdefABCDEF" for c in ref):
            prefixes.add(ref.lower() + "%")
    rows = connection.execute(
        f"SELECT {PATCH_COLUMNS} FROM conceptguard.patches WHERE name = ANY(%s) OR id LIKE ANY(%s)",
        (sorted(names), sorted(prefixes)),
    )
    return {row[0]: patch_record(row) for row in rows}


def read_tenants(
    connection: psycopg.Connection, names: Iterable[str] | None = None
) -> dict[str, TenantRecord]:
    """Tenant records (with their histories): all of them, or those of `names` that exist."""
    where, params = ("", ()) if names is None else (" WHERE tenant = ANY(%s)", (list(names),))
    tenants = connection.execute(
        f"SELECT tenant, stack, generation FROM conceptguard.tenants{where}", params
    ).fetchall()
    histories: dict[str, list[StackEntry]] = {}
    for tenant, generation, stack, at, action in connection.execute(
        "SELECT tenant, generation, stack, at, action FROM conceptguard.stack_history"
        f"{where} ORDER BY tenant, generation",
        params,
    ):
        histories.setdefault(tenant, []).append(StackEntry(generation, tuple(stack), at, action))
    return {
        name: TenantRecord(name, tuple(stack), generation, tuple(histories.get(name, ())))
        for name, stack, generation in tenants
    }


def read_state(connection: psycopg.Connection, generation: int) -> RegistryState:
    """Every record (inside one snapshot_read, at `generation`)."""
    versions = dict(connection.execute("SELECT name, version FROM conceptguard.versions"))
    return RegistryState(generation, read_patches(connection), read_tenants(connection), versions)


def read_meta(connection: psycopg.Connection) -> tuple[int, int] | None:
    """(generation, feed_horizon), or None when the state row is missing."""
    row = connection.execute("SELECT generation, feed_horizon FROM conceptguard.meta").fetchone()
    return None if row is None else (row[0], row[1])


def read_changes(
    connection: psycopg.Connection, since: int | None, generation: int, horizon: int
) -> tuple[RegistryChanges, RegistryState | None]:
    """The changes after `since` (inside one snapshot_read, at `generation`), and the whole
    state when they are everything."""
    kinds: dict[str, set[str]] = {"patch": set(), "tenant": set(), "all": set()}
    if since is not None and horizon <= since <= generation:
        for kind, key in connection.execute(
            "SELECT kind, key FROM conceptguard.changes WHERE generation > %s", (since,)
        ):
            kinds[kind].add(key)
    if since is None or not horizon <= since <= generation or kinds["all"]:
        state = read_state(connection, generation)
        return RegistryChanges.everything(since, state), state
    tenants = read_tenants(connection, kinds["tenant"]) if kinds["tenant"] else {}
    patches = read_patches(connection, kinds["patch"]) if kinds["patch"] else {}
    changes = RegistryChanges(
        since,
        generation,
        tenants=tenants,
        removed_tenants=frozenset(kinds["tenant"] - tenants.keys()),
        patches=patches,
        removed_patches=frozenset(kinds["patch"] - patches.keys()),
    )
    return changes, None


# --- writes (inside a write transaction) -----------------------------------------------------


def write_tenant(connection: psycopg.Connection, record: TenantRecord) -> None:
    """Store `record`, made by `append_history` from the stored one: its last history entry
    is new, and entries older than its first are dropped."""
    connection.execute(
        "INSERT INTO conceptguard.tenants (tenant, stack, generation) VALUES (%s, %s, %s) "
        "ON CONFLICT (tenant) DO UPDATE SET stack = EXCLUDED.stack, "
        "generation = EXCLUDED.generation",
        (record.tenant, list(record.stack), record.generation),
    )
    entry = record.history[-1]
    connection.execute(
        "INSERT INTO conceptguard.stack_history (tenant, generation, stack, at, action) "
        "VALUES (%s, %s, %s, %s, %s)",
        (record.tenant, entry.generation, list(entry.stack), entry.at, entry.action),
    )
    connection.execute(
        "DELETE FROM conceptguard.stack_history WHERE tenant = %s AND generation < %s",
        (record.tenant, record.history[0].generation),
    )


def write_records(connection: psycopg.Connection, state: RegistryState) -> None:
    """Store every record of `state` into empty record tables (COPY: 10,000 tenants in a
    fraction of a second)."""
    with connection.cursor() as cursor:
        with cursor.copy(f"COPY conceptguard.patches ({PATCH_COLUMNS}) FROM STDIN") as copy:
            for record in state.patches.values():
                copy.write_row(patch_row(record))
        with cursor.copy("COPY conceptguard.versions (name, version) FROM STDIN") as copy:
            for item in state.versions.items():
                copy.write_row(item)
        with cursor.copy(
            "COPY conceptguard.tenants (tenant, stack, generation) FROM STDIN"
        ) as copy:
            for t in state.tenants.values():
                copy.write_row((t.tenant, list(t.stack), t.generation))
        with cursor.copy(
            "COPY conceptguard.stack_history (tenant, generation, stack, at, action) FROM STDIN"
        ) as copy:
            for t in state.tenants.values():
                for e in t.history:
                    copy.write_row((t.tenant, e.generation, list(e.stack), e.at, e.action))


def clear_records(connection: psycopg.Connection) -> None:
    connection.execute(
        "TRUNCATE conceptguard.patches, conceptguard.versions, conceptguard.tenants, "
        "conceptguard.stack_history"
    )


def commit_write(connection: psycopg.Connection, generation: int, kind: str, key: str = "") -> None:
    """Record a write (inside its transaction, holding the meta lock): the new generation,
    its change-feed row, and a notification that listeners receive when it commits."""
    connection.execute("UPDATE conceptguard.meta SET generation = %s", (generation,))
    connection.execute(
        "INSERT INTO conceptguard.changes (generation, kind, key) VALUES (%s, %s, %s)",
        (generation, kind, key),
    )
    if generation % FEED_PRUNE_EVERY == 0 and generation > FEED_KEEP:
        horizon = generation - FEED_KEEP
        connection.execute("DELETE FROM conceptguard.changes WHERE generation <= %s", (horizon,))
        connection.execute("UPDATE conceptguard.meta SET feed_horizon = %s", (horizon,))
    connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(generation)))


def names_only(names: Iterable[str]) -> Mapping[str, Any]:
    """Names as the mapping `unknown_tenant` lists from."""
    return dict.fromkeys(names)
