"""The PostgreSQL registry's patch files: `blobs` rows (id, size) with their bytes in
`blob_chunks` rows of 8 MiB, written inside the transaction that adds the record naming them
(so a crash leaves both or neither: no orphan, no record without its file) and read back
chunk by chunk, so storing or checking a large file costs bounded memory.

Messages name a file by its id only: they reach tenants inside 503 answers.
"""

from __future__ import annotations

import hashlib
import tempfile
from typing import TYPE_CHECKING, BinaryIO

from patches.errors import ContentHashMismatch, PatchFileError, PatchNotFound, RegistryCorrupt
from patches.registry_blobs import check_file
from patches.registry_records import PatchRecord

if TYPE_CHECKING:
    import psycopg

    from patches.patch import Patch
    from patches.patch_file import FileLimits
    from patches.patch_file_stream import CheckedFile


def label(pid: str) -> str:
    return f"patch file {pid[:16]}... in the registry database"


def store(connection: psycopg.Connection, file: BinaryIO, checked: CheckedFile) -> None:
    """Copy the checked `file` into blob rows (in the caller's transaction), refusing it if
    it changed since the check. A blob row left by anything else is replaced."""
    from patches.patch_file_stream import chunk_buffer

    pid = checked.sha256
    connection.execute("DELETE FROM conceptguard.blobs WHERE id = %s", (pid,))
    connection.execute(
        "INSERT INTO conceptguard.blobs (id, size) VALUES (%s, %s)", (pid, checked.size)
    )
    digest, buffer, seq, total = hashlib.sha256(), chunk_buffer(), 0, 0
    file.seek(0)
    while n := file.readinto(buffer):
        digest.update(buffer[:n])
        connection.execute(
            "INSERT INTO conceptguard.blob_chunks (id, seq, data) VALUES (%s, %s, %s)",
            (pid, seq, buffer[:n]),  # a view: psycopg sends it without a copy of ours
        )
        seq, total = seq + 1, total + n
    if digest.hexdigest() != pid or total != checked.size:
        raise ContentHashMismatch(
            "the file changed while it was being registered; nothing was stored"
        )


def read(connection: psycopg.Connection, pid: str, registered: bool) -> bytes:
    """The bytes of blob `pid`; `registered` says whether a record names it (a missing file
    is then damage, else a concurrent delete)."""
    rows = connection.execute(
        "SELECT b.size, c.data FROM conceptguard.blobs b "
        "LEFT JOIN conceptguard.blob_chunks c ON c.id = b.id WHERE b.id = %s ORDER BY c.seq",
        (pid,),
    ).fetchall()
    if not rows:
        if registered:
            raise RegistryCorrupt(f"patch {pid} is registered but its file is missing")
        raise PatchNotFound(f"patch {pid[:12]} was deleted while it was being read")
    return b"".join(bytes(data) for _, data in rows if data is not None)


def load(pid: str, data: bytes, limits: FileLimits | None) -> Patch:
    """The patch stored as `pid`, re-validated, its bytes checked against its id."""
    from patches.patch import Patch
    from patches.patch_file import DEFAULT_LIMITS

    actual = hashlib.sha256(data).hexdigest()
    if actual != pid:
        raise RegistryCorrupt(
            f"stored {label(pid)} hashes to {actual[:16]}..., not its id: the file was "
            "changed or damaged in the database"
        )
    try:
        return Patch.from_bytes(data, limits or DEFAULT_LIMITS)
    except PatchFileError as exc:
        raise RegistryCorrupt(f"stored {label(pid)} no longer passes validation: {exc}") from exc


def problems(
    connection: psycopg.Connection, record: PatchRecord, limits: FileLimits | None
) -> list[str]:
    """What is wrong with the blob of `record` (empty when whole and valid), checked from a
    temporary file in bounded memory."""
    name = f"patch {record.ref} ({record.id[:12]})"
    size = connection.execute(
        "SELECT size FROM conceptguard.blobs WHERE id = %s", (record.id,)
    ).fetchone()
    if size is None:
        return [f"{name}: its file is missing from the database"]
    seqs = [
        s
        for (s,) in connection.execute(
            "SELECT seq FROM conceptguard.blob_chunks WHERE id = %s ORDER BY seq", (record.id,)
        )
    ]
    if seqs != list(range(len(seqs))):
        return [f"{name}: its file's chunks are not contiguous"]
    with tempfile.TemporaryFile() as file:
        for seq in seqs:
            (data,) = connection.execute(
                "SELECT data FROM conceptguard.blob_chunks WHERE id = %s AND seq = %s",
                (record.id, seq),
            ).fetchone()
            file.write(data)
        try:
            checked, _ = check_file(file, limits)
        except PatchFileError as exc:
            return [f"{name}: fails validation: {exc}"]
    if checked.sha256 != record.id or not checked.size == record.size == size[0]:
        return [f"{name}: its file does not match its id"]
    return []


def orphans(connection: psycopg.Connection) -> list[str]:
    """Blobs no patch record names (a write that crashed cannot leave one: only tampering)."""
    return [
        f"patch file {pid[:12]} is stored but no patch record names it"
        for (pid,) in connection.execute(
            "SELECT b.id FROM conceptguard.blobs b LEFT JOIN conceptguard.patches p "
            "ON p.id = b.id WHERE p.id IS NULL ORDER BY b.id"
        )
    ]
