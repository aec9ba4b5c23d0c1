"""The registry's content-addressed patch files: `DIR/blobs/<id>.safetensors`, immutable.

Files are checked from disk in bounded memory before they are stored (an upload may be
gigabytes), copied in chunks, and re-hashed on the way so a file that changed after its check
is never stored. Names in messages are relative to the registry (`blobs/<id>.safetensors`):
they reach tenants inside 503 answers, and a server's paths are nobody else's business.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from patches.atomic import atomic_writer
from patches.errors import (
    ContentHashMismatch,
    PatchFileError,
    PatchNotFound,
    RegistryCorrupt,
    RegistryUnreadable,
)
from patches.registry_records import PatchRecord

if TYPE_CHECKING:
    from patches.patch import Patch
    from patches.patch_file import FileLimits
    from patches.patch_file_stream import CheckedFile


def check_file(file: BinaryIO, limits: FileLimits | None) -> tuple[CheckedFile, Patch]:
    """Validate a patch file from disk in bounded memory; the Patch holds its tensors on the
    meta device (names, dtypes, shapes): enough for `check_structure` and `verify`."""
    # Imported here: torch takes about a second to import and only validation needs it.
    from patches.patch import Patch
    from patches.patch_file import DEFAULT_LIMITS
    from patches.patch_file_stream import check_patch_file

    checked = check_patch_file(file, limits or DEFAULT_LIMITS)
    patch = Patch(checked.manifest, checked.meta_tensors())
    patch.check_structure()
    return checked, patch


class BlobStore:
    """Patch files by id in `directory`, written through temp files in `tmp_dir`."""

    def __init__(self, directory: Path, tmp_dir: Path, limits: FileLimits | None) -> None:
        self.directory = directory
        self.tmp_dir = tmp_dir
        self.limits = limits

    def path(self, pid: str) -> Path:
        return self.directory / f"{pid}.safetensors"

    @staticmethod
    def name(pid: str) -> str:
        return f"blobs/{pid}.safetensors"

    def count(self) -> int:
        try:
            return sum(1 for e in os.scandir(self.directory) if e.name.endswith(".safetensors"))
        except FileNotFoundError:
            return 0
        except OSError as exc:
            # Unknown is not zero: a registry whose files cannot be listed may well exist.
            raise RegistryUnreadable(f"blobs/ cannot be read: {exc.strerror}") from None

    def store(self, file: BinaryIO, checked: CheckedFile) -> None:
        """Copy the checked `file` into its blob, refusing it if it changed since the check."""
        from patches.patch_file_stream import chunk_buffer

        digest = hashlib.sha256()
        file.seek(0)
        path = self.path(checked.sha256)
        buffer = chunk_buffer()
        with atomic_writer(path, self.tmp_dir) as out:
            while n := file.readinto(buffer):
                digest.update(buffer[:n])
                out.write(buffer[:n])
            if digest.hexdigest() != checked.sha256:
                raise ContentHashMismatch(
                    "the file changed while it was being registered; nothing was stored"
                )

    def read(self, pid: str, registered: bool) -> bytes:
        """The bytes of blob `pid`; `registered` says whether a record names it (a missing
        file is then damage, else a concurrent delete)."""
        try:
            return self.path(pid).read_bytes()
        except FileNotFoundError:
            if registered:
                raise RegistryCorrupt(
                    f"patch {pid} is registered but its file {self.name(pid)} is missing"
                ) from None
            raise PatchNotFound(f"patch {pid[:12]} was deleted while it was being read") from None
        except OSError as exc:
            raise RegistryUnreadable(f"{self.name(pid)} cannot be read: {exc.strerror}") from None

    def load(self, pid: str, data: bytes) -> Patch:
        """The patch stored as `pid`, re-validated, its bytes checked against its id."""
        from patches.patch import Patch
        from patches.patch_file import DEFAULT_LIMITS

        actual = hashlib.sha256(data).hexdigest()
        if actual != pid:
            raise RegistryCorrupt(
                f"stored patch file {self.name(pid)} hashes to {actual[:16]}..., not its id "
                f"{pid[:16]}...: the file was changed or damaged on disk"
            )
        try:
            return Patch.from_bytes(data, self.limits or DEFAULT_LIMITS)
        except PatchFileError as exc:
            raise RegistryCorrupt(
                f"stored patch {pid[:16]}... no longer passes validation: {exc}"
            ) from exc

    def problems(self, record: PatchRecord) -> list[str]:
        """What is wrong with the blob of `record` (empty when it is whole and valid)."""
        label, name = f"patch {record.ref} ({record.id[:12]})", self.name(record.id)
        try:
            with open(self.path(record.id), "rb") as file:
                checked, _ = check_file(file, self.limits)
        except FileNotFoundError:
            return [f"{label}: file {name} is missing"]
        except OSError as exc:
            return [f"{label}: file {name} cannot be read: {exc.strerror}"]
        except PatchFileError as exc:
            return [f"{label}: fails validation: {exc}"]
        if checked.sha256 != record.id or checked.size != record.size:
            return [f"{label}: {name} does not match its id"]
        return []
