"""The registry backends the registry tests run against, and what a test needs to look
inside either one: everything stored, the stored patch files, and ways to damage them.

`local`: a directory under the test's tmp_path. `postgres`: a database of its own on the
test process's real PostgreSQL server (tests/pg_server.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pg_server import fresh_dsn

from patches.local_registry import LocalRegistry
from patches.registry import Registry, open_registry

BACKENDS = ("local", "postgres")
TABLES = ("meta", "patches", "versions", "tenants", "stack_history", "blobs", "blob_chunks")


def location(kind: str, tmp_path: Path, name: str = "registry") -> str:
    """Where a new registry of `kind` goes (nothing is created there)."""
    return str(tmp_path / name) if kind == "local" else fresh_dsn()


def new_registry(kind: str, tmp_path: Path, name: str = "registry") -> Registry:
    return open_registry(location(kind, tmp_path, name))


def sql(registry: Registry, statement: str, params: tuple = ()) -> list[tuple]:
    """Run `statement` on a PostgreSQL registry's database, as someone with access would."""
    import psycopg

    with psycopg.connect(registry.dsn, autocommit=True) as connection:
        cursor = connection.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def stored(registry: Registry) -> dict[str, Any]:
    """Everything the registry has stored (files, or rows), to compare before and after."""
    if isinstance(registry, LocalRegistry):
        root = registry.root
        return {
            str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }
    return {table: sorted(sql(registry, f"SELECT * FROM conceptguard.{table}")) for table in TABLES}


def blob_ids(registry: Registry) -> set[str]:
    """The ids of the patch files stored (whether or not a record names them)."""
    if isinstance(registry, LocalRegistry):
        return {p.name.removesuffix(".safetensors") for p in (registry.root / "blobs").iterdir()}
    return {pid for (pid,) in sql(registry, "SELECT id FROM conceptguard.blobs")}


def overwrite_blob(registry: Registry, pid: str, data: bytes) -> None:
    """Replace the stored file of patch `pid` by `data` (damage on disk or in the table)."""
    if isinstance(registry, LocalRegistry):
        (registry.root / "blobs" / f"{pid}.safetensors").write_bytes(data)
        return
    sql(registry, "DELETE FROM conceptguard.blob_chunks WHERE id = %s", (pid,))
    sql(
        registry,
        "INSERT INTO conceptguard.blob_chunks (id, seq, data) VALUES (%s, 0, %s)",
        (pid, data),
    )
    sql(registry, "UPDATE conceptguard.blobs SET size = %s WHERE id = %s", (len(data), pid))


def remove_blob(registry: Registry, pid: str) -> None:
    if isinstance(registry, LocalRegistry):
        (registry.root / "blobs" / f"{pid}.safetensors").unlink()
        return
    sql(registry, "DELETE FROM conceptguard.blobs WHERE id = %s", (pid,))
